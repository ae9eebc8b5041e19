//! Firmware-style use: no std, no OS services but a way to print, a fixed
//! 64 KiB heap in a `static`, `PyMalloc<Region>` as the global allocator.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::alloc::{GlobalAlloc, Layout};
use pymalloc::{PyMalloc, Region};

static mut HEAP: [u8; 64 * 1024] = [0; 64 * 1024];

// SAFETY: HEAP is used by this allocator alone.
#[global_allocator]
// The geometry comes from the array's length (`Region::config_for`).
static ALLOC: PyMalloc<Region> = unsafe { PyMalloc::region(&raw mut HEAP) };

/// Most blocks `fill` keeps track of (on the stack: the heap is what is
/// being measured).
const MAX_BLOCKS: usize = 4096;

/// Allocates random sizes of 8 to 300 bytes until the heap answers null;
/// returns how many blocks and how many bytes it got.
fn fill(blocks: &mut [(usize, usize); MAX_BLOCKS], seed: &mut u64) -> (usize, usize) {
    let (mut count, mut bytes) = (0, 0);
    while count < MAX_BLOCKS {
        // xorshift64: deterministic sizes, no dependency.
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let size = 8 + (*seed % 293) as usize;
        let layout = Layout::from_size_align(size, 8).unwrap();
        // SAFETY: a non-zero size.
        let p = unsafe { ALLOC.alloc(layout) };
        if p.is_null() {
            break;
        }
        blocks[count] = (p as usize, size);
        count += 1;
        bytes += size;
    }
    (count, bytes)
}

/// Frees the first `count` blocks `fill` recorded.
fn free(blocks: &[(usize, usize); MAX_BLOCKS], count: usize) {
    for &(p, size) in &blocks[..count] {
        // SAFETY: a live block of this size and alignment, freed once.
        unsafe { ALLOC.dealloc(p as *mut u8, Layout::from_size_align(size, 8).unwrap()) };
    }
}

// The C library stands in for a board support package: it starts the
// program, and gives `write` and `exit`, plus the `memcpy` family that `core`
// expects from any platform.
#[link(name = "c")]
extern "C" {
    fn write(fd: i32, buf: *const u8, len: usize) -> isize;
    fn exit(code: i32) -> !;
}

/// Standard output through the C library, the one OS service used.
struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        // SAFETY: `s` is valid for `s.len()` bytes; fd 1 is standard output.
        unsafe { write(1, s.as_ptr(), s.len()) };
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(Console, "panic: {info}");
    // SAFETY: ends the process.
    unsafe { exit(101) }
}

/// The prebuilt `alloc` for this target was compiled for unwinding and
/// names the personality routine; with `panic = "abort"` it is never
/// called, so an empty one satisfies the linker (on a real firmware target
/// the prebuilt libraries are built for abort and need none).
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[no_mangle]
extern "C" fn main(_argc: i32, _argv: *const *const u8) -> i32 {
    let mut sensors: BTreeMap<u32, Vec<i32>> = BTreeMap::new();
    for tick in 0..2000u32 {
        let readings = sensors.entry(tick % 16).or_default();
        readings.push((tick * 7 % 113) as i32);
        if readings.len() > 32 {
            readings.drain(..16);
        }
    }
    let mut log = String::new();
    for (id, readings) in &sensors {
        let _ = write!(log, "{id}:{} ", readings.iter().sum::<i32>());
    }
    let _ = writeln!(Console, "sensor sums: {log}");
    let busy = ALLOC.stats();
    drop(sensors);
    drop(log);
    let idle = ALLOC.stats();
    let _ = writeln!(Console, "{busy}");
    let _ = writeln!(Console, "after freeing: {}", idle.diff(&busy));
    // Run out on purpose: the heap answers null (here: Vec's error path is
    // avoided by try_reserve), and recovers.
    let mut hog: Vec<u8> = Vec::new();
    let refused = hog.try_reserve(1 << 20).is_err();
    let _ = writeln!(Console, "1 MiB from a 64 KiB heap refused: {refused}");
    if !refused || idle.blocks_in_use() != 0 {
        return 1;
    }
    // Fill to null, free everything, fill again: the heap comes back whole.
    let mut blocks = [(0, 0); MAX_BLOCKS];
    let mut seed = 0x9E37_79B9_7F4A_7C15;
    let (first, first_bytes) = fill(&mut blocks, &mut seed);
    let full = ALLOC.stats();
    free(&blocks, first);
    let (second, second_bytes) = fill(&mut blocks, &mut seed);
    let share = |bytes: usize| bytes * 100 / (64 * 1024);
    let _ = writeln!(
        Console,
        "filled to null: {first} blocks, {first_bytes} bytes ({} % of the heap); \
         freed all, filled again: {second} blocks, {second_bytes} bytes ({} %)",
        share(first_bytes),
        share(second_bytes)
    );
    let _ = writeln!(Console, "full heap: {full}");
    free(&blocks, second);
    if ALLOC.stats().blocks_in_use() != 0 || second_bytes * 10 < first_bytes * 9 {
        return 1;
    }
    0
}
