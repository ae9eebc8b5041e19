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
//! A wholly free arena leaves the heap at once (back to the backing or,
//! over a backing with a clock, into the heap's retired arenas for the
//! release delay: `retired.rs`), unless it is the only usable arena and no
//! heap of the allocator keeps a spare yet: then it stays as the
//! allocator's one spare, so that a program allocating and
//! freeing one block across an arena boundary does not map and unmap an
//! arena every time (bpo-37257). The spare leaves as soon as another
//! arena of its heap has room again. This is stricter than CPython's rule
//! (keep it if it is last in the list), which can keep an empty arena
//! beside others with room, so one live block could pin two arenas; and
//! counting spares across heaps (`MAX_SPARE_ARENAS`) keeps eight heaps
//! from holding eight empty arenas between them.
//!
//! The medium tier's heaps keep one spare each. Its arenas are 16 MiB,
//! mapped with a trim for alignment: a thread that refills from whichever
//! heap it can lock, while another thread's frees empty them, had its
//! arenas mapped, trimmed and unmapped about once per batch of 256 small
//! blocks sent across (a 4 KiB `Vec` was their only medium block), 1.4×
//! the time with one spare per heap. A spare that has carved more than
//! `SPARE_RESIDENT_LIMIT` bytes hands its pages back and stays mapped,
//! so spares pin little memory after a spike.

use super::arena::{Arena, ArenaTable};
use super::backing::Backing;
use super::config::{Config, MAX_ARENA_POOLS};
use super::list;
use super::pool::{blocks_per_pool, pool_of, Batch, Pool, POOL_HEADER_SIZE};
use super::retired::Retired;
use super::shelf::Shelf;
use super::size_class::{class_alignment, class_size, ALL_CLASS_COUNT, CLASS_COUNT};
use super::stats::Stats;
use super::sync::{AtomicUsize, Ordering};
use core::ptr;

/// Most wholly free arenas one allocator keeps, over all its heaps: one
/// spares the boundary loop its map and unmap; more would only hold
/// memory back from the backing (and, in a region, from large objects).
pub(crate) const MAX_SPARE_ARENAS: usize = 1;

/// Bytes a spare arena may keep in blocks carved before its pages go back
/// to the system (where the backing can, `Backing::purge`), the arena
/// itself staying. Small arenas (256 KiB) never reach it, so a loop at
/// their boundary pays no system call; a medium arena (16 MiB) kept as
/// a spare by each heap could otherwise pin its runs' pages in every heap
/// after a spike.
const SPARE_RESIDENT_LIMIT: usize = 1 << 20;

/// What the heaps of one kind (small or medium) of a heap set count
/// between them, in the set, which outlives them.
pub(crate) struct ArenaCounts {
    /// Wholly free arenas kept as spares.
    pub(crate) spares: AtomicUsize,
    /// Retired arenas (`retired.rs`): while there are none, the set's
    /// sweep reads no clock.
    pub(crate) retired: AtomicUsize,
}

impl ArenaCounts {
    super::sync::loom_const_fn! {
        pub(crate) fn new() -> Self {
            ArenaCounts {
                spares: AtomicUsize::new(0),
                retired: AtomicUsize::new(0),
            }
        }
    }
}

/// One heap: everything behind one lock.
pub(crate) struct Heap {
    config: Config,
    /// This heap's place among its allocator's heaps, stamped on its pools.
    index: usize,
    /// Whether this heap serves the medium tier: its pools are the tier's
    /// runs, and its arenas count apart in the statistics.
    medium: bool,
    /// Per class, the used pools (free blocks and blocks out), the one to
    /// allocate from first. A heap serves either the small classes or the
    /// medium ones; one array for both keeps one code path.
    used_pools: [*mut Pool; ALL_CLASS_COUNT],
    /// Usable arenas, fewest free pools first.
    usable: *mut Arena,
    /// `last_with_free[n]`: the last usable arena with `n` free pools.
    last_with_free: [*mut Arena; MAX_ARENA_POOLS + 1],
    table: ArenaTable,
    arenas_allocated_total: usize,
    arenas_reclaimed: usize,
    /// Arenas that came wholly free and went back or were retired: the
    /// heap is draining.
    arenas_let_go: usize,
    arenas_highwater: usize,
    arenas_current: usize,
    /// Its kind's counts, kept by its heap set, which outlives the heap.
    counts: *const ArenaCounts,
    /// Whether this heap's only usable arena is wholly free and counted in
    /// `counts.spares`.
    spare: bool,
    /// Wholly free arenas waiting out the release delay.
    retired: Retired,
    /// Bytes requested by small blocks allocated through this heap, minus
    /// those freed into it, without a thread cache (wrapping: blocks move
    /// between heaps and caches, so only the sum over all counts means
    /// anything).
    pub(crate) requested: usize,
    /// Whether frees through `free_of_class` go to the shelf first (a
    /// small heap of an allocator no thread cache serves).
    shelved: bool,
    /// Blocks freed and not yet back in their pools (see `shelf.rs`).
    shelf: Shelf,
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
    /// A heap of `config`, the `index`th of its allocator, whose spare and
    /// retired arenas are counted in `*counts` (which must outlive it).
    pub(crate) const fn new(config: Config, index: usize, counts: *const ArenaCounts) -> Self {
        Heap {
            config,
            index,
            medium: false,
            used_pools: [ptr::null_mut(); ALL_CLASS_COUNT],
            usable: ptr::null_mut(),
            last_with_free: [ptr::null_mut(); MAX_ARENA_POOLS + 1],
            table: ArenaTable::new(),
            arenas_allocated_total: 0,
            arenas_reclaimed: 0,
            arenas_let_go: 0,
            arenas_highwater: 0,
            arenas_current: 0,
            counts,
            spare: false,
            retired: Retired::new(),
            requested: 0,
            shelved: false,
            shelf: Shelf::new(config.pool_size()),
        }
    }

