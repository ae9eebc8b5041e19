//! Every size 1..=1100 with every power-of-two alignment up to 4096.
#![cfg(feature = "std")]

use pymalloc::PyMalloc;
use std::alloc::{GlobalAlloc, Layout};

#[test]
fn every_size_with_every_alignment() {
    let heap = PyMalloc::system();
    let mut live = Vec::new();
    for size in 1..=1100 {
        let mut align = 1;
        while align <= 4096 {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: non-zero size.
            let ptr = unsafe { heap.alloc(layout) };
            assert!(!ptr.is_null(), "{layout:?}");
            assert_eq!(ptr as usize % align, 0, "{layout:?}");
            // SAFETY: the block has `size` bytes.
            unsafe { ptr.write_bytes(size as u8, size) };
            live.push((ptr, layout));
            align *= 2;
        }
        // Keep a window of blocks live so neighbours would trample each other.
        if live.len() > 600 {
            for (ptr, layout) in live.drain(..300) {
                // SAFETY: the bytes were written above and the block is live.
                let bytes = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
                assert!(
                    bytes.iter().all(|&b| b == layout.size() as u8),
                    "{layout:?} was overwritten"
                );
                // SAFETY: allocated above with this layout, freed once.
                unsafe { heap.dealloc(ptr, layout) };
            }
        }
    }
    for (ptr, layout) in live {
        // SAFETY: as above.
        unsafe { heap.dealloc(ptr, layout) };
    }
    let stats = heap.stats();
    assert_eq!(stats.live_allocations(), 0);
}

#[test]
fn zero_size_layouts_get_distinct_aligned_blocks() {
    let heap = PyMalloc::system();
    for align in [1, 8, 64, 512, 1024, 4096] {
        let layout = Layout::from_size_align(0, align).unwrap();
        // SAFETY: GlobalAlloc callers may not pass zero sizes, but a heap
        // that serves them anyway must not break.
        let (a, b) = unsafe { (heap.alloc(layout), heap.alloc(layout)) };
        assert!(!a.is_null() && !b.is_null() && a != b);
        assert_eq!((a as usize % align, b as usize % align), (0, 0));
        // SAFETY: allocated above with this layout.
        unsafe {
            heap.dealloc(a, layout);
            heap.dealloc(b, layout);
        }
    }
}

#[test]
fn impossible_requests_are_refused_with_null() {
    let heap = PyMalloc::system();
    let layout = Layout::from_size_align(isize::MAX as usize - 4095, 4096).unwrap();
    // SAFETY: a valid layout; the answer must be null, not a panic.
    assert!(unsafe { heap.alloc(layout) }.is_null());
    let small = Layout::from_size_align(16, 8).unwrap();
    // SAFETY: non-zero size.
    let p = unsafe { heap.alloc(small) };
    // SAFETY: `p` is live with `small`; a size that overflows isize with the
    // alignment is refused without touching the block.
    assert!(unsafe { heap.realloc(p, small, usize::MAX - 3) }.is_null());
    // SAFETY: still live after the refused realloc.
    unsafe { heap.dealloc(p, small) };
}

#[test]
fn zeroed_allocations_are_zero_even_in_reused_blocks() {
    let heap = PyMalloc::system();
    for size in [1, 24, 512, 513, 100_000] {
        let layout = Layout::from_size_align(size, 8).unwrap();
        // SAFETY: non-zero sizes; each block is dirtied, freed, and the
        // next zeroed allocation of the same class may reuse it.
        unsafe {
            let dirty = heap.alloc(layout);
            dirty.write_bytes(0xAB, size);
            heap.dealloc(dirty, layout);
            let clean = heap.alloc_zeroed(layout);
            assert!(
                std::slice::from_raw_parts(clean, size)
                    .iter()
                    .all(|&b| b == 0),
                "size {size}"
            );
            heap.dealloc(clean, layout);
        }
    }
}
