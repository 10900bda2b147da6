//! Source: everything that talks to the OpenSecureConf server.
//!
//! - `client`: the REST client (list an environment, retries, typed errors).
//! - `stream`: the event subscription (reconnects, backoff), built on the `sse` framing parser.
//! - `detector`: the change detector (polls entry metadata, notices writes the stream missed).
//! - `proxy`: which proxy reaches the server, from the environment as curl reads it.
//! - `backup`: an encrypted backup file as a source (`--from-backup`, `--fallback-backup`).

pub mod backup;
mod client;
pub mod detector;
mod error;
mod proxy;
mod sse;
pub mod stream;

pub(crate) use client::redirect_target;
pub use client::{Client, EntryMeta, install_crypto_provider};
pub use error::{FailureClass, SourceError};
pub use stream::{ChangeKind, StreamEvent, StreamOptions};
