//! Batch payloads in append-only files beside the queue file.
//!
//! The users of a new batch are written once, to the end of a *segment* file in the directory
//! `<queue file>-payloads/`, and the batch's row in the queue file records where (segment,
//! offset, length). Stored inside SQLite they were written three times (into the log, into the
//! file at a checkpoint, and again to free their pages once delivered); here they are written once
//! and go away with their segment file once no batch points into it.
//!
//! The rules that keep this crash-safe:
//! - The writer appends a group's payloads and `fdatasync`s the segment **before** it commits the
//!   rows that point into it, and a trigger is answered only after that commit. Bytes whose rows
//!   never committed (a crash in between) are never read.
//! - A segment is only ever appended to by the one writer that created it, which holds an
//!   exclusive `flock` on it while it does (the file is created under a temporary name, locked,
//!   then renamed into place, so no one can see it unlocked before it is in use). A process
//!   killed mid-write loses its lock with it, and its segment is never appended to again.
//! - A segment is deleted only if no writer holds its lock (the sweeper takes the lock first) and
//!   no row points into it, as read after taking the lock, inside a transaction whose commit is
//!   `fsync`'d before anything is deleted (so no power cut can bring back a row that pointed
//!   there).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::store::now_ms;

/// A segment stops taking payloads once it is this long; the next group starts a new one.
pub const SEGMENT_BYTES: u64 = 16 << 20;

/// Where a batch's users are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// The segment.
    pub segment: i64,
    /// Where in it.
    pub offset: u64,
    /// How many bytes.
    pub len: u64,
}

/// The directory of segments of a queue file, for reading and sweeping.
#[derive(Debug)]
pub struct Segments {
    dir: PathBuf,
    /// Segments open for reading.
    open: Mutex<HashMap<i64, Arc<File>>>,
}

/// The segments directory of a queue file.
pub fn dir_of(queue: &Path) -> PathBuf {
    let mut name = queue.as_os_str().to_owned();
    name.push("-payloads");
    PathBuf::from(name)
}

fn file_name(segment: i64) -> String {
    format!("{segment:016x}.seg")
}

fn parse_name(name: &str) -> Option<i64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 {
        return None;
    }
    i64::from_str_radix(hex, 16).ok()
}

