//! Statistics: the accounting adds up, the table reads like CPython's, and a
//! diff names what grew.
#![cfg(feature = "std")]

use pymalloc::PyMalloc;
use std::alloc::{GlobalAlloc, Layout};

#[test]
#[cfg_attr(
    feature = "debug",
    ignore = "the debug header changes every block's size class"
)]
fn the_parts_of_the_arenas_add_up_and_the_table_shows_them() {
    let heap = PyMalloc::system();
    let before = heap.stats();
    let layout = Layout::from_size_align(48, 8).unwrap();
    let big = Layout::from_size_align(100_000, 8).unwrap();
    // SAFETY: non-zero sizes; freed below with the same layouts.
    let blocks: Vec<*mut u8> = (0..5000).map(|_| unsafe { heap.alloc(layout) }).collect();
    let large = unsafe { heap.alloc(big) };
    let after = heap.stats();
    assert_eq!(after.accounted_arena_bytes(), after.arena_bytes());
    assert_eq!(after.classes[5].size, 48);
    assert_eq!(after.classes[5].blocks_in_use, 5000);
    assert_eq!(after.classes[5].pools, 5000usize.div_ceil((4096 - 48) / 48));
    assert_eq!((after.large_objects, after.large_bytes), (1, 100_000));
    assert_eq!(after.requested_bytes, 5000 * 48 + 100_000);
    assert!(after.held_bytes() >= after.arena_bytes() + 100_000);

    let table = after.to_string();
    for line in [
        "Small block threshold = 512, in 64 size classes.",
        "class   size   num pools   blocks in use  avail blocks",
        "# arenas allocated total",
        "# arenas highwater mark",
        "arenas * 262144 bytes/arena",
        "# bytes in allocated blocks        =               240,000",
        "# bytes lost to pool headers",
        "# bytes lost to quantization",
        "# bytes lost to arena alignment",
        "Total",
    ] {
        assert!(table.contains(line), "missing {line:?} in\n{table}");
    }

    let diff = after.diff(&before);
    assert_eq!(diff.classes()[0].size, 48);
    assert_eq!(diff.classes()[0].blocks, 5000);
    assert_eq!(diff.large_objects, 1);
    assert!(diff.to_string().contains("+240,000"), "{diff}");

    for b in blocks {
        // SAFETY: allocated above with `layout`.
        unsafe { heap.dealloc(b, layout) };
    }
    // SAFETY: allocated above with `big`.
    unsafe { heap.dealloc(large, big) };
    let end = heap.stats();
    assert_eq!((end.live_allocations(), end.requested_bytes), (0, 0));
    assert_eq!(
        end.arenas_reclaimed + end.arenas_current,
        end.arenas_allocated_total
    );
    let shrink = end.diff(&after);
    assert_eq!(shrink.classes()[0].blocks, -5000);
}

/// The system allocator, counting the allocations each thread makes.
struct Counting;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

// SAFETY: forwards to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded contract.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A sink that keeps only a running length, so formatting into it cannot
/// allocate on its own account.
struct Discard(usize);

impl std::fmt::Write for Discard {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

#[test]
fn gathering_and_printing_statistics_do_not_allocate() {
    use std::fmt::Write;
    let heap = PyMalloc::system();
    let layout = Layout::from_size_align(24, 8).unwrap();
    // SAFETY: non-zero size.
    let p = unsafe { heap.alloc(layout) };
    let before = ALLOCATIONS.with(|n| n.get());
    let a = heap.stats();
    let b = heap.stats();
    let mut sink = Discard(0);
    write!(sink, "{a}{}", a.diff(&b)).unwrap();
    assert_eq!(
        ALLOCATIONS.with(|n| n.get()),
        before,
        "statistics allocated"
    );
    assert!(sink.0 > 1000);
    assert_eq!(a, b, "taking a snapshot changed the heap");
    // SAFETY: allocated above.
    unsafe { heap.dealloc(p, layout) };
}
