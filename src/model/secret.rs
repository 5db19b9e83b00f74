//! Secret references. A secret field never holds the secret itself: it names where to read it from,
//! `{ env = "NAME" }` or `{ file = "path" }`. Resolved values live only in memory, wrapped in
//! [`Secret`], whose `Debug` is redacted; what is stored and compared is a keyed fingerprint.
//!
//! Where a reference may read from is the [`SecretPolicy`]'s business (`secret_policy.rs`); every
//! value read, from either source, is one line of text of at most [`MAX_SECRET_BYTES`] bytes.

use std::fmt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::secret_policy::SecretPolicy;

/// Where a secret is read from. A literal string is refused: secrets never go in touchpoint files.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(untagged, deny_unknown_fields)]
pub enum SecretRef {
    /// # Environment variable
    /// Read the secret from an environment variable of the process running touchctl.
    Env {
        /// # Variable name
        /// Name of the environment variable that holds the secret, as one line of text. Never
        /// one of touchctl's own (`TOUCHCTL_*`); the operator may allow only some names
        /// (`--secret-env-allow`).
        #[schemars(pattern(r"^[A-Za-z_][A-Za-z0-9_]*$"))]
        env: String,
    },
    /// # File
    /// Read the secret from a file (surrounding whitespace is trimmed).
    File {
        /// # File path
        /// Path of the file holding the secret, relative to the touchpoint file that names it. It
        /// must lead (links followed) into the repository or the operator's secrets folder
        /// (`--secrets-dir`), to a regular file of at most 8 KiB holding one line of text.
        #[schemars(length(min = 1))]
        file: String,
    },
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env { env } => write!(f, "{{ env = \"{}\" }}", env.escape_debug()),
            SecretRef::File { file } => write!(f, "{{ file = \"{}\" }}", file.escape_debug()),
        }
    }
}

/// The most bytes a secret may have, read from a file or a variable: far more than any token,
/// key or password needs, and small enough that a reference to a large file (or a device that
/// never ends) is refused before it is read.
pub const MAX_SECRET_BYTES: u64 = 8 * 1024;

/// Why a secret reference could not be read, or was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The variable is one of touchctl's own (`TOUCHCTL_*`).
    #[error(
        "`{0}` is one of touchctl's own variables (TOUCHCTL_*), which are never a secret source: keep the secret in a variable of its own and name that one"
    )]
    OwnVariable(String),
    /// The operator's allow-list does not name the variable.
    #[error(
        "environment variable {name} is not in the allow-list of secret variables ({allowed}, set by --secret-env-allow or TOUCHCTL_SECRET_ENV_ALLOW): name an allowed variable, or add it to the list"
    )]
    EnvNotAllowed {
        /// The variable.
        name: String,
        /// The allow-list as configured.
        allowed: String,
    },
    /// The environment variable is not set or empty.
    #[error("environment variable {0} is not set (or is empty): export it before running touchctl")]
    EnvMissing(String),
    /// The environment variable is not UTF-8.
    #[error("environment variable {0} is not valid UTF-8: set it to the secret as text")]
    EnvNotUnicode(String),
    /// The file does not exist.
    #[error(
        "secret file {} does not exist: create it, or correct the path (relative to the touchpoint file)",
        .0.display()
    )]
    FileMissing(PathBuf),
    /// The file could not be read.
    #[error("cannot read secret file {}: {source}", .path.display())]
    FileUnreadable {
        /// The path as referenced.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file resolves (links followed) outside every folder secrets may be read from.
    #[error(
        "secret file {} resolves to {}, outside {allowed}: secrets are read only inside the repository or the secrets folder; move the file there, or point --secrets-dir (TOUCHCTL_SECRETS_DIR) at the folder that holds it",
        .path.display(),
        .resolved.display()
    )]
    FileOutside {
        /// The path as referenced.
        path: PathBuf,
        /// Where it leads, links followed.
        resolved: PathBuf,
        /// The folders secrets may be read from, for the message.
        allowed: String,
    },
    /// The file is one of touchctl's own (the daemon's API token file).
    #[error(
        "secret file {} is {what}, which is never a secret source: keep the secret in a file of its own and name that one",
        .path.display()
    )]
    OwnFile {
        /// The path as referenced.
        path: PathBuf,
        /// What the file is to touchctl.
        what: String,
    },
    /// The path leads to a folder, FIFO, socket or device.
    #[error(
        "secret file {} is {kind}, not a regular file: point the reference at a file that holds the secret",
        .path.display()
    )]
    NotRegular {
        /// The path as referenced.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// The file is larger than [`MAX_SECRET_BYTES`].
    #[error(
        "secret file {} holds more than {MAX_SECRET_BYTES} bytes, the most a secret may have: point the reference at a file that holds only the secret",
        .0.display()
    )]
    FileTooLarge(PathBuf),
    /// The variable's value is larger than [`MAX_SECRET_BYTES`].
    #[error(
        "environment variable {0} holds more than {MAX_SECRET_BYTES} bytes, the most a secret may have: set it to the secret alone"
    )]
    EnvTooLarge(String),
    /// The file is not UTF-8 text.
    #[error("secret file {} is not UTF-8 text: store the secret as text", .0.display())]
    NotText(PathBuf),
    /// The file exists but holds nothing.
    #[error("secret file {} is empty", .0.display())]
    FileEmpty(PathBuf),
    /// The value holds a line break or another control character, which no header or signature
    /// can carry.
    #[error(
        "{from} holds {what} inside the value: a secret must be one line of text (a file's surrounding whitespace is trimmed, a variable's is not); remove it"
    )]
    ControlCharacter {
        /// `secret file X` or `environment variable X`.
        from: String,
        /// `a line break`, or the control character as `U+0007`.
        what: String,
    },
}

