//! REST routes, status codes and error bodies of the upstream server, plus the `/_dev/` admin routes.
//!
//! Validation imitates FastAPI: API key first (403), then the `X-User-Key` dependency (missing or
//! empty: a 422 item; shorter than 8 characters: 401 at once), then the query and body parameters,
//! whose errors are all reported together in one 422 `{"detail":[…]}`. A request to `/configs*` or
//! `/backup` that passes validation then pays one key derivation (see [`super::cost`]) before it
//! touches the store, whatever the outcome (404, 400, the 500 of a wrong user key), as upstream
//! derives before it decrypts. Every request is counted per route first (see `GET /_dev/stats`).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use super::cost::{KeyDerivation, Requests, Route};
use super::faults::FaultUpdate;
use super::pyjson::{self, Style};
use super::sse::{ChangeEvent, Filters, Hub};
use super::store::{self, BadValue, NewEntry, Store, StoreError};

/// Minimum length of `X-User-Key`, in characters.
pub(super) const USER_KEY_MIN: usize = 8;
/// Version written into backups (the upstream's backup format version).
const BACKUP_VERSION: &str = "2.2.0";

/// Shared state of every handler.
#[derive(Clone)]
pub struct App {
    pub store: Arc<Mutex<Store>>,
    pub hub: Arc<Hub>,
    pub api_key: Option<Arc<str>>,
    pub requests: Arc<Requests>,
    pub key_derivation: Arc<KeyDerivation>,
}

impl App {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `X-API-Key`, only in API-key mode.
    fn check_api_key(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.api_key else {
            return Ok(());
        };
        match header_text(headers, "x-api-key") {
            None | Some("") => Err(ApiError::detail(
                StatusCode::FORBIDDEN,
                "API key required but missing. Provide X-API-Key header.",
            )),
            Some(given) if constant_time_eq(given.as_bytes(), expected.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::detail(StatusCode::FORBIDDEN, "Invalid API key")),
        }
    }

    /// The API key, then `X-User-Key`: missing or empty is a validation item, too short is a 401.
    fn user_key(&self, headers: &HeaderMap) -> Result<Checked<String>, ApiError> {
        self.check_api_key(headers)?;
        Ok(match header_text(headers, "x-user-key") {
            None => Err(vec![missing("header", "x-user-key")]),
            Some("") => Err(vec![too_short("header", "x-user-key", "", 1)]),
            Some(key) if key.chars().count() < USER_KEY_MIN => {
                return Err(ApiError::detail(
                    StatusCode::UNAUTHORIZED,
                    "X-User-Key must be at least 8 characters long",
                ));
            }
            Some(key) => Ok(key.to_owned()),
        })
    }
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(root))
        .route(
            "/health",
            get(|| async { json_ok(&json!({"status": "healthy"})) }),
        )
        .route("/ready", get(|| async { json_ok(&json!({"ready": true})) }))
        .route("/configs", get(list_configs).post(create_config))
        .route(
            "/configs/{key}",
            get(get_config).put(update_config).delete(delete_config),
        )
        .route("/backup", post(backup))
        .route("/cluster/configs", get(cluster_configs))
        .route("/sse/subscribe", get(subscribe))
        .route("/sse/health", get(sse_health))
        .route("/_dev/faults", get(get_faults).post(set_faults))
        .route("/_dev/streams/cut", post(cut_streams))
        .route("/_dev/streams/close", post(close_streams))
        .route("/_dev/stats", get(stats))
        .fallback(|| async { ApiError::detail(StatusCode::NOT_FOUND, "Not Found") })
        .method_not_allowed_fallback(|| async {
            ApiError::detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        })
        .layer(middleware::from_fn_with_state(
            app.clone(),
            unavailable_gate,
        ))
        .layer(middleware::from_fn(log_request))
        .with_state(app)
}

/// The `unavailable` fault: 503 for every route but the `/_dev/` controls.
async fn unavailable_gate(State(app): State<App>, request: Request, next: Next) -> Response {
    if app.hub.faults().unavailable() && !request.uri().path().starts_with("/_dev/") {
        return ApiError::detail(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable")
            .into_response();
    }
    next.run(request).await
}

/// Logs method, path and status only: never query values, headers or bodies.
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    tracing::info!(%method, %path, status = response.status().as_u16(), "dev-server request");
    response
}

