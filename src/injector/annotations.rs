//! The pod annotations the injector reads (prefix `osc-agent.io/`), parsed and checked one by one so that a
//! [`Denial`] names the annotation at fault.

use std::collections::BTreeMap;
use std::str::FromStr;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::Pod;
use super::mutate::{Denial, InjectorDefaults};
use crate::action::ActionSpec;
use crate::config::{FileMode, OutputFormat};

/// Prefix of every annotation.
pub const PREFIX: &str = "osc-agent.io/";

/// `osc-agent.io/status` value written by the injector.
pub const INJECTED: &str = "injected";

/// Annotations under the prefix that the agent itself (not the user) writes on pods: ignored here.
const WRITTEN_BY_AGENT: &[&str] = &["config-hash", "content-hash"];

/// The annotations with fixed names (`output-<name>` and `template-<name>` come on top).
pub const KNOWN: &[&str] = &[
    "inject",
    "status",
    "environment",
    "credentials-secret",
    "user-key-key",
    "api-key-key",
    "token-key",
    "ca-key",
    "server",
    "mount-path",
    "containers",
    "include",
    "exclude",
    "category",
    "file-mode",
    "template-configmap",
    "action",
    "init-only",
    "native-sidecar",
    "resources",
];

/// What the annotations of one pod ask for, checked.
#[derive(Clone, Debug)]
pub struct Request {
    pub environment: String,
    pub credentials_secret: String,
    pub user_key_key: String,
    pub api_key_key: Option<String>,
    pub token_key: Option<String>,
    /// The key of the credentials Secret holding a PEM CA bundle for the server (`--ca-file`).
    pub ca_key: Option<String>,
    pub server: String,
    pub mount_path: String,
    /// `None`: every app container.
    pub containers: Option<Vec<String>>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub category: Vec<String>,
    /// Octal, four digits (`0440`); `None`: the injector's choice (see [`super::mutate`]).
    pub file_mode: Option<String>,
    /// `output-<name>`: (file name, format).
    pub outputs: Vec<(String, OutputFormat)>,
    /// `template-configmap`: (ConfigMap name, keys).
    pub template_configmap: Option<(String, Vec<String>)>,
    /// `template-<name>`: file names whose template is the annotation's value.
    pub inline_templates: Vec<String>,
    /// `action`: each in the `--action` syntax, as given (trimmed), with its parsed form.
    pub actions: Vec<(String, ActionSpec)>,
    pub init_only: bool,
    pub native_sidecar: bool,
    pub resources: ResourceRequirements,
}

impl Request {
    /// Whether an action signals processes (shared PID namespace and the KILL capability).
    pub fn needs_processes(&self) -> bool {
        self.actions
            .iter()
            .any(|(_, a)| matches!(a.kind(), "signal" | "restart-container"))
    }
}

fn deny(name: &str, message: impl std::fmt::Display) -> Denial {
    Denial::new(format!("{PREFIX}{name}: {message}"))
}

/// `true`/`false` (any case).
pub fn parse_bool(name: &str, value: &str) -> Result<bool, Denial> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(deny(
            name,
            format!("'{value}' is not \"true\" or \"false\""),
        )),
    }
}

/// An RFC 1123 subdomain (Secret and ConfigMap names).
fn is_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A key of a Secret's or ConfigMap's data (`[-._a-zA-Z0-9]+`).
fn is_data_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A file name the agent writes in the output directory: a data key not starting with a dot (the
/// `..data` layout owns those).
fn is_file_name(s: &str) -> bool {
    is_data_key(s) && !s.starts_with('.')
}

/// A comma-separated list, items trimmed, empty items dropped.
fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

static QUANTITY: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$")
        .expect("the quantity pattern compiles")
});

