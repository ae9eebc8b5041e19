//! Per-thread caches of free blocks: the allocator's fast path, where
//! thread-local storage is known to be safe (see `build.rs`).
//!
//! Each thread keeps, per size class, a short LIFO list of free blocks of
//! one allocator (its *owner*). Allocation pops from it and a free pushes on
//! it with no atomic read-modify-write and no lock; only when a list runs
//! empty (refill) or over its capacity (flush) does the thread take a heap,
//! and then it moves half a list's worth of blocks at once. This is glibc's
//! tcache design over obmalloc's pools; the lock is paid once per batch.
//! A list that keeps sending blocks back and fetching them again grows,
//! within a budget per cache. A thread whose flushes let many arenas go (a
//! spike being freed) drains its cache, its lists back to their starting
//! sizes, and passes every free on until it allocates again, so that no
//! cached block keeps an otherwise empty arena mapped.
//!
//! Blocks in a cache are "in use" as far as their pools know; statistics
//! walk the caches bound to an allocator and count them as free.
//!
//! Lifetimes, the part that needs care:
//! * A cache serves one allocator at a time, named by a process-unique id
//!   (never by address: a `PyMalloc` value may move). Calls on other
//!   allocators take the shared path.
//! * A dropped allocator takes its memory with it, so a cache must never
//!   touch blocks of a dead owner. Live ids are kept in a global registry;
//!   dropping an allocator removes its id under the registry lock and bumps
//!   a generation counter, and a cache re-checks its owner under that lock
//!   whenever the generation moved, discarding (never touching) its blocks
//!   if the owner is gone. The registry also lists, per allocator, the
//!   caches bound to it, for statistics.
//! * At thread exit a hook (which one depends on the platform: see
//!   `build.rs` and `exit` below) hands the cache back: under the registry
//!   lock, so that the owner cannot be dropped meanwhile, it pushes every
//!   block to its heap's inbox. It cannot free into the heap: the backing
//!   lives in the `PyMalloc` value, whose address the cache does not know.
//!   The next holder of each heap reclaims them. After that the cache never
//!   binds again, and the dying thread's later allocations (other thread
//!   locals' destructors, or key destructors run after ours) take the
//!   shared path.
//! * Thread start-up needs nothing: a thread's TLS block exists before any
//!   of its code runs, and the cache starts unbound (with a pthread key or
//!   FLS, absent until the thread's first small allocation).

use super::backing::{Backing, RETAINED_ARENAS};
use super::config::MAX_HEAPS;
use super::heap_set::{heap_in, HeapSet};
use super::pool::{Batch, FreeBlock};
use super::size_class::{class_size, is_medium, ALL_CLASS_COUNT, CLASS_COUNT};
use super::stats::Stats;
use super::sync::{AtomicUsize, Lock, Ordering};
use core::cell::Cell;
use core::ptr;

/// Bytes of blocks one list aims to hold: two pages' worth, so that a
/// thread keeps at most 128 pages of free blocks however many classes it
/// uses (mimalloc keeps a whole 64 KiB page per class a thread uses).
const LIST_BYTES: usize = 8192;

/// Bytes of blocks one list of a medium class aims to hold, and the
/// fewest blocks it holds: fifty of the smallest class, eight of any class
/// from 4 KiB, 3.4 MiB at most over all 28 lists (mimalloc keeps a whole
/// 512 KiB page per medium class a thread uses). What decides the speed is
/// the floor: a refill or a flush moves half a list under one lock, and
/// with 64 KiB lists and a floor of two, every other allocation and free
/// of a class from 32 KiB took a lock. On the 513 B - 64 KiB row (random
/// sizes, 100 live) that floor took 43 ns a step, four blocks 33, eight 25
/// (with 32 or 64 KiB lists alike), 256 KiB lists with a floor of two 28.
const MEDIUM_LIST_BYTES: usize = 32 * 1024;
const MEDIUM_LIST_BLOCKS: usize = 8;

/// Blocks a list of each class holds before half of them go back: a table,
/// so that the free path does not divide.
const CAPACITY: [usize; ALL_CLASS_COUNT] = {
    let mut table = [0; ALL_CLASS_COUNT];
    let mut class = 0;
    while class < ALL_CLASS_COUNT {
        let (bytes, least) = if is_medium(class) {
            (MEDIUM_LIST_BYTES, MEDIUM_LIST_BLOCKS)
        } else {
            (LIST_BYTES, 8)
        };
        let blocks = bytes / class_size(class);
        table[class] = if blocks < least {
            least
        } else if blocks > 512 {
            512
        } else {
            blocks
        };
        class += 1;
    }
    table
};

/// The most bytes the lists of classes `first..end` hold, each at its
/// capacity.
const fn full_lists_bytes(first: usize, end: usize) -> usize {
    let mut bytes = 0;
    let mut class = first;
    while class < end {
        bytes += CAPACITY[class] * class_size(class);
        class += 1;
    }
    bytes
}

/// The most bytes one thread's cache can hold in small blocks for one
/// allocator before any list grows: every small list at its starting
/// capacity. A list flushes as soon as it exceeds its capacity.
const SMALL_CACHE_BYTES: usize = full_lists_bytes(0, CLASS_COUNT);

/// The most bytes one thread's cache can hold in medium blocks.
const MEDIUM_CACHE_BYTES: usize = full_lists_bytes(CLASS_COUNT, ALL_CLASS_COUNT);

// A cache's medium lists hold less than 3.5 MiB, its small ones 512 KiB
// until they grow (by `GROWTH_BYTES` at most, and only over a backing
// without a bound).
static_assertions::const_assert!(MEDIUM_CACHE_BYTES < 3584 << 10);
static_assertions::const_assert!(SMALL_CACHE_BYTES <= 512 << 10);

/// The most bytes one thread's cache can hold for an allocator over a
/// bounded backing (whose lists never grow), with the medium tier on or
/// off: what a region weighs against its span.
pub(crate) const fn max_cache_bytes(medium_tier: bool) -> usize {
    SMALL_CACHE_BYTES + if medium_tier { MEDIUM_CACHE_BYTES } else { 0 }
}

