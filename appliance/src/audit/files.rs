//! The trail's files: naming, listing and reading them, the directory
//! lock that keeps a second writer out, and [`FileSink`], which appends
//! group commits to the live file, preallocates it with a spare made
//! ahead, and rotates it by size.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::error::SvsError;

pub(super) fn file_name(first_seq: u64) -> String {
    format!("audit-{first_seq:020}.jsonl")
}

pub(super) fn file_seq(name: &str) -> Option<u64> {
    name.strip_prefix("audit-")?
        .strip_suffix(".jsonl")
        .filter(|s| s.len() == 20)?
        .parse()
        .ok()
}

/// A trail file's records as written so far: its bytes up to the first NUL
/// byte. No record holds a NUL; the file being written (when records are
/// preallocated) is zero-filled after its last record, and a reader copying
/// it while a group is written may see that group's later pages before its
/// earlier ones, i.e. zeros and then data: the data is not yet committed.
pub fn read_trail_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(path)?;
    bytes.truncate(records_end(&bytes));
    Ok(bytes)
}

pub(super) fn records_end(bytes: &[u8]) -> usize {
    bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len())
}

/// `bytes` without the zeros at its end.
pub(crate) fn without_zero_tail(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)]
}

/// The name of the lock file in the audit directory.
pub(super) const LOCK_NAME: &str = ".svsd.lock";

