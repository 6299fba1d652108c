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
        let stop = AtomicBool::new(false);
        let r = std::panic::catch_unwind(|| {
            thread::scope(|s| {
                let _guard = StopOnDrop(&stop);
                s.spawn(|| {
                    while !stop.load(Relaxed) {
                        thread::sleep(std::time::Duration::from_millis(1));
                    }
                });
                panic!("the coordinator fails");
            })
        });
        assert!(r.is_err());
        assert!(stop.load(Relaxed), "the worker was told to stop (the scope could only end once it had)");
    }
}