/// Blocks a list of `class` holds before half of them go back, until it
/// grows (see `ThreadCache::grow`).
#[inline]
fn capacity(class: usize) -> usize {
    CAPACITY[class]
}

/// Bytes of small blocks one cache may hold beyond its lists' starting
/// capacities, over a backing without a bound (a region's caches get none:
/// `max_cache_bytes` is what a region weighs). A list that sends blocks
/// back to its heap and then fetches blocks again before it next
/// overflows is cycling more blocks than it holds: each of them went to
/// its pool and came back, 40-odd instructions and two pool headers read
/// a block. Such a list doubles its capacity at the refill, from this
/// budget. A JSON-like workload (1,000 records of 13 small blocks built and
/// dropped in turn) cycles 600 KB a round; in a probe it took 1.11×
/// mimalloc's time with fixed lists, 1.03× with lists of 128 KiB, 1.01×
/// with lists that grow.
const GROWTH_BYTES: usize = 1 << 20;

/// Frees in a row that let no arena go before a straight cache (see
/// `ThreadCache::go_straight`) caches again: as many as an arena of the
/// smallest class holds at the default geometry, so that a spike freed
/// in the order it was allocated, which lets an arena go every arena's
/// worth of blocks, stays straight to its end.
const STRAIGHT_FREES: usize = 32 << 10;

/// Owner of a cache bound to no allocator: no allocator has this id.
const NO_OWNER: usize = usize::MAX;

/// The id of an allocator no cache ever binds to (caches are off for its
/// backing, see `CACHED_SPAN_SHARE`): never registered, never an owner.
pub(crate) const UNCACHED: usize = usize::MAX - 1;

/// Allocators alive now that caches may bind to, each with the caches
/// bound to it.
struct Registry {
    slots: [Slot; REGISTRY_SLOTS],
}

/// One registered allocator.
struct Slot {
    /// Its id; 0 for a free slot.
    id: usize,
    /// The caches bound to it, linked through their `prev`/`next`.
    caches: *const ThreadCache,
}

// SAFETY: the cache pointers are only followed under the registry's lock, to
// caches that stay alive (in their threads' TLS) until they unlink
// themselves under it.
unsafe impl Send for Registry {}

/// Allocators that can be cached for at once; more take the shared path.
const REGISTRY_SLOTS: usize = 64;

static REGISTRY: Lock<Registry> = Lock::new(Registry {
    slots: [const {
        Slot {
            id: 0,
            caches: ptr::null(),
        }
    }; REGISTRY_SLOTS],
});

/// Bumped whenever an id leaves the registry: a cache whose last look was
/// at this generation knows its owner is still alive without locking.
static GENERATION: AtomicUsize = AtomicUsize::new(0);

/// Hands out ids; 0 means "none yet".
static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// A fresh id for a new heap set, registered so caches may bind to it;
/// [`UNCACHED`] if the registry is full (the allocator then goes without
/// caches).
pub(crate) fn register() -> usize {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut registry = REGISTRY.lock();
    match registry.slots.iter_mut().find(|slot| slot.id == 0) {
        Some(slot) => {
            *slot = Slot {
                id,
                caches: ptr::null(),
            };
            id
        }
        None => UNCACHED,
    }
}

/// Removes `id`: from now on no cache touches the blocks of its allocator.
/// Waits for any thread that is handing its cache back to that allocator.
pub(crate) fn unregister(id: usize) {
    if id == 0 || id == UNCACHED {
        return;
    }
    let mut registry = REGISTRY.lock();
    if let Some(slot) = registry.slot(id) {
        // Its caches forget it when they next see `GENERATION` move.
        slot.id = 0;
        slot.caches = ptr::null();
    }
    GENERATION.fetch_add(1, Ordering::Release);
}

impl Registry {
    /// The slot of the live allocator `id`, if it is registered.
    fn slot(&mut self, id: usize) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|slot| slot.id == id && id != 0)
    }

    fn is_live(&mut self, id: usize) -> bool {
        self.slot(id).is_some()
    }
}

impl Slot {
    /// # Safety
    /// `cache` is on no list and stays alive until `unlink`ed.
    unsafe fn link(&mut self, cache: &ThreadCache) {
        cache.prev.set(ptr::null());
        cache.next.set(self.caches);
        if !self.caches.is_null() {
            // SAFETY: listed caches are alive (contract of `link`); their
            // links change only under the registry lock, which the `&mut`
            // to this slot proves we hold.
            unsafe { (*self.caches).prev.set(cache) };
        }
        self.caches = cache;
    }

    /// # Safety
    /// `cache` is on this slot's list.
    unsafe fn unlink(&mut self, cache: &ThreadCache) {
        let (prev, next) = (cache.prev.get(), cache.next.get());
        // SAFETY: neighbours are alive list members; we hold the lock.
        unsafe {
            if prev.is_null() {
                self.caches = next;
            } else {
                (*prev).next.set(next);
            }
            if !next.is_null() {
                (*next).prev.set(prev);
            }
        }
    }
}

/// What a cache needs of the allocator it serves: the front implements it,
/// so that this layer does not name the front.
pub(crate) trait CacheOwner {
    /// Where large objects and arenas come from.
    type Backing: Backing;
    /// The id caches bind to (from [`register`]); 0 if it has none yet,
    /// [`UNCACHED`] if it never will.
    fn cache_id(&self) -> usize;
    /// The allocator's heaps, made now if this is their first use; null when
    /// the backing has no memory for them.
    fn heap_set(&self) -> *const HeapSet;
    /// The allocator's backing.
    fn backing(&self) -> &Self::Backing;
}

/// One class's list.
struct List {
    head: Cell<*mut FreeBlock>,
    /// Its length: written by the owning thread only, read by statistics.
    len: AtomicUsize,
    /// Blocks it holds before half of them go back: `capacity(class)`,
    /// or more once it has grown.
    cap: Cell<usize>,
    /// Whether it sent blocks back since its last refill.
    flushed: Cell<bool>,
}

