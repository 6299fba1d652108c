//! Segment files on disk: naming, listing, creation and the directory lock. No format logic here beyond
//! writing the header of a new segment.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::{MmapMut, MmapOptions};

use crate::error::StorageError;
use crate::format::encode_segment_header;

const SUFFIX: &str = ".seg";
const TMP_SUFFIX: &str = ".seg.tmp";

pub(crate) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}{SUFFIX}"))
}

/// `Some(id)` for a name this crate would write for a segment (`<20 digits>.seg`).
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) struct Listing {
    /// Segment ids and paths, ascending by id.
    pub segments: Vec<(u64, PathBuf)>,
    /// Leftovers of segment creations that never reached their rename.
    pub temp_files: Vec<PathBuf>,
}

pub(crate) fn list(dir: &Path) -> Result<Listing, StorageError> {
    let io_err = |e| StorageError::io(dir, e);
    let mut segments = Vec::new();
    let mut temp_files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = parse_segment_name(name) {
            segments.push((id, entry.path()));
        } else if name.ends_with(TMP_SUFFIX) {
            temp_files.push(entry.path());
        }
    }
    segments.sort_unstable_by_key(|(id, _)| *id);
    Ok(Listing { segments, temp_files })
}

/// Takes an exclusive `flock` on `<dir>/LOCK`, held for as long as the returned file is open. Two logs on
/// one directory would overwrite each other's records; the kernel drops the lock when the process dies, so
/// a crash never leaves a stale lock behind.
pub(crate) fn lock_dir(dir: &Path) -> Result<File, StorageError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StorageError::DirNotWritable { path: dir.to_path_buf(), source: e })?;
    // A lock can look held for a moment after its owner closed it: a child that another thread of this
    // process is forking holds a copy of every descriptor until its exec closes them (O_CLOEXEC). Retrying
    // briefly tells that apart from a real second owner.
    for attempt in 0.. {
        // SAFETY: flock on a file descriptor we own and keep open; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(StorageError::io(&path, e));
        }
        if attempt == 20 {
            return Err(StorageError::Locked { path: dir.to_path_buf() });
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(file)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StorageError::io(dir, e))
}

/// Reserves the blocks of `file` up to `len` so that writes through a mapping can never fail for lack of
/// space (which would be a SIGBUS, not an error). `posix_fallocate` returns the error number directly.
pub(crate) fn allocate(file: &File, len: u64, path: &Path) -> Result<(), StorageError> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| StorageError::InvalidConfig(format!("segment size {len} does not fit off_t")))?;
    // SAFETY: plain syscall on an open descriptor we own.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc != 0 {
        return Err(StorageError::io(path, io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

/// Maps the whole of `file` for writing.
pub(crate) fn map_mut(file: &File, path: &Path) -> Result<MmapMut, StorageError> {
    // SAFETY: the mapping is only sound while nobody truncates or rewrites the file behind our back. The
    // file lives in a directory this process holds the exclusive LOCK on, only this crate writes it, and
    // every segment is fully allocated before it is mapped, so the kernel cannot fail a write to it.
    unsafe { MmapOptions::new().map_mut(file) }.map_err(|e| StorageError::io(path, e))
}

/// Maps `file` read-only; the same soundness argument as [`map_mut`] applies.
pub(crate) fn map_ro(file: &File, path: &Path) -> Result<memmap2::Mmap, StorageError> {
    // SAFETY: see `map_mut`: the file is ours (directory lock) and is never truncated while mapped; for a
    // sealed segment the mapped range is never written again either.
    unsafe { MmapOptions::new().map(file) }.map_err(|e| StorageError::io(path, e))
}

/// A new segment that exists only as `<id>.seg.tmp` until [`Prepared::install`]: a crash at any point
/// before that leaves a temp file that recovery deletes, never a half-made segment.
pub(crate) struct Prepared {
    pub id: u64,
    tmp: PathBuf,
    pub path: PathBuf,
    pub file: File,
    pub map: MmapMut,
    /// Header and allocation are durable already (prepared ahead by the flusher).
    synced: bool,
}

impl Prepared {
    /// Creates, allocates, writes the header and maps. Out of space here is [`StorageError::DiskFull`] and
    /// changes nothing: the temp file is removed.
    pub(crate) fn create(dir: &Path, id: u64, len: u64) -> Result<Prepared, StorageError> {
        let path = segment_path(dir, id);
        let tmp = dir.join(format!("{id:020}{TMP_SUFFIX}"));
        let result = (|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(|e| StorageError::io(&tmp, e))?;
            allocate(&file, len, &tmp)?;
            file.write_all_at(&encode_segment_header(id), 0).map_err(|e| StorageError::io(&tmp, e))?;
            let map = map_mut(&file, &tmp)?;
            Ok(Prepared { id, tmp: tmp.clone(), path, file, map, synced: false })
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Makes the header and the allocation durable (the slow part of [`Prepared::install`], which a
    /// flusher does ahead of need).
    pub(crate) fn sync(mut self) -> Result<Prepared, StorageError> {
        match self.file.sync_data() {
            Ok(()) => {
                self.synced = true;
                Ok(self)
            }
            Err(e) => {
                let _ = fs::remove_file(&self.tmp);
                Err(StorageError::io(&self.tmp, e))
            }
        }
    }

    /// Makes the header and the allocation durable (unless [`Prepared::sync`] did), then gives the segment
    /// its real name. The directory entry itself becomes durable at the next directory sync (the log's next
    /// flush).
    pub(crate) fn install(self) -> Result<(File, MmapMut, PathBuf), StorageError> {
        let synced = if self.synced { Ok(()) } else { self.file.sync_data() };
        let r = synced
            .and_then(|()| fs::rename(&self.tmp, &self.path))
            .map_err(|e| StorageError::io(&self.tmp, e));
        if let Err(e) = r {
            let _ = fs::remove_file(&self.tmp);
            return Err(e);
        }
        Ok((self.file, self.map, self.path))
    }

    pub(crate) fn abandon(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let p = segment_path(Path::new("/d"), 42);
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, "00000000000000000042.seg");
        assert_eq!(parse_segment_name(name), Some(42));
        assert_eq!(parse_segment_name("42.seg"), None);
        assert_eq!(parse_segment_name("00000000000000000042.seg.tmp"), None);
        assert_eq!(parse_segment_name("0000000000000000004x.seg"), None);
    }
}
