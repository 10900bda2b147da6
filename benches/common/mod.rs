//! Helpers shared by the bench binaries (`mod common;` in each).

use std::error::Error;

pub type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// (`VmRSS`, `VmHWM`) of a process in MiB: resident now, and the peak, from `/proc/<pid>/status`.
pub fn memory(pid: u32) -> Res<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Res<f64> {
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))?;
        Ok(kb / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