    /// This heap with a shelf in front of its pools (see `shelf.rs`).
    pub(crate) const fn with_shelf(self) -> Self {
        Heap {
            shelved: true,
            ..self
        }
    }

    /// This heap as one of the medium tier (see the field).
    pub(crate) const fn serving_medium(self) -> Self {
        Heap {
            medium: true,
            ..self
        }
    }

    #[cfg(test)]
    pub(crate) fn config(&self) -> Config {
        self.config
    }

    /// The newest block on `class`'s shelf if the heap has shelves and
    /// that one has any, else null: the locked allocation's fast path,
    /// which calls nothing.
    #[inline(always)]
    pub(crate) fn take_shelved(&mut self, class: usize) -> *mut u8 {
        if !self.shelved {
            return ptr::null_mut();
        }
        // SAFETY: the shelf holds free blocks of ours, of `class`'s size at
        // least, that only it links.
        unsafe { self.shelf.take(class) }.cast()
    }

    /// A block of `class`, or null when the backing has no arena to give.
    #[inline]
    pub(crate) fn alloc(&mut self, class: usize, backing: &impl Backing) -> *mut u8 {
        let block = self.take_shelved(class);
        if !block.is_null() {
            return block;
        }
        let pool = self.used_pools[class];
        if !pool.is_null() {
            // SAFETY: a pool on a class list is initialised and has a free
            // block.
            let (block, full) = unsafe { Pool::take_one(pool) };
            if full {
                self.unlink_pool(class, pool);
            }
            return block.cast();
        }
        let mut batch = Batch::new();
        self.alloc_batch(class, 1, &mut batch, backing);
        batch.first.cast()
    }

    /// Up to `n` blocks of `class` appended to `batch` (a thread cache's
    /// refill); fewer only when the backing has no arena to give. Returns
    /// how many.
    pub(crate) fn alloc_batch(
        &mut self,
        class: usize,
        n: usize,
        batch: &mut Batch,
        backing: &impl Backing,
    ) -> usize {
        let mut got = 0;
        while got < n {
            let mut pool = self.used_pools[class];
            let mut from = class;
            if pool.is_null() {
                pool = self.new_pool(class, backing);
            }
            if pool.is_null() && got == 0 && self.clear_shelf(backing) {
                // Other classes' shelved blocks back in their pools may
                // have emptied some for this class.
                pool = self.new_pool(class, backing);
            }
            if pool.is_null() && got == 0 {
                // Out of pools: one block of a larger class rather than null.
                (from, pool) = self.lender(class);
            }
            if pool.is_null() {
                break;
            }
            let want = if from == class { n - got } else { 1 };
            // SAFETY: pools on a class list are initialised and have a free
            // block; the blocks in `batch` are out of every pool.
            let (taken, full) = unsafe { Pool::take_batch(pool, want, batch) };
            got += taken;
            if full {
                self.unlink_pool(from, pool);
            }
            if from != class {
                break;
            }
        }
        got
    }

