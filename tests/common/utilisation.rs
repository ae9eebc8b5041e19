//! The utilisation workload of issue 12: random sizes until the allocator
//! returns null, then rounds of freeing a random half and refilling to
//! null. Shared by the tests and by `benches/utilisation.rs`, so that both
//! measure the same sequence.

use super::rng::Rng;
use std::alloc::{GlobalAlloc, Layout};

/// Bytes requested by the live blocks: after the first fill, and the
/// lowest after any refill.
#[derive(Clone, Copy, Debug)]
pub struct Filled {
    pub first: usize,
    pub after_churn: usize,
    /// Successful allocations over the whole run.
    pub allocations: usize,
}

/// Live blocks: address, layout.
type Blocks = Vec<(*mut u8, Layout)>;

/// Allocates random sizes in `lo..=hi` (8-aligned) until the first null;
/// each block is filled with a byte derived from its address, checked on free.
/// Returns how many it allocated.
fn fill(
    alloc: &impl GlobalAlloc,
    rng: &mut Rng,
    lo: usize,
    hi: usize,
    blocks: &mut Blocks,
) -> usize {
    let before = blocks.len();
    loop {
        let size = lo + rng.below(hi - lo + 1);
        let layout = Layout::from_size_align(size, 8).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { alloc.alloc(layout) };
        if p.is_null() {
            return blocks.len() - before;
        }
        // SAFETY: the block has `size` bytes.
        unsafe { p.write_bytes(stamp(p), size) };
        blocks.push((p, layout));
    }
}

fn stamp(p: *mut u8) -> u8 {
    (p as usize >> 3) as u8
}

/// Frees one block, checking its stamp.
///
/// # Safety
/// `p` is live from `alloc` with `layout`, stamped by `fill`.
unsafe fn free(alloc: &impl GlobalAlloc, p: *mut u8, layout: Layout) {
    // SAFETY: per the contract.
    let bytes = unsafe { std::slice::from_raw_parts(p, layout.size()) };
    assert!(bytes.iter().all(|&b| b == stamp(p)), "block corrupted");
    // SAFETY: per the contract.
    unsafe { alloc.dealloc(p, layout) };
}

fn live_bytes(blocks: &Blocks) -> usize {
    blocks.iter().map(|(_, l)| l.size()).sum()
}

/// The workload: fill, then `rounds` of free-half-and-refill; frees
/// everything at the end.
pub fn run(alloc: &impl GlobalAlloc, lo: usize, hi: usize, rounds: usize, seed: u64) -> Filled {
    let mut rng = Rng::new(seed);
    let mut blocks = Blocks::new();
    let mut allocations = fill(alloc, &mut rng, lo, hi, &mut blocks);
    let first = live_bytes(&blocks);
    let mut after_churn = usize::MAX;
    for _ in 0..rounds {
        let mut kept = Blocks::new();
        for (p, layout) in blocks.drain(..) {
            if rng.chance(50) {
                // SAFETY: live, stamped, freed once.
                unsafe { free(alloc, p, layout) };
            } else {
                kept.push((p, layout));
            }
        }
        blocks = kept;
        allocations += fill(alloc, &mut rng, lo, hi, &mut blocks);
        after_churn = after_churn.min(live_bytes(&blocks));
    }
    for (p, layout) in blocks {
        // SAFETY: as above.
        unsafe { free(alloc, p, layout) };
    }
    Filled {
        first,
        after_churn: if rounds == 0 { first } else { after_churn },
        allocations,
    }
}

/// The four mixes of issue 12, as `(lo, hi)` request sizes.
pub const MIXES: [(usize, usize); 4] = [(8, 300), (8, 64), (16, 512), (100, 2000)];
