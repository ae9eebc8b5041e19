//! Several heaps, chosen without thread-local storage, and frees from
//! threads that do not hold a block's heap.
//!
//! An allocator holds `Config::heaps()` independent [`Heap`]s, each behind
//! its own lock, in one block taken from its backing on first use (a
//! [`HeapSet`]). The set never moves, even when the `PyMalloc` value does,
//! so that thread caches and remote frees can refer to it by address.
//!
//! * **Choosing a heap.** A thread starts from a hint (its thread cache's
//!   home heap, or a hash of its stack address where there is no
//!   thread-local storage), takes that heap with a try-lock, and moves on to
//!   the next heap when the lock is taken: two threads rarely wait on one
//!   lock while another heap is free. Only when every heap is taken does it
//!   wait, on the hinted one.
//! * **Remote frees.** A block belongs to the heap that carved its pool
//!   (`Pool::heap`). A thread that frees it without holding that heap, and
//!   cannot take it at once, pushes it onto the heap's *inbox*, a lock-free
//!   stack (one compare-and-swap per push, or per chain of blocks). Whoever
//!   next takes the heap empties the inbox in one swap and frees the blocks
//!   in a batch; taking the whole stack at once is what makes the
//!   Treiber stack safe from ABA without tags.
//! * **Nothing left behind.** A holder, after unlocking, looks at its inbox
//!   once more and takes the heap again if a push arrived meanwhile; a pusher
//!   that found the heap locked tries it once more after pushing. With a
//!   sequentially consistent fence on both sides, one of the two always sees
//!   the other, so whenever no thread holds a heap its inbox is empty: an
//!   arena whose last blocks were freed remotely still goes back to the
//!   backing. (Thread exit is the one exception: a dying thread's cache has
//!   no backing to free into, so it only pushes; the next holder, or
//!   `stats()`, reclaims those blocks.)

use super::arena::CHUNK_BYTES;
use super::backing::{Backing, Region, REGION_ALIGN};
use super::config::{
    Config, MAX_ARENA_POOLS, MAX_HEAPS, MAX_POOL_LIMIT, MEDIUM_ARENA_RUNS, MEDIUM_RUN_SIZE,
    MIN_POOL_SIZE,
};
use super::heap::{ArenaCounts, Heap};
use super::pool::{pool_of, FreeBlock};
use super::size_class::is_medium;
use super::sync::{fence, AtomicPtr, AtomicUsize, Lock, Ordering, RawGuard};
use core::alloc::Layout;
use core::mem::{align_of, size_of, ManuallyDrop};
use core::ops::{Deref, DerefMut};
use core::ptr;

/// One heap and its inbox, alone on its cache lines so that threads working
/// in neighbouring heaps do not slow each other down.
#[repr(align(128))]
pub(crate) struct Slot {
    heap: Lock<Heap>,
    /// Blocks of this heap freed by threads that did not hold it.
    inbox: AtomicPtr<FreeBlock>,
}

/// Most slots a set holds: `MAX_HEAPS` small heaps and as many of the
/// medium tier.
const MAX_SLOTS: usize = 2 * MAX_HEAPS;

/// The heaps of one allocator, followed in memory by their [`Slot`]s:
/// `config.heaps()` small heaps, then (with the medium tier) as many
/// medium ones, whose pools are the tier's runs. Two groups of the same
/// `Heap` rather than one heap of two kinds of arena: every layer above
/// (locks, inboxes, caches) works on slots and stays as it is, and a
/// class names its group.
pub(crate) struct HeapSet {
    config: Config,
    /// Slots in all: `config.heaps()`, doubled with the medium tier.
    slots: usize,
    /// Where the next thread cache makes its home.
    #[cfg(thread_cache)]
    next_home: AtomicUsize,
    /// Requested bytes no heap's lock was held for: freed through an inbox,
    /// resized in place, or left by caches gone with their threads.
    /// Wrapping: only its sum with the heaps' and caches' counts means
    /// anything.
    pub(crate) requested: AtomicUsize,
    /// Spare and retired arenas of its small heaps: at most
    /// `MAX_SPARE_ARENAS` spares in all (see `heap.rs`).
    small_arenas: ArenaCounts,
    /// The same for the medium heaps' arenas: a spare of each kind, so
    /// that a loop across a boundary of either does not map and unmap.
    medium_arenas: ArenaCounts,
    /// When `tend` last swept the heaps for retired arenas past their
    /// delay, on the backing's clock.
    swept_at: AtomicUsize,
    /// Its place among all sets, for the fork handlers.
    #[cfg(fork_handlers)]
    pub(crate) fork: SetLinks,
}

/// A held heap: derefs to the [`Heap`]; on drop, unlocks and takes the heap
/// again if blocks reached its inbox meanwhile.
pub(crate) struct Held<'a, B: Backing> {
    /// The proof of holding `slot.heap`, given back in `drop` before the
    /// last look at the inbox. It has no size with the spin lock, so
    /// without thread caches a held heap is two words, passed in
    /// registers: the locked paths hand it to their out-of-line rest by
    /// tail call and keep no frame.
    guard: ManuallyDrop<RawGuard<'a, Heap>>,
    slot: &'a Slot,
    #[cfg(any(thread_cache, all(test, loom)))]
    index: usize,
    backing: &'a B,
}

/// Runs in an arena of the medium tier over a backing of `span` bytes
/// (`None`: unbounded): [`MEDIUM_ARENA_RUNS`], or in a region as many as
/// make a 64th of it, at least one. In a region an arena is memory the
/// store's other blocks cannot have until every run in it is empty; a 64th
/// is the share a thread cache may hold there too.
const fn medium_arena_runs(span: Option<usize>) -> usize {
    let Some(span) = span else {
        return MEDIUM_ARENA_RUNS;
    };
    let runs = span / 64 / MEDIUM_RUN_SIZE;
    if runs == 0 {
        1
    } else if runs > MEDIUM_ARENA_RUNS {
        MEDIUM_ARENA_RUNS
    } else {
        runs
    }
}