// ---------------------------------------------------------------------------------------------
// Responses and errors

/// A JSON body serialized like Starlette's `JSONResponse` (compact, UTF-8).
fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = Response::new(Body::from(pyjson::to_string(body, Style::Compact)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn json_ok(body: &Value) -> Response {
    json_response(StatusCode::OK, body)
}

/// An error answer: a status and its JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    fn detail(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({ "detail": detail.into() }),
        }
    }

    /// What upstream answers when it cannot decrypt a row (wrong user key).
    fn internal() -> Self {
        Self::detail(StatusCode::INTERNAL_SERVER_ERROR, "Internal error: ")
    }

    fn unprocessable(items: Vec<Value>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            body: json!({ "detail": items }),
        }
    }

    fn store(err: StoreError, key: &str, environment: &str) -> Self {
        match err {
            StoreError::NotFound => Self::detail(
                StatusCode::NOT_FOUND,
                format!("Configuration with key '{key}' not found in environment '{environment}'"),
            ),
            StoreError::AlreadyExists => Self::detail(
                StatusCode::BAD_REQUEST,
                format!(
                    "Configuration with key '{key}' already exists in environment '{environment}'"
                ),
            ),
            StoreError::Sealed => Self::internal(),
            StoreError::Persist(reason) => {
                tracing::error!(%reason, "dev-server cannot save --data-file; write rolled back");
                Self::detail(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("dev-server cannot save --data-file: {reason}"),
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status, &self.body)
    }
}

// ---------------------------------------------------------------------------------------------
// FastAPI-style validation

/// A parameter value, or its 422 items.
type Checked<T> = Result<T, Vec<Value>>;

/// Collects 422 items across parameters so they are reported together.
#[derive(Default)]
struct Checks(Vec<Value>);

impl Checks {
    fn take<T>(&mut self, checked: Checked<T>) -> Option<T> {
        match checked {
            Ok(value) => Some(value),
            Err(items) => {
                self.0.extend(items);
                None
            }
        }
    }

    fn fail(self) -> ApiError {
        ApiError::unprocessable(self.0)
    }
}

fn missing(location: &str, name: &str) -> Value {
    json!({"type": "missing", "loc": [location, name], "msg": "Field required", "input": null})
}

fn too_short(location: &str, name: &str, input: &str, min: usize) -> Value {
    let unit = if min == 1 { "character" } else { "characters" };
    json!({
        "type": "string_too_short", "loc": [location, name],
        "msg": format!("String should have at least {min} {unit}"),
        "input": input, "ctx": {"min_length": min},
    })
}

fn too_long(location: &str, name: &str, input: &str, max: usize) -> Value {
    json!({
        "type": "string_too_long", "loc": [location, name],
        "msg": format!("String should have at most {max} characters"),
        "input": input, "ctx": {"max_length": max},
    })
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .map(|v| v.to_str().unwrap_or_default().trim())
}

/// Query parameters in order; the last occurrence of a name wins (as in FastAPI).
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A filter parameter: absent or empty means "no filter".
    fn filter(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.is_empty())
    }

    fn required(&self, name: &str) -> Checked<String> {
        self.get(name)
            .map(str::to_owned)
            .ok_or_else(|| vec![missing("query", name)])
    }

    /// `mode=short|full` (default short); `true` means full.
    fn full_mode(&self) -> Checked<bool> {
        match self.get("mode") {
            None | Some("short") => Ok(false),
            Some("full") => Ok(true),
            Some(other) => Err(vec![json!({
                "type": "literal_error", "loc": ["query", "mode"],
                "msg": "Input should be 'short' or 'full'", "input": other,
                "ctx": {"expected": "'short' or 'full'"},
            })]),
        }
    }
}

type QueryParams = Result<Query<Vec<(String, String)>>, QueryRejection>;

