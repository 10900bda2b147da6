//! Configuration: flags (each with an `OSC_*` environment twin) and an optional YAML file.
//!
//! Precedence: flag > environment variable > `--config` file > built-in default. The YAML keys are the
//! flag names without the leading dashes (`user-key-file: /etc/osc/user-key`). [`AgentArgs`] is the raw,
//! all-optional form shared by clap and serde; [`Settings`] is the validated result the agent runs on.

mod duration;
mod paths;
mod secret;
mod size;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub use duration::HumanDuration;
pub use secret::{CredentialError, Secret, SecretSource};
pub use size::ByteSize;

/// A setting is invalid. The message is one line naming the flag, env var, file or key at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Format of a value that is not a string, in the one-file-per-key layout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueFormat {
    #[default]
    Json,
    Yaml,
}

/// Format of an aggregate output holding the whole environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Json,
    Yaml,
    Dotenv,
    Properties,
}

impl OutputFormat {
    /// The name used on the command line (`json`, `yaml`, `dotenv`, `properties`).
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Json => "json",
            OutputFormat::Yaml => "yaml",
            OutputFormat::Dotenv => "dotenv",
            OutputFormat::Properties => "properties",
        }
    }
}

impl FromStr for OutputFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <OutputFormat as clap::ValueEnum>::from_str(s, true)
            .map_err(|_| format!("unknown format '{s}': use json, yaml, dotenv or properties"))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// One aggregate output file: `--output PATH:FORMAT`, or `{path, format, in-place}` in YAML.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct OutputSpec {
    pub path: PathBuf,
    pub format: OutputFormat,
    /// Rewrite the existing file in place instead of rename (single-file bind mounts).
    #[serde(default)]
    pub in_place: bool,
}

impl FromStr for OutputSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, format) = s
            .rsplit_once(':')
            .filter(|(p, _)| !p.is_empty())
            .ok_or_else(|| format!("'{s}': expected PATH:FORMAT, e.g. /config/app.env:dotenv"))?;
        Ok(OutputSpec {
            path: PathBuf::from(path),
            format: format.parse().map_err(|e| format!("'{s}': {e}"))?,
            in_place: false,
        })
    }
}

/// One template: `--template SOURCE:DESTINATION`, or `{source, destination, in-place}` in YAML.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TemplateSpec {
    pub source: PathBuf,
    pub destination: PathBuf,
    #[serde(default)]
    pub in_place: bool,
}

impl FromStr for TemplateSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some((src, dst)) if !src.is_empty() && !dst.is_empty() => Ok(TemplateSpec {
                source: src.into(),
                destination: dst.into(),
                in_place: false,
            }),
            _ => Err(format!(
                "'{s}': expected SOURCE:DESTINATION, e.g. /templates/app.conf.j2:/config/app.conf"
            )),
        }
    }
}

/// A file mode written in octal: `0600`, `600` or `0o600` (quote it in YAML).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl FromStr for FileMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let digits = s.trim().trim_start_matches("0o");
        match u32::from_str_radix(digits, 8) {
            Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(FileMode(m)),
            _ => Err(format!(
                "'{s}' is not an octal file mode such as 0600 or 0640"
            )),
        }
    }
}