/// A thread's cache.
pub(crate) struct ThreadCache {
    /// Id of the allocator the lists hold blocks of, or `NO_OWNER`.
    owner: Cell<usize>,
    set: Cell<*const HeapSet>,
    /// `GENERATION` when the owner was last seen alive.
    seen: Cell<usize>,
    /// The heap refills and flushes try first.
    home: Cell<usize>,
    /// Bytes requested through this cache, minus bytes freed through it
    /// (wrapping: only the sum over all counters is meaningful).
    requested: AtomicUsize,
    lists: [List; ALL_CLASS_COUNT],
    /// Neighbours in the owner's registry slot; changed only under the
    /// registry lock.
    prev: Cell<*const ThreadCache>,
    next: Cell<*const ThreadCache>,
    /// Arenas this thread's flushes let go since its last refill (see
    /// `flush_over_capacity`).
    released: Cell<usize>,
    /// Bytes the lists have grown by (see `grow`).
    grown: Cell<usize>,
    /// While the cache is straight (see `go_straight`), the frees left
    /// before it caches again unless one lets an arena go; 0 while it
    /// caches. Read by statistics: a straight cache holds nothing.
    straight: AtomicUsize,
}

impl ThreadCache {
    const fn new() -> Self {
        ThreadCache {
            owner: Cell::new(NO_OWNER),
            set: Cell::new(ptr::null()),
            seen: Cell::new(0),
            home: Cell::new(0),
            requested: AtomicUsize::new(0),
            lists: Self::new_lists(),
            prev: Cell::new(ptr::null()),
            next: Cell::new(ptr::null()),
            released: Cell::new(0),
            grown: Cell::new(0),
            straight: AtomicUsize::new(0),
        }
    }

    const fn new_lists() -> [List; ALL_CLASS_COUNT] {
        let mut lists = [const {
            List {
                head: Cell::new(ptr::null_mut()),
                len: AtomicUsize::new(0),
                cap: Cell::new(0),
                flushed: Cell::new(false),
            }
        }; ALL_CLASS_COUNT];
        let mut class = 0;
        while class < ALL_CLASS_COUNT {
            lists[class].cap = Cell::new(CAPACITY[class]);
            class += 1;
        }
        lists
    }

    /// Takes every list back to its starting capacity.
    fn shrink(&self) {
        for (class, list) in self.lists.iter().enumerate() {
            list.cap.set(capacity(class));
            list.flushed.set(false);
        }
        self.grown.set(0);
    }

    /// Doubles the capacity of small `class`'s list if it sent blocks back
    /// since its last refill. When that would overspend the budget, every
    /// other list first goes back to its starting capacity, the blocks
    /// over it back to their heaps (see `trim`), and the list grows by
    /// what the budget has left: the budget goes to the lists of the
    /// program's phase now, not to those an earlier phase grew. (Spent by
    /// a churn of random classes, it left the JSON-like row after it with
    /// lists of 8 KiB.)
    fn grow(&self, alloc: &impl CacheOwner, class: usize) {
        let list = &self.lists[class];
        // A bounded backing's caches do not grow: `max_cache_bytes` is what
        // a region weighs.
        let budget = match alloc.backing().span_len() {
            None => GROWTH_BYTES,
            Some(_) => 0,
        };
        if !list.flushed.replace(false) || is_medium(class) || budget == 0 {
            return;
        }
        let size = class_size(class);
        if self.grown.get() + list.cap.get() * size > budget {
            self.trim(alloc, class);
        }
        let left = budget - self.grown.get();
        let more = list.cap.get().min(left / size);
        list.cap.set(list.cap.get() + more);
        self.grown.set(self.grown.get() + more * size);
    }

    /// Takes every list but `keep`'s back to its starting capacity,
    /// sending what a list holds over it back to its heap (down to half
    /// of it, as a flush does), so that the lists grown hold no more than
    /// the budget between them.
    fn trim(&self, alloc: &impl CacheOwner, keep: usize) {
        for (class, list) in self.lists.iter().enumerate() {
            let len = list.len.load(Ordering::Relaxed);
            if class != keep && len > capacity(class) {
                // The arenas this lets go count toward no drain: the
                // thread is allocating (this is its refill).
                self.flush(alloc, class, len - capacity(class) / 2);
            }
        }
        let kept = self.lists[keep].cap.get();
        self.shrink();
        self.lists[keep].cap.set(kept);
        self.grown.set((kept - capacity(keep)) * class_size(keep));
    }

    /// Whether the cache serves `alloc`, binding it if it serves no live
    /// allocator.
    #[inline]
    fn serves(&self, alloc: &impl CacheOwner) -> bool {
        let id = alloc.cache_id();
        // An allocator that is never cached is refused here: every one of
        // its calls comes this way.
        self.owner.get() == id || (id != UNCACHED && self.bind(alloc))
    }

    /// Whether the cache holds blocks of `alloc` now (binding nothing).
    #[inline(always)]
    fn bound_to(&self, alloc: &impl CacheOwner) -> bool {
        self.owner.get() == alloc.cache_id()
    }

    #[cold]
    fn bind(&self, alloc: &impl CacheOwner) -> bool {
        // An exiting thread whose cache was handed back stays on the shared
        // path without touching the registry lock on every call.
        if !exit::arm() {
            return false;
        }
        let set = alloc.heap_set();
        let id = alloc.cache_id();
        if set.is_null() || id == 0 || id == UNCACHED {
            return false;
        }
        if self.owner.get() != NO_OWNER && GENERATION.load(Ordering::Acquire) == self.seen.get() {
            // Still serving a live allocator.
            return false;
        }
        let mut registry = REGISTRY.lock();
        self.seen.set(GENERATION.load(Ordering::Relaxed));
        if self.owner.get() != NO_OWNER {
            if registry.is_live(self.owner.get()) {
                return false;
            }
            // The owner is gone and its arenas with it: forget the blocks
            // without touching them.
            self.forget();
        }
        let Some(slot) = registry.slot(id) else {
            return false;
        };
        self.owner.set(id);
        self.set.set(set);
        // SAFETY: `set` is the live set of `alloc`, borrowed for this call.
        let set = unsafe { &*set };
        self.home.set(set.next_home());
        // SAFETY: the cache lives in this thread's TLS until its destructor
        // unlinks it (or its owner, and with it the list, is gone).
        unsafe { slot.link(self) };
        true
    }

