//! Allocator benchmark: small-object workloads, large blocks, and resident
//! memory after freeing, for PyMalloc and its peers.
//!
//! Every contender runs in its own process (a global allocator is chosen
//! once per process). The driver interleaves the repetitions of all
//! contenders and keeps each one's minimum, so a noisy neighbour on this
//! shared machine skews no one in particular.
//!
//! `cargo bench -p pymalloc-bench --bench alloc [-- REPS]`

mod driver;

use driver::time;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::sync::atomic::{AtomicU8, Ordering};

use pymalloc::{PyMalloc, Region};

/// Bytes of the fixed region the region contenders share (one per process).
const REGION: usize = 1 << 30;
static mut HEAP: [u8; REGION] = [0; REGION];

static PYMALLOC: PyMalloc = PyMalloc::system();
// SAFETY: HEAP is used by one region contender per process only.
static PYMALLOC_REGION: PyMalloc<Region> = unsafe { PyMalloc::region(&raw mut HEAP) };
static MIMALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
static TALC: talc::TalcLock<spinning_top::RawSpinlock, talc::source::Claim> =
    // SAFETY: as above.
    talc::TalcLock::new(unsafe { talc::source::Claim::array(&raw mut HEAP) });
static LLA: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

const CONTENDERS: [&str; 6] = [
    "system",
    "pymalloc",
    "mimalloc",
    "pymalloc-region",
    "talc",
    "linked_list",
];

/// Which allocator this process uses: read from `BENCH_CONTENDER` at the
/// first allocation (before `main`), so that no block ever crosses from one
/// allocator to another.
static CHOICE: AtomicU8 = AtomicU8::new(UNCHOSEN);
const UNCHOSEN: u8 = u8::MAX;

extern "C" {
    fn getenv(name: *const std::ffi::c_char) -> *const std::ffi::c_char;
}

