//! loom models, through the public API, of the paths where threads meet:
//! the heap locks (allocation, free, pool and arena bookkeeping), the
//! creation of the heap set, the large-object counters, the Region's store
//! lock, and statistics read while others allocate. The models of the paths
//! between heaps (try-lock fall-over, inboxes, their batch reclaim, arena
//! release racing a remote free) sit beside the code, in `src/heaps.rs`.
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom` and
//! `... --lib loom_models`.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use pymalloc::{loom_model as model, Config, PyMalloc, Region};
use std::alloc::{GlobalAlloc, Layout};

fn small() -> Layout {
    Layout::from_size_align(512, 8).unwrap()
}

fn large() -> Layout {
    Layout::from_size_align(3000, 8).unwrap()
}

/// Allocates `layout`, writes a tag through it, checks it, and hands back
/// the block (as an address, to cross threads).
fn take(heap: &impl GlobalAlloc, layout: Layout, tag: u8) -> usize {
    // SAFETY: non-zero size.
    let p = unsafe { heap.alloc(layout) };
    assert!(!p.is_null());
    // SAFETY: the block has `layout.size()` bytes.
    unsafe { p.write_bytes(tag, layout.size()) };
    p as usize
}

fn give(heap: &impl GlobalAlloc, addr: usize, layout: Layout, tag: u8) {
    let p = addr as *mut u8;
    // SAFETY: a live block written with `tag` by `take`, freed once.
    unsafe {
        assert!(
            std::slice::from_raw_parts(p, layout.size())
                .iter()
                .all(|&b| b == tag),
            "block lost or shared"
        );
        heap.dealloc(p, layout);
    }
}

#[test]
fn two_threads_allocate_and_free_while_a_third_reads_stats() {
    // Three threads explored exhaustively take five minutes here; six
    // preemptions take seconds and still interleave every step of the
    // two workers with the stats read.
    model(Some(6), 100, || {
        // Two heaps: statistics merge them while both are in use.
        let heap = Arc::new(PyMalloc::system_with(Config::SMALL.with_heaps(2)));
        let other = heap.clone();
        let worker = thread::spawn(move || {
            let a = take(&*other, small(), 1);
            let b = take(&*other, large(), 2);
            give(&*other, a, small(), 1);
            b
        });
        let c = take(&*heap, small(), 3);
        let stats = heap.stats();
        assert_eq!(stats.accounted_arena_bytes(), stats.arena_bytes());
        // `c`, and at most the worker's `a` and `b` (3000 bytes: a medium
        // block, counted with the small ones).
        assert!(stats.blocks_in_use() >= 1 && stats.blocks_in_use() <= 3);
        let b = worker.join().unwrap();
        // A block freed by another thread than the one that allocated it.
        give(&*heap, b, large(), 2);
        give(&*heap, c, small(), 3);
        let stats = heap.stats();
        assert_eq!((stats.live_allocations(), stats.requested_bytes), (0, 0));
    });
}

#[test]
fn a_free_emptying_an_arena_races_an_allocation_needing_one() {
    // Four orders: an empty inbox is looked at, not swapped, so few writes
    // conflict (44 while it was swapped).
    model(None, 4, || {
        let heap = Arc::new(PyMalloc::system_with(Config::new(1024, 1)));
        // One-pool arenas holding one 512-byte block: every free empties an
        // arena and every allocation may need a new one.
        let first = take(&*heap, small(), 1);
        let other = heap.clone();
        let worker = thread::spawn(move || give(&*other, first, small(), 1));
        let second = take(&*heap, small(), 2);
        worker.join().unwrap();
        give(&*heap, second, small(), 2);
        let stats = heap.stats();
        assert_eq!(stats.blocks_in_use(), 0);
        assert!(stats.arenas_current <= 1);
        assert_eq!(
            stats.arenas_allocated_total,
            stats.arenas_reclaimed + stats.arenas_current
        );
    });
}

#[test]
fn two_threads_share_a_region_store() {
    model(None, 10, || {
        let memory: &'static mut [u8] =
            Box::leak(vec![0u8; Region::min_len(Config::SMALL) + 8192].into_boxed_slice());
        let heap = Arc::new(PyMalloc::region_uninit_with(Config::SMALL));
        // SAFETY: leaked memory, used by this heap alone.
        unsafe { heap.init(memory.as_mut_ptr(), memory.len()) };
        let other = heap.clone();
        let worker = thread::spawn(move || {
            let a = take(&*other, large(), 1);
            give(&*other, a, large(), 1);
        });
        let b = take(&*heap, small(), 2);
        worker.join().unwrap();
        give(&*heap, b, small(), 2);
    });
}
