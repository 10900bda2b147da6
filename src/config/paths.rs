//! Outputs that collide with inputs or with each other are configuration errors (exit 2), named by both
//! settings: an output over the user key, a template rendered over its own source, two outputs on one
//! path (they would rewrite each other forever), inputs inside the directory the agent manages, and an
//! output directory that is a system directory.
//!
//! Paths are compared lexically (made absolute, `.` and `..` resolved) and, when they exist, after
//! resolving symbolic links, so `./key`, `dir/../key` and a link to the key are all the key.

use std::path::{Component, Path, PathBuf};

use super::{AgentArgs, ConfigError, OutputSpec, TemplateSpec, setting};
use crate::util::escape_path;

/// A path named by a setting: `--output '/etc/app.env'`.
struct Named<'a> {
    what: String,
    path: &'a Path,
}

impl Named<'_> {
    fn describe(&self) -> String {
        format!("{} '{}'", self.what, escape_path(self.path))
    }
}

/// Directories an output directory must never be: the agent replaces what is inside with its own files.
const SYSTEM_DIRS: &[&str] = &[
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/opt", "/proc",
    "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var",
];

/// Both spellings of a path: lexical (absolute, `.`/`..` folded) and resolved (symbolic links followed,
/// for the longest existing prefix).
fn forms(path: &Path) -> [PathBuf; 2] {
    let lexical = lexical(path);
    let resolved = resolve(&lexical);
    [lexical, resolved]
}

fn lexical(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Resolve symbolic links in the longest existing prefix; the rest is appended as written.
fn resolve(path: &Path) -> PathBuf {
    let mut existing = path.to_owned();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (
            existing.file_name().map(ToOwned::to_owned),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_owned();
            }
            _ => return path.to_owned(),
        }
    }
}

fn same(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (forms(a), forms(b));
    fa.iter().any(|x| fb.contains(x))
}

fn inside(path: &Path, dir: &Path) -> bool {
    let (fp, fd) = (forms(path), forms(dir));
    fp.iter()
        .any(|p| fd.iter().any(|d| p.starts_with(d) && p != d))
}