impl<'de> serde::Deserialize<'de> for FileMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Float(f64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            // YAML reads an unquoted 0600 as the number 600 (or 600.0): take its digits as octal.
            Raw::Number(n) => n.to_string(),
            Raw::Float(f) if f >= 0.0 && f.fract() == 0.0 && f < 1e6 => format!("{}", f as u64),
            Raw::Float(f) => f.to_string(),
            Raw::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Accept either the string form (`"path:json"`) or the mapping form in YAML lists.
fn string_or_struct<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: FromStr<Err = String> + serde::Deserialize<'de>,
{
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Item<T> {
        Text(String),
        Full(T),
    }
    let items = <Vec<Item<T>> as serde::Deserialize>::deserialize(d)?;
    items
        .into_iter()
        .map(|i| match i {
            Item::Text(s) => s.parse().map_err(serde::de::Error::custom),
            Item::Full(t) => Ok(t),
        })
        .collect()
}

fn bool_flag() -> clap::builder::BoolishValueParser {
    clap::builder::BoolishValueParser::new()
}

/// The agent's settings as given: every field optional, shared by the command line and the YAML file.
#[derive(clap::Args, serde::Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentArgs {
    /// YAML configuration file (keys are the flag names); flags and env vars override it.
    #[arg(long, env = "OSC_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Base URL of the OpenSecureConf server, e.g. https://osc.example:9000. Required, unless
    /// --from-backup renders a backup without a server.
    #[arg(long, env = "OSC_SERVER", value_name = "URL", help_heading = "Server")]
    pub server: Option<String>,
    /// Environment to sync (required).
    #[arg(
        long,
        env = "OSC_ENVIRONMENT",
        value_name = "NAME",
        help_heading = "Server"
    )]
    pub environment: Option<String>,
    /// Only sync keys matching one of these globs (repeatable, or comma-separated).
    #[arg(
        long,
        env = "OSC_INCLUDE",
        value_name = "GLOB",
        value_delimiter = ',',
        help_heading = "Server"
    )]
    #[serde(default)]
    pub include: Vec<String>,
    /// Skip keys matching any of these globs (repeatable, or comma-separated).
    #[arg(
        long,
        env = "OSC_EXCLUDE",
        value_name = "GLOB",
        value_delimiter = ',',
        help_heading = "Server"
    )]
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Only sync entries in these categories (filtered client-side; repeatable, or comma-separated).
    #[arg(
        long,
        env = "OSC_CATEGORY",
        value_name = "NAME",
        value_delimiter = ',',
        help_heading = "Server"
    )]
    #[serde(default)]
    pub category: Vec<String>,
    /// File holding the X-User-Key (the server derives the decryption key from it). Or set $OSC_USER_KEY.
    #[arg(
        long,
        env = "OSC_USER_KEY_FILE",
        value_name = "FILE",
        help_heading = "Credentials"
    )]
    pub user_key_file: Option<PathBuf>,
    /// File holding the X-API-Key, when the server runs in API-key mode. Or set $OSC_API_KEY.
    #[arg(
        long,
        env = "OSC_API_KEY_FILE",
        value_name = "FILE",
        help_heading = "Credentials"
    )]
    pub api_key_file: Option<PathBuf>,
    /// File holding a bearer token sent as `Authorization: Bearer` (e.g. for a proxy). Or set $OSC_TOKEN.
    #[arg(
        long,
        env = "OSC_TOKEN_FILE",
        value_name = "FILE",
        help_heading = "Credentials"
    )]
    pub token_file: Option<PathBuf>,
    /// PEM file with extra CA certificates to trust (a private CA).
    #[arg(
        long,
        env = "OSC_CA_FILE",
        value_name = "FILE",
        help_heading = "Credentials"
    )]
    pub ca_file: Option<PathBuf>,
    /// Do not verify the server's TLS certificate (self-signed dev servers only!).
    #[arg(long, env = "OSC_INSECURE_SKIP_TLS_VERIFY", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = bool_flag(), value_name = "BOOL", help_heading = "Credentials")]
    pub insecure_skip_tls_verify: Option<bool>,
    /// Timeout of one HTTP request [default: 10s].
    #[arg(
        long,
        env = "OSC_REQUEST_TIMEOUT",
        value_name = "DURATION",
        help_heading = "Server"
    )]
    pub request_timeout: Option<HumanDuration>,
    /// Retries of a failed request (connection errors and 5xx only) [default: 4].
    #[arg(
        long,
        env = "OSC_MAX_RETRIES",
        value_name = "N",
        help_heading = "Server"
    )]
    pub max_retries: Option<u32>,
    /// First retry delay; doubles each time, with jitter [default: 500ms].
    #[arg(
        long,
        env = "OSC_RETRY_INITIAL_DELAY",
        value_name = "DURATION",
        help_heading = "Server"
    )]
    pub retry_initial_delay: Option<HumanDuration>,
    /// Longest retry delay [default: 10s].
    #[arg(
        long,
        env = "OSC_RETRY_MAX_DELAY",
        value_name = "DURATION",
        help_heading = "Server"
    )]
    pub retry_max_delay: Option<HumanDuration>,
    /// Largest response body accepted from the server (a list of the whole environment), e.g. 16Mi;
    /// a bigger answer is an error and nothing is written [default: 16Mi].
    #[arg(
        long,
        env = "OSC_MAX_RESPONSE_SIZE",
        value_name = "SIZE",
        help_heading = "Server"
    )]
    pub max_response_size: Option<ByteSize>,

    /// Directory receiving one file per key (ConfigMap-volume layout, atomic `..data` swaps).
    #[arg(
        long,
        env = "OSC_OUTPUT_DIR",
        value_name = "DIR",
        help_heading = "Outputs"
    )]
    pub output_dir: Option<PathBuf>,
    /// How non-string values are written in --output-dir [default: json].
    #[arg(
        long,
        env = "OSC_VALUE_FORMAT",
        value_name = "FORMAT",
        help_heading = "Outputs"
    )]
    pub value_format: Option<ValueFormat>,
    /// Whole environment as one file: PATH:FORMAT with FORMAT json, yaml, dotenv or properties (repeatable).
    #[arg(
        long,
        env = "OSC_OUTPUT",
        value_name = "PATH:FORMAT",
        value_delimiter = ',',
        help_heading = "Outputs"
    )]
    #[serde(default, deserialize_with = "string_or_struct")]
    pub output: Vec<OutputSpec>,
    /// Render a minijinja template: SOURCE:DESTINATION (repeatable). Missing keys are errors.
    #[arg(
        long,
        env = "OSC_TEMPLATE",
        value_name = "SRC:DEST",
        value_delimiter = ',',
        help_heading = "Outputs"
    )]
    #[serde(default, deserialize_with = "string_or_struct")]
    pub template: Vec<TemplateSpec>,
    /// Mode of written files, octal [default: 0600].
    #[arg(
        long,
        env = "OSC_FILE_MODE",
        value_name = "MODE",
        help_heading = "Outputs"
    )]
    pub file_mode: Option<FileMode>,
    /// Owner uid of written files (needs CAP_CHOWN unless it is the agent's own).
    #[arg(long, env = "OSC_UID", value_name = "UID", help_heading = "Outputs")]
    pub uid: Option<u32>,
    /// Owner gid of written files.
    #[arg(long, env = "OSC_GID", value_name = "GID", help_heading = "Outputs")]
    pub gid: Option<u32>,
    /// Rewrite --output/--template files in place instead of renaming over them (for single-file bind
    /// mounts, where rename fails). Readers may see a partly written file: use only when needed.
    #[arg(long, env = "OSC_IN_PLACE", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = bool_flag(), value_name = "BOOL", help_heading = "Outputs")]
    pub in_place: Option<bool>,

    /// Admin server address for /healthz, /readyz, /metrics, /status and POST /sync; `off` disables it
    /// [default: 0.0.0.0:8081].
    #[arg(
        long,
        env = "OSC_ADMIN_ADDR",
        value_name = "ADDR",
        help_heading = "Live sync"
    )]
    pub admin_addr: Option<String>,
    /// Quiet period after a change event before reconciling [default: 250ms].
    #[arg(
        long,
        env = "OSC_WAIT_MIN",
        value_name = "DURATION",
        help_heading = "Live sync"
    )]
    pub wait_min: Option<HumanDuration>,
    /// Longest delay of a reconcile while change events keep coming [default: 2s].
    #[arg(
        long,
        env = "OSC_WAIT_MAX",
        value_name = "DURATION",
        help_heading = "Live sync"
    )]
    pub wait_max: Option<HumanDuration>,
    /// Full reconcile at this interval (±10% jitter) even without events: the safety net for a lossy
    /// stream [default: 5m].
    #[arg(
        long,
        env = "OSC_RESYNC_INTERVAL",
        value_name = "DURATION",
        help_heading = "Live sync"
    )]
    pub resync_interval: Option<HumanDuration>,
    /// /healthz fails when the stream is down and the last successful sync is older than this
    /// [default: 10m].
    #[arg(
        long,
        env = "OSC_STALE_AFTER",
        value_name = "DURATION",
        help_heading = "Live sync"
    )]
    pub stale_after: Option<HumanDuration>,
    /// A silent event stream is considered dead after this long (the server comments every 15 s)
    /// [default: 45s].
    #[arg(
        long,
        env = "OSC_STREAM_READ_TIMEOUT",
        value_name = "DURATION",
        help_heading = "Live sync"
    )]
    pub stream_read_timeout: Option<HumanDuration>,
    /// First reconnect delay of the event stream [default: 1s].
    #[arg(
        long,
        env = "OSC_RECONNECT_INITIAL_DELAY",
        value_name = "DURATION",
        help_heading = "Live sync"
    )]
    pub reconnect_initial_delay: Option<HumanDuration>,
    /// Growth factor of the reconnect delay [default: 2].
    #[arg(
        long,
        env = "OSC_RECONNECT_MULTIPLIER",
        value_name = "FACTOR",
        help_heading = "Live sync"
    )]
    pub reconnect_multiplier: Option<f64>,
    /// Longest reconnect delay [default: 60s].
    #[arg(
        long,
        env = "OSC_RECONNECT_MAX_DELAY",
        value_name = "DURATION",
        help_heading = "Live sync"
    )]
    pub reconnect_max_delay: Option<HumanDuration>,
    /// Consecutive failed connection attempts before the stream gives up (then /healthz fails once the
    /// data is stale); -1 = never [default: -1].
    #[arg(
        long,
        env = "OSC_RECONNECT_MAX_ATTEMPTS",
        value_name = "N",
        allow_negative_numbers = true,
        help_heading = "Live sync"
    )]
    pub reconnect_max_attempts: Option<i64>,
    /// Restore managed files edited or deleted by someone else [default: true].
    #[arg(long, env = "OSC_DRIFT_REPAIR", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = bool_flag(), value_name = "BOOL", help_heading = "Live sync")]
    pub drift_repair: Option<bool>,
    /// Least time between two on-demand reconciles (`POST /sync`, SIGHUP); requests meanwhile are
    /// coalesced into the next one [default: 5s].
    #[arg(
        long,
        env = "OSC_SYNC_MIN_INTERVAL",
        value_name = "DURATION",
        help_heading = "Live sync"
    )]
    pub sync_min_interval: Option<HumanDuration>,
    /// Poll the server's entry metadata (`GET /cluster/configs`: no user key, no decryption) this often
    /// to notice writes the event stream missed (±10% jitter; `0` disables) [default: 2s].
    #[arg(
        long,
        env = "OSC_CHANGE_POLL_INTERVAL",
        value_name = "DURATION",
        help_heading = "Live sync"
    )]
    pub change_poll_interval: Option<HumanDuration>,
    /// Longest metadata poll interval: while the stream has announced every change the poll found, the
    /// interval doubles up to this [default: 30s].
    #[arg(
        long,
        env = "OSC_CHANGE_POLL_MAX",
        value_name = "DURATION",
        help_heading = "Live sync"
    )]
    pub change_poll_max: Option<HumanDuration>,

    /// File holding the password of --fallback-backup / --from-backup. Or set $OSC_BACKUP_PASSWORD.
    #[arg(
        long,
        env = "OSC_BACKUP_PASSWORD_FILE",
        value_name = "FILE",
        help_heading = "Backups"
    )]
    pub backup_password_file: Option<PathBuf>,
    /// Encrypted OpenSecureConf backup (`POST /backup` output) rendered when the server cannot be
    /// reached at start and no earlier files exist; replaced by the server's state on the first sync.
    #[arg(
        long,
        env = "OSC_FALLBACK_BACKUP",
        value_name = "FILE",
        help_heading = "Backups"
    )]
    pub fallback_backup: Option<PathBuf>,
    /// Render an encrypted backup instead of reading a server (disaster recovery; needs --once).
    #[arg(
        long,
        env = "OSC_FROM_BACKUP",
        value_name = "FILE",
        help_heading = "Backups"
    )]
    pub from_backup: Option<PathBuf>,
    /// Report ready while serving stale files (from a backup, or left by an earlier run while the
    /// server is down) [default: true].
    #[arg(long, env = "OSC_READY_WHEN_STALE", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = bool_flag(), value_name = "BOOL", help_heading = "Backups")]
    pub ready_when_stale: Option<bool>,

    /// Apply the rendered entries to this ConfigMap (server-side apply, field manager `osc-agent`).
    #[arg(
        long,
        env = "OSC_CONFIGMAP",
        value_name = "NAME",
        help_heading = "Kubernetes"
    )]
    pub configmap: Option<String>,
    /// Apply the rendered entries to this Secret (prefer it over a ConfigMap for anything sensitive).
    #[arg(
        long,
        env = "OSC_SECRET",
        value_name = "NAME",
        help_heading = "Kubernetes"
    )]
    pub secret: Option<String>,
    /// Namespace of --configmap/--secret [default: the pod's, else the kubeconfig's].
    #[arg(
        long,
        env = "OSC_NAMESPACE",
        value_name = "NS",
        help_heading = "Kubernetes"
    )]
    pub namespace: Option<String>,
    /// Take over fields another field manager owns instead of reporting the conflict.
    #[arg(long, env = "OSC_FORCE_CONFLICTS", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = bool_flag(), value_name = "BOOL", help_heading = "Kubernetes")]
    pub force_conflicts: Option<bool>,
    /// Make the pod's owner (Deployment, StatefulSet, DaemonSet) own --configmap/--secret, so they are
    /// deleted with it.
    #[arg(long, env = "OSC_OWNER_REFERENCE", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = bool_flag(), value_name = "BOOL", help_heading = "Kubernetes")]
    pub owner_reference: Option<bool>,
    /// This pod's name (downward API), for environment discovery, owner lookup and rollout-restart.
    #[arg(
        long,
        env = "POD_NAME",
        value_name = "NAME",
        help_heading = "Kubernetes"
    )]
    pub pod_name: Option<String>,
    /// This pod's namespace (downward API).
    #[arg(
        long,
        env = "POD_NAMESPACE",
        value_name = "NS",
        help_heading = "Kubernetes"
    )]
    pub pod_namespace: Option<String>,

    /// Tell the app when content changed: TYPE[:key=value,...] with TYPE signal, restart-container,
    /// http, exec or rollout-restart (repeatable; `;`-separated in the env var).
    #[arg(
        long,
        env = "OSC_ACTION",
        value_name = "SPEC",
        value_delimiter = ';',
        help_heading = "Actions"
    )]
    #[serde(default, deserialize_with = "string_or_struct")]
    pub action: Vec<crate::action::ActionSpec>,
    /// Also act after the first sync of a fresh start (by default the app reads its first files itself).
    #[arg(long, env = "OSC_ACT_ON_START", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = bool_flag(), value_name = "BOOL", help_heading = "Actions")]
    pub act_on_start: Option<bool>,
    /// Least time between two actions; changes meanwhile are coalesced into one [default: 5s].
    #[arg(
        long,
        env = "OSC_ACTION_COOLDOWN",
        value_name = "DURATION",
        help_heading = "Actions"
    )]
    pub action_cooldown: Option<HumanDuration>,
    /// Restart-loop breaker: stop acting after this many actions within --action-window [default: 5].
    #[arg(
        long,
        env = "OSC_MAX_ACTIONS",
        value_name = "N",
        help_heading = "Actions"
    )]
    pub max_actions: Option<u32>,
    /// Window of the restart-loop breaker [default: 10m].
    #[arg(
        long,
        env = "OSC_ACTION_WINDOW",
        value_name = "DURATION",
        help_heading = "Actions"
    )]
    pub action_window: Option<HumanDuration>,

    /// Sync once and exit (init containers, CI, local runs).
    #[arg(long, env = "OSC_ONCE", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = bool_flag(), value_name = "BOOL", help_heading = "Run")]
    pub once: Option<bool>,
    /// Accept an environment with no entry (after filters): write empty outputs. Without it, --once fails
    /// with exit 7 and the live loop keeps the files it has.
    #[arg(long, env = "OSC_ALLOW_EMPTY", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = bool_flag(), value_name = "BOOL", help_heading = "Run")]
    pub allow_empty: Option<bool>,
    /// Log format [default: text].
    #[arg(
        long,
        env = "OSC_LOG_FORMAT",
        value_name = "FORMAT",
        help_heading = "Run"
    )]
    pub log_format: Option<LogFormat>,
}

