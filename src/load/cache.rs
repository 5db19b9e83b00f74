//! Reading a tree again after a change, reading again only the files that changed. Each file's
//! outcome (its touchpoint, or its diagnostics) is kept with a stamp of what was read: for a file
//! on disk its device, inode, size, modification and change times (the change time moves on every
//! write and cannot be set back); for a file at a git revision its blob id. The next load walks the
//! whole tree again (so new, renamed, moved and deleted files are seen whether or not anyone said
//! so) and reads a file only when its stamp differs, or when the stamp was taken so soon after the
//! file last changed that a later write could have left it the same (the clock the file system
//! stamps with moves in steps: such a file is read again until its stamp has settled). The
//! cross-file checks run over the whole tree every time, as for a tree read whole.
//!
//! What it does not see: a change that keeps every part of the stamp (possible only by writing the
//! device directly, or on a file system whose clock is far behind this machine's). Callers read
//! the whole tree again from time to time ([`TreeCache::clear`]).

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use rayon::prelude::*;

use super::{Checked, Desired, Diagnostic, Found, LoadError, Source, checked, read_source, walk};
use crate::model::SecretRef;

/// A file whose times are within this of the start of a load is read again by the next one:
/// long enough for file systems that stamp to the second.
const SETTLE: Duration = Duration::from_secs(2);

/// What a file was when it was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stamp {
    /// A file on disk (links followed).
    File {
        /// The device.
        dev: u64,
        /// The inode.
        ino: u64,
        /// The size in bytes.
        size: u64,
        /// The modification time, in nanoseconds since the epoch.
        mtime: i128,
        /// The status change time, in nanoseconds since the epoch.
        ctime: i128,
    },
    /// A blob at a git revision.
    Blob(git2::Oid),
}

impl Stamp {
    /// The stamp of the file at `path` (links followed), if it can be read.
    pub fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(Stamp::File {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: ns(m.mtime(), m.mtime_nsec()),
            ctime: ns(m.ctime(), m.ctime_nsec()),
        })
    }

    /// Whether a read made at `started` surely saw the content this stamp describes: the file
    /// had not changed for [`SETTLE`] by then. A blob's id names its content, so it always has.
    fn settled(&self, started: SystemTime) -> bool {
        match self {
            Stamp::Blob(_) => true,
            Stamp::File { mtime, ctime, .. } => {
                let since_epoch = started
                    .checked_sub(SETTLE)
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
                *mtime < since_epoch && *ctime < since_epoch
            }
        }
    }
}

struct Cached {
    /// `None` when the file could not be looked at: read again next time.
    stamp: Option<Stamp>,
    /// Whether the stamp can be trusted to change with the content (see [`Stamp::settled`]).
    settled: bool,
    checked: Checked,
    /// The secret files its touchpoint names (see [`TreeCache::secret_users`]).
    secret_files: Vec<PathBuf>,
    /// The load that last listed it; a file not listed by the latest one is gone.
    seen: u64,
}

/// Paths are compared as bytes, hashed by a fast hasher: the map is looked up once for every file
/// of the tree on every load.
type ByPath<V> = HashMap<OsString, V, foldhash::fast::RandomState>;

/// A tree as last read: each file's outcome and stamp, by path.
#[derive(Default)]
pub struct TreeCache {
    files: ByPath<Cached>,
    /// Counts loads, for [`Cached::seen`].
    loads: u64,
}

/// A tree read again.
#[derive(Debug)]
pub struct Reload {
    /// The whole tree, as a fresh load would give it.
    pub desired: Desired,
    /// The ids of the touchpoints in the files that hold something else than at the last load
    /// (another spec, another id, or problems), that are new, or that are gone: as they were and
    /// as they are. Every touchpoint whose desired state may have changed.
    pub changed: BTreeSet<String>,
    /// How many files were read this time.
    pub read: usize,
}

/// One entry of a listing, in path order.
enum Listed {
    File(PathBuf, Option<Stamp>),
    Refused(Diagnostic),
}

impl TreeCache {
    /// Forgets every file, so that the next load reads them all.
    pub fn clear(&mut self) {
        self.files.clear();
    }

