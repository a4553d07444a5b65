//! `spike`: the whole flash sale in one command.
//!
//! `spike up` reads the configuration directory ([`plan`]), makes sure a
//! Redis answers ([`redis`], starting `redis-server` if none does), makes
//! sure the sale exists, starts one node per upstream of the balancer on
//! this machine and the balancer ([`children`]: `spike` itself, running the
//! `node` and `balancer` command lines), shows the sale live ([`status`]),
//! and on Ctrl-C or SIGTERM stops everything in order and prints a summary
//! ([`up`]). `spike status` and `spike reset` look at and start over a sale;
//! `spike load` ([`load`]) sends named buyers who buy and pay.

pub mod children;
pub mod load;
pub mod plan;
pub mod redis;
pub mod status;
pub mod up;

use nix::sys::signal::Signal;

/// In a child `spike` started (as `node` or `balancer`): asks the kernel to
/// send SIGTERM when `spike` dies, so that no child outlives it; exits at
/// once if it is already gone.
pub fn supervised_by_parent() {
    let Some(supervisor) = std::env::var(children::SUPERVISOR_VAR)
        .ok()
        .and_then(|pid| pid.parse::<i32>().ok())
    else {
        return;
    };
    if nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).is_err() {
        return;
    }
    // The parent may have died before the request took effect.
    if nix::unistd::getppid().as_raw() != supervisor {
        std::process::exit(1);
    }
}