impl HeapSet {
    /// Where the slots start: after the header, padded to a slot's
    /// alignment.
    const SLOTS_OFFSET: usize = size_of::<HeapSet>().next_multiple_of(align_of::<Slot>());

    /// Bytes of a set of `count` heaps: the header, then the slots.
    const fn size(count: usize) -> usize {
        Self::SLOTS_OFFSET + count * size_of::<Slot>()
    }

    /// The layout of a set of `count` heaps (at most `MAX_HEAPS`).
    fn layout(count: usize) -> Layout {
        debug_assert!(count <= MAX_SLOTS);
        // SAFETY: a type's alignment is a power of two, and the size of the
        // largest set is far below `isize::MAX` (asserted below the impl).
        unsafe { Layout::from_size_align_unchecked(Self::size(count), align_of::<Slot>()) }
    }

    /// A new set of `config.heaps()` empty heaps in memory from `backing`,
    /// and as many medium ones if the tier is on, the small ones `shelved`
    /// (see `shelf.rs`: for an allocator no thread cache will serve);
    /// null when the backing has none.
    pub(crate) fn create<B: Backing>(config: Config, backing: &B, shelved: bool) -> *mut HeapSet {
        let medium = config.medium_tier();
        let slots = config.heaps() * (1 + medium as usize);
        let set = backing.alloc(Self::layout(slots)).cast::<HeapSet>();
        if set.is_null() {
            return set;
        }
        // SAFETY: `set` is a fresh block of `layout`: room and alignment for
        // the header and, at `SLOTS_OFFSET`, `count` slots.
        unsafe {
            set.write(HeapSet {
                config,
                slots,
                #[cfg(thread_cache)]
                next_home: AtomicUsize::new(0),
                requested: AtomicUsize::new(0),
                small_arenas: ArenaCounts::new(),
                medium_arenas: ArenaCounts::new(),
                swept_at: AtomicUsize::new(0),
                #[cfg(fork_handlers)]
                fork: SetLinks::new(),
            });
            let small_counts = &raw const (*set).small_arenas;
            let medium_counts = &raw const (*set).medium_arenas;
            let medium_config = Config::new(MEDIUM_RUN_SIZE, medium_arena_runs(backing.span_len()))
                .with_heaps(config.heaps())
                .with_release_delay_ms(config.release_delay_ms());
            let first = set.cast::<u8>().add(Self::SLOTS_OFFSET).cast::<Slot>();
            for index in 0..slots {
                let heap = match index < config.heaps() {
                    true if shelved => Heap::new(config, index, small_counts).with_shelf(),
                    true => Heap::new(config, index, small_counts),
                    false => Heap::new(medium_config, index, medium_counts).serving_medium(),
                };
                first.add(index).write(Slot {
                    heap: Lock::new(heap),
                    inbox: AtomicPtr::new(ptr::null_mut()),
                });
            }
        }
        // SAFETY: initialised above; `destroy` delists it.
        #[cfg(fork_handlers)]
        unsafe {
            enlist(set)
        };
        set
    }

    /// Gives every arena of every heap, and the set itself, back to
    /// `backing`.
    ///
    /// # Safety
    /// `set` came from `create` with this `backing`; no block of it, and
    /// no reference to it, is used again.
    pub(crate) unsafe fn destroy(set: *mut HeapSet, backing: &impl Backing) {
        // SAFETY: `create` enlisted it.
        #[cfg(fork_handlers)]
        unsafe {
            delist(set)
        };
        // SAFETY: per the contract the set is live and ours alone.
        unsafe {
            let count = (*set).count();
            for index in 0..count {
                let slot = (*set).slot(index);
                slot.heap.lock().release_all(backing);
                ptr::drop_in_place(ptr::from_ref(slot).cast_mut());
            }
            ptr::drop_in_place(set);
            backing.dealloc(set.cast(), Self::layout(count));
        }
    }

    /// Bytes a set of `heaps` heaps takes from a backing at most, padding
    /// to its alignment included.
    const fn max_bytes(heaps: usize) -> usize {
        Self::size(heaps) + align_of::<Slot>()
    }

    /// Bytes the set takes from the backing.
    pub(crate) fn bytes(&self) -> usize {
        Self::size(self.count())
    }

    /// How many heaps the set holds, small and medium.
    pub(crate) fn count(&self) -> usize {
        self.slots
    }

    /// Heaps in each group (small, and medium if the tier is on).
    #[inline]
    pub(crate) fn heaps(&self) -> usize {
        self.config.heaps()
    }

    /// The first slot of the group serving `class`.
    #[inline]
    pub(crate) fn group(&self, class: usize) -> usize {
        if is_medium(class) {
            self.config.heaps()
        } else {
            0
        }
    }

    /// The heap that owns live `block` of `class`, as its pool (or run)
    /// header says. With one heap a group the group names it: no read of
    /// the header, which misses the cache when the live blocks are many,
    /// and a lock taken next need not wait for it.
    ///
    /// # Safety
    /// `block` is a live block of this set of class `class`.
    #[inline]
    pub(crate) unsafe fn heap_of(&self, block: *mut u8, class: usize) -> usize {
        if self.config.heaps() == 1 {
            return self.group(class);
        }
        // SAFETY: forwarded contract.
        unsafe { heap_in(block, self.pool_size_of(class)) }
    }

    /// Bytes in a pool (or run) of `class`: blocks of it find their
    /// header by masking with it.
    #[inline]
    pub(crate) fn pool_size_of(&self, class: usize) -> usize {
        if is_medium(class) {
            MEDIUM_RUN_SIZE
        } else {
            self.config.pool_size()
        }
    }

    fn slot(&self, index: usize) -> &Slot {
        debug_assert!(index < self.count());
        // SAFETY: `create` wrote `count` slots at `SLOTS_OFFSET` after the
        // header, and they live as long as the set.
        unsafe {
            &*ptr::from_ref(self)
                .cast::<u8>()
                .add(Self::SLOTS_OFFSET)
                .cast::<Slot>()
                .add(index)
        }
    }

