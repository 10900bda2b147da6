//! `http`: call the app's reload endpoint, retrying with backoff.
//!
//! The request has no body. It carries the configured headers plus `X-Osc-Content-Hash` and
//! `X-Osc-Environment`, so the app can tell which content it is asked to load. Errors and logs name the URL
//! (without credentials) and the status or transport error, never a response body or a header value.
//! No redirect is followed: the configured headers (often a token) would go to whatever origin, or over
//! whatever scheme, the `Location` names. A 3xx answer fails the call at once, naming only the origin of
//! its `Location`; configure the final URL instead.

use std::str::FromStr;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};

use super::ActionContext;
use super::ActionError;
use super::spec::HttpSpec;
use crate::backoff::Backoff;
use crate::config::HumanDuration;
use crate::util::error_chain;

/// Per-attempt timeout when none is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries after a failed attempt when none is configured.
pub const DEFAULT_RETRIES: u32 = 3;
/// Header carrying [`ActionContext::hash`].
pub const HASH_HEADER: &str = "x-osc-content-hash";
/// Header carrying [`ActionContext::environment`].
pub const ENVIRONMENT_HEADER: &str = "x-osc-environment";

/// A client for reload calls: the agent's user agent, and no proxy (the endpoint is normally the app, in
/// the same pod, which a proxy from the environment could not reach), and no redirects (see the module
/// documentation).
pub fn build_client() -> Result<reqwest::Client, ActionError> {
    crate::source::install_crypto_provider();
    reqwest::Client::builder()
        .user_agent(concat!("osc-agent/", env!("CARGO_PKG_VERSION")))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ActionError(format!("http: cannot build a client: {}", error_chain(&e))))
}

/// Calls the endpoint `spec` describes: up to `1 + retries` attempts, each bounded by the timeout, with
/// full-jitter backoff between them. Succeeds with the status when it is `expect_status` (any 2xx when
/// unset); retries on connection errors, timeouts and other statuses.
pub async fn call(
    client: &reqwest::Client,
    spec: &HttpSpec,
    ctx: &ActionContext,
) -> Result<u16, ActionError> {
    let request = Request::new(spec, ctx)?;
    let retries = spec.retries.unwrap_or(DEFAULT_RETRIES);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 2.0);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let failure = match request.send(client).await {
            Ok((status, _)) if request.accepts(status) => return Ok(status.as_u16()),
            Ok((status, location)) if status.is_redirection() => {
                Failure::Redirect(status, location)
            }
            Ok((status, _)) => Failure::Status(status),
            Err(failure) => failure,
        };
        if failure.is_final() || attempt > retries {
            return Err(request.error(attempt, &failure));
        }
        let delay = backoff.next_delay();
        tracing::warn!(
            method = %request.method,
            url = %request.shown_url,
            attempt,
            retries,
            delay = ?delay,
            failure = %request.describe(&failure),
            "reload call failed, retrying"
        );
        tokio::time::sleep(delay).await;
    }
}

/// Everything about the request that does not change between attempts.
struct Request {
    method: Method,
    url: Url,
    /// The URL as shown in errors and logs: without user name or password.
    shown_url: String,
    headers: HeaderMap,
    timeout: Duration,
    expect_status: Option<u16>,
}

/// Why an attempt failed.
enum Failure {
    Status(StatusCode),
    /// A 3xx and the origin of its `Location` (or a phrase when there is none usable): never followed,
    /// never retried (the same request gets the same answer).
    Redirect(StatusCode, String),
    Timeout,
    /// A transport error worth retrying (connection refused, reset, ...).
    Transport(String),
    /// An error that retrying cannot fix (the request cannot even be built).
    Fatal(String),
}

impl Failure {
    fn is_final(&self) -> bool {
        matches!(self, Failure::Fatal(_) | Failure::Redirect(..))
    }
}

impl Request {
    fn new(spec: &HttpSpec, ctx: &ActionContext) -> Result<Self, ActionError> {
        let url = Url::parse(&spec.url).map_err(|_| {
            ActionError(format!(
                "http: '{}' is not a URL",
                without_credentials_str(&spec.url)
            ))
        })?;
        let method_name = spec
            .method
            .as_deref()
            .unwrap_or("POST")
            .to_ascii_uppercase();
        let method = Method::from_str(&method_name)
            .map_err(|_| ActionError(format!("http: bad method '{method_name}'")))?;
        Ok(Request {
            method,
            shown_url: without_credentials(&url),
            url,
            headers: headers(spec, ctx)?,
            timeout: spec.timeout.map_or(DEFAULT_TIMEOUT, |t| t.0),
            expect_status: spec.expect_status,
        })
    }

