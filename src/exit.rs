//! Process exit codes (documented in the README).

use crate::source::FailureClass;
use crate::sync::SyncError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    /// An unexpected internal error.
    Internal = 1,
    /// Bad configuration: flags, env vars, config file, credentials files, templates.
    Config = 2,
    /// The server is unreachable, timed out or failed (5xx) after retries.
    Unreachable = 3,
    /// Authentication failed or the user key does not match the data.
    Auth = 4,
    /// Data was read but at least one output could not be rendered or written.
    Partial = 5,
    /// A backup file could not be read, decrypted or used (wrong password, corrupted, truncated,
    /// empty, unknown version, no entry for the environment).
    Backup = 6,
    /// The environment has no entry (after filters) and `--allow-empty` is not set: nothing written.
    Empty = 7,
    /// `--once` stopped by SIGINT before it finished (128 + 2): files as they were before the run.
    Interrupted = 130,
    /// `--once` stopped by SIGTERM before it finished (128 + 15): files as they were before the run.
    Terminated = 143,
}

impl Exit {
    pub fn of(e: &SyncError) -> Exit {
        match e {
            SyncError::Source(s) => match s.class() {
                FailureClass::Unreachable => Exit::Unreachable,
                FailureClass::Auth => Exit::Auth,
                FailureClass::Config => Exit::Config,
            },
            SyncError::Render(_) | SyncError::Write { .. } => Exit::Partial,
            SyncError::Backup(_) => Exit::Backup,
            SyncError::Internal(_) => Exit::Internal,
            SyncError::Empty(_) => Exit::Empty,
        }
    }

    pub fn code(self) -> std::process::ExitCode {
        std::process::ExitCode::from(self as u8)
    }
}