macro_rules! merge_fields {
    ($hi:ident, $lo:ident; opt: $($o:ident),*; vec: $($v:ident),*) => {
        AgentArgs {
            config: $hi.config,
            $($o: $hi.$o.or($lo.$o),)*
            $($v: if $hi.$v.is_empty() { $lo.$v } else { $hi.$v },)*
        }
    };
}

impl AgentArgs {
    /// `self` (flags and env vars) over `file`.
    pub fn over(self, file: AgentArgs) -> AgentArgs {
        let hi = self;
        let lo = file;
        merge_fields!(hi, lo;
            opt: server, environment, user_key_file, api_key_file, token_file, ca_file,
                 insecure_skip_tls_verify, request_timeout, max_retries, retry_initial_delay,
                 retry_max_delay, output_dir, value_format, file_mode, uid, gid, in_place, once, log_format,
                 admin_addr, wait_min, wait_max, resync_interval, stale_after, stream_read_timeout,
                 reconnect_initial_delay, reconnect_multiplier, reconnect_max_delay, reconnect_max_attempts,
                 drift_repair, backup_password_file, fallback_backup, from_backup, ready_when_stale,
                 configmap, secret, namespace, force_conflicts, owner_reference, pod_name, pod_namespace,
                 act_on_start, action_cooldown, max_actions, action_window, max_response_size,
                 sync_min_interval, allow_empty, change_poll_interval, change_poll_max;
            vec: include, exclude, category, output, template, action)
    }

