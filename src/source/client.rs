//! REST client of the OpenSecureConf API.
//!
//! One `GET /configs?environment=E` lists the whole environment: the server derives its decryption key on
//! every request, so one list call costs the same as one single-key read. Only connection errors and 5xx
//! other than the key-mismatch 500 are retried, with jittered exponential backoff.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use tracing::{debug, warn};

use super::error::SourceError;
use crate::backoff::Backoff;
use crate::config::{ConfigError, Credentials, RetryPolicy, Secret, Server, setting};
use crate::state::Entry;
use crate::util::error_chain;

/// Install rustls' `ring` provider as the process default (reqwest is built without one). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    server: Url,
    credentials: Credentials,
    retry: RetryPolicy,
    request_timeout: Duration,
}

impl Client {
    /// Build the HTTP client (rustls; private CA from `--ca-file`; optional insecure mode).
    /// `read_timeout` bounds the silence of the event stream (it resets on every chunk).
    pub fn new(s: &Server, read_timeout: Duration) -> Result<Client, ConfigError> {
        install_crypto_provider();
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("osc-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(s.request_timeout.min(Duration::from_secs(10)))
            .read_timeout(read_timeout);
        if let Some(ca) = &s.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                ConfigError(format!(
                    "{}: cannot read '{}': {}",
                    setting("ca-file"),
                    ca.display(),
                    crate::util::io_reason(&e)
                ))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    ConfigError(format!(
                        "{}: '{}' holds no PEM certificate",
                        setting("ca-file"),
                        ca.display()
                    ))
                })?;
            b = b.tls_certs_merge(certs);
        }
        if s.insecure_skip_tls_verify {
            warn!(
                "TLS CERTIFICATE VERIFICATION IS DISABLED (--insecure-skip-tls-verify): anyone on the \
                 network path can read the user key and every secret. Use --ca-file instead outside dev."
            );
            b = b.tls_danger_accept_invalid_certs(true);
        }
        if s.url.scheme() == "http" && !is_loopback(&s.url) {
            warn!(
                server = %s.url,
                "the server URL is plain http: the user key and values cross the network unencrypted"
            );
        }
        let http = b.build().map_err(|e| {
            ConfigError(format!("cannot build the HTTP client: {}", error_chain(&e)))
        })?;
        let mut server = s.url.clone();
        if !server.path().ends_with('/') {
            let path = format!("{}/", server.path());
            server.set_path(&path);
        }
        Ok(Client {
            http,
            server,
            credentials: s.credentials.clone(),
            retry: s.retry.clone(),
            request_timeout: s.request_timeout,
        })
    }

    /// The underlying HTTP client (shared with the event stream).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// URL of an API path relative to the server base, e.g. `configs` or `sse/subscribe`.
    pub fn url(&self, path: &str, query: &[(&str, &str)]) -> Url {
        let mut url = self.server.clone();
        url.set_path(&format!("{}{path}", self.server.path()));
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// Headers for a request; `user_key` adds X-User-Key (not needed for the event stream).
    pub fn headers(&self, user_key: bool) -> Result<HeaderMap, SourceError> {
        fn value(secret: &Secret, origin: String) -> Result<HeaderValue, SourceError> {
            let mut v = HeaderValue::from_str(secret.expose()).map_err(|_| {
                SourceError::Credential(crate::config::CredentialError::NotAHeaderValue { origin })
            })?;
            v.set_sensitive(true);
            Ok(v)
        }
        let c = &self.credentials;
        let mut h = HeaderMap::new();
        if user_key {
            h.insert(
                "x-user-key",
                value(&c.user_key.read_user_key()?, c.user_key.origin())?,
            );
        }
        if let Some(src) = &c.api_key {
            h.insert("x-api-key", value(&src.read()?, src.origin())?);
        }
        if let Some(src) = &c.token {
            let token = Secret::new(format!("Bearer {}", src.read()?.expose()));
            h.insert(AUTHORIZATION, value(&token, src.origin())?);
        }
        Ok(h)
    }

    /// List every entry of `environment` (decrypted by the server with the user key).
    pub async fn list(&self, environment: &str) -> Result<Vec<Entry>, SourceError> {
        let url = self.url("configs", &[("environment", environment)]);
        self.with_retries(|| self.list_once(&url, environment))
            .await
    }

    async fn list_once(&self, url: &Url, environment: &str) -> Result<Vec<Entry>, SourceError> {
        let shown = display_url(url);
        let response = self
            .http
            .get(url.clone())
            .headers(self.headers(true)?)
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(|e| unreachable(&shown, &e, self.request_timeout))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| unreachable(&shown, &e, self.request_timeout))?;
        if status.is_success() {
            return crate::state::parse_list(&body)
                .map_err(|reason| SourceError::BadResponse { url: shown, reason });
        }
        Err(status_error(status, &body, shown, environment))
    }

    async fn with_retries<T, F, Fut>(&self, mut attempt: F) -> Result<T, SourceError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SourceError>>,
    {
        let mut backoff = Backoff::new(self.retry.initial_delay, self.retry.max_delay, 2.0);
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && backoff.attempts() < self.retry.max_retries => {
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, attempt = backoff.attempts(),
                          "request failed, retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// `GET https://host/configs?environment=prod` without user info.
fn display_url(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    format!("GET {u}")
}

fn unreachable(url: &str, e: &reqwest::Error, timeout: Duration) -> SourceError {
    let reason = if e.is_timeout() {
        format!(
            "no answer within {}s (--request-timeout)",
            timeout.as_secs_f64()
        )
    } else {
        // The innermost causes say what happened ("Connection refused", "invalid peer certificate").
        let chain = error_chain(e);
        let reason = chain
            .split(": ")
            .filter(|part| {
                !part.starts_with("error sending request") && !part.starts_with("client error")
            })
            .collect::<Vec<_>>()
            .join(": ");
        if reason.contains("certificate") || reason.contains("UnknownIssuer") {
            format!("{reason} (TLS: trust the server's CA with --ca-file)")
        } else {
            reason
        }
    };
    SourceError::Unreachable {
        url: url.to_owned(),
        reason,
    }
}

/// `detail` of a FastAPI error body, when it is a plain string.
fn detail(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("detail")?.as_str().map(str::to_owned)
}

pub(crate) fn status_error(
    status: StatusCode,
    body: &[u8],
    url: String,
    environment: &str,
) -> SourceError {
    let code = status.as_u16();
    match code {
        500 if detail(body).is_some_and(|d| d.starts_with("Internal error")) => {
            SourceError::KeyMismatch {
                environment: environment.to_owned(),
            }
        }
        401 => SourceError::UserKeyRejected {
            detail: detail(body)
                .filter(|d| d.contains("at least 8"))
                .unwrap_or_else(|| "unauthorized".to_owned()),
        },
        403 => match detail(body).as_deref() {
            Some(d) if d.starts_with("API key required") => SourceError::ApiKeyMissing,
            Some("Invalid API key") => SourceError::ApiKeyInvalid,
            _ => SourceError::Denied { url, status: code },
        },
        404 => SourceError::NotFound {
            url,
            detail: detail(body)
                .filter(|d| d.len() <= 200)
                .map(|d| format!(" ({d})"))
                .unwrap_or_default(),
        },
        422 => SourceError::Invalid {
            url,
            problems: validation_problems(body),
        },
        500..=599 => SourceError::ServerError { url, status: code },
        _ => SourceError::Unexpected { url, status: code },
    }
}

/// Summarise a FastAPI 422 body from its `loc` and `type` fields only (`input` may echo data).
fn validation_problems(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let items = v
        .get("detail")
        .and_then(|d| d.as_array())
        .cloned()
        .unwrap_or_default();
    let parts: Vec<String> = items
        .iter()
        .map(|item| {
            let loc = item
                .get("loc")
                .and_then(|l| l.as_array())
                .map(|l| {
                    l.iter()
                        .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_owned))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            let kind = item
                .get("type")
                .and_then(|t| t.as_str())
                .unwrap_or("invalid");
            format!("{loc}: {kind}")
        })
        .collect();
    if parts.is_empty() {
        "no details".to_owned()
    } else {
        debug!(problems = parts.len(), "422 validation problems");
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_statuses_to_typed_errors() {
        let e = |code: u16, body: &str| {
            status_error(
                StatusCode::from_u16(code).unwrap(),
                body.as_bytes(),
                "GET http://x/configs".into(),
                "prod",
            )
        };
        assert!(matches!(
            e(500, r#"{"detail":"Internal error: "}"#),
            SourceError::KeyMismatch { .. }
        ));
        assert!(!e(500, r#"{"detail":"Internal error: "}"#).is_retryable());
        assert!(e(500, "oops").is_retryable());
        assert!(e(503, "").is_retryable());
        assert!(matches!(
            e(
                403,
                r#"{"detail":"API key required but missing. Provide X-API-Key header."}"#
            ),
            SourceError::ApiKeyMissing
        ));
        assert!(matches!(
            e(403, r#"{"detail":"Invalid API key"}"#),
            SourceError::ApiKeyInvalid
        ));
        assert!(matches!(
            e(
                401,
                r#"{"detail":"X-User-Key must be at least 8 characters long"}"#
            ),
            SourceError::UserKeyRejected { .. }
        ));
        let invalid = e(
            422,
            r#"{"detail":[{"type":"missing","loc":["header","x-user-key"],"msg":"Field required","input":"SECRET"}]}"#,
        )
        .to_string();
        assert!(invalid.contains("header x-user-key: missing"), "{invalid}");
        assert!(!invalid.contains("SECRET"));
    }
}