/// One writer per trail: a second svsd started by hand beside the service
/// would chain its own records into the same files, and its start-up
/// recovery and exit would cut records the first has answered for.
pub(super) fn lock_dir(dir: &Path) -> Result<File, SvsError> {
    let path = dir.join(LOCK_NAME);
    let io = |e: std::io::Error| SvsError::AuditUnavailable(format!("{}: {e}", path.display()));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(io)?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(SvsError::AuditUnavailable(format!(
            "{} is in use by another process (is svsd already running?)",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// The trail's files, oldest first.
pub fn trail_files(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(file_seq) {
            files.push((seq, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// Where the writer puts bytes; a trait so tests can make it fail.
pub(super) trait Sink: Send {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
    fn len(&self) -> u64;
    fn rotate(&mut self, first_seq: u64) -> std::io::Result<()>;
    /// Leaves the file holding its records only (the writer stops).
    fn finish(&mut self) -> std::io::Result<()>;
}

pub(super) struct FileSink {
    dir: PathBuf,
    /// The name `file` was created or opened under.
    path: PathBuf,
    file: File,
    /// Bytes of records; the file may be longer (zero-filled).
    len: u64,
    /// Zero-fill each file to this size.
    preallocate: Option<u64>,
    /// The next file, being zero-filled in the background.
    spare: Option<Spare>,
    /// Held while this sink may write: see [`lock_dir`].
    _lock: File,
}

pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A new trail file, never one that exists: a name already taken (a file
/// or a planted symbolic link) is refused, not overwritten or followed.
fn new_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// Whether `path` (not followed if a link) names the open `file`.
fn names_file(path: &Path, file: &File) -> bool {
    match (rustix::fs::lstat(path), rustix::fs::fstat(file)) {
        (Ok(named), Ok(open)) => named.st_dev == open.st_dev && named.st_ino == open.st_ino,
        _ => false,
    }
}

/// An existing trail file, not through a symbolic link.
pub(super) fn open_existing(path: &Path, read: bool) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(read)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

/// Renames `from` to `to` unless `to` exists: a plain rename would replace
/// whatever holds the name (records, or a link planted there).
fn rename_new(from: &Path, to: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        // A file system without RENAME_NOREPLACE: a hard link refuses an
        // existing name too.
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes `size - from` zero bytes at `from`, `chunk` bytes at a time, each
/// chunk followed by `between()` (which may stop the fill with an error).
///
/// Real zeros, not fallocate: ext4 keeps fallocated space as unwritten
/// extents, and converting them is a journal commit again on the first
/// fdatasync after each write.
fn zero_fill(
    file: &File,
    from: u64,
    size: u64,
    chunk: usize,
    mut between: impl FnMut() -> std::io::Result<()>,
) -> std::io::Result<()> {
    let zeros = vec![0u8; chunk];
    let mut at = from;
    while at < size {
        let n = (size - at).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], at)?;
        at += n;
        between()?;
    }
    Ok(())
}

/// The next trail file, zero-filled by a thread of its own while the current
/// one fills, so that rotation is a rename: filling 64 MiB in the writer
/// stalled every answer for 40 ms at each rotation (measured).
pub(super) struct Spare {
    path: PathBuf,
    /// Dropped to stop the fill: wakes the thread from its pause at once.
    stop: Option<Sender<()>>,
    /// The filled file, kept open: rotation writes to the file this thread
    /// created, whatever is done to its name meanwhile.
    thread: JoinHandle<std::io::Result<File>>,
}

impl Spare {
    /// Hidden name: not a trail file until renamed.
    pub(super) const NAME: &'static str = ".audit-spare.tmp";
    /// Bytes written and flushed per step of the fill.
    const CHUNK: u64 = 256 << 10;

    fn start(dir: &Path, size: u64) -> Option<Spare> {
        let path = dir.join(Self::NAME);
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let p = path.clone();
        let thread = std::thread::Builder::new()
            .name("svs-audit-spare".into())
            .spawn(move || {
                // A spare of an earlier run, or a link planted under the
                // name: the name goes (a link's target is not touched) and
                // the spare is a new file.
                match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                let file = new_file(&p)?;
                // Paced: 256 KiB and a flush every 20 ms (12.5 MiB/s; 64
                // MiB in about 5 s, while the fastest batch load measured
                // fills a file in 7 s). The group commits' p99 on the
                // benchmark VM did not move with this running all along;
                // at 1 MiB per 10 ms it went from 1.1-1.4 to 2.4-3.4 ms.
                // Pacing by the trail's write rate instead (slower fills
                // at lower rates) was tried and made the half-peak tail
                // worse, not better: a longer, thinner disturbance.
                let mut at = 0;
                let filled = zero_fill(&file, 0, size, Self::CHUNK as usize, || {
                    file.sync_data()?;
                    at += Self::CHUNK;
                    if at >= size {
                        return Ok(());
                    }
                    match stopped.recv_timeout(Duration::from_millis(20)) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(()),
                        _ => Err(std::io::Error::other("stopped")),
                    }
                })
                .and_then(|()| file.sync_all());
                if filled.is_err() {
                    // At once, not at the next rotation: on a nearly full
                    // disk the trail needs this space now.
                    let _ = std::fs::remove_file(&p);
                }
                filled.map(|()| file)
            })
            .map_err(|e| tracing::warn!(error = %e, "audit: cannot start the spare file's thread"))
            .ok()?;
        Some(Spare {
            path,
            stop: Some(stop),
            thread,
        })
    }

    /// The zero-filled file, if it is ready; the caller renames it.
    fn take_ready(spare: &mut Option<Spare>) -> Option<(PathBuf, File)> {
        if !spare.as_ref()?.thread.is_finished() {
            return None;
        }
        let s = spare.take()?;
        match s.thread.join() {
            Ok(Ok(file)) => Some((s.path, file)),
            Ok(Err(e)) => {
                // Not left holding the disk space a plain file now needs.
                let _ = std::fs::remove_file(&s.path);
                tracing::warn!(error = %e, "audit: the spare file could not be zero-filled");
                None
            }
            Err(_) => None,
        }
    }

    fn discard(mut self) {
        drop(self.stop.take());
        let _ = self.thread.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl FileSink {
    /// Opens the file that starts at `first_seq`, creating it or continuing
    /// it after its records (start-up recovery has cut off anything else),
    /// and starts zero-filling the next one.
    pub(super) fn create(
        dir: &Path,
        first_seq: u64,
        preallocate: Option<u64>,
        lock: File,
    ) -> std::io::Result<FileSink> {
        let path = dir.join(file_name(first_seq));
        // Not append mode: records overwrite the zero-filled space. The
        // file exists when the chain goes on in it (recovery checked it).
        let file = match new_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => open_existing(&path, false)?,
            r => r?,
        };
        let len = file.metadata()?.len();
        if let Some(size) = preallocate.filter(|size| *size > len) {
            // Before the daemon is ready, so the writer may take the time.
            // Preallocation only makes commits cheaper: a disk too full for
            // it must not keep the trail (and signing) from starting.
            if let Err(e) =
                zero_fill(&file, len, size, 1 << 20, || Ok(())).and_then(|()| file.sync_all())
            {
                tracing::warn!(
                    file = %path.display(),
                    error = %e,
                    "audit: cannot zero-fill the trail file; writing it unfilled"
                );
                file.set_len(len)?;
                file.sync_all()?;
            }
        }
        // A spare of an earlier run (also one with preallocate = true).
        if preallocate.is_none() {
            match std::fs::remove_file(dir.join(Spare::NAME)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        sync_dir(dir)?;
        Ok(FileSink {
            dir: dir.to_path_buf(),
            path,
            file,
            len,
            preallocate,
            spare: preallocate.and_then(|size| Spare::start(dir, size)),
            _lock: lock,
        })
    }

    /// Whether records written to `file` are in the trail. A file removed
    /// while open (`rm -rf` of the directory, `mv` to another file system)
    /// stays writable and its fdatasync succeeds, so without this signing
    /// would go on with records no one can ever read. A rename (or a hard
    /// link and an unlink) keeps a link, so the name is checked too, at
    /// every commit: checked less often, a file renamed away just before a
    /// rotation was retired unnoticed with its acknowledged records. One
    /// fstat and one lstat per group commit, about 2 µs against the
    /// commit's 0.8 ms fdatasync.
    fn still_in_trail(&mut self) -> std::io::Result<()> {
        let open = rustix::fs::fstat(&self.file)?;
        if open.st_nlink == 0 {
            return Err(std::io::Error::other(format!(
                "{} was deleted while being written: records after it are in no trail",
                self.path.display()
            )));
        }
        match rustix::fs::lstat(&self.path) {
            Ok(named) if named.st_dev == open.st_dev && named.st_ino == open.st_ino => Ok(()),
            Ok(_) => Err(std::io::Error::other(format!(
                "{} no longer names the file being written (moved away or replaced): records after it are in no trail",
                self.path.display()
            ))),
            Err(e) => Err(std::io::Error::other(format!(
                "{}: {e}: the file being written was moved away: records after it are in no trail",
                self.path.display()
            ))),
        }
    }

    /// Cuts the file to its records (drops the zero-filled space), durably.
    fn finish_file(&mut self) -> std::io::Result<()> {
        if self.file.metadata()?.len() != self.len {
            self.file.set_len(self.len)?;
            self.file.sync_all()?;
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self.file.write_all_at(bytes, self.len) {
            // The spare's zeros are only there to make commits cheaper:
            // the records get the space first. Written again whole, at the
            // same place, over whatever part of it got in.
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                let Some(spare) = self.spare.take() else {
                    return Err(e);
                };
                spare.discard();
                tracing::warn!("audit: disk full; the spare file is deleted to make room");
                self.file.write_all_at(bytes, self.len)?;
            }
            r => r?,
        }
        self.len += bytes.len() as u64;
        Ok(())
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        self.still_in_trail()
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn rotate(&mut self, first_seq: u64) -> std::io::Result<()> {
        // The retired file is cut to its records, durably, before the next
        // one exists: only the newest file can ever hold zero-filled space.
        self.finish_file()?;
        let path = self.dir.join(file_name(first_seq));
        // Not ready (rotations faster than a fill): a plain file, appended
        // to, rather than a stall; the next rotation gets a spare again.
        // Either way the name must be free: whatever holds it was not made
        // by this writer and is refused rather than overwritten.
        let file = match Spare::take_ready(&mut self.spare) {
            Some((spare, file)) if names_file(&spare, &file) => {
                rename_new(&spare, &path).map(|()| file)
            }
            Some((spare, _)) => {
                // Swapped under svsd (a link, another file): renaming it
                // would put what someone else made into the trail.
                tracing::error!(
                    spare = %spare.display(),
                    "ALARM audit: the spare file was replaced by something svsd did not make; left alone, a new file is used"
                );
                new_file(&path)
            }
            None => new_file(&path),
        }
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.path = path;
        self.len = 0;
        if self.spare.is_none() {
            self.spare = self
                .preallocate
                .and_then(|size| Spare::start(&self.dir, size));
        }
        Ok(())
    }
    fn finish(&mut self) -> std::io::Result<()> {
        if let Some(spare) = self.spare.take() {
            spare.discard();
        }
        self.finish_file()
    }
}
