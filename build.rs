//! Link flags of the release binary (README "Footprint"): on glibc targets, relative relocations are
//! packed (`DT_RELR`, `-z pack-relative-relocs`): 0.45 MB less than a table of 24-byte `RELA` entries,
//! the binary stays position-independent (ASLR).
//!
//! The loader of a glibc older than 2.36 refuses such a binary (it names `GLIBC_ABI_DT_RELR`), and the
//! linker adds that requirement without a word, so the flag is only used where the result is known to
//! run: a release build for the machine that builds it, whose glibc is 2.36 or newer (`getconf
//! GNU_LIBC_VERSION`). `OSC_AGENT_RELR=1` forces it (a cross build for such systems), `OSC_AGENT_RELR=0`
//! turns it off (a binary to copy to older systems). Debug and test builds, build scripts, proc macros
//! and other targets (musl: the Dockerfile's image) are left as they are.

use std::process::Command;

/// The first glibc whose loader reads `DT_RELR`.
const RELR_GLIBC: (u32, u32) = (2, 36);

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=OSC_AGENT_RELR");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let target = var("TARGET");
    if var("PROFILE") != "release" || !target.ends_with("-linux-gnu") {
        return;
    }
    let relr = match var("OSC_AGENT_RELR").as_str() {
        "1" => true,
        "0" => false,
        _ if var("HOST") != target => false,
        _ => match host_glibc() {
            Some(version) if version >= RELR_GLIBC => true,
            Some((major, minor)) => {
                println!(
                    "cargo::warning=glibc {major}.{minor} is older than 2.36: relative relocations are \
                     not packed (the binary is ~0.45 MB larger)"
                );
                false
            }
            None => false,
        },
    };
    if relr {
        println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// The build machine's glibc version, from `getconf GNU_LIBC_VERSION` ("glibc 2.36").
fn host_glibc() -> Option<(u32, u32)> {
    let out = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let version = text.trim().strip_prefix("glibc ")?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}