    /// Load the `--config` file, if any, and merge these arguments over it.
    pub fn with_config_file(self) -> Result<AgentArgs, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let file = load_yaml_file(&path)?;
        Ok(self.over(file))
    }
}

fn load_yaml_file(path: &Path) -> Result<AgentArgs, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(format!(
            "--config '{}': cannot read: {}",
            path.display(),
            crate::util::io_reason(&e)
        ))
    })?;
    if text.trim().is_empty() {
        return Ok(AgentArgs::default());
    }
    // No source snippet in errors: the lines around a typo may hold a token (e.g. an http header).
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    serde_saphyr::from_str_with_options(&text, options).map_err(|e| {
        ConfigError(format!(
            "--config '{}': {}",
            path.display(),
            one_line(&e.to_string())
        ))
    })
}

/// Collapse a multi-line parser message into one line.
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// How a setting is named everywhere: `--flag` / `$OSC_FLAG` / `flag:` in the config file.
pub fn setting(flag: &str) -> String {
    let env = format!("OSC_{}", flag.replace('-', "_").to_uppercase());
    format!("--{flag} (${env}, or `{flag}:` in --config)")
}

/// Retry policy for one REST request.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
}

/// Which entries of the environment are synced.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub categories: Vec<String>,
}

/// The credentials sent with each request.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub user_key: SecretSource,
    pub api_key: Option<SecretSource>,
    pub token: Option<SecretSource>,
}

