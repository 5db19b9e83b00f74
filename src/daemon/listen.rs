//! What the API's accept loop ([`super::serve`]) needs to survive a flood of connections: how
//! many it serves at once, and how long it pauses when accepting fails.
//!
//! Each connection costs a file descriptor, and so do the daemon's own files and its requests to
//! the touchpoints. Without a cap, a flood of idle connections used every descriptor; `accept`
//! then failed at once with `EMFILE` while the connections waiting in the kernel's queue kept the
//! listener ready, and the loop spun a core. So:
//!
//! - at most `--max-connections` are served at once (by default half the open-file limit, at most
//!   [`DEFAULT_MAX_CONNECTIONS`]); the loop does not accept past it, so the next connections wait
//!   in the kernel's listen queue ([`LISTEN_QUEUE`] long, where the standard library asks for 128)
//!   and are served in order as others close. A connection that sends no request is closed after
//!   `--client-timeout`, so an idle one holds its place that long at most;
//! - when `accept` fails for want of a resource (descriptors, buffers, memory), the loop pauses
//!   before trying again, 5 ms doubling to 1 s (as Go's `net/http` does), until an accept succeeds.
//!   Errors of one connection (reset or aborted before it was accepted) are skipped without a pause.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket};

/// The most connections served at once when `--max-connections` is not given, whatever the
/// open-file limit: triggers come from a few platform services, and each connection holds buffers.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// How many connections the kernel keeps waiting to be accepted (it caps this at
/// `net.core.somaxconn`, 4096 by default). Past it, a client's connection attempts are dropped and
/// it tries again seconds later.
pub const LISTEN_QUEUE: u32 = 1024;

/// The first pause after a failed accept.
const FIRST_PAUSE: Duration = Duration::from_millis(5);

/// The longest pause after a failed accept.
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// How often a lasting accept failure, or the cap being reached, is logged.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Listens on `addr` with a listen queue of [`LISTEN_QUEUE`].
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As the standard library does: a restarted daemon can listen again at once.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_QUEUE)
}

