//! A region's store: the free spans ("holes") of the span in one list by
//! address, each hole's header written in the hole itself. In a span under
//! [`FIRST_FIT_SPAN`] a request takes the smallest hole that fits it (best
//! fit, the lowest such on a tie), from there the lowest (first fit); a
//! freed block merges with the holes beside it.
//!
//! Why best fit, why not in large spans, and why a hole must leave either
//! nothing or a whole hole on each side: see "Small regions spend bytes,
//! not speed" in the allocator's design notes (`mod.rs`).

use core::alloc::Layout;
use core::ptr;

/// Every block and hole is a multiple of this and starts on it, so that a
/// hole's header is aligned wherever a block ends.
const GRAIN: usize = 8;

/// The smallest block, and the smallest hole: one header.
const MIN_BLOCK: usize = 16;

/// Spans from which the store takes the first hole that fits rather than
/// the smallest: there the pools serve every small request
/// (`Region::pool_limit_for`, which asserts it), so the store holds arenas
/// and large blocks, and a search of every hole would cost more than its
/// packing gains.
pub(crate) const FIRST_FIT_SPAN: usize = 2 << 20;

/// The header at the start of every hole.
#[repr(C)]
struct Hole {
    /// The hole's bytes, header included.
    size: usize,
    /// The next hole up, or null.
    next: *mut Hole,
}

static_assertions::const_assert!(size_of::<Hole>() <= MIN_BLOCK);
static_assertions::const_assert!(align_of::<Hole>() <= GRAIN);
static_assertions::const_assert!(MIN_BLOCK % GRAIN == 0);

/// The bytes a request of `size` occupies: whole grains, at least a hole's
/// header (so that freeing it can write one).
#[inline]
fn block_size(size: usize) -> usize {
    // A layout's size is at most `isize::MAX`: this cannot overflow.
    size.max(MIN_BLOCK).next_multiple_of(GRAIN)
}

/// The bytes to skip at the start of a hole at `addr` of `len` bytes for a
/// block of `size` aligned to `align`, if it fits: what is left before
/// and after it is either nothing or a whole hole (a smaller remainder
/// could not hold a header).
#[inline]
fn fit(addr: usize, len: usize, size: usize, align: usize) -> Option<usize> {
    let mut pad = addr.wrapping_neg() & (align - 1);
    if pad != 0 && pad < MIN_BLOCK {
        // The next aligned start that leaves a whole hole in front.
        pad = pad.checked_add((MIN_BLOCK - pad).checked_next_multiple_of(align)?)?;
    }
    let back = len.checked_sub(pad.checked_add(size)?)?;
    (back == 0 || back >= MIN_BLOCK).then_some(pad)
}

/// The free spans of one region.
pub(crate) struct Store {
    /// The lowest hole, or null.
    first: *mut Hole,
    /// The span's length, 0 before `init`.
    span: usize,
    /// Bytes in holes.
    free: usize,
    /// Whether a search stops at the first hole that fits.
    first_fit: bool,
}

/// The hole a request will be carved from.
struct Fit {
    /// The pointer to `hole` (`first` or the previous hole's `next`).
    link: *mut *mut Hole,
    hole: *mut Hole,
    len: usize,
    pad: usize,
}

impl Store {
    /// A store without a span: every request fails.
    pub(crate) const fn empty() -> Self {
        Store {
            first: ptr::null_mut(),
            span: 0,
            free: 0,
            first_fit: false,
        }
    }

    /// Gives the store its span, one hole.
    ///
    /// # Safety
    /// The store is empty; `[start, start + len)` is valid for reads and
    /// writes, used by nothing else for as long as the store lives; `start`
    /// and `len` are multiples of 8.
    pub(crate) unsafe fn init(&mut self, start: *mut u8, len: usize) {
        self.span = len;
        self.first_fit = len >= FIRST_FIT_SPAN;
        if len < MIN_BLOCK {
            // No room for a header: the store stays empty.
            return;
        }
        let hole = start.cast::<Hole>();
        // SAFETY: per the contract the span is ours, aligned for a header
        // and long enough for one.
        unsafe {
            hole.write(Hole {
                size: len,
                next: ptr::null_mut(),
            })
        };
        self.first = hole;
        self.free = len;
    }

    /// The span's length, 0 before `init`.
    pub(crate) fn span_len(&self) -> usize {
        self.span
    }