    /// Every heap's lock, for the fork handlers.
    #[cfg(fork_handlers)]
    pub(crate) fn heap_locks(&self) -> impl Iterator<Item = &Lock<Heap>> + '_ {
        (0..self.count()).map(|index| &self.slot(index).heap)
    }

    /// A home heap for a new thread cache: round robin, so that the first
    /// `count` threads each get their own.
    #[cfg(thread_cache)]
    pub(crate) fn next_home(&self) -> usize {
        self.next_home.fetch_add(1, Ordering::Relaxed) % self.config.heaps()
    }

    /// Takes a heap of the group serving `class`: the one `hint` names (a
    /// slot index of either group, so the same place in both, or a
    /// `stack_heap`) if it is free, else the first free one after it, else
    /// waits for the hinted one. The first try is inlined into the caller
    /// and the search is not: on the locked path the call, and the `Held`
    /// it returned through memory, cost an allocation about 25 of its 120
    /// instructions.
    #[inline(always)]
    pub(crate) fn hold<'a, B: Backing>(
        &'a self,
        class: usize,
        hint: usize,
        backing: &'a B,
    ) -> Held<'a, B> {
        let (count, base) = (self.config.heaps(), self.group(class));
        if count == 1 {
            // No search (small regions and firmware).
            return self.hold_exactly(base, backing);
        }
        let hint = self.place(hint);
        match self.try_hold(base + hint, backing) {
            Some(held) => held,
            None => self.hold_after(base, hint, backing),
        }
    }

    /// `hold` once the hinted heap (place `hint` of the group at `base`)
    /// was busy: the first free one after it, else waits for the hinted
    /// one. The search wraps by compare, not by division (two a call
    /// before: the locked path's alloc and free ran 4 % more
    /// instructions).
    #[inline(never)]
    fn hold_after<'a, B: Backing>(
        &'a self,
        base: usize,
        hint: usize,
        backing: &'a B,
    ) -> Held<'a, B> {
        let count = self.config.heaps();
        let mut place = hint;
        for _ in 1..count {
            place = if place + 1 == count { 0 } else { place + 1 };
            if let Some(held) = self.try_hold(base + place, backing) {
                return held;
            }
        }
        self.hold_exactly(base + hint, backing)
    }

    /// The place of slot `index` (of either group) in its group: the
    /// same number names the same place in both.
    #[inline]
    pub(crate) fn place(&self, index: usize) -> usize {
        let count = self.config.heaps();
        debug_assert!(index < 2 * count);
        if index < count {
            index
        } else {
            index - count
        }
    }

    /// The place in a group of the calling thread's heap when it has no
    /// cache: its `stack_hint` scaled to the group's size by a multiply
    /// and a shift (the hash's high bits, the well-mixed ones).
    #[inline]
    pub(crate) fn stack_heap(&self) -> usize {
        let count = self.config.heaps();
        if count == 1 {
            // `hold` needs no hint then: skip the hash.
            return 0;
        }
        ((u64::from(stack_hint()) * count as u64) >> 32) as usize
    }

    /// Waits for heap `index`.
    pub(crate) fn hold_exactly<'a, B: Backing>(
        &'a self,
        index: usize,
        backing: &'a B,
    ) -> Held<'a, B> {
        let slot = self.slot(index);
        let mut held = Held::new(slot.heap.lock_raw(), slot, index, backing);
        held.take_mail();
        held
    }

    /// Heap `index` if no one holds it now.
    pub(crate) fn try_hold<'a, B: Backing>(
        &'a self,
        index: usize,
        backing: &'a B,
    ) -> Option<Held<'a, B>> {
        let mut held = self.try_take(index, backing)?;
        held.take_mail();
        Some(held)
    }

    /// `try_hold` that leaves the inbox to the leave's look (which empties
    /// it too): the locked fast paths, which then call nothing.
    #[inline(always)]
    pub(crate) fn try_take<'a, B: Backing>(
        &'a self,
        index: usize,
        backing: &'a B,
    ) -> Option<Held<'a, B>> {
        let slot = self.slot(index);
        let guard = slot.heap.try_lock_raw()?;
        Some(Held::new(guard, slot, index, backing))
    }

    /// A block of `class` from whichever heap still has one, each heap
    /// waited for in turn (its inbox emptied on the way): the last resort
    /// before null, when the hinted heap had neither a free block nor an
    /// arena to carve one from.
    #[cold]
    pub(crate) fn alloc_from_any(&self, class: usize, backing: &impl Backing) -> *mut u8 {
        let base = self.group(class);
        (base..base + self.config.heaps())
            .map(|index| self.hold_exactly(index, backing).alloc(class, backing))
            .find(|block| !block.is_null())
            .unwrap_or(ptr::null_mut())
    }

    /// Gives every heap's spare and retired arenas back to the backing,
    /// inboxes and shelves emptied first (their blocks may be what keeps an
    /// arena from being free).
    #[cold]
    pub(crate) fn release_free_arenas(&self, backing: &impl Backing) {
        for index in 0..self.count() {
            let mut held = self.hold_exactly(index, backing);
            held.clear_shelf(backing);
            held.release_free_arenas(backing);
        }
    }

    /// Gives back the retired arenas of every heap that have waited out the
    /// release delay, at most once a delay, and only while some heap has
    /// retired arenas: called where a thread goes down to a heap anyway
    /// (a cache's refill or flush, a locked allocation's slow path), so
    /// that arenas of heaps no thread visits go back too.
    #[inline]
    pub(crate) fn tend(&self, backing: &impl Backing) {
        let retired = self.small_arenas.retired.load(Ordering::Relaxed)
            + self.medium_arenas.retired.load(Ordering::Relaxed);
        if retired != 0 {
            self.sweep(backing);
        }
    }

    #[cold]
    fn sweep(&self, backing: &impl Backing) {
        let Some(now) = backing.clock_ms() else {
            return;
        };
        let swept_at = self.swept_at.load(Ordering::Relaxed);
        if (now.wrapping_sub(swept_at as u32) as usize) < self.config.release_delay_ms() {
            return;
        }
        // One sweeper at a time; a loser finds the heaps swept.
        if self
            .swept_at
            .compare_exchange(swept_at, now as usize, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        for index in 0..self.count() {
            // A heap in use is left to its holder's next arena event, or
            // the next sweep.
            if let Some(mut held) = self.try_hold(index, backing) {
                held.release_expired(backing);
            }
        }
    }

    /// Sends the chain of free blocks `first..=last` (linked through
    /// `FreeBlock::next`), all of heap `index`, to that heap's inbox.
    ///
    /// # Safety
    /// The chain's blocks are out of heap `index`, freed by their owners,
    /// and linked nowhere else.
    pub(crate) unsafe fn push_remote(
        &self,
        index: usize,
        first: *mut FreeBlock,
        last: *mut FreeBlock,
    ) {
        let inbox = &self.slot(index).inbox;
        let mut head = inbox.load(Ordering::Relaxed);
        loop {
            // SAFETY: `last` is ours until the swap below publishes it.
            unsafe { FreeBlock::set_next(last, head) };
            // Release: the holder that takes the chain sees its links.
            match inbox.compare_exchange_weak(head, first, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(seen) => head = seen,
            }
        }
    }

    /// Frees `block` of `class` (`requested` bytes asked for) into its
    /// heap: directly if the heap is free, else through its inbox, then
    /// one more try so that the block is never left behind by a holder
    /// that was just leaving. Returns how many arenas the heap let go
    /// meanwhile when it was free (0 through the inbox).
    ///
    /// # Safety
    /// `block` is a live block of this set of class `class`, not freed
    /// since.
    pub(crate) unsafe fn free(
        &self,
        block: *mut u8,
        class: usize,
        requested: usize,
        backing: &impl Backing,
    ) -> usize {
        // SAFETY: forwarded contract.
        unsafe {
            self.free_then(block, class, requested, backing, |held, block| {
                Self::free_held(held, block, class, requested)
            })
        }
    }

    /// `free`'s body, `into_pools` freeing into the heap held when the
    /// block does not go on its shelf: `free_held` out of line, or, for a
    /// caller that frees many blocks one by one (a straight thread cache,
    /// see `ThreadCache::pass_on`), `free_into_pools` inlined.
    ///
    /// # Safety
    /// As for `free`; `into_pools` is one of those two, with the same
    /// `class` and `requested`.
    #[inline(always)]
    pub(crate) unsafe fn free_then<B: Backing>(
        &self,
        block: *mut u8,
        class: usize,
        requested: usize,
        backing: &B,
        into_pools: impl FnOnce(Held<'_, B>, *mut u8) -> usize,
    ) -> usize {
        // SAFETY: forwarded contract.
        let index = unsafe { self.heap_of(block, class) };
        // The debug feature's double-free check reads the pools' free lists,
        // so there every free must reach its pool before the call returns.
        let held = if cfg!(feature = "debug") {
            Some(self.hold_exactly(index, backing))
        } else {
            self.try_take(index, backing)
        };
        let Some(mut held) = held else {
            // SAFETY: forwarded contract.
            return unsafe { self.free_remote(block, index, requested, backing) };
        };
        // A shelf with room, the common case without caches, calls nothing,
        // so the path saves no registers; the rest leaves by tail call.
        // SAFETY: forwarded contract; the block is of this heap and `class`.
        if unsafe { held.shelve(block, class) } {
            held.requested = held.requested.wrapping_sub(requested);
            return held.release();
        }
        into_pools(held, block)
    }

    /// `free` into the heap held, out of line (see `free_then`).
    ///
    /// # Safety
    /// As for `free_into_pools`.
    #[inline(never)]
    unsafe fn free_held<B: Backing>(
        held: Held<'_, B>,
        block: *mut u8,
        class: usize,
        requested: usize,
    ) -> usize {
        // SAFETY: forwarded contract.
        unsafe { Self::free_into_pools(held, block, class, requested) }
    }

    /// `free` into the heap held, to its pools (emptying a full shelf
    /// first): how many arenas the heap let go meanwhile.
    ///
    /// # Safety
    /// As for `free`; `held` is the block's heap.
    #[inline(always)]
    pub(crate) unsafe fn free_into_pools<B: Backing>(
        mut held: Held<'_, B>,
        block: *mut u8,
        class: usize,
        requested: usize,
    ) -> usize {
        let let_go = held.arenas_let_go();
        let backing = held.backing;
        // SAFETY: forwarded contract.
        unsafe { held.free_of_class(block, class, backing) };
        held.requested = held.requested.wrapping_sub(requested);
        let let_go = held.arenas_let_go() - let_go;
        let_go + held.release()
    }

    /// `free` through heap `index`'s inbox: its lock was taken.
    ///
    /// # Safety
    /// As for `free`; `block` is of heap `index`.
    #[inline(never)]
    unsafe fn free_remote(
        &self,
        block: *mut u8,
        index: usize,
        requested: usize,
        backing: &impl Backing,
    ) -> usize {
        self.requested.fetch_sub(requested, Ordering::Relaxed);
        // SAFETY: forwarded contract: the block is ours to link.
        unsafe { self.push_remote(index, block.cast(), block.cast()) };
        self.after_push(index, backing)
    }

    /// Where `block`, claimed to be of `class`, stands among the heaps:
    /// reads only memory of arenas they hold. (Blocks never wait in inboxes
    /// under the debug feature, see `free`.)
    #[cfg(feature = "debug")]
    pub(crate) fn status(
        &self,
        block: *mut u8,
        class: usize,
        backing: &impl Backing,
    ) -> super::heap::BlockStatus {
        (0..self.count())
            .map(|index| self.hold_exactly(index, backing).status(block, class))
            .find(|status| *status != super::heap::BlockStatus::Foreign)
            .unwrap_or(super::heap::BlockStatus::Foreign)
    }

    /// The pusher's half of "nothing left behind": if the heap's holder left
    /// before seeing the push, take the heap and empty the inbox. How many
    /// arenas the heap let go meanwhile.
    pub(crate) fn after_push(&self, index: usize, backing: &impl Backing) -> usize {
        fence(Ordering::SeqCst);
        // Taking the heap empties its inbox; leaving it checks once more.
        self.try_take(index, backing)
            .map_or(0, |mut held| held.take_mail() + held.release())
    }
}

// `layout` relies on these: the slots' alignment serves the header too, and
// the largest set is a small, valid size.
static_assertions::const_assert!(align_of::<Slot>() >= align_of::<HeapSet>());
static_assertions::const_assert!(HeapSet::size(MAX_SLOTS) < isize::MAX as usize / 2);

/// The heap owning live `block`, whose pools are `pool_size` bytes.
///
/// # Safety
/// `block` is a live block of a pool of `pool_size` bytes.
#[inline]
pub(crate) unsafe fn heap_in(block: *mut u8, pool_size: usize) -> usize {
    // SAFETY: a live block's pool header is initialised and its `heap`
    // does not change while the block is out.
    unsafe { (*pool_of(block, pool_size)).heap as usize }
}

/// A heap hint that differs between threads without thread-local storage:
/// the caller's stack address, which one thread keeps within a few 64 KiB
/// spans while threads' stacks lie megabytes apart, hashed (Fibonacci
/// hashing, whose high bits `HeapSet::stack_heap` keeps) so that
/// neighbouring stacks land on different heaps.
///
/// Out of line: a local whose address escapes keeps LLVM from making any
/// call of the function that takes it a tail call, and the locked fast
/// paths rely on theirs.
#[cfg(not(loom))]
#[inline(never)]
fn stack_hint() -> u32 {
    let probe = 0u8;
    let addr = core::hint::black_box(ptr::addr_of!(probe)) as usize;
    ((addr >> 16) as u32).wrapping_mul(0x9E37_79B9)
}

/// Under loom every thread gets the same hint: loom needs each run of a
/// model to make the same choices (stack addresses differ between runs),
/// and threads that all start at heap 0 exercise the fall-over path.
#[cfg(loom)]
fn stack_hint() -> u32 {
    0
}

impl<'a, B: Backing> Held<'a, B> {
    #[inline(always)]
    fn new(guard: RawGuard<'a, Heap>, slot: &'a Slot, index: usize, backing: &'a B) -> Self {
        #[cfg(not(any(thread_cache, all(test, loom))))]
        let _ = index;
        Held {
            guard: ManuallyDrop::new(guard),
            slot,
            #[cfg(any(thread_cache, all(test, loom)))]
            index,
            backing,
        }
    }

    /// Frees the blocks waiting in the inbox into the heap: how many
    /// arenas it let go meanwhile.
    #[inline(always)]
    pub(crate) fn take_mail(&mut self) -> usize {
        let (slot, backing) = (self.slot, self.backing);
        if !slot.has_mail() {
            return 0;
        }
        slot.drain_into(self, backing)
    }

    /// Leaves the heap: how many arenas it let go while mail that
    /// arrived meanwhile was freed (see `leave`).
    #[inline(always)]
    pub(crate) fn release(self) -> usize {
        match self.leave() {
            Ok(()) => 0,
            Err(mail) => mail.collect(),
        }
    }

    /// The holder's half of "nothing left behind": unlocks, then, if a
    /// push arrived that its pusher could not hand over (it found the heap
    /// held), the mail the caller must collect. Apart from `release` so
    /// that a caller with a block in hand reaches the collection by tail
    /// call.
    #[inline(always)]
    pub(crate) fn leave(self) -> Result<(), Mail<'a, B>> {
        let mut held = ManuallyDrop::new(self);
        // SAFETY: `guard` came from `slot.heap`; taken once, here, and with
        // `held` never dropped, not used again.
        unsafe {
            held.slot
                .heap
                .unlock_raw(ManuallyDrop::take(&mut held.guard))
        };
        fence(Ordering::SeqCst);
        if held.slot.has_mail() {
            return Err(Mail {
                slot: held.slot,
                backing: held.backing,
            });
        }
        Ok(())
    }

    /// Which heap of the set this is.
    #[cfg(any(thread_cache, all(test, loom)))]
    pub(crate) fn index(&self) -> usize {
        self.index
    }
}

