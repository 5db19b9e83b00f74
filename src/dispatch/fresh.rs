//! Batches just queued, kept in memory as their recipients are written on the wire.
//!
//! A batch is usually sent a few milliseconds after its trigger was accepted. The daemon already
//! had its users parsed then, so it writes each batch's recipients once, at intake, and keeps them
//! here; the sender takes them instead of reading the batch's stored form back from its segment
//! and parsing it again. This is only a shortcut: the stored form on disk stays the truth, and a
//! batch not found here (a restart, a replay, a retry, a batch that waited too long, or more
//! waiting than the budget holds) is read from disk as before.
//!
//! The recipients depend on the touchpoint's dynamic params, so an entry names the touchpoint
//! generation it was written for; the sender uses it only if that generation is still live.
//! Entries are taken once: the first attempt uses them, a retry reads the stored form.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How much memory the entries may take together.
pub const BUDGET: usize = 32 << 20;

/// How long an entry is kept before it is dropped (its batch is then read from disk).
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// A batch's recipients as written in the request body, between `"recipients":[` and `]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wire {
    /// The touchpoint generation whose dynamic params wrote them.
    pub generation: u64,
    /// The recipients, comma-separated JSON objects.
    pub recipients: Vec<u8>,
    /// How many recipients that is.
    pub count: u32,
}

/// The entries, bounded by a byte budget and an age.
pub struct Fresh {
    budget: usize,
    max_age: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Batch id → (its place in `order`, when it was put, the recipients).
    map: HashMap<String, (u64, Instant, Wire)>,
    /// Batch ids oldest first. Taken entries are left here and skipped (or compacted) later.
    order: VecDeque<(u64, String)>,
    bytes: usize,
    next: u64,
}

impl Inner {
    /// Drops the oldest entries that are taken or older than `max_age`.
    fn drop_stale(&mut self, now: Instant, max_age: Duration) {
        while let Some((seq, id)) = self.order.front() {
            // `None`: taken, or put again later under a newer place.
            let state = self
                .map
                .get(id)
                .filter(|(s, _, _)| s == seq)
                .map(|(_, at, _)| now.duration_since(*at) <= max_age);
            match state {
                Some(true) => break,
                Some(false) => {
                    let id = id.clone();
                    self.forget(&id);
                }
                None => {}
            }
            self.order.pop_front();
        }
    }

    fn forget(&mut self, id: &str) -> Option<Wire> {
        let (_, _, wire) = self.map.remove(id)?;
        self.bytes -= wire.recipients.len();
        Some(wire)
    }
}

impl Default for Fresh {
    fn default() -> Self {
        Self::new(BUDGET, MAX_AGE)
    }
}