    /// One attempt: the response status (with, for a 3xx, the origin its `Location` names), or why
    /// there is none. The response body is never read.
    async fn send(&self, client: &reqwest::Client) -> Result<(StatusCode, String), Failure> {
        let response = client
            .request(self.method.clone(), self.url.clone())
            .headers(self.headers.clone())
            .timeout(self.timeout)
            .send()
            .await
            .map_err(classify)?;
        let status = response.status();
        let location = if status.is_redirection() {
            crate::source::redirect_target(response.headers(), &self.url)
        } else {
            String::new()
        };
        Ok((status, location))
    }

    fn accepts(&self, status: StatusCode) -> bool {
        match self.expect_status {
            Some(expected) => status.as_u16() == expected,
            None => status.is_success(),
        }
    }

    /// A failure in words.
    fn describe(&self, failure: &Failure) -> String {
        match failure {
            Failure::Status(status) => {
                let expected = match self.expect_status {
                    Some(code) => code.to_string(),
                    None => "2xx".to_owned(),
                };
                format!("status {status} (expected {expected})")
            }
            Failure::Redirect(status, location) => format!(
                "status {status}, a redirect to {location}; reload calls follow no redirect (the \
                 headers would go there): configure the final URL"
            ),
            Failure::Timeout => format!("no response within {}", HumanDuration(self.timeout)),
            Failure::Transport(reason) | Failure::Fatal(reason) => reason.clone(),
        }
    }

    /// The error after the last attempt.
    fn error(&self, attempts: u32, failure: &Failure) -> ActionError {
        let plural = if attempts == 1 { "" } else { "s" };
        ActionError(format!(
            "http: {} {} failed after {attempts} attempt{plural}: {}",
            self.method,
            self.shown_url,
            self.describe(failure)
        ))
    }
}

/// The configured headers (marked sensitive: they may hold tokens) and the agent's own.
fn headers(spec: &HttpSpec, ctx: &ActionContext) -> Result<HeaderMap, ActionError> {
    let mut map = HeaderMap::new();
    for (name, value) in &spec.headers {
        let mut value = header_value(name, value)?;
        value.set_sensitive(true);
        map.insert(header_name(name)?, value);
    }
    map.insert(
        HeaderName::from_static(HASH_HEADER),
        header_value(HASH_HEADER, &ctx.hash)?,
    );
    map.insert(
        HeaderName::from_static(ENVIRONMENT_HEADER),
        header_value(ENVIRONMENT_HEADER, &ctx.environment)?,
    );
    Ok(map)
}

fn header_name(name: &str) -> Result<HeaderName, ActionError> {
    HeaderName::from_str(name).map_err(|_| ActionError(format!("http: bad header name '{name}'")))
}

/// A header value; the error names the header, not the value.
fn header_value(name: &str, value: &str) -> Result<HeaderValue, ActionError> {
    HeaderValue::from_str(value).map_err(|_| {
        ActionError(format!(
            "http: the value of header '{name}' is not a valid header value"
        ))
    })
}

/// Sorts a reqwest error into a [`Failure`], without the URL (which the caller shows without credentials).
fn classify(error: reqwest::Error) -> Failure {
    if error.is_timeout() {
        return Failure::Timeout;
    }
    let (is_builder, is_connect) = (error.is_builder(), error.is_connect());
    let reason = error_chain(&error.without_url());
    if is_builder {
        Failure::Fatal(reason)
    } else if is_connect {
        Failure::Transport(format!("cannot connect: {reason}"))
    } else {
        Failure::Transport(reason)
    }
}

/// `url` without user name and password.
fn without_credentials(url: &Url) -> String {
    let mut shown = url.clone();
    // Only fails for URLs that cannot have credentials, which then have none.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

/// [`without_credentials`] for text that may not parse: drops everything up to an `@` in the authority.
/// The URL as shown in logs and `/status`: without user name, password or query (which may hold tokens).
pub fn shown_url(text: &str) -> String {
    let shown = without_credentials_str(text);
    match shown.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => shown,
    }
}