impl Slot {
    /// Whether blocks wait in the inbox: a look, no read-modify-write, so
    /// that taking and leaving a heap with an empty inbox (the usual case)
    /// costs one atomic operation, the lock's.
    #[inline(always)]
    fn has_mail(&self) -> bool {
        !self.inbox.load(Ordering::Relaxed).is_null()
    }

    /// After unlocking and a fence, with mail seen: takes the heap again
    /// and frees it, until a look after the fence finds the inbox empty.
    /// If someone else holds the heap, they empty the inbox before they
    /// leave. Returns how many arenas the heap let go meanwhile.
    #[cold]
    #[inline(never)]
    fn collect_mail(&self, backing: &impl Backing) -> usize {
        let mut let_go = 0;
        while let Some(mut heap) = self.heap.try_lock() {
            let_go += self.drain_into(&mut heap, backing);
            drop(heap);
            fence(Ordering::SeqCst);
            if !self.has_mail() {
                break;
            }
        }
        let_go
    }

    /// Frees every block waiting in the inbox into `heap`, this slot's heap,
    /// held: how many arenas it let go meanwhile.
    #[cold]
    #[inline(never)]
    fn drain_into(&self, heap: &mut Heap, backing: &impl Backing) -> usize {
        let before = heap.arenas_let_go();
        // Acquire: pairs with the pushers' release, so their links are seen.
        let mut block = self.inbox.swap(ptr::null_mut(), Ordering::Acquire);
        while !block.is_null() {
            // SAFETY: inbox blocks are live blocks of this heap, given up by
            // their owners and linked only here, so their link is readable
            // and each is freed once.
            unsafe {
                let next = FreeBlock::next(block);
                heap.free(block.cast(), backing);
                block = next;
            }
        }
        heap.arenas_let_go() - before
    }
}

