//! Issue 12's table: the share of a 64 KiB region in live blocks, random
//! sizes until null then 20 rounds of freeing a random half and refilling,
//! for pymalloc and the embedded allocators on identical arrays and
//! sequences. The shares count bytes, so one run is exact; the second
//! table times the same workload (ns per allocation, its free included),
//! the contenders interleaved, the minimum of `REPS` kept.
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

/// Runs the workload of one mix on a fresh contender `which`, each over its
/// own span; `REPS` runs on the same heap, which each run leaves empty.
fn measure(which: usize, lo: usize, hi: usize) -> (Filled, f64) {
    fn timed(alloc: &impl GlobalAlloc, lo: usize, hi: usize) -> (Filled, f64) {
        let start = Instant::now();
        let filled = run(alloc, lo, hi, 20, 1);
        let ns = start.elapsed().as_nanos() as f64 / filled.allocations as f64;
        (filled, ns)
    }
    let spans = span(which);
    match which {
        // SAFETY: the span is used by the one allocator made over it here,
        // which lives until the end of this call.
        0 => timed(&unsafe { PyMalloc::region(spans) }, lo, hi),
        1 => timed(
            // SAFETY: as above.
            &unsafe { PyMalloc::<Region>::region_with(spans, Config::SMALL) },
            lo,
            hi,
        ),
        2 => {
            let heap = linked_list_allocator::LockedHeap::empty();
            // SAFETY: as above.
            unsafe { heap.lock().init(spans.cast(), SPAN) };
            timed(&heap, lo, hi)
        }
        3 => {
            // SAFETY: as above.
            let claim = unsafe { talc::source::Claim::array(spans) };
            timed(
                &talc::TalcLock::<spinning_top::RawSpinlock, _>::new(claim),
                lo,
                hi,
            )
        }
        4 => {
            let heap = embedded_alloc::LlffHeap::empty();
            // SAFETY: as above.
            unsafe { heap.init(spans as usize, SPAN) };
            timed(&heap, lo, hi)
        }
        _ => {
            let heap = embedded_alloc::TlsfHeap::empty();
            // SAFETY: as above.
            unsafe { heap.init(spans as usize, SPAN) };
            timed(&heap, lo, hi)
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
                let (f, ns) = measure(which, lo, hi);
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
    println!("ns per allocation (and its free) over the same workload, minimum of {REPS} interleaved runs");
}
