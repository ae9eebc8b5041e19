//! The heap: size-class lists of used pools, and arenas kept in the order
//! that lets memory drain back to the backing.
//!
//! Usable arenas (those with at least one pool free) form a list sorted by
//! ascending free-pool count, so new pools come from the fullest arena and
//! the emptiest ones get the chance to become wholly free. Keeping the list
//! sorted costs O(1) per pool freed thanks to `last_with_free[n]`, the last
//! arena in the list with `n` free pools (CPython's `nfp2lasta`, added after
//! mass frees went quadratic, bpo-37029).
//!
//! A wholly free arena goes back to the backing at once, unless it is the
//! only usable arena: then it stays as the single spare, so that a program
//! allocating and freeing one block across an arena boundary does not map
//! and unmap an arena every time (bpo-37257). This is stricter than CPython's
//! rule (keep it if it is last in the list), which can keep a spare even when
//! another arena has room.

use crate::arena::{Arena, ArenaTable};
use crate::backing::Backing;
use crate::config::{Config, MAX_ARENA_POOLS};
use crate::pool::{blocks_per_pool, pool_of, Pool, POOL_HEADER_SIZE};
use crate::size_class::{class_size, CLASS_COUNT};
use crate::stats::Stats;
use core::ptr;

/// One heap: everything behind one lock.
pub(crate) struct Heap {
    config: Config,
    /// Per class, the used pools (free blocks and blocks out), the one to
    /// allocate from first.
    used_pools: [*mut Pool; CLASS_COUNT],
    /// Usable arenas, fewest free pools first.
    usable: *mut Arena,
    /// `last_with_free[n]`: the last usable arena with `n` free pools.
    last_with_free: [*mut Arena; MAX_ARENA_POOLS + 1],
    table: ArenaTable,
    arenas_allocated_total: usize,
    arenas_reclaimed: usize,
    arenas_highwater: usize,
    arenas_current: usize,
    /// Bytes requested by live small blocks.
    pub(crate) requested: usize,
    /// Live large blocks, for the debug feature's ownership checks.
    #[cfg(feature = "debug")]
    pub(crate) large_blocks: crate::debug::LargeList,
}

// SAFETY: the raw pointers all lead into memory the heap owns (arenas and
// table chunks from its backing); nothing about them is tied to a thread.
unsafe impl Send for Heap {}

/// Where a block handed to the debug checks stands.
#[cfg(feature = "debug")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockStatus {
    /// Handed out and not freed: fine to free.
    Live,
    /// Already on its pool's free list, or never handed out.
    Free,
    /// Not inside any pool of this heap.
    Foreign,
    /// Inside a pool of this heap, but not on a block boundary of the class
    /// the pool serves, or the pool serves another class.
    NotABlock,
}

impl Heap {
    pub(crate) const fn new(config: Config) -> Self {
        Heap {
            config,
            used_pools: [ptr::null_mut(); CLASS_COUNT],
            usable: ptr::null_mut(),
            last_with_free: [ptr::null_mut(); MAX_ARENA_POOLS + 1],
            table: ArenaTable::new(),
            arenas_allocated_total: 0,
            arenas_reclaimed: 0,
            arenas_highwater: 0,
            arenas_current: 0,
            requested: 0,
            #[cfg(feature = "debug")]
            large_blocks: crate::debug::LargeList::new(),
        }
    }

    pub(crate) fn config(&self) -> Config {
        self.config
    }

    /// A block of `class`, or null when the backing has no arena to give.
    #[inline]
    pub(crate) fn alloc(&mut self, class: usize, backing: &impl Backing) -> *mut u8 {
        let mut pool = self.used_pools[class];
        if pool.is_null() {
            pool = self.new_pool(class, backing);
            if pool.is_null() {
                return ptr::null_mut();
            }
        }
        // SAFETY: pools on a class list are initialised and have a free
        // block (the invariant `Pool::take` keeps).
        let (block, full) = unsafe { Pool::take(pool) };
        if full {
            self.unlink_pool(class, pool);
        }
        block
    }