impl<B: Backing> Deref for Held<'_, B> {
    type Target = Heap;
    #[inline(always)]
    fn deref(&self) -> &Heap {
        // SAFETY: `guard` came from `slot.heap`.
        unsafe { self.slot.heap.get(&self.guard) }
    }
}

impl<B: Backing> DerefMut for Held<'_, B> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut Heap {
        // SAFETY: `guard` came from `slot.heap`.
        unsafe { self.slot.heap.get_mut(&mut self.guard) }
    }
}

impl<B: Backing> Drop for Held<'_, B> {
    /// `release`.
    #[inline(always)]
    fn drop(&mut self) {
        // SAFETY: `self` is not used again, and `release` forgets the copy.
        let held = unsafe { ptr::read(self) };
        held.release();
    }
}

/// Blocks seen in a heap's inbox by its holder just after leaving (see
/// [`Held::leave`]): collecting them is the leaver's job.
#[must_use]
pub(crate) struct Mail<'a, B: Backing> {
    slot: &'a Slot,
    backing: &'a B,
}

impl<B: Backing> Mail<'_, B> {
    /// Takes the heap again and frees the mail, as often as more arrives
    /// while it does: how many arenas the heap let go meanwhile.
    pub(crate) fn collect(self) -> usize {
        self.slot.collect_mail(self.backing)
    }
}

