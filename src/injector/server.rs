//! `osc-agent injector`: the mutating admission webhook over HTTPS.
//!
//! - `POST /mutate`: AdmissionReview v1 in, AdmissionReview v1 out (a base64 JSONPatch, or
//!   `allowed: false` with the denial's message). Bodies above [`MAX_BODY`] are refused (413).
//! - `GET /healthz`, `GET /readyz`: 200 while serving (the certificate was loaded at start).
//! - `GET /metrics`: `osc_injector_admissions_total{result="injected|skipped|denied|error"}`,
//!   `osc_injector_tls_handshake_failures_total`, `osc_injector_certificate_reloads_total{result}`,
//!   `osc_injector_pods_without_agent` and `osc_injector_audit_runs_total{result}` (see [`super::audit`]).
//!
//! The certificate and key files are re-read every `--tls-reload-interval` (30 s); a changed pair is served from the
//! next handshake on. The server logs one line per review (uid, namespace, result, the denial's message);
//! pods carry no secret (credentials are named, never given, in annotations) and no value is logged.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::admission::{AdmissionReview, respond};
use super::tls::{self, CertFiles, Reloading};
use super::{InjectorDefaults, annotations};
use crate::config::{HumanDuration, LogFormat};
use crate::exit::Exit;

/// Largest AdmissionReview accepted (a pod is at most ~1.5 MiB in etcd).
pub const MAX_BODY: usize = 4 << 20;

fn bool_flag() -> clap::builder::BoolishValueParser {
    clap::builder::BoolishValueParser::new()
}

/// Flags of `osc-agent injector`, each with an `OSC_INJECTOR_*` environment twin.
#[derive(clap::Args, Debug, Clone)]
pub struct InjectorArgs {
    /// Address to serve HTTPS on.
    #[arg(long, env = "OSC_INJECTOR_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// PEM certificate chain served (re-read when it changes).
    #[arg(long, env = "OSC_INJECTOR_TLS_CERT_FILE", value_name = "FILE")]
    pub tls_cert_file: PathBuf,
    /// PEM private key of --tls-cert-file.
    #[arg(long, env = "OSC_INJECTOR_TLS_KEY_FILE", value_name = "FILE")]
    pub tls_key_file: PathBuf,
    /// Image of the injected agent [default: ghcr.io/osc-agent/osc-agent:<this version>].
    #[arg(long, env = "OSC_INJECTOR_AGENT_IMAGE", value_name = "IMAGE")]
    pub agent_image: Option<String>,
    /// imagePullPolicy of the injected agent.
    #[arg(long, env = "OSC_INJECTOR_AGENT_IMAGE_PULL_POLICY", default_value = "IfNotPresent",
          value_parser = ["Always", "IfNotPresent", "Never"])]
    pub agent_image_pull_policy: String,
    /// OpenSecureConf server URL for pods without the osc-agent.io/server annotation.
    #[arg(long, env = "OSC_INJECTOR_DEFAULT_SERVER", value_name = "URL")]
    pub default_server: Option<String>,
    /// Credentials Secret for pods without the osc-agent.io/credentials-secret annotation.
    #[arg(
        long,
        env = "OSC_INJECTOR_DEFAULT_CREDENTIALS_SECRET",
        value_name = "NAME"
    )]
    pub default_credentials_secret: Option<String>,
    /// The injector's own namespace, whose pods are never mutated (from the downward API).
    #[arg(long, env = "POD_NAMESPACE", value_name = "NS")]
    pub namespace: Option<String>,
    /// More namespaces whose pods are never mutated (kube-system always is; repeatable, or comma-separated).
    #[arg(
        long,
        env = "OSC_INJECTOR_EXCLUDE_NAMESPACE",
        value_name = "NS",
        value_delimiter = ','
    )]
    pub exclude_namespace: Vec<String>,
    /// Inject native sidecars (Kubernetes >= 1.29) unless a pod's osc-agent.io/native-sidecar says otherwise.
    #[arg(long, env = "OSC_INJECTOR_NATIVE_SIDECAR", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = bool_flag(), value_name = "BOOL")]
    pub native_sidecar: bool,
    /// The injected agent's admin port (probes).
    #[arg(long, env = "OSC_INJECTOR_AGENT_ADMIN_PORT", default_value_t = 8081)]
    pub agent_admin_port: u16,
    /// How often the certificate and key files are checked for a new pair.
    #[arg(
        long,
        env = "OSC_INJECTOR_TLS_RELOAD_INTERVAL",
        default_value = "30s",
        value_name = "DURATION"
    )]
    pub tls_reload_interval: HumanDuration,
    /// How often to look for pods created without the agent while no injector answered
    /// (`failurePolicy: Ignore`): lists pod metadata in every namespace (RBAC: list pods and
    /// namespaces, list and create events). At least 10s; 0 turns it off; off, too, outside a cluster
    /// (no in-cluster or kubeconfig credentials).
    #[arg(
        long,
        env = "OSC_INJECTOR_AUDIT_INTERVAL",
        default_value = "60s",
        value_name = "DURATION"
    )]
    pub audit_interval: HumanDuration,
    /// The audit looks only at namespaces matching this label selector (`?labelSelector=` syntax; the
    /// chart passes the webhook's namespaceSelector). Empty: all.
    #[arg(
        long,
        env = "OSC_INJECTOR_AUDIT_NAMESPACE_SELECTOR",
        value_name = "SELECTOR",
        default_value = ""
    )]
    pub audit_namespace_selector: String,
    /// The audit looks only at pods matching this label selector (the webhook's objectSelector). Empty: all.
    #[arg(
        long,
        env = "OSC_INJECTOR_AUDIT_POD_SELECTOR",
        value_name = "SELECTOR",
        default_value = ""
    )]
    pub audit_pod_selector: String,
    /// Log format.
    #[arg(long, env = "OSC_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