    /// Puts a pool with a free block at the head of `class`'s list, taken
    /// from the fullest usable arena; null when no arena can be had.
    #[cold]
    fn new_pool(&mut self, class: usize, backing: &impl Backing) -> *mut Pool {
        if self.usable.is_null() && !self.open_arena(backing) {
            return ptr::null_mut();
        }
        let arena = self.usable;
        let pool_size = self.config.pool_size();
        // SAFETY: usable arenas have a free pool, and their empty-pool lists
        // hold initialised pools of theirs.
        let (pool, reused) = unsafe { (*arena).take_pool(pool_size) };
        self.arena_lost_pool(arena);
        // SAFETY: `pool` is a pool-aligned span of the arena with no block
        // out; an empty pool of the same class keeps its free list (never
        // empty: blocks were given back to it).
        unsafe {
            if !reused || (*pool).class as usize != class {
                Pool::init(pool, class, arena, pool_size);
            }
        }
        self.link_pool(class, pool);
        pool
    }

    /// Takes back a block handed out by `alloc`.
    ///
    /// # Safety
    /// `block` came from `self.alloc` and has not been freed since.
    #[inline]
    pub(crate) unsafe fn free(&mut self, block: *mut u8, backing: &impl Backing) {
        let pool = pool_of(block, self.config.pool_size());
        // SAFETY: `block` lies in an initialised pool of ours (contract).
        let (was_full, now_empty) = unsafe { Pool::give(pool, block) };
        // SAFETY: as above.
        let class = unsafe { (*pool).class } as usize;
        if !now_empty {
            if was_full {
                self.link_pool(class, pool);
            }
            return;
        }
        if !was_full {
            self.unlink_pool(class, pool);
        }
        self.pool_emptied(pool, backing);
    }

    fn link_pool(&mut self, class: usize, pool: *mut Pool) {
        let head = self.used_pools[class];
        // SAFETY: `pool` and `head` (when not null) are initialised pools.
        unsafe {
            (*pool).prev = ptr::null_mut();
            (*pool).next = head;
            if !head.is_null() {
                (*head).prev = pool;
            }
        }
        self.used_pools[class] = pool;
    }

    fn unlink_pool(&mut self, class: usize, pool: *mut Pool) {
        // SAFETY: `pool` is on class list `class`, whose members are
        // initialised pools.
        unsafe {
            let (prev, next) = ((*pool).prev, (*pool).next);
            if prev.is_null() {
                self.used_pools[class] = next;
            } else {
                (*prev).next = next;
            }
            if !next.is_null() {
                (*next).prev = prev;
            }
        }
    }

    fn pool_emptied(&mut self, pool: *mut Pool, backing: &impl Backing) {
        // SAFETY: `pool` is an initialised pool with no block out, linked
        // nowhere; its arena record is live while it has pools.
        let arena = unsafe {
            let arena = (*pool).arena;
            (*pool).next = (*arena).free_pools;
            (*arena).free_pools = pool;
            arena
        };
        self.arena_gained_pool(arena, backing);
    }

    /// Takes a new arena from the backing and makes it the only usable one.
    fn open_arena(&mut self, backing: &impl Backing) -> bool {
        let (arena_size, pool_size) = (self.config.arena_size(), self.config.pool_size());
        let slot = self.table.acquire(backing);
        if slot.is_null() {
            return false;
        }
        let base = backing.alloc_arena(arena_size, pool_size);
        // SAFETY: `slot` is a free record from our table.
        let arena = unsafe { &mut *slot };
        if !base.is_null() {
            arena.open(base, arena_size, pool_size);
            if arena.pool_count == 0 {
                // An unaligned one-pool arena holds no pool at all.
                // SAFETY: we just got `base` from `alloc_arena` with these
                // arguments and handed nothing out of it.
                unsafe { backing.dealloc_arena(base, arena_size, pool_size) };
            }
        }
        if base.is_null() || arena.pool_count == 0 {
            // SAFETY: the record is linked nowhere.
            unsafe { self.table.release(slot) };
            return false;
        }
        self.usable = slot;
        self.last_with_free[arena.pool_count as usize] = slot;
        self.arenas_allocated_total += 1;
        self.arenas_current += 1;
        self.arenas_highwater = self.arenas_highwater.max(self.arenas_current);
        true
    }