/// Every live heap set, on one list whose links live in the sets, so that
/// the fork handlers (`fork.rs`) reach every heap's lock without allocating.
#[cfg(fork_handlers)]
mod set_list {
    use super::HeapSet;
    use crate::allocator::sync::{AtomicPtr, Lock, Ordering};
    use core::ptr;

    /// A heap set's place on the global list; changed only under [`SETS`].
    pub(crate) struct SetLinks {
        prev: AtomicPtr<HeapSet>,
        next: AtomicPtr<HeapSet>,
    }

    impl SetLinks {
        pub(crate) const fn new() -> Self {
            SetLinks {
                prev: AtomicPtr::new(ptr::null_mut()),
                next: AtomicPtr::new(ptr::null_mut()),
            }
        }
    }

    /// The first set of the global list.
    pub(crate) struct Sets {
        pub(crate) first: *mut HeapSet,
    }

    // SAFETY: the pointer is only followed under the lock, to sets that stay
    // alive until they leave the list under it.
    unsafe impl Send for Sets {}

    pub(crate) static SETS: Lock<Sets> = Lock::new(Sets {
        first: ptr::null_mut(),
    });
    /// Puts a new set on the global list.
    ///
    /// # Safety
    /// `set` is initialised, on no list, and stays alive until `delist`ed.
    pub(super) unsafe fn enlist(set: *mut HeapSet) {
        let mut sets = SETS.lock();
        // SAFETY: `set` is alive (contract) and so is the first set (listed).
        unsafe {
            (*set).fork.prev.store(ptr::null_mut(), Ordering::Relaxed);
            (*set).fork.next.store(sets.first, Ordering::Relaxed);
            if let Some(first) = sets.first.as_ref() {
                first.fork.prev.store(set, Ordering::Relaxed);
            }
        }
        sets.first = set;
    }

    /// Takes a set off the global list.
    ///
    /// # Safety
    /// `set` was `enlist`ed and not delisted since.
    pub(super) unsafe fn delist(set: *mut HeapSet) {
        let mut sets = SETS.lock();
        // SAFETY: `set` and its neighbours are listed, hence alive; we hold the
        // list's lock.
        unsafe {
            let prev = (*set).fork.prev.load(Ordering::Relaxed);
            let next = (*set).fork.next.load(Ordering::Relaxed);
            match prev.as_ref() {
                Some(prev) => prev.fork.next.store(next, Ordering::Relaxed),
                None => sets.first = next,
            }
            if let Some(next) = next.as_ref() {
                next.fork.prev.store(prev, Ordering::Relaxed);
            }
        }
    }

    /// Calls `f` on every set of the list starting at `set`.
    ///
    /// # Safety
    /// `set` is the first of the list, and its lock is held from before the
    /// read of `set` until after this call.
    pub(crate) unsafe fn for_each_set(mut set: *mut HeapSet, mut f: impl FnMut(&HeapSet)) {
        // SAFETY: with the lock held the list is stable and its sets alive.
        while let Some(s) = unsafe { set.as_ref() } {
            f(s);
            set = s.fork.next.load(Ordering::Relaxed);
        }
    }
}
#[cfg(fork_handlers)]
use set_list::{delist, enlist};
#[cfg(fork_handlers)]
pub(crate) use set_list::{for_each_set, SetLinks, SETS};

// Answered here rather than in `backing.rs`: what a region must hold is
// what the heap set takes from it before serving anything.
impl Region {
    /// The fewest bytes a region needs for `config`: the heaps themselves,
    /// one chunk of arena records, one arena, the padding to align each,
    /// and the worst-case trim of a misaligned start. With a
    /// [`Config::pool_limit`] of 0 no heap is ever made, and one
    /// smallest block of the store after that trim is enough.
    pub const fn min_len(config: Config) -> usize {
        if config.pool_limit() == 0 {
            return 2 * REGION_ALIGN;
        }
        (HeapSet::max_bytes(config.heaps())
            + CHUNK_BYTES
            + config.arena_size()
            + config.pool_size()
            + 4 * REGION_ALIGN)
            // A trimmed span is a whole number of `REGION_ALIGN` units.
            .next_multiple_of(REGION_ALIGN)
    }