impl InjectorArgs {
    /// The defaults the pods get, checked. Errors name the flag.
    pub fn defaults(&self) -> Result<InjectorDefaults, String> {
        let mut d = InjectorDefaults::default();
        if let Some(image) = &self.agent_image {
            if image.trim().is_empty() || image.chars().any(char::is_whitespace) {
                return Err(format!(
                    "--agent-image: '{image}' is not an image reference"
                ));
            }
            d.image = image.clone();
        }
        d.image_pull_policy = self.agent_image_pull_policy.clone();
        if let Some(server) = &self.default_server {
            reqwest::Url::parse(server)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                .filter(|u| u.username().is_empty() && u.password().is_none())
                .ok_or_else(|| {
                    format!("--default-server: '{server}' is not an http:// or https:// URL without credentials")
                })?;
            d.server = Some(server.clone());
        }
        if let Some(secret) = &self.default_credentials_secret {
            d.credentials_secret = Some(secret.clone());
        }
        d.own_namespace = self.namespace.clone().filter(|n| !n.is_empty());
        d.excluded_namespaces = self.exclude_namespace.clone();
        d.native_sidecar = self.native_sidecar;
        if self.agent_admin_port == 0 {
            return Err("--agent-admin-port must be above 0".into());
        }
        d.admin_port = self.agent_admin_port;
        // The same checks as a pod's annotation would get.
        if let Some(secret) = &d.credentials_secret {
            let probe = super::Pod {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    annotations: Some(
                        [
                            ("inject", "true"),
                            ("environment", "probe"),
                            ("credentials-secret", secret.as_str()),
                        ]
                        .into_iter()
                        .map(|(k, v)| (format!("{}{k}", annotations::PREFIX), v.to_owned()))
                        .collect(),
                    ),
                    ..Default::default()
                },
                ..Default::default()
            };
            if let Err(e) = annotations::parse(&probe, &d) {
                return Err(format!("--default-credentials-secret: {e}"));
            }
        }
        Ok(d)
    }
}

struct Metrics {
    registry: Registry,
    admissions: Family<Vec<(String, String)>, Counter>,
    handshake_failures: Counter,
    reloads: Family<Vec<(String, String)>, Counter>,
    audit: super::audit::AuditMetrics,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let admissions = Family::<Vec<(String, String)>, Counter>::default();
        let handshake_failures = Counter::default();
        let reloads = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "osc_injector_admissions",
            "AdmissionReviews answered, by result (injected, skipped, denied, error)",
            admissions.clone(),
        );
        registry.register(
            "osc_injector_tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            handshake_failures.clone(),
        );
        registry.register(
            "osc_injector_certificate_reloads",
            "Changes of the certificate files, by result (ok, error)",
            reloads.clone(),
        );
        let audit = super::audit::AuditMetrics::default();
        registry.register(
            "osc_injector_pods_without_agent",
            "Pods annotated osc-agent.io/inject that run without the agent (created while no injector answered), at the last audit",
            audit.without_agent.clone(),
        );
        registry.register(
            "osc_injector_audit_runs",
            "Audits for pods without the agent, by result (ok, error)",
            audit.runs.clone(),
        );
        // Every result shows from the start (0), so rate() and absent-series alerts work at once.
        for r in ["injected", "skipped", "denied", "error"] {
            let _ = admissions.get_or_create(&vec![("result".into(), r.into())]);
        }
        Metrics {
            registry,
            admissions,
            handshake_failures,
            reloads,
            audit,
        }
    }
}

#[derive(Clone)]
struct AppState {
    defaults: Arc<InjectorDefaults>,
    metrics: Arc<Metrics>,
}

/// The router, without TLS (the tests call it directly too).
fn router(defaults: Arc<InjectorDefaults>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/mutate", post(mutate_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_handler))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(AppState { defaults, metrics })
}