impl SecretError {
    /// The stable diagnostic code: `secret-source-refused` (a source touchctl does not read from),
    /// `secret-invalid-value` (not one line of text) or `secret-unreadable` (not there).
    pub fn code(&self) -> &'static str {
        match self {
            SecretError::OwnVariable(_)
            | SecretError::EnvNotAllowed { .. }
            | SecretError::FileOutside { .. }
            | SecretError::OwnFile { .. }
            | SecretError::NotRegular { .. }
            | SecretError::FileTooLarge(_)
            | SecretError::EnvTooLarge(_) => "secret-source-refused",
            SecretError::ControlCharacter { .. }
            | SecretError::NotText(_)
            | SecretError::EnvNotUnicode(_) => "secret-invalid-value",
            SecretError::EnvMissing(_)
            | SecretError::FileMissing(_)
            | SecretError::FileUnreadable { .. }
            | SecretError::FileEmpty(_) => "secret-unreadable",
        }
    }
}

impl SecretRef {
    /// The key that names the source in the file: `env` or `file`.
    pub fn source_key(&self) -> &'static str {
        match self {
            SecretRef::Env { .. } => "env",
            SecretRef::File { .. } => "file",
        }
    }

    /// Reads the secret, as `policy` allows. `base` is the directory of the touchpoint file,
    /// against which file paths resolve.
    pub fn resolve(&self, base: &Path, policy: &SecretPolicy) -> Result<Secret, SecretError> {
        match self {
            SecretRef::Env { env } => policy.read_env(env).map(Secret),
            SecretRef::File { file } => policy.read_file(&base.join(file)).map(Secret),
        }
    }
}

/// A resolved secret value. It has no `Display`, and its `Debug` prints `(sensitive)`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value obtained elsewhere (e.g. from a token exchange).
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(sensitive)")
    }
}

/// Computes keyed fingerprints of secrets, so that a change of value can be detected without
/// storing or printing the value. The key lives with the registry, so a fingerprint means nothing
/// outside it.
#[derive(Clone)]
pub struct Fingerprinter {
    key: Vec<u8>,
}

impl Fingerprinter {
    /// Uses `key` (at least 16 bytes of randomness, kept in the registry).
    pub fn new(key: Vec<u8>) -> Self {
        Self { key }
    }

    /// `hmac-sha256:<hex>` of the secret under this registry's key.
    pub fn fingerprint(&self, secret: &Secret) -> String {
        tagged(&hmac(&self.key, secret.0.as_bytes()))
    }

    /// `hmac-sha256:<hex>` of `data` under a key derived from this registry's key for `purpose`
    /// alone, so that a value computed for one purpose is worthless for another. The derivation's
    /// label holds a NUL byte, which no secret value can hold (control characters are refused),
    /// so no fingerprint printed in a plan can ever equal a derived key.
    pub fn mac(&self, purpose: &str, data: &[u8]) -> String {
        let label = format!("touchctl\0{purpose}\0v1");
        let derived = hmac(&self.key, label.as_bytes());
        tagged(&hmac(&derived, data))
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length, so construction cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn tagged(digest: &[u8]) -> String {
    format!("hmac-sha256:{}", hex::encode(digest))
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprinter(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "(sensitive)");
    }

    #[test]
    fn fingerprints_are_keyed_and_stable() {
        let a = Fingerprinter::new(b"0123456789abcdef".to_vec());
        let b = Fingerprinter::new(b"fedcba9876543210".to_vec());
        let s = Secret::new("hunter2");
        assert_eq!(a.fingerprint(&s), a.fingerprint(&s));
        assert_ne!(a.fingerprint(&s), b.fingerprint(&s));
        assert_ne!(a.fingerprint(&s), a.fingerprint(&Secret::new("hunter3")));
        assert!(!a.fingerprint(&s).contains("hunter2"));
    }

    #[test]
    fn derived_macs_are_keyed_by_purpose_and_differ_from_fingerprints() {
        let a = Fingerprinter::new(b"0123456789abcdef".to_vec());
        let b = Fingerprinter::new(b"fedcba9876543210".to_vec());
        assert_eq!(a.mac("plan", b"x"), a.mac("plan", b"x"));
        assert_ne!(a.mac("plan", b"x"), a.mac("change", b"x"));
        assert_ne!(a.mac("plan", b"x"), b.mac("plan", b"x"));
        assert_ne!(a.mac("plan", b"x"), a.fingerprint(&Secret::new("x")));
        assert!(a.mac("plan", b"x").starts_with("hmac-sha256:"));
    }

    #[test]
    fn file_refs_resolve_relative_to_the_touchpoint_file() {
        let dir = tempfile::tempdir().unwrap();
        let policy = SecretPolicy::new(Some(dir.path()));
        std::fs::write(dir.path().join("token"), "  abc\n").unwrap();
        let r = SecretRef::File {
            file: "token".into(),
        };
        assert_eq!(r.resolve(dir.path(), &policy).unwrap().expose(), "abc");
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let r = SecretRef::File {
            file: "empty".into(),
        };
        assert!(matches!(
            r.resolve(dir.path(), &policy),
            Err(SecretError::FileEmpty(_))
        ));
    }

    #[test]
    fn missing_env_says_what_to_do() {
        let r = SecretRef::Env {
            env: "TOUCHPOINT_TEST_SURELY_UNSET_VAR".into(),
        };
        let err = r
            .resolve(Path::new("."), &SecretPolicy::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TOUCHPOINT_TEST_SURELY_UNSET_VAR is not set"),
            "{err}"
        );
    }
}