/// Check the outputs against the inputs and each other.
pub fn check(
    a: &AgentArgs,
    files: &[OutputSpec],
    templates: &[TemplateSpec],
) -> Result<(), ConfigError> {
    let mut inputs: Vec<Named> = [
        ("config", &a.config),
        ("user-key-file", &a.user_key_file),
        ("api-key-file", &a.api_key_file),
        ("token-file", &a.token_file),
        ("ca-file", &a.ca_file),
        ("backup-password-file", &a.backup_password_file),
        ("fallback-backup", &a.fallback_backup),
        ("from-backup", &a.from_backup),
    ]
    .into_iter()
    .filter_map(|(flag, path)| {
        path.as_deref().map(|p| Named {
            what: format!("--{flag}"),
            path: p,
        })
    })
    .collect();
    for t in templates {
        inputs.push(Named {
            what: "--template source".into(),
            path: &t.source,
        });
    }

    let mut outputs: Vec<Named> = Vec::new();
    for f in files {
        outputs.push(Named {
            what: "--output".into(),
            path: &f.path,
        });
    }
    for t in templates {
        outputs.push(Named {
            what: "--template destination".into(),
            path: &t.destination,
        });
    }

    let clash = |x: &Named, y: &Named, how: &str| {
        ConfigError(format!("{} {how} {}", x.describe(), y.describe()))
    };
    for (i, out) in outputs.iter().enumerate() {
        for other in &outputs[i + 1..] {
            if same(out.path, other.path) {
                return Err(ConfigError(format!(
                    "{} is the same file as {}: two outputs on one path would rewrite each other \
                     forever",
                    out.describe(),
                    other.describe()
                )));
            }
        }
        for inp in &inputs {
            if same(out.path, inp.path) {
                return Err(clash(
                    out,
                    inp,
                    "would overwrite an input: it is the same file as",
                ));
            }
        }
    }

    let Some(dir) = &a.output_dir else {
        return Ok(());
    };
    let dir_named = Named {
        what: "--output-dir".into(),
        path: dir,
    };
    let [lexical_dir, resolved_dir] = forms(dir);
    for sys in SYSTEM_DIRS {
        if lexical_dir == Path::new(sys) || resolved_dir == Path::new(sys) {
            return Err(ConfigError(format!(
                "{}: '{}' is a system directory; the agent manages every entry of its output \
                 directory: use a directory of its own, e.g. /config",
                setting("output-dir"),
                escape_path(dir)
            )));
        }
    }
    for inp in &inputs {
        if same(dir, inp.path) || inside(inp.path, dir) || inside(dir, inp.path) {
            return Err(clash(
                &dir_named,
                inp,
                "must not hold (or be, or be inside) an input; keep inputs out of the directory the agent \
                 manages:",
            ));
        }
    }
    for out in &outputs {
        if same(out.path, dir) {
            return Err(clash(out, &dir_named, "is the same path as"));
        }
        let reserved = out
            .path
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b".."));
        if reserved && inside(out.path, dir) {
            return Err(clash(
                out,
                &dir_named,
                "uses a name starting with '..', reserved for the atomic-write machinery of",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> AgentArgs {
        AgentArgs {
            user_key_file: Some(dir.join("key")),
            output_dir: Some(dir.join("out")),
            ..Default::default()
        }
    }

    fn out(path: &Path) -> OutputSpec {
        OutputSpec {
            path: path.to_owned(),
            format: super::super::OutputFormat::Dotenv,
            in_place: false,
        }
    }

    #[test]
    fn collisions_are_named_by_both_settings() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("key"), "user-key-12345").unwrap();
        let a = args(d);
        let err = |files: &[OutputSpec], templates: &[TemplateSpec], a: &AgentArgs| {
            check(a, files, templates).unwrap_err().0
        };
        // An output over the user key, spelt differently.
        let e = err(&[out(&d.join("sub/../key"))], &[], &a);
        assert!(
            e.contains("--output") && e.contains("--user-key-file"),
            "{e}"
        );
        // A link to the key is the key.
        std::os::unix::fs::symlink(d.join("key"), d.join("link")).unwrap();
        let e = err(&[out(&d.join("link"))], &[], &a);
        assert!(e.contains("--user-key-file"), "{e}");
        // A template over its own source.
        let t = TemplateSpec {
            source: d.join("t.j2"),
            destination: d.join("./t.j2"),
            in_place: false,
        };
        let e = err(&[], std::slice::from_ref(&t), &a);
        assert!(
            e.contains("--template destination") && e.contains("--template source"),
            "{e}"
        );
        // Two outputs on one path.
        let e = err(&[out(&d.join("app.env")), out(&d.join("app.env"))], &[], &a);
        assert!(e.contains("rewrite each other"), "{e}");
        // An aggregate inside the output directory is fine, unless it takes a reserved name.
        assert!(check(&a, &[out(&d.join("out/app.env"))], &[]).is_ok());
        let e = err(&[out(&d.join("out/..data"))], &[], &a);
        assert!(e.contains("reserved"), "{e}");
        // System directories and inputs inside the output directory.
        for sys in ["/", "/etc", "/etc/", "/usr/../etc"] {
            let a = AgentArgs {
                output_dir: Some(sys.into()),
                ..args(d)
            };
            let e = err(&[], &[], &a);
            assert!(e.contains("system directory"), "{sys}: {e}");
        }
        let a = AgentArgs {
            output_dir: Some(d.to_owned()),
            ..args(d)
        };
        let e = err(&[], &[], &a);
        assert!(
            e.contains("--output-dir") && e.contains("--user-key-file"),
            "{e}"
        );
    }
}
