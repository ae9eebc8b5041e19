//! `System`'s safe `Backing` methods are sound for zero-size layouts, which
//! `GlobalAlloc` must never see: they get an aligned dangling block.
#![cfg(feature = "std")]

use pymalloc::{Backing, System};
use std::alloc::Layout;

#[test]
fn zero_size_layouts_get_aligned_blocks_and_round_trip() {
    for align in [1, 8, 64, 4096, 1 << 20] {
        let empty = Layout::from_size_align(0, align).unwrap();
        for block in [System.alloc(empty), System.alloc_zeroed(empty)] {
            assert!(!block.is_null() && block as usize % align == 0);
            // SAFETY: from `alloc` with this layout, given back once.
            unsafe { System.dealloc(block, empty) };
        }
        // Zero to some bytes and back, keeping the contents between.
        let block = System.alloc(empty);
        // SAFETY: a block of `empty`; 100 rounded to `align` is small.
        let grown = unsafe { System.realloc(block, empty, 100) };
        assert!(!grown.is_null() && grown as usize % align == 0);
        // SAFETY: `grown` has 100 bytes.
        unsafe { grown.write_bytes(7, 100) };
        let full = Layout::from_size_align(100, align).unwrap();
        // SAFETY: `grown` is a block of `full`.
        let shrunk = unsafe { System.realloc(grown, full, 0) };
        assert!(!shrunk.is_null() && shrunk as usize % align == 0);
        // SAFETY: a block of `empty`, given back once.
        unsafe { System.dealloc(shrunk, empty) };
    }
    assert!(System.alloc_arena(0, 4096).is_null());
}
