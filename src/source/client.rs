//! REST client of the OpenSecureConf API.
//!
//! One `GET /configs?environment=E` lists the whole environment: the server derives its decryption key on
//! every request, so one list call costs the same as one single-key read. Only connection errors and 5xx
//! other than the key-mismatch 500 are retried, with jittered exponential backoff.
//!
//! Everything the server sends is untrusted: no redirect is followed (credential headers never reach
//! another origin), bodies are read up to `--max-response-size` and no further, and no text of an answer
//! reaches an error or a log line: known answers of the protocol map to fixed messages, anything else to
//! its status code.

use std::borrow::Cow;

use serde_json::value::RawValue;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, LOCATION};
use reqwest::{StatusCode, Url};
use tracing::{debug, info, warn};

use super::error::SourceError;
use super::proxy;
use crate::backoff::Backoff;
use crate::config::{ConfigError, Credentials, RetryPolicy, Secret, Server, setting};
use crate::state::Entry;
use crate::util::{error_chain, escape};

/// Most bytes of an error answer read to recognise a known body (the protocol's are < 200 bytes).
const MAX_ERROR_BODY: usize = 4096;

/// Most characters of a transport reason (from the HTTP or TLS stack) shown in an error.
const MAX_REASON: usize = 300;

/// Install rustls' `ring` provider as the process default (reqwest is built without one). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// One row of `GET /cluster/configs`: an entry's metadata. The server's timestamps are compared as
/// opaque JSON text, never parsed. Borrowed from the response where it can be (a key without escapes,
/// the timestamps' text): a poll of 10,000 entries allocates the rows' array, not 30,000 strings.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct EntryMeta<'a> {
    #[serde(borrow)]
    pub key: Cow<'a, str>,
    /// Decoded (the selection filters on it); usually absent.
    #[serde(default)]
    pub category: Option<String>,
    #[serde(default, borrow)]
    pub created_at: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub updated_at: Option<&'a RawValue>,
}

#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    server: Url,
    credentials: Credentials,
    retry: RetryPolicy,
    request_timeout: Duration,
    max_response_size: u64,
}

impl Client {
    /// Build the HTTP client (rustls; private CA from `--ca-file`; optional insecure mode; no redirects;
    /// the proxy from the environment as curl reads it, see `proxy`).
    /// `read_timeout` bounds the silence of the event stream (it resets on every chunk).
    ///
    /// Errors: an unreadable `--ca-file`, an unusable proxy variable.
    pub fn new(s: &Server, read_timeout: Duration) -> Result<Client, ConfigError> {
        install_crypto_provider();
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("osc-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(s.request_timeout.min(Duration::from_secs(10)))
            .read_timeout(read_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        let env = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
        if let Some(chosen) = proxy::choose(&s.url, env).map_err(|e| ConfigError(e.to_string()))? {
            info!(
                proxy = %origin(&chosen.url),
                variable = chosen.variable,
                "reaching the server through a proxy"
            );
            let p = reqwest::Proxy::all(chosen.url)
                .map_err(|_| ConfigError(format!("${} is not a usable proxy", chosen.variable)))?;
            b = b.proxy(p);
        }
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
            max_response_size: s.max_response_size,
        })
    }

    /// Largest list body, and largest single event of the stream, in bytes (`--max-response-size`).
    pub fn max_response_size(&self) -> u64 {
        self.max_response_size
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
        if !status.is_success() {
            return Err(error_of(response, url, environment).await);
        }
        let body = match read_body(response, self.max_response_size).await {
            Ok(Some(body)) => body,
            Ok(None) => {
                return Err(SourceError::TooLarge {
                    url: shown,
                    limit: self.max_response_size,
                    setting: setting("max-response-size"),
                });
            }
            Err(e) => return Err(unreachable(&shown, &e, self.request_timeout)),
        };
        crate::state::parse_list(&body)
            .map_err(|reason| SourceError::BadResponse { url: shown, reason })
    }