    /// Bookkeeping after the head of the usable list gave up a pool.
    fn arena_lost_pool(&mut self, arena: *mut Arena) {
        debug_assert_eq!(arena, self.usable);
        // SAFETY: `arena` is the live head of the usable list.
        let arena_ref = unsafe { &mut *arena };
        let free = arena_ref.free_count as usize;
        if self.last_with_free[free] == arena {
            self.last_with_free[free] = ptr::null_mut();
        }
        arena_ref.free_count -= 1;
        let free = free - 1;
        if free == 0 {
            // Full arenas leave the list; a freed pool brings them back.
            self.usable = arena_ref.next;
            if !self.usable.is_null() {
                // SAFETY: list members are live records.
                unsafe { (*self.usable).prev = ptr::null_mut() };
            }
            arena_ref.next = ptr::null_mut();
        } else if self.last_with_free[free].is_null() {
            // It had the fewest free pools, so no other arena has `free`.
            self.last_with_free[free] = arena;
        }
    }

    /// Bookkeeping after one of `arena`'s pools became empty: move it to its
    /// place in the sorted list, or give it back if it is wholly free.
    fn arena_gained_pool(&mut self, arena: *mut Arena, backing: &impl Backing) {
        // SAFETY: `arena` is a live record (it owns the pool just emptied).
        let arena_ref = unsafe { &mut *arena };
        let free_before = arena_ref.free_count as usize;
        let last_of_group = self.last_with_free[free_before];
        if free_before > 0 && last_of_group == arena {
            // The group's new last member, if any, is just before it.
            let prev = arena_ref.prev;
            // SAFETY: list members are live records.
            let prev_in_group =
                !prev.is_null() && unsafe { (*prev).free_count } as usize == free_before;
            self.last_with_free[free_before] = if prev_in_group { prev } else { ptr::null_mut() };
        }
        arena_ref.free_count += 1;
        let free = free_before + 1;
        let wholly_free = free == arena_ref.pool_count as usize;
        if free_before == 0 {
            // It was full, so off the list; one free pool puts it first.
            if wholly_free && !self.usable.is_null() {
                self.release_arena(arena, backing);
                return;
            }
            arena_ref.prev = ptr::null_mut();
            arena_ref.next = self.usable;
            if !self.usable.is_null() {
                // SAFETY: list members are live records.
                unsafe { (*self.usable).prev = arena };
            }
            self.usable = arena;
        } else if wholly_free && !(arena_ref.prev.is_null() && arena_ref.next.is_null()) {
            // Another arena has room, so this one need not stay as a spare.
            self.remove_usable(arena);
            self.release_arena(arena, backing);
            return;
        } else if last_of_group != arena {
            // Arenas after it still have `free_before` free pools: it goes
            // behind the last of them, first of its new group.
            self.remove_usable(arena);
            // SAFETY: `last_of_group` is a live list member.
            unsafe {
                let after = (*last_of_group).next;
                arena_ref.prev = last_of_group;
                arena_ref.next = after;
                (*last_of_group).next = arena;
                if !after.is_null() {
                    (*after).prev = arena;
                }
            }
        }
        if self.last_with_free[free].is_null() {
            self.last_with_free[free] = arena;
        }
    }

    fn remove_usable(&mut self, arena: *mut Arena) {
        // SAFETY: `arena` and its neighbours are live list members.
        unsafe {
            let (prev, next) = ((*arena).prev, (*arena).next);
            if prev.is_null() {
                self.usable = next;
            } else {
                (*prev).next = next;
            }
            if !next.is_null() {
                (*next).prev = prev;
            }
        }
    }

    fn release_arena(&mut self, arena: *mut Arena, backing: &impl Backing) {
        // SAFETY: the arena is wholly free and unlinked: no block, no list
        // refers into it any more, and it came from `alloc_arena` with the
        // configured geometry.
        unsafe {
            backing.dealloc_arena(
                (*arena).base,
                self.config.arena_size(),
                self.config.pool_size(),
            );
            self.table.release(arena);
        }
        self.arenas_current -= 1;
        self.arenas_reclaimed += 1;
    }

