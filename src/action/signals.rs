//! Signal dispositions and masks that a process inherits, and must not pass on.
//!
//! Ignored signals and the signal mask survive `fork` and `exec`: an agent started under `nohup` has SIGHUP
//! ignored, one started as a background job of a non-interactive shell has SIGINT and SIGQUIT ignored, and a
//! supervisor may start it with signals blocked. A command inheriting that state behaves differently from
//! the same command started normally; a non-interactive `sh` cannot even `trap` a signal that was ignored
//! when it started. So:
//!
//! - commands the agent starts for `exec` actions begin with every signal at its default action and an
//!   empty mask ([`reset_on_exec`]), whatever the agent inherited;
//! - the agent unblocks the signals it handles ([`unblock`]). Ignored ones need nothing: installing a
//!   handler replaces `SIG_IGN`.

use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::libc;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};

/// Makes `command` start with every signal a program can use (1 to 31 and `SIGRTMIN` to `SIGRTMAX`; the
/// C library keeps the numbers in between for itself) at its default action and an empty signal mask,
/// instead of the dispositions and mask the agent inherited. Spawning fails (with the OS error) only if
/// the mask cannot be set, which does not happen on Linux.
pub fn reset_on_exec(command: &mut Command) {
    // Read before the fork: after it, the child may only make async-signal-safe calls.
    let (first_rt, last) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    let empty = SigSet::empty();
    // SAFETY: the closure runs in the child between `fork` and `exec`. It only calls `signal` and
    // `pthread_sigmask`, both async-signal-safe (POSIX.1-2017, 2.4.3); it allocates nothing, takes no lock
    // and touches no memory shared with the parent's other threads.
    unsafe {
        command.pre_exec(move || {
            for signal in (1..=31).chain(first_rt..=last) {
                if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                    // Cannot fail for these numbers.
                    libc::signal(signal, libc::SIG_DFL);
                }
            }
            pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&empty), None)?;
            Ok(())
        });
    }
}

/// Unblocks `signals` in the calling thread, so that the process receives them even when it was started
/// with them blocked (a process-directed signal goes to any thread that does not block it). Call it from
/// a thread that lives as long as the handlers (the agent calls it from the main thread). Errors only for
/// an invalid argument, which a [`Signal`] cannot be.
pub fn unblock(signals: &[Signal]) -> nix::Result<()> {
    let mut set = SigSet::empty();
    for signal in signals {
        set.add(*signal);
    }
    pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mask (`SigBlk`) or ignored set (`SigIgn`) of `/proc/PID/status`, restricted to the signals a
    /// program can use (the C library's own, 32 and 33, may be ignored: glibc's `posix_spawn` does that).
    fn status_mask(status: &str, field: &str) -> u64 {
        let bit = |signal: i32| 1u64 << (signal - 1);
        let usable = (1..=31)
            .chain(libc::SIGRTMIN()..=libc::SIGRTMAX())
            .fold(0, |mask, s| mask | bit(s));
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no {field} in {status}"))
            & usable
    }

    #[test]
    fn children_start_with_default_dispositions_and_no_mask_whatever_the_parent_had() {
        // The parent's state is set in the child only (before `reset_on_exec`'s hook runs), so the test
        // process itself is not changed: ignore HUP, INT and QUIT and block TERM and USR1, like a `nohup`
        // background job under a supervisor.
        let mut hostile = Command::new("cat");
        hostile.arg("/proc/self/status");
        // SAFETY: `signal` and `pthread_sigmask` are async-signal-safe; nothing is allocated.
        unsafe {
            hostile.pre_exec(|| {
                for s in [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
                    libc::signal(s, libc::SIG_IGN);
                }
                let mut set = SigSet::empty();
                set.add(Signal::SIGTERM);
                set.add(Signal::SIGUSR1);
                pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
                Ok(())
            });
        }
        let before = hostile.output().expect("cat");
        let before = String::from_utf8_lossy(&before.stdout).into_owned();
        // Without the reset, `cat` inherits all of it (so the check below can fail).
        assert_ne!(status_mask(&before, "SigIgn:"), 0, "{before}");
        assert_ne!(status_mask(&before, "SigBlk:"), 0, "{before}");

        reset_on_exec(&mut hostile);
        let after = hostile.output().expect("cat");
        assert!(after.status.success());
        let after = String::from_utf8_lossy(&after.stdout).into_owned();
        assert_eq!(status_mask(&after, "SigIgn:"), 0, "{after}");
        assert_eq!(status_mask(&after, "SigBlk:"), 0, "{after}");
    }
}