/// Ownership and mode of written files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileOptions {
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Where rendered content goes.
#[derive(Clone, Debug)]
pub struct Outputs {
    pub dir: Option<PathBuf>,
    pub value_format: ValueFormat,
    pub files: Vec<OutputSpec>,
    pub templates: Vec<TemplateSpec>,
    pub file: FileOptions,
}

/// Settings of the long-running mode.
#[derive(Clone, Debug)]
pub struct Live {
    /// `None` when the admin server is off.
    pub admin_addr: Option<std::net::SocketAddr>,
    pub wait_min: Duration,
    pub wait_max: Duration,
    pub resync_interval: Duration,
    pub stale_after: Duration,
    pub stream_read_timeout: Duration,
    pub reconnect_initial_delay: Duration,
    pub reconnect_multiplier: f64,
    pub reconnect_max_delay: Duration,
    pub reconnect_max_attempts: i64,
    pub drift_repair: bool,
    /// Least time between two on-demand reconciles (`POST /sync`, SIGHUP).
    pub sync_min_interval: Duration,
    /// Shortest metadata poll interval (`--change-poll-interval`); `None`: no change detector.
    pub change_poll_interval: Option<Duration>,
    /// Longest metadata poll interval (`--change-poll-max`).
    pub change_poll_max: Duration,
    /// The periodic resync interval while the change detector works: `--resync-interval` when set,
    /// else 30 minutes (the detector notices every write; the resync is only the last net).
    pub resync_interval_detected: Duration,
}

/// An encrypted backup file and its password.
#[derive(Clone, Debug)]
pub struct BackupFile {
    pub path: PathBuf,
    pub password: SecretSource,
}

/// How to reach the OpenSecureConf server.
#[derive(Clone, Debug)]
pub struct Server {
    pub url: reqwest::Url,
    pub credentials: Credentials,
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_tls_verify: bool,
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
    /// Largest response body accepted, in bytes.
    pub max_response_size: u64,
    /// Rendered when the server is unreachable at start and no earlier files exist.
    pub fallback: Option<BackupFile>,
}

/// Where entries come from.
#[derive(Clone, Debug)]
pub enum Source {
    Server(Box<Server>),
    /// `--from-backup`: no server at all.
    Backup(BackupFile),
}

/// The pod this agent runs in (downward API), when known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub name: String,
    pub namespace: String,
}

/// ConfigMap/Secret outputs.
#[derive(Clone, Debug, Default)]
pub struct KubeObjects {
    pub configmap: Option<String>,
    pub secret: Option<String>,
    pub namespace: Option<String>,
    pub force_conflicts: bool,
    pub owner_reference: bool,
}

impl KubeObjects {
    pub fn any(&self) -> bool {
        self.configmap.is_some() || self.secret.is_some()
    }
}

/// Actions and their safety settings.
#[derive(Clone, Debug)]
pub struct Actions {
    pub specs: Vec<crate::action::ActionSpec>,
    pub act_on_start: bool,
    pub cooldown: Duration,
    pub max_actions: u32,
    pub window: Duration,
}