    fn forget(&self) {
        for list in &self.lists {
            list.head.set(ptr::null_mut());
            list.len.store(0, Ordering::Relaxed);
        }
        self.shrink();
        self.straight.store(0, Ordering::Relaxed);
        self.requested.store(0, Ordering::Relaxed);
        self.owner.set(NO_OWNER);
        self.set.set(ptr::null());
    }

    /// Puts freed `block` of `class` on its list, sending half the list
    /// back to the heap when it is over capacity.
    ///
    /// # Safety
    /// `block` is a live block of `alloc` of class `class`, freed once, and
    /// this cache serves `alloc`.
    #[inline(always)]
    unsafe fn push(&self, alloc: &impl CacheOwner, block: *mut u8, class: usize, requested: usize) {
        let list = &self.lists[class];
        let block = block.cast::<FreeBlock>();
        // SAFETY: the contract gives us the block: it can hold the link.
        unsafe { FreeBlock::set_cached_next(block, list.head.get()) };
        list.head.set(block);
        let len = list.len.load(Ordering::Relaxed) + 1;
        list.len.store(len, Ordering::Relaxed);
        self.add_requested(requested.wrapping_neg());
        if len > list.cap.get() {
            self.flush_over_capacity(alloc, class);
        }
    }

    /// Sends half of `class`'s full list back; then, if this thread's
    /// flushes have let more arenas go since its last refill than the
    /// backing keeps mapped, every cached block, and the cache goes
    /// straight. Such a thread is freeing far more than it allocates (a
    /// spike going away), and the blocks its lists hold are likely the
    /// last ones out in their arenas, which they would keep from the
    /// backing: after 400 MB of small and medium objects were freed in
    /// random order, 3,800 cached blocks kept 85 % of the peak resident
    /// (`benches/spike.rs`); drained but caching again, the 500 blocks
    /// freed after the last drain kept 42 %. Draining at every arena let
    /// go instead cost binary trees of depth 16, whose eight arenas come
    /// and go each round (and are kept by the backing), 10 % more
    /// instructions. The price of going straight: a document dropped
    /// every round (serde_json's real-crates row) passes 1.6 M of its
    /// 4.3 M frees on one by one, 6 % of its instructions.
    #[cold]
    fn flush_over_capacity(&self, alloc: &impl CacheOwner, class: usize) {
        let left = self.straight.load(Ordering::Relaxed);
        if left != 0 {
            let left = if self.pass_on(alloc, class) > 0 {
                STRAIGHT_FREES
            } else {
                left - 1
            };
            if left == 0 {
                self.cache_again();
            } else {
                self.straight.store(left, Ordering::Relaxed);
            }
            return;
        }
        let list = &self.lists[class];
        list.flushed.set(true);
        let len = list.len.load(Ordering::Relaxed);
        let released = self.released.get() + self.flush(alloc, class, len - list.cap.get() / 2);
        self.released.set(released);
        if released > RETAINED_ARENAS {
            self.drain(alloc);
            self.go_straight();
        }
    }

    /// Makes every free pass its block on to its heap, at no cost to the
    /// fast path: each empty list reads full, so the next push goes over
    /// capacity. Until the thread allocates, or `STRAIGHT_FREES` frees
    /// in a row let no arena go.
    fn go_straight(&self) {
        // The mark first, and last off in `cache_again`: statistics that
        // see it read no list.
        self.straight.store(STRAIGHT_FREES, Ordering::Relaxed);
        for list in &self.lists {
            list.len.store(list.cap.get(), Ordering::Relaxed);
        }
    }

    /// Passes the block just pushed on `class`'s list (straight, so
    /// otherwise empty) on to its heap, the list reading full again;
    /// returns how many arenas that let go if the heap is home (see
    /// `own_releases`). One block, the shared path's free: `flush` of one
    /// block cost 450 instructions, most of them sorting by heap:
    /// serde_json's row took 28 % more instructions.
    fn pass_on(&self, alloc: &impl CacheOwner, class: usize) -> usize {
        // SAFETY: the owner is alive, so its set is too.
        let set = unsafe { &*self.set.get() };
        let list = &self.lists[class];
        let block = list.head.get();
        // SAFETY: the block just pushed: free, ours, linked through its
        // first word.
        list.head.set(unsafe { FreeBlock::cached_next(block) });
        list.len.store(list.cap.get(), Ordering::Relaxed);
        // SAFETY: a live block of `set` of `class`, whose pool header is
        // initialised.
        let heap = unsafe { set.heap_of(block.cast(), class) };
        // The heap's free is inlined here: the two frames of
        // `HeapSet::free` and its `free_held`, each saving and restoring
        // registers, cost 30 of the 130-odd instructions of a straight free
        // (serde_json's child: 2.649 G instructions, 2.601 G so).
        // SAFETY: that block, given up by its user (its requested bytes
        // left this cache's count when it was pushed), freed to its heap;
        // `free_into_pools` with the same class and requested bytes, as
        // `free_then` asks.
        let released = unsafe {
            set.free_then(block.cast(), class, 0, alloc.backing(), |held, block| {
                HeapSet::free_into_pools(held, block, class, 0)
            })
        };
        self.own_releases(set, heap, released)
    }

    /// `released` arenas that heap `heap` let go, if it is this thread's
    /// home, else 0: only the home heap's count toward a drain. (A
    /// consumer freeing another thread's blocks lets that thread's arenas
    /// go in a steady stream, not a spike of its own: counted, it sent the
    /// consumers of the cross-thread bench straight 21 times, every free
    /// then taking a lock.)
    fn own_releases(&self, set: &HeapSet, heap: usize, released: usize) -> usize {
        match set.place(heap) == set.place(self.home.get()) {
            true => released,
            false => 0,
        }
    }

    /// Ends `go_straight`: the lists, all empty, read so.
    fn cache_again(&self) {
        for list in &self.lists {
            list.len.store(0, Ordering::Relaxed);
        }
        self.straight.store(0, Ordering::Relaxed);
        self.released.set(0);
    }

    /// Gives every cached block back to its heap, the lists back to their
    /// starting capacities.
    fn drain(&self, alloc: &impl CacheOwner) {
        if self.straight.load(Ordering::Relaxed) != 0 {
            return;
        }
        for class in 0..ALL_CLASS_COUNT {
            let len = self.lists[class].len.load(Ordering::Relaxed);
            if len > 0 {
                self.flush(alloc, class, len);
            }
        }
        self.shrink();
    }

