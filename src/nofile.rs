//! The open-file limit (`nofile`). Every accepted connection and every connection to the
//! controller is a file descriptor, so with a small limit (1024 is common) this, not memory, is
//! what a flood of idle connections exhausts first; once it is, accepts fail everywhere and even
//! the health probe reports "Too many open files".
//!
//! At startup the soft limit is raised to the hard limit (the soft limit is often 1024 while
//! the hard one allows far more), the default `--max-connections` is sized from what is left
//! after the other limits, and a warning names the numbers when the limit is still too small.
//! With a large limit, memory is what runs out first: the default is also capped so that idle
//! connections fit a memory budget (`CONNECTIONS_MEMORY_BUDGET`).

use std::num::NonZeroUsize;

/// Descriptors kept for everything that is not a connection: stdio, the listeners, epoll, the
/// log, token and TLS files read on reload, the embedded simulator's listener, the Log
/// Publisher's and the OTLP exporter's connections.
pub(crate) const RESERVE: usize = 64;
/// The default `--max-connections` never goes below this, even when `nofile` is too small for
/// the other limits (a warning says so).
const MIN_DEFAULT_MAX_CONNECTIONS: usize = 16;
/// What one gRPC connection holds while it has no call open, rounded up: about 37 KiB
/// allocated, of which h2's frame read, frame write and HPACK buffers are 8, 16 and 4 KiB
/// (constants in h2 and tokio-util that no hyper or h2 setting changes) and its task about 8.
/// `bench_rig idle` measures 22 KiB of RSS per idle connection at first, since not every page
/// of those buffers is touched, and up to 35 KiB once connections reuse freed memory.
pub(crate) const CONNECTION_COST: usize = 40 * 1024;
/// The memory the default `--max-connections` lets idle connections take at most.
pub(crate) const CONNECTIONS_MEMORY_BUDGET: usize = 256 * 1024 * 1024;
/// Nor above this (6,553), so that idle connections fit the memory budget.
pub(crate) const MAX_DEFAULT_MAX_CONNECTIONS: usize = CONNECTIONS_MEMORY_BUDGET / CONNECTION_COST;

/// What raising the soft limit did, for one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raise {
    /// The soft limit was already the hard limit (or unlimited).
    AlreadyAtHardLimit(Option<u64>),
    /// The soft limit went from the first value to the second.
    Raised(u64, Option<u64>),
    /// `setrlimit` refused; the soft limit stays.
    Refused(u64, std::io::ErrorKind),
}

/// How many descriptors the gateway's limits can take at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FdBudget {
    /// Accepted gRPC connections.
    pub(crate) max_connections: usize,
    /// Controller connections, as [`crate::config::controller_connections`] counts them.
    pub(crate) controller_connections: usize,
    /// Accepted connections to `/metrics`, when it is served.
    pub(crate) metrics_connections: usize,
}

/// Raises the soft `nofile` limit to the hard limit, as far as the process may.
pub fn raise_soft_limit() -> Raise {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let Some(soft) = limit.current else {
        return Raise::AlreadyAtHardLimit(None);
    };
    if limit.maximum == Some(soft) {
        return Raise::AlreadyAtHardLimit(Some(soft));
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => Raise::Raised(soft, limit.maximum),
        Err(errno) => Raise::Refused(soft, std::io::Error::from(errno).kind()),
    }
}

/// Logs what [`raise_soft_limit`] did.
pub fn log_raise(raise: Raise) {
    let shown =
        |limit: Option<u64>| limit.map_or("unlimited".to_owned(), |limit| limit.to_string());
    match raise {
        Raise::AlreadyAtHardLimit(_) => {}
        Raise::Raised(from, to) => tracing::info!(
            from,
            to = %shown(to),
            "raised the open-file limit (nofile) to the hard limit, so connections are limited by the connection limits and not by descriptors"
        ),
        Raise::Refused(soft, kind) => tracing::warn!(
            soft,
            cause = %kind,
            "cannot raise the open-file limit (nofile) to the hard limit"
        ),
    }
}

