//! Issue 12's table: the share of a 64 KiB region in live blocks, random
//! sizes until null then 20 rounds of freeing a random half and refilling,
//! for pymalloc and the embedded allocators on identical arrays and
//! sequences. Counts bytes, not time, so one run is exact.
//! Run: cargo bench -p pymalloc-bench --bench utilisation

#[allow(dead_code)]
#[path = "../tests/common/rng.rs"]
mod rng;
#[path = "../tests/common/utilisation.rs"]
mod utilisation;

use pymalloc::{Config, PyMalloc, Region};
use utilisation::{run, Filled, MIXES};

const SPAN: usize = 64 * 1024;

/// One span per contender, page-aligned so that no contender loses bytes
/// to where the linker put it.
#[repr(C, align(4096))]
struct Span([u8; SPAN]);
static mut SPANS: [Span; 4] = [const { Span([0; SPAN]) }; 4];

fn span(i: usize) -> *mut [u8; SPAN] {
    // SAFETY: only the address is taken; each span serves one contender.
    unsafe { &raw mut SPANS[i].0 }
}

fn cell(f: Filled) -> String {
    let share = |b: usize| b * 100 / SPAN;
    format!("{} % ({} %)", share(f.first), share(f.after_churn))
}

fn main() {
    println!(
        "| sizes | pymalloc region() | pymalloc Config::SMALL | linked_list_allocator | talc |"
    );
    println!("|---|---|---|---|---|");
    for (lo, hi) in MIXES {
        // SAFETY: each span is used by the one allocator made over it here.
        let auto = unsafe { PyMalloc::region(span(0)) };
        // SAFETY: as above.
        let small = unsafe { PyMalloc::<Region>::region_with(span(1), Config::SMALL) };
        let lla = linked_list_allocator::LockedHeap::empty();
        // SAFETY: as above.
        unsafe { lla.lock().init(span(2).cast(), SPAN) };
        let talc = talc::TalcLock::<spinning_top::RawSpinlock, _>::new(
            // SAFETY: as above.
            unsafe { talc::source::Claim::array(span(3)) },
        );
        println!(
            "| {lo}–{hi} B | {} | {} | {} | {} |",
            cell(run(&auto, lo, hi, 20, 1)),
            cell(run(&small, lo, hi, 20, 1)),
            cell(run(&lla, lo, hi, 20, 1)),
            cell(run(&talc, lo, hi, 20, 1)),
        );
    }
    println!("first fill (lowest after 20 rounds of churn), share of the 64 KiB span");
}