    /// Takes the newest block of `class`'s list, which is not empty,
    /// counting `requested` bytes.
    #[inline(always)]
    fn pop(&self, class: usize, requested: usize) -> *mut u8 {
        let list = &self.lists[class];
        let block = list.head.get();
        // SAFETY: a block on the list (not empty, per the contract): free,
        // ours, linked through its first word.
        list.head.set(unsafe { FreeBlock::cached_next(block) });
        list.len
            .store(list.len.load(Ordering::Relaxed) - 1, Ordering::Relaxed);
        self.add_requested(requested);
        block.cast()
    }

    #[inline]
    fn add_requested(&self, bytes: usize) {
        let requested = self.requested.load(Ordering::Relaxed);
        self.requested
            .store(requested.wrapping_add(bytes), Ordering::Relaxed);
    }

    /// Fills `class`'s empty list with half its capacity from a heap;
    /// false when the heap has no memory.
    #[cold]
    fn refill(&self, alloc: &impl CacheOwner, class: usize) -> bool {
        if self.straight.load(Ordering::Relaxed) != 0 {
            self.cache_again();
        } else {
            self.released.set(0);
        }
        // SAFETY: the owner is alive (`alloc` is it), so its set is too.
        let set = unsafe { &*self.set.get() };
        set.tend(alloc.backing());
        // Before the heap is held: growing may flush other lists.
        self.grow(alloc, class);
        let mut held = set.hold(class, self.home.get(), alloc.backing());
        self.home.set(held.index());
        let list = &self.lists[class];
        let mut batch = Batch::new();
        let got = held.alloc_batch(class, list.cap.get() / 2, &mut batch, alloc.backing());
        if got > 0 {
            // SAFETY: the batch's last block is ours to link.
            unsafe { FreeBlock::set_cached_next(batch.last, list.head.get()) };
            list.head.set(batch.first);
        }
        list.len
            .store(list.len.load(Ordering::Relaxed) + got, Ordering::Relaxed);
        got > 0
    }

    /// Gives the `count` newest blocks of `class`'s list back to their
    /// heaps (the newest, not the oldest: finding the oldest would mean
    /// walking past the blocks that stay); returns how many arenas the
    /// heap they went to let go meanwhile if it is this thread's home
    /// (see `own_releases`).
    #[cold]
    fn flush(&self, alloc: &impl CacheOwner, class: usize, count: usize) -> usize {
        // SAFETY: the owner is alive, so its set is too.
        let set = unsafe { &*self.set.get() };
        let list = &self.lists[class];
        // The heap of the newest block, if it is free: blocks freed in a
        // run mostly share a heap, and when that is another thread's (a
        // consumer freeing a producer's blocks) they go straight back to
        // their pools instead of through its inbox.
        // SAFETY: the list holds `count > 0` live blocks of `set`, whose
        // pool headers are initialised.
        let newest = unsafe { set.heap_of(list.head.get().cast(), class) };
        let mut held = match set.try_hold(newest, alloc.backing()) {
            Some(held) => held,
            None => set.hold(class, self.home.get(), alloc.backing()),
        };
        let here = held.index();
        let let_go = held.arenas_let_go();
        // SAFETY: the list's blocks are live blocks of `set`, given up by
        // their users and linked only here; those of the held heap go
        // straight back to it.
        let (chains, rest) = unsafe {
            Chains::sort(set, class, list.head.get(), count, |heap, block| {
                heap == here && {
                    held.free(block.cast(), alloc.backing());
                    true
                }
            })
        };
        list.head.set(rest);
        list.len
            .store(list.len.load(Ordering::Relaxed) - count, Ordering::Relaxed);
        let released = self.own_releases(set, here, held.arenas_let_go() - let_go);
        drop(held);
        for heap in chains.push(set) {
            set.after_push(heap, alloc.backing());
        }
        set.tend(alloc.backing());
        released
    }
}

/// Blocks of one class bound for other heaps' inboxes, one chain per heap
/// of the class's group (`base` its first slot).
struct Chains {
    base: usize,
    chains: [(*mut FreeBlock, *mut FreeBlock); MAX_HEAPS],
}

impl Chains {
    /// Sorts the first `count` blocks of `class` of the list starting at `block` (all
    /// of them if it is shorter): those that `free_here` takes (given their
    /// heap index) are gone, the others are chained by heap. Returns the
    /// chains and the rest of the list.
    ///
    /// # Safety
    /// The list's blocks are live blocks of `set`, given up by their users
    /// and linked nowhere else.
    unsafe fn sort(
        set: &HeapSet,
        class: usize,
        mut block: *mut FreeBlock,
        count: usize,
        mut free_here: impl FnMut(usize, *mut FreeBlock) -> bool,
    ) -> (Chains, *mut FreeBlock) {
        let mut chains = Chains {
            base: set.group(class),
            chains: [(ptr::null_mut(), ptr::null_mut()); MAX_HEAPS],
        };
        let pool_size = set.pool_size_of(class);
        for _ in 0..count {
            if block.is_null() {
                break;
            }
            // SAFETY: per the contract `block` is a live block of `set`, so
            // its pool is initialised; and it is ours to relink.
            unsafe {
                let next = FreeBlock::cached_next(block);
                let heap = heap_in(block.cast(), pool_size);
                if !free_here(heap, block) {
                    let (first, last) = &mut chains.chains[heap - chains.base];
                    FreeBlock::set_cached_next(block, *first);
                    if last.is_null() {
                        *last = block;
                    }
                    *first = block;
                }
                block = next;
            }
        }
        (chains, block)
    }

    /// Pushes each chain onto its heap's inbox; returns the heaps pushed to.
    fn push(self, set: &HeapSet) -> impl Iterator<Item = usize> + '_ {
        let base = self.base;
        self.chains
            .into_iter()
            .take(set.heaps())
            .enumerate()
            .filter(|(_, (first, _))| !first.is_null())
            .map(move |(i, (first, last))| {
                let heap = base + i;
                // SAFETY: a chain built by `sort` from blocks given to it
                // under its contract, all of heap `heap`.
                unsafe { set.push_remote(heap, first, last) };
                heap
            })
    }
}