async fn mutate_handler(State(state): State<AppState>, body: Bytes) -> Response {
    let review: AdmissionReview = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            state
                .metrics
                .admissions
                .get_or_create(&vec![("result".into(), "error".into())])
                .inc();
            // Where, never serde's text (it may quote a value from the pod).
            let why = crate::util::json_error_position(&e);
            tracing::warn!("injector: a request to /mutate is not an AdmissionReview: {why}");
            return (
                StatusCode::BAD_REQUEST,
                format!("not an AdmissionReview v1: {why}\n"),
            )
                .into_response();
        }
    };
    let (answer, outcome) = respond(&review, &state.defaults);
    state
        .metrics
        .admissions
        .get_or_create(&vec![("result".into(), outcome.as_str().into())])
        .inc();
    let req = review.request.as_ref();
    let uid = req.map(|r| r.uid.as_str()).unwrap_or_default();
    let namespace = req.and_then(|r| r.namespace.as_deref()).unwrap_or_default();
    let message = answer
        .response
        .as_ref()
        .and_then(|r| r.status.as_ref())
        .map(|s| s.message.as_str())
        .unwrap_or_default();
    tracing::info!(
        uid,
        namespace,
        result = outcome.as_str(),
        message,
        "admission review"
    );
    axum::Json(answer).into_response()
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &state.metrics.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// Run until SIGTERM or SIGINT. Prints one line to stdout once listening:
/// `osc-agent injector listening on https://ADDR`.
pub async fn run(args: InjectorArgs) -> Exit {
    let config_error = |msg: &str| {
        eprintln!("{}", crate::logging::error_line("osc-agent injector", &msg));
        Exit::Config
    };
    let defaults = match args.defaults() {
        Ok(d) => Arc::new(d),
        Err(e) => return config_error(&e),
    };
    let resolver = match Reloading::new(CertFiles {
        cert: args.tls_cert_file.clone(),
        key: args.tls_key_file.clone(),
    }) {
        Ok(r) => Arc::new(r),
        Err(e) => return config_error(&e),
    };
    let tls_config = match tls::server_config(resolver.clone()) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let tcp = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            return config_error(&format!(
                "--listen {}: cannot listen: {}",
                args.listen,
                crate::util::io_reason(&e)
            ));
        }
    };
    let (mut term, mut int) = match (
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            eprintln!("osc-agent injector: error: cannot install the SIGTERM/SIGINT handlers");
            return Exit::Internal;
        }
    };
    let metrics = Arc::new(Metrics::new());
    let cancel = CancellationToken::new();
    let failures = metrics.handshake_failures.clone();
    let listener = match tls::listen(
        tcp,
        tls_config,
        move || {
            failures.inc();
        },
        cancel.clone(),
    ) {
        Ok(l) => l,
        Err(e) => return config_error(&format!("--listen {}: {e}", args.listen)),
    };
    let local = axum::serve::Listener::local_addr(&listener).unwrap_or(args.listen);
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "osc-agent injector listening on https://{local}");
        let _ = out.flush();
    }
    tracing::info!(
        %local,
        image = %defaults.image,
        native_sidecar = defaults.native_sidecar,
        own_namespace = defaults.own_namespace.as_deref().unwrap_or(""),
        "injector started"
    );

    let reload_every = args.tls_reload_interval.0.max(Duration::from_millis(100));
    let reload_metrics = metrics.clone();
    let reload_cancel = cancel.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(reload_every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = reload_cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let result = match resolver.reload() {
                Ok(false) => continue,
                Ok(true) => {
                    tracing::info!("injector: TLS certificate files changed: serving the new pair");
                    "ok"
                }
                Err(e) => {
                    tracing::warn!("injector: keeping the current TLS certificate: {e}");
                    "error"
                }
            };
            reload_metrics
                .reloads
                .get_or_create(&vec![("result".into(), result.into())])
                .inc();
        }
    });

    if !args.audit_interval.0.is_zero() {
        let every = args.audit_interval.0;
        let scope = super::audit::Scope {
            namespace_selector: args.audit_namespace_selector.clone(),
            pod_selector: args.audit_pod_selector.clone(),
        };
        let (defaults, audit_metrics, audit_cancel) =
            (defaults.clone(), metrics.audit.clone(), cancel.clone());
        tokio::spawn(async move {
            match kube::Client::try_default().await {
                Ok(client) => {
                    super::audit::run(client, every, scope, defaults, audit_metrics, audit_cancel)
                        .await
                }
                Err(e) => tracing::warn!(
                    "injector: no Kubernetes API credentials ({e}): pods created without the agent will not be reported (--audit-interval)"
                ),
            }
        });
    }

    let stop = cancel.clone();
    let server = axum::serve(listener, router(defaults, metrics))
        .with_graceful_shutdown(async move { stop.cancelled().await });
    let mut server = std::pin::pin!(server.into_future());
    let exit = tokio::select! {
        r = &mut server => {
            if let Err(e) = r {
                tracing::error!("injector: server stopped: {e}");
            }
            return Exit::Internal;
        }
        _ = term.recv() => Exit::Ok,
        _ = int.recv() => Exit::Ok,
    };
    tracing::info!("injector: stop signal received, finishing open requests");
    cancel.cancel();
    if tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .is_err()
    {
        tracing::warn!("injector: open requests did not finish within 10s");
    }
    exit
}