/// Validated settings of an agent run.
#[derive(Clone, Debug)]
pub struct Settings {
    pub source: Source,
    pub environment: String,
    pub selection: Selection,
    pub outputs: Outputs,
    pub objects: KubeObjects,
    pub actions: Actions,
    pub pod: Option<PodRef>,
    pub once: bool,
    /// An environment with no selected entry may replace non-empty outputs (`--allow-empty`).
    pub allow_empty: bool,
    pub ready_when_stale: bool,
    pub live: Live,
    pub log_format: LogFormat,
}

impl Settings {
    pub fn server(&self) -> Option<&Server> {
        match &self.source {
            Source::Server(s) => Some(s),
            Source::Backup(_) => None,
        }
    }
}

fn env_secret(var: &'static str) -> Option<SecretSource> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(SecretSource::Env {
            var,
            value: Secret::new(v),
        }),
        _ => None,
    }
}

impl Settings {
    /// Validate merged arguments. Credentials are read once here so a missing or short key fails at start.
    pub fn from_args(a: AgentArgs) -> Result<Settings, ConfigError> {
        Settings::validate(a, Files::Read)
    }

    /// Validate merged arguments; with [`Files::Skip`], credential, CA and backup files are not read
    /// (`osc-agent check --skip-files`, for arguments rendered for another machine).
    pub fn validate(a: AgentArgs, reads: Files) -> Result<Settings, ConfigError> {
        let environment = a.environment.as_deref().map(str::trim).unwrap_or_default();
        if environment.is_empty() {
            return Err(ConfigError(format!(
                "{} is required and must not be empty",
                setting("environment")
            )));
        }
        if environment.chars().count() > 100 {
            return Err(ConfigError(format!(
                "{}: longer than 100 characters",
                setting("environment")
            )));
        }

        let source = match &a.from_backup {
            Some(path) => {
                if a.once != Some(true) {
                    return Err(ConfigError(format!(
                        "{} renders a backup once and exits: add --once",
                        setting("from-backup")
                    )));
                }
                if a.fallback_backup.is_some() {
                    return Err(ConfigError(
                        "--from-backup and --fallback-backup exclude each other".into(),
                    ));
                }
                Source::Backup(backup_file(&a, path, "from-backup", reads)?)
            }
            None => Source::Server(Box::new(server_settings(&a, reads)?)),
        };

        if a.output_dir.is_none()
            && a.output.is_empty()
            && a.template.is_empty()
            && a.configmap.is_none()
            && a.secret.is_none()
        {
            return Err(ConfigError(format!(
                "no output configured: set {}, --output PATH:FORMAT, --template SRC:DEST, --configmap or --secret",
                setting("output-dir")
            )));
        }
        let objects = kube_objects(&a)?;
        let actions = action_settings(&a)?;
        let pod = match (&a.pod_name, &a.pod_namespace) {
            (Some(name), Some(namespace)) if !name.is_empty() && !namespace.is_empty() => {
                Some(PodRef {
                    name: name.clone(),
                    namespace: namespace.clone(),
                })
            }
            _ => None,
        };
        if pod.is_none()
            && (a.owner_reference == Some(true)
                || actions.specs.iter().any(|s| s.kind() == "rollout-restart"))
        {
            return Err(ConfigError(
                "--owner-reference and the rollout-restart action need the pod's identity: set POD_NAME and \
                 POD_NAMESPACE from the downward API (or --pod-name/--pod-namespace)"
                    .into(),
            ));
        }
        let live = live_settings(&a)?;
        paths::check(&a, &a.output, &a.template)?;
        let in_place = a.in_place.unwrap_or(false);
        let mut files = a.output;
        let mut templates = a.template;
        for f in &mut files {
            f.in_place |= in_place;
        }
        for t in &mut templates {
            t.in_place |= in_place;
        }
        for t in &templates {
            if reads == Files::Read && !t.source.is_file() {
                return Err(ConfigError(format!(
                    "--template: source '{}' is not a readable file",
                    t.source.display()
                )));
            }
        }

        Ok(Settings {
            live,
            source,
            objects,
            actions,
            pod,
            environment: environment.to_owned(),
            selection: Selection {
                include: a.include,
                exclude: a.exclude,
                categories: a.category,
            },
            ready_when_stale: a.ready_when_stale.unwrap_or(true),
            outputs: Outputs {
                dir: a.output_dir,
                value_format: a.value_format.unwrap_or_default(),
                files,
                templates,
                file: FileOptions {
                    mode: a.file_mode.map_or(0o600, |m| m.0),
                    uid: a.uid,
                    gid: a.gid,
                },
            },
            once: a.once.unwrap_or(false),
            allow_empty: a.allow_empty.unwrap_or(false),
            log_format: a.log_format.unwrap_or_default(),
        })
    }
}

/// Whether validation reads the files settings point to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Files {
    Read,
    Skip,
}