    /// The smallest larger class with a used pool whose blocks have at
    /// least `class`'s alignment, and that pool: a block of it serves a
    /// request of `class` when no new pool can be had, so that the free
    /// blocks stranded in other classes' partly used pools are not lost to
    /// a small region. Freeing needs nothing special: a block goes back to
    /// the pool its address names, whatever class its layout gives. (Not
    /// under the debug feature, whose ownership check insists on the
    /// layout's class.)
    #[cold]
    fn lender(&self, class: usize) -> (usize, *mut Pool) {
        if cfg!(feature = "debug") {
            return (class, ptr::null_mut());
        }
        let align = class_alignment(class);
        (class + 1..CLASS_COUNT)
            .find(|&c| !self.used_pools[c].is_null() && class_alignment(c) >= align)
            .map_or((class, ptr::null_mut()), |c| (c, self.used_pools[c]))
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
        let pool = unsafe { (*arena).take_pool(pool_size) };
        self.arena_lost_pool(arena);
        if self.retired.len() > 0 {
            if let Some(now) = backing.clock_ms() {
                // Those that waited out an idle spell go; the rest are
                // what the heap is growing into.
                self.release_expired_at(now, backing);
                self.retired.pool_taken(now);
            }
        }
        // An empty pool is carved afresh even for its old class (obmalloc
        // keeps its free list): that list is in the order the blocks were
        // freed, scattered over the pool, and handing it out walks it one
        // cache miss a block, where carving reads nothing and writes in
        // address order. In serde_json's round trip, rebuilding a dropped
        // document spent 9 % of its time in that walk.
        // SAFETY: `pool` is a pool-aligned span of the arena with no block
        // out.
        unsafe { Pool::init(pool, class, self.index, arena.cast(), pool_size) };
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

    /// Takes back a block handed out by `alloc` for `class`: onto the
    /// shelf if the heap has one (half of the class's shelf going back to
    /// the pools first if it is full), else into its pool.
    ///
    /// # Safety
    /// As for `free`; `class` is the class `block` was allocated for.
    #[inline]
    pub(crate) unsafe fn free_of_class(
        &mut self,
        block: *mut u8,
        class: usize,
        backing: &impl Backing,
    ) {
        if !self.shelved {
            // SAFETY: forwarded contract.
            return unsafe { self.free(block, backing) };
        }
        if self.shelf.is_full(class) {
            self.unshelve(class, self.shelf.len(class) / 2, backing);
        }
        // SAFETY: forwarded contract; the shelf has room now.
        let shelved = unsafe { self.shelve(block, class) };
        debug_assert!(shelved);
    }

    /// Puts `block` of `class` on its shelf if the heap has shelves and
    /// that one has room: the locked free's fast path, which calls
    /// nothing. False, with nothing done, otherwise.
    ///
    /// # Safety
    /// As for `free_of_class`.
    #[inline(always)]
    pub(crate) unsafe fn shelve(&mut self, block: *mut u8, class: usize) -> bool {
        // The class's bound spares the shelf's index its check, whose panic
        // path would cost the locked free a frame.
        if !self.shelved || class >= CLASS_COUNT || self.shelf.is_full(class) {
            return false;
        }
        // SAFETY: per the contract the block is free now, of `class`'s size
        // at least, and ours alone; the shelf has room.
        unsafe { self.shelf.put(class, block.cast()) };
        true
    }

    /// Sends the `count` newest blocks of `class`'s shelf back to their
    /// pools.
    #[cold]
    fn unshelve(&mut self, class: usize, count: usize, backing: &impl Backing) {
        for _ in 0..count {
            // SAFETY: the shelf's blocks are free blocks of ours that only
            // it links; taken off, each is freed once.
            unsafe {
                let block = self.shelf.take(class);
                self.free(block.cast(), backing);
            }
        }
    }

    /// Sends every shelved block back to its pool (arenas that come wholly
    /// free go back to the backing as usual); whether there was any.
    pub(crate) fn clear_shelf(&mut self, backing: &impl Backing) -> bool {
        if !self.shelved {
            return false;
        }
        let mut any = false;
        for class in 0..CLASS_COUNT {
            let len = self.shelf.len(class);
            any |= len > 0;
            self.unshelve(class, len, backing);
        }
        any
    }

    fn link_pool(&mut self, class: usize, pool: *mut Pool) {
        // SAFETY: `pool` is an initialised pool on no list, and class lists
        // hold initialised pools.
        unsafe { list::push_front(&mut self.used_pools[class], pool) }
    }

    fn unlink_pool(&mut self, class: usize, pool: *mut Pool) {
        // SAFETY: `pool` is on class list `class`, whose members are
        // initialised pools.
        unsafe { list::unlink(&mut self.used_pools[class], pool) }
    }

    fn pool_emptied(&mut self, pool: *mut Pool, backing: &impl Backing) {
        // SAFETY: `pool` is an initialised pool with no block out, linked
        // nowhere; its arena record is live while it has pools.
        let arena = unsafe {
            let arena = (*pool).arena.cast::<Arena>();
            (*pool).next = (*arena).free_pools;
            (*arena).free_pools = pool;
            arena
        };
        self.arena_gained_pool(arena, backing);
    }

    /// Makes a retired arena, else a new one from the backing, the only
    /// usable one.
    fn open_arena(&mut self, backing: &impl Backing) -> bool {
        let retired = self.retired.take_newest();
        if !retired.is_null() {
            self.counts().retired.fetch_sub(1, Ordering::Relaxed);
            // SAFETY: a retired arena is a live record, wholly free, and
            // (just taken off its list) on no list.
            let pools = unsafe { (*retired).pool_count } as usize;
            self.usable = retired;
            self.last_with_free[pools] = retired;
            return true;
        }
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
        // SAFETY: a fresh arena of ours, of this size.
        unsafe { super::track::opened(base, arena_size) };
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
        if self.spare {
            // In use again: no longer the spare.
            self.uncount_spare();
        }
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
            self.remove_usable(arena);
        } else if self.last_with_free[free].is_null() {
            // It had the fewest free pools, so no other arena has `free`.
            self.last_with_free[free] = arena;
        }
    }