    /// The metadata of every entry of `environment` (`GET /cluster/configs?environment=E`): keys,
    /// categories and timestamps, never a value. It needs no user key (the API key and token are
    /// sent when configured) and the server decrypts nothing, so it costs a few milliseconds where a
    /// list costs one key derivation. One attempt, no retry (the change detector has its own backoff).
    ///
    /// The rows, borrowed from the response, go to `digest`; its result is returned. `Ok(None)`: the
    /// server has no such route (404, an older OpenSecureConf).
    ///
    /// Errors: as [`Client::list`]; a body over `--max-response-size` is [`SourceError::TooLarge`].
    pub async fn entry_metadata<T>(
        &self,
        environment: &str,
        digest: impl FnOnce(Vec<EntryMeta<'_>>) -> T,
    ) -> Result<Option<T>, SourceError> {
        let url = self.url("cluster/configs", &[("environment", environment)]);
        let shown = display_url(&url);
        let response = self
            .http
            .get(url.clone())
            .headers(self.headers(false)?)
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(|e| unreachable(&shown, &e, self.request_timeout))?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            // No user key is sent here: the answers that blame it elsewhere mean something else.
            return Err(match error_of(response, &url, environment).await {
                SourceError::UserKeyRejected { .. } => SourceError::Denied {
                    url: shown,
                    status: 401,
                },
                SourceError::KeyMismatch { .. } => SourceError::ServerError {
                    url: shown,
                    status: 500,
                },
                other => other,
            });
        }
        let body = match read_body(response, self.max_response_size).await {
            Ok(Some(body)) => body,
            Ok(None) => {
                return Err(SourceError::TooLarge {
                    url: shown,
                    limit: self.max_response_size,
                    setting: setting("max-response-size"),
                });
            }
            Err(e) => return Err(unreachable(&shown, &e, self.request_timeout)),
        };
        serde_json::from_slice(&body)
            .map(|rows| Some(digest(rows)))
            .map_err(|e| SourceError::BadResponse {
                url: shown,
                // Only the position and class: serde's message may quote the server's text.
                reason: crate::util::json_error_position(&e),
            })
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
pub(crate) fn display_url(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    format!("GET {u}")
}

/// `scheme://host:port` of a URL, escaped and bounded: never its user info, path or query.
pub(crate) fn origin(url: &Url) -> String {
    let host = url.host_str().unwrap_or("");
    let port = url
        .port_or_known_default()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    bounded(&format!("{}://{host}{port}", url.scheme()), 120)
}

/// What an error about a redirect answer to `request` shows of its `Location` (in `headers`): the
/// target's `scheme://host:port` when its host is the host of `request` (an `http` -> `https` or path
/// redirect, the usual mistake in a URL), else a fixed phrase. A host is never shown for another host:
/// a server could write anything there, a credential it was sent included, in any spelling, to get it
/// into logs. Path, query and user info are never shown.
pub(crate) fn redirect_target(headers: &HeaderMap, request: &Url) -> String {
    let target = headers
        .get(LOCATION)
        .and_then(|l| l.to_str().ok())
        .and_then(|l| request.join(l).ok())
        .filter(|l| l.host_str().is_some());
    match target {
        None => "an unusable Location".to_owned(),
        Some(t) if t.host() == request.host() => origin(&t),
        Some(_) => "another host (not shown: a redirect's host is the server's text)".to_owned(),
    }
}

/// `text` escaped for a log line (see `util::escape`) and cut to `max` characters.
pub(crate) fn bounded(text: &str, max: usize) -> String {
    let escaped = escape(text);
    match escaped.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &escaped[..cut]),
        None => escaped.into_owned(),
    }
}

/// A transport error's reason, escaped and bounded (TLS errors can quote names from the server's
/// certificate, HTTP parse errors nothing the agent wants to repeat at length).
pub(crate) fn transport_reason(e: &reqwest::Error) -> String {
    // The innermost causes say what happened ("Connection refused", "invalid peer certificate").
    let chain = error_chain(e);
    let reason = chain
        .split(": ")
        .filter(|part| {
            !part.starts_with("error sending request")
                && !part.starts_with("client error")
                && !part.starts_with("request or response body error")
                && !part.starts_with("error decoding response body")
        })
        .collect::<Vec<_>>()
        .join(": ");
    let reason = bounded(&reason, MAX_REASON);
    if reason.contains("certificate") || reason.contains("UnknownIssuer") {
        format!("{reason} (TLS: trust the server's CA with --ca-file)")
    } else {
        reason
    }
}

fn unreachable(url: &str, e: &reqwest::Error, timeout: Duration) -> SourceError {
    let reason = if e.is_timeout() {
        format!(
            "no answer within {}s (--request-timeout)",
            timeout.as_secs_f64()
        )
    } else {
        transport_reason(e)
    };
    SourceError::Unreachable {
        url: url.to_owned(),
        reason,
    }
}

