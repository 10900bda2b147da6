//! Action: tell the app that its configuration really changed.
//!
//! - [`spec`]: what is configured (`--action`, YAML `action:`).
//! - [`process`]: `signal` and `restart-container`, by scanning `/proc` of the pod's shared PID namespace.
//! - [`http`]: call the app's reload endpoint. [`exec`]: run a command.
//! - `rollout-restart` patches the pod's owner (see `crate::cluster`).
//! - [`runner`]: one action per applied generation, cooldown, restart-loop breaker.
//! - [`signals`]: children start with default signal dispositions; the agent gets the signals it handles.

pub mod exec;
pub mod http;
pub mod process;
pub mod runner;
pub mod signals;
pub mod spec;

pub use spec::ActionSpec;

/// An action failed. The message says what to fix; it never holds a value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ActionError(pub String);

/// What an action may know about the change: never values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActionContext {
    pub environment: String,
    /// Content hash of everything rendered (the same on every replica for the same content).
    pub hash: String,
    /// Keys added, changed or deleted since the previous action.
    pub changed_keys: Vec<String>,
}
