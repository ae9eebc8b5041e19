//! Allocator benchmark: small-object workloads, large blocks, resident
//! memory after freeing, and the same small-object traffic from several
//! threads at once, for PyMalloc and its peers.
//!
//! Every contender runs in its own process (a global allocator is chosen
//! once per process). The driver interleaves the repetitions of all
//! contenders and keeps each one's minimum, so a noisy neighbour on this
//! shared machine skews no one in particular.
//!
//! `cargo bench -p pymalloc-bench --bench alloc [-- REPS]`

mod driver;
mod global;
mod workloads;

use driver::time;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use workloads::{binary_trees, churn, json, lifo, Rng};

use pymalloc::{PyMalloc, Region};

/// Bytes of the fixed region the region contenders share (one per process).
const REGION: usize = 1 << 30;
static mut HEAP: [u8; REGION] = [0; REGION];

static PYMALLOC: PyMalloc = PyMalloc::system();
/// The locked path every call of a build without thread caches takes (no
/// `std`, the `debug` feature, targets without a thread-exit hook).
static PYMALLOC_LOCKED: PyMalloc =
    PyMalloc::system_with(pymalloc::Config::DEFAULT.with_thread_caches(false));
// SAFETY: HEAP is used by one region contender per process only.
static PYMALLOC_REGION: PyMalloc<Region> = unsafe { PyMalloc::region(&raw mut HEAP) };
/// The path of firmware's region: one heap, no thread caches, every call
/// taking the heap's lock. A `std` build still has tracemalloc's hooks and
/// the cache checks, so this is an upper bound for a `no_std` build.
// SAFETY: as above.
static PYMALLOC_REGION_LOCKED: PyMalloc<Region> = unsafe {
    PyMalloc::region_with(
        &raw mut HEAP,
        pymalloc::Config::DEFAULT
            .with_heaps(1)
            .with_thread_caches(false),
    )
};
static MIMALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
static JEMALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
static TALC: talc::TalcLock<spinning_top::RawSpinlock, talc::source::Claim> =
    // SAFETY: as above.
    talc::TalcLock::new(unsafe { talc::source::Claim::array(&raw mut HEAP) });
static LLA: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

/// The contenders in table order; a child's number indexes this, and the
/// constants in [`id`] name the positions.
const CONTENDERS: [&str; 9] = [
    "system",
    "pymalloc",
    "mimalloc",
    "jemalloc",
    "pymalloc-region",
    "talc",
    "linked_list",
    "pymalloc-locked",
    "pymalloc-region-locked",
];

/// Positions in [`CONTENDERS`], so that the dispatch, the skipped rows and
/// the ratio columns do not depend on counting the list by hand.
mod id {
    pub const SYSTEM: u8 = 0;
    pub const PYMALLOC: u8 = 1;
    pub const MIMALLOC: u8 = 2;
    pub const JEMALLOC: u8 = 3;
    pub const PYMALLOC_REGION: u8 = 4;
    pub const TALC: u8 = 5;
    pub const LINKED_LIST: u8 = 6;
    pub const PYMALLOC_LOCKED: u8 = 7;
    pub const PYMALLOC_REGION_LOCKED: u8 = 8;
}

/// Which allocator this process uses: read from `BENCH_CONTENDER` at the
/// first allocation (before `main`), so that no block ever crosses from one
/// allocator to another.
static CHOICE: AtomicU8 = AtomicU8::new(UNCHOSEN);
const UNCHOSEN: u8 = u8::MAX;

#[inline]
fn choice() -> u8 {
    let c = CHOICE.load(Ordering::Relaxed);
    if c != UNCHOSEN {
        return c;
    }
    choose()
}

#[cold]
fn choose() -> u8 {
    let c = workloads::contender_from_env();
    if c == id::LINKED_LIST {
        // SAFETY: HEAP is used by this contender alone in this process, and
        // this runs once, at the first allocation, before any thread.
        unsafe { LLA.lock().init((&raw mut HEAP).cast(), REGION) };
    }
    CHOICE.store(c, Ordering::Relaxed);
    c
}

/// Forwards to the chosen allocator. Every contender pays the same
/// predictable branch and one direct call to an out-of-line function of its
/// own, as a `#[global_allocator]` is reached through `__rust_alloc`: none
/// has its code inlined into the dispatcher, where it would share the
/// registers (and the prologue) of seven others.
macro_rules! dispatch {
    ($method:ident($($arg:expr),*)) => {
        match choice() {
            id::PYMALLOC => OutOfLine::$method(&PYMALLOC, $($arg),*),
            id::MIMALLOC => OutOfLine::$method(&MIMALLOC, $($arg),*),
            id::JEMALLOC => OutOfLine::$method(&JEMALLOC, $($arg),*),
            id::PYMALLOC_REGION => OutOfLine::$method(&PYMALLOC_REGION, $($arg),*),
            id::TALC => OutOfLine::$method(&TALC, $($arg),*),
            id::LINKED_LIST => OutOfLine::$method(&LLA, $($arg),*),
            id::PYMALLOC_LOCKED => OutOfLine::$method(&PYMALLOC_LOCKED, $($arg),*),
            id::PYMALLOC_REGION_LOCKED => OutOfLine::$method(&PYMALLOC_REGION_LOCKED, $($arg),*),
            _ => OutOfLine::$method(&System, $($arg),*),
        }
    };
}

