//! A bug planted for the fuzzer to find, as a user would meet it: a
//! run-length decoder that sizes its output from the header byte and never
//! checks the runs against it. The output is at most 255 bytes, a pool
//! block: before pymalloc told AddressSanitizer about its blocks, the
//! overflow went unseen. `cargo fuzz run planted_overflow` now stops within
//! seconds with a heap-buffer-overflow report (`.ci/run` checks it does).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pymalloc::PyMalloc;

#[global_allocator]
static ALLOC: PyMalloc = PyMalloc::system();

/// `[length, (count, byte)*]` into `length` bytes, trusting the header.
fn decode(data: &[u8]) -> Vec<u8> {
    let Some((&length, runs)) = data.split_first() else {
        return Vec::new();
    };
    // At least one byte: an empty Vec has no block, and a write through its
    // dangling pointer would be a wild SEGV, not the heap overflow planted.
    let mut out: Vec<u8> = Vec::with_capacity(usize::from(length).max(1));
    let mut at = out.as_mut_ptr();
    for run in runs.chunks_exact(2) {
        for _ in 0..run[0] {
            // SAFETY: none: this is the planted bug. Nothing checks that
            // the runs fit in `length` bytes.
            unsafe {
                at.write(run[1]);
                at = at.add(1);
            }
        }
    }
    // SAFETY: as wrong as the writes, when they overflowed.
    unsafe { out.set_len(at.offset_from(out.as_ptr()) as usize) };
    out
}

fuzz_target!(|data: &[u8]| {
    let out = decode(data);
    assert!(out.len() <= out.capacity());
});