/// The soft `nofile` limit now; `None` when unlimited.
pub(crate) fn soft_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// The default `--max-connections`: what `nofile` leaves after the controller connections, the
/// metrics connections and [`RESERVE`], between 16 and 6,553 (the memory budget).
pub(crate) fn default_max_connections(
    soft_limit: Option<u64>,
    controller_connections: usize,
    metrics_connections: usize,
) -> NonZeroUsize {
    let available = soft_limit
        .map(|limit| usize::try_from(limit).unwrap_or(usize::MAX))
        .unwrap_or(usize::MAX)
        .saturating_sub(controller_connections)
        .saturating_sub(metrics_connections)
        .saturating_sub(RESERVE);
    let sized = available.clamp(MIN_DEFAULT_MAX_CONNECTIONS, MAX_DEFAULT_MAX_CONNECTIONS);
    // The clamp keeps it at 16 or more.
    NonZeroUsize::new(sized).unwrap_or(NonZeroUsize::MIN)
}

// === impl FdBudget ===

impl FdBudget {
    /// The descriptors the limits can take together, with [`RESERVE`].
    pub(crate) fn total(&self) -> usize {
        self.max_connections
            .saturating_add(self.controller_connections)
            .saturating_add(self.metrics_connections)
            .saturating_add(RESERVE)
    }

    /// Warns when `soft_limit` is below [`FdBudget::total`]: the process could run out of
    /// descriptors before it reaches its own limits.
    pub(crate) fn warn_if_short(&self, soft_limit: Option<u64>) {
        let Some(soft_limit) = soft_limit else {
            return;
        };
        let total = self.total();
        if u64::try_from(total).is_ok_and(|total| soft_limit >= total) {
            return;
        }
        tracing::warn!(
            nofile = soft_limit,
            needed = total,
            max_connections = self.max_connections,
            controller_connections = self.controller_connections,
            metrics_connections = self.metrics_connections,
            reserve = RESERVE,
            "the open-file limit (nofile) is below what the connection limits can take; raise it (ulimit -n, systemd LimitNOFILE=) or lower --max-in-flight and --max-connections"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 25: the systemd unit's `LimitNOFILE` gives the default limits (metrics served)
    /// their full default `--max-connections`, with no warning that descriptors are short.
    #[test]
    fn the_systemd_units_nofile_fits_the_default_limits() {
        use crate::config::defaults;
        let unit = include_str!("../deploy/systemd/taskgate.service");
        let limit: u64 = unit
            .lines()
            .find_map(|line| line.strip_prefix("LimitNOFILE="))
            .expect("the unit sets LimitNOFILE")
            .parse()
            .expect("LimitNOFILE is one number");
        let controller = crate::config::controller_connections(defaults::MAX_IN_FLIGHT).get();
        let metrics = defaults::METRICS_MAX_CONNECTIONS.get();
        let max_connections = default_max_connections(Some(limit), controller, metrics).get();
        assert_eq!(max_connections, MAX_DEFAULT_MAX_CONNECTIONS);
        let budget = FdBudget {
            max_connections,
            controller_connections: controller,
            metrics_connections: metrics,
        };
        assert!(u64::try_from(budget.total()).unwrap() <= limit);
    }

    #[test]
    fn the_default_connection_limit_is_what_nofile_leaves() {
        let check = |soft: Option<u64>, controller: usize, metrics: usize, expected: usize| {
            assert_eq!(
                default_max_connections(soft, controller, metrics).get(),
                expected,
                "{soft:?} {controller} {metrics}"
            );
        };
        check(Some(6000), 2049, 64, 6000 - 2049 - 64 - RESERVE);
        check(Some(4096), 2049, 0, 4096 - 2049 - RESERVE);
        // The default in-flight limit alone exhausts a 1024 limit: the floor, and a warning.
        check(Some(1024), 2049, 0, MIN_DEFAULT_MAX_CONNECTIONS);
        check(None, 2049, 64, MAX_DEFAULT_MAX_CONNECTIONS);
        // Beyond the memory budget, the budget.
        check(Some(65_536), 2049, 64, 6553);
        check(Some(1 << 40), 2049, 64, MAX_DEFAULT_MAX_CONNECTIONS);
    }

    #[test]
    fn the_budget_adds_every_limit_and_the_reserve() {
        let budget = FdBudget {
            max_connections: 100,
            controller_connections: 2049,
            metrics_connections: 64,
        };
        assert_eq!(budget.total(), 100 + 2049 + 64 + RESERVE);
    }
}