fn without_credentials_str(text: &str) -> String {
    match text.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
                None => text.to_owned(),
            }
        }
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A request as the test server saw it.
    #[derive(Clone, Debug)]
    struct Seen {
        method: String,
        path: String,
        /// Header names lower-cased.
        headers: BTreeMap<String, String>,
    }

    /// A local HTTP/1.1 server answering with `statuses` in turn (then the last one forever).
    struct Server {
        url: String,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl Server {
        async fn start(statuses: Vec<u16>) -> Server {
            Server::start_on("127.0.0.1", statuses, None).await
        }

        /// On `ip`, with a `Location` header in every answer when one is given.
        async fn start_on(ip: &str, statuses: Vec<u16>, location: Option<String>) -> Server {
            let listener = TcpListener::bind((ip, 0)).await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let seen = Arc::new(Mutex::new(Vec::new()));
            let log = Arc::clone(&seen);
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let index = log.lock().expect("lock").len();
                    let status = statuses
                        .get(index)
                        .or(statuses.last())
                        .copied()
                        .unwrap_or(200);
                    answer(stream, status, location.as_deref(), &log).await;
                }
            });
            Server {
                url: format!("http://{addr}/-/reload"),
                seen,
            }
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().expect("lock").clone()
        }
    }

    /// Reads one request head, records it, and only then answers `status` (so that a caller who has the
    /// answer finds the request recorded), closing the connection.
    async fn answer(
        mut stream: TcpStream,
        status: u16,
        location: Option<&str>,
        log: &Mutex<Vec<Seen>>,
    ) -> Option<()> {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut lines = text.split("\r\n");
        let mut request_line = lines.next()?.split(' ');
        let method = request_line.next()?.to_owned();
        let path = request_line.next()?.to_owned();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        log.lock().expect("lock").push(Seen {
            method,
            path,
            headers,
        });
        let location = location.map_or_else(String::new, |l| format!("Location: {l}\r\n"));
        let response = format!(
            "HTTP/1.1 {status} Whatever\r\n{location}Content-Length: 5\r\nConnection: close\r\n\r\nbody!"
        );
        stream.write_all(response.as_bytes()).await.ok()?;
        stream.shutdown().await.ok()
    }

    fn spec(url: &str) -> HttpSpec {
        HttpSpec {
            url: url.to_owned(),
            method: None,
            headers: BTreeMap::new(),
            expect_status: None,
            timeout: Some(HumanDuration(Duration::from_secs(2))),
            retries: None,
        }
    }

    fn ctx() -> ActionContext {
        ActionContext {
            environment: "staging".into(),
            hash: "abc123".into(),
            changed_keys: vec!["db.url".into()],
        }
    }

    #[tokio::test]
    async fn succeeds_after_retries_and_sends_headers() {
        let server = Server::start(vec![500, 500, 200]).await;
        let mut spec = spec(&server.url);
        spec.method = Some("put".into());
        spec.headers
            .insert("Authorization".into(), "Bearer t0ken".into());
        let client = build_client().expect("client");

        assert_eq!(call(&client, &spec, &ctx()).await, Ok(200));
        let seen = server.seen();
        assert_eq!(seen.len(), 3);
        for request in &seen {
            assert_eq!(
                (request.method.as_str(), request.path.as_str()),
                ("PUT", "/-/reload")
            );
            assert_eq!(
                request.headers.get("authorization").map(String::as_str),
                Some("Bearer t0ken")
            );
            assert_eq!(
                request.headers.get(HASH_HEADER).map(String::as_str),
                Some("abc123")
            );
            assert_eq!(
                request.headers.get(ENVIRONMENT_HEADER).map(String::as_str),
                Some("staging")
            );
            let length = request.headers.get("content-length").map(String::as_str);
            assert!(matches!(length, None | Some("0")), "no body: {length:?}");
        }
    }

    #[tokio::test]
    async fn default_method_is_post_and_expected_status_counts() {
        let server = Server::start(vec![204]).await;
        let mut spec = spec(&server.url);
        spec.expect_status = Some(204);
        let client = build_client().expect("client");
        assert_eq!(call(&client, &spec, &ctx()).await, Ok(204));
        assert_eq!(server.seen()[0].method, "POST");
    }

    #[tokio::test]
    async fn unexpected_status_exhausts_retries() {
        let server = Server::start(vec![200]).await;
        let mut spec = spec(&server.url);
        spec.expect_status = Some(204);
        spec.retries = Some(2);
        let client = build_client().expect("client");

        let err = call(&client, &spec, &ctx())
            .await
            .expect_err("200 is not 204");
        assert_eq!(server.seen().len(), 3);
        assert!(err.0.contains(&server.url), "{err}");
        assert!(
            err.0.contains("3 attempts") && err.0.contains("status 200 OK (expected 204)"),
            "{err}"
        );
        assert!(!err.0.contains("body!"), "{err}");
    }

    /// A reload endpoint that redirects to another origin (127.0.0.2) or to another scheme: the call
    /// fails at once, naming the target's origin only when it is the same host; the token never reaches
    /// the other server.
    #[tokio::test]
    async fn redirects_are_not_followed_and_fail_at_once() {
        let elsewhere = Server::start_on("127.0.0.2", vec![200], None).await;
        let client = build_client().expect("client");
        for (status, location) in [
            (302, format!("{}?token=from-the-query", elsewhere.url)),
            (307, elsewhere.url.replace("http://", "https://")),
            (308, "/same-origin/other-path".to_owned()),
            // A host made of the token it was sent: not shown.
            (302, "http://The-Apps-Reload-Token.example/".to_owned()),
        ] {
            let server = Server::start_on("127.0.0.1", vec![status], Some(location.clone())).await;
            let mut spec = spec(&server.url);
            spec.headers
                .insert("X-Api-Key".into(), "the-apps-reload-token".into());
            let err = call(&client, &spec, &ctx())
                .await
                .expect_err("a redirect is an error");
            assert_eq!(server.seen().len(), 1, "not retried: {err}");
            assert!(
                err.0
                    .contains(&format!("failed after 1 attempt: status {status}"))
                    && err.0.contains("follow no redirect"),
                "{err}"
            );
            let target = server
                .url
                .parse::<Url>()
                .expect("url")
                .join(&location)
                .expect("join");
            // Another host (127.0.0.2, or one made of the token it was sent) is never shown; the same
            // host is, with its scheme and port.
            if target.host() == server.url.parse::<Url>().expect("url").host() {
                assert!(
                    err.0.contains(&format!(
                        "{}://{}",
                        target.scheme(),
                        target.host_str().unwrap_or_default()
                    )),
                    "names the target's origin: {err}"
                );
            } else {
                assert!(
                    err.0.contains("another host (not shown")
                        && !err.0.to_lowercase().contains("reload-token")
                        && !err.0.contains("127.0.0.2"),
                    "{err}"
                );
            }
            assert!(
                !err.0.contains("from-the-query") && !err.0.contains("-path"),
                "only the origin: {err}"
            );
        }
        assert!(elsewhere.seen().is_empty(), "{:?}", elsewhere.seen());
    }

    #[tokio::test]
    async fn connection_errors_are_retried_and_named() {
        // Bind then drop a listener: nothing listens on that port any more.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let mut spec = spec(&format!("http://user:secret@{addr}/reload"));
        spec.retries = Some(1);
        let client = build_client().expect("client");

        let err = call(&client, &spec, &ctx()).await.expect_err("refused");
        assert!(
            err.0.contains(&format!(
                "POST http://{addr}/reload failed after 2 attempts"
            )),
            "{err}"
        );
        assert!(err.0.contains("cannot connect"), "{err}");
        assert!(!err.0.contains("secret"), "{err}");
    }

    #[tokio::test]
    async fn timeouts_are_named() {
        // Accepts connections but never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let silent = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                open.push(stream);
            }
        });
        let mut spec = spec(&format!("http://{addr}/reload"));
        spec.timeout = Some(HumanDuration(Duration::from_millis(200)));
        spec.retries = Some(0);
        let client = build_client().expect("client");

        let err = call(&client, &spec, &ctx()).await.expect_err("timeout");
        assert!(
            err.0.contains("1 attempt: no response within 200ms"),
            "{err}"
        );
        silent.abort();
    }

    #[test]
    fn bad_headers_and_methods_are_named_without_values() {
        let mut bad = spec("http://127.0.0.1:1/");
        bad.headers
            .insert("X-Token".into(), "line\nbreak-secret".into());
        let err = Request::new(&bad, &ctx()).err().expect("bad value");
        assert!(
            err.0.contains("X-Token") && !err.0.contains("secret"),
            "{err}"
        );

        let mut bad = spec("http://127.0.0.1:1/");
        bad.method = Some("NO PE".into());
        let err = Request::new(&bad, &ctx()).err().expect("bad method");
        assert!(err.0.contains("bad method"), "{err}");

        let err = Request::new(&spec("http://u:secret@[::1"), &ctx())
            .err()
            .expect("bad url");
        assert!(
            err.0.contains("not a URL") && !err.0.contains("secret"),
            "{err}"
        );
    }
}