    /// A block for `layout` from the smallest (or, in a large span, the
    /// lowest) hole that fits it, or null.
    pub(crate) fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let size = block_size(layout.size());
        let align = layout.align().max(GRAIN);
        let mut best: Option<Fit> = None;
        let mut link = &raw mut self.first;
        loop {
            // SAFETY: `link` is `first` or the `next` of a hole of the
            // list, all of which are headers inside our span.
            let hole = unsafe { *link };
            if hole.is_null() {
                break;
            }
            // SAFETY: as above, `hole` is a header in our span.
            let len = unsafe { (*hole).size };
            if best.as_ref().is_none_or(|b| len < b.len) {
                if let Some(pad) = fit(hole.addr(), len, size, align) {
                    best = Some(Fit {
                        link,
                        hole,
                        len,
                        pad,
                    });
                    if len == size || self.first_fit {
                        // Nothing smaller fits, or no smaller is wanted.
                        break;
                    }
                }
            }
            // SAFETY: as above.
            link = unsafe { &raw mut (*hole).next };
        }
        let Some(Fit {
            link,
            hole,
            len,
            pad,
        }) = best
        else {
            return ptr::null_mut();
        };
        let back = len - pad - size;
        // SAFETY: `fit` checked that `pad + size + back == len` bytes lie in
        // the hole, with `pad` and `back` each 0 or a whole, aligned hole
        // (the hole's start, `pad` and `size` are multiples of GRAIN); the
        // links are the list's own.
        unsafe {
            let block = hole.cast::<u8>().add(pad);
            let mut after = (*hole).next;
            if back != 0 {
                let tail = block.add(size).cast::<Hole>();
                tail.write(Hole {
                    size: back,
                    next: after,
                });
                after = tail;
            }
            if pad != 0 {
                (*hole).size = pad;
                (*hole).next = after;
            } else {
                *link = after;
            }
            self.free -= size;
            block
        }
    }

    /// Gives back a block, merged with the holes on either side.
    ///
    /// # Safety
    /// `block` came from `alloc(layout)` on this store and is not in use.
    pub(crate) unsafe fn dealloc(&mut self, block: *mut u8, layout: Layout) {
        let size = block_size(layout.size());
        let mut prev: *mut Hole = ptr::null_mut();
        let mut link = &raw mut self.first;
        // SAFETY: the holes' headers lie in our span (as in `alloc`); the
        // block's `size` bytes, GRAIN-aligned and a header long at least,
        // are ours again and overlap no hole: the hole above starts at or
        // after its end, the one below ends at or before its start.
        unsafe {
            while !(*link).is_null() && (*link).addr() < block.addr() {
                prev = *link;
                link = &raw mut (*prev).next;
            }
            let mut next = *link;
            let mut merged = size;
            if !next.is_null() && block.addr() + size == next.addr() {
                merged += (*next).size;
                next = (*next).next;
            }
            if !prev.is_null() && prev.addr() + (*prev).size == block.addr() {
                (*prev).size += merged;
                (*prev).next = next;
            } else {
                let hole = block.cast::<Hole>();
                hole.write(Hole { size: merged, next });
                *link = hole;
            }
        }
        self.free += size;
    }

    /// Resizes a block to `new_size` bytes, in place when it can
    /// (shrinking gives the tail back; growing takes the front of the hole
    /// right after it), else by moving its first `min(old, new)` bytes to
    /// a new block; null, with the old block untouched, when neither works.
    ///
    /// # Safety
    /// `block` came from `alloc(layout)` on this store and is live;
    /// `new_size` rounded up to `layout.align()` does not overflow `isize`.
    pub(crate) unsafe fn realloc(
        &mut self,
        block: *mut u8,
        layout: Layout,
        new_size: usize,
    ) -> *mut u8 {
        // SAFETY: forwarded contract.
        if unsafe { self.resize_in_place(block, layout.size(), new_size) } {
            return block;
        }
        // SAFETY: the caller's promise on `new_size`; the alignment is the
        // live layout's.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let moved = self.alloc(new_layout);
        if !moved.is_null() {
            // SAFETY: both blocks are live, apart, and this long; the old
            // one is then given back once, per the contract.
            unsafe {
                ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                self.dealloc(block, layout);
            }
        }
        moved
    }

    /// Whether a live block of `old_size` bytes now holds `new_size`, its
    /// end moved in place: what it gives back, or what it takes from the
    /// hole that starts where it ends, leaves nothing or a whole hole.
    ///
    /// # Safety
    /// `block` came from `alloc` with `old_size` bytes and is live.
    unsafe fn resize_in_place(&mut self, block: *mut u8, old_size: usize, new_size: usize) -> bool {
        let (old, new) = (block_size(old_size), block_size(new_size));
        if new == old {
            return true;
        }
        // SAFETY: the holes' headers lie in our span (as in `alloc`), none
        // overlaps the live block; the bytes from the block's start to the
        // end of the hole adjacent to it (if any) are ours, and `new` of
        // them stay the block's, GRAIN-aligned as `rest` then starts.
        unsafe {
            let mut link = &raw mut self.first;
            while !(*link).is_null() && (*link).addr() < block.addr() {
                link = &raw mut (**link).next;
            }
            let above = *link;
            let (adjacent, beyond) = match !above.is_null() && above.addr() == block.addr() + old {
                true => ((*above).size, (*above).next),
                false => (0, above),
            };
            let Some(rest) = (old + adjacent).checked_sub(new) else {
                return false;
            };
            if rest != 0 && rest < MIN_BLOCK {
                return false;
            }
            *link = if rest == 0 {
                beyond
            } else {
                let tail = block.add(new).cast::<Hole>();
                tail.write(Hole {
                    size: rest,
                    next: beyond,
                });
                tail
            };
            // The holes held `adjacent`, now `rest`: `old - new` more.
            self.free = self.free + old - new;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::vec::Vec;

    /// xorshift64*, as the integration tests use.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
        }
    }

    /// A span served best fit, and the smallest served first fit.
    const SMALL: usize = 16 * 1024;
    const LARGE: usize = FIRST_FIT_SPAN;

    /// `len` bytes for a store, 8-aligned.
    fn span(len: usize) -> Vec<u64> {
        std::vec![0; len / 8]
    }

    /// The holes, as (address, size) from the lowest.
    fn holes(store: &Store) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut hole = store.first;
        while !hole.is_null() {
            // SAFETY: the list's headers lie in the test's span.
            unsafe {
                out.push((hole.addr(), (*hole).size));
                hole = (*hole).next;
            }
        }
        out
    }

    fn stamp(addr: usize) -> u8 {
        (addr >> 3) as u8 ^ 0x5a
    }

    /// Random allocations, frees and resizes (in place or moved) against a
    /// map of live blocks: blocks are
    /// aligned, inside the span, apart from each other and from every
    /// hole, keep their contents; the free bytes are exact; the holes are
    /// sorted, apart and never adjacent (merged); and freeing everything
    /// leaves the one hole of the whole span.
    #[test]
    fn random_traffic_matches_the_model() {
        traffic(SMALL);
        traffic(LARGE);
    }

    fn traffic(len: usize) {
        let mut span = span(len);
        let start = span.as_mut_ptr().cast::<u8>();
        let mut store = Store::empty();
        // SAFETY: the span is the store's alone for this test.
        unsafe { store.init(start, len) };
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        // address -> (block, layout); the stamp follows from the address.
        let mut live: BTreeMap<usize, (*mut u8, Layout)> = BTreeMap::new();
        let (mut served, mut refused, mut in_place) = (0, 0, 0);
        for step in 0..40_000 {
            let size = match rng.below(4) {
                0 => rng.below(24),
                1 => rng.below(300),
                2 => rng.below(2000),
                _ => rng.below(len / 16),
            };
            let shifts = if rng.below(10) == 0 { 11 } else { 4 };
            let align = 1 << rng.below(shifts);
            let layout = Layout::from_size_align(size, align).unwrap();
            // Phases of mostly filling and mostly draining, so that the
            // store is worked both below and at its fill.
            let frees = if (step / 2000) % 2 == 0 { 3 } else { 7 };
            if rng.below(10) < frees && !live.is_empty() {
                let nth = rng.below(live.len());
                let addr = *live.keys().nth(nth).unwrap();
                let (p, old) = live.remove(&addr).unwrap();
                // SAFETY: a live block of `old.size()` stamped bytes.
                let bytes = unsafe { core::slice::from_raw_parts(p, old.size()) };
                assert!(bytes.iter().all(|&b| b == stamp(addr)), "step {step}");
                if rng.below(2) == 0 {
                    // A resize: the block, moved or not, keeps its bytes.
                    let new = Layout::from_size_align(size, old.align()).unwrap();
                    // SAFETY: `p` is live from `alloc(old)`.
                    let q = unsafe { store.realloc(p, old, size) };
                    if !q.is_null() {
                        in_place += usize::from(q == p);
                        let keep = old.size().min(size);
                        // SAFETY: `q` has `size` bytes.
                        let moved = unsafe { core::slice::from_raw_parts(q, keep) };
                        assert!(moved.iter().all(|&b| b == stamp(addr)));
                        // SAFETY: as above.
                        unsafe { q.write_bytes(stamp(q.addr()), size) };
                        live.insert(q.addr(), (q, new));
                    } else {
                        live.insert(addr, (p, old));
                    }
                } else {
                    // SAFETY: as above.
                    unsafe { store.dealloc(p, old) };
                }
            } else {
                let p = store.alloc(layout);
                if !p.is_null() {
                    assert_eq!(p.addr() % layout.align(), 0);
                    // SAFETY: a fresh block of `size` bytes.
                    unsafe { p.write_bytes(stamp(p.addr()), size) };
                    live.insert(p.addr(), (p, layout));
                    served += 1;
                } else {
                    refused += 1;
                }
            }
            check(&store, start.addr(), len, &live);
        }
        assert!(
            served > 5_000 && refused > 1_000 && in_place > 1_000,
            "{served} {refused} {in_place}"
        );
        for (_, (p, layout)) in std::mem::take(&mut live) {
            // SAFETY: each live block freed once.
            unsafe { store.dealloc(p, layout) };
        }
        assert_eq!(holes(&store), [(start.addr(), len)]);
        assert_eq!(store.free, len);
    }

    fn check(store: &Store, start: usize, len: usize, live: &BTreeMap<usize, (*mut u8, Layout)>) {
        let mut spans: Vec<(usize, usize, bool)> = live
            .iter()
            .map(|(&a, &(_, l))| (a, block_size(l.size()), false))
            .collect();
        let holes = holes(store);
        for w in holes.windows(2) {
            assert!(w[0].0 + w[0].1 < w[1].0, "holes touch or overlap: {w:?}");
        }
        spans.extend(holes.iter().map(|&(a, s)| (a, s, true)));
        spans.sort();
        let mut at = start;
        for (a, s, _) in &spans {
            assert!(*a >= at, "overlap at {a:#x}");
            assert!(s % GRAIN == 0 && *s >= MIN_BLOCK);
            at = a + s;
        }
        assert!(at <= start + len);
        let free: usize = holes.iter().map(|h| h.1).sum();
        let used: usize = live.values().map(|(_, l)| block_size(l.size())).sum();
        assert_eq!(free, store.free);
        // Every byte is in a block, a hole, or an alignment gap that is
        // itself a hole: the two add up to the span.
        assert_eq!(free + used, len);
    }

    /// Holes of 64 B and then of 32 B: a 32-byte request takes the second
    /// in a small span (best fit), the first in a large one (first fit).
    #[test]
    fn small_spans_take_the_smallest_hole_large_ones_the_lowest() {
        for (len, takes_lowest) in [(SMALL, false), (LARGE, true)] {
            let mut span = span(len);
            let mut store = Store::empty();
            // SAFETY: the span is the store's alone for this test.
            unsafe { store.init(span.as_mut_ptr().cast(), len) };
            let sizes = [64, 16, 32, 16];
            let blocks = sizes.map(|n| (store.alloc(Layout::from_size_align(n, 8).unwrap()), n));
            for (p, n) in [blocks[0], blocks[2]] {
                // SAFETY: live blocks of these layouts, freed once.
                unsafe { store.dealloc(p, Layout::from_size_align(n, 8).unwrap()) };
            }
            let p = store.alloc(Layout::from_size_align(32, 8).unwrap());
            assert_eq!(
                p,
                if takes_lowest {
                    blocks[0].0
                } else {
                    blocks[2].0
                }
            );
        }
    }

    #[test]
    fn an_empty_store_and_impossible_requests_give_null() {
        let mut store = Store::empty();
        assert!(store.alloc(Layout::new::<u64>()).is_null());
        let mut span = span(SMALL);
        // SAFETY: the span is the store's alone for this test.
        unsafe { store.init(span.as_mut_ptr().cast(), SMALL) };
        assert!(store
            .alloc(Layout::from_size_align(SMALL + 1, 8).unwrap())
            .is_null());
        assert!(store
            .alloc(Layout::from_size_align(8, 1 << 40).unwrap())
            .is_null());
        let whole = store.alloc(Layout::from_size_align(SMALL, 8).unwrap());
        assert!(!whole.is_null());
        assert!(store.alloc(Layout::new::<u8>()).is_null());
    }
}