    /// Spans from which a region gets [`Config::DEFAULT`]: 32 MiB, where
    /// its eight heaps' partly used pools and spare arenas are a small
    /// share.
    pub const DEFAULT_SPAN: usize = 32 << 20;

    /// Spans from which a region has the medium tier: 256 MiB. Each
    /// medium class in use strands a partly used 512 KiB run in each heap
    /// (up to 112 MiB over 28 classes and eight heaps), and a thread cache
    /// with medium lists holds up to 3.9 MiB, a 64th of this span.
    pub const MEDIUM_SPAN: usize = 256 << 20;

    /// `config` as a span of `len` bytes runs it: the medium tier only
    /// from [`Region::MEDIUM_SPAN`]; below it, requests over the small
    /// classes go to the store, which packs them tightly.
    pub const fn fitted(config: Config, len: usize) -> Config {
        config.with_medium_tier(config.medium_tier() && len >= Region::MEDIUM_SPAN)
    }

    /// The fewest bytes any region needs (32): one block of the store,
    /// whatever the alignment of the span's start.
    pub const MIN_LEN: usize = Region::min_len(Config::new(MIN_POOL_SIZE, 1).with_pool_limit(0));

    /// The largest request [`Region::config_for`] lets the pools serve in
    /// a span of `len` bytes; larger ones go to the region's store. The
    /// store packs blocks tightly but its first-fit search grows with the
    /// number of free gaps, so with the span; the pools are fast but strand
    /// a partly used pool per class, which weighs less the larger the span.
    /// (Measured on `tests/utilisation.rs`'s mixes: see the design notes in
    /// `src/allocator/mod.rs`.)
    pub const fn pool_limit_for(len: usize) -> usize {
        match len {
            0..0x2_0000 => 0,
            0x2_0000..0x8_0000 => 128,
            0x8_0000..0x20_0000 => 256,
            _ => MAX_POOL_LIMIT,
        }
    }

    /// The geometry [`PyMalloc::region`](crate::PyMalloc::region) picks for
    /// a span of `len` bytes:
    /// * from [`Region::DEFAULT_SPAN`] up, [`Config::DEFAULT`] (CPython's
    ///   4 KiB pools and 256 KiB arenas, several heaps, every request up to
    ///   512 bytes pooled), with the medium tier from
    ///   [`Region::MEDIUM_SPAN`];
    /// * below it, one heap, requests up to [`Region::pool_limit_for`]
    ///   pooled (none under 128 KiB: there the region's store serves
    ///   everything), 4 KiB pools from 1 MiB and 1 KiB pools under that,
    ///   and arenas of a sixteenth of the span (1 to 64 pools), halved
    ///   until one fits beside the heap's own bookkeeping. Pools partly
    ///   used by each size class are what a small span cannot afford many
    ///   of, hence small pools; small arenas leave little of the span
    ///   outside every arena, and let an emptied one go back to the store.
    ///
    /// `None` below [`Region::MIN_LEN`].
    pub const fn config_for(len: usize) -> Option<Config> {
        if len >= Region::DEFAULT_SPAN {
            return Some(Region::fitted(Config::DEFAULT, len));
        }
        if len < Region::MIN_LEN {
            return None;
        }
        let pool_size = if len >= 1 << 20 { 4096 } else { MIN_POOL_SIZE };
        let mut pools = len / 16 / pool_size;
        if pools > MAX_ARENA_POOLS {
            pools = MAX_ARENA_POOLS;
        }
        if pools == 0 {
            pools = 1;
        }
        loop {
            let config = Config::new(pool_size, pools)
                .with_heaps(1)
                .with_pool_limit(Region::pool_limit_for(len))
                .with_medium_tier(false);
            if Region::min_len(config) <= len {
                return Some(config);
            }
            if pools == 1 {
                return None;
            }
            pools /= 2;
        }
    }
}

// The geometry chosen for the firmware-sized span the README shows: the
// store serves every request.
static_assertions::const_assert!(matches!(
    Region::config_for(64 * 1024),
    Some(config) if config.pool_limit() == 0
));
// From 2 MiB, and so in the default geometry, every small request is
// pooled.
static_assertions::const_assert!(Region::pool_limit_for(Region::DEFAULT_SPAN) == MAX_POOL_LIMIT);
// The store searches first fit exactly where the pools take every small
// request, leaving it arenas and large blocks.
static_assertions::const_assert!(
    Region::pool_limit_for(super::store::FIRST_FIT_SPAN) == MAX_POOL_LIMIT
        && Region::pool_limit_for(super::store::FIRST_FIT_SPAN - 1) < MAX_POOL_LIMIT
);

