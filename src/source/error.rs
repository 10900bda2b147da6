//! Typed errors of the OpenSecureConf client, with actionable messages.
//!
//! No message ever holds a value, key material or text the server sent: only status codes, URLs the
//! agent built itself (which carry environment and key names, never secrets), fixed texts chosen from the
//! server's known answers, and transport reasons escaped and bounded in length.

use crate::config::CredentialError;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot reach the OpenSecureConf server ({url}): {reason}")]
    Unreachable { url: String, reason: String },

    #[error(
        "the OpenSecureConf server answered HTTP {status} to {url}; it may be overloaded or restarting"
    )]
    ServerError { url: String, status: u16 },

    #[error(
        "the user key does not match the data in environment '{environment}': the server could not \
         decrypt it (HTTP 500 \"Internal error\"); check --user-key-file / $OSC_USER_KEY"
    )]
    KeyMismatch { environment: String },

    #[error(
        "the server rejected the user key (HTTP 401: {reason}); check --user-key-file / $OSC_USER_KEY"
    )]
    UserKeyRejected { reason: &'static str },

    #[error(
        "the server requires an API key and none was sent (HTTP 403); set --api-key-file or $OSC_API_KEY"
    )]
    ApiKeyMissing,

    #[error(
        "the server rejected the API key (HTTP 403 Invalid API key); check --api-key-file / $OSC_API_KEY"
    )]
    ApiKeyInvalid,

    #[error("access denied by {url} (HTTP {status}); check --api-key-file and --token-file")]
    Denied { url: String, status: u16 },

    #[error(
        "{url} answered 404 Not Found{detail}; check that --server points at the OpenSecureConf API"
    )]
    NotFound { url: String, detail: &'static str },

    #[error("the server rejected the request as invalid (HTTP 422 from {url}: {problems})")]
    Invalid { url: String, problems: String },

    /// A 3xx: the agent follows no redirect, so that no credential header ever reaches another origin.
    #[error(
        "{url} answered HTTP {status}, a redirect to {location}; the agent follows no redirect (its \
         credentials must not leave the server's origin): point --server at the final URL"
    )]
    Redirect {
        url: String,
        status: u16,
        /// `scheme://host:port` of the target only (its path or query may carry a token).
        location: String,
    },

    /// The list body is larger than `--max-response-size`.
    #[error(
        "the answer of {url} is larger than {setting} allows ({limit} bytes); nothing was written. \
         Raise it if the environment really is that large"
    )]
    TooLarge {
        url: String,
        limit: u64,
        setting: String,
    },

    #[error("unexpected HTTP {status} from {url}")]
    Unexpected { url: String, status: u16 },

    #[error("the answer of {url} is not a list of configuration entries ({reason})")]
    BadResponse { url: String, reason: String },

    #[error(transparent)]
    Credential(#[from] CredentialError),
}

/// What kind of failure, for exit codes and health reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// The server could not be reached or failed (connection, timeout, 5xx, redirect, oversized answer).
    Unreachable,
    /// Credentials were refused or do not match the data.
    Auth,
    /// The agent is configured wrongly (URL, environment, files).
    Config,
}

impl SourceError {
    /// Worth retrying: connection errors and 5xx other than the key mismatch.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SourceError::Unreachable { .. } | SourceError::ServerError { .. }
        )
    }

    pub fn class(&self) -> FailureClass {
        match self {
            SourceError::Unreachable { .. }
            | SourceError::ServerError { .. }
            | SourceError::Redirect { .. }
            | SourceError::TooLarge { .. }
            | SourceError::Unexpected { .. }
            | SourceError::BadResponse { .. } => FailureClass::Unreachable,
            SourceError::KeyMismatch { .. }
            | SourceError::UserKeyRejected { .. }
            | SourceError::ApiKeyMissing
            | SourceError::ApiKeyInvalid
            | SourceError::Denied { .. } => FailureClass::Auth,
            SourceError::NotFound { .. }
            | SourceError::Invalid { .. }
            | SourceError::Credential(_) => FailureClass::Config,
        }
    }
}
