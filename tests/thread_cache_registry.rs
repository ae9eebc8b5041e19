//! More allocators than the thread caches' registry holds: the rest take
//! the shared path, and every one must still be exact. Alone in its own
//! test binary (its own process): while it holds the registry full, an
//! allocator that another test makes in parallel would be left uncached
//! for good, and that test's counts of cached blocks would be wrong.
#![cfg(feature = "std")]

use pymalloc::PyMalloc;
use std::alloc::{GlobalAlloc, Layout};
use std::thread;

/// Allocates `n` blocks from `heap` and frees them all, newest first.
fn churn(heap: &PyMalloc, n: usize) {
    let layout = Layout::from_size_align(40, 8).unwrap();
    // SAFETY: non-zero size; each block is freed once, with its layout.
    let blocks: Vec<*mut u8> = (0..n).map(|_| unsafe { heap.alloc(layout) }).collect();
    assert!(blocks.iter().all(|b| !b.is_null()));
    for &block in blocks.iter().rev() {
        // SAFETY: as above.
        unsafe { heap.dealloc(block, layout) };
    }
}

#[test]
fn more_allocators_than_the_registry_holds_all_work() {
    // The registry holds 64.
    let heaps: Vec<PyMalloc> = (0..80).map(|_| PyMalloc::system()).collect();
    thread::scope(|scope| {
        scope
            .spawn(|| {
                for heap in heaps.iter().rev() {
                    churn(heap, 200);
                }
            })
            .join()
            .unwrap();
    });
    for heap in &heaps {
        let stats = heap.stats();
        assert_eq!((stats.live_allocations(), stats.requested_bytes), (0, 0));
        assert_eq!(stats.accounted_arena_bytes(), stats.arena_bytes());
    }
}
