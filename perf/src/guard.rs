//! Keeps a run bounded when its coordinating thread fails: worker threads loop until a stop flag is
//! set, and a scoped thread's panic makes `thread::scope` wait for them before it unwinds, so a flag set
//! only on the normal path would leave them running for ever (a closed stderr under `| head` did it: the
//! progress line panicked).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// Sets the flag when dropped, on every way out of the scope that owns it (panics included).
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

/// A progress line on stderr that does not panic when stderr is closed (it is only informative).
pub fn progress(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn workers_stop_when_the_coordinator_panics() {
        let (stop, told) = (AtomicBool::new(false), AtomicBool::new(false));
        let r = std::panic::catch_unwind(|| {
            thread::scope(|s| {
                let _guard = StopOnDrop(&stop);
                s.spawn(|| {
                    // Bounded, so that without the guard this test fails instead of hanging.
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                    while std::time::Instant::now() < deadline {
                        if stop.load(Relaxed) {
                            told.store(true, Relaxed);
                            return;
                        }
                        thread::sleep(std::time::Duration::from_millis(1));
                    }
                });
                panic!("the coordinator fails");
            })
        });
        assert!(r.is_err());
        assert!(stop.load(Relaxed));
        assert!(told.load(Relaxed), "the worker was told to stop, not left to run out its own bound");
    }
}