fn server_settings(a: &AgentArgs, files: Files) -> Result<Server, ConfigError> {
    let url = a
        .server
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ConfigError(format!("{} is required", setting("server"))))?;
    let url = reqwest::Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
        .ok_or_else(|| {
            ConfigError(format!(
                "{}: '{url}' is not an http:// or https:// URL",
                setting("server")
            ))
        })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError(format!(
            "{}: credentials in the URL are not accepted (they would show in logs); use --token-file or \
             --api-key-file",
            setting("server")
        )));
    }
    let user_key = match (&a.user_key_file, env_secret("OSC_USER_KEY")) {
        (Some(path), _) => SecretSource::File {
            path: path.clone(),
            flag: "--user-key-file",
        },
        (None, Some(env)) => env,
        (None, None) => {
            return Err(ConfigError(format!(
                "no user key: set {} or $OSC_USER_KEY",
                setting("user-key-file")
            )));
        }
    };
    if files == Files::Read {
        user_key
            .read_user_key()
            .map_err(|e| ConfigError(e.to_string()))?;
    }
    let api_key = match &a.api_key_file {
        Some(path) => Some(SecretSource::File {
            path: path.clone(),
            flag: "--api-key-file",
        }),
        None => env_secret("OSC_API_KEY"),
    };
    let token = match &a.token_file {
        Some(path) => Some(SecretSource::File {
            path: path.clone(),
            flag: "--token-file",
        }),
        None => env_secret("OSC_TOKEN"),
    };
    for src in api_key.iter().chain(token.iter()) {
        if files == Files::Read {
            src.read().map_err(|e| ConfigError(e.to_string()))?;
        }
    }

    if let Some(ca) = &a.ca_file
        && files == Files::Read
        && !ca.is_file()
    {
        return Err(ConfigError(format!(
            "{}: '{}' is not a readable file",
            setting("ca-file"),
            ca.display()
        )));
    }

    let request_timeout = a.request_timeout.map_or(Duration::from_secs(10), |d| d.0);
    if request_timeout.is_zero() {
        return Err(ConfigError(format!(
            "{} must be above 0",
            setting("request-timeout")
        )));
    }
    let max_response_size = a.max_response_size.map_or(16 << 20, |s| s.0);
    if max_response_size < 1024 {
        return Err(ConfigError(format!(
            "{} must be at least 1Ki",
            setting("max-response-size")
        )));
    }
    let fallback = match &a.fallback_backup {
        Some(path) => Some(backup_file(a, path, "fallback-backup", files)?),
        None => None,
    };
    Ok(Server {
        url,
        credentials: Credentials {
            user_key,
            api_key,
            token,
        },
        ca_file: a.ca_file.clone(),
        insecure_skip_tls_verify: a.insecure_skip_tls_verify.unwrap_or(false),
        request_timeout,
        retry: RetryPolicy {
            max_retries: a.max_retries.unwrap_or(4),
            initial_delay: a
                .retry_initial_delay
                .map_or(Duration::from_millis(500), |d| d.0),
            max_delay: a.retry_max_delay.map_or(Duration::from_secs(10), |d| d.0),
        },
        max_response_size,
        fallback,
    })
}

/// A backup file named by `flag`, with its password (checked readable now).
fn backup_file(
    a: &AgentArgs,
    path: &Path,
    flag: &str,
    files: Files,
) -> Result<BackupFile, ConfigError> {
    if files == Files::Read && !path.is_file() {
        return Err(ConfigError(format!(
            "{}: '{}' is not a readable file",
            setting(flag),
            path.display()
        )));
    }
    let password = match (&a.backup_password_file, env_secret("OSC_BACKUP_PASSWORD")) {
        (Some(p), _) => SecretSource::File {
            path: p.clone(),
            flag: "--backup-password-file",
        },
        (None, Some(env)) => env,
        (None, None) => {
            return Err(ConfigError(format!(
                "--{flag} needs the backup password: set {} or $OSC_BACKUP_PASSWORD",
                setting("backup-password-file")
            )));
        }
    };
    if files == Files::Read {
        password.read().map_err(|e| ConfigError(e.to_string()))?;
    }
    Ok(BackupFile {
        path: path.to_owned(),
        password,
    })
}

/// A Kubernetes object name (RFC 1123 subdomain).
fn check_object_name(flag: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ConfigError(format!(
            "{}: '{name}' is not a valid Kubernetes name (lower-case letters, digits, '-' and '.')",
            setting(flag)
        )))
    }
}

fn kube_objects(a: &AgentArgs) -> Result<KubeObjects, ConfigError> {
    for (flag, name) in [
        ("configmap", &a.configmap),
        ("secret", &a.secret),
        ("namespace", &a.namespace),
    ] {
        if let Some(n) = name {
            check_object_name(flag, n)?;
        }
    }
    Ok(KubeObjects {
        configmap: a.configmap.clone(),
        secret: a.secret.clone(),
        namespace: a.namespace.clone(),
        force_conflicts: a.force_conflicts.unwrap_or(false),
        owner_reference: a.owner_reference.unwrap_or(false),
    })
}

fn action_settings(a: &AgentArgs) -> Result<Actions, ConfigError> {
    for spec in &a.action {
        spec.validate()
            .map_err(|e| ConfigError(format!("{}: {e}", setting("action"))))?;
    }
    let actions = Actions {
        specs: a.action.clone(),
        act_on_start: a.act_on_start.unwrap_or(false),
        cooldown: a.action_cooldown.map_or(Duration::from_secs(5), |d| d.0),
        max_actions: a.max_actions.unwrap_or(5),
        window: a.action_window.map_or(Duration::from_secs(600), |d| d.0),
    };
    if actions.max_actions == 0 {
        return Err(ConfigError(format!(
            "{} must be at least 1",
            setting("max-actions")
        )));
    }
    Ok(actions)
}

/// Shortest `--change-poll-interval` accepted (other than 0, off).
pub const MIN_CHANGE_POLL_INTERVAL: Duration = Duration::from_millis(100);

