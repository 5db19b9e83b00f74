//! Where secret references may read from. A touchpoint file is written by whoever can open a pull
//! request, and its secrets are sent to the URL the same file names, so a reference must not reach
//! whatever the process running touchctl can read:
//!
//! - `{ file = "path" }` resolves against the touchpoint file's folder, symbolic links followed,
//!   and must land inside **the repository** (the git work tree holding the touchpoint folder, or
//!   the touchpoint folder itself when it is not in git) or inside the **secrets folder** the
//!   operator configured (`--secrets-dir`, `TOUCHCTL_SECRETS_DIR`, e.g. `/run/secrets`). It must be
//!   a regular file of at most [`MAX_SECRET_BYTES`] bytes: its type is checked on the resolved path
//!   before it is opened, and again on the opened handle, which is opened non-blocking, so neither
//!   a FIFO nor a device can stall or flood a read. touchctl's own files (the daemon's API token
//!   file) are never a source.
//! - `{ env = "NAME" }` never names one of touchctl's own variables (`TOUCHCTL_*`, such as the
//!   daemon's API token); those stay readable as touchctl's configuration, never as a secret. An
//!   operator may narrow the names further with an allow-list (`--secret-env-allow`,
//!   `TOUCHCTL_SECRET_ENV_ALLOW`: names, or prefixes ending in `*`).
//! - Whatever is read must be one line of text: a line break or other control character inside a
//!   value is refused, since no `Authorization` header or signature can carry it.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::secret::{MAX_SECRET_BYTES, SecretError};

/// The prefix of touchctl's own environment variables.
const OWN_PREFIX: &str = "TOUCHCTL_";

/// Whether `name` is one of touchctl's own variables (`TOUCHCTL_*`, in any case), which are never a
/// secret source.
pub fn is_own_variable(name: &str) -> bool {
    name.get(..OWN_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(OWN_PREFIX))
}

/// One entry of the environment allow-list: a variable name, or a prefix ending in `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvPattern(String);

impl EnvPattern {
    /// Whether the variable `name` is allowed by this entry.
    pub fn matches(&self, name: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == self.0,
        }
    }
}

impl FromStr for EnvPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let name = text.strip_suffix('*').unwrap_or(text);
        let mut chars = name.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if valid {
            Ok(Self(text.to_string()))
        } else if text.is_empty() {
            Err("an entry of the list is empty: name variables, or prefixes ending in `*`, separated by commas (e.g. SMS_GATEWAY_TOKEN,WECHAT_*)".to_string())
        } else {
            Err(format!(
                "`{}` is not a variable name or a prefix ending in `*` (e.g. SMS_GATEWAY_TOKEN or WECHAT_*)",
                text.escape_debug()
            ))
        }
    }
}