/// `resources`: a JSON object `{"requests": {...}, "limits": {...}}` of `cpu`, `memory` and
/// `ephemeral-storage` quantities; it replaces the injector's default as a whole.
fn parse_resources(value: &str) -> Result<ResourceRequirements, Denial> {
    const NAME: &str = "resources";
    let example =
        r#"e.g. {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}"#;
    let doc: serde_json::Value = serde_json::from_str(value)
        .map_err(|_| deny(NAME, format!("not a JSON object ({example})")))?;
    let serde_json::Value::Object(top) = doc else {
        return Err(deny(NAME, format!("not a JSON object ({example})")));
    };
    let mut out = ResourceRequirements::default();
    for (section, quantities) in top {
        let serde_json::Value::Object(quantities) = quantities else {
            return Err(deny(
                NAME,
                format!("'{section}' must be an object of quantities ({example})"),
            ));
        };
        let mut map = BTreeMap::new();
        for (resource, q) in quantities {
            if !matches!(resource.as_str(), "cpu" | "memory" | "ephemeral-storage") {
                return Err(deny(
                    NAME,
                    format!("unknown resource '{resource}': use cpu, memory or ephemeral-storage"),
                ));
            }
            let q = match q {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                _ => {
                    return Err(deny(
                        NAME,
                        format!("{section}.{resource} must be a quantity such as 64Mi or 100m"),
                    ));
                }
            };
            if !QUANTITY.is_match(&q) {
                return Err(deny(
                    NAME,
                    format!("{section}.{resource}: '{q}' is not a quantity such as 64Mi or 100m"),
                ));
            }
            map.insert(resource, Quantity(q));
        }
        match section.as_str() {
            "requests" => out.requests = Some(map),
            "limits" => out.limits = Some(map),
            other => {
                return Err(deny(
                    NAME,
                    format!("unknown field '{other}': use requests and limits ({example})"),
                ));
            }
        }
    }
    Ok(out)
}

/// A directory path for the output volume: absolute, normalised (no `.`/`..`/empty components, no trailing
/// slash), not `/`, and without the characters the agent's flags use as separators.
fn parse_mount_path(value: &str) -> Result<String, Denial> {
    const NAME: &str = "mount-path";
    let v = value.trim();
    let trimmed = v.trim_end_matches('/');
    if !v.starts_with('/') || trimmed.is_empty() {
        return Err(deny(
            NAME,
            format!("'{value}' must be an absolute directory other than /, e.g. /config"),
        ));
    }
    if trimmed
        .split('/')
        .skip(1)
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(deny(
            NAME,
            format!("'{value}' must be a plain path (no '//', '.' or '..')"),
        ));
    }
    if trimmed.contains([':', ',', ';']) || trimmed.chars().any(char::is_control) {
        return Err(deny(
            NAME,
            format!("'{value}' must not contain ':', ',', ';' or control characters"),
        ));
    }
    for reserved in ["/var/run/secrets/osc-agent", "/etc/osc-agent"] {
        if trimmed == reserved || trimmed.starts_with(&format!("{reserved}/")) {
            return Err(deny(
                NAME,
                format!(
                    "'{value}' is where the injector mounts the agent's own files ({reserved})"
                ),
            ));
        }
    }
    Ok(trimmed.to_owned())
}

