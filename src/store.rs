//! Owner-only SQLite files, shared by the registry and the dispatch queue: created mode 0600 in a
//! 0700 folder, WAL mode, and a choice of how hard each commit is pushed to disk.
//!
//! A new database file appears whole or not at all: it is built under a temporary name beside its
//! final one and linked into place only once its tables and keys are written (see
//! [`create_database`]). So an empty (0-byte) file is never one of ours half made, and is refused
//! instead of being taken for a new database; and two processes creating the same file at once
//! cannot both succeed.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

/// How a connection's commits reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sync {
    /// Every commit is fsync'd: survives a power cut. For what a caller was promised is stored.
    Full,
    /// Commits survive the process being killed, not a power cut; much cheaper. For bookkeeping
    /// whose loss only means work is done again.
    Normal,
}

/// Creates the file (and its folder) owner-only if it does not exist yet.
pub fn create_private(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        std::fs::create_dir_all(parent)?;
        restrict(parent, 0o700)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates a directory (and its parents) readable by the owner only, unless it exists.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        restrict(dir, 0o700)?;
    }
    Ok(())
}

fn restrict(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    let _ = (path, mode);
    Ok(())
}

/// Why a database file could not be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file system failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Another process created the file first.
    #[error("another process created it at the same time")]
    Exists,
    /// One of SQLite's working files is read-only and could not be made writable.
    #[error(
        "{path} is read-only and could not be made writable ({source}); it is SQLite's working file of the database beside it: make it writable by the database's owner, or remove it while no touchctl uses that database"
    )]
    ReadOnlyWorkingFile {
        /// The working file (`-shm` or `-wal`).
        path: String,
        /// Why it could not be changed.
        source: std::io::Error,
    },
}

/// What is at a database file's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing: a new database may be created there.
    Missing,
    /// An empty (0-byte) file: not a database, and not to be taken for a new one.
    Empty,
    /// A file with content.
    File,
}

/// What is at `path`.
pub fn found(path: &Path) -> std::io::Result<Found> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() == 0 => Ok(Found::Empty),
        Ok(_) => Ok(Found::File),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Found::Missing),
        Err(e) => Err(e),
    }
}

/// `path` with `suffix` added to its file name (SQLite's `-wal`, `-shm`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Creates a new database file at `path` whole: `init` writes its tables and keys into a file
/// under a temporary name in the same folder (owner-only, WAL mode), which is then linked into
/// place. Fails with [`StoreError::Exists`] if a file appeared at `path` in the meantime; nothing
/// is left behind then.
pub fn create_database(
    path: &Path,
    init: impl FnOnce(&Connection) -> rusqlite::Result<()>,
) -> Result<(), StoreError> {
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(folder) = folder {
        create_private_dir(folder)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "db".into());
    let temp = path.with_file_name(format!(".{name}.new-{}", random_hex(6)));
    let result = (|| -> Result<(), StoreError> {
        create_private(&temp)?;
        let conn = connect(&temp, Sync::Full)?;
        init(&conn)?;
        // The last connection to close checkpoints and removes the temporary file's -wal and
        // -shm: what is linked into place is one whole file.
        conn.close().map_err(|(_, e)| e)?;
        match std::fs::hard_link(&temp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(StoreError::Exists),
            // A file system without hard links: a rename, which would replace a file created
            // since the check, so look first (a far smaller window than none at all).
            Err(_) if !path.exists() => Ok(std::fs::rename(&temp, path)?),
            Err(_) => Err(StoreError::Exists),
        }
    })();
    let _ = std::fs::remove_file(&temp);
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(with_suffix(&temp, suffix));
    }
    result?;
    // The new name must survive a power cut as surely as the first commit written to it.
    if let Some(folder) = folder
        && let Ok(dir) = std::fs::File::open(folder)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// SQLite creates a database's `-shm` and `-wal` with the database file's mode. Opened while the
/// database file was read-only (mode 0400), it leaves them read-only, and once the database is
/// writable again every write fails with "attempt to write a readonly database". They are only
/// SQLite's working files: when this process may write the database, it makes them writable too
/// (owner-only, as the database).
fn repair_working_files(path: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if !writable(path) {
            return Ok(());
        }
        for suffix in ["-shm", "-wal"] {
            let file = with_suffix(path, suffix);
            let is_file = std::fs::symlink_metadata(&file).is_ok_and(|m| m.is_file());
            if is_file && !writable(&file) {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(
                    |source| StoreError::ReadOnlyWorkingFile {
                        path: file.display().to_string(),
                        source,
                    },
                )?;
            }
        }
    }
    let _ = path;
    Ok(())
}

/// Whether this process may write the file (which exists).
#[cfg(unix)]
fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// How long a connection waits for another one's lock before giving up.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens a database file in WAL mode with the given durability. (SQLite would create a missing
/// file: callers check with [`found`] first, and create one with [`create_database`].)
pub fn connect(path: &Path, sync: Sync) -> Result<Connection, StoreError> {
    repair_working_files(path)?;
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_WAIT)?;
    wal(&conn)?;
    conn.pragma_update(
        None,
        "synchronous",
        match sync {
            Sync::Full => "FULL",
            Sync::Normal => "NORMAL",
        },
    )?;
    Ok(conn)
}

/// Switches the file to WAL mode. Switching a new file takes an exclusive lock, and SQLite
/// answers "busy" at once, without waiting, when another process switching the same new file at
/// the same moment holds it: so retry, for as long as any other statement would wait.
fn wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_WAIT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            done => return done,
        }
    }
}

/// `bytes` random bytes as hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The OS random source failing is not something to recover from.
    getrandom::fill(&mut buf).unwrap_or_else(|e| panic!("the OS random source failed: {e}"));
    hex::encode(buf)
}

/// Whether a process with this id runs on this host.
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
