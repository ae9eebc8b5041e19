//! Pools: one aligned span of `pool_size` bytes serving blocks of one class.
//!
//! A pool starts with its [`Pool`] header; blocks follow from
//! [`first_block_offset`]. Blocks are handed out from a LIFO free list and,
//! when that runs dry, carved one at a time from the untouched tail (the bump
//! offset), so a fresh pool touches memory only as it is used (obmalloc's
//! "never touch memory until it's needed").
//!
//! A pool is in one of three states, as in obmalloc:
//! * *used*: some blocks out, some free; linked in its class's list in the
//!   heap, and then its free list is never empty (the heap's hot path relies
//!   on that);
//! * *full*: no free block; unlinked;
//! * *empty*: no block out; on its arena's list of free pools. Taken again,
//!   it is initialised afresh, even for its old class (see `Heap::new_pool`).

use super::size_class::{class_alignment, class_size};
use super::track;
use core::ptr;
use static_assertions::const_assert;

/// The header at the start of every pool.
#[repr(C)]
pub(crate) struct Pool {
    /// Blocks handed out and not yet freed.
    pub(crate) used: u32,
    /// The size class this pool serves.
    pub(crate) class: u16,
    /// Index of the heap that owns the pool's arena: where a block freed
    /// by another heap's holder is sent. Fixed while any block is out.
    pub(crate) heap: u16,
    /// Head of the free list of blocks freed or carved but not handed out.
    pub(crate) free: *mut FreeBlock,
    /// Next pool in the class list (used pools) or the arena's free-pool list
    /// (empty pools).
    pub(crate) next: *mut Pool,
    /// Previous pool in the class list; unused on the free-pool list.
    pub(crate) prev: *mut Pool,
    /// The record of the arena this pool belongs to. Only an address here:
    /// arenas are the layer above pools, and the heap, above both, turns it
    /// back into an `Arena`.
    pub(crate) arena: *mut (),
    /// Offset of the first block never handed out.
    pub(crate) bump: u32,
    /// Largest offset at which a whole block still fits.
    pub(crate) bump_limit: u32,
}

super::list::impl_links!(Pool);

/// What a free block holds: the link to the next one.
pub(crate) struct FreeBlock {
    pub(crate) next: *mut FreeBlock,
}

impl FreeBlock {
    /// The link of free `block`; a memory tool lets the allocator read it.
    ///
    /// # Safety
    /// `block` is a free block whose link was written, that no other thread
    /// uses meanwhile.
    #[inline(always)]
    pub(crate) unsafe fn next(block: *mut FreeBlock) -> *mut FreeBlock {
        // SAFETY: forwarded contract.
        unsafe { track::read_link(&raw mut (*block).next) }
    }

    /// Links free (or being freed) `block` to `next`; a memory tool lets
    /// the allocator write it.
    ///
    /// # Safety
    /// As for [`FreeBlock::next`], the link needing no prior write.
    #[inline(always)]
    pub(crate) unsafe fn set_next(block: *mut FreeBlock, next: *mut FreeBlock) {
        // SAFETY: forwarded contract.
        unsafe { track::write_link(&raw mut (*block).next, next) }
    }

    /// As [`FreeBlock::next`], for a block in a thread cache.
    ///
    /// # Safety
    /// As for [`FreeBlock::next`].
    #[cfg(thread_cache)]
    #[inline(always)]
    pub(crate) unsafe fn cached_next(block: *mut FreeBlock) -> *mut FreeBlock {
        // SAFETY: forwarded contract.
        unsafe { track::read_cached_link(&raw mut (*block).next) }
    }

    /// As [`FreeBlock::set_next`], for a block in a thread cache.
    ///
    /// # Safety
    /// As for [`FreeBlock::set_next`].
    #[cfg(thread_cache)]
    #[inline(always)]
    pub(crate) unsafe fn set_cached_next(block: *mut FreeBlock, next: *mut FreeBlock) {
        // SAFETY: forwarded contract.
        unsafe { track::write_cached_link(&raw mut (*block).next, next) }
    }
}