/// The process's open-file limit (the soft one, which is enforced), if it can be read.
pub fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given, nothing else.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The connection cap: the one given, or half the open-file limit (the other half is for the
/// queue, the registry and the requests to touchpoints), at most [`DEFAULT_MAX_CONNECTIONS`] and
/// at least one. A warning when a given cap could use up the descriptors.
pub fn max_connections(given: Option<usize>, open_files: Option<u64>) -> (usize, Option<String>) {
    let half = open_files.map(|n| usize::try_from(n / 2).unwrap_or(usize::MAX));
    match given {
        None => {
            let cap = half.map_or(DEFAULT_MAX_CONNECTIONS, |h| {
                h.clamp(1, DEFAULT_MAX_CONNECTIONS)
            });
            (cap, None)
        }
        Some(n) => {
            let n = n.max(1);
            let warning = match (half, open_files) {
                (Some(h), Some(limit)) if n > h => Some(format!(
                    "warning: --max-connections {n} is more than half the open-file limit ({limit}): a flood of connections can leave none for the queue and the deliveries; raise the limit (`ulimit -n`, LimitNOFILE= in a systemd unit) or lower --max-connections"
                )),
                _ => None,
            };
            (n, warning)
        }
    }
}

/// Whether an accept error concerns only the connection being accepted (it went away first), so
/// the next one can be accepted at once.
pub fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The pauses after failed accepts, and when to log them.
#[derive(Debug, Default)]
pub struct Backoff {
    pause: Option<Duration>,
    failures: u64,
    logged: Option<Instant>,
}

impl Backoff {
    /// An accept succeeded: the next failure starts a new spell.
    pub fn succeeded(&mut self) {
        self.pause = None;
        self.failures = 0;
    }

    /// An accept failed at `now`: how long to pause, and a line to log (the first failure of a
    /// spell, then at most one a minute while it lasts).
    pub fn failed(&mut self, e: &io::Error, now: Instant) -> (Duration, Option<String>) {
        let pause = self
            .pause
            .map_or(FIRST_PAUSE, |p| p.saturating_mul(2).min(LONGEST_PAUSE));
        self.pause = Some(pause);
        self.failures = self.failures.saturating_add(1);
        let due = self
            .logged
            .is_none_or(|at| self.failures == 1 || now.duration_since(at) >= LOG_EVERY);
        let line = due.then(|| {
            self.logged = Some(now);
            let hint = if e.raw_os_error() == Some(EMFILE) || e.raw_os_error() == Some(ENFILE) {
                "; the process is out of file descriptors: raise the open-file limit (`ulimit -n`) or lower --max-connections"
            } else {
                ""
            };
            format!(
                "error: cannot accept API connections ({e}; {} time(s) in this spell); pausing up to {} between tries{hint}",
                self.failures,
                humantime::format_duration(LONGEST_PAUSE)
            )
        });
        (pause, line)
    }
}

#[cfg(unix)]
const EMFILE: i32 = libc::EMFILE;
#[cfg(unix)]
const ENFILE: i32 = libc::ENFILE;
#[cfg(not(unix))]
const EMFILE: i32 = -1;
#[cfg(not(unix))]
const ENFILE: i32 = -1;

/// Logs that every connection slot is taken, at most once a minute.
#[derive(Debug, Default)]
pub struct FullLog {
    logged: Option<Instant>,
}

impl FullLog {
    /// The slots are all taken at `now`: a line to log, if one is due.
    pub fn full(&mut self, cap: usize, now: Instant) -> Option<String> {
        if self
            .logged
            .is_some_and(|at| now.duration_since(at) < LOG_EVERY)
        {
            return None;
        }
        self.logged = Some(now);
        Some(format!(
            "all {cap} API connections are in use (--max-connections); new ones wait until one closes (an idle one is closed after --client-timeout)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_a_second_and_start_again_after_a_success() {
        let mut b = Backoff::default();
        let e = io::Error::from_raw_os_error(EMFILE);
        let now = Instant::now();
        let pauses: Vec<u64> = (0..10)
            .map(|_| b.failed(&e, now).0.as_millis() as u64)
            .collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(&e, now).0, FIRST_PAUSE);
    }

    #[test]
    fn a_lasting_failure_is_logged_once_a_minute() {
        let mut b = Backoff::default();
        let e = io::Error::from_raw_os_error(EMFILE);
        let start = Instant::now();
        let line = b.failed(&e, start).1.expect("the first failure is logged");
        assert!(line.contains("ulimit -n"), "{line}");
        assert!(b.failed(&e, start + Duration::from_secs(1)).1.is_none());
        assert!(b.failed(&e, start + Duration::from_secs(61)).1.is_some());
        b.succeeded();
        let again = b.failed(&e, start + Duration::from_secs(62)).1;
        assert!(again.is_some(), "a new spell is logged at once");
    }

    #[test]
    fn the_cap_is_half_the_open_file_limit_by_default() {
        assert_eq!(max_connections(None, Some(128)), (64, None));
        assert_eq!(max_connections(None, Some(1024)), (512, None));
        assert_eq!(max_connections(None, Some(1 << 20)), (1024, None));
        assert_eq!(max_connections(None, None), (1024, None));
        assert_eq!(max_connections(None, Some(1)), (1, None));
        assert_eq!(max_connections(Some(0), Some(1024)), (1, None));
        assert_eq!(max_connections(Some(100), Some(1024)), (100, None));
        let (cap, warning) = max_connections(Some(1000), Some(128));
        assert_eq!(cap, 1000);
        assert!(warning.unwrap().contains("ulimit -n"));
    }

    #[test]
    fn only_a_vanished_connection_is_retried_at_once() {
        assert!(is_connection_error(
            &io::ErrorKind::ConnectionAborted.into()
        ));
        assert!(!is_connection_error(&io::Error::from_raw_os_error(EMFILE)));
    }

    #[test]
    fn a_full_house_is_logged_once_a_minute() {
        let mut log = FullLog::default();
        let start = Instant::now();
        assert!(
            log.full(64, start)
                .unwrap()
                .contains("all 64 API connections")
        );
        assert!(log.full(64, start + Duration::from_secs(59)).is_none());
        assert!(log.full(64, start + Duration::from_secs(60)).is_some());
    }
}
