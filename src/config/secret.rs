//! Credentials: where they come from, and a wrapper that never prints them.
//!
//! Keys are read from a file (a mounted Kubernetes Secret) or from an environment variable, never from a
//! plain flag value, so they stay out of `ps`. Files are re-read on every use, so a rotated Secret volume
//! takes effect on the next request without a restart.

use std::fmt;
use std::path::PathBuf;

/// A secret string. `Debug` and `Display` never show it; use [`Secret::expose`] at the point of use.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where one credential comes from.
#[derive(Clone, Debug)]
pub enum SecretSource {
    /// A file, re-read on every use; `flag` names the setting for error messages.
    File { path: PathBuf, flag: &'static str },
    /// An environment variable, read once at start.
    Env { var: &'static str, value: Secret },
}

/// A credential could not be read. Never contains the credential itself.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read {flag} '{}': {reason}", path.display())]
    Unreadable {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{origin} is empty")]
    Empty { origin: String },
    #[error("{origin} holds a user key shorter than 8 characters; OpenSecureConf rejects it")]
    TooShort { origin: String },
    #[error("{origin} contains characters that cannot be sent in an HTTP header")]
    NotAHeaderValue { origin: String },
}

impl SecretSource {
    /// Human description for messages: `--user-key-file /path` or `$OSC_USER_KEY`.
    pub fn origin(&self) -> String {
        match self {
            SecretSource::File { path, flag } => format!("{flag} '{}'", path.display()),
            SecretSource::Env { var, .. } => format!("${var}"),
        }
    }

    /// Read the credential now: trailing newline (and surrounding whitespace) trimmed, must be non-empty
    /// and usable as an HTTP header value.
    pub fn read(&self) -> Result<Secret, CredentialError> {
        let raw = match self {
            SecretSource::File { path, flag } => {
                std::fs::read_to_string(path).map_err(|e| CredentialError::Unreadable {
                    flag,
                    path: path.clone(),
                    reason: crate::util::io_reason(&e),
                })?
            }
            SecretSource::Env { value, .. } => value.expose().to_owned(),
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(CredentialError::Empty {
                origin: self.origin(),
            });
        }
        if trimmed.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(CredentialError::NotAHeaderValue {
                origin: self.origin(),
            });
        }
        Ok(Secret(trimmed.to_owned()))
    }

    /// Like [`read`](Self::read), and the value must be at least 8 characters (the server's minimum).
    pub fn read_user_key(&self) -> Result<Secret, CredentialError> {
        let key = self.read()?;
        if key.expose().chars().count() < 8 {
            return Err(CredentialError::TooShort {
                origin: self.origin(),
            });
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_is_trimmed_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "super-secret-key\n").unwrap();
        let src = SecretSource::File {
            path,
            flag: "--user-key-file",
        };
        let key = src.read_user_key().unwrap();
        assert_eq!(key.expose(), "super-secret-key");
        assert!(!format!("{key:?} {src:?}").contains("super-secret-key"));
    }

    #[test]
    fn short_empty_and_missing_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "short\n").unwrap();
        let src = SecretSource::File {
            path: path.clone(),
            flag: "--user-key-file",
        };
        let err = src.read_user_key().unwrap_err().to_string();
        assert!(
            err.contains("--user-key-file") && err.contains("shorter than 8"),
            "{err}"
        );
        assert!(!err.contains("short\n"));
        std::fs::write(&path, "\n").unwrap();
        assert!(src.read().unwrap_err().to_string().contains("is empty"));
        let missing = SecretSource::File {
            path: dir.path().join("nope"),
            flag: "--api-key-file",
        };
        let err = missing.read().unwrap_err().to_string();
        assert!(
            err.contains("--api-key-file") && err.contains("nope"),
            "{err}"
        );
    }
}