/// Blocks handed out together, in the order they were taken, so that
/// their user consumes a pool front to back: taking them LIFO would hand
/// out the second pool's blocks before the first's and strand a partly used
/// pool whenever the user stops midway.
pub(crate) struct Batch {
    pub(crate) first: *mut FreeBlock,
    pub(crate) last: *mut FreeBlock,
}

impl Batch {
    pub(crate) const fn new() -> Self {
        Batch {
            first: ptr::null_mut(),
            last: ptr::null_mut(),
        }
    }

    /// Appends the chain `first..=last`, linked through `FreeBlock::next`
    /// and ending in null.
    ///
    /// # Safety
    /// The chain's blocks are blocks no one else uses, none in the batch.
    unsafe fn append(&mut self, first: *mut FreeBlock, last: *mut FreeBlock) {
        match self.last.is_null() {
            true => self.first = first,
            // SAFETY: per the contract the batch's last block is ours to
            // link.
            false => unsafe { FreeBlock::set_next(self.last, first) },
        }
        self.last = last;
    }
}

/// Bytes the header takes from every pool.
pub(crate) const POOL_HEADER_SIZE: usize = core::mem::size_of::<Pool>();

// Same header size as CPython's pool_header on 64-bit, so our quantization
// figures compare with its `_debugmallocstats`.
#[cfg(target_pointer_width = "64")]
const_assert!(POOL_HEADER_SIZE == 48);

/// Where the first block of `class` starts: right after the header, rounded
/// up to the class's natural alignment so every block in the pool has it.
#[inline]
pub(crate) const fn first_block_offset(class: usize) -> usize {
    let align = class_alignment(class);
    (POOL_HEADER_SIZE + align - 1) & !(align - 1)
}

/// Blocks of `class` one pool of `pool_size` bytes holds.
pub(crate) const fn blocks_per_pool(pool_size: usize, class: usize) -> usize {
    (pool_size - first_block_offset(class)) / class_size(class)
}

/// Bytes at the start of a pool over which its first handed-out block may
/// lie: the L1 cache's sets span 4 KiB (64 sets of 64-byte lines), and a
/// 4 KiB pool is one page that its header has touched already.
const LEAD_SPAN: usize = 4096;

/// Blocks a fresh pool may link ahead of its lead block (see `Pool::init`):
/// each costs one store when the pool is initialised.
const MAX_LEAD: usize = 64;