impl Fresh {
    /// Entries up to `budget` bytes together, each kept at most `max_age`.
    pub fn new(budget: usize, max_age: Duration) -> Self {
        Self {
            budget,
            max_age,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every change to `Inner` is completed before its lock is released: a poisoned lock holds
        // consistent entries.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a batch's recipients; whether they were kept. When the budget is taken, new entries
    /// are not kept (the batches waiting longest, next to be sent, keep theirs).
    pub fn put(&self, batch_id: String, wire: Wire) -> bool {
        self.put_at(batch_id, wire, Instant::now())
    }

    /// [`Fresh::put`] at `now` (tests set the clock).
    fn put_at(&self, batch_id: String, wire: Wire, now: Instant) -> bool {
        let mut inner = self.lock();
        inner.drop_stale(now, self.max_age);
        if inner.bytes + wire.recipients.len() > self.budget {
            return false;
        }
        let seq = inner.next;
        inner.next += 1;
        inner.bytes += wire.recipients.len();
        inner.order.push_back((seq, batch_id.clone()));
        if let Some((_, _, old)) = inner.map.insert(batch_id, (seq, now, wire)) {
            inner.bytes -= old.recipients.len();
        }
        true
    }

    /// Drops the entries older than the age limit now. A put does that too, but an idle daemon
    /// has no puts, and would keep whatever its last load left (a batch claimed before its
    /// recipients were kept, say) up to the whole budget until the next trigger.
    pub fn expire(&self) {
        self.expire_at(Instant::now());
    }

    /// [`Fresh::expire`] at `now` (tests set the clock).
    fn expire_at(&self, now: Instant) {
        let mut inner = self.lock();
        inner.drop_stale(now, self.max_age);
        if inner.map.is_empty() {
            // A load's worth of slots is not needed while idle.
            inner.order.clear();
            inner.map.shrink_to_fit();
            inner.order.shrink_to_fit();
        }
    }

    /// How many more bytes of recipients would be kept now (stale entries dropped first).
    #[cfg(test)]
    fn room(&self, now: Instant) -> usize {
        let mut inner = self.lock();
        inner.drop_stale(now, self.max_age);
        self.budget.saturating_sub(inner.bytes)
    }

    /// Takes a batch's recipients, if they are still here.
    pub fn take(&self, batch_id: &str) -> Option<Wire> {
        let mut inner = self.lock();
        let wire = inner.forget(batch_id)?;
        // Taken ids stay in `order` until the front reaches them: keep it from growing without
        // bound when entries are always taken before the budget or the age would drop them.
        if inner.order.len() > 2 * inner.map.len() + 1024 {
            let Inner { map, order, .. } = &mut *inner;
            order.retain(|(seq, id)| map.get(id).is_some_and(|(s, _, _)| s == seq));
        }
        Some(wire)
    }

    /// How many entries and bytes are kept.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.map.len(), inner.bytes)
    }

    #[cfg(test)]
    fn order_len(&self) -> usize {
        self.lock().order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(n: usize) -> Wire {
        Wire {
            generation: 1,
            recipients: vec![b'x'; n],
            count: 1,
        }
    }

    #[test]
    fn entries_are_taken_once() {
        let f = Fresh::new(100, MAX_AGE);
        assert!(f.put("a".into(), wire(10)));
        assert_eq!(f.usage(), (1, 10));
        assert_eq!(f.take("a"), Some(wire(10)));
        assert_eq!(f.take("a"), None);
        assert_eq!(f.usage(), (0, 0));
    }

    #[test]
    fn a_full_budget_keeps_the_oldest_entries() {
        let f = Fresh::new(25, MAX_AGE);
        assert!(f.put("a".into(), wire(10)));
        assert!(f.put("b".into(), wire(10)));
        assert!(!f.put("c".into(), wire(10)), "over the budget");
        assert_eq!(f.take("c"), None);
        assert!(f.take("a").is_some());
        assert!(f.put("c".into(), wire(10)), "room again once one is taken");
        assert_eq!(f.usage(), (2, 20));
        assert_eq!(f.room(Instant::now()), 5);
        assert!(
            !f.put("big".into(), wire(26)),
            "larger than the whole budget"
        );
    }

    #[test]
    fn old_entries_are_dropped() {
        let f = Fresh::new(100, Duration::from_secs(1));
        let start = Instant::now();
        assert!(f.put_at("a".into(), wire(10), start));
        let later = start + Duration::from_millis(1001);
        assert!(f.put_at("b".into(), wire(10), later));
        assert_eq!(f.take("a"), None, "older than the age limit");
        assert_eq!(f.usage(), (1, 10));
        assert_eq!(
            f.room(later + Duration::from_secs(1)),
            90,
            "an entry as old as the limit is kept"
        );
        assert_eq!(
            f.room(later + Duration::from_millis(1001)),
            100,
            "an entry too old takes no room"
        );
        assert_eq!(f.usage(), (0, 0));
    }

    #[test]
    fn old_entries_are_dropped_without_a_put() {
        let f = Fresh::new(100, Duration::from_millis(500));
        let start = Instant::now();
        assert!(f.put_at("taken".into(), wire(10), start) && f.take("taken").is_some());
        assert!(f.put_at("a".into(), wire(10), start));
        f.expire_at(start + Duration::from_millis(500));
        assert_eq!(f.usage(), (1, 10), "not yet too old");
        f.expire_at(start + Duration::from_millis(501));
        assert_eq!(f.usage(), (0, 0));
        assert_eq!(f.order_len(), 0, "no slots kept while idle");
    }

    #[test]
    fn putting_an_id_again_replaces_its_entry() {
        let f = Fresh::new(100, MAX_AGE);
        assert!(f.put("a".into(), wire(10)));
        assert!(f.put("a".into(), wire(20)));
        assert_eq!(f.usage(), (1, 20));
        assert_eq!(f.take("a"), Some(wire(20)));
        assert_eq!(f.usage(), (0, 0));
    }

    #[test]
    fn taken_ids_do_not_pile_up() {
        let f = Fresh::new(1 << 20, MAX_AGE);
        for i in 0..10_000 {
            assert!(f.put(format!("b{i}"), wire(1)));
            assert!(f.take(&format!("b{i}")).is_some());
        }
        assert!(f.order_len() <= 1025, "{} ids kept", f.order_len());
        assert_eq!(f.usage(), (0, 0));
    }
}