    /// Fills the arena and pool parts of `stats`.
    pub(crate) fn gather(&self, stats: &mut Stats) {
        let pool_size = self.config.pool_size();
        stats.arenas_allocated_total = self.arenas_allocated_total;
        stats.arenas_reclaimed = self.arenas_reclaimed;
        stats.arenas_highwater = self.arenas_highwater;
        stats.arenas_current = self.arenas_current;
        stats.bookkeeping_bytes = self.table.bytes();
        stats.requested_bytes += self.requested;
        for arena in self.table.open_arenas() {
            stats.arena_alignment_bytes +=
                self.config.arena_size() - arena.pool_count as usize * pool_size;
            stats.unused_pools += (arena.pool_count - arena.carved) as usize;
            for pool in arena.carved_pools(pool_size) {
                // SAFETY: carved pools are initialised.
                let (used, class) = unsafe { ((*pool).used as usize, (*pool).class as usize) };
                if used == 0 {
                    stats.unused_pools += 1;
                    continue;
                }
                let capacity = blocks_per_pool(pool_size, class);
                let entry = &mut stats.classes[class];
                entry.pools += 1;
                entry.blocks_in_use += used;
                entry.blocks_free += capacity - used;
                stats.pool_header_bytes += POOL_HEADER_SIZE;
                stats.quantization_bytes +=
                    pool_size - POOL_HEADER_SIZE - capacity * class_size(class);
            }
        }
    }

    /// Where `block`, claimed to be of `class`, stands: reads only memory of
    /// arenas the heap holds.
    #[cfg(feature = "debug")]
    pub(crate) fn status(&self, block: *mut u8, class: usize) -> BlockStatus {
        let pool_size = self.config.pool_size();
        let addr = block as usize;
        let Some(arena) = self
            .table
            .open_arenas()
            .find(|a| a.contains(addr, pool_size))
        else {
            return BlockStatus::Foreign;
        };
        let pool = pool_of(block, pool_size);
        let index = (pool as usize - arena.first_pool as usize) / pool_size;
        if index >= arena.carved as usize {
            return BlockStatus::Free;
        }
        // SAFETY: carved pools are initialised.
        let (pool_class, used) = unsafe { ((*pool).class as usize, (*pool).used) };
        let offset = addr - pool as usize;
        let first = crate::pool::first_block_offset(pool_class);
        if pool_class != class || offset < first || (offset - first) % class_size(class) != 0 {
            return if used == 0 {
                BlockStatus::Free
            } else {
                BlockStatus::NotABlock
            };
        }
        // SAFETY: as above; an empty pool's blocks are all free.
        if used == 0 || unsafe { Pool::is_free(pool, block) } {
            BlockStatus::Free
        } else {
            BlockStatus::Live
        }
    }

    /// Checks the usable list's order and index against a full walk.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let mut prev: *mut Arena = ptr::null_mut();
        let mut arena = self.usable;
        let mut last = [ptr::null_mut(); MAX_ARENA_POOLS + 1];
        while !arena.is_null() {
            // SAFETY: list members are live records.
            let a = unsafe { &*arena };
            assert_eq!(a.prev, prev, "usable list back link");
            assert!(a.free_count > 0 && a.free_count <= a.pool_count);
            if !prev.is_null() {
                // SAFETY: as above.
                assert!(
                    unsafe { (*prev).free_count } <= a.free_count,
                    "usable list order"
                );
            }
            last[a.free_count as usize] = arena;
            prev = arena;
            arena = a.next;
        }
        assert_eq!(last, self.last_with_free, "last_with_free index");
        for class in 0..CLASS_COUNT {
            let mut pool = self.used_pools[class];
            while !pool.is_null() {
                // SAFETY: class-list members are initialised pools.
                unsafe {
                    assert_eq!((*pool).class as usize, class);
                    assert!(!(*pool).free.is_null() && (*pool).used > 0);
                    pool = (*pool).next;
                }
            }
        }
    }
}