impl ThreadCache {
    /// Thread exit: hands every block back (see the module documentation)
    /// and unbinds, for good: `exit` serves this thread no cache any more.
    fn retire(&self) {
        if self.owner.get() == NO_OWNER {
            return;
        }
        let mut registry = REGISTRY.lock();
        let Some(slot) = registry.slot(self.owner.get()) else {
            self.forget();
            return;
        };
        // SAFETY: the owner is registered, and cannot leave the registry
        // (and so cannot free its set) while we hold the registry lock.
        let set = unsafe { &*self.set.get() };
        for (class, list) in self.lists.iter().enumerate() {
            let chain = list.head.replace(ptr::null_mut());
            list.len.store(0, Ordering::Relaxed);
            // SAFETY: cached blocks are live blocks of `set`, given up by
            // their users. All go to inboxes: we have no backing to free into.
            let (chains, _) = unsafe { Chains::sort(set, class, chain, usize::MAX, |_, _| false) };
            chains.push(set).for_each(drop);
        }
        set.requested
            .fetch_add(self.requested.load(Ordering::Relaxed), Ordering::Relaxed);
        // SAFETY: linked into the owner's slot when bound.
        unsafe { slot.unlink(self) };
        self.forget();
        drop(registry);
    }
}

/// Allocates a block of `class` from the calling thread's cache for
/// `alloc`: `None` when the cache cannot serve `alloc` (it serves another
/// allocator, or the thread is exiting), `Some(null)` when memory ran out.
#[inline]
pub(crate) fn alloc(alloc: &impl CacheOwner, class: usize, requested: usize) -> Option<*mut u8> {
    exit::with(|cache| {
        if !cache.serves(alloc) {
            return None;
        }
        if cache.lists[class].head.get().is_null() && !cache.refill(alloc, class) {
            return Some(ptr::null_mut());
        }
        Some(cache.pop(class, requested))
    })
    .flatten()
}

/// The fast half of [`alloc`]: a block from a cache that is already bound
/// to `alloc` and holds one of `class`; `None` otherwise, with nothing
/// done, for the caller's out-of-line call to `alloc`. It calls nothing,
/// so the inlined path that uses it saves no registers.
#[inline(always)]
pub(crate) fn pop(alloc: &impl CacheOwner, class: usize, requested: usize) -> Option<*mut u8> {
    exit::with_made(|cache| {
        let ready = cache.bound_to(alloc) && !cache.lists[class].head.get().is_null();
        ready.then(|| cache.pop(class, requested))
    })
    .flatten()
}

/// Counts `delta` (wrapping) more bytes requested in the calling thread's
/// cache for `alloc`, as a block resized within its class changes them;
/// false, with nothing done, when no cache is bound to `alloc`. Counted
/// apart, each thread in its own cache line: a shared counter had every
/// such realloc of two threads wait for the other's line.
#[inline(always)]
pub(crate) fn add_requested(alloc: &impl CacheOwner, delta: usize) -> bool {
    exit::with_made(|cache| {
        let bound = cache.bound_to(alloc);
        if bound {
            cache.add_requested(delta);
        }
        bound
    })
    .unwrap_or(false)
}

/// Frees `block` of `class` into the calling thread's cache for `alloc`;
/// false when the cache cannot take it (the caller frees it to its heap).
/// Unless `may_bind`, only a cache bound to `alloc` already takes it: the
/// inlined fast path leaves binding to its out-of-line call.
///
/// # Safety
/// `block` is a live block of `alloc` of class `class`, freed once.
#[inline(always)]
pub(crate) unsafe fn free(
    alloc: &impl CacheOwner,
    block: *mut u8,
    class: usize,
    requested: usize,
    may_bind: bool,
) -> bool {
    let push = |cache: &ThreadCache| {
        let serves = if may_bind {
            cache.serves(alloc)
        } else {
            cache.bound_to(alloc)
        };
        serves && {
            // SAFETY: forwarded contract; the cache serves `alloc`.
            unsafe { cache.push(alloc, block, class, requested) };
            true
        }
    };
    if may_bind {
        exit::with(push)
    } else {
        exit::with_made(push)
    }
    .unwrap_or(false)
}

/// Gives every block the calling thread caches for `alloc` back to its heap.
pub(crate) fn flush_all(alloc: &impl CacheOwner) {
    exit::with(|cache| {
        if cache.bound_to(alloc) {
            cache.drain(alloc);
        }
    });
}

/// Moves the blocks the caches bound to allocator `id` hold from "in use"
/// to "free" in `stats`, and adds the bytes requested through them and
/// through `set` (the allocator's heaps) outside any heap. Both under the
/// registry lock: a cache retiring at thread exit moves its count to
/// `set` under that lock, so it is counted once, in one place or the
/// other (read apart, an exit in between lost it).
pub(crate) fn gather(id: usize, set: &HeapSet, stats: &mut Stats) {
    let mut registry = REGISTRY.lock();
    stats.requested_bytes = stats
        .requested_bytes
        .wrapping_add(set.requested.load(Ordering::Relaxed));
    let Some(slot) = registry.slot(id) else {
        return;
    };
    let mut cache = slot.caches;
    while !cache.is_null() {
        // SAFETY: listed caches are alive while linked, and we hold the
        // lock; only their atomics are read, which their threads write.
        let c = unsafe { &*cache };
        // A straight cache's lists are empty, whatever they read.
        let lists = if c.straight.load(Ordering::Relaxed) == 0 {
            &c.lists[..]
        } else {
            &[]
        };
        for (class, list) in lists.iter().enumerate() {
            let cached = list.len.load(Ordering::Relaxed);
            let entry = &mut stats.classes[class];
            // Saturating: a cache may have changed since its heap was read.
            entry.blocks_in_use = entry.blocks_in_use.saturating_sub(cached);
            entry.blocks_free += cached;
            stats.cached_blocks += cached;
        }
        stats.requested_bytes = stats
            .requested_bytes
            .wrapping_add(c.requested.load(Ordering::Relaxed));
        cache = c.next.get();
    }
}

