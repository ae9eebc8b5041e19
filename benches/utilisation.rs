//! Issue 12's table: the share of a 64 KiB region in live blocks, random
//! sizes until null then 20 rounds of freeing a random half and refilling,
//! for pymalloc and the embedded allocators on identical arrays and
//! sequences. The shares count bytes, so one run is exact; the second
//! table times the same workload (ns per allocation, its free included),
//! the contenders interleaved, the minimum of `REPS` kept. A third table
//! gives the mean shares over the workload's seeds 1–8 (the first two use
//! seed 1), so that a policy is not judged on one sequence.
//! Run: cargo bench -p pymalloc-bench --bench utilisation

#[allow(dead_code)]
#[path = "../tests/common/rng.rs"]
mod rng;
#[path = "../tests/common/utilisation.rs"]
mod utilisation;

use pymalloc::{Config, PyMalloc, Region};
use std::alloc::GlobalAlloc;
use std::time::Instant;
use utilisation::{run, Filled, MIXES};

const SPAN: usize = 64 * 1024;
const REPS: usize = 5;
const CONTENDERS: [&str; 6] = [
    "pymalloc region()",
    "pymalloc Config::SMALL",
    "linked_list_allocator",
    "talc",
    "embedded-alloc LLFF",
    "embedded-alloc TLSF",
];

/// One span per contender, page-aligned so that no contender loses bytes
/// to where the linker put it.
#[repr(C, align(4096))]
struct Span([u8; SPAN]);
static mut SPANS: [Span; 6] = [const { Span([0; SPAN]) }; 6];

fn span(i: usize) -> *mut [u8; SPAN] {
    // SAFETY: only the address is taken; each span serves one contender.
    unsafe { &raw mut SPANS[i].0 }
}

/// Seeds of the workload for the table of means.
const SEEDS: std::ops::RangeInclusive<u64> = 1..=8;

/// Runs the workload of one mix with `seed` on a fresh contender `which`,
/// over its own span.
fn measure(which: usize, lo: usize, hi: usize, seed: u64) -> (Filled, f64) {
    fn timed(alloc: &impl GlobalAlloc, lo: usize, hi: usize, seed: u64) -> (Filled, f64) {
        let start = Instant::now();
        let filled = run(alloc, lo, hi, 20, seed);
        let ns = start.elapsed().as_nanos() as f64 / filled.allocations as f64;
        (filled, ns)
    }
    let spans = span(which);
    match which {
        // SAFETY: the span is used by the one allocator made over it here,
        // which lives until the end of this call.
        0 => timed(&unsafe { PyMalloc::region(spans) }, lo, hi, seed),
        1 => timed(
            // SAFETY: as above.
            &unsafe { PyMalloc::<Region>::region_with(spans, Config::SMALL) },
            lo,
            hi,
            seed,
        ),
        2 => {
            let heap = linked_list_allocator::LockedHeap::empty();
            // SAFETY: as above.
            unsafe { heap.lock().init(spans.cast(), SPAN) };
            timed(&heap, lo, hi, seed)
        }
        3 => {
            // SAFETY: as above.
            let claim = unsafe { talc::source::Claim::array(spans) };
            timed(
                &talc::TalcLock::<spinning_top::RawSpinlock, _>::new(claim),
                lo,
                hi,
                seed,
            )
        }
        4 => {
            let heap = embedded_alloc::LlffHeap::empty();
            // SAFETY: as above.
            unsafe { heap.init(spans as usize, SPAN) };
            timed(&heap, lo, hi, seed)
        }
        _ => {
            let heap = embedded_alloc::TlsfHeap::empty();
            // SAFETY: as above.
            unsafe { heap.init(spans as usize, SPAN) };
            timed(&heap, lo, hi, seed)
        }
    }
}

fn header() {
    println!("| sizes | {} |", CONTENDERS.join(" | "));
    println!("|---|{}", "---|".repeat(CONTENDERS.len()));
}

fn main() {
    let mut shares = Vec::new();
    let mut times = Vec::new();
    for (lo, hi) in MIXES {
        let mut best = [f64::INFINITY; CONTENDERS.len()];
        let mut filled = Vec::new();
        for rep in 0..REPS {
            for (which, best) in best.iter_mut().enumerate() {
                let (f, ns) = measure(which, lo, hi, 1);
                *best = best.min(ns);
                if rep == 0 {
                    filled.push(f);
                }
            }
        }
        let share = |b: usize| b * 100 / SPAN;
        let cells: Vec<String> = filled
            .iter()
            .map(|f| format!("{} % ({} %)", share(f.first), share(f.after_churn)))
            .collect();
        shares.push(format!("| {lo}–{hi} B | {} |", cells.join(" | ")));
        let cells: Vec<String> = best.iter().map(|ns| format!("{ns:.1}")).collect();
        times.push(format!("| {lo}–{hi} B | {} |", cells.join(" | ")));
    }
    header();
    shares.iter().for_each(|row| println!("{row}"));
    println!(
        "first fill (lowest after 20 rounds of churn), share of the 64 KiB span; \
         the same with and without std (a region under 32 MiB has no thread caches)\n"
    );
    header();
    times.iter().for_each(|row| println!("{row}"));
    println!("ns per allocation (and its free) over the same workload, minimum of {REPS} interleaved runs\n");
    header();
    for (lo, hi) in MIXES {
        let cells: Vec<String> = (0..CONTENDERS.len())
            .map(|which| {
                let (mut first, mut churned) = (0, 0);
                for seed in SEEDS {
                    let f = measure(which, lo, hi, seed).0;
                    first += f.first;
                    churned += f.after_churn;
                }
                let mean = |b: usize| b as f64 * 100.0 / (SPAN * SEEDS.count()) as f64;
                format!("{:.1} % ({:.1} %)", mean(first), mean(churned))
            })
            .collect();
        println!("| {lo}–{hi} B | {} |", cells.join(" | "));
    }
    println!("the first table's shares, mean over the workload's seeds 1–8");
}
