//! Firmware-style use: no std, no OS services but a way to print, a fixed
//! 64 KiB heap in a `static`, `PyMalloc<Region>` as the global allocator.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use pymalloc::{Config, PyMalloc, Region};

static mut HEAP: [u8; 64 * 1024] = [0; 64 * 1024];

// SAFETY: HEAP is used by this allocator alone.
#[global_allocator]
static ALLOC: PyMalloc<Region> = unsafe { PyMalloc::region_with(&raw mut HEAP, Config::SMALL) };

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
    0
}