fn live_settings(a: &AgentArgs) -> Result<Live, ConfigError> {
    let d = |v: Option<HumanDuration>, default: Duration| v.map_or(default, |d| d.0);
    let admin_addr = match a.admin_addr.as_deref().map(str::trim) {
        Some("off") | Some("") => None,
        other => Some(other.unwrap_or("0.0.0.0:8081").parse().map_err(|_| {
            ConfigError(format!(
                "{}: '{}' is not an address like 0.0.0.0:8081 (or 'off')",
                setting("admin-addr"),
                other.unwrap_or_default()
            ))
        })?),
    };
    let live = Live {
        admin_addr,
        wait_min: d(a.wait_min, Duration::from_millis(250)),
        wait_max: d(a.wait_max, Duration::from_secs(2)),
        resync_interval: d(a.resync_interval, Duration::from_secs(300)),
        stale_after: d(a.stale_after, Duration::from_secs(600)),
        stream_read_timeout: d(a.stream_read_timeout, Duration::from_secs(45)),
        reconnect_initial_delay: d(a.reconnect_initial_delay, Duration::from_secs(1)),
        reconnect_multiplier: a.reconnect_multiplier.unwrap_or(2.0),
        reconnect_max_delay: d(a.reconnect_max_delay, Duration::from_secs(60)),
        reconnect_max_attempts: a.reconnect_max_attempts.unwrap_or(-1),
        drift_repair: a.drift_repair.unwrap_or(true),
        sync_min_interval: d(a.sync_min_interval, Duration::from_secs(5)),
        change_poll_interval: Some(d(a.change_poll_interval, Duration::from_secs(2)))
            .filter(|d| !d.is_zero()),
        // A lone --change-poll-interval above 30 s is its own maximum.
        change_poll_max: d(
            a.change_poll_max,
            Duration::from_secs(30).max(d(a.change_poll_interval, Duration::ZERO)),
        ),
        resync_interval_detected: d(a.resync_interval, Duration::from_secs(30 * 60)),
    };
    if live
        .change_poll_interval
        .is_some_and(|d| d < MIN_CHANGE_POLL_INTERVAL)
    {
        return Err(ConfigError(format!(
            "{} must be 0 (off) or at least {} ms: every poll is a request to the server",
            setting("change-poll-interval"),
            MIN_CHANGE_POLL_INTERVAL.as_millis()
        )));
    }
    if let Some(min) = live.change_poll_interval
        && live.change_poll_max < min
    {
        return Err(ConfigError(format!(
            "{} must not be shorter than --change-poll-interval",
            setting("change-poll-max")
        )));
    }
    if live.wait_max < live.wait_min {
        return Err(ConfigError(format!(
            "{} must not be shorter than --wait-min",
            setting("wait-max")
        )));
    }
    for (flag, v) in [
        ("resync-interval", live.resync_interval),
        ("stale-after", live.stale_after),
        ("stream-read-timeout", live.stream_read_timeout),
    ] {
        if v.is_zero() {
            return Err(ConfigError(format!("{} must be above 0", setting(flag))));
        }
    }
    if !(1.0..=10.0).contains(&live.reconnect_multiplier) {
        return Err(ConfigError(format!(
            "{} must be between 1 and 10",
            setting("reconnect-multiplier")
        )));
    }
    Ok(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_template_specs_parse() {
        let o: OutputSpec = "/etc/app/c:d.env:dotenv".parse().unwrap();
        assert_eq!(o.path, PathBuf::from("/etc/app/c:d.env"));
        assert_eq!(o.format, OutputFormat::Dotenv);
        assert!(
            "/x:toml"
                .parse::<OutputSpec>()
                .unwrap_err()
                .contains("unknown format")
        );
        assert!("json".parse::<OutputSpec>().is_err());
        let t: TemplateSpec = "a.j2:/out/a.conf".parse().unwrap();
        assert_eq!(t.destination, PathBuf::from("/out/a.conf"));
        assert!("a.j2".parse::<TemplateSpec>().is_err());
    }

    #[test]
    fn file_modes() {
        assert_eq!("0600".parse::<FileMode>(), Ok(FileMode(0o600)));
        assert_eq!("0o640".parse::<FileMode>(), Ok(FileMode(0o640)));
        assert!("0800".parse::<FileMode>().is_err());
        assert!("7777".parse::<FileMode>().is_err());
    }

    #[test]
    fn yaml_file_parses_and_flags_win() {
        let yaml = r#"
server: http://file:1
environment: from-file
include: ["db.*"]
output:
  - /tmp/a.json:json
  - path: /tmp/b.env
    format: dotenv
    in-place: true
file-mode: 0640
request-timeout: 3s
"#;
        let file: AgentArgs = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(file.output.len(), 2);
        assert!(file.output[1].in_place);
        assert_eq!(file.file_mode, Some(FileMode(0o640)));
        let cli = AgentArgs {
            environment: Some("from-flag".into()),
            ..Default::default()
        };
        let merged = cli.over(file);
        assert_eq!(merged.environment.as_deref(), Some("from-flag"));
        assert_eq!(merged.server.as_deref(), Some("http://file:1"));
        assert_eq!(merged.include, vec!["db.*".to_string()]);
    }

    #[test]
    fn unknown_yaml_key_is_named() {
        let err = serde_saphyr::from_str::<AgentArgs>("enviroment: x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("enviroment"), "{err}");
    }
}
