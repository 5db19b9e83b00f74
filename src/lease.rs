//! Leases: how one process at a time holds the registry lock or works a queue file, and how a
//! successor takes over from a holder that is gone.
//!
//! A lease names its holder (host, process id, when it was taken) and when it expires. The holder
//! renews it on a timer, a [`Heartbeat`], every sixth of its term ([`TTL`], 30 s, so every 5 s):
//! a holder that is alive keeps its lease fresh, however long it works. A successor takes a lease
//! over
//! - at once when it names a process on the successor's own host that no longer runs (after a
//!   `kill -9`, a restart on the same machine need not wait), and
//! - on any host once it has expired: a holder whose host was replaced (a new container, another
//!   VM) never comes back to renew it, and its host name need not match anything.
//!
//! A holder that finds its lease renewed by no one but taken over or released (by
//! `touchctl force-unlock`), or that could not renew it for a whole term, has lost it and must stop
//! writing: the heartbeat reports that once. The expiry is wall-clock time written by the holder
//! and read by the successor, so hosts that share a file must keep their clocks within a few
//! seconds of each other (NTP does).
//!
//! A lease written by a touchctl from before leases has no expiry. It is taken over only when its
//! process is known to be gone (on this host); otherwise `touchctl force-unlock` removes it.

use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a lease lasts without being renewed.
pub const TTL: Duration = Duration::from_secs(30);

/// How often a holder renews a lease of term `ttl`: six times a term, so that a few slow renewals
/// (a busy disk) do not let it lapse.
pub fn renew_every(ttl: Duration) -> Duration {
    (ttl / 6).max(Duration::from_millis(10))
}

/// When a lease renewed at `now_ms` (ms since the epoch) expires.
pub fn expiry(now_ms: i64, ttl: Duration) -> i64 {
    now_ms.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
}

/// Where a lease held by someone else stands for a would-be successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Its holder may be alive: it has not expired (or has no expiry, and its process is not known
    /// to be gone).
    Live,
    /// It expired at this time (ms since the epoch) without being renewed.
    Expired(i64),
    /// Its process no longer runs on this host.
    Gone,
}

impl Standing {
    /// Whether a successor may take the lease over.
    pub fn free(self) -> bool {
        !matches!(self, Standing::Live)
    }

    /// Why a lease was taken over, for a log line: `its process is gone`, or when it expired.
    pub fn why_free(self) -> String {
        match self {
            Standing::Live => "it was released".into(),
            Standing::Expired(at) => {
                format!("its lease expired at {} without being renewed", when(at))
            }
            Standing::Gone => "its process no longer runs on this host".into(),
        }
    }
}

/// Where the lease of the process `pid` on `host`, expiring at `expires_at` (none for a lease
/// from a touchctl before leases), stands at `now_ms` for a process on this host.
pub fn standing(host: &str, pid: u32, expires_at: Option<i64>, now_ms: i64) -> Standing {
    if host == crate::registry::hostname() && !crate::store::process_alive(pid) {
        return Standing::Gone;
    }
    match expires_at {
        Some(at) if at <= now_ms => Standing::Expired(at),
        _ => Standing::Live,
    }
}

/// Whether the lease is being renewed: it has an expiry, not passed yet, and its process is not
/// known to be gone. Removing such a lease by hand (`touchctl force-unlock`) needs `--force`.
pub fn renewed(host: &str, pid: u32, expires_at: Option<i64>, now_ms: i64) -> bool {
    expires_at.is_some() && !standing(host, pid, expires_at, now_ms).free()
}

/// How a lease's expiry reads in a message: `expires at T` or `has no expiry (...)`.
pub fn expiry_note(expires_at: Option<i64>, now_ms: i64) -> String {
    match expires_at {
        Some(at) if at <= now_ms => format!("its lease expired at {}", when(at)),
        Some(at) => format!("its lease expires at {} unless renewed", when(at)),
        None => "it has no lease expiry (taken by a touchctl from before leases)".into(),
    }
}