fn params(query: QueryParams) -> Checked<Params> {
    query.map(|Query(pairs)| Params(pairs)).map_err(|_| {
        vec![json!({"type": "value_error", "loc": ["query"], "msg": "Invalid query string", "input": null})]
    })
}

/// A key from the path. Starlette decodes `%2F` before routing, so a key containing `/` never
/// reaches the handler upstream: it is a plain 404.
fn path_key(key: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    match key {
        Ok(Path(key)) if !key.contains('/') => Ok(key),
        _ => Err(ApiError::detail(StatusCode::NOT_FOUND, "Not Found")),
    }
}

/// Upstream answers an empty `environment=` on single-key routes with this 404.
fn non_empty_environment(environment: String) -> Result<String, ApiError> {
    if environment.is_empty() {
        Err(ApiError::detail(
            StatusCode::NOT_FOUND,
            "environment is required",
        ))
    } else {
        Ok(environment)
    }
}

/// A JSON object body.
fn body_object(body: &Bytes) -> Checked<Map<String, Value>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(vec![
            json!({"type": "missing", "loc": ["body"], "msg": "Field required", "input": null}),
        ]);
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(vec![json!({
            "type": "model_attributes_type", "loc": ["body"],
            "msg": "Input should be a valid dictionary or object to extract fields from", "input": null,
        })]),
        Err(e) => Err(vec![json!({
            "type": "json_invalid", "loc": ["body", e.column().saturating_sub(1)],
            "msg": "JSON decode error", "input": {}, "ctx": {"error": "Expecting value"},
        })]),
    }
}

/// A string body field with length limits (`min` 0 means optional/nullable).
fn body_string(
    body: &Map<String, Value>,
    name: &str,
    min: usize,
    max: usize,
) -> Checked<Option<String>> {
    match body.get(name) {
        None | Some(Value::Null) if min == 0 => Ok(None),
        None => Err(vec![missing("body", name)]),
        Some(Value::String(s)) => {
            let n = s.chars().count();
            if n < min {
                Err(vec![too_short("body", name, s, min)])
            } else if n > max {
                Err(vec![too_long("body", name, s, max)])
            } else {
                Ok(Some(s.clone()))
            }
        }
        Some(_) => Err(vec![json!({
            "type": "string_type", "loc": ["body", name], "msg": "Input should be a valid string", "input": null,
        })]),
    }
}

