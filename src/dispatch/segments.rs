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
///
/// Where the file system allows it, a segment is written with `O_DIRECT`: the payloads go from
/// a block-aligned staging buffer straight to the disk, without being copied into the page cache
/// (and allocating it) first. Each append then starts on a block boundary and its last block is
/// padded with zeros; the spans point at the payloads only, so the padding is never read. Where
/// direct writes are refused (a file system without them, or a device wanting other alignment),
/// the segment falls back to ordinary writes, payloads back to back. Either way the segment is
/// `fdatasync`'d before the append returns.
#[derive(Debug)]
pub struct Appender {
    dir: PathBuf,
    current: Option<Current>,
    /// Staging for direct writes; the aligned part is cut out of it on each use.
    staging: Vec<u8>,
}

#[derive(Debug)]
struct Current {
    id: i64,
    file: File,
    /// Where the next append goes (a multiple of [`BLOCK`] while `direct`).
    len: u64,
    direct: bool,
}

/// The alignment of direct writes: the logical block size of nearly every disk (512 or 4096
/// bytes) divides it.
const BLOCK: usize = 4096;

/// At most this much is staged for one direct write; longer appends take several.
const STAGING_BYTES: usize = 2 << 20;

impl Appender {
    /// Appends into the segments directory of the queue file at `queue`.
    pub fn new(queue: &Path) -> Self {
        Self {
            dir: dir_of(queue),
            current: None,
            staging: Vec::new(),
        }
    }

    /// The segment being appended to, if any.
    pub fn current(&self) -> Option<i64> {
        self.current.as_ref().map(|c| c.id)
    }

    /// Whether the current segment is written directly.
    #[cfg(test)]
    fn direct(&self) -> Option<bool> {
        self.current.as_ref().map(|c| c.direct)
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
        if self.current.as_ref().is_none_or(|c| c.len >= SEGMENT_BYTES) {
            self.current = None;
            self.current = Some(self.create()?);
        }
        let Some(current) = self.current.as_mut() else {
            return Err(std::io::Error::other("no segment to append to"));
        };
        let start = current.len;
        let mut spans = Vec::with_capacity(payloads.len());
        let mut at = start;
        for p in payloads {
            spans.push(Span {
                segment: current.id,
                offset: at,
                len: p.len() as u64,
            });
            at += p.len() as u64;
        }
        let end = if current.direct {
            match write_direct(&current.file, &mut self.staging, payloads, start) {
                Ok(end) => end,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // The alignment or the file system refuses direct writes after all: write
                    // the same bytes again, the ordinary way (nothing after `start` is in use).
                    set_direct(&current.file, false)?;
                    current.direct = false;
                    write_buffered(&current.file, payloads, start)?
                }
                Err(e) => return Err(e),
            }
        } else {
            write_buffered(&current.file, payloads, start)?
        };
        current.file.sync_data()?;
        current.len = end;
        Ok(spans)
    }

    /// A new, empty, locked segment: created under a temporary name, locked, renamed into place,
    /// and the directory synced so the name survives a power cut.
    fn create(&self) -> std::io::Result<Current> {
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
            let direct = set_direct(&file, true).is_ok();
            return Ok(Current {
                id,
                file,
                len: 0,
                direct,
            });
        }
        Err(std::io::Error::other(
            "cannot find a free name for a new segment",
        ))
    }
}

/// Writes the payloads back to back from `at`; returns where they end.
fn write_buffered(file: &File, payloads: &[&[u8]], mut at: u64) -> std::io::Result<u64> {
    for p in payloads {
        file.write_all_at(p, at)?;
        at += p.len() as u64;
    }
    Ok(at)
}

/// Writes the payloads back to back from `at` (a block boundary) through `staging`, in aligned
/// pieces, the last one padded with zeros to a whole block; returns the block boundary after it.
fn write_direct(
    file: &File,
    staging: &mut Vec<u8>,
    payloads: &[&[u8]],
    mut at: u64,
) -> std::io::Result<u64> {
    let total: usize = payloads.iter().map(|p| p.len()).sum();
    let size = total.div_ceil(BLOCK).max(1) * BLOCK;
    let size = size.min(STAGING_BYTES);
    if staging.len() < size + BLOCK {
        staging.resize(size + BLOCK, 0);
    }
    let skew = staging.as_ptr().align_offset(BLOCK);
    let buf = staging
        .get_mut(skew..skew + size)
        .ok_or_else(|| std::io::Error::other("cannot align the staging buffer"))?;
    let mut filled = 0;
    let flush = |buf: &mut [u8], filled: usize, at: &mut u64| -> std::io::Result<()> {
        let padded = filled.div_ceil(BLOCK) * BLOCK;
        buf[filled..padded].fill(0);
        file.write_all_at(&buf[..padded], *at)?;
        *at += padded as u64;
        Ok(())
    };
    for p in payloads {
        let mut p: &[u8] = p;
        while !p.is_empty() {
            let n = p.len().min(size - filled);
            buf[filled..filled + n].copy_from_slice(&p[..n]);
            filled += n;
            p = &p[n..];
            if filled == size {
                flush(buf, filled, &mut at)?;
                filled = 0;
            }
        }
    }
    if filled > 0 {
        flush(buf, filled, &mut at)?;
    }
    Ok(at)
}

