//! Four classic heap bugs on small objects, one per argument, with
//! `PyMalloc` as the global allocator: what `.ci/memory-tools` checks that
//! AddressSanitizer, LeakSanitizer and valgrind's memcheck report.
//!
//! ```text
//! memory_bugs overflow        writes one byte past a 100-byte Vec's capacity
//! memory_bugs underflow       writes one byte before a 440-byte Vec: the
//!                             first block of a pool, so the byte is the
//!                             pool's header
//! memory_bugs use-after-free  reads a freed Box<u64>
//! memory_bugs leak            leaks two boxes, of 64 and 200 bytes
//! memory_bugs clean           the same objects, used correctly, and a
//!                             buffer kept to the end through a pool block
//! ```
use pymalloc::PyMalloc;
use std::hint::black_box;
use std::sync::OnceLock;

#[global_allocator]
static ALLOC: PyMalloc = PyMalloc::system();

#[inline(never)]
fn overflow() {
    let mut v: Vec<u8> = Vec::with_capacity(100);
    let end = v.as_mut_ptr().wrapping_add(v.capacity());
    // SAFETY: none: one byte past the allocation, the bug to be reported.
    unsafe { end.write_volatile(1) };
    black_box(&v);
}

#[inline(never)]
fn underflow() {
    // No block of this class was handed out before, so this one is carved
    // first from a fresh pool, right after its header.
    let mut v: Vec<u8> = Vec::with_capacity(440);
    let before = v.as_mut_ptr().wrapping_sub(1);
    // SAFETY: none: one byte before the allocation, the bug to be reported.
    unsafe { before.write_volatile(1) };
    black_box(&v);
}

#[inline(never)]
fn use_after_free() {
    let b = Box::new(7u64);
    let p: *const u64 = &*b;
    drop(b);
    // SAFETY: none: the box is freed, the bug to be reported.
    black_box(unsafe { p.read_volatile() });
}

#[inline(never)]
fn leak() {
    std::mem::forget(black_box(Box::new([1u8; 64])));
    std::mem::forget(black_box(Box::new([2u8; 200])));
}

#[inline(never)]
fn clean() {
    let mut v: Vec<u8> = Vec::with_capacity(100);
    v.resize(100, 1);
    let b = Box::new(7u64);
    let boxes = (Box::new([1u8; 64]), Box::new([2u8; 200]));
    black_box((&v, &b, &boxes));
    // Reachable at exit only through a pool block: no leak checker may
    // call the 4 KiB buffer lost.
    struct Kept {
        buffer: Vec<u8>,
    }
    static KEPT: OnceLock<Box<Kept>> = OnceLock::new();
    let kept = KEPT.get_or_init(|| {
        Box::new(Kept {
            buffer: vec![3u8; 4096],
        })
    });
    black_box(&kept.buffer);
}

fn main() {
    let what = std::env::args().nth(1).unwrap_or_default();
    match what.as_str() {
        "overflow" => overflow(),
        "underflow" => underflow(),
        "use-after-free" => use_after_free(),
        "leak" => leak(),
        "clean" => clean(),
        _ => {
            eprintln!("usage: memory_bugs overflow|underflow|use-after-free|leak|clean");
            std::process::exit(2);
        }
    }
}
