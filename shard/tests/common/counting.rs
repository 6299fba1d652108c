//! A counting global allocator for memory tests: live heap bytes per thread (so tests run in parallel
//! without seeing each other's allocations), and live allocations by size class. Included with
//! `#[path]` by the memory tests of the shard and transport crates; each test binary installs it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct Counting;

/// Live allocations by size class of 16 bytes (the last one: 1 KiB and more), printed so that a failing
/// bound shows where the bytes went.
pub const CLASSES: usize = 65;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static BY_SIZE: [Cell<isize>; CLASSES] = const { [const { Cell::new(0) }; CLASSES] };
}

fn count(size: usize, n: isize) {
    // `try_with`: allocations while the thread's locals are torn down are not counted.
    let _ = LIVE.try_with(|l| l.set(l.get() + n * size as isize));
    let _ = BY_SIZE.try_with(|b| {
        let c = &b[(size / 16).min(CLASSES - 1)];
        c.set(c.get() + n)
    });
}

// SAFETY: forwards to the system allocator and only counts sizes (thread-local cells with const
// initialisers and no destructor: touching them never allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size(), 1);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        count(l.size(), -1);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(l.size(), -1);
        count(new, 1);
        unsafe { System.realloc(p, l, new) }
    }
}

/// Heap bytes this thread holds now.
pub fn live() -> isize {
    LIVE.with(Cell::get)
}

/// Live allocations of this thread by size class.
#[allow(dead_code)] // not every test binary prints them
pub fn by_size() -> [isize; CLASSES] {
    BY_SIZE.with(|b| std::array::from_fn(|i| b[i].get()))
}