/// Turns direct writes on or off for an open file.
#[cfg(target_os = "linux")]
fn set_direct(file: &File, on: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is an open descriptor owned by `file` for the length of these calls, and
    // F_GETFL/F_SETFL only read and set its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let wanted = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, wanted) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Direct writes are only used on Linux; elsewhere segments are written the ordinary way.
#[cfg(not(target_os = "linux"))]
fn set_direct(_file: &File, on: bool) -> std::io::Result<()> {
    if on {
        Err(std::io::Error::from_raw_os_error(libc::EINVAL))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh queue directory: its segments, and a writer's end of them.
    fn queue_dir() -> (tempfile::TempDir, Segments, Appender) {
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("queue.db");
        let segments = Segments::new(&queue);
        let appender = Appender::new(&queue);
        (dir, segments, appender)
    }

    #[test]
    fn payloads_read_back_and_unreferenced_segments_go() {
        let (_dir, segments, mut appender) = queue_dir();
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
        let (_dir, segments, mut appender) = queue_dir();
        let span = appender.append(&[b"users"]).unwrap()[0];
        drop(appender);
        let (unused, _) = segments.lock_unused(None).unwrap();
        assert_eq!(unused.len(), 1);
        assert_eq!(unused[0].id(), Some(span.segment));
        drop(unused);
        assert_eq!(segments.read(span).unwrap(), b"users");
        // Past the end of the file (a direct write pads its last block, which reads as zeros).
        let file_len = std::fs::metadata(segments.path(span.segment))
            .unwrap()
            .len();
        let past = Span {
            len: file_len + 1,
            ..span
        };
        let error = segments.read(past).unwrap_err();
        assert!(error.contains(&format!("+{}", file_len + 1)), "{error}");
    }

    #[test]
    fn appends_after_the_first_start_on_a_block_boundary_when_written_directly() {
        let (_dir, segments, mut appender) = queue_dir();
        let a = appender.append(&[b"one", b"two"]).unwrap();
        let b = appender.append(&[b"three"]).unwrap();
        assert_eq!(a[1].offset, 3, "payloads of one append are back to back");
        let direct = appender.direct().unwrap();
        // Direct where the file system takes it (ext4, xfs, btrfs), ordinary writes elsewhere.
        assert_eq!(b[0].offset, if direct { BLOCK as u64 } else { 6 });
        for (span, text) in [(a[0], "one"), (a[1], "two"), (b[0], "three")] {
            assert_eq!(segments.read(span).unwrap(), text.as_bytes());
        }
        let len = std::fs::metadata(segments.path(b[0].segment))
            .unwrap()
            .len();
        assert_eq!(len, if direct { 2 * BLOCK as u64 } else { 11 });
    }

    #[test]
    fn a_direct_write_refused_is_written_again_the_ordinary_way() {
        let (_dir, segments, mut appender) = queue_dir();
        let first = appender.append(&[b"first"]).unwrap()[0];
        if appender.direct() != Some(true) {
            // This file system takes no direct writes at all: the ordinary path is the one the
            // other tests cover.
            return;
        }
        // An offset off the block boundary makes the kernel refuse the direct write (EINVAL),
        // as a device wanting larger blocks would.
        if let Some(current) = appender.current.as_mut() {
            current.len += 1;
        }
        let second = appender.append(&[b"second", b"third"]).unwrap();
        assert_eq!(appender.direct(), Some(false));
        assert_eq!(second[0].offset, BLOCK as u64 + 1);
        assert_eq!(second[1].offset, BLOCK as u64 + 7);
        let third = appender.append(&[b"fourth"]).unwrap()[0];
        assert_eq!(third.offset, BLOCK as u64 + 12, "back to back from now on");
        for (span, text) in [
            (first, "first"),
            (second[0], "second"),
            (second[1], "third"),
            (third, "fourth"),
        ] {
            assert_eq!(segments.read(span).unwrap(), text.as_bytes());
        }
    }

    #[test]
    fn staged_writes_cut_long_appends_into_blocks_and_pad_only_the_last() {
        // The staging logic alone, on an ordinary file (alignment only matters with O_DIRECT).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        let big: Vec<u8> = (0..STAGING_BYTES + 10).map(|i| (i % 251) as u8).collect();
        let mut staging = Vec::new();
        let end = write_direct(&file, &mut staging, &[b"ab", &big, b"c"], 0).unwrap();
        let total = 2 + big.len() + 1;
        assert_eq!(end, total.div_ceil(BLOCK) as u64 * BLOCK as u64);
        let end2 = write_direct(&file, &mut staging, &[b"z"], end).unwrap();
        assert_eq!(end2, end + BLOCK as u64);
        let text = std::fs::read(&path).unwrap();
        assert_eq!(text.len() as u64, end2);
        assert_eq!(&text[..2], b"ab");
        assert_eq!(&text[2..2 + big.len()], &big[..]);
        assert_eq!(text[total - 1], b'c');
        assert!(text[total..end as usize].iter().all(|&b| b == 0));
        assert_eq!(text[end as usize], b'z');
        assert!(staging.len() <= STAGING_BYTES + BLOCK);
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