/// One contender's entry points, never inlined.
struct OutOfLine;

impl OutOfLine {
    #[inline(never)]
    unsafe fn alloc(a: &impl GlobalAlloc, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { a.alloc(layout) }
    }
    #[inline(never)]
    unsafe fn alloc_zeroed(a: &impl GlobalAlloc, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { a.alloc_zeroed(layout) }
    }
    #[inline(never)]
    unsafe fn dealloc(a: &impl GlobalAlloc, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { a.dealloc(ptr, layout) }
    }
    #[inline(never)]
    unsafe fn realloc(a: &impl GlobalAlloc, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { a.realloc(ptr, layout, size) }
    }
}

global::dispatching_global_allocator!();

/// Insert then remove random keys in a BTreeMap.
fn btree(keys: usize) -> usize {
    let mut rng = Rng(4);
    let mut map = BTreeMap::new();
    let order: Vec<u64> = (0..keys).map(|_| rng.next()).collect();
    for &k in &order {
        map.insert(k, k);
    }
    for &k in &order {
        map.remove(&k);
    }
    keys * 2
}

/// 100 live blocks of 513 B to 64 KiB, replaced at random.
fn large(steps: usize) -> usize {
    let mut rng = Rng(5);
    let mut live: Vec<Vec<u8>> = (0..100)
        .map(|_| Vec::with_capacity(513 + rng.below(65_024)))
        .collect();
    for _ in 0..steps {
        let slot = rng.below(live.len());
        live[slot] = Vec::with_capacity(513 + rng.below(65_024));
        live[slot].push(1);
    }
    black_box(&live);
    steps
}

fn resident_kib() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<usize>()
        .unwrap()
        * 4
}

/// Resident KiB above the start after allocating 1M small objects and
/// freeing 90 % of them at random, then all of them, and 100 ms and a
/// thousand allocations after that (allocators that give memory back after
/// a delay do so on a later call: mimalloc, and PyMalloc over `System`).
fn rss() -> [usize; 4] {
    let base = resident_kib();
    let mut rng = Rng(6);
    let mut objects: Vec<Option<Box<[u8]>>> = (0..1_000_000)
        .map(|i| Some(vec![i as u8; 16 + rng.below(100)].into_boxed_slice()))
        .collect();
    let peak = resident_kib() - base;
    for slot in objects.iter_mut() {
        if rng.below(10) != 0 {
            *slot = None;
        }
    }
    let ninety = resident_kib().saturating_sub(base);
    drop(objects);
    let freed = resident_kib().saturating_sub(base);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let later: Vec<Box<[u8]>> = (0..1000).map(|i| vec![1; 8 + i % 505].into()).collect();
    drop(later);
    [peak, ninety, freed, resident_kib().saturating_sub(base)]
}

/// The figures of [`rss`], in its order.
const RSS_ROWS: [&str; 4] = [
    "rss peak KiB",
    "rss after 90% freed KiB",
    "rss after 100% freed KiB",
    "rss 100 ms and 1000 allocations later KiB",
];

/// Blocks a producer hands over in one message. The channel costs about one
/// futex wake-up per message (the faster side keeps running dry and
/// sleeping): a few microseconds, which spread over 256 blocks is a few ns
/// each, so the row measures the allocator rather than the channel.
const BATCH: usize = 256;

/// The byte a block of `len` bytes is filled with, so that a consumer can
/// tell a block that the allocator handed out twice while it was in flight.
fn cookie(len: usize) -> u8 {
    len as u8 ^ 0xa5
}

/// Cross-thread frees, xmalloc-test / larson style: half the threads
/// allocate `blocks` blocks of 8 to 512 bytes between them, filled with a
/// cookie, and send them in batches each to its own consumer, which checks
/// and frees them. Every block dies on a thread other than the one that made
/// it: a per-thread cache must send it back to its owner (mimalloc,
/// jemalloc), a heap behind one lock (talc) takes it back under that lock,
/// contended by the producers.
fn cross_thread_free(threads: usize, blocks: usize) -> usize {
    assert!(
        threads >= 2 && threads.is_multiple_of(2),
        "producer/consumer pairs"
    );
    let pairs = threads / 2;
    let batches = blocks / pairs / BATCH;
    std::thread::scope(|s| {
        for pair in 0..pairs {
            // Bounded, so that producers cannot run ahead of a descheduled
            // consumer and turn the row into a test of heap growth.
            let (tx, rx) = mpsc::sync_channel::<Vec<Box<[u8]>>>(4);
            s.spawn(move || {
                let mut rng = Rng(7 + pair as u64);
                for _ in 0..batches {
                    let batch = (0..BATCH)
                        .map(|_| {
                            let len = 8 + rng.below(505);
                            vec![cookie(len); len].into_boxed_slice()
                        })
                        .collect();
                    tx.send(batch).expect("consumer alive");
                }
            });
            s.spawn(move || {
                for batch in rx {
                    for block in batch {
                        let c = cookie(block.len());
                        // Both ends: a block freed or handed out again
                        // while in flight gets a free-list link in its
                        // first word, or someone else's bytes anywhere.
                        assert!(block[0] == c && block[block.len() - 1] == c);
                    }
                }
            });
        }
    });
    pairs * batches * BATCH
}