impl fmt::Display for EnvPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What secret references may read (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct SecretPolicy {
    /// The repository's folder, canonical; absent when the touchpoint folder does not exist.
    repository: Option<PathBuf>,
    /// The secrets folder as configured; resolved at each read, since it may be mounted later.
    secrets_dir: Option<PathBuf>,
    /// When not empty, the only variables a reference may name.
    env_allow: Vec<EnvPattern>,
    /// touchctl's own files (canonical), with what each is, for the message.
    own_files: Vec<(PathBuf, String)>,
}

impl SecretPolicy {
    /// File references may resolve inside `repository` (made canonical here).
    pub fn new(repository: Option<&Path>) -> Self {
        Self {
            repository: repository.and_then(|r| r.canonicalize().ok()),
            ..Self::default()
        }
    }

    /// File references may also resolve inside `dir`.
    pub fn with_secrets_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.secrets_dir = dir;
        self
    }

    /// Environment references may name only variables these patterns allow (all, when empty).
    pub fn with_env_allow(mut self, patterns: Vec<EnvPattern>) -> Self {
        self.env_allow = patterns;
        self
    }

    /// `path`, one of touchctl's own files (`what` says which), is never read as a secret.
    pub fn with_own_file(mut self, path: &Path, what: &str) -> Self {
        if let Ok(canonical) = path.canonicalize() {
            self.own_files.push((canonical, what.to_string()));
        }
        self
    }

    /// The repository's folder, canonical.
    pub fn repository(&self) -> Option<&Path> {
        self.repository.as_deref()
    }

    /// Reads the variable `name`, if the policy allows it.
    pub(crate) fn read_env(&self, name: &str) -> Result<String, SecretError> {
        if is_own_variable(name) {
            return Err(SecretError::OwnVariable(name.to_string()));
        }
        if !self.env_allow.is_empty() && !self.env_allow.iter().any(|p| p.matches(name)) {
            let allowed: Vec<String> = self.env_allow.iter().map(ToString::to_string).collect();
            return Err(SecretError::EnvNotAllowed {
                name: name.to_string(),
                allowed: allowed.join(", "),
            });
        }
        let value = match std::env::var_os(name) {
            Some(v) if !v.is_empty() => v,
            _ => return Err(SecretError::EnvMissing(name.to_string())),
        };
        if value.len() as u64 > MAX_SECRET_BYTES {
            return Err(SecretError::EnvTooLarge(name.to_string()));
        }
        let value = value
            .into_string()
            .map_err(|_| SecretError::EnvNotUnicode(name.to_string()))?;
        one_line(&value, || format!("environment variable {name}"))?;
        Ok(value)
    }

    /// Reads the file at `path` (as referenced: the touchpoint's folder joined with the reference),
    /// if the policy allows it; surrounding whitespace is trimmed.
    pub(crate) fn read_file(&self, path: &Path) -> Result<String, SecretError> {
        let unreadable = |source| SecretError::FileUnreadable {
            path: path.to_path_buf(),
            source,
        };
        let resolved = std::fs::canonicalize(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SecretError::FileMissing(path.to_path_buf()),
            _ => unreadable(e),
        })?;
        self.check_place(path, &resolved)?;
        // The resolved path has no links left, so this is the file itself; a FIFO or a device is
        // refused here, before any open could block on it or read it.
        let meta = std::fs::metadata(&resolved).map_err(unreadable)?;
        check_file_type(path, &meta)?;
        // Non-blocking and without following a link, in case the path was replaced in between; the
        // opened handle is checked again, and the read is bounded whatever the size said.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
            .open(&resolved)
            .map_err(unreadable)?;
        check_file_type(path, &file.metadata().map_err(unreadable)?)?;
        let mut bytes = Vec::new();
        (&file)
            .take(MAX_SECRET_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(unreadable)?;
        if bytes.len() as u64 > MAX_SECRET_BYTES {
            return Err(SecretError::FileTooLarge(path.to_path_buf()));
        }
        let text =
            String::from_utf8(bytes).map_err(|_| SecretError::NotText(path.to_path_buf()))?;
        let value = text.trim();
        if value.is_empty() {
            return Err(SecretError::FileEmpty(path.to_path_buf()));
        }
        one_line(value, || format!("secret file {}", path.display()))?;
        Ok(value.to_string())
    }

    /// Where a secret that touchctl writes itself (an authorizer refresh token) goes: the file at
    /// `path` (as referenced), in its folder with links followed, which must be a place secrets
    /// may be read from, as for [`Self::read_file`]. A link at `path` itself is not followed: it
    /// is replaced by the file written. The folder may not exist yet: the nearest one that does
    /// must then be such a place.
    pub(crate) fn place_for_writing(&self, path: &Path) -> Result<PathBuf, SecretError> {
        let name = path.file_name().ok_or_else(|| SecretError::NotRegular {
            path: path.to_path_buf(),
            kind: "a folder",
        })?;
        let folder = path.parent().unwrap_or(Path::new("."));
        let mut existing = folder;
        let mut missing = Vec::new();
        let canonical = loop {
            match std::fs::canonicalize(existing) {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let Some(n) = existing.file_name() else {
                        return Err(SecretError::FileUnreadable {
                            path: path.to_path_buf(),
                            source: e,
                        });
                    };
                    missing.push(n.to_os_string());
                    existing = existing.parent().unwrap_or(Path::new("."));
                }
                Err(e) => {
                    return Err(SecretError::FileUnreadable {
                        path: path.to_path_buf(),
                        source: e,
                    });
                }
            }
        };
        let mut resolved = canonical;
        for n in missing.iter().rev() {
            resolved.push(n);
        }
        resolved.push(name);
        self.check_place(path, &resolved)?;
        Ok(resolved)
    }

    /// Refuses a resolved path outside the repository and the secrets folder, or one of touchctl's
    /// own files.
    fn check_place(&self, path: &Path, resolved: &Path) -> Result<(), SecretError> {
        if let Some((_, what)) = self.own_files.iter().find(|(own, _)| own == resolved) {
            return Err(SecretError::OwnFile {
                path: path.to_path_buf(),
                what: what.clone(),
            });
        }
        let secrets_dir = self.secrets_dir.as_deref().map(Path::canonicalize);
        let inside = |root: Option<&Path>| root.is_some_and(|r| resolved.starts_with(r));
        if inside(self.repository()) || inside(secrets_dir.as_ref().and_then(|r| r.as_deref().ok()))
        {
            return Ok(());
        }
        let mut folders = Vec::new();
        if let Some(repo) = self.repository() {
            folders.push(format!("the repository {}", repo.display()));
        }
        let note = match (&self.secrets_dir, &secrets_dir) {
            (Some(_), Some(Ok(dir))) => {
                folders.push(format!("the secrets folder {}", dir.display()));
                String::new()
            }
            (Some(given), _) => format!(" (the secrets folder {} does not exist)", given.display()),
            (None, _) => " (no secrets folder is configured)".to_string(),
        };
        let allowed = if folders.is_empty() {
            format!("every folder secrets may be read from{note}")
        } else {
            format!("{}{note}", folders.join(" and "))
        };
        Err(SecretError::FileOutside {
            path: path.to_path_buf(),
            resolved: resolved.to_path_buf(),
            allowed,
        })
    }
}