/// Read the annotations of a pod that asked for injection (`inject: "true"`, not yet injected).
pub fn parse(pod: &Pod, defaults: &InjectorDefaults) -> Result<Request, Denial> {
    let empty = BTreeMap::new();
    let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let get = |name: &str| ann.get(&format!("{PREFIX}{name}")).map(String::as_str);

    // Unknown annotations under the prefix are typos: a pod running without the setting it asked for is
    // worse than a denied one.
    let mut outputs = Vec::new();
    let mut inline_templates = Vec::new();
    for (key, value) in ann {
        let Some(name) = key.strip_prefix(PREFIX) else {
            continue;
        };
        if KNOWN.contains(&name) || WRITTEN_BY_AGENT.contains(&name) {
            continue;
        }
        if let Some(file) = name.strip_prefix("output-") {
            if !is_file_name(file) {
                return Err(deny(
                    name,
                    format!(
                        "'{file}' is not a file name (letters, digits, '-', '_' and '.', not starting with '.')"
                    ),
                ));
            }
            let format = OutputFormat::from_str(value.trim()).map_err(|e| deny(name, e))?;
            outputs.push((file.to_owned(), format));
        } else if let Some(file) = name.strip_prefix("template-") {
            if !is_file_name(file) {
                return Err(deny(
                    name,
                    format!(
                        "'{file}' is not a file name (letters, digits, '-', '_' and '.', not starting with '.')"
                    ),
                ));
            }
            if value.trim().is_empty() {
                return Err(deny(name, "the template is empty"));
            }
            inline_templates.push(file.to_owned());
        } else {
            return Err(Denial::new(format!(
                "{key}: unknown annotation (known: {}, output-<file>, template-<file>)",
                KNOWN.join(", ")
            )));
        }
    }

    let environment = match get("environment").map(str::trim) {
        Some(e) if !e.is_empty() => e.to_owned(),
        Some(_) => return Err(deny("environment", "must not be empty")),
        None => match pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(&format!("{PREFIX}environment")))
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
        {
            Some(e) => e.to_owned(),
            None => {
                return Err(Denial::new(format!(
                    "{PREFIX}environment is required (the OpenSecureConf environment to sync), as an annotation or a label"
                )));
            }
        },
    };
    if environment.chars().count() > 100 {
        return Err(deny("environment", "longer than 100 characters"));
    }

    let credentials_secret = match get("credentials-secret").map(str::trim) {
        Some(s) if is_object_name(s) => s.to_owned(),
        Some(s) => {
            return Err(deny(
                "credentials-secret",
                format!(
                    "'{s}' is not a valid Secret name (lower-case letters, digits, '-' and '.')"
                ),
            ));
        }
        None => match &defaults.credentials_secret {
            Some(s) => s.clone(),
            None => {
                return Err(Denial::new(format!(
                    "{PREFIX}credentials-secret is required: the name of the Secret holding the user key (key user-key)"
                )));
            }
        },
    };
    let data_key = |name: &str| -> Result<Option<String>, Denial> {
        match get(name).map(str::trim) {
            None => Ok(None),
            Some(k) if is_data_key(k) => Ok(Some(k.to_owned())),
            Some(k) => Err(deny(
                name,
                format!("'{k}' is not a Secret key (letters, digits, '-', '_' and '.')"),
            )),
        }
    };
    let user_key_key = data_key("user-key-key")?.unwrap_or_else(|| "user-key".into());
    let api_key_key = data_key("api-key-key")?;
    let token_key = data_key("token-key")?;
    let ca_key = data_key("ca-key")?;

    let server = match get("server").map(str::trim) {
        Some(s) => {
            let url = reqwest::Url::parse(s)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                .ok_or_else(|| deny("server", format!("'{s}' is not an http:// or https:// URL")))?;
            if !url.username().is_empty() || url.password().is_some() {
                return Err(deny(
                    "server",
                    "credentials in the URL are not accepted (annotations are readable by anyone who can read the pod)",
                ));
            }
            s.to_owned()
        }
        None => defaults.server.clone().ok_or_else(|| {
            Denial::new(format!(
                "{PREFIX}server is required: this injector has no default server (its --default-server)"
            ))
        })?,
    };

    let mount_path = match get("mount-path") {
        Some(p) => parse_mount_path(p)?,
        None => defaults.mount_path.clone(),
    };

    let containers = match get("containers") {
        None => None,
        Some(v) => {
            let names = list(v);
            if names.is_empty() {
                return Err(deny("containers", "names no container"));
            }
            let spec = pod.spec.as_ref();
            let exists = |n: &str| {
                spec.is_some_and(|s| {
                    s.containers.iter().any(|c| c.name == n)
                        || s.init_containers.iter().flatten().any(|c| c.name == n)
                })
            };
            if let Some(missing) = names.iter().find(|n| !exists(n)) {
                return Err(deny(
                    "containers",
                    format!("the pod has no container named '{missing}'"),
                ));
            }
            Some(names)
        }
    };

    let file_mode = match get("file-mode") {
        None => None,
        Some(m) => {
            let mode = FileMode::from_str(m).map_err(|e| deny("file-mode", e))?;
            Some(format!("{:04o}", mode.0))
        }
    };

    let template_configmap = match get("template-configmap") {
        None => None,
        Some(v) => {
            let usage = "expected NAME:KEY[,KEY...], e.g. app-templates:app.conf,nginx.conf";
            let (name, keys) = v
                .split_once(':')
                .ok_or_else(|| deny("template-configmap", format!("'{v}': {usage}")))?;
            let name = name.trim();
            if !is_object_name(name) {
                return Err(deny(
                    "template-configmap",
                    format!("'{name}' is not a valid ConfigMap name"),
                ));
            }
            let keys = list(keys);
            if keys.is_empty() {
                return Err(deny("template-configmap", format!("'{v}': {usage}")));
            }
            if let Some(bad) = keys.iter().find(|k| !is_file_name(k)) {
                return Err(deny(
                    "template-configmap",
                    format!("'{bad}' is not a ConfigMap key usable as a file name"),
                ));
            }
            Some((name.to_owned(), keys))
        }
    };
    let mut destinations: Vec<&str> = outputs.iter().map(|(n, _)| n.as_str()).collect();
    destinations.extend(inline_templates.iter().map(String::as_str));
    if let Some((_, keys)) = &template_configmap {
        destinations.extend(keys.iter().map(String::as_str));
    }
    destinations.sort_unstable();
    if let Some(w) = destinations.windows(2).find(|w| w[0] == w[1]) {
        return Err(Denial::new(format!(
            "{PREFIX}output-*, template-* and template-configmap: '{}' is written by two of them",
            w[0]
        )));
    }

    let mut actions = Vec::new();
    if let Some(v) = get("action") {
        for spec in v.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let parsed = ActionSpec::from_str(spec).map_err(|e| deny("action", e))?;
            actions.push((spec.to_owned(), parsed));
        }
        if actions.is_empty() {
            return Err(deny("action", "names no action"));
        }
    }

    let init_only = match get("init-only") {
        Some(v) => parse_bool("init-only", v)?,
        None => false,
    };
    let native_sidecar = match get("native-sidecar") {
        Some(v) => {
            let native = parse_bool("native-sidecar", v)?;
            if native && init_only {
                return Err(deny(
                    "native-sidecar",
                    "init-only runs no sidecar: remove one of the two",
                ));
            }
            native
        }
        None => defaults.native_sidecar && !init_only,
    };
    if init_only && !actions.is_empty() {
        return Err(deny(
            "action",
            "init-only syncs once before the app starts: actions need the sidecar (remove init-only or the action)",
        ));
    }

    let resources = match get("resources") {
        Some(v) => parse_resources(v)?,
        None => defaults.resources.clone(),
    };

    let split = |name| get(name).map(list).unwrap_or_default();
    Ok(Request {
        environment,
        credentials_secret,
        user_key_key,
        api_key_key,
        token_key,
        ca_key,
        server,
        mount_path,
        containers,
        include: split("include"),
        exclude: split("exclude"),
        category: split("category"),
        file_mode,
        outputs,
        template_configmap,
        inline_templates,
        actions,
        init_only,
        native_sidecar,
        resources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for ok in ["5m", "16Mi", "1", "0.5", "1e3", "2G", "+1"] {
            assert!(QUANTITY.is_match(ok), "{ok}");
        }
        for bad in ["", "m", "16MB", "-1", "1.2.3", "5 m"] {
            assert!(!QUANTITY.is_match(bad), "{bad}");
        }
    }

    #[test]
    fn mount_paths() {
        assert_eq!(parse_mount_path("/config/").unwrap(), "/config");
        assert_eq!(parse_mount_path("/etc/app/conf").unwrap(), "/etc/app/conf");
        for bad in [
            "config",
            "/",
            "//",
            "/a/../b",
            "/a//b",
            "/a:b",
            "/etc/osc-agent/x",
        ] {
            assert!(parse_mount_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resources_json() {
        let r = parse_resources(r#"{"requests": {"cpu": "10m"}, "limits": {"memory": "64Mi"}}"#)
            .unwrap();
        assert_eq!(r.requests.unwrap()["cpu"], Quantity("10m".into()));
        for bad in [
            "cpu=1",
            r#"{"requests": {"gpu": "1"}}"#,
            r#"{"request": {"cpu": "1"}}"#,
            r#"{"limits": {"memory": "lots"}}"#,
            "[]",
        ] {
            let e = parse_resources(bad).unwrap_err();
            assert!(e.message.starts_with("osc-agent.io/resources: "), "{e}");
        }
    }
}