    /// Arenas this heap has let go (given back or retired) so far: a cache
    /// flush that moves it has found the heap draining.
    pub(crate) fn arenas_let_go(&self) -> usize {
        self.arenas_let_go
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
                self.let_go(arena, backing);
                return;
            }
            self.retire_spare(backing);
            // SAFETY: list members are live records; `arena` is on no list.
            unsafe { list::push_front(&mut self.usable, arena) };
        } else if wholly_free && !(arena_ref.prev.is_null() && arena_ref.next.is_null()) {
            // Another arena has room, so this one need not stay as a spare.
            self.remove_usable(arena);
            self.let_go(arena, backing);
            return;
        } else if last_of_group != arena {
            // Arenas after it still have `free_before` free pools: it goes
            // behind the last of them, first of its new group.
            self.remove_usable(arena);
            // SAFETY: `last_of_group` is a live list member, `arena` a live
            // record just taken off the list.
            unsafe { list::insert_after(&mut self.usable, last_of_group, arena) };
        }
        if self.last_with_free[free].is_null() {
            self.last_with_free[free] = arena;
        }
        if wholly_free {
            // The only usable arena (the others with room were let go).
            self.keep_spare(backing);
        }
    }

    /// The heap's only usable arena just became wholly free: it stays as
    /// the allocator's spare if fewer than `MAX_SPARE_ARENAS` are kept,
    /// else it goes back.
    fn keep_spare(&mut self, backing: &impl Backing) {
        let spares = &self.counts().spares;
        let most = if self.medium {
            self.config.heaps()
        } else {
            MAX_SPARE_ARENAS
        };
        let counted = spares.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < most).then_some(n + 1)
        });
        if counted.is_ok() {
            self.spare = true;
            self.purge_spare(backing);
        } else {
            self.retire_spare(backing);
        }
    }

    /// Hands the pages of the spare (the only usable arena, wholly free)
    /// back to the system if its pools have carved more than
    /// `SPARE_RESIDENT_LIMIT` bytes of blocks and the backing can; its
    /// pools are then carved afresh.
    #[cold]
    fn purge_spare(&mut self, backing: &impl Backing) {
        let pool_size = self.config.pool_size();
        // SAFETY: the usable list's head is a live record.
        let spare = unsafe { &mut *self.usable };
        // A pool re-carved for another class counts from its new start:
        // an estimate of what is resident, which only errs low.
        let carved: usize = spare
            .carved_pools(pool_size)
            // SAFETY: carved pools of a live arena are initialised.
            .map(|pool| unsafe { (*pool).bump } as usize)
            .sum();
        if carved <= SPARE_RESIDENT_LIMIT {
            return;
        }
        // SAFETY: every pool of the arena is empty (it is wholly free) and
        // no list but its own empty-pool list, forgotten below, links into
        // it; carved pools are whole pools from `first_pool` on.
        let purged = unsafe { backing.purge(spare.first_pool, spare.carved as usize * pool_size) };
        if purged {
            spare.uncarve();
        }
    }

    fn counts(&self) -> &ArenaCounts {
        // SAFETY: the counts outlive the heap (`Heap::new`).
        unsafe { &*self.counts }
    }

    fn uncount_spare(&mut self) {
        self.spare = false;
        self.counts().spares.fetch_sub(1, Ordering::Relaxed);
    }

    /// Retires the spare, if there is one: a wholly free arena stays usable
    /// only while it is the only usable arena, and another is about to join.
    fn retire_spare(&mut self, backing: &impl Backing) {
        let spare = self.unlink_spare();
        if !spare.is_null() {
            self.let_go(spare, backing);
        }
    }

    /// Gives back the spare and every retired arena at once: the backing is
    /// out of memory, and another heap, or a large object, may need it.
    pub(crate) fn release_free_arenas(&mut self, backing: &impl Backing) {
        let spare = self.unlink_spare();
        if !spare.is_null() {
            self.release_arena(spare, backing);
        }
        loop {
            let arena = self.retired.take_newest();
            if arena.is_null() {
                break;
            }
            self.counts().retired.fetch_sub(1, Ordering::Relaxed);
            self.release_arena(arena, backing);
        }
    }

    /// Gives back the retired arenas that have waited out the release
    /// delay, if the backing has a clock.
    pub(crate) fn release_expired(&mut self, backing: &impl Backing) {
        if let Some(now) = backing.clock_ms() {
            self.release_expired_at(now, backing);
        }
    }

    fn release_expired_at(&mut self, now: u32, backing: &impl Backing) {
        let delay = self.config.release_delay_ms();
        loop {
            let arena = self.retired.take_expired(now, delay);
            if arena.is_null() {
                break;
            }
            self.counts().retired.fetch_sub(1, Ordering::Relaxed);
            self.release_arena(arena, backing);
        }
    }

    /// A wholly free arena, on no list, that no spare rule keeps: retired
    /// if the backing has a clock and the delay is not zero (the oldest
    /// retired arenas that have waited it out going back meanwhile), else
    /// given back now.
    fn let_go(&mut self, arena: *mut Arena, backing: &impl Backing) {
        self.arenas_let_go += 1;
        match backing.clock_ms() {
            Some(now) if self.config.release_delay_ms() > 0 => {
                self.release_expired_at(now, backing);
                // SAFETY: per the above, a live record of a wholly free
                // arena on no list.
                unsafe { self.retired.push(arena, now) };
                self.counts().retired.fetch_add(1, Ordering::Relaxed);
            }
            _ => self.release_arena(arena, backing),
        }
    }

    /// Takes the spare, if there is one, off the usable list; null if
    /// there is none.
    fn unlink_spare(&mut self) -> *mut Arena {
        let spare = self.usable;
        // SAFETY: list members are live records.
        if spare.is_null() || unsafe { (*spare).free_count != (*spare).pool_count } {
            return ptr::null_mut();
        }
        // SAFETY: as above.
        let free = unsafe { (*spare).free_count } as usize;
        debug_assert!(unsafe { (*spare).next.is_null() } && self.last_with_free[free] == spare);
        self.last_with_free[free] = ptr::null_mut();
        self.usable = ptr::null_mut();
        if self.spare {
            self.uncount_spare();
        }
        spare
    }

    fn remove_usable(&mut self, arena: *mut Arena) {
        // SAFETY: `arena` is on the usable list, whose members are live.
        unsafe { list::unlink(&mut self.usable, arena) }
    }

    fn release_arena(&mut self, arena: *mut Arena, backing: &impl Backing) {
        // SAFETY: the arena is wholly free and unlinked: no block, no list
        // refers into it any more, and it came from `alloc_arena` with the
        // configured geometry.
        unsafe {
            super::track::released((*arena).base, self.config.arena_size());
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

    /// Gives every arena and table chunk back to the backing.
    ///
    /// # Safety
    /// No block of the heap is used again.
    pub(crate) unsafe fn release_all(&mut self, backing: &impl Backing) {
        let (arena_size, pool_size) = (self.config.arena_size(), self.config.pool_size());
        for arena in self.table.open_arenas() {
            // SAFETY: the arena came from `alloc_arena` with this geometry,
            // and per the contract nothing in it is used again.
            unsafe {
                super::track::released(arena.base, arena_size);
                backing.dealloc_arena(arena.base, arena_size, pool_size);
            }
        }
        // SAFETY: the records are no longer needed: the heap is reset below.
        unsafe { self.table.free_chunks(backing) };
        if self.spare {
            self.uncount_spare();
        }
        // The retired arenas went with the others.
        self.counts()
            .retired
            .fetch_sub(self.retired.len(), Ordering::Relaxed);
        *self = Heap {
            medium: self.medium,
            shelved: self.shelved,
            ..Heap::new(self.config, self.index, self.counts)
        };
    }

    /// Adds this heap's arenas and pools to `stats`. (The high-water mark
    /// of several heaps is the sum of theirs: an upper bound.)
    pub(crate) fn gather(&self, stats: &mut Stats) {
        let pool_size = self.config.pool_size();
        if self.medium {
            // A region's medium arenas are smaller (see `HeapSet::create`).
            stats.medium.arena_size = self.config.arena_size();
        }
        let m = &mut stats.medium;
        let (total, reclaimed, highwater, current, retired, unused) = match self.medium {
            false => (
                &mut stats.arenas_allocated_total,
                &mut stats.arenas_reclaimed,
                &mut stats.arenas_highwater,
                &mut stats.arenas_current,
                &mut stats.arenas_retired,
                &mut stats.unused_pools,
            ),
            true => (
                &mut m.allocated_total,
                &mut m.reclaimed,
                &mut m.highwater,
                &mut m.current,
                &mut m.retired,
                &mut m.unused_runs,
            ),
        };
        *retired += self.retired.len();
        *total += self.arenas_allocated_total;
        *reclaimed += self.arenas_reclaimed;
        *highwater += self.arenas_highwater;
        *current += self.arenas_current;
        stats.bookkeeping_bytes += self.table.bytes();
        stats.requested_bytes = stats.requested_bytes.wrapping_add(self.requested);
        for arena in self.table.open_arenas() {
            stats.arena_alignment_bytes +=
                self.config.arena_size() - arena.pool_count as usize * pool_size;
            *unused += (arena.pool_count - arena.carved) as usize;
            for pool in arena.carved_pools(pool_size) {
                // SAFETY: carved pools are initialised.
                let (used, class) = unsafe { ((*pool).used as usize, (*pool).class as usize) };
                if used == 0 {
                    *unused += 1;
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
        let first = super::pool::first_block_offset(pool_class);
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
        for class in 0..ALL_CLASS_COUNT {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::config::{MEDIUM_ARENA_RUNS, MEDIUM_RUN_SIZE};
    use crate::allocator::pool::blocks_per_pool;
    use crate::allocator::size_class::{class_size, CLASS_COUNT};
    use core::alloc::Layout;
    use core::cell::Cell;
    use std::vec::Vec;

    /// Arenas and chunks from the std allocator, counted.
    #[derive(Default)]
    struct Counting {
        arenas_out: Cell<usize>,
        arenas_given: Cell<usize>,
        /// Most arenas out at once; 0: no limit.
        arena_limit: Cell<usize>,
        /// Whether `purge` takes pages (else it refuses, as a region does).
        purges: bool,
        /// Bytes purged so far.
        purged: Cell<usize>,
        /// The clock `clock_ms` reads, set by the test; none by default.
        clock: Cell<Option<u32>>,
    }

    // SAFETY: forwards to the std allocator, which keeps the promises.
    unsafe impl Backing for Counting {
        fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the heap never asks for zero bytes.
            unsafe { std::alloc::alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: forwarded contract.
            unsafe { std::alloc::dealloc(ptr, layout) }
        }
        fn alloc_arena(&self, size: usize, pool_size: usize) -> *mut u8 {
            if self.arena_limit.get() != 0 && self.arenas_out.get() == self.arena_limit.get() {
                return ptr::null_mut();
            }
            self.arenas_out.set(self.arenas_out.get() + 1);
            self.arenas_given.set(self.arenas_given.get() + 1);
            self.alloc(Layout::from_size_align(size, pool_size).unwrap())
        }
        unsafe fn dealloc_arena(&self, ptr: *mut u8, size: usize, pool_size: usize) {
            self.arenas_out.set(self.arenas_out.get() - 1);
            // SAFETY: forwarded contract.
            unsafe { self.dealloc(ptr, Layout::from_size_align(size, pool_size).unwrap()) }
        }
        unsafe fn purge(&self, ptr: *mut u8, len: usize) -> bool {
            if self.purges {
                // Not zeros: the heap may rely on nothing it wrote there.
                // SAFETY: per the contract, bytes of an arena of ours that
                // nobody reads before writing.
                unsafe { ptr.write_bytes(0xa5, len) };
                self.purged.set(self.purged.get() + len);
            }
            self.purges
        }
        fn clock_ms(&self) -> Option<u32> {
            self.clock.get()
        }
    }

    const BIG: usize = CLASS_COUNT - 1;
    /// The largest medium class (64 KiB), seven blocks to a run.
    const BIGGEST: usize = ALL_CLASS_COUNT - 1;

    /// A medium heap of the default geometry, the `index`th of `heaps`.
    fn medium_heap(index: usize, heaps: usize, counts: &ArenaCounts) -> Heap {
        let config = Config::new(MEDIUM_RUN_SIZE, MEDIUM_ARENA_RUNS).with_heaps(heaps);
        Heap::new(config, index, counts).serving_medium()
    }

    /// Allocates `count` blocks of `class`, then frees them all.
    fn churn_once(heap: &mut Heap, backing: &Counting, class: usize, count: usize) {
        let blocks: Vec<_> = (0..count).map(|_| heap.alloc(class, backing)).collect();
        assert!(blocks.iter().all(|b| !b.is_null()));
        for block in blocks {
            // SAFETY: each block came from this heap and is freed once.
            unsafe { heap.free(block, backing) };
        }
        heap.check_invariants();
    }

    /// Blocks of the 512-byte class that fill `arenas` arenas of `config`.
    fn fill(heap: &mut Heap, backing: &Counting, arenas: usize) -> Vec<*mut u8> {
        let config = heap.config();
        let per_arena = config.arena_pools() * blocks_per_pool(config.pool_size(), BIG);
        let blocks: Vec<_> = (0..arenas * per_arena)
            .map(|_| heap.alloc(BIG, backing))
            .collect();
        assert!(blocks.iter().all(|b| !b.is_null()));
        assert_eq!(backing.arenas_out.get(), arenas);
        blocks
    }

    fn stats(heap: &Heap) -> Stats {
        let config = heap.config();
        let mut stats = Stats::empty(config.pool_size(), config.arena_size());
        heap.gather(&mut stats);
        stats
    }

    #[test]
    fn freeing_everything_gives_back_all_arenas_but_one_spare() {
        let backing = Counting::default();
        let counts = ArenaCounts::new();
        let mut heap = Heap::new(Config::SMALL, 0, &counts);
        let blocks = fill(&mut heap, &backing, 8);
        for block in blocks {
            // SAFETY: each block came from this heap and is freed once.
            unsafe { heap.free(block, &backing) };
            heap.check_invariants();
        }
        assert_eq!(backing.arenas_out.get(), 1);
        let s = stats(&heap);
        assert_eq!(
            (
                s.arenas_current,
                s.arenas_reclaimed,
                s.arenas_allocated_total
            ),
            (1, 7, 8)
        );
        assert_eq!(s.blocks_in_use(), 0);
    }

    /// A heap over a backing whose clock reads 0, arenas retired for 10 ms,
    /// and `blocks` that filled `arenas` arenas, all freed: the spare and
    /// `arenas - 1` retired arenas are left.
    fn retired_after_a_round(backing: &Counting, counts: &ArenaCounts, arenas: usize) -> Heap {
        backing.clock.set(Some(0));
        let mut heap = Heap::new(Config::SMALL.with_release_delay_ms(10), 0, counts);
        for block in fill(&mut heap, backing, arenas) {
            // SAFETY: each block came from this heap and is freed once.
            unsafe { heap.free(block, backing) };
            heap.check_invariants();
        }
        assert_eq!(
            (backing.arenas_out.get(), heap.retired.len()),
            (arenas, arenas - 1)
        );
        assert_eq!(counts.retired.load(Ordering::Relaxed), arenas - 1);
        let s = stats(&heap);
        assert_eq!(
            (s.arenas_current, s.arenas_retired, s.arenas_reclaimed),
            (arenas, arenas - 1, 0)
        );
        heap
    }

    #[test]
    fn a_round_within_the_delay_takes_the_retired_arenas_back() {
        let (backing, counts) = (Counting::default(), ArenaCounts::new());
        let mut heap = retired_after_a_round(&backing, &counts, 6);
        backing.clock.set(Some(9));
        let blocks = fill(&mut heap, &backing, 6);
        assert_eq!(backing.arenas_given.get(), 6, "no arena mapped afresh");
        assert_eq!(heap.retired.len(), 0);
        for block in blocks {
            // SAFETY: as above.
            unsafe { heap.free(block, &backing) };
        }
        assert_eq!(heap.retired.len(), 5);
    }

    #[test]
    fn retired_arenas_go_back_once_the_heap_has_been_idle_for_the_delay() {
        let (backing, counts) = (Counting::default(), ArenaCounts::new());
        let mut heap = retired_after_a_round(&backing, &counts, 6);
        backing.clock.set(Some(9));
        heap.release_expired(&backing);
        assert_eq!(heap.retired.len(), 5, "9 ms idle is within the delay");
        backing.clock.set(Some(10));
        heap.release_expired(&backing);
        assert_eq!((heap.retired.len(), backing.arenas_out.get()), (0, 1));
        assert_eq!(counts.retired.load(Ordering::Relaxed), 0);
        let s = stats(&heap);
        assert_eq!((s.arenas_current, s.arenas_reclaimed), (1, 5));
    }

    #[test]
    fn a_heap_taking_pools_keeps_its_retired_arenas_until_they_age_out() {
        let (backing, counts) = (Counting::default(), ArenaCounts::new());
        let mut heap = retired_after_a_round(&backing, &counts, 3);
        // A pool taken every 9 ms (from the spare, whose pools are free)
        // keeps the heap busy: nothing goes back for 100 delays.
        let mut taken = Vec::new();
        for now in (9..1000).step_by(9) {
            backing.clock.set(Some(now));
            heap.release_expired(&backing);
            assert_eq!(heap.retired.len(), 2, "at {now} ms");
            let block = heap.alloc(BIG, &backing);
            assert!(!block.is_null());
            taken.push(block);
            if taken.len() == 8 {
                for block in taken.drain(..) {
                    // SAFETY: as above.
                    unsafe { heap.free(block, &backing) };
                }
            }
        }
        // At 1000 ms both have waited 100 delays, busy or not.
        backing.clock.set(Some(1000));
        heap.release_expired(&backing);
        assert_eq!(heap.retired.len(), 0);
        for block in taken {
            // SAFETY: as above.
            unsafe { heap.free(block, &backing) };
        }
    }

    #[test]
    fn out_of_memory_takes_the_retired_arenas_back_at_once() {
        let (backing, counts) = (Counting::default(), ArenaCounts::new());
        let mut heap = retired_after_a_round(&backing, &counts, 4);
        heap.release_free_arenas(&backing);
        assert_eq!((heap.retired.len(), backing.arenas_out.get()), (0, 0));
        assert_eq!(counts.retired.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn heaps_of_one_allocator_keep_one_spare_arena_between_them() {
        // One backing per heap, so that `fill` counts each heap's arenas.
        let backings = [Counting::default(), Counting::default()];
        let out = || backings.iter().map(|b| b.arenas_out.get()).sum::<usize>();
        let counts = ArenaCounts::new();
        let mut heaps = [0, 1].map(|index| Heap::new(Config::SMALL, index, &counts));
        let blocks = [0, 1].map(|i| fill(&mut heaps[i], &backings[i], 2));
        assert_eq!(out(), 4);
        for (i, blocks) in blocks.into_iter().enumerate() {
            for block in blocks {
                // SAFETY: each block came from this heap and is freed once.
                unsafe { heaps[i].free(block, &backings[i]) };
            }
            heaps[i].check_invariants();
        }
        assert_eq!(out(), 1, "one spare in all");
        assert_eq!(counts.spares.load(Ordering::Relaxed), 1);
        // The spare taken back into use frees the count for the other heap.
        let block = heaps[0].alloc(BIG, &backings[0]);
        assert_eq!(counts.spares.load(Ordering::Relaxed), 0);
        // SAFETY: just allocated from heap 0.
        unsafe { heaps[0].free(block, &backings[0]) };
        assert_eq!(counts.spares.load(Ordering::Relaxed), 1);
        for (heap, backing) in heaps.iter_mut().zip(&backings) {
            // SAFETY: no block of the heaps is used again.
            unsafe { heap.release_all(backing) };
        }
        assert_eq!(counts.spares.load(Ordering::Relaxed), 0);
        assert_eq!(out(), 0);
    }

    #[test]
    fn medium_heaps_keep_a_spare_each() {
        let backings = [Counting::default(), Counting::default()];
        let counts = ArenaCounts::new();
        let mut heaps = [0, 1].map(|index| medium_heap(index, 2, &counts));
        let per_arena = MEDIUM_ARENA_RUNS * blocks_per_pool(MEDIUM_RUN_SIZE, BIGGEST);
        for (heap, backing) in heaps.iter_mut().zip(&backings) {
            churn_once(heap, backing, BIGGEST, 2 * per_arena);
            assert_eq!(backing.arenas_given.get(), 2);
        }
        // A thread refilling from either heap maps no arena again.
        for _ in 0..10 {
            for (heap, backing) in heaps.iter_mut().zip(&backings) {
                churn_once(heap, backing, BIGGEST, 1);
            }
        }
        let given: Vec<_> = backings.iter().map(|b| b.arenas_given.get()).collect();
        assert_eq!(given, [2, 2]);
        assert_eq!(counts.spares.load(Ordering::Relaxed), 2);
        for (heap, backing) in heaps.iter_mut().zip(&backings) {
            // SAFETY: no block of the heaps is used again.
            unsafe { heap.release_all(backing) };
            assert_eq!(backing.arenas_out.get(), 0);
        }
        assert_eq!(counts.spares.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_spare_that_carved_much_hands_its_pages_back_and_serves_again() {
        let per_arena = MEDIUM_ARENA_RUNS * blocks_per_pool(MEDIUM_RUN_SIZE, BIGGEST);
        for purges in [true, false] {
            let backing = Counting {
                purges,
                ..Counting::default()
            };
            let counts = ArenaCounts::new();
            let mut heap = medium_heap(0, 1, &counts);
            // One block carves far less than the limit: kept as it is.
            churn_once(&mut heap, &backing, BIGGEST, 1);
            assert_eq!(backing.purged.get(), 0);
            // A whole arena's blocks carve all its runs.
            churn_once(&mut heap, &backing, BIGGEST, per_arena);
            let arena_bytes = MEDIUM_ARENA_RUNS * MEDIUM_RUN_SIZE;
            assert_eq!(backing.purged.get(), if purges { arena_bytes } else { 0 });
            assert_eq!(backing.arenas_out.get(), 1, "the spare stays mapped");
            // Carved afresh over the scribbled pages (or reused as they
            // were), twice over, from the same arena.
            churn_once(&mut heap, &backing, BIGGEST, per_arena);
            churn_once(&mut heap, &backing, BIGGEST - 3, 100);
            assert_eq!(backing.arenas_given.get(), 1);
            assert_eq!(stats(&heap).blocks_in_use(), 0);
            // SAFETY: no block of the heap is used again.
            unsafe { heap.release_all(&backing) };
        }
    }

    #[test]
    fn one_live_block_pins_its_arena_and_only_its_arena() {
        for pinned_arena in [0, 3, 7] {
            let backing = Counting::default();
            let counts = ArenaCounts::new();
            let mut heap = Heap::new(Config::SMALL, 0, &counts);
            let blocks = fill(&mut heap, &backing, 8);
            let per_arena = blocks.len() / 8;
            let pinned = blocks[pinned_arena * per_arena + 5];
            for &block in blocks.iter().filter(|&&b| b != pinned) {
                // SAFETY: each block came from this heap and is freed once.
                unsafe { heap.free(block, &backing) };
            }
            heap.check_invariants();
            assert_eq!(
                backing.arenas_out.get(),
                1,
                "pinned in arena {pinned_arena}"
            );
            assert_eq!(stats(&heap).blocks_in_use(), 1);
        }
    }

    #[test]
    fn new_pools_come_from_the_fullest_arena() {
        let backing = Counting::default();
        let counts = ArenaCounts::new();
        let mut heap = Heap::new(Config::SMALL, 0, &counts);
        let blocks = fill(&mut heap, &backing, 3);
        let per_arena = blocks.len() / 3;
        // Arena 0 gets 4 free pools, arena 1 gets 1, arena 2 gets 2.
        let frees = [(0, 4), (1, 1), (2, 2)];
        for (arena, pools) in frees {
            for block in &blocks[arena * per_arena..arena * per_arena + pools] {
                // SAFETY: freed once; 512-byte blocks fill a 1 KiB pool alone.
                unsafe { heap.free(*block, &backing) };
            }
        }
        heap.check_invariants();
        let arena_of = |b: *mut u8| {
            blocks
                .iter()
                .position(|&x| pool_of(x, 1024) == pool_of(b, 1024))
                .unwrap()
                / per_arena
        };
        // The next pools come from arena 1 (one free), then arena 2, then 0.
        let order: Vec<usize> = (0..7)
            .map(|_| arena_of(heap.alloc(BIG, &backing)))
            .collect();
        assert_eq!(order, [1, 2, 2, 0, 0, 0, 0]);
        heap.check_invariants();
    }

    #[test]
    fn a_loop_at_an_arena_boundary_does_not_open_an_arena_each_time() {
        let backing = Counting::default();
        let counts = ArenaCounts::new();
        let mut heap = Heap::new(Config::SMALL, 0, &counts);
        let _full = fill(&mut heap, &backing, 2);
        for _ in 0..1000 {
            let block = heap.alloc(BIG, &backing);
            // SAFETY: just allocated.
            unsafe { heap.free(block, &backing) };
        }
        assert_eq!(backing.arenas_given.get(), 3);
        heap.check_invariants();
    }

    #[test]
    fn the_spare_goes_back_once_another_arena_has_room() {
        let backing = Counting::default();
        let counts = ArenaCounts::new();
        let mut heap = Heap::new(Config::SMALL, 0, &counts);
        let blocks = fill(&mut heap, &backing, 3);
        let per_arena = blocks.len() / 3;
        for &block in &blocks[..per_arena] {
            // SAFETY: freed once.
            unsafe { heap.free(block, &backing) };
        }
        assert_eq!(backing.arenas_out.get(), 3, "arena 0 stays as the spare");
        // SAFETY: freed once.
        unsafe { heap.free(blocks[per_arena], &backing) };
        assert_eq!(
            backing.arenas_out.get(),
            2,
            "arena 1 has room, so the spare goes"
        );
        heap.check_invariants();
    }

    #[test]
    fn ten_thousand_arenas_freed_in_reverse_order() {
        let backing = Counting::default();
        let counts = ArenaCounts::new();
        let mut heap = Heap::new(Config::SMALL, 0, &counts);
        let blocks = fill(&mut heap, &backing, 10_000);
        for &block in blocks.iter().rev() {
            // SAFETY: freed once. Each free is O(1): no step of
            // `arena_gained_pool` walks the list.
            unsafe { heap.free(block, &backing) };
        }
        heap.check_invariants();
        assert_eq!(backing.arenas_out.get(), 1);
    }

    #[test]
    fn random_frees_keep_the_list_sorted_and_indexed() {
        let backing = Counting::default();
        let counts = ArenaCounts::new();
        let mut heap = Heap::new(Config::SMALL, 0, &counts);
        let mut live: Vec<*mut u8> = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for step in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let class = (seed >> 32) as usize % CLASS_COUNT;
            if live.is_empty() || (seed % 100) < 55 - (step / 20_000) as u64 * 3 {
                live.push(heap.alloc(class, &backing));
            } else {
                let block = live.swap_remove((seed >> 8) as usize % live.len());
                // SAFETY: freed once.
                unsafe { heap.free(block, &backing) };
            }
            if step % 997 == 0 {
                heap.check_invariants();
                let s = stats(&heap);
                assert_eq!(s.accounted_arena_bytes(), s.arena_bytes());
                assert_eq!(s.blocks_in_use(), live.len());
            }
        }
    }

    /// 128-byte blocks: a shelf over 1 KiB pools holds eight.
    const SHELVED: usize = 15;

    #[test]
    fn a_shelf_hands_back_the_newest_free_and_holds_at_most_a_pools_bytes() {
        let backing = Counting::default();
        let counts = ArenaCounts::new();
        let mut heap = Heap::new(Config::SMALL, 0, &counts).with_shelf();
        let blocks: Vec<_> = (0..40).map(|_| heap.alloc(SHELVED, &backing)).collect();
        assert!(blocks.iter().all(|b| !b.is_null()));
        for &block in &blocks {
            // SAFETY: each block came from this heap and is freed once.
            unsafe { heap.free_of_class(block, SHELVED, &backing) };
            assert!(heap.shelf.len(SHELVED) * class_size(SHELVED) <= Config::SMALL.pool_size());
            heap.check_invariants();
        }
        // The pools still count the shelved blocks as out: the newest comes
        // back without a pool being touched.
        let in_pools = stats(&heap).blocks_in_use();
        assert!(in_pools > 0 && in_pools <= 8);
        let again = heap.alloc(SHELVED, &backing);
        assert_eq!(again, blocks[39]);
        assert_eq!(stats(&heap).blocks_in_use(), in_pools);
        // SAFETY: as above.
        unsafe { heap.free_of_class(again, SHELVED, &backing) };
        assert!(heap.clear_shelf(&backing));
        assert!(!heap.clear_shelf(&backing), "nothing left to clear");
        assert_eq!(stats(&heap).blocks_in_use(), 0);
        assert_eq!(backing.arenas_out.get(), 1, "the one spare");
        heap.check_invariants();
    }

    #[test]
    fn a_shelf_goes_back_to_the_pools_before_an_allocation_fails() {
        let backing = Counting::default();
        backing.arena_limit.set(1);
        let counts = ArenaCounts::new();
        let mut heap = Heap::new(Config::SMALL, 0, &counts).with_shelf();
        let fill = |heap: &mut Heap, class: usize| {
            let mut blocks = Vec::new();
            loop {
                let block = heap.alloc(class, &backing);
                if block.is_null() {
                    return blocks;
                }
                blocks.push(block);
            }
        };
        let small = fill(&mut heap, SHELVED);
        for &block in &small {
            // SAFETY: each block came from this heap and is freed once.
            unsafe { heap.free_of_class(block, SHELVED, &backing) };
        }
        // Every pool but the shelved blocks' is free for another class;
        // before the null, the shelf gives those back too, so the arena
        // holds as many 512-byte blocks as if it had never held others.
        let big = fill(&mut heap, BIG);
        let config = Config::SMALL;
        assert_eq!(
            big.len(),
            config.arena_pools() * blocks_per_pool(config.pool_size(), BIG)
        );
        assert_eq!(heap.shelf.len(SHELVED), 0);
        heap.check_invariants();
    }
}