impl Segments {
    /// The segments of the queue file at `queue` (the directory is created when first written).
    pub fn new(queue: &Path) -> Self {
        Self {
            dir: dir_of(queue),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, segment: i64) -> PathBuf {
        self.dir.join(file_name(segment))
    }

    /// Reads a batch's users.
    pub fn read(&self, span: Span) -> Result<Vec<u8>, String> {
        let path = self.path(span.segment);
        let shown = || path.display().to_string();
        let file = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            match open.get(&span.segment) {
                Some(f) => f.clone(),
                None => {
                    let f = Arc::new(File::open(&path).map_err(|e| {
                        format!("the stored users cannot be read from {}: {e}", shown())
                    })?);
                    open.insert(span.segment, f.clone());
                    f
                }
            }
        };
        let len = usize::try_from(span.len)
            .map_err(|_| format!("a stored batch in {} is too long to read", shown()))?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, span.offset).map_err(|e| {
            format!(
                "the stored users cannot be read from {} at {}+{}: {e}",
                shown(),
                span.offset,
                span.len
            )
        })?;
        Ok(buf)
    }

    /// Locks every segment file no writer holds, except `current` (the caller's own), for a
    /// sweep; also collects creations abandoned over a minute ago. Returns them and how many
    /// segments were in use by other writers.
    pub fn lock_unused(&self, current: Option<i64>) -> std::io::Result<(Vec<Unused>, usize)> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(e),
        };
        let (mut unused, mut in_use) = (Vec::new(), 0);
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let id = parse_name(name);
            if id.is_none() {
                let abandoned = name.ends_with(".seg.new")
                    && entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok())
                        .is_some_and(|age| age > Duration::from_secs(60));
                if !abandoned {
                    continue;
                }
            }
            if id.is_some() && id == current {
                continue;
            }
            let Ok(file) = File::open(entry.path()) else {
                continue;
            };
            // A writer holds its segment's lock for as long as it may append to it.
            if file.try_lock().is_err() {
                in_use += 1;
                continue;
            }
            unused.push(Unused {
                id,
                path: entry.path(),
                _lock: file,
            });
        }
        Ok((unused, in_use))
    }

    /// Deletes segments locked by [`Segments::lock_unused`] that no row points into (as read
    /// after they were locked, inside a transaction whose commit was fsync'd). Deleting a large
    /// file can take a while on some file systems, so the writer leaves this to another thread.
    pub fn delete(&self, unused: Vec<Unused>) -> std::io::Result<()> {
        for u in unused {
            match std::fs::remove_file(&u.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            if let Some(id) = u.id {
                self.open
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
        }
        Ok(())
    }
}

/// A segment file locked for a sweep (the lock goes with this value).
#[derive(Debug)]
pub struct Unused {
    /// The segment (`None` for an abandoned creation).
    id: Option<i64>,
    path: PathBuf,
    _lock: File,
}

impl Unused {
    /// The segment (`None` for an abandoned creation).
    pub fn id(&self) -> Option<i64> {
        self.id
    }
}

/// The writer's end: the segment it appends to.
#[derive(Debug)]
pub struct Appender {
    dir: PathBuf,
    current: Option<(i64, File, u64)>,
}

impl Appender {
    /// Appends into the segments directory of the queue file at `queue`.
    pub fn new(queue: &Path) -> Self {
        Self {
            dir: dir_of(queue),
            current: None,
        }
    }

    /// The segment being appended to, if any.
    pub fn current(&self) -> Option<i64> {
        self.current.as_ref().map(|(id, ..)| *id)
    }

    /// Appends every payload, in order, and syncs them to disk; returns where each went. On an
    /// error the segment is given up (the next append starts a new one), so a torn tail is never
    /// appended after.
    pub fn append(&mut self, payloads: &[&[u8]]) -> std::io::Result<Vec<Span>> {
        let written = self.append_inner(payloads);
        if written.is_err() {
            self.current = None;
        }
        written
    }

    fn append_inner(&mut self, payloads: &[&[u8]]) -> std::io::Result<Vec<Span>> {
        if self
            .current
            .as_ref()
            .is_none_or(|(_, _, len)| *len >= SEGMENT_BYTES)
        {
            self.current = None;
            self.current = Some(self.create()?);
        }
        let Some((segment, file, len)) = self.current.as_mut() else {
            return Err(std::io::Error::other("no segment to append to"));
        };
        let mut spans = Vec::with_capacity(payloads.len());
        for p in payloads {
            file.write_all(p)?;
            spans.push(Span {
                segment: *segment,
                offset: *len,
                len: p.len() as u64,
            });
            *len += p.len() as u64;
        }
        file.sync_data()?;
        Ok(spans)
    }

    /// A new, empty, locked segment: created under a temporary name, locked, renamed into place,
    /// and the directory synced so the name survives a power cut.
    fn create(&self) -> std::io::Result<(i64, File, u64)> {
        crate::store::create_private_dir(&self.dir)?;
        for _ in 0..16 {
            let mut random = [0u8; 2];
            getrandom::fill(&mut random).map_err(std::io::Error::other)?;
            // Time first (so names sort by age), then 12 random bits against collisions.
            let id = (now_ms() << 12) | i64::from(u16::from_le_bytes(random) & 0xfff);
            let fin = self.dir.join(file_name(id));
            let tmp = self.dir.join(format!("{}.new", file_name(id)));
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let file = match opts.open(&tmp) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            };
            file.try_lock().map_err(std::io::Error::other)?;
            if fin.exists() {
                let _ = std::fs::remove_file(&tmp);
                continue;
            }
            std::fs::rename(&tmp, &fin)?;
            File::open(&self.dir)?.sync_all()?;
            return Ok((id, file, 0));
        }
        Err(std::io::Error::other(
            "cannot find a free name for a new segment",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_read_back_and_unreferenced_segments_go() {
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("queue.db");
        let segments = Segments::new(&queue);
        let mut appender = Appender::new(&queue);
        let spans = appender.append(&[b"first", b"", b"third"]).unwrap();
        assert_eq!(spans[0].offset, 0);
        assert_eq!(spans[2].offset, 5);
        assert_eq!(segments.read(spans[0]).unwrap(), b"first");
        assert_eq!(segments.read(spans[1]).unwrap(), b"");
        assert_eq!(segments.read(spans[2]).unwrap(), b"third");
        let first = appender.current().unwrap();

        // The segment in use is not even looked at by its own writer, and another one (here: the
        // same process, through another handle) cannot lock it.
        let (unused, in_use) = segments.lock_unused(Some(first)).unwrap();
        assert_eq!((unused.len(), in_use), (0, 0));
        let (unused, in_use) = segments.lock_unused(None).unwrap();
        assert_eq!((unused.len(), in_use), (0, 1));
        assert_eq!(segments.read(spans[2]).unwrap(), b"third");

        // Given up (as after an error), it is unlocked: swept, since nothing points into it.
        drop(appender);
        let (unused, in_use) = segments.lock_unused(None).unwrap();
        assert_eq!((unused.len(), in_use), (1, 0));
        segments.delete(unused).unwrap();
        assert_eq!(segments.lock_unused(None).unwrap().0.len(), 0);
        let gone = segments.read(spans[0]).unwrap_err();
        assert!(gone.contains("cannot be read from"), "{gone}");
        assert!(gone.contains(&file_name(first)), "{gone}");
    }

    #[test]
    fn a_referenced_segment_is_kept_and_reads_past_its_end_fail() {
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("queue.db");
        let segments = Segments::new(&queue);
        let mut appender = Appender::new(&queue);
        let span = appender.append(&[b"users"]).unwrap()[0];
        drop(appender);
        let (unused, _) = segments.lock_unused(None).unwrap();
        assert_eq!(unused.len(), 1);
        assert_eq!(unused[0].id(), Some(span.segment));
        drop(unused);
        assert_eq!(segments.read(span).unwrap(), b"users");
        let past = Span { len: 6, ..span };
        assert!(segments.read(past).unwrap_err().contains("+6"));
    }

    #[test]
    fn a_full_segment_is_followed_by_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("queue.db");
        let mut appender = Appender::new(&queue);
        let big = vec![b'x'; SEGMENT_BYTES as usize];
        let a = appender.append(&[&big]).unwrap()[0];
        let b = appender.append(&[b"next"]).unwrap()[0];
        assert_ne!(a.segment, b.segment);
        assert_eq!(b.offset, 0);
        let names: Vec<_> = std::fs::read_dir(dir_of(&queue))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|n| parse_name(n).is_some()), "{names:?}");
    }
}