/// Refuses anything but a regular file of at most [`MAX_SECRET_BYTES`].
fn check_file_type(path: &Path, meta: &std::fs::Metadata) -> Result<(), SecretError> {
    let t = meta.file_type();
    let kind = if t.is_file() {
        if meta.len() > MAX_SECRET_BYTES {
            return Err(SecretError::FileTooLarge(path.to_path_buf()));
        }
        return Ok(());
    } else if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "a special file"
    };
    Err(SecretError::NotRegular {
        path: path.to_path_buf(),
        kind,
    })
}

/// Refuses a value with a line break or another control character inside; `from` names where it
/// was read, for the message (the value itself is never shown).
fn one_line(value: &str, from: impl FnOnce() -> String) -> Result<(), SecretError> {
    match value.chars().find(|c| c.is_control()) {
        None => Ok(()),
        Some(c) => Err(SecretError::ControlCharacter {
            from: from(),
            what: match c {
                '\n' | '\r' => "a line break".to_string(),
                c => format!("the control character U+{:04X}", u32::from(c)),
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SecretRef;

    fn file(path: &str) -> SecretRef {
        SecretRef::File { file: path.into() }
    }

    fn env(name: &str) -> SecretRef {
        SecretRef::Env { env: name.into() }
    }

    /// A repository with `touchpoints/` and a token in `secrets/token`, and a folder outside it.
    struct Layout {
        repo: tempfile::TempDir,
        outside: tempfile::TempDir,
    }

    impl Layout {
        fn new() -> Self {
            let repo = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(repo.path().join("touchpoints")).unwrap();
            std::fs::create_dir_all(repo.path().join("secrets")).unwrap();
            std::fs::write(repo.path().join("secrets/token"), "inside-token\n").unwrap();
            let outside = tempfile::tempdir().unwrap();
            std::fs::write(outside.path().join("token"), "outside-token\n").unwrap();
            Self { repo, outside }
        }

        fn base(&self) -> PathBuf {
            self.repo.path().join("touchpoints")
        }

        fn policy(&self) -> SecretPolicy {
            SecretPolicy::new(Some(self.repo.path()))
        }
    }

    #[test]
    fn files_inside_the_repository_resolve_and_files_outside_are_refused() {
        let l = Layout::new();
        let p = l.policy();
        let inside = file("../secrets/token").resolve(&l.base(), &p).unwrap();
        assert_eq!(inside.expose(), "inside-token");
        let absolute = l.outside.path().join("token");
        for reference in [
            file(&absolute.display().to_string()),
            file("../../../../../../../../etc/passwd"),
            file("/etc/passwd"),
        ] {
            let err = reference.resolve(&l.base(), &p).unwrap_err();
            assert!(
                matches!(err, SecretError::FileOutside { .. }),
                "{reference}: {err}"
            );
            assert!(err.to_string().contains("--secrets-dir"), "{err}");
        }
    }

    #[test]
    fn links_are_followed_before_the_check() {
        let l = Layout::new();
        let link = l.repo.path().join("secrets/link");
        std::os::unix::fs::symlink(l.outside.path().join("token"), &link).unwrap();
        let err = file("../secrets/link")
            .resolve(&l.base(), &l.policy())
            .unwrap_err();
        assert!(matches!(err, SecretError::FileOutside { .. }), "{err}");
        // A link inside the repository to a file inside it is fine.
        let inner = l.repo.path().join("secrets/inner");
        std::os::unix::fs::symlink(l.repo.path().join("secrets/token"), &inner).unwrap();
        let ok = file("../secrets/inner").resolve(&l.base(), &l.policy());
        assert_eq!(ok.unwrap().expose(), "inside-token");
    }

    #[test]
    fn the_secrets_folder_is_allowed_too() {
        let l = Layout::new();
        let p = l
            .policy()
            .with_secrets_dir(Some(l.outside.path().to_path_buf()));
        let absolute = l.outside.path().join("token").display().to_string();
        let secret = file(&absolute).resolve(&l.base(), &p).unwrap();
        assert_eq!(secret.expose(), "outside-token");
        // A secrets folder that does not exist allows nothing, and says so.
        let p = l
            .policy()
            .with_secrets_dir(Some(l.outside.path().join("missing")));
        let err = file(&absolute).resolve(&l.base(), &p).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let l = Layout::new();
        let fifo = l.repo.path().join("secrets/fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let (base, policy) = (l.base(), l.policy());
        std::thread::spawn(move || {
            let _ = tx.send(file("../secrets/fifo").resolve(&base, &policy));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("reading a FIFO blocked");
        let err = result.unwrap_err();
        assert!(err.to_string().contains("is a FIFO"), "{err}");
    }

    #[test]
    fn devices_folders_and_large_files_are_refused() {
        let l = Layout::new();
        let dev = l.policy().with_secrets_dir(Some(PathBuf::from("/dev")));
        let err = file("/dev/zero").resolve(&l.base(), &dev).unwrap_err();
        assert!(err.to_string().contains("is a device"), "{err}");
        let err = file("../secrets")
            .resolve(&l.base(), &l.policy())
            .unwrap_err();
        assert!(err.to_string().contains("is a folder"), "{err}");
        let big = "x".repeat(MAX_SECRET_BYTES as usize + 1);
        std::fs::write(l.repo.path().join("secrets/big"), big).unwrap();
        let err = file("../secrets/big")
            .resolve(&l.base(), &l.policy())
            .unwrap_err();
        assert!(matches!(err, SecretError::FileTooLarge(_)), "{err}");
        let most = "x".repeat(MAX_SECRET_BYTES as usize);
        std::fs::write(l.repo.path().join("secrets/most"), most).unwrap();
        assert!(
            file("../secrets/most")
                .resolve(&l.base(), &l.policy())
                .is_ok()
        );
    }

    #[test]
    fn values_must_be_one_line_of_text() {
        let l = Layout::new();
        let write = |name: &str, bytes: &[u8]| {
            std::fs::write(l.repo.path().join("secrets").join(name), bytes).unwrap();
        };
        write("two-lines", b"first\nsecond\n");
        write("bell", b"tok\x07en");
        write("binary", &[0xff, 0xfe, 0x00]);
        write("trimmed", b"\n  one-line-token \r\n");
        let read = |name: &str| file(&format!("../secrets/{name}")).resolve(&l.base(), &l.policy());
        let err = read("two-lines").unwrap_err();
        assert!(err.to_string().contains("holds a line break"), "{err}");
        assert!(
            !err.to_string().contains("first"),
            "the value is never shown"
        );
        let err = read("bell").unwrap_err();
        assert!(err.to_string().contains("U+0007"), "{err}");
        assert!(matches!(read("binary"), Err(SecretError::NotText(_))));
        assert_eq!(read("trimmed").unwrap().expose(), "one-line-token");
    }

    #[test]
    fn touchctls_own_files_are_never_read() {
        let l = Layout::new();
        let token = l.repo.path().join("secrets/token");
        let p = l
            .policy()
            .with_own_file(&token, "the daemon's API token file");
        let err = file("../secrets/token").resolve(&l.base(), &p).unwrap_err();
        assert!(
            err.to_string().contains("is the daemon's API token file"),
            "{err}"
        );
    }

    #[test]
    fn touchctls_own_variables_and_names_off_the_allow_list_are_refused() {
        let p = SecretPolicy::default();
        for name in ["TOUCHCTL_API_TOKEN", "touchctl_api_token", "TOUCHCTL_X"] {
            let err = env(name).resolve(Path::new("."), &p).unwrap_err();
            assert!(matches!(err, SecretError::OwnVariable(_)), "{name}: {err}");
        }
        let allow: Vec<EnvPattern> = ["SMS_GATEWAY_TOKEN", "WECHAT_*"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let p = SecretPolicy::default().with_env_allow(allow);
        // Allowed names get as far as reading the (unset) variable.
        for name in ["SMS_GATEWAY_TOKEN", "WECHAT_APP_SECRET"] {
            let err = env(name).resolve(Path::new("."), &p).unwrap_err();
            assert!(matches!(err, SecretError::EnvMissing(_)), "{name}: {err}");
        }
        for name in ["HOME", "SMS_GATEWAY_TOKEN_2", "WECHA", "TOUCHCTL_API_TOKEN"] {
            let err = env(name).resolve(Path::new("."), &p).unwrap_err();
            assert!(
                matches!(
                    err,
                    SecretError::EnvNotAllowed { .. } | SecretError::OwnVariable(_)
                ),
                "{name}: {err}"
            );
        }
        let err = env("HOME").resolve(Path::new("."), &p).unwrap_err();
        assert!(
            err.to_string()
                .contains("allow-list of secret variables (SMS_GATEWAY_TOKEN, WECHAT_*"),
            "{err}"
        );
    }

    #[test]
    fn env_patterns_are_names_or_prefixes() {
        assert!("SMS_TOKEN".parse::<EnvPattern>().is_ok());
        assert!(" WECHAT_* ".parse::<EnvPattern>().is_ok());
        for bad in ["", "*", "A*B", "1ABC", "A-B", "A B"] {
            assert!(bad.parse::<EnvPattern>().is_err(), "{bad:?}");
        }
        assert!(is_own_variable("TOUCHCTL_DIR"));
        assert!(!is_own_variable("TOUCHCTL"));
        assert!(!is_own_variable("MY_TOUCHCTL_TOKEN"));
    }
}