/// Milliseconds since the epoch as RFC 3339, to the second.
pub fn when(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Renews a lease: given its new expiry (ms since the epoch), `Ok(true)` if it is still held,
/// `Ok(false)` if it is not (taken over or released), `Err` if it could not be reached.
pub type Renew = Box<dyn FnMut(i64) -> Result<bool, String> + Send>;

/// Renews a lease on a thread of its own until dropped (see the module docs). Dropping it stops
/// the renewals, not the lease: release that separately.
pub struct Heartbeat {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    lost: Arc<Mutex<Option<String>>>,
}

impl Heartbeat {
    /// Starts renewing a lease of term `ttl` with `renew`. `on_lost` is called once, from the
    /// heartbeat's thread, if the lease is lost; the heartbeat then stops.
    pub fn start(
        name: &str,
        ttl: Duration,
        mut renew: Renew,
        on_lost: impl FnOnce(String) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let lost = Arc::new(Mutex::new(None));
        let lost2 = lost.clone();
        let every = renew_every(ttl);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut renewed = Instant::now();
                let why = loop {
                    match stopped.recv_timeout(every) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                    match renew(expiry(crate::store::now_ms(), ttl)) {
                        Ok(true) => renewed = Instant::now(),
                        Ok(false) => {
                            break "it was taken over or released (touchctl force-unlock)"
                                .to_string();
                        }
                        // A successor may take the lease once a term has passed since the last
                        // renewal: from then on it is not safe to go on.
                        Err(e) if renewed.elapsed() >= ttl => {
                            break format!(
                                "it could not be renewed for {}: {e}",
                                humantime::format_duration(ttl)
                            );
                        }
                        Err(_) => {}
                    }
                };
                *lost2.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
                on_lost(why);
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
            lost,
        })
    }

    /// Why the lease was lost, if it was.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_free_once_expired_on_any_host_or_at_once_when_its_process_is_gone() {
        let here = crate::registry::hostname();
        let me = std::process::id();
        let now = 1_000_000;
        assert_eq!(
            standing("replaced-vm", me, Some(now + 1), now),
            Standing::Live
        );
        assert_eq!(
            standing("replaced-vm", me, Some(now), now),
            Standing::Expired(now)
        );
        // No expiry (from a touchctl before leases): only a known-dead process frees it.
        assert_eq!(standing("replaced-vm", 1, None, now), Standing::Live);
        assert_eq!(standing(&here, me, Some(now + 1), now), Standing::Live);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        assert_eq!(standing(&here, dead, None, now), Standing::Gone);
        assert_eq!(
            standing(&here, dead, Some(now + 60_000), now),
            Standing::Gone
        );
    }

    #[test]
    fn expiry_saturates() {
        assert_eq!(expiry(i64::MAX - 5, TTL), i64::MAX);
        assert_eq!(expiry(0, Duration::MAX), i64::MAX);
        assert_eq!(renew_every(TTL), Duration::from_secs(5));
    }

    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_heartbeat_renews_until_dropped_and_reports_a_lost_lease_once() {
        let renewals = Arc::new(Mutex::new(Vec::new()));
        let r = renewals.clone();
        let beat = Heartbeat::start(
            "test-heartbeat",
            Duration::from_millis(60),
            Box::new(move |at| {
                r.lock().unwrap().push(at);
                Ok(true)
            }),
            |_| panic!("not lost"),
        )
        .unwrap();
        wait_for("three renewals", || renewals.lock().unwrap().len() >= 3);
        drop(beat);
        let v = renewals.lock().unwrap().clone();
        assert!(v.windows(2).all(|w| w[0] <= w[1]), "{v:?}");

        let (tx, rx) = std::sync::mpsc::channel();
        let beat = Heartbeat::start(
            "test-heartbeat",
            Duration::from_millis(60),
            Box::new(|_| Ok(false)),
            move |why| tx.send(why).unwrap(),
        )
        .unwrap();
        let why = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(why.contains("taken over or released"), "{why}");
        assert_eq!(beat.lost(), Some(why));
        // Reported once: `on_lost` (and the sender it holds) is gone with the stopped thread.
        assert!(rx.recv().is_err());

        let beat = Heartbeat::start(
            "test-heartbeat",
            Duration::from_millis(60),
            Box::new(|_| Err("disk gone".into())),
            |_| {},
        )
        .unwrap();
        wait_for("a lease not renewed for a term is lost", || {
            beat.lost().is_some()
        });
        let why = beat.lost().unwrap();
        assert!(
            why.contains("could not be renewed") && why.contains("disk gone"),
            "{why}"
        );
    }
}
