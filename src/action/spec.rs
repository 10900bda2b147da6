//! What an action is, as configured: `--action TYPE[:key=value,...]` or a list under `action:` in YAML.
//!
//! ```yaml
//! action:
//!   - signal: {process: nginx, signal: HUP}
//!   - restart-container: {cmdline: "java .*app.jar", grace: 20s}
//!   - http: {url: "http://127.0.0.1:8080/-/reload", method: POST, expect-status: 200, retries: 3}
//!   - exec: {command: ["/usr/local/bin/reload.sh", "--graceful"], timeout: 30s}
//!   - rollout-restart: {}
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use crate::config::HumanDuration;

/// Which processes (in the pod's shared PID namespace) an action targets. Exactly one field is set.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ProcessTarget {
    /// Executable name (`/proc/PID/comm`, or the base name of the executable or of argv[0]).
    pub process: Option<String>,
    /// Regular expression matched against the command line (arguments joined by spaces).
    pub cmdline: Option<String>,
    /// File holding the PID.
    pub pidfile: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SignalSpec {
    pub process: Option<String>,
    pub cmdline: Option<String>,
    pub pidfile: Option<PathBuf>,
    /// Signal name (`HUP`, `SIGUSR1`, ...) [default: HUP].
    pub signal: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RestartSpec {
    pub process: Option<String>,
    pub cmdline: Option<String>,
    pub pidfile: Option<PathBuf>,
    /// Time between SIGTERM and SIGKILL [default: 10s].
    pub grace: Option<HumanDuration>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HttpSpec {
    pub url: String,
    /// [default: POST]
    pub method: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Required status; any 2xx when unset.
    #[serde(default, deserialize_with = "de_opt_number")]
    pub expect_status: Option<u16>,
    /// Per attempt [default: 5s].
    pub timeout: Option<HumanDuration>,
    /// Retries after a failed attempt, with backoff [default: 3].
    #[serde(default, deserialize_with = "de_opt_number")]
    pub retries: Option<u32>,
}

/// A command: a list of arguments, or one string split on whitespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandLine(pub Vec<String>);

impl<'de> serde::Deserialize<'de> for CommandLine {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            List(Vec<String>),
            Line(String),
        }
        let args = match Raw::deserialize(d)? {
            Raw::List(v) => v,
            Raw::Line(s) => s.split_whitespace().map(str::to_owned).collect(),
        };
        if args.is_empty() {
            return Err(serde::de::Error::custom("the command is empty"));
        }
        Ok(CommandLine(args))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ExecSpec {
    pub command: CommandLine,
    /// [default: 30s]
    pub timeout: Option<HumanDuration>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RolloutSpec {}

/// One configured action.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum ActionSpec {
    Signal(SignalSpec),
    RestartContainer(RestartSpec),
    Http(HttpSpec),
    Exec(ExecSpec),
    RolloutRestart(RolloutSpec),
}

impl ActionSpec {
    /// Label for metrics and logs: `signal`, `restart-container`, `http`, `exec`, `rollout-restart`.
    pub fn kind(&self) -> &'static str {
        match self {
            ActionSpec::Signal(_) => "signal",
            ActionSpec::RestartContainer(_) => "restart-container",
            ActionSpec::Http(_) => "http",
            ActionSpec::Exec(_) => "exec",
            ActionSpec::RolloutRestart(_) => "rollout-restart",
        }
    }

    /// The process target of `signal` and `restart-container`.
    pub fn target(&self) -> Option<ProcessTarget> {
        let (process, cmdline, pidfile) = match self {
            ActionSpec::Signal(s) => (&s.process, &s.cmdline, &s.pidfile),
            ActionSpec::RestartContainer(r) => (&r.process, &r.cmdline, &r.pidfile),
            _ => return None,
        };
        Some(ProcessTarget {
            process: process.clone(),
            cmdline: cmdline.clone(),
            pidfile: pidfile.clone(),
        })
    }

    /// Checks that cannot be expressed in the types (exactly one process selector, a valid regex, a
    /// known signal, an http(s) URL).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = self.target() {
            let set = [
                t.process.is_some(),
                t.cmdline.is_some(),
                t.pidfile.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if set != 1 {
                return Err(format!(
                    "{}: set exactly one of process=, cmdline= or pidfile=",
                    self.kind()
                ));
            }
            if let Some(re) = &t.cmdline {
                regex::Regex::new(re)
                    .map_err(|e| format!("{}: bad cmdline regex: {e}", self.kind()))?;
            }
        }
        match self {
            ActionSpec::Signal(s) => {
                let name = s.signal.as_deref().unwrap_or("HUP");
                super::process::parse_signal(name).map_err(|e| format!("signal: {e}"))?;
            }
            ActionSpec::Http(h) => {
                let url = reqwest::Url::parse(&h.url)
                    .map_err(|_| format!("http: '{}' is not a URL", h.url))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(format!("http: '{}' is not an http(s) URL", h.url));
                }
                if let Some(m) = &h.method {
                    reqwest::Method::from_str(&m.to_uppercase())
                        .map_err(|_| format!("http: bad method '{m}'"))?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl FromStr for ActionSpec {
    type Err = String;

    /// `TYPE[:key=value,key=value]`, e.g. `signal:process=nginx,signal=HUP`,
    /// `http:url=http://127.0.0.1:8080/-/reload`, `exec:command=/bin/reload --now`, `rollout-restart`.
    /// Use the YAML form for values containing commas, or for HTTP headers.
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        let mut fields = serde_json::Map::new();
        for pair in rest.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("'{s}': expected key=value, found '{pair}'"))?;
            fields.insert(
                k.trim().to_owned(),
                serde_json::Value::String(v.trim().to_owned()),
            );
        }
        let doc = serde_json::json!({ kind.trim(): fields });
        let spec: ActionSpec = serde_json::from_value(doc).map_err(|e| format!("'{s}': {e}"))?;
        spec.validate().map_err(|e| format!("'{s}': {e}"))?;
        Ok(spec)
    }
}

/// A number given as a number (YAML) or as a string (the `--action` form).
fn de_opt_number<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: FromStr + serde::Deserialize<'de>,
    T::Err: std::fmt::Display,
{
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw<T> {
        Number(T),
        Text(String),
    }
    match <Option<Raw<T>> as serde::Deserialize>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Number(n)) => Ok(Some(n)),
        Some(Raw::Text(t)) => t.trim().parse().map(Some).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_form_parses_every_type() {
        let s: ActionSpec = "signal:process=nginx,signal=USR1".parse().unwrap();
        assert_eq!(s.kind(), "signal");
        assert_eq!(s.target().unwrap().process.as_deref(), Some("nginx"));
        let h: ActionSpec = "http:url=http://127.0.0.1:8080/-/reload,expect-status=204,retries=2"
            .parse()
            .unwrap();
        let ActionSpec::Http(h) = h else { panic!() };
        assert_eq!((h.expect_status, h.retries), (Some(204), Some(2)));
        let e: ActionSpec = "exec:command=/bin/reload --now,timeout=3s".parse().unwrap();
        let ActionSpec::Exec(e) = e else { panic!() };
        assert_eq!(e.command.0, vec!["/bin/reload", "--now"]);
        assert_eq!(
            "rollout-restart".parse::<ActionSpec>().unwrap().kind(),
            "rollout-restart"
        );
        let r: ActionSpec = "restart-container:cmdline=java .*,grace=1s"
            .parse()
            .unwrap();
        assert_eq!(r.kind(), "restart-container");
    }

    #[test]
    fn bad_specs_are_named() {
        for (bad, expect) in [
            ("signal", "exactly one"),
            ("signal:process=a,pidfile=/p", "exactly one"),
            ("signal:process=a,signal=NOPE", "signal"),
            ("signal:cmdline=(", "regex"),
            ("http:url=ftp://x", "http(s)"),
            ("bogus:x=1", "bogus"),
            ("exec:command=", "empty"),
            ("signal:process", "key=value"),
        ] {
            let err = bad.parse::<ActionSpec>().unwrap_err();
            assert!(err.contains(expect), "{bad}: {err}");
        }
    }

    #[test]
    fn yaml_form() {
        let v: Vec<ActionSpec> = serde_saphyr::from_str(
            "- signal: {process: nginx}\n- http: {url: 'http://x/r', headers: {X-A: b}, expect-status: 200}\n- exec: {command: [a, b c]}\n- rollout-restart: {}\n",
        )
        .unwrap();
        assert_eq!(v.len(), 4);
        let ActionSpec::Exec(e) = &v[2] else { panic!() };
        assert_eq!(e.command.0, vec!["a", "b c"]);
    }
}