/// The index of the block a fresh pool at `pool` hands out first: spread
/// by a hash of the pool's address over the blocks that start in its first
/// `LEAD_SPAN` bytes.
fn lead_block(pool: *mut Pool, pool_size: usize, class: usize) -> usize {
    let first = first_block_offset(class);
    // Never more than the pool holds; none but the first where that starts
    // past the span (medium classes aligned to a page or more).
    let span = LEAD_SPAN.min(pool_size).saturating_sub(first) / class_size(class);
    let span = span.clamp(1, MAX_LEAD);
    let hash = ((pool as usize / pool_size) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (hash >> 32) as usize % span
}

/// The pool holding the block at `addr`.
#[inline]
pub(crate) fn pool_of(addr: *mut u8, pool_size: usize) -> *mut Pool {
    addr.map_addr(|a| a & !(pool_size - 1)).cast()
}

impl Pool {
    /// Turns the memory at `pool` into an empty pool of `class` whose free
    /// list holds its lead block, then the blocks before it.
    ///
    /// The lead block is not always the first, as it is in obmalloc: in a
    /// thread that keeps few blocks live, each class's hot block is the
    /// first one its pool handed out, and were that always at the same
    /// offset every class of every thread would share one set of the L1
    /// cache (8 ways here). Two threads formatting strings on this
    /// machine's two cores took as long as one thread doing all their work
    /// (221 ms, mimalloc 115), each realloc missing on its block's link;
    /// spread over the pool's first page they ran as mimalloc does. The blocks
    /// before the lead are linked after it, so everything below `bump` is
    /// still carved and the pool's capacity is unchanged.
    ///
    /// # Safety
    /// `pool` is aligned to `pool_size` and points to `pool_size` writable
    /// bytes owned by `arena` (of heap `heap`) that no live block uses.
    pub(crate) unsafe fn init(
        pool: *mut Pool,
        class: usize,
        heap: usize,
        arena: *mut (),
        pool_size: usize,
    ) {
        let first = first_block_offset(class);
        let size = class_size(class);
        let lead = lead_block(pool, pool_size, class);
        let block = |index: usize| {
            // SAFETY: by the contract the pool's blocks lie inside it; `lead`
            // is below the pool's capacity, and `first` keeps every block
            // aligned for a pointer (class sizes are multiples of 8).
            unsafe { pool.cast::<u8>().add(first + index * size) }.cast::<FreeBlock>()
        };
        // SAFETY: as above, the blocks up to the lead are the pool's, unused;
        // the header fits (pools are at least 1 KiB, `Config::new`). Memory
        // tools see the block area closed before the first link, the header
        // once written (our callers, the heaps, touch it in `track::internal`).
        unsafe {
            track::fresh(block(0).cast(), pool_size - first);
            let mut free = ptr::null_mut();
            for index in (0..lead).rev() {
                FreeBlock::set_next(block(index), free);
                free = block(index);
            }
            FreeBlock::set_next(block(lead), free);
            pool.write(Pool {
                used: 0,
                class: class as u16,
                heap: heap as u16,
                free: block(lead),
                next: ptr::null_mut(),
                prev: ptr::null_mut(),
                arena,
                bump: (first + (lead + 1) * size) as u32,
                bump_limit: (pool_size - size) as u32,
            });
            track::closed_header(pool.cast(), first);
        }
    }

    /// Hands out one block, the head of the free list (the locked path's
    /// single allocation, CPython's `pymalloc_alloc`), keeping a free block
    /// on the list while the pool has room. Returns it, and whether the
    /// pool is now full.
    ///
    /// # Safety
    /// `pool` is an initialised pool whose free list is not empty.
    #[inline]
    pub(crate) unsafe fn take_one(pool: *mut Pool) -> (*mut FreeBlock, bool) {
        // SAFETY: the contract makes `pool` a live header and `free` one of
        // its blocks no one uses; the bump offset, while within the limit,
        // names an untouched block of the pool.
        unsafe {
            let block = (*pool).free;
            let mut next = FreeBlock::next(block);
            if next.is_null() {
                let mut bump = (*pool).bump;
                next = Self::carve_free(pool, &mut bump);
                (*pool).bump = bump;
            }
            (*pool).free = next;
            (*pool).used += 1;
            (block, next.is_null())
        }
    }

    /// The pool's invariant on its class list, kept after its free list ran
    /// out: a fresh block carved at `bump` (advanced past it) as the whole
    /// free list, or null when the pool is full.
    ///
    /// # Safety
    /// `pool` is a live header and `bump` its bump offset (or beyond, for
    /// blocks already carved but not yet recorded).
    #[inline(always)]
    unsafe fn carve_free(pool: *mut Pool, bump: &mut u32) -> *mut FreeBlock {
        // SAFETY: the contract makes `pool` live; while within the limit the
        // bump offset names an untouched block of it, ours to link.
        unsafe {
            if *bump > (*pool).bump_limit {
                return ptr::null_mut();
            }
            let free = pool.cast::<u8>().add(*bump as usize).cast();
            FreeBlock::set_next(free, ptr::null_mut());
            *bump += class_size((*pool).class as usize) as u32;
            free
        }
    }

    /// Hands out up to `n` blocks at once, appended to `batch`: free-list
    /// blocks first, then fresh ones carved from the bump offset. Returns
    /// how many, and whether the pool is now full.
    ///
    /// # Safety
    /// `pool` is an initialised pool whose free list is not empty; the
    /// blocks already in `batch` are not this pool's free blocks.
    pub(crate) unsafe fn take_batch(pool: *mut Pool, n: usize, batch: &mut Batch) -> (usize, bool) {
        let mut taken = 0;
        // SAFETY: the contract makes `pool` a live header; free-list blocks
        // and the untouched tail below `bump_limit` are blocks of this pool
        // no one uses, so each can take the link of the batch it joins.
        unsafe {
            let size = class_size((*pool).class as usize) as u32;
            let mut free = (*pool).free;
            if n > 0 && !free.is_null() {
                // The free list is linked already: the batch takes a prefix
                // of it as it stands, each link read once and only the cut
                // written.
                let first = free;
                let mut last = free;
                free = FreeBlock::next(free);
                taken = 1;
                while taken < n && !free.is_null() {
                    last = free;
                    free = FreeBlock::next(free);
                    taken += 1;
                }
                FreeBlock::set_next(last, ptr::null_mut());
                batch.append(first, last);
            }
            let mut bump = (*pool).bump;
            // The untouched tail is carved in one go: each block is written
            // once, as the link of the one before it.
            if taken < n && bump <= (*pool).bump_limit {
                let first: *mut FreeBlock = pool.cast::<u8>().add(bump as usize).cast();
                let mut last = first;
                bump += size;
                taken += 1;
                while taken < n && bump <= (*pool).bump_limit {
                    let block = pool.cast::<u8>().add(bump as usize).cast();
                    FreeBlock::set_next(last, block);
                    last = block;
                    bump += size;
                    taken += 1;
                }
                FreeBlock::set_next(last, ptr::null_mut());
                batch.append(first, last);
            }
            if free.is_null() {
                // Keep a free block while there is room: a pool on its
                // class list always has one (see the module documentation).
                free = Self::carve_free(pool, &mut bump);
            }
            (*pool).bump = bump;
            (*pool).free = free;
            (*pool).used += taken as u32;
            (taken, free.is_null())
        }
    }

    /// Takes back `block`. Returns whether the pool was full before and
    /// whether it is empty now.
    ///
    /// # Safety
    /// `block` was handed out by `take_batch` on this pool and not given
    /// back since.
    #[inline]
    pub(crate) unsafe fn give(pool: *mut Pool, block: *mut u8) -> (bool, bool) {
        let block = block.cast::<FreeBlock>();
        // SAFETY: the contract makes `block` a block of this live pool that
        // nothing else uses any more, so it can hold the free-list link.
        unsafe {
            let was_full = (*pool).free.is_null();
            FreeBlock::set_next(block, (*pool).free);
            (*pool).free = block;
            (*pool).used -= 1;
            (was_full, (*pool).used == 0)
        }
    }

    /// Whether `block`, a block boundary of this pool, is free: on the free
    /// list or never carved. Walks the free list: debug use only.
    ///
    /// # Safety
    /// `pool` is an initialised pool.
    #[cfg(feature = "debug")]
    pub(crate) unsafe fn is_free(pool: *const Pool, block: *mut u8) -> bool {
        // SAFETY: per the contract; the free list only links blocks of this
        // pool.
        unsafe {
            if block as usize >= pool as usize + (*pool).bump as usize {
                return true;
            }
            let mut cursor = (*pool).free;
            while !cursor.is_null() {
                if cursor.cast() == block {
                    return true;
                }
                cursor = FreeBlock::next(cursor);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::size_class::CLASS_COUNT;
    use std::alloc::{alloc, dealloc, Layout};
    use std::vec::Vec;

    /// One block and whether the pool is now full.
    ///
    /// # Safety
    /// As for `Pool::take_batch`.
    unsafe fn take(pool: *mut Pool) -> (*mut u8, bool) {
        let mut batch = Batch::new();
        // SAFETY: forwarded contract; the batch is empty.
        let (_, full) = unsafe { Pool::take_batch(pool, 1, &mut batch) };
        (batch.first.cast(), full)
    }

    fn with_pool(pool_size: usize, class: usize, f: impl FnOnce(*mut Pool)) {
        let layout = Layout::from_size_align(pool_size, pool_size).unwrap();
        // SAFETY: the layout has a non-zero size.
        let mem = unsafe { alloc(layout) };
        assert!(!mem.is_null());
        // SAFETY: `mem` is a fresh, aligned span of `pool_size` bytes.
        unsafe { Pool::init(mem.cast(), class, 0, ptr::null_mut(), pool_size) };
        f(mem.cast());
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(mem, layout) };
    }

    #[test]
    fn a_pool_hands_out_every_block_once_aligned_and_in_bounds() {
        for class in 0..CLASS_COUNT {
            with_pool(4096, class, |pool| {
                let capacity = blocks_per_pool(4096, class);
                let mut blocks = Vec::new();
                for i in 0..capacity {
                    // SAFETY: the pool is not full until the last take.
                    let (block, full) = unsafe { take(pool) };
                    assert_eq!(full, i + 1 == capacity);
                    assert_eq!(block as usize % class_alignment(class), 0);
                    assert!(block as usize >= pool as usize + POOL_HEADER_SIZE);
                    assert!(block as usize + class_size(class) <= pool as usize + 4096);
                    blocks.push(block as usize);
                }
                blocks.sort();
                blocks.dedup();
                assert_eq!(blocks.len(), capacity);
                // SAFETY: `pool` is initialised.
                let bump = unsafe { (*pool).bump } as usize;
                assert_eq!(
                    bump,
                    first_block_offset(class) + capacity * class_size(class)
                );
            });
        }
    }

    #[test]
    fn the_lead_block_is_spread_over_the_first_page_within_the_pool() {
        use crate::allocator::config::MEDIUM_RUN_SIZE;
        use crate::allocator::size_class::ALL_CLASS_COUNT;
        for (pool_size, classes) in [
            (1024, 0..CLASS_COUNT),
            (4096, 0..CLASS_COUNT),
            (MEDIUM_RUN_SIZE, CLASS_COUNT..ALL_CLASS_COUNT),
        ] {
            for class in classes {
                let capacity = blocks_per_pool(pool_size, class);
                let mut leads = Vec::new();
                for index in 0..4096 {
                    let pool = ptr::without_provenance_mut(index * pool_size);
                    let lead = lead_block(pool, pool_size, class);
                    assert!(lead < capacity.min(MAX_LEAD), "class {class}");
                    let end = first_block_offset(class) + (lead + 1) * class_size(class);
                    assert!(lead == 0 || end <= LEAD_SPAN.min(pool_size));
                    leads.push(lead);
                }
                leads.sort();
                leads.dedup();
                // Every lead that fits in the span is somebody's.
                let span = LEAD_SPAN
                    .min(pool_size)
                    .saturating_sub(first_block_offset(class))
                    / class_size(class);
                assert_eq!(leads.len(), span.clamp(1, MAX_LEAD), "class {class}");
            }
        }
    }

    #[test]
    fn a_fresh_pool_hands_out_its_lead_then_the_blocks_before_it() {
        // Sixteen neighbouring pools, whose leads differ.
        with_pool(16 * 4096, 0, |span| {
            for class in [0, 2, 9, CLASS_COUNT - 1] {
                let size = class_size(class);
                let mut leads = Vec::new();
                for index in 0..16 {
                    let pool: *mut Pool = span.cast::<u8>().wrapping_add(index * 4096).cast();
                    // SAFETY: a pool-aligned page of the span, no block of
                    // which is live.
                    unsafe { Pool::init(pool, class, 0, ptr::null_mut(), 4096) };
                    let lead = lead_block(pool, 4096, class);
                    leads.push(lead);
                    let first = pool as usize + first_block_offset(class);
                    // SAFETY: the lead is one of the fresh pool's blocks.
                    let taken: Vec<usize> = (0..=lead)
                        .map(|_| unsafe { take(pool) }.0 as usize)
                        .collect();
                    let mut expected = Vec::from([first + lead * size]);
                    expected.extend((0..lead).map(|i| first + i * size));
                    assert_eq!(taken, expected, "class {class}");
                }
                leads.sort();
                leads.dedup();
                assert!(leads.len() > 4, "class {class}: leads {leads:?}");
            }
        });
    }

    #[test]
    fn freed_blocks_come_back_last_in_first_out() {
        with_pool(4096, 3, |pool| {
            // SAFETY: a fresh pool has free blocks; blocks are given back once.
            unsafe {
                let (a, _) = take(pool);
                let (b, _) = take(pool);
                let (c, _) = take(pool);
                assert_eq!(Pool::give(pool, b), (false, false));
                assert_eq!(Pool::give(pool, a), (false, false));
                assert_eq!(take(pool).0, a);
                assert_eq!(take(pool).0, b);
                assert_eq!((*pool).used, 3);
                Pool::give(pool, a);
                Pool::give(pool, b);
                assert_eq!(Pool::give(pool, c), (false, true));
            }
        });
    }

    #[test]
    fn a_batch_takes_free_blocks_then_fresh_ones_and_keeps_one_free() {
        for class in [0, 5, CLASS_COUNT - 1] {
            with_pool(4096, class, |pool| {
                let capacity = blocks_per_pool(4096, class);
                // SAFETY: blocks are taken from a live pool and given back
                // once; the batch list is ours.
                unsafe {
                    let (a, _) = take(pool);
                    let (b, _) = take(pool);
                    Pool::give(pool, a);
                    Pool::give(pool, b);
                    let mut batch = Batch::new();
                    let (taken, full) = Pool::take_batch(pool, 3, &mut batch);
                    assert_eq!((taken, full), (3, capacity == 3));
                    let (rest, full) = Pool::take_batch(pool, capacity, &mut batch);
                    assert_eq!((3 + rest, full), (capacity, true));
                    assert_eq!((*pool).used as usize, capacity);
                    let mut all = Vec::new();
                    let mut list = batch.first;
                    while !list.is_null() {
                        all.push(list as usize);
                        list = (*list).next;
                    }
                    assert_eq!(&all[..2], [b as usize, a as usize], "free list first");
                    assert!(all[2..].is_sorted(), "then fresh blocks in order");
                    assert_eq!(*all.last().unwrap(), batch.last as usize);
                    all.sort();
                    all.dedup();
                    assert_eq!(all.len(), capacity, "every block once");
                }
            });
        }
    }

    #[test]
    fn a_batch_shorter_than_the_free_list_cuts_it_and_leaves_the_rest() {
        with_pool(4096, 3, |pool| {
            // SAFETY: blocks are taken from a live pool and given back
            // once; the batch list is ours.
            unsafe {
                let blocks: Vec<_> = (0..4).map(|_| take(pool).0).collect();
                let used = (*pool).used;
                for &block in &blocks {
                    Pool::give(pool, block);
                }
                let mut batch = Batch::new();
                assert_eq!(Pool::take_batch(pool, 2, &mut batch), (2, false));
                // The two freed last, newest first, and the chain ends there.
                let first = batch.first;
                assert_eq!(first as usize, blocks[3] as usize);
                assert_eq!(batch.last as usize, blocks[2] as usize);
                assert_eq!((*first).next, batch.last);
                assert!((*batch.last).next.is_null());
                // The rest of the free list is the pool's still.
                assert_eq!((*pool).free as usize, blocks[1] as usize);
                assert_eq!((*(*pool).free).next as usize, blocks[0] as usize);
                assert_eq!((*pool).used, used - 2);
            }
        });
    }

    #[test]
    fn a_full_pool_reports_full_then_not_full_after_a_free() {
        let class = CLASS_COUNT - 1;
        with_pool(4096, class, |pool| {
            assert_eq!(blocks_per_pool(4096, class), 7);
            // SAFETY: seven takes from a seven-block pool, then one give.
            unsafe {
                let mut last = ptr::null_mut();
                for _ in 0..7 {
                    last = take(pool).0;
                }
                assert!((*pool).free.is_null());
                assert_eq!(Pool::give(pool, last), (true, false));
            }
        });
    }

    #[test]
    fn the_pool_of_any_block_is_found_by_masking() {
        with_pool(1024, 0, |pool| {
            // SAFETY: a fresh pool has free blocks.
            let (block, _) = unsafe { take(pool) };
            assert_eq!(pool_of(block, 1024), pool);
        });
    }
}
