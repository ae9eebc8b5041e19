//! Arenas: the spans the heap takes from its backing and cuts into pools.
//!
//! The bookkeeping for an arena ([`Arena`]) lives outside the arena, in
//! chunks of an [`ArenaTable`], as CPython keeps its `arena_object`s apart
//! from the memory they describe: so all of an arena's bytes are pools, and a
//! released arena leaves nothing behind in memory it no longer owns. The
//! chunks never move, so pools can point at their `Arena` directly.

use super::backing::Backing;
use super::pool::Pool;
use core::alloc::Layout;
use core::ptr;

/// Bookkeeping for one arena (or, with a null `base`, a free slot).
pub(crate) struct Arena {
    /// What the backing handed out; null while the slot is unused.
    pub(crate) base: *mut u8,
    /// The first pool-aligned address in the arena.
    pub(crate) first_pool: *mut u8,
    /// Pools the arena holds: the configured number, one less when the
    /// backing's memory was not pool-aligned.
    pub(crate) pool_count: u32,
    /// Pools with no block out: empty ones plus those never carved.
    pub(crate) free_count: u32,
    /// Pools carved so far, from `first_pool` on.
    pub(crate) carved: u32,
    /// Empty pools, linked through `Pool::next`.
    pub(crate) free_pools: *mut Pool,
    /// Neighbours in the heap's list of usable arenas (or, for a free slot,
    /// the next free slot).
    pub(crate) next: *mut Arena,
    /// See `next`.
    pub(crate) prev: *mut Arena,
    /// (In what would be padding after `carved`, so a record stays 56
    /// bytes.) When it was retired, on the backing's clock (see `retired.rs`).
    pub(crate) retired_at: u32,
}

impl Arena {
    const UNUSED: Arena = Arena {
        base: ptr::null_mut(),
        first_pool: ptr::null_mut(),
        pool_count: 0,
        free_count: 0,
        carved: 0,
        free_pools: ptr::null_mut(),
        next: ptr::null_mut(),
        prev: ptr::null_mut(),
        retired_at: 0,
    };

    /// Sets up `self` for the `arena_size` bytes at `base`.
    pub(crate) fn open(&mut self, base: *mut u8, arena_size: usize, pool_size: usize) {
        let skip = base.align_offset(pool_size);
        let pool_count = (arena_size.saturating_sub(skip) / pool_size) as u32;
        *self = Arena {
            base,
            first_pool: base.wrapping_add(skip),
            pool_count,
            free_count: pool_count,
            ..Arena::UNUSED
        };
    }

    /// Takes a pool with no block out: an empty one if any, else the next
    /// never-carved one. Either way the caller initialises it.
    ///
    /// # Safety
    /// `free_count > 0`; the empty-pool list links initialised pools of this
    /// arena.
    pub(crate) unsafe fn take_pool(&mut self, pool_size: usize) -> *mut Pool {
        let pool = self.free_pools;
        if !pool.is_null() {
            // SAFETY: per the contract `pool` is an initialised pool.
            self.free_pools = unsafe { (*pool).next };
            return pool;
        }
        debug_assert!(self.carved < self.pool_count);
        let pool = self
            .first_pool
            .wrapping_add(self.carved as usize * pool_size)
            .cast();
        self.carved += 1;
        pool
    }

    /// Forgets the pools of a wholly free arena whose pages went back to
    /// the system (`Backing::purge`): they are carved afresh, headers and
    /// all, as in a new arena.
    pub(crate) fn uncarve(&mut self) {
        debug_assert_eq!(self.free_count, self.pool_count);
        self.carved = 0;
        self.free_pools = ptr::null_mut();
    }

    /// The pools carved so far, in address order.
    pub(crate) fn carved_pools(&self, pool_size: usize) -> impl Iterator<Item = *mut Pool> + '_ {
        (0..self.carved as usize).map(move |i| self.first_pool.wrapping_add(i * pool_size).cast())
    }

    /// Whether `addr` lies in one of this arena's pools.
    #[cfg(feature = "debug")]
    pub(crate) fn contains(&self, addr: usize, pool_size: usize) -> bool {
        let start = self.first_pool as usize;
        !self.base.is_null() && addr >= start && addr < start + self.pool_count as usize * pool_size
    }
}