/// The `value` field, validated like pydantic's `Union[dict, str, int, bool, list]` (see
/// [`store::accept_value`]); a refusal lists one error per union member, as pydantic does.
fn body_value(body: &Map<String, Value>) -> Checked<Value> {
    let Some(value) = body.get("value") else {
        return Err(vec![missing("body", "value")]);
    };
    store::accept_value(value).map_err(|why| {
        let int = match why {
            BadValue::Null => ("int_type", "Input should be a valid integer"),
            BadValue::Fractional => (
                "int_from_float",
                "Input should be a valid integer, got a number with a fractional part",
            ),
            BadValue::TooLarge => (
                "int_parsing_size",
                "Unable to parse input string as an integer, exceeded maximum size",
            ),
        };
        let bool_error = match why {
            BadValue::Null => ("bool_type", "Input should be a valid boolean"),
            _ => (
                "bool_parsing",
                "Input should be a valid boolean, unable to interpret input",
            ),
        };
        [
            ("dict[any,any]", ("dict_type", "Input should be a valid dictionary")),
            ("str", ("string_type", "Input should be a valid string")),
            ("int", int),
            ("bool", bool_error),
            ("list[any]", ("list_type", "Input should be a valid list")),
        ]
        .into_iter()
        .map(|(member, (kind, msg))| {
            json!({"type": kind, "loc": ["body", "value", member], "msg": msg, "input": value})
        })
        .collect()
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

// ---------------------------------------------------------------------------------------------
// Public routes

async fn root() -> Response {
    json_ok(&json!({
        "name": "OpenSecureConf API",
        "version": "3.1.0",
        "description": "osc-agent dev-server: OpenSecureConf-compatible, for local trials and tests only",
        "status": "operational",
    }))
}

async fn sse_health(State(app): State<App>) -> Response {
    let stats = app.hub.stats();
    json_ok(&json!({
        "status": "healthy",
        "active_subscriptions": stats.active_subscriptions,
        "total_events_sent": stats.events_delivered,
    }))
}

// ---------------------------------------------------------------------------------------------
// /configs and /backup

async fn list_configs(
    State(app): State<App>,
    headers: HeaderMap,
    query: QueryParams,
) -> Result<Response, ApiError> {
    app.requests.count(Route::List);
    let user_key = app.user_key(&headers)?;
    let mut checks = Checks::default();
    let user_key = checks.take(user_key);
    let params = checks.take(params(query));
    let full = params.as_ref().and_then(|p| checks.take(p.full_mode()));
    let (Some(user_key), Some(params), Some(full)) = (user_key, params, full) else {
        return Err(checks.fail());
    };
    app.key_derivation.derive(&user_key).await;
    let store = app.store();
    let fp = store.fingerprint(&user_key);
    let entries = store
        .select(params.filter("environment"), params.filter("category"), &fp)
        .map_err(|e| ApiError::store(e, "", ""))?;
    Ok(json_ok(&Value::Array(
        entries.iter().map(|e| e.to_json(full)).collect(),
    )))
}

async fn get_config(
    State(app): State<App>,
    key: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: QueryParams,
) -> Result<Response, ApiError> {
    app.requests.count(Route::Get);
    let key = path_key(key)?;
    let user_key = app.user_key(&headers)?;
    let mut checks = Checks::default();
    let user_key = checks.take(user_key);
    let params = checks.take(params(query));
    let environment = params
        .as_ref()
        .and_then(|p| checks.take(p.required("environment")));
    let full = params.as_ref().and_then(|p| checks.take(p.full_mode()));
    let (Some(user_key), Some(environment), Some(full)) = (user_key, environment, full) else {
        return Err(checks.fail());
    };
    let environment = non_empty_environment(environment)?;
    app.key_derivation.derive(&user_key).await;
    let store = app.store();
    let fp = store.fingerprint(&user_key);
    let entry = store
        .get(&environment, &key, &fp)
        .map_err(|e| ApiError::store(e, &key, &environment))?;
    Ok(json_ok(&entry.to_json(full)))
}

async fn create_config(
    State(app): State<App>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    app.requests.count(Route::Create);
    let user_key = app.user_key(&headers)?;
    let mut checks = Checks::default();
    let user_key = checks.take(user_key);
    let fields = checks.take(body_object(&body));
    let (key, value, environment, category) = match &fields {
        Some(f) => (
            checks
                .take(body_string(f, "key", 1, store::KEY_MAX))
                .flatten(),
            checks.take(body_value(f)),
            checks
                .take(body_string(f, "environment", 1, store::ENVIRONMENT_MAX))
                .flatten(),
            checks.take(body_string(f, "category", 0, store::CATEGORY_MAX)),
        ),
        None => (None, None, None, None),
    };
    let (Some(user_key), Some(key), Some(value), Some(environment), Some(category)) =
        (user_key, key, value, environment, category)
    else {
        return Err(checks.fail());
    };
    app.key_derivation.derive(&user_key).await;
    let mut store = app.store();
    let fp = store.fingerprint(&user_key);
    let new = NewEntry {
        key: key.clone(),
        environment: environment.clone(),
        category: category.clone(),
        value,
    };
    let entry = store
        .create(new, &fp)
        .map_err(|e| ApiError::store(e, &key, &environment))?;
    app.hub.publish(ChangeEvent::written(
        "created",
        &entry.key,
        &entry.environment,
        category.as_deref(),
        &entry.value,
    ));
    Ok(json_response(StatusCode::CREATED, &entry.to_json(true)))
}

async fn update_config(
    State(app): State<App>,
    key: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: QueryParams,
    body: Bytes,
) -> Result<Response, ApiError> {
    app.requests.count(Route::Update);
    let key = path_key(key)?;
    let user_key = app.user_key(&headers)?;
    let mut checks = Checks::default();
    let user_key = checks.take(user_key);
    let params = checks.take(params(query));
    let environment = params
        .as_ref()
        .and_then(|p| checks.take(p.required("environment")));
    let fields = checks.take(body_object(&body));
    let (value, category) = match &fields {
        Some(f) => (
            checks.take(body_value(f)),
            checks.take(body_string(f, "category", 0, store::CATEGORY_MAX)),
        ),
        None => (None, None),
    };
    let (Some(user_key), Some(environment), Some(value), Some(category)) =
        (user_key, environment, value, category)
    else {
        return Err(checks.fail());
    };
    let environment = non_empty_environment(environment)?;
    app.key_derivation.derive(&user_key).await;
    let mut store = app.store();
    let fp = store.fingerprint(&user_key);
    let entry = store
        .update(&environment, &key, value, category.clone(), &fp)
        .map_err(|e| ApiError::store(e, &key, &environment))?;
    // The event carries the category of the PUT body (null if omitted), not the stored one.
    app.hub.publish(ChangeEvent::written(
        "updated",
        &entry.key,
        &entry.environment,
        category.as_deref(),
        &entry.value,
    ));
    Ok(json_ok(&entry.to_json(true)))
}

async fn delete_config(
    State(app): State<App>,
    key: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: QueryParams,
) -> Result<Response, ApiError> {
    app.requests.count(Route::Delete);
    let key = path_key(key)?;
    let user_key = app.user_key(&headers)?;
    let mut checks = Checks::default();
    let user_key = checks.take(user_key);
    let params = checks.take(params(query));
    let environment = params
        .as_ref()
        .and_then(|p| checks.take(p.required("environment")));
    let (Some(user_key), Some(environment)) = (user_key, environment) else {
        return Err(checks.fail());
    };
    let environment = non_empty_environment(environment)?;
    app.key_derivation.derive(&user_key).await;
    let mut store = app.store();
    let fp = store.fingerprint(&user_key);
    store
        .delete(&environment, &key, &fp)
        .map_err(|e| ApiError::store(e, &key, &environment))?;
    app.hub.publish(ChangeEvent::deleted(&key, &environment));
    Ok(json_ok(
        &json!({"message": format!("Configuration '{key}' deleted successfully")}),
    ))
}

async fn backup(
    State(app): State<App>,
    headers: HeaderMap,
    query: QueryParams,
) -> Result<Response, ApiError> {
    app.requests.count(Route::Backup);
    let user_key = app.user_key(&headers)?;
    let mut checks = Checks::default();
    let user_key = checks.take(user_key);
    let params = checks.take(params(query));
    let password = checks.take(match header_text(&headers, "x-backup-password") {
        None => Err(vec![missing("header", "x-backup-password")]),
        Some("") => Err(vec![too_short("header", "x-backup-password", "", 1)]),
        Some(password) => Ok(password.to_owned()),
    });
    let (Some(user_key), Some(params), Some(password)) = (user_key, params, password) else {
        return Err(checks.fail());
    };
    // The user key's derivation; the backup password's own (real) one follows below.
    app.key_derivation.derive(&user_key).await;
    let (configurations, total_keys) = {
        let store = app.store();
        let fp = store.fingerprint(&user_key);
        let entries = store
            .select(params.filter("environment"), params.filter("category"), &fp)
            .map_err(|e| ApiError::store(e, "", ""))?;
        let total = entries.len();
        (
            entries.iter().map(|e| e.to_json(true)).collect::<Vec<_>>(),
            total,
        )
    };
    let backup_id = format!("backup-{}", super::clock::unix_seconds());
    let backup_timestamp = super::clock::utc_z();
    let document = json!({
        "version": BACKUP_VERSION,
        "backup_id": backup_id,
        "backup_timestamp": backup_timestamp,
        "total_keys": total_keys,
        "configurations": configurations,
    });
    let plaintext = pyjson::to_string(&document, Style::Dumps);
    // 480k PBKDF2 rounds: keep them off the async workers.
    let backup_data = tokio::task::spawn_blocking(move || {
        crate::backup::encrypt(plaintext.as_bytes(), password.as_bytes())
    })
    .await
    .map_err(|_| ApiError::internal())?;
    Ok(json_ok(&json!({
        "backup_data": backup_data,
        "total_keys": total_keys,
        "backup_timestamp": backup_timestamp,
        "backup_id": backup_id,
    })))
}

// ---------------------------------------------------------------------------------------------
// /cluster/configs

/// `GET /cluster/configs[?environment=E][&category=C]`: the metadata of every entry (no values),
/// without `X-User-Key` and without key derivation; `X-API-Key` in API-key mode. An absent or
/// empty filter matches everything; an unknown environment gives `[]`. With the route switched
/// off (`--no-cluster-configs`, or `cluster_configs: false` in `POST /_dev/faults`) it is a plain
/// 404, checked before the API key, like a server without the route.
async fn cluster_configs(
    State(app): State<App>,
    headers: HeaderMap,
    query: QueryParams,
) -> Result<Response, ApiError> {
    app.requests.count(Route::ClusterConfigs);
    if !app.hub.faults().snapshot().cluster_configs {
        return Err(ApiError::detail(StatusCode::NOT_FOUND, "Not Found"));
    }
    app.check_api_key(&headers)?;
    let params = params(query).map_err(ApiError::unprocessable)?;
    let rows = app
        .store()
        .metadata(params.filter("environment"), params.filter("category"));
    let body = serde_json::to_value(rows).map_err(|_| ApiError::internal())?;
    Ok(json_ok(&body))
}

// ---------------------------------------------------------------------------------------------
// SSE

async fn subscribe(
    State(app): State<App>,
    headers: HeaderMap,
    query: QueryParams,
) -> Result<Response, ApiError> {
    app.requests.count(Route::Subscribe);
    app.check_api_key(&headers)?;
    let params = params(query).map_err(ApiError::unprocessable)?;
    let filters = Filters {
        key: params.get("key").map(str::to_owned),
        environment: params.get("environment").map(str::to_owned),
        category: params.get("category").map(str::to_owned),
    };
    let Some(stream) = app.hub.subscribe(filters) else {
        return Err(ApiError::detail(
            StatusCode::SERVICE_UNAVAILABLE,
            "dev-server is shutting down",
        ));
    };
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

// ---------------------------------------------------------------------------------------------
// /_dev/ admin routes (unauthenticated, dev only)

async fn get_faults(State(app): State<App>) -> Response {
    json_ok(&json!(app.hub.faults().snapshot()))
}

async fn set_faults(State(app): State<App>, body: Bytes) -> Result<Response, ApiError> {
    let update: FaultUpdate = serde_json::from_slice(&body).map_err(|e| {
        ApiError::detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid fault update: {e}"),
        )
    })?;
    let state = app
        .hub
        .faults()
        .apply(update)
        .map_err(|e| ApiError::detail(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    if state.unavailable {
        app.hub.close_all();
    }
    tracing::info!(?state, "dev-server fault switches changed");
    Ok(json_ok(&json!(state)))
}

async fn cut_streams(State(app): State<App>) -> Response {
    let cut = app.hub.cut_all();
    tracing::info!(cut, "dev-server: SSE streams cut");
    json_ok(&json!({ "cut": cut }))
}

async fn close_streams(State(app): State<App>) -> Response {
    let closed = app.hub.close_all();
    tracing::info!(closed, "dev-server: SSE streams closed");
    json_ok(&json!({ "closed": closed }))
}

/// `GET /_dev/stats`: the hub's counters (see [`super::sse::Stats`]), then `requests` (per
/// route, see [`super::cost::RequestCounts`]), `key_derivations` (derivations paid) and
/// `key_derivation_cpu_ms` (their CPU time, milliseconds with microsecond resolution).
async fn stats(State(app): State<App>) -> Response {
    let mut body = json!(app.hub.stats());
    if let Value::Object(map) = &mut body {
        map.insert("requests".into(), json!(app.requests.snapshot()));
        map.insert(
            "key_derivations".into(),
            app.key_derivation.derivations().into(),
        );
        map.insert(
            "key_derivation_cpu_ms".into(),
            json!(app.key_derivation.cpu_ms()),
        );
    }
    json_ok(&body)
}
