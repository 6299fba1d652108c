use std::io;
use std::path::{Path, PathBuf};

/// Who has to act on an error; the broker maps this to its behaviour (refuse to start, back off, crash).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The data on disk is damaged or from a newer version: refuse to start, an operator must look
    /// (`shardmq inspect`).
    Data,
    /// A resource ran out (disk space, quota): the log is still usable; retry once space is freed.
    Resource,
    /// The environment or configuration is wrong (directory not writable, locked by another process,
    /// invalid settings): fix it and restart.
    Environment,
    /// The caller asked for something the log cannot do (a record larger than a segment).
    Caller,
    /// An I/O error from the kernel, or a log that stopped after one: restart and let recovery decide.
    Io,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("corrupt log: {file}: offset {offset}: {reason}")]
    Corrupt { file: PathBuf, offset: u64, reason: String },

    #[error("{file}: segment format version {found} is newer than this build supports ({supported})")]
    UnsupportedVersion { file: PathBuf, found: u16, supported: u16 },

    #[error("disk full: {path}: {source}")]
    DiskFull { path: PathBuf, source: io::Error },

    #[error("I/O error: {path}: {source}")]
    Io { path: PathBuf, source: io::Error },

    #[error("record of {size} bytes is larger than the largest that fits in a segment ({max} bytes); raise segment_bytes")]
    RecordTooLarge { size: usize, max: usize },

    #[error("data directory {path} cannot be created or is not writable: {source}")]
    DirNotWritable { path: PathBuf, source: io::Error },

    #[error("data directory {path} is in use by another process (lock held on {path}/LOCK)")]
    Locked { path: PathBuf },

    #[error("invalid log configuration: {0}")]
    InvalidConfig(String),

    /// A flush failed earlier. Linux may drop the dirty pages of a failed writeback and report the error
    /// only once, so a later flush that "succeeds" would not prove anything: the log refuses further
    /// writes, and reopening it (recovery) establishes what is really there.
    #[error("log stopped after an earlier flush failure: {reason}")]
    Poisoned { reason: String },
}

impl StorageError {
    pub fn fault(&self) -> Fault {
        match self {
            StorageError::Corrupt { .. } | StorageError::UnsupportedVersion { .. } => Fault::Data,
            StorageError::DiskFull { .. } => Fault::Resource,
            StorageError::DirNotWritable { .. }
            | StorageError::Locked { .. }
            | StorageError::InvalidConfig(_) => Fault::Environment,
            StorageError::RecordTooLarge { .. } => Fault::Caller,
            StorageError::Io { .. } | StorageError::Poisoned { .. } => Fault::Io,
        }
    }

    /// Classifies an OS error on `path`: out-of-space and over-quota become [`StorageError::DiskFull`].
    pub(crate) fn io(path: &Path, source: io::Error) -> StorageError {
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                StorageError::DiskFull { path: path.to_path_buf(), source }
            }
            _ => StorageError::Io { path: path.to_path_buf(), source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_and_edquot_are_disk_full() {
        for e in [libc::ENOSPC, libc::EDQUOT] {
            let err = StorageError::io(Path::new("/x"), io::Error::from_raw_os_error(e));
            assert_eq!(err.fault(), Fault::Resource, "{err}");
        }
        let err = StorageError::io(Path::new("/x"), io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(err.fault(), Fault::Io);
        assert!(err.to_string().contains("/x"));
    }
}
