//! The injector: a mutating admission webhook adding the agent to any pod annotated
//! `osc-agent.io/inject: "true"`.
//!
//! [`mutate`] is the pure core: (pod, its namespace, [`InjectorDefaults`]) → a JSONPatch (RFC 6902) adding
//! the `--once` init container (or a native sidecar), the sidecar, the memory-backed output volume mounted
//! into the app containers, the credentials volume and the `osc-agent.io/status: injected` annotation, or
//! a [`Denial`] naming the annotation at fault. [`admission`] wraps it in AdmissionReview v1, and
//! [`server`] serves that over HTTPS (`osc-agent injector`). The annotations are listed in
//! [`annotations`] and in the README ("Inject into your own workloads").

pub mod admission;
pub mod annotations;
pub mod audit;
mod mutate;
pub mod pod;
pub mod server;
mod tls;

pub use mutate::{Denial, InjectorDefaults, mutate};
pub use pod::Pod;