fn choice() -> u8 {
    let c = CHOICE.load(Ordering::Relaxed);
    if c != UNCHOSEN {
        return c;
    }
    // SAFETY: a NUL-terminated name; getenv does not allocate, and its
    // answer, when not null, is a NUL-terminated string.
    let value = unsafe { getenv(c"BENCH_CONTENDER".as_ptr()) };
    let c = if value.is_null() {
        0
    } else {
        // SAFETY: see above.
        unsafe { std::ffi::CStr::from_ptr(value) }
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    if c == 5 {
        // SAFETY: HEAP is used by this contender alone in this process, and
        // this runs once, at the first allocation, before any thread.
        unsafe { LLA.lock().init((&raw mut HEAP).cast(), REGION) };
    }
    CHOICE.store(c, Ordering::Relaxed);
    c
}

/// Forwards to the chosen allocator. Every contender pays the same
/// predictable branch.
struct Dispatch;

macro_rules! dispatch {
    ($method:ident($($arg:expr),*)) => {
        match choice() {
            1 => PYMALLOC.$method($($arg),*),
            2 => MIMALLOC.$method($($arg),*),
            3 => PYMALLOC_REGION.$method($($arg),*),
            4 => TALC.$method($($arg),*),
            5 => LLA.$method($($arg),*),
            _ => System.$method($($arg),*),
        }
    };
}

// SAFETY: forwards each call, with its contract, to one allocator that never
// changes after the first allocation.
unsafe impl GlobalAlloc for Dispatch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { dispatch!(alloc(layout)) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { dispatch!(dealloc(ptr, layout)) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { dispatch!(realloc(ptr, layout, new_size)) }
    }
}

#[global_allocator]
static GLOBAL: Dispatch = Dispatch;

/// A small deterministic generator, the same sequence for every contender.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// 10k live blocks of random small sizes; each step frees one at random
/// and allocates a new one in its place.
fn churn(steps: usize) -> usize {
    let mut rng = Rng(1);
    let mut live: Vec<Vec<u8>> = (0..10_000).map(|_| vec![1u8; 8 + rng.below(505)]).collect();
    for _ in 0..steps {
        let slot = rng.below(live.len());
        live[slot] = vec![2u8; 8 + rng.below(505)];
    }
    black_box(&live);
    steps
}

/// Allocate 100 blocks, free them newest first, over and over.
fn lifo(rounds: usize) -> usize {
    let mut stack: Vec<Box<[u64; 4]>> = Vec::with_capacity(100);
    for r in 0..rounds {
        for i in 0..100 {
            stack.push(Box::new([(r + i) as u64; 4]));
        }
        while let Some(b) = stack.pop() {
            black_box(b);
        }
    }
    rounds * 100
}

/// Build and drop complete binary trees (the benchmarks-game workload).
fn binary_trees(rounds: usize) -> usize {
    struct Node(Option<Box<(Node, Node)>>);
    fn build(depth: u32) -> Node {
        Node((depth > 0).then(|| Box::new((build(depth - 1), build(depth - 1)))))
    }
    fn count(n: &Node) -> usize {
        n.0.as_ref().map_or(1, |c| 1 + count(&c.0) + count(&c.1))
    }
    let mut nodes = 0;
    for _ in 0..rounds {
        nodes += count(&build(16));
    }
    nodes
}

/// Build and drop JSON-like records: maps of short strings.
fn json(records: usize) -> usize {
    let mut rng = Rng(3);
    let mut batch = Vec::new();
    for i in 0..records {
        let mut record: HashMap<String, String> = HashMap::new();
        for f in 0..6 {
            record.insert(format!("field{f}"), "v".repeat(1 + rng.below(40)));
        }
        batch.push(record);
        if i % 1000 == 999 {
            batch.clear();
        }
    }
    records * 13
}

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
/// freeing 90 % of them at random, then all of them.
fn rss() -> (usize, usize, usize) {
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
    (peak, ninety, resident_kib().saturating_sub(base))
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

/// In a child: run every workload once and print one line per figure.
fn child(contender: usize) {
    assert_eq!(choice() as usize, contender);
    // linked_list_allocator walks its whole free list on every call: with
    // 10k live blocks one step takes microseconds, so it runs the churn
    // alone, at a hundredth of the steps (ns per step stays comparable).
    let slow = CONTENDERS[contender] == "linked_list";
    for (name, _, work, n) in WORKLOADS {
        if slow && name != WORKLOADS[0].0 {
            println!("{name}\tNaN");
            continue;
        }
        println!("{name}\t{}", time(|| work(if slow { n / 100 } else { n })));
    }
    if slow {
        return println!(
            "rss peak KiB\tNaN\nrss after 90% freed KiB\tNaN\nrss after 100% freed KiB\tNaN"
        );
    }
    let (peak, ninety, all) = rss();
    println!(
        "rss peak KiB\t{peak}\nrss after 90% freed KiB\t{ninety}\nrss after 100% freed KiB\t{all}"
    );
}

fn main() {
    driver::main(&CONTENDERS, child, print_table);
}

fn print_table(best: &driver::Best) {
    let driver::Best {
        per_contender: best,
        figures: order,
        reps,
    } = best;
    println!(
        "\nns/op (RSS rows: KiB), minimum of {reps} interleaved runs; ratios: /system, /mimalloc\n"
    );
    print!("| workload |");
    for name in CONTENDERS {
        print!(" {name} |");
    }
    println!(" pymalloc/system | pymalloc/mimalloc | region: linked_list/pymalloc-region |");
    println!("|---|{}---|---|---|", "---|".repeat(CONTENDERS.len()));
    for figure in order {
        print!("| {figure} |");
        for c in best {
            print!(" {:.1} |", c[figure]);
        }
        let [sys, py, mi, pyr, _talc, lla] = [0, 1, 2, 3, 4, 5].map(|c| best[c][figure]);
        println!(" {:.2} | {:.2} | {:.1} |", py / sys, py / mi, lla / pyr);
    }
}