/// The single-thread churn on `threads` threads at once, `steps` split
/// among them. Nothing is shared but the allocator: this shows what its
/// locking, or its per-thread heaps, cost when every thread allocates.
fn parallel_churn(threads: usize, steps: usize) -> usize {
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| churn(steps / threads)))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    })
}

/// (name, small-object workload?, run at scale `s`, region-friendly size)
type Workload = (&'static str, bool, fn(usize) -> usize, usize);

const WORKLOADS: [Workload; 6] = [
    ("churn 10k live", true, churn, 2_000_000),
    ("LIFO x100", true, lifo, 20_000),
    ("binary trees d16", true, binary_trees, 20),
    ("JSON-like maps", true, json, 200_000),
    ("BTreeMap 200k", true, btree, 200_000),
    ("large 513B-64KiB", false, large, 200_000),
];

/// (name, run on `threads` threads at total scale `s`, scale). The scale
/// is the same at every thread count, so on this 2-core machine a row's
/// ns/op would halve from the single-thread figure with perfect scaling
/// and stay there at 4 and 8 threads.
type ThreadedWorkload = (&'static str, fn(usize, usize) -> usize, usize);

const THREADED: [ThreadedWorkload; 2] = [
    ("cross-thread free", cross_thread_free, 4_000_000),
    ("churn 10k live per thread", parallel_churn, 4_000_000),
];

/// 2 threads fill this machine's 2 cores; 4 and 8 oversubscribe them, where
/// a lock holder can be descheduled and a lock that spins rather than
/// sleeps makes the others wait out its time slice.
const THREADS: [usize; 3] = [2, 4, 8];

/// In a child: run every workload once and print one line per figure.
fn child(contender: usize) {
    assert_eq!(choice() as usize, contender);
    // linked_list_allocator walks its whole free list on every call: with
    // 10k live blocks one step takes microseconds, so it runs the churn
    // alone, at a hundredth of the steps (ns per step stays comparable).
    let slow = choice() == id::LINKED_LIST;
    for (name, _, work, n) in WORKLOADS {
        if slow && name != WORKLOADS[0].0 {
            println!("{name}\tNaN");
            continue;
        }
        println!("{name}\t{}", time(|| work(if slow { n / 100 } else { n })));
    }
    // Measured before the threaded rows, as it was before they existed, so
    // that the arenas and caches they leave behind do not move it; printed
    // after them, so that the table keeps the time rows together.
    let rss = if slow {
        [f64::NAN; 4]
    } else {
        rss().map(|kib| kib as f64)
    };
    for (name, work, n) in THREADED {
        for threads in THREADS {
            // Skipped, not scaled down: at a hundredth of the work the
            // thread start-up would be most of the time.
            let ns = if slow {
                f64::NAN
            } else {
                time(|| work(threads, n))
            };
            println!("{name}, {threads} threads\t{ns}");
        }
    }
    for (name, kib) in RSS_ROWS.into_iter().zip(rss) {
        println!("{name}\t{kib}");
    }
}

fn main() {
    driver::main(&CONTENDERS, child, print_table);
}

fn print_table(best: &driver::Best) {
    best.print_table(
        &CONTENDERS,
        &format!(
            "ns/op (RSS rows: KiB), minimum of {} interleaved runs; threaded rows: \
             wall time / all threads' blocks or steps; ratios: /system, /mimalloc, /jemalloc",
            best.reps
        ),
        &[
            "pymalloc/system",
            "pymalloc/mimalloc",
            "pymalloc/jemalloc",
            "region: linked_list/pymalloc-region",
            "locked/pymalloc",
            "region-locked/pymalloc",
        ],
        |at| {
            let at = |c: u8| at(c as usize);
            let py = at(id::PYMALLOC);
            vec![
                format!("{:.2}", py / at(id::SYSTEM)),
                format!("{:.2}", py / at(id::MIMALLOC)),
                format!("{:.2}", py / at(id::JEMALLOC)),
                format!("{:.1}", at(id::LINKED_LIST) / at(id::PYMALLOC_REGION)),
                format!("{:.2}", at(id::PYMALLOC_LOCKED) / py),
                format!("{:.2}", at(id::PYMALLOC_REGION_LOCKED) / py),
            ]
        },
    );
}