/// The whole body if it holds at most `limit` bytes, `None` as soon as it is known to be larger
/// (from its Content-Length, or while counting): never more than `limit` bytes are buffered, and the
/// connection is dropped unread.
pub(crate) async fn read_body(
    mut response: reqwest::Response,
    limit: u64,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > limit) {
        return Ok(None);
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let announced = response
        .content_length()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0);
    let mut body = Vec::with_capacity(announced.min(limit).min(1 << 20));
    while let Some(chunk) = response.chunk().await? {
        if chunk.len() > limit - body.len() {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// The error for a non-2xx answer to `request`: reads at most a few KiB of its body to recognise the
/// protocol's known answers.
pub(crate) async fn error_of(
    response: reqwest::Response,
    request: &Url,
    environment: &str,
) -> SourceError {
    let status = response.status();
    let headers = response.headers().clone();
    let body = if status.is_redirection() {
        Vec::new()
    } else {
        read_body(response, MAX_ERROR_BODY as u64)
            .await
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    status_error(status, &headers, &body, request, environment)
}

/// `detail` of a FastAPI error body, when it is a plain string.
fn detail(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("detail")?.as_str().map(str::to_owned)
}

/// Map a non-2xx answer to a typed error. Only exact known bodies of the protocol are recognised;
/// nothing of `body` or of the headers is ever copied into the error, except the origin of a redirect.
pub(crate) fn status_error(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    request: &Url,
    environment: &str,
) -> SourceError {
    let code = status.as_u16();
    let url = display_url(request);
    let detail = detail(body);
    let detail = detail.as_deref();
    match code {
        300..=399 => SourceError::Redirect {
            url,
            status: code,
            location: redirect_target(headers, request),
        },
        500 if detail == Some("Internal error: ") => SourceError::KeyMismatch {
            environment: environment.to_owned(),
        },
        401 => SourceError::UserKeyRejected {
            reason: match detail {
                Some("X-User-Key must be at least 8 characters long") => {
                    "it must be at least 8 characters long"
                }
                _ => "unauthorized",
            },
        },
        403 => match detail {
            Some("API key required but missing. Provide X-API-Key header.") => {
                SourceError::ApiKeyMissing
            }
            Some("Invalid API key") => SourceError::ApiKeyInvalid,
            _ => SourceError::Denied { url, status: code },
        },
        404 => SourceError::NotFound {
            url,
            detail: match detail {
                Some("environment is required") => " (the server says: environment is required)",
                _ => "",
            },
        },
        422 => SourceError::Invalid {
            url,
            problems: validation_problems(body),
        },
        500..=599 => SourceError::ServerError { url, status: code },
        _ => SourceError::Unexpected { url, status: code },
    }
}

/// Summarise a FastAPI 422 body with fixed texts: a problem is named only when its `loc` is one the
/// agent sends (`query environment`, `header x-user-key`, ...) and its `type` a known one; the others are
/// counted. No text of the body is copied (`msg` and `input` may echo data, `loc` anything).
fn validation_problems(body: &[u8]) -> String {
    const PLACES: &[(&str, &str, &str)] = &[
        ("query", "environment", "query environment"),
        ("query", "mode", "query mode"),
        ("query", "category", "query category"),
        ("query", "key", "query key"),
        ("header", "x-user-key", "header x-user-key"),
        ("header", "x-api-key", "header x-api-key"),
    ];
    const KINDS: &[&str] = &[
        "missing",
        "string_too_short",
        "string_too_long",
        "string_type",
        "enum",
        "literal_error",
        "value_error",
    ];
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let items = v
        .get("detail")
        .and_then(|d| d.as_array())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut known = Vec::new();
    let mut others = 0usize;
    for item in items {
        let loc: Vec<&str> = item
            .get("loc")
            .and_then(|l| l.as_array())
            .map(|l| l.iter().filter_map(|p| p.as_str()).collect())
            .unwrap_or_default();
        let place = PLACES
            .iter()
            .find(|(a, b, _)| loc.as_slice() == [*a, *b])
            .map(|p| p.2);
        let kind = item
            .get("type")
            .and_then(|t| t.as_str())
            .and_then(|t| KINDS.iter().find(|k| **k == t).copied());
        match place {
            Some(place) => known.push(format!("{place}: {}", kind.unwrap_or("invalid"))),
            None => others += 1,
        }
    }
    debug!(problems = items.len(), "422 validation problems");
    if others > 0 {
        known.push(format!("{others} other problem(s)"));
    }
    if known.is_empty() {
        "no details".to_owned()
    } else {
        known.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e_with(code: u16, headers: &HeaderMap, body: &str) -> SourceError {
        let request = Url::parse("http://x/configs?environment=prod").unwrap();
        status_error(
            StatusCode::from_u16(code).unwrap(),
            headers,
            body.as_bytes(),
            &request,
            "prod",
        )
    }

    fn e(code: u16, body: &str) -> SourceError {
        e_with(code, &HeaderMap::new(), body)
    }

    #[test]
    fn maps_statuses_to_typed_errors() {
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
        let short = e(
            401,
            r#"{"detail":"X-User-Key must be at least 8 characters long"}"#,
        );
        assert!(short.to_string().contains("at least 8"), "{short}");
        let invalid = e(
            422,
            r#"{"detail":[{"type":"missing","loc":["header","x-user-key"],"msg":"Field required","input":"SECRET"}]}"#,
        )
        .to_string();
        assert!(invalid.contains("header x-user-key: missing"), "{invalid}");
        assert!(!invalid.contains("SECRET"));
    }

    #[test]
    fn near_misses_of_known_bodies_are_not_recognised_nor_echoed() {
        const C: &str = "CANARY";
        let cases = [
            (500, r#"{"detail":"Internal error: CANARY"}"#),
            (
                401,
                r#"{"detail":"X-User-Key must be at least 8 characters long CANARY"}"#,
            ),
            (403, r#"{"detail":"API key required but missing. CANARY"}"#),
            (403, r#"{"detail":"Invalid API key CANARY"}"#),
            (404, r#"{"detail":"environment is required CANARY"}"#),
            (
                404,
                r#"{"detail":"Configuration with key 'CANARY' not found"}"#,
            ),
            (
                422,
                r#"{"detail":[{"type":"CANARY","loc":["query","CANARY"],"msg":"CANARY"}]}"#,
            ),
            (
                422,
                r#"{"detail":[{"type":"CANARY","loc":["query","environment"]}]}"#,
            ),
            (418, "CANARY"),
        ];
        for (code, body) in cases {
            let err = e(code, body);
            let text = err.to_string();
            assert!(!text.contains(C), "{code} {body}: {text}");
            assert!(text.contains(&code.to_string()), "{code}: {text}");
        }
        assert!(e(500, r#"{"detail":"Internal error: CANARY"}"#).is_retryable());
        assert!(matches!(
            e(403, r#"{"detail":"Invalid API key CANARY"}"#),
            SourceError::Denied { .. }
        ));
    }

    #[test]
    fn a_redirect_shows_only_the_origin_of_a_same_host_target() {
        let mut h = HeaderMap::new();
        h.insert(
            LOCATION,
            HeaderValue::from_static("http://user:pw@127.0.0.2:8000/configs?token=CANARY"),
        );
        let err = e_with(302, &h, "");
        let text = err.to_string();
        assert!(matches!(err, SourceError::Redirect { status: 302, .. }));
        // Another host is never shown (a server could spell a credential into it).
        assert!(text.contains("another host (not shown"), "{text}");
        assert!(!text.contains("127.0.0.2"), "{text}");
        assert!(text.contains("--server"), "{text}");
        assert!(!text.contains("CANARY") && !text.contains("pw"), "{text}");
        assert!(!err.is_retryable());
        // Relative targets resolve against the request; garbage is not echoed.
        h.insert(LOCATION, HeaderValue::from_static("/elsewhere"));
        assert!(e_with(307, &h, "").to_string().contains("http://x:80"));
        // The same host over https (the usual mistake in --server): shown, with the scheme and port.
        h.insert(
            LOCATION,
            HeaderValue::from_static("https://x/configs?token=CANARY"),
        );
        let text = e_with(301, &h, "").to_string();
        assert!(
            text.contains("https://x:443") && !text.contains("CANARY"),
            "{text}"
        );
        h.insert(LOCATION, HeaderValue::from_static("javascript:CANARY"));
        let text = e_with(301, &h, "").to_string();
        assert!(text.contains("unusable Location"), "{text}");
    }

    #[test]
    fn bounded_escapes_and_cuts() {
        assert_eq!(bounded("a\nb\u{1b}", 100), "a\\nb\\u{1b}");
        assert_eq!(bounded("line\nforged", 100), "line\\nforged");
        assert_eq!(bounded("ab\ncd", 3), "ab\\…");
        assert_eq!(bounded(&"é".repeat(10), 4), "éééé…");
    }
}
