//! File descriptors: the process's limit (`RLIMIT_NOFILE`), raised at start to its hard limit as
//! Go and nginx (`worker_rlimit_nofile`) do, how many are open, and how the limit is shared
//! between client connections and upstream sockets so that their sum stays under it: past a
//! bound a request is answered 503 `busy` or a connection closed at once, never `EMFILE`.

use std::path::Path;

/// Descriptors kept aside for everything that is neither a client connection nor an upstream
/// socket: the listener, the runtime's epoll and event descriptors, the disk tier's files, Redis
/// connections, logs.
pub(crate) const RESERVED_FDS: u64 = 128;

/// The most upstream requests in flight derived from the limit (`[upstream] max_in_flight = 0`):
/// a quarter of what is left after [`RESERVED_FDS`], at most this.
pub(crate) const MAX_DERIVED_IN_FLIGHT: usize = 4096;

/// The descriptor limit assumed when it cannot be read (not Linux): the common soft default.
const ASSUMED_FD_LIMIT: u64 = 1024;

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit and returns the soft limit in
/// effect (what it was, when it cannot be raised; 1024 when it cannot be read).
pub(crate) fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let Some(current) = limit.current else {
        // unlimited
        return u64::MAX;
    };
    if let Some(max) = limit.maximum.filter(|&max| max > current) {
        let raised = rustix::process::Rlimit {
            current: Some(max),
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return max;
        }
    }
    if current == 0 {
        ASSUMED_FD_LIMIT
    } else {
        current
    }
}

/// Descriptors this process has open now (the entries of `/proc/self/fd`), `None` where that
/// cannot be read.
pub(crate) fn open_fds() -> Option<u64> {
    let dir = Path::new("/proc/self/fd");
    // the listing's own descriptor is among the entries
    Some(std::fs::read_dir(dir).ok()?.count().saturating_sub(1) as u64)
}

/// How the descriptor limit is shared: client connections, upstream requests in flight, and
/// upstream sockets (busy or idle in the pools), with `client + upstream sockets + reserved`
/// never above the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(crate) struct DescriptorBudget {
    /// The process's descriptor limit.
    pub fd_limit: u64,
    /// Client connections open at most: `[server] max_connections`, lowered when the limit
    /// leaves no room for it.
    pub max_connections: usize,
    /// Upstream requests (fetches, uploads) in flight at most: `[upstream] max_in_flight`, or
    /// derived from the limit.
    pub max_in_flight: usize,
    /// Upstream sockets open at most, busy or idle: twice `max_in_flight` (a pool keeps idle
    /// connections for reuse).
    pub max_upstream_sockets: usize,
}

impl DescriptorBudget {
    /// Shares `fd_limit` between `max_connections` client connections and `max_in_flight`
    /// upstream requests (0: a quarter of what the limit leaves after [`RESERVED_FDS`], at least
    /// 1 and at most [`MAX_DERIVED_IN_FLIGHT`]), each upstream request allowed one more idle
    /// socket in the pools. When the three do not fit, client connections give way first (to
    /// no fewer than 1), then upstream requests.
    pub(crate) fn new(fd_limit: u64, max_connections: usize, max_in_flight: usize) -> Self {
        let room = usize::try_from(fd_limit.saturating_sub(RESERVED_FDS))
            .unwrap_or(usize::MAX)
            .max(4);
        let mut in_flight = match max_in_flight {
            0 => (room / 4).clamp(1, MAX_DERIVED_IN_FLIGHT),
            n => n,
        };
        // upstream sockets may take at most three quarters of the room
        in_flight = in_flight.min((room * 3 / 4 / 2).max(1));
        let sockets = 2 * in_flight;
        let clients = max_connections.min(room.saturating_sub(sockets)).max(1);
        DescriptorBudget {
            fd_limit,
            max_connections: clients,
            max_in_flight: in_flight,
            max_upstream_sockets: sockets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_and_upstream_sockets_fit_under_the_limit() {
        for limit in [64, 256, 1024, 4096, 20_000, 1 << 20] {
            for (connections, in_flight) in [(10_000, 0), (100, 0), (10_000, 5000), (1, 1)] {
                let b = DescriptorBudget::new(limit, connections, in_flight);
                let used = b.max_connections as u64 + b.max_upstream_sockets as u64;
                assert!(
                    used + RESERVED_FDS <= limit.max(RESERVED_FDS + 4),
                    "{limit} {connections} {in_flight}: {b:?}"
                );
                assert!(b.max_connections >= 1 && b.max_in_flight >= 1, "{b:?}");
                assert!(b.max_connections <= connections, "{b:?}");
            }
        }
        // A large limit leaves the configuration as it is.
        let b = DescriptorBudget::new(1 << 20, 10_000, 0);
        assert_eq!((b.max_connections, b.max_in_flight), (10_000, 4096));
        // The common soft limit: a quarter of the room for upstream requests, the rest shared.
        let b = DescriptorBudget::new(1024, 10_000, 0);
        assert_eq!(b.max_in_flight, 224);
        assert_eq!(b.max_connections, 896 - 448);
        // An explicit bound is kept when it fits.
        assert_eq!(DescriptorBudget::new(20_000, 100, 50).max_in_flight, 50);
    }
}