super::list::impl_links!(Arena);

// Records are what a small region pays per arena: the retirement stamp
// must not grow them.
#[cfg(target_pointer_width = "64")]
static_assertions::const_assert_eq!(core::mem::size_of::<Arena>(), 56);

/// Slots of one table chunk. Small enough that a 64 KiB firmware heap does
/// not notice one chunk, large enough that chunks are rare.
const SLOTS_PER_CHUNK: usize = 16;

struct Chunk {
    next: *mut Chunk,
    slots: [Arena; SLOTS_PER_CHUNK],
}

/// Bytes one chunk of arena records takes from the backing.
pub(crate) const CHUNK_BYTES: usize = core::mem::size_of::<Chunk>();

/// Where `Arena` records live: chunks taken from the backing as needed and
/// kept for the life of the heap (they are small; CPython never shrinks its
/// arena table either).
pub(crate) struct ArenaTable {
    chunks: *mut Chunk,
    unused: *mut Arena,
}

impl ArenaTable {
    pub(crate) const fn new() -> Self {
        ArenaTable {
            chunks: ptr::null_mut(),
            unused: ptr::null_mut(),
        }
    }

    /// A free slot, or null when the backing has no memory for a new chunk.
    pub(crate) fn acquire(&mut self, backing: &impl Backing) -> *mut Arena {
        if self.unused.is_null() {
            let chunk = backing.alloc(Layout::new::<Chunk>()).cast::<Chunk>();
            if chunk.is_null() {
                return ptr::null_mut();
            }
            // SAFETY: the backing handed us a block sized and aligned for a
            // `Chunk`; nothing else refers to it.
            unsafe {
                chunk.write(Chunk {
                    next: self.chunks,
                    slots: [Arena::UNUSED; SLOTS_PER_CHUNK],
                });
                for slot in (*chunk).slots.iter_mut() {
                    slot.next = self.unused;
                    self.unused = slot;
                }
            }
            self.chunks = chunk;
        }
        let slot = self.unused;
        // SAFETY: `slot` is a free slot in one of our chunks.
        self.unused = unsafe { (*slot).next };
        slot
    }

    /// Puts `slot` back on the free-slot list.
    ///
    /// # Safety
    /// `slot` came from `acquire` and is no longer linked anywhere else.
    pub(crate) unsafe fn release(&mut self, slot: *mut Arena) {
        // SAFETY: per the contract the slot is ours to overwrite.
        unsafe {
            *slot = Arena::UNUSED;
            (*slot).next = self.unused;
        }
        self.unused = slot;
    }

    /// Every arena currently open, in no particular order.
    pub(crate) fn open_arenas(&self) -> impl Iterator<Item = &Arena> + '_ {
        let mut chunk = self.chunks;
        core::iter::from_fn(move || {
            if chunk.is_null() {
                return None;
            }
            // SAFETY: chunks are never freed while the table lives, and
            // `&self` keeps the table (and so every slot) from changing.
            let current = unsafe { &*chunk };
            chunk = current.next;
            Some(current.slots.iter())
        })
        .flatten()
        .filter(|arena| !arena.base.is_null())
    }

    /// Gives every chunk back to the backing and empties the table.
    ///
    /// # Safety
    /// No record of the table is used again.
    pub(crate) unsafe fn free_chunks(&mut self, backing: &impl Backing) {
        while !self.chunks.is_null() {
            let chunk = self.chunks;
            // SAFETY: a chunk from `acquire`, taken from the backing with
            // this layout; per the contract nothing refers into it.
            unsafe {
                self.chunks = (*chunk).next;
                backing.dealloc(chunk.cast(), Layout::new::<Chunk>());
            }
        }
        self.unused = ptr::null_mut();
    }

    /// Bytes the table's chunks take from the backing.
    pub(crate) fn bytes(&self) -> usize {
        let mut chunks = 0;
        let mut chunk = self.chunks;
        while !chunk.is_null() {
            chunks += 1;
            // SAFETY: as in `open_arenas`.
            chunk = unsafe { (*chunk).next };
        }
        chunks * CHUNK_BYTES
    }
}
