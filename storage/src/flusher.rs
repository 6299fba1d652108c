//! Background flushing: a thread per log that runs the slow disk calls off the owner's event loop.
//!
//! A flush (`fdatasync`) under `--fsync always` takes from tens of microseconds to many milliseconds, and
//! creating a segment (`posix_fallocate`, header, `fdatasync`) longer. Run inline, every client of the shard
//! waits for them, clean sessions and QoS 0 included. With a flusher, [`crate::Log::commit`] hands the flush
//! to this thread and returns at once; the durable bound moves when the flush completes, and the thread
//! calls the owner's wake-up so that its next `commit` sees it and releases what waited. The next segment
//! is created and synced here ahead of need, so a roll only renames it.
//!
//! At most one flush and one segment preparation are in flight (the log waits for a flush before it starts
//! another, and for both before anything that unmaps or renames), so the job queue never holds more than
//! two entries. `fdatasync` on the file writes back every dirty page of the file, the ones written through
//! the mapping included (Linux tracks them in the page cache), so the thread needs the file, not the map.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::StorageError;
use crate::segment::{self, Prepared};
use crate::Lsn;

/// Called by the flusher thread after each completed job, from that thread: must be cheap and must not
/// block (e.g. an eventfd write that wakes the owner's loop).
pub type WakeFn = Box<dyn Fn() + Send + Sync>;

pub(crate) enum Job {
    /// Make everything written to `file` durable, and the directory too when `dir` is set; the log may
    /// then claim records up to `upto` (ending at byte `end` of the active segment) durable.
    /// `file` is `None` when there is no active segment (only the directory to sync).
    Flush { file: Option<Arc<File>>, path: PathBuf, dir: Option<PathBuf>, upto: Lsn, end: usize },
    /// Create, allocate and sync segment `id` under its temporary name.
    Prepare { dir: PathBuf, id: u64, len: u64 },
}

pub(crate) enum Done {
    Flushed { upto: Lsn, end: usize },
    Prepared(Prepared),
    Failed(StorageError),
    PrepareFailed(StorageError),
}

pub(crate) struct Flusher {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    pub(crate) fn start(dir: &Path, name: String, wake: WakeFn) -> Result<Flusher, StorageError> {
        // Two jobs at most are ever outstanding (see the module doc); a little slack costs nothing.
        let (jobs, rx) = sync_channel::<Job>(4);
        let (done_tx, done) = sync_channel::<Done>(4);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                unpin();
                for job in rx {
                    let d = run(job);
                    if done_tx.send(d).is_err() {
                        return;
                    }
                    wake();
                }
            })
            .map_err(|e| StorageError::io(dir, e))?;
        Ok(Flusher { jobs: Some(jobs), done, thread: Some(thread) })
    }

    pub(crate) fn submit(&self, job: Job) {
        // The thread only ends when `jobs` is dropped, so a send cannot fail while `self` lives; a full
        // queue would only wait for one job to finish (never happens: at most two are outstanding).
        let sent = self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        debug_assert!(sent, "flusher thread gone");
    }

    /// A completed job, without waiting.
    pub(crate) fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }

    /// Waits for the next completed job (the caller knows one is outstanding).
    pub(crate) fn wait_done(&self) -> Option<Done> {
        self.done.recv().ok()
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(job: Job) -> Done {
    match job {
        Job::Flush { file, path, dir, upto, end } => {
            if let Err(e) = file.as_deref().map_or(Ok(()), File::sync_data) {
                return Done::Failed(StorageError::io(&path, e));
            }
            if let Some(dir) = &dir {
                if let Err(e) = segment::sync_dir(dir) {
                    return Done::Failed(e);
                }
            }
            Done::Flushed { upto, end }
        }
        Job::Prepare { dir, id, len } => match Prepared::create(&dir, id, len).and_then(Prepared::sync) {
            Ok(p) => Done::Prepared(p),
            Err(e) => Done::PrepareFailed(e),
        },
    }
}

/// Lets this thread run on any CPU the process may use. It is spawned by the loop that owns the log, and a
/// shard's loop is usually pinned to one CPU: inherited, that pin would make the flusher wake up on, and
/// take turns with, the very loop it exists to keep free. The main thread is never pinned, so its mask
/// (the process's, as `sched_getaffinity` of the process id reports it) is the one to take.
fn unpin() {
    // SAFETY: plain syscalls on a zeroed cpu_set_t we own; a failure leaves the inherited mask in place.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(libc::getpid(), size, &mut set) == 0 {
            libc::sched_setaffinity(0, size, &set);
        }
    }
}