    /// Loads the tree under `dir` as [`super::load_dir`] does, reading only the files that changed.
    pub fn load_dir(&mut self, dir: &Path) -> Result<Reload, LoadError> {
        let started = SystemTime::now();
        let listing: Vec<Listed> = walk(dir)?
            .into_par_iter()
            .map(|found| match found {
                Found::File(path) => {
                    let stamp = Stamp::of(&path);
                    Listed::File(path, stamp)
                }
                Found::Refused(d) => Listed::Refused(d),
            })
            .collect();
        let fresh: Vec<(usize, Checked)> = self
            .stale(&listing)
            .into_par_iter()
            .map(|(i, path, _)| (i, checked(read_source(path))))
            .collect();
        self.update(listing, fresh, started)
    }

    /// Loads the files `(path, blob id or why a link there is refused)` of a git revision, in
    /// path order, reading with `read` only the blobs that are not held already.
    pub fn load_blobs(
        &mut self,
        files: Vec<(PathBuf, Result<git2::Oid, Diagnostic>)>,
        mut read: impl FnMut(&Path, git2::Oid) -> Result<Source, Diagnostic>,
    ) -> Result<Reload, LoadError> {
        let started = SystemTime::now();
        let listing: Vec<Listed> = files
            .into_iter()
            .map(|(path, oid)| match oid {
                Ok(oid) => Listed::File(path, Some(Stamp::Blob(oid))),
                Err(refused) => Listed::Refused(refused),
            })
            .collect();
        // The repository is read from one thread; the files are checked on all.
        let sources: Vec<(usize, Result<Source, Diagnostic>)> = self
            .stale(&listing)
            .into_iter()
            .filter_map(|(i, path, stamp)| match stamp {
                Some(Stamp::Blob(oid)) => Some((i, read(path, oid))),
                _ => None,
            })
            .collect();
        let fresh = sources
            .into_par_iter()
            .map(|(i, source)| (i, checked(source)))
            .collect();
        self.update(listing, fresh, started)
    }

    /// The files of `listing` that must be read, with their positions and stamps.
    fn stale<'a>(&self, listing: &'a [Listed]) -> Vec<(usize, &'a Path, Option<Stamp>)> {
        listing
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match l {
                Listed::File(path, stamp) => {
                    let kept = self
                        .files
                        .get(path.as_os_str())
                        .is_some_and(|c| c.settled && c.stamp.is_some() && c.stamp == *stamp);
                    (!kept).then_some((i, path.as_path(), *stamp))
                }
                Listed::Refused(_) => None,
            })
            .collect()
    }

    /// Keeps the outcomes of `listing` (the `fresh` ones just read, the others as held) and joins
    /// them into the tree.
    fn update(
        &mut self,
        listing: Vec<Listed>,
        mut fresh: Vec<(usize, Checked)>,
        started: SystemTime,
    ) -> Result<Reload, LoadError> {
        let read = fresh.len();
        fresh.sort_unstable_by_key(|(i, _)| *i);
        self.loads += 1;
        let load = self.loads;
        let mut changed = BTreeSet::new();
        let mut note = |c: &Checked| {
            if let Some(l) = c.loaded() {
                changed.insert(l.touchpoint.id().to_string());
            }
        };
        let mut fresh = fresh.into_iter().peekable();
        // The outcomes in path order, for the cross-file checks; refused links are not kept.
        let mut order: Vec<Result<OsString, Checked>> = Vec::with_capacity(listing.len());
        for (i, entry) in listing.into_iter().enumerate() {
            let (path, stamp) = match entry {
                Listed::File(path, stamp) => (path.into_os_string(), stamp),
                Listed::Refused(d) => {
                    order.push(Err(Checked::failed(d)));
                    continue;
                }
            };
            match fresh.next_if(|(at, _)| *at == i) {
                Some((_, checked)) => {
                    let cached = Cached {
                        settled: stamp.is_some_and(|s| s.settled(started)),
                        stamp,
                        secret_files: secret_files(&checked),
                        checked,
                        seen: load,
                    };
                    let previous = self.files.insert(path.clone(), cached);
                    // A file read again as it was (its stamp had not settled) is no change.
                    let now = &self.files[&path].checked;
                    if !previous.as_ref().is_some_and(|p| same(&p.checked, now)) {
                        note(now);
                        if let Some(p) = &previous {
                            note(&p.checked);
                        }
                    }
                }
                None => match self.files.get_mut(&path) {
                    Some(kept) => kept.seen = load,
                    // Every file not held is read; were one not, it must not look deleted.
                    None => {
                        order.push(Err(Checked::failed(super::file_diag(
                            &Path::new(&path).display().to_string(),
                            "io",
                            "the file was not read: it is read again on the next reconcile".into(),
                        ))));
                        continue;
                    }
                },
            }
            order.push(Ok(path));
        }
        // Files gone since the last load.
        self.files.retain(|_, c| {
            let listed = c.seen == load;
            if !listed {
                note(&c.checked);
            }
            listed
        });
        let checked = order.iter().map(|o| match o {
            Ok(path) => &self.files[path].checked,
            Err(refused) => refused,
        });
        let desired = super::combine(checked)?;
        Ok(Reload {
            desired,
            changed,
            read,
        })
    }

    /// The ids of the touchpoints with a secret file reference that names one of `paths`
    /// (compared as written, relative parts resolved against the current folder, links not
    /// followed).
    pub fn secret_users<'a>(&self, paths: impl IntoIterator<Item = &'a Path>) -> BTreeSet<String> {
        let wanted: std::collections::HashSet<PathBuf> = paths.into_iter().map(lexical).collect();
        if wanted.is_empty() {
            return BTreeSet::new();
        }
        self.files
            .values()
            .filter(|c| c.secret_files.iter().any(|f| wanted.contains(f)))
            .filter_map(|c| c.checked.loaded())
            .map(|l| l.touchpoint.id().to_string())
            .collect()
    }
}

