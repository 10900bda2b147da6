//! Golden tests of the injector's pure core (`osc_agent::injector::mutate`), one test per folder of
//! `tests/fixtures/injector/`:
//!
//! - `pod.json`: the pod as the API server sends it (its `metadata.namespace` is the request's namespace);
//! - `defaults.json` (optional): the injector's settings that differ from the tests' base (server
//!   `https://osc.example:9000`, own namespace `osc-system`, image `ghcr.io/osc-agent/osc-agent:0.1.0`),
//!   in the kebab-case field names of `InjectorDefaults`;
//! - the expectation: `patch.json` (the JSONPatch, or `null` for "allowed unchanged") or `denial.txt`
//!   (the message of the denial).
//!
//! Every patch is also applied to its pod: the result must read as a Pod, keep container and volume names
//! unique, mount only volumes that exist, and give no patch on a second pass (reinvocation is a no-op).
//!
//! `OSC_BLESS=1 cargo test --test injector_golden` rewrites the expectations from the current code:
//! review the diff before committing it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod as FullPod;
use libtest_mimic::{Arguments, Failed, Trial};
use osc_agent::injector::Pod;
use osc_agent::injector::{InjectorDefaults, mutate};
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/injector")
}

fn read_json(path: &Path) -> Result<Value, Failed> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()).into())
}

fn defaults(dir: &Path) -> Result<InjectorDefaults, Failed> {
    let mut base = json!({
        "image": "ghcr.io/osc-agent/osc-agent:0.1.0",
        "server": "https://osc.example:9000",
        "own-namespace": "osc-system",
    });
    let extra = dir.join("defaults.json");
    if extra.exists() {
        let Value::Object(extra) = read_json(&extra)? else {
            return Err("defaults.json is not an object".into());
        };
        for (k, v) in extra {
            base[k] = v;
        }
    }
    serde_json::from_value(base).map_err(|e| format!("defaults.json: {e}").into())
}

fn pretty(v: &impl serde::Serialize) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// What the API server would reject, checked on the patched pod.
fn check_patched(pod: &FullPod) -> Result<(), Failed> {
    let spec = pod.spec.as_ref().ok_or("the patched pod has no spec")?;
    let containers: Vec<_> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect();
    let mut names = BTreeSet::new();
    for c in &containers {
        if !names.insert(c.name.as_str()) {
            return Err(format!("two containers named {}", c.name).into());
        }
    }
    let mut volumes = BTreeSet::new();
    for v in spec.volumes.iter().flatten() {
        if !volumes.insert(v.name.as_str()) {
            return Err(format!("two volumes named {}", v.name).into());
        }
    }
    for c in &containers {
        let mut paths = BTreeSet::new();
        for m in c.volume_mounts.iter().flatten() {
            if !volumes.contains(m.name.as_str()) {
                return Err(format!("{} mounts the missing volume {}", c.name, m.name).into());
            }
            if !paths.insert(m.mount_path.as_str()) {
                return Err(format!("{} mounts two volumes at {}", c.name, m.mount_path).into());
            }
        }
    }
    Ok(())
}

fn run_case(dir: &Path) -> Result<(), Failed> {
    let pod_json = read_json(&dir.join("pod.json"))?;
    let pod: Pod =
        serde_json::from_value(pod_json.clone()).map_err(|e| format!("pod.json: {e}"))?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let defaults = defaults(dir)?;
    let result = mutate(&pod, &namespace, &defaults);
    let patch_file = dir.join("patch.json");
    let denial_file = dir.join("denial.txt");

    if std::env::var_os("OSC_BLESS").is_some_and(|v| v == "1") {
        let _ = std::fs::remove_file(&patch_file);
        let _ = std::fs::remove_file(&denial_file);
        match &result {
            Ok(ops) => std::fs::write(&patch_file, pretty(ops))?,
            Err(d) => std::fs::write(&denial_file, format!("{}\n", d.message))?,
        }
    }

    match (&result, patch_file.exists(), denial_file.exists()) {
        (Ok(ops), true, false) => {
            let expected = read_json(&patch_file)?;
            let actual = serde_json::to_value(ops)?;
            if expected != actual {
                return Err(format!(
                    "patch differs from patch.json (OSC_BLESS=1 rewrites it); got:\n{}",
                    pretty(ops)
                )
                .into());
            }
        }
        (Err(d), false, true) => {
            let expected = std::fs::read_to_string(&denial_file)?;
            if expected.trim_end() != d.message {
                return Err(format!(
                    "denial differs from denial.txt:\n  expected: {}\n  actual:   {}",
                    expected.trim_end(),
                    d.message
                )
                .into());
            }
        }
        (_, false, false) => return Err("neither patch.json nor denial.txt (OSC_BLESS=1)".into()),
        (_, true, true) => return Err("both patch.json and denial.txt".into()),
        (Ok(_), false, true) => {
            return Err(format!("expected a denial, got a patch: {}", pretty(&result.ok())).into());
        }
        (Err(d), true, false) => return Err(format!("expected a patch, got a denial: {d}").into()),
    }

    if let Ok(Some(ops)) = result {
        let mut doc = pod_json;
        json_patch::patch(&mut doc, &ops).map_err(|e| format!("the patch does not apply: {e}"))?;
        let full: FullPod = serde_json::from_value(doc.clone())
            .map_err(|e| format!("the patched pod is not a Pod: {e}"))?;
        check_patched(&full)?;
        let patched: Pod = serde_json::from_value(doc)?;
        let again = mutate(&patched, &namespace, &defaults)
            .map_err(|d| format!("second pass denied: {d}"))?;
        if again.is_some() {
            return Err("a second pass patches again (not idempotent)".into());
        }
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    assert!(!dirs.is_empty(), "no case in tests/fixtures/injector");
    let trials = dirs
        .into_iter()
        .map(|dir| {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Trial::test(name, move || run_case(&dir))
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
