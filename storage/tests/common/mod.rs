#![allow(dead_code)] // each test binary uses a different subset

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use shardmq_storage::{FsyncPolicy, LogConfig, Lsn, RecordType, Recovery};

pub fn cfg(dir: &Path, segment_bytes: u64, fsync: FsyncPolicy) -> LogConfig {
    LogConfig { dir: dir.to_path_buf(), segment_bytes, fsync }
}

/// Deterministic payload for record number `i`: its index first, so that a reader can tell which record
/// it is and check every other byte.
pub fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len.max(8)).map(|k| (i as usize * 31 + k * 7) as u8).collect();
    v[..8].copy_from_slice(&i.to_le_bytes());
    v
}

pub fn index_of(p: &[u8]) -> u64 {
    u64::from_le_bytes(p[..8].try_into().unwrap())
}

pub fn records(rec: &Recovery) -> Vec<(Lsn, RecordType, Vec<u8>)> {
    rec.records().map(|(l, t, p)| (l, t, p.to_vec())).collect()
}

pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

pub fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x5a;
    fs::write(path, bytes).unwrap();
}

/// A tmpfs mounted on a fresh temp dir for the life of the value, or `None` (with the reason printed) where
/// this process may not mount (not root, no CAP_SYS_ADMIN, no tmpfs).
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(opts: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", opts, "tmpfs"]).arg(dir.path()).output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!("SKIPPED: cannot mount tmpfs ({}); needs root with CAP_SYS_ADMIN", {
                    String::from_utf8_lossy(&o.stderr).trim().to_string()
                });
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}