/// Whether two outcomes of one file hold the same touchpoint, read from the same place.
fn same(a: &Checked, b: &Checked) -> bool {
    match (a.loaded(), b.loaded()) {
        (Some(a), Some(b)) => a.spec == b.spec && a.file == b.file && a.dir == b.dir,
        _ => false,
    }
}

/// The secret files the touchpoint of a file names, as [`lexical`] paths.
fn secret_files(c: &Checked) -> Vec<PathBuf> {
    let Some(l) = c.loaded() else {
        return Vec::new();
    };
    l.touchpoint
        .secrets()
        .into_iter()
        .filter_map(|(_, r)| match r {
            SecretRef::File { file } => Some(lexical(&l.dir.join(file))),
            SecretRef::Env { .. } => None,
        })
        .collect()
}

/// `path` made absolute against the current folder, with `.` and `..` resolved as written.
fn lexical(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, id: &str, extra: &str) {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            path,
            format!(
                "id = \"{id}\"\nname = \"{id}\"\nkind = \"custom\"\ncategory = \"notification\"\nurl = \"https://example.com/{id}\"\nauth_token = {{ env = \"T\" }}\n{extra}\n[dynamic_params]\nphone = \"user.phone\"\n"
            ),
        )
        .unwrap();
    }

    /// Takes every file held as settled, as if it had been written long before it was read.
    fn settle(cache: &mut TreeCache) {
        for c in cache.files.values_mut() {
            c.settled = true;
        }
    }

    fn ids(d: &Desired) -> Vec<&str> {
        d.touchpoints.iter().map(|l| l.touchpoint.id()).collect()
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_settled_file_is_not_read_again_and_a_changed_one_is() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "a.toml", "a", "");
        write(dir, "sub/b.toml", "b", "");
        let mut cache = TreeCache::default();
        let first = cache.load_dir(dir).unwrap();
        assert_eq!((first.read, ids(&first.desired)), (2, vec!["a", "b"]));
        assert_eq!(first.changed, set(&["a", "b"]));
        // Just written, so not settled: read again, and nothing is taken for a change.
        let again = cache.load_dir(dir).unwrap();
        assert_eq!((again.read, again.changed.len()), (2, 0));
        settle(&mut cache);
        let settled = cache.load_dir(dir).unwrap();
        assert_eq!((settled.read, settled.changed.len()), (0, 0));
        assert_eq!(ids(&settled.desired), ["a", "b"]);
        settle(&mut cache);
        write(dir, "sub/b.toml", "b", "batch_size = 7\n");
        let edited = cache.load_dir(dir).unwrap();
        assert_eq!((edited.read, edited.changed), (1, set(&["b"])));
        let b = &edited.desired.touchpoints[1];
        assert_eq!(b.spec.value()["batch_size"], 7);
    }

    #[test]
    fn renamed_deleted_and_new_files_are_changes_of_their_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "a.toml", "a", "");
        write(dir, "b.toml", "b", "");
        write(dir, "c.toml", "c", "");
        let mut cache = TreeCache::default();
        cache.load_dir(dir).unwrap();
        settle(&mut cache);
        std::fs::create_dir_all(dir.join("moved")).unwrap();
        std::fs::rename(dir.join("a.toml"), dir.join("moved/a.toml")).unwrap();
        std::fs::remove_file(dir.join("b.toml")).unwrap();
        write(dir, "d.toml", "d", "");
        // `c.toml` now holds another id: both are changes.
        write(dir, "c.toml", "e", "");
        let r = cache.load_dir(dir).unwrap();
        assert_eq!(ids(&r.desired), ["a", "d", "e"]);
        assert_eq!(r.changed, set(&["a", "b", "c", "d", "e"]));
        assert_eq!(
            r.read, 3,
            "the moved file, the new one and the rewritten one"
        );
    }

    #[test]
    fn duplicate_ids_are_found_across_files_read_at_different_times() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "a.toml", "a", "");
        write(dir, "b.toml", "b", "");
        let mut cache = TreeCache::default();
        cache.load_dir(dir).unwrap();
        settle(&mut cache);
        write(dir, "b.toml", "a", "");
        match cache.load_dir(dir) {
            Err(LoadError::Invalid(d)) => {
                assert_eq!(d.len(), 1);
                assert_eq!(d[0].code, "duplicate-id");
                assert!(d[0].path.ends_with("b.toml"), "{}", d[0]);
            }
            other => panic!("expected a duplicate id, got {other:?}"),
        }
        // Fixed: the tree loads again, and the file with the problem was read again.
        write(dir, "b.toml", "b", "");
        let r = cache.load_dir(dir).unwrap();
        assert_eq!(ids(&r.desired), ["a", "b"]);
    }

    #[test]
    fn a_file_changed_while_its_stamp_could_not_tell_is_read_again() {
        let started = SystemTime::now();
        let at = |t: SystemTime| {
            i128::try_from(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos()).unwrap()
        };
        let stamp = |t: SystemTime| Stamp::File {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: at(t),
            ctime: at(t),
        };
        assert!(!stamp(started).settled(started), "written as it was read");
        assert!(!stamp(started - Duration::from_secs(1)).settled(started));
        assert!(stamp(started - Duration::from_secs(3)).settled(started));
        assert!(Stamp::Blob(git2::Oid::ZERO_SHA1).settled(started));
    }

    #[test]
    fn secret_users_names_the_touchpoints_reading_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "a.toml", "a", "");
        std::fs::write(
            dir.join("b.toml"),
            "id = \"b\"\nname = \"b\"\nkind = \"custom\"\ncategory = \"notification\"\nurl = \"https://example.com/b\"\nauth_token = { file = \"secrets/../secrets/token\" }\n[dynamic_params]\nphone = \"user.phone\"\n",
        )
        .unwrap();
        let mut cache = TreeCache::default();
        cache.load_dir(dir).unwrap();
        let token = dir.join("secrets/token");
        let other = dir.join("secrets/other");
        assert_eq!(
            cache.secret_users([token.as_path(), other.as_path()]),
            set(&["b"])
        );
        assert!(cache.secret_users([other.as_path()]).is_empty());
    }
}
