//! The `debug` feature: fill patterns, and one test per detection. Each
//! detection aborts the process, so each test runs its bad operation in a
//! child copy of this test binary and reads the child's report.
#![cfg(all(feature = "debug", feature = "std", unix))]

mod common;

use pymalloc::debug::{CLEAN_BYTE, DEAD_BYTE};
use pymalloc::PyMalloc;
use std::alloc::{GlobalAlloc, Layout};

/// Runs `bad` on a fresh heap in a child process, which must abort after
/// printing every `expected` text; `bad` returns the block's `p=` address
/// text, echoed so that a failing run shows which block it was.
fn expect_abort(name: &str, bad: impl FnOnce(&PyMalloc) -> String, expected: &[&str]) {
    let in_child = || {
        let heap = PyMalloc::system();
        eprintln!("{}", bad(&heap));
    };
    common::expect_abort_in_child(name, in_child, expected);
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// Allocates `size` bytes and returns the block with its `p=` address text.
fn block(heap: &PyMalloc, size: usize) -> (*mut u8, String) {
    // SAFETY: non-zero size.
    let p = unsafe { heap.alloc(layout(size)) };
    (p, format!("p={p:p}"))
}

#[test]
fn a_one_byte_overflow_is_a_bad_trailing_pad_byte() {
    expect_abort(
        "a_one_byte_overflow_is_a_bad_trailing_pad_byte",
        |heap| {
            let (p, at) = block(heap, 10);
            // SAFETY: deliberately one past the end, into the guard bytes
            // the debug heap put there.
            unsafe {
                *p.add(10) = 0x78;
                eprintln!("{at}");
                heap.dealloc(p, layout(10));
            }
            at
        },
        &[
            "bad trailing pad byte",
            "10 bytes originally requested",
            "at tail+0: 0x78 *** OUCH",
            "data at p: cd cd",
        ],
    );
}

#[test]
fn a_one_byte_underflow_is_a_bad_leading_pad_byte() {
    expect_abort(
        "a_one_byte_underflow_is_a_bad_leading_pad_byte",
        |heap| {
            let (p, at) = block(heap, 700);
            // SAFETY: one byte before the block, inside the debug header.
            unsafe {
                *p.sub(1) = 0x11;
                heap.dealloc(p, layout(700));
            }
            at
        },
        &[
            "bad leading pad byte",
            "700 bytes originally requested",
            "at p-8+7: 0x11 *** OUCH",
        ],
    );
}

#[test]
fn an_overflow_is_caught_by_realloc_too() {
    expect_abort(
        "an_overflow_is_caught_by_realloc_too",
        |heap| {
            let (p, at) = block(heap, 40);
            // SAFETY: deliberately past the end, into the guard.
            unsafe {
                *p.add(43) = 0;
                heap.realloc(p, layout(40), 80);
            }
            at
        },
        &["bad trailing pad byte", "at tail+3: 0x00 *** OUCH"],
    );
}

#[test]
fn a_small_double_free_is_named() {
    expect_abort(
        "a_small_double_free_is_named",
        |heap| {
            let (p, at) = block(heap, 32);
            // SAFETY: the second free is the bug under test; the heap's
            // checks read only its own pool headers to catch it.
            unsafe {
                heap.dealloc(p, layout(32));
                eprintln!("{at}");
                heap.dealloc(p, layout(32));
            }
            at
        },
        &["double free: the block is already free at p=0x"],
    );
}

#[test]
fn a_medium_double_free_is_named() {
    expect_abort(
        "a_medium_double_free_is_named",
        |heap| {
            let (p, at) = block(heap, 5000);
            // SAFETY: as above; medium blocks are checked like small ones,
            // against their run's header and free list.
            unsafe {
                heap.dealloc(p, layout(5000));
                eprintln!("{at}");
                heap.dealloc(p, layout(5000));
            }
            at
        },
        &["double free: the block is already free at p=0x"],
    );
}

#[test]
fn a_medium_interior_pointer_is_named() {
    expect_abort(
        "a_medium_interior_pointer_is_named",
        |heap| {
            let (p, at) = block(heap, 3000);
            // SAFETY: as above: only run headers are read.
            unsafe { heap.dealloc(p.add(64), layout(3000)) };
            at
        },
        &["not the start of a block of its layout's size class"],
    );
}

#[test]
fn a_large_double_free_is_named() {
    expect_abort(
        "a_large_double_free_is_named",
        |heap| {
            let (p, at) = block(heap, 100_000);
            // SAFETY: as above; large blocks are checked against the live list.
            unsafe {
                heap.dealloc(p, layout(100_000));
                heap.dealloc(p, layout(100_000));
            }
            at
        },
        &["not a live large block of this heap (double free or foreign pointer) at p=0x"],
    );
}

#[test]
fn a_foreign_pointer_is_named() {
    expect_abort(
        "a_foreign_pointer_is_named",
        |heap| {
            let _keep_an_arena = block(heap, 64);
            let mut on_stack = [0u64; 16];
            let p = on_stack.as_mut_ptr().cast::<u8>();
            // SAFETY: the foreign pointer is the bug under test; the checks
            // compare its address with the arenas and never read through it.
            unsafe { heap.dealloc(p, layout(64)) };
            format!("p={p:p}")
        },
        &[
            "free of a pointer this heap never handed out at p=0x",
            "its bytes are not read",
        ],
    );
}

#[test]
fn an_interior_pointer_is_named() {
    expect_abort(
        "an_interior_pointer_is_named",
        |heap| {
            let (p, at) = block(heap, 64);
            // SAFETY: as above: only pool headers are read.
            unsafe { heap.dealloc(p.add(8), layout(64)) };
            at
        },
        &["not the start of a block of its layout's size class"],
    );
}

#[test]
fn a_wrong_layout_size_is_named() {
    expect_abort(
        "a_wrong_layout_size_is_named",
        |heap| {
            let (p, at) = block(heap, 20);
            // SAFETY: 20 and 21 bytes share a size class, so the block is
            // found live and its header says 20.
            unsafe { heap.dealloc(p, layout(21)) };
            at
        },
        &[
            "does not match the size requested",
            "20 bytes originally requested",
            "says 21 bytes",
        ],
    );
}

#[test]
fn fresh_bytes_are_cd_freed_bytes_dd_and_a_grown_tail_cd() {
    let heap = PyMalloc::system();
    let (p, _) = block(&heap, 100);
    // SAFETY: a live block of 100 bytes, then 300 after the realloc; the
    // freed block is read while the heap (and so its arena) is alive.
    unsafe {
        assert!(std::slice::from_raw_parts(p, 100)
            .iter()
            .all(|&b| b == CLEAN_BYTE));
        p.write_bytes(7, 100);
        let q = heap.realloc(p, layout(100), 300);
        let grown = std::slice::from_raw_parts(q, 300);
        assert!(grown[..100].iter().all(|&b| b == 7));
        assert!(grown[100..].iter().all(|&b| b == CLEAN_BYTE));
        let keep = heap.alloc(layout(300));
        heap.dealloc(q, layout(300));
        // Past the free-list link, the freed block reads 0xDD.
        assert!(std::slice::from_raw_parts(q.add(8), 292)
            .iter()
            .all(|&b| b == DEAD_BYTE));
        heap.dealloc(keep, layout(300));
    }
}