/// loom models of the paths where threads meet between heaps. Run with
/// `RUSTFLAGS="--cfg loom" cargo test --release -p pymalloc --lib loom_models`.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use crate::allocator::backing::System;
    use crate::allocator::size_class::CLASS_COUNT;
    use crate::allocator::stats::Stats;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;
    use loom::thread;
    use std::vec::Vec;

    /// One-pool arenas of one 512-byte block: every free empties an arena.
    const ONE_BLOCK_ARENAS: Config = Config::new(1024, 1);
    const BIG: usize = CLASS_COUNT - 1;

    struct Shared {
        set: *mut HeapSet,
    }
    // SAFETY: the set is built for sharing (locks and atomics); the pointer
    // is only dereferenced while `Shared` lives.
    unsafe impl Send for Shared {}
    unsafe impl Sync for Shared {}

    impl Shared {
        fn new(config: Config) -> Arc<Shared> {
            let set = HeapSet::create(config, &System, false);
            assert!(!set.is_null());
            Arc::new(Shared { set })
        }
        fn set(&self) -> &HeapSet {
            // SAFETY: alive until `drop`.
            unsafe { &*self.set }
        }
        /// Heap `index`'s figures, read without emptying its inbox.
        fn peek(&self, index: usize) -> Stats {
            let mut stats = Stats::empty(1024, 1024);
            self.set()
                .slot(index)
                .heap
                .try_lock()
                .expect("quiescent")
                .gather(&mut stats);
            stats
        }
        fn inbox_is_empty(&self, index: usize) -> bool {
            self.set()
                .slot(index)
                .inbox
                .load(Ordering::SeqCst)
                .is_null()
        }
    }

    impl Drop for Shared {
        fn drop(&mut self) {
            // SAFETY: the last reference; blocks are not used again.
            unsafe { HeapSet::destroy(self.set, &System) }
        }
    }

    /// Every interleaving: these models are small enough to explore
    /// exhaustively. (loom treats its mutexes as sequentially consistent,
    /// so the fences in `Held::leave` and `after_push` are argued in the
    /// module documentation rather than checked here; what is checked is the
    /// protocol around them.) At least 4 orders each: an empty inbox is
    /// looked at, not swapped, so loom finds few writes to reorder (5 to
    /// 176 orders; 30 to 14,027 while an empty inbox was swapped).
    fn model(f: impl Fn() + Sync + Send + 'static) {
        crate::allocator::sync::loom_model(None, 4, f);
    }

    /// Two blocks of heap `index`, taken while holding it.
    fn two_blocks(shared: &Shared, index: usize) -> (usize, usize) {
        let mut held = shared.set().hold_exactly(index, &System);
        (
            held.alloc(BIG, &System) as usize,
            held.alloc(BIG, &System) as usize,
        )
    }

    #[test]
    fn threads_that_meet_on_a_heap_fall_over_to_another() {
        model(|| {
            let shared = Shared::new(ONE_BLOCK_ARENAS.with_heaps(2));
            let busy: Arc<[AtomicBool; 2]> =
                Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
            let work = |shared: Arc<Shared>, busy: Arc<[AtomicBool; 2]>| {
                let mut held = shared.set().hold(0, 0, &System);
                let index = held.index();
                assert!(
                    !busy[index].swap(true, Ordering::SeqCst),
                    "two holders of heap {index}"
                );
                let block = held.alloc(BIG, &System);
                assert!(!block.is_null());
                busy[index].store(false, Ordering::SeqCst);
                // SAFETY: just allocated from this heap, freed once.
                unsafe { held.free(block, &System) };
            };
            let other = thread::spawn({
                let (shared, busy) = (shared.clone(), busy.clone());
                move || work(shared, busy)
            });
            work(shared.clone(), busy);
            other.join().unwrap();
        });
    }

    #[test]
    fn a_remote_free_is_never_left_behind_by_a_leaving_holder() {
        model(|| {
            let shared = Shared::new(ONE_BLOCK_ARENAS.with_heaps(1));
            let (a, b) = two_blocks(&shared, 0);
            let holder = thread::spawn({
                let shared = shared.clone();
                move || {
                    let mut held = shared.set().hold(0, 0, &System);
                    held.alloc(BIG, &System) as usize
                }
            });
            // SAFETY: a live block of the set, freed once.
            unsafe { shared.set().free(a as *mut u8, BIG, 0, &System) };
            let c = holder.join().unwrap();
            assert!(c != b && c != 0);
            // No thread holds the heap now: the free must have reached its
            // pool, by the holder or by the pusher's second try.
            assert!(shared.inbox_is_empty(0));
            assert_eq!(shared.peek(0).blocks_in_use(), 2);
        });
    }

    #[test]
    fn a_batch_reclaim_races_new_pushes_and_loses_nothing() {
        model(|| {
            let shared = Shared::new(ONE_BLOCK_ARENAS.with_heaps(1));
            let blocks: Vec<usize> = {
                let mut held = shared.set().hold(0, 0, &System);
                (0..3).map(|_| held.alloc(BIG, &System) as usize).collect()
            };
            let pusher = thread::spawn({
                let (shared, blocks) = (shared.clone(), blocks.clone());
                move || {
                    for &block in &blocks[..2] {
                        // SAFETY: live blocks of the set, each freed once.
                        unsafe { shared.set().free(block as *mut u8, BIG, 0, &System) };
                    }
                }
            });
            let new = {
                let mut held = shared.set().hold(0, 0, &System);
                held.alloc(BIG, &System) as usize
            };
            // SAFETY: as above.
            unsafe { shared.set().free(blocks[2] as *mut u8, BIG, 0, &System) };
            pusher.join().unwrap();
            assert!(!blocks[2..].contains(&new) && new != 0);
            assert!(shared.inbox_is_empty(0));
            let stats = shared.peek(0);
            assert_eq!(
                stats.blocks_in_use(),
                1,
                "one live block, no loss, no double free"
            );
            assert!(
                stats.arenas_current <= 2,
                "the live block's arena and one spare"
            );
        });
    }

    #[test]
    fn an_arena_release_races_a_remote_free_into_that_arena() {
        model(|| {
            let shared = Shared::new(ONE_BLOCK_ARENAS.with_heaps(2));
            // Two arenas of heap 0, each full with one block.
            let (x, y) = two_blocks(&shared, 0);
            let remote = thread::spawn({
                let shared = shared.clone();
                // SAFETY: a live block of the set, freed once.
                move || unsafe { shared.set().free(x as *mut u8, BIG, 0, &System) }
            });
            // Meanwhile heap 0's holder frees y, emptying its arena, and
            // allocates again.
            let z = {
                let mut held = shared.set().hold_exactly(0, &System);
                // SAFETY: as above.
                unsafe { held.free(y as *mut u8, &System) };
                held.alloc(BIG, &System) as usize
            };
            remote.join().unwrap();
            // (z may be x again: the remote free may come first.)
            assert!(z != 0);
            assert!(shared.inbox_is_empty(0));
            let stats = shared.peek(0);
            assert_eq!(stats.blocks_in_use(), 1);
            assert!(stats.arenas_current <= 2, "at most z's arena and one spare");
            assert_eq!(
                stats.arenas_allocated_total,
                stats.arenas_reclaimed + stats.arenas_current
            );
        });
    }
}
