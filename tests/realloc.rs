//! realloc within a class, across classes, and across the 512/513 boundary.
#![cfg(feature = "std")]

use pymalloc::PyMalloc;
use std::alloc::{GlobalAlloc, Layout};

fn check(ptr: *mut u8, len: usize) {
    // SAFETY: callers pass live blocks of at least `len` bytes.
    let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
    for (i, &b) in bytes.iter().enumerate() {
        assert_eq!(b, (i % 251) as u8, "byte {i} of {len}");
    }
}

#[test]
fn growing_and_shrinking_one_byte_at_a_time_across_512() {
    let heap = PyMalloc::system();
    for align in [1, 8, 16, 64] {
        let mut layout = Layout::from_size_align(1, align).unwrap();
        // SAFETY: non-zero size.
        let mut ptr = unsafe { heap.alloc(layout) };
        // SAFETY: one byte is live.
        unsafe { *ptr = 0 };
        for size in 2..=1100 {
            // SAFETY: `ptr` is live with `layout`.
            ptr = unsafe { heap.realloc(ptr, layout, size) };
            assert!(!ptr.is_null());
            assert_eq!(ptr as usize % align, 0);
            check(ptr, size - 1);
            // SAFETY: the block now has `size` bytes.
            unsafe { *ptr.add(size - 1) = ((size - 1) % 251) as u8 };
            layout = Layout::from_size_align(size, align).unwrap();
        }
        for size in (1..1100).rev() {
            // SAFETY: as above.
            ptr = unsafe { heap.realloc(ptr, layout, size) };
            assert!(!ptr.is_null());
            check(ptr, size);
            layout = Layout::from_size_align(size, align).unwrap();
        }
        // SAFETY: live with `layout`.
        unsafe { heap.dealloc(ptr, layout) };
    }
    let stats = heap.stats();
    assert_eq!((stats.live_allocations(), stats.requested_bytes), (0, 0));
}

#[test]
fn realloc_stays_in_place_within_a_class_and_moves_between_classes() {
    let heap = PyMalloc::system();
    let layout = Layout::from_size_align(17, 8).unwrap();
    // SAFETY: non-zero size; each realloc is given the current layout.
    unsafe {
        let p = heap.alloc(layout);
        let same = heap.realloc(p, layout, 24);
        assert_eq!(p, same, "17 and 24 share the 24-byte class");
        assert_eq!(
            heap.stats().requested_bytes,
            24,
            "an in-place resize is counted"
        );
        let moved = heap.realloc(same, Layout::from_size_align(24, 8).unwrap(), 25);
        assert_ne!(moved, same, "25 bytes need the 32-byte class");
        heap.dealloc(moved, Layout::from_size_align(25, 8).unwrap());
    }
}