/// Takes the registry's lock for a fork (see `fork.rs`).
#[cfg(fork_handlers)]
pub(crate) fn registry_lock_across_fork() {
    REGISTRY.lock_across_fork();
}

/// Releases what `registry_lock_across_fork` took.
///
/// # Safety
/// As for `Lock::release_after_fork`.
#[cfg(fork_handlers)]
pub(crate) unsafe fn registry_release_after_fork() {
    // SAFETY: forwarded contract.
    unsafe { REGISTRY.release_after_fork() }
}

/// In the child of a fork: every bound cache but the calling thread's
/// belongs to a thread the child does not have. They leave their lists and
/// are never touched again, their blocks stay in use (leaked, as glibc
/// leaks dead threads' tcaches), and the bytes requested through them move
/// to their allocator's count.
#[cfg(fork_handlers)]
pub(crate) fn keep_only_this_thread() {
    // The calling thread's cache, null if it has none.
    let me = exit::current();
    let mut registry = REGISTRY.lock();
    for slot in registry.slots.iter_mut().filter(|slot| slot.id != 0) {
        let mut cache = core::mem::replace(&mut slot.caches, ptr::null());
        while !cache.is_null() {
            // The child has no other thread, so nothing has reused the
            // copied memory of the caches listed at the fork, and the
            // registry lock held across it kept their links consistent.
            // SAFETY: so `cache` is readable; only links and atomics are.
            let c = unsafe { &*cache };
            cache = c.next.get();
            if ptr::eq(c, me) {
                c.prev.set(ptr::null());
                c.next.set(ptr::null());
                slot.caches = me;
            } else {
                // SAFETY: a bound cache's set is its live owner's (the
                // owner is registered: this slot).
                unsafe { &*c.set.get() }
                    .requested
                    .fetch_add(c.requested.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }
}

/// Where the calling thread's cache lives and how it is handed back at
/// thread exit, per `thread_exit` (chosen in `build.rs`). Every variant
/// keeps the thread locals `const`-initialised with no destructor of their
/// own, so touching them registers nothing and allocates nothing.
///
/// * `with` runs a closure on the thread's cache; `None`
///   once the thread has handed its cache back (or cannot have one).
/// * `with_made`: as `with`, but `None` too if the thread has not made its
///   cache yet, for the inlined free path, which leaves making it to its
///   out-of-line call (a free seldom comes before the thread's first
///   allocation).
/// * `arm`, at binding: whether the exit hook will run (false:
///   the thread is past it).
/// * `current`: the thread's cache, null if it has none.
#[cfg(thread_exit = "tls_destructor")]
mod exit {
    use super::ThreadCache;

    std::thread_local! {
        /// No destructor, so no state to check on each access: the fast
        /// path is one thread-pointer-relative address.
        static CACHE: ThreadCache = const { ThreadCache::new() };
        /// Registered by its first access, in `arm`; its destructor hands
        /// the cache back at thread exit. Once it has run, `try_with` fails
        /// and the cache never binds again.
        static EXIT: ExitGuard = const { ExitGuard };
    }

    /// Hands the thread's cache back when the thread exits.
    struct ExitGuard;

    impl Drop for ExitGuard {
        fn drop(&mut self) {
            CACHE.with(ThreadCache::retire);
        }
    }

    #[inline]
    pub(super) fn with<R>(f: impl FnOnce(&ThreadCache) -> R) -> Option<R> {
        // `try_with`, not `with`: it inlines. (It cannot fail: the cache
        // has no destructor.)
        CACHE.try_with(f).ok()
    }

    /// Here the cache is made with the thread: as `with`.
    #[inline]
    pub(super) fn with_made<R>(f: impl FnOnce(&ThreadCache) -> R) -> Option<R> {
        with(f)
    }

    pub(super) fn arm() -> bool {
        EXIT.try_with(|_| ()).is_ok()
    }

    #[cfg(fork_handlers)]
    pub(super) fn current() -> *const ThreadCache {
        CACHE.with(|cache| cache as *const ThreadCache)
    }
}

/// The cache is a block from `System` (the C library's allocator, which
/// never calls the global allocator), made at the thread's first small
/// allocation; a thread local holds its address, and so does a
/// thread-exit hook (a pthread key, or FLS on Windows) whose callback gets
/// that address as its argument and so reads no TLS to find the cache:
/// macOS frees TLV blocks in key destructors that may run before ours.
#[cfg(any(thread_exit = "pthread_key", thread_exit = "fls"))]
mod exit {
    use super::super::sync::{AtomicUsize, Ordering};
    use super::ThreadCache;
    use core::cell::Cell;
    use core::ffi::c_void;
    use core::ptr;
    use std::alloc::{GlobalAlloc, Layout, System};

    std::thread_local! {
        /// The thread's cache; null before the first use and after exit.
        static SLOT: Cell<*const ThreadCache> = const { Cell::new(ptr::null()) };
        /// Set once the cache is handed back (or could not be made): later
        /// calls, from destructors that run after ours, take the shared
        /// path rather than make a cache no hook would hand back.
        static GONE: Cell<bool> = const { Cell::new(false) };
    }

    /// The process's key, plus one; 0 before the first cache, `FAILED` if
    /// the platform had no key to give.
    static KEY: AtomicUsize = AtomicUsize::new(0);
    const FAILED: usize = usize::MAX;

    #[inline]
    pub(super) fn with<R>(f: impl FnOnce(&ThreadCache) -> R) -> Option<R> {
        let mut cache = SLOT.get();
        if cache.is_null() {
            cache = adopt()?;
        }
        // SAFETY: a non-null slot holds this thread's cache, made by `adopt`
        // and freed only by the exit hook, which clears the slot first.
        Some(f(unsafe { &*cache }))
    }

    #[inline]
    pub(super) fn with_made<R>(f: impl FnOnce(&ThreadCache) -> R) -> Option<R> {
        let cache = SLOT.get();
        // SAFETY: as in `with`.
        (!cache.is_null()).then(|| f(unsafe { &*cache }))
    }

    /// The hook was armed when the cache was made.
    pub(super) fn arm() -> bool {
        true
    }

    #[cfg(fork_handlers)]
    pub(super) fn current() -> *const ThreadCache {
        SLOT.get()
    }

    /// Makes the thread's cache and arms the hook that hands it back; `None`
    /// if the thread is past its hook, or the key or memory is missing (the
    /// thread then stays on the shared path).
    #[cold]
    fn adopt() -> Option<*const ThreadCache> {
        if GONE.get() {
            return None;
        }
        let cache = key().and_then(|key| {
            // SAFETY: a non-zero size.
            let cache = unsafe { System.alloc(Layout::new::<ThreadCache>()) }.cast::<ThreadCache>();
            if cache.is_null() {
                return None;
            }
            // SAFETY: fresh memory of the cache's layout.
            unsafe { cache.write(ThreadCache::new()) };
            if os::set(key, cache.cast()) {
                Some(cache.cast_const())
            } else {
                // SAFETY: allocated just above, never shared.
                unsafe { System.dealloc(cache.cast(), Layout::new::<ThreadCache>()) };
                None
            }
        });
        match cache {
            Some(cache) => SLOT.set(cache),
            None => GONE.set(true),
        }
        cache
    }

    /// The process's key, made by the first thread that needs it.
    fn key() -> Option<usize> {
        let key = KEY.load(Ordering::Acquire);
        if key != 0 {
            return (key != FAILED).then(|| key - 1);
        }
        let made = os::create().map_or(FAILED, |key| key + 1);
        match KEY.compare_exchange(0, made, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => (made != FAILED).then(|| made - 1),
            Err(winner) => {
                if made != FAILED {
                    os::delete(made - 1);
                }
                (winner != FAILED).then(|| winner - 1)
            }
        }
    }

    /// The hook: hands back the thread's cache `value` and frees it.
    ///
    /// # Safety
    /// `value` is a cache `adopt` made and armed, run once per arming.
    unsafe fn on_exit(value: *mut c_void) {
        let cache = value.cast::<ThreadCache>();
        #[cfg(thread_exit = "fls")]
        if SLOT.get() != cache.cast_const() {
            // Windows also runs FLS callbacks when a fiber is deleted, from
            // whichever thread deletes it: if this is not that thread's
            // cache, its thread may still be using it. Leave it (and its
            // blocks) be.
            return;
        }
        // SAFETY: per the contract, a live cache made by `adopt`; its
        // thread is exiting (or, with fibers, is this one).
        unsafe { (*cache).retire() };
        // `GONE` too: a destructor run after this one must not make a new
        // cache, which no hook would hand back.
        SLOT.set(ptr::null());
        GONE.set(true);
        // SAFETY: made by `adopt` with this layout; unlinked from the
        // registry by `retire`, and no longer in the slot.
        unsafe { System.dealloc(cache.cast(), Layout::new::<ThreadCache>()) };
    }

    /// POSIX thread-specific data: a key whose destructor runs at thread
    /// exit for each thread that set a non-null value, in the exiting
    /// thread. The value is cleared before the call and never set again
    /// (`GONE`), so the destructor runs once per thread whatever
    /// `PTHREAD_DESTRUCTOR_ITERATIONS` is.
    #[cfg(thread_exit = "pthread_key")]
    mod os {
        use core::ffi::{c_int, c_void};

        #[cfg(target_vendor = "apple")]
        type Key = core::ffi::c_ulong;
        #[cfg(target_os = "freebsd")]
        type Key = c_int;
        #[cfg(not(any(target_vendor = "apple", target_os = "freebsd")))]
        type Key = core::ffi::c_uint;

        extern "C" {
            fn pthread_key_create(
                key: *mut Key,
                destructor: Option<unsafe extern "C" fn(*mut c_void)>,
            ) -> c_int;
            fn pthread_key_delete(key: Key) -> c_int;
            fn pthread_setspecific(key: Key, value: *const c_void) -> c_int;
        }

        unsafe extern "C" fn destructor(value: *mut c_void) {
            // SAFETY: the key's values are caches `adopt` armed; the C
            // library runs this once per value, in the value's thread.
            unsafe { super::on_exit(value) }
        }

        pub(super) fn create() -> Option<usize> {
            let mut key: Key = 0;
            // SAFETY: `key` is writable; the destructor never unwinds and
            // lives as long as the program.
            (unsafe { pthread_key_create(&mut key, Some(destructor)) } == 0).then_some(key as usize)
        }

        pub(super) fn delete(key: usize) {
            // SAFETY: a key `create` made, which no thread has set.
            unsafe { pthread_key_delete(key as Key) };
        }

        pub(super) fn set(key: usize, value: *const c_void) -> bool {
            // SAFETY: a key `create` made.
            unsafe { pthread_setspecific(key as Key, value) == 0 }
        }
    }

    /// Fiber-local storage: a callback that runs at thread exit (and when
    /// a fiber, or the index, is freed) for each non-null value.
    #[cfg(thread_exit = "fls")]
    mod os {
        use core::ffi::c_void;

        /// `FlsAlloc`'s failure.
        const FLS_OUT_OF_INDEXES: u32 = u32::MAX;

        #[link(name = "kernel32")]
        extern "system" {
            fn FlsAlloc(callback: Option<unsafe extern "system" fn(*mut c_void)>) -> u32;
            fn FlsFree(index: u32) -> i32;
            fn FlsSetValue(index: u32, value: *const c_void) -> i32;
        }

        unsafe extern "system" fn callback(value: *mut c_void) {
            // SAFETY: the index's values are caches `adopt` armed; Windows
            // runs this once per value (`on_exit` checks the thread).
            unsafe { super::on_exit(value) }
        }

        pub(super) fn create() -> Option<usize> {
            // SAFETY: the callback never unwinds and lives as long as the
            // program.
            let index = unsafe { FlsAlloc(Some(callback)) };
            (index != FLS_OUT_OF_INDEXES).then_some(index as usize)
        }

        pub(super) fn delete(key: usize) {
            // SAFETY: an index `create` made, which no thread has set.
            unsafe { FlsFree(key as u32) };
        }

        pub(super) fn set(key: usize, value: *const c_void) -> bool {
            // SAFETY: an index `create` made.
            unsafe { FlsSetValue(key as u32, value) != 0 }
        }
    }
}
