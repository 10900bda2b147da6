//! osc-agent keeps files in sync with an OpenSecureConf server.
//!
//! The agent is one pipeline, one module per stage:
//! [`source`] (REST client) → [`state`] (selected entries) → [`render`] (bytes of every output) →
//! [`sink`] (atomic writes). [`sync`] runs the pipeline once; [`config`] holds the settings.
//! [`devserver`] is a built-in OpenSecureConf-compatible server for trials and tests.

pub mod action;
pub mod admin;
pub mod backoff;
pub mod backup;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod devserver;
pub mod exit;
pub mod hash;
pub mod injector;
pub mod live;
pub mod logging;
pub mod render;
pub mod run;
pub mod sink;
pub mod source;
pub mod state;
pub mod sync;
pub mod telemetry;
pub mod util;
