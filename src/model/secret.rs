//! Secret references. A secret field never holds the secret itself: it names where to read it from,
//! `{ env = "NAME" }` or `{ file = "path" }`. Resolved values live only in memory, wrapped in
//! [`Secret`], whose `Debug` is redacted; what is stored and compared is a keyed fingerprint.

use std::fmt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Where a secret is read from. A literal string is refused: secrets never go in touchpoint files.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(untagged, deny_unknown_fields)]
pub enum SecretRef {
    /// # Environment variable
    /// Read the secret from an environment variable of the process running touchctl.
    Env {
        /// # Variable name
        /// Name of the environment variable that holds the secret.
        #[schemars(pattern(r"^[A-Za-z_][A-Za-z0-9_]*$"))]
        env: String,
    },
    /// # File
    /// Read the secret from a file (surrounding whitespace is trimmed).
    File {
        /// # File path
        /// Path of the file holding the secret, relative to the touchpoint file that names it.
        #[schemars(length(min = 1))]
        file: String,
    },
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env { env } => write!(f, "{{ env = \"{env}\" }}"),
            SecretRef::File { file } => write!(f, "{{ file = \"{file}\" }}"),
        }
    }
}

/// Why a secret reference could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The environment variable is not set or empty.
    #[error("environment variable {0} is not set (or is empty): export it before running touchctl")]
    EnvMissing(String),
    /// The file could not be read.
    #[error("cannot read secret file {path}: {source}")]
    FileUnreadable {
        /// The resolved path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file exists but holds nothing.
    #[error("secret file {0} is empty")]
    FileEmpty(PathBuf),
}

impl SecretRef {
    /// Reads the secret. `base` is the directory of the touchpoint file, against which file paths resolve.
    pub fn resolve(&self, base: &Path) -> Result<Secret, SecretError> {
        match self {
            SecretRef::Env { env } => match std::env::var(env) {
                Ok(v) if !v.is_empty() => Ok(Secret(v)),
                _ => Err(SecretError::EnvMissing(env.clone())),
            },
            SecretRef::File { file } => {
                let path = base.join(file);
                let text = std::fs::read_to_string(&path).map_err(|source| {
                    SecretError::FileUnreadable {
                        path: path.clone(),
                        source,
                    }
                })?;
                let value = text.trim();
                if value.is_empty() {
                    return Err(SecretError::FileEmpty(path));
                }
                Ok(Secret(value.to_owned()))
            }
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
        // HMAC accepts keys of any length, so construction cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(secret.0.as_bytes());
        format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
    }
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
    fn file_refs_resolve_relative_to_the_touchpoint_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "  abc\n").unwrap();
        let r = SecretRef::File {
            file: "token".into(),
        };
        assert_eq!(r.resolve(dir.path()).unwrap().expose(), "abc");
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let r = SecretRef::File {
            file: "empty".into(),
        };
        assert!(matches!(
            r.resolve(dir.path()),
            Err(SecretError::FileEmpty(_))
        ));
    }

    #[test]
    fn missing_env_says_what_to_do() {
        let r = SecretRef::Env {
            env: "TOUCHCTL_TEST_SURELY_UNSET_VAR".into(),
        };
        let err = r.resolve(Path::new(".")).unwrap_err().to_string();
        assert!(
            err.contains("TOUCHCTL_TEST_SURELY_UNSET_VAR is not set"),
            "{err}"
        );
    }
}
