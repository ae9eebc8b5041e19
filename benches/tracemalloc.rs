//! What tracing costs: tracemalloc over PyMalloc (off, exact with 1 and 10
//! frames, sampled at 512 KiB) beside dhat over the system allocator (dhat
//! wraps `System`; it records a 10-frame backtrace on every allocation),
//! on the churn, binary-tree and JSON-like workloads of the allocator
//! benchmark. Time per operation, and peak resident memory over the
//! workload's run (the kernel's high-water mark, reset before each one).
//!
//! Each contender runs in its own process; repetitions are interleaved and
//! each figure's minimum kept. Which unwinder tracemalloc uses depends on
//! the build: run it once plain (DWARF) and once with
//! `RUSTFLAGS="-C force-frame-pointers=yes"` (frame pointers).
//!
//! `cargo bench -p pymalloc-bench --bench tracemalloc [-- REPS]`

mod driver;
// `lifo` is the alloc benchmark's alone.
#[allow(dead_code)]
mod workloads;

use driver::time;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};
use workloads::{binary_trees, churn, json};

use pymalloc::{tracemalloc, PyMalloc};

static PYMALLOC: PyMalloc = PyMalloc::system();
static DHAT: dhat::Alloc = dhat::Alloc;

const CONTENDERS: [&str; 6] = [
    "system",
    "dhat",
    "pymalloc",
    "tm exact 1",
    "tm exact 10",
    "tm sampled 512K",
];

mod id {
    pub const SYSTEM: u8 = 0;
    pub const DHAT: u8 = 1;
    pub const PYMALLOC: u8 = 2;
    pub const EXACT_1: u8 = 3;
    pub const EXACT_10: u8 = 4;
    pub const SAMPLED: u8 = 5;
}

/// This process's contender, read from `BENCH_CONTENDER` at the first
/// allocation so that no block crosses from one allocator to another.
static CHOICE: AtomicU8 = AtomicU8::new(u8::MAX);

#[inline]
fn choice() -> u8 {
    match CHOICE.load(Ordering::Relaxed) {
        u8::MAX => choose(),
        c => c,
    }
}

#[cold]
fn choose() -> u8 {
    let c = workloads::contender_from_env();
    CHOICE.store(c, Ordering::Relaxed);
    c
}

/// Forwards to System, dhat's wrapper of it, or PyMalloc.
struct Dispatch;

// SAFETY: forwards each call, with its contract, to one allocator that never
// changes after the first allocation.
unsafe impl GlobalAlloc for Dispatch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe {
            match choice() {
                id::SYSTEM => System.alloc(layout),
                id::DHAT => DHAT.alloc(layout),
                _ => PYMALLOC.alloc(layout),
            }
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe {
            match choice() {
                id::SYSTEM => System.dealloc(ptr, layout),
                id::DHAT => DHAT.dealloc(ptr, layout),
                _ => PYMALLOC.dealloc(ptr, layout),
            }
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe {
            match choice() {
                id::SYSTEM => System.realloc(ptr, layout, new_size),
                id::DHAT => DHAT.realloc(ptr, layout, new_size),
                _ => PYMALLOC.realloc(ptr, layout, new_size),
            }
        }
    }
}

#[global_allocator]
static GLOBAL: Dispatch = Dispatch;

type Workload = (&'static str, fn(usize) -> usize, usize);

const WORKLOADS: [Workload; 3] = [
    ("churn 10k live", churn, 500_000),
    ("binary trees d16", binary_trees, 5),
    ("JSON-like maps", json, 50_000),
];

/// The kernel's resident high-water mark of this process, in KiB.
fn peak_kib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// Runs workload `w` under this contender's tracer; returns ns/op and the
/// KiB tracemalloc's tables reached.
fn measure((_, work, n): Workload) -> (f64, f64) {
    let dhat = (choice() == id::DHAT).then(|| dhat::Profiler::builder().testing().build());
    match choice() {
        id::EXACT_1 => tracemalloc::start(1),
        id::EXACT_10 => tracemalloc::start(10),
        id::SAMPLED => tracemalloc::start_sampled(1, 512 << 10),
        _ => {}
    }
    let ns = time(|| work(n));
    // Tables only grow while tracing: this is their peak.
    let tables = tracemalloc::get_tracemalloc_memory() as f64 / 1024.0;
    tracemalloc::stop();
    drop(dhat);
    (ns, if choice() >= id::EXACT_1 { tables } else { 0.0 })
}

/// In a child: time each workload, then run each again in a fresh process
/// of its own (so that no workload inherits another's resident pages) for
/// its peak resident memory.
fn child(contender: usize) {
    assert_eq!(choice() as usize, contender);
    // The first start picks the unwinder and warms it up.
    if choice() >= id::EXACT_1 {
        tracemalloc::start(1);
        tracemalloc::stop();
    }
    let mut tables = Vec::new();
    for workload in WORKLOADS {
        let (ns, kib) = measure(workload);
        println!("{}\t{ns}", workload.0);
        tables.push(kib);
    }
    let exe = std::env::current_exe().expect("own path");
    for (w, workload) in WORKLOADS.iter().enumerate() {
        let out = std::process::Command::new(&exe)
            .args(["--memory", &w.to_string()])
            .env("BENCH_CONTENDER", contender.to_string())
            .output()
            .expect("run a workload alone");
        let peak = String::from_utf8_lossy(&out.stdout);
        println!("{}: peak RSS KiB\t{}", workload.0, peak.trim());
    }
    for (workload, kib) in WORKLOADS.iter().zip(tables) {
        println!("{}: tracemalloc tables KiB\t{kib}", workload.0);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--memory") {
        let w: usize = args[at + 1].parse().expect("workload number");
        measure(WORKLOADS[w]);
        println!("{}", peak_kib());
        return;
    }
    if !args.iter().any(|a| a == "--contender") {
        tracemalloc::start(1);
        tracemalloc::stop();
        eprintln!("unwinder in this build: {:?}", tracemalloc::unwinder());
    }
    driver::main(&CONTENDERS, child, print_table);
}

fn print_table(best: &driver::Best) {
    best.print_table(
        &CONTENDERS,
        &format!(
            "ns/op and KiB, minimum of {} interleaved runs; ratios: time or memory over the \
             untraced run of the same allocator",
            best.reps
        ),
        &[
            "dhat/system",
            "exact 1/pymalloc",
            "exact 10/pymalloc",
            "sampled/pymalloc",
        ],
        |at| {
            let at = |c: u8| at(c as usize);
            let py = at(id::PYMALLOC);
            vec![
                format!("{:.2}", at(id::DHAT) / at(id::SYSTEM)),
                format!("{:.2}", at(id::EXACT_1) / py),
                format!("{:.2}", at(id::EXACT_10) / py),
                format!("{:.2}", at(id::SAMPLED) / py),
            ]
        },
    );
}
