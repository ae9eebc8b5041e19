//! [`PyMalloc`]: the `GlobalAlloc` front, routing each request to the pools
//! or to the backing's fallback.

use super::backing::Backing;
use super::backing::Region;
#[cfg(feature = "std")]
use super::backing::System;
use super::config::{Config, ConfigCell};
#[cfg(feature = "debug")]
use super::debug;
#[cfg(fork_handlers)]
use super::fork;
use super::gate::Gate;
#[cfg(feature = "debug")]
use super::heap::BlockStatus;
use super::heap_set::{HeapSet, Held, Mail};
use super::size_class::{class_for, medium_class_for, CLASS_COUNT, CLASS_STEP};
use super::stats::Stats;
#[cfg(feature = "debug")]
use super::sync::Lock;
use super::sync::{loom_const_fn, AtomicPtr, AtomicUsize, Ordering};
#[cfg(thread_cache)]
use super::thread_cache;
#[cfg(all(feature = "std", not(loom)))]
use super::tracemalloc;
use super::track;
use core::alloc::Layout;
use core::ptr;

/// A thread cache holds at most `1 / CACHED_SPAN_SHARE` of a bounded
/// backing's bytes: below that many full caches' worth of span, caches are
/// off (a region's memory is better spent in live blocks than in lists a
/// thread may never use again).
#[cfg(thread_cache)]
pub(crate) const CACHED_SPAN_SHARE: usize = 64;

/// The backing `PyMalloc` uses when none is named: [`System`] with `std`,
/// [`Region`] without.
#[cfg(feature = "std")]
pub type DefaultBacking = System;
/// The backing `PyMalloc` uses when none is named: [`System`] with `std`,
/// [`Region`] without.
#[cfg(not(feature = "std"))]
pub type DefaultBacking = Region;

/// A pymalloc-style allocator: small blocks from pools in arenas, large ones
/// from the backing `B`.
///
/// Threads share [`Config::heaps`] independent heaps, each taken with a
/// try-lock (a busy one is passed over) and chosen without thread-local
/// storage; a block freed by a thread that cannot take its heap waits in
/// that heap's lock-free inbox for the next holder. Where
/// [`THREAD_CACHES`](crate::THREAD_CACHES) is true, each thread also keeps
/// short per-class lists of free blocks, so most calls take no lock at all
/// (over a region, only one of at least 32 MiB, 256 MiB with the medium
/// tier: a cache then holds at most 1/64 of it).
///
/// A null return means the memory is gone: before it, the calling thread's
/// cached blocks go back, every heap is tried in turn with its inbox
/// emptied, and (for large requests) every spare and retired arena is given back.
///
#[cfg_attr(feature = "std", doc = "```")]
#[cfg_attr(not(feature = "std"), doc = "```ignore")]
/// use pymalloc::PyMalloc;
///
/// #[global_allocator]
/// static ALLOC: PyMalloc = PyMalloc::system();
///
/// let v: Vec<u32> = (0..1000).collect();
/// assert_eq!(v.iter().sum::<u32>(), 499_500);
/// assert!(ALLOC.stats().blocks_in_use() > 0);
/// ```
pub struct PyMalloc<B: Backing = DefaultBacking> {
    /// The heaps, made on first use from the backing, where they stay put
    /// even if this value moves (thread caches and remote frees refer to
    /// them by address).
    set: AtomicPtr<HeapSet>,
    /// What thread caches call this allocator (0: not yet, or not cached).
    #[cfg(thread_cache)]
    id: AtomicUsize,
    /// Fixed, except that `init` may choose it for a region made without
    /// one (`region_uninit`).
    config: ConfigCell,
    backing: B,
    large: LargeCounters,
    /// The fast path's bound and the limit: see `inject.rs`.
    pub(crate) gate: Gate,
    /// Live large blocks, for the debug feature's ownership checks.
    #[cfg(feature = "debug")]
    large_blocks: Lock<debug::LargeList>,
}

/// Live large objects, counted outside the heap lock: the backing serves
/// them without it.
struct LargeCounters {
    objects: AtomicUsize,
    bytes: AtomicUsize,
    requested: AtomicUsize,
}

impl LargeCounters {
    fn add(&self, bytes: usize, requested: usize) {
        self.objects.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.requested.fetch_add(requested, Ordering::Relaxed);
    }

    fn remove(&self, bytes: usize, requested: usize) {
        self.objects.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.requested.fetch_sub(requested, Ordering::Relaxed);
    }
}

#[cfg(feature = "std")]
impl PyMalloc<System> {
    loom_const_fn! {
        /// A heap over the operating system, CPython's default geometry.
        pub fn system() -> Self {
            Self::with_backing(System, Config::DEFAULT)
        }
    }

    loom_const_fn! {
        /// A heap over the operating system with the geometry `config`.
        pub fn system_with(config: Config) -> Self {
            Self::with_backing(System, config)
        }
    }
}

impl PyMalloc<Region> {
    loom_const_fn! {
        /// A heap over the `static` array at `heap`, claimed on first use,
        /// with the geometry [`Region::config_for`] picks for `N` bytes
        /// (under 128 KiB the region's store serves every request; then
        /// pools for more and more sizes, one heap, up to CPython's
        /// default from 32 MiB).
        ///
        /// ```
        /// use pymalloc::{PyMalloc, Region};
        ///
        /// static mut HEAP: [u8; 64 * 1024] = [0; 64 * 1024];
        /// // SAFETY: HEAP is used by nothing but this allocator.
        /// static ALLOC: PyMalloc<Region> = unsafe { PyMalloc::region(&raw mut HEAP) };
        /// assert_eq!(ALLOC.config().pool_limit(), 0);
        /// ```
        ///
        /// # Safety
        /// `heap` points to `N` bytes valid for reads and writes that nothing
        /// else uses while the allocator lives (a raw pointer cannot prove
        /// that, hence `unsafe`).
        ///
        /// # Panics
        /// If `N` is below [`Region::MIN_LEN`]; in a `static` that is a
        /// compile error naming it:
        ///
        /// ```compile_fail
        /// use pymalloc::{PyMalloc, Region};
        ///
        /// static mut HEAP: [u8; 16] = [0; 16];
        /// static ALLOC: PyMalloc<Region> = unsafe { PyMalloc::region(&raw mut HEAP) };
        /// ```
        pub unsafe fn region<const N: usize>(heap: *mut [u8; N]) -> Self {
            let Some(config) = Region::config_for(N) else {
                panic!("pymalloc: the region is smaller than Region::MIN_LEN, 32 bytes")
            };
            // SAFETY: forwarded contract.
            unsafe { Self::region_with(heap, config) }
        }
    }

    loom_const_fn! {
        /// As [`PyMalloc::region`], with the geometry `config` (for example
        /// [`Config::SMALL`] for a heap of tens of KiB).
        ///
        /// # Safety
        /// As for [`PyMalloc::region`].
        ///
        /// # Panics
        /// If `N` is below [`Region::min_len`] for `config`; in a `static`
        /// that is a compile error:
        ///
        /// ```compile_fail
        /// use pymalloc::{Config, PyMalloc, Region};
        ///
        /// static mut HEAP: [u8; 64 * 1024] = [0; 64 * 1024];
        /// // A 256 KiB arena cannot fit in 64 KiB: rejected at compile time.
        /// static ALLOC: PyMalloc<Region> =
        ///     unsafe { PyMalloc::region_with(&raw mut HEAP, Config::DEFAULT) };
        /// ```
        pub unsafe fn region_with<const N: usize>(heap: *mut [u8; N], config: Config) -> Self {
            assert!(
                N >= Region::min_len(config),
                "pymalloc: the region is too small for one arena of this Config"
            );
            // SAFETY: forwarded contract.
            Self::with_backing(unsafe { Region::new(heap.cast(), N) }, Region::fitted(config, N))
        }
    }

    loom_const_fn! {
        /// A heap whose region is given later by [`PyMalloc::init`], which
        /// picks the geometry from the span's length as
        /// [`PyMalloc::region`] does from the array's ([`Region::config_for`]);
        /// until then every allocation returns null.
        ///
        #[cfg_attr(feature = "std", doc = "```")]
        #[cfg_attr(not(feature = "std"), doc = "```ignore")]
        /// use pymalloc::{PyMalloc, Region};
        ///
        /// static ALLOC: PyMalloc<Region> = PyMalloc::region_uninit();
        /// let span = Box::leak(vec![0u8; 64 * 1024].into_boxed_slice());
        /// // SAFETY: the span is leaked, so ours alone for good.
        /// unsafe { ALLOC.init(span.as_mut_ptr(), span.len()) };
        /// assert_eq!(Some(ALLOC.config()), Region::config_for(64 * 1024));
        /// ```
        pub fn region_uninit() -> Self {
            Self::with_backing(Region::awaiting_span(true), Config::DEFAULT)
        }
    }

    loom_const_fn! {
        /// As [`PyMalloc::region_uninit`], with the geometry `config`.
        pub fn region_uninit_with(config: Config) -> Self {
            Self::with_backing(Region::awaiting_span(false), config)
        }
    }

    /// Gives a [`PyMalloc::region_uninit`] heap its memory: `len` bytes at
    /// `start`. A misaligned start or odd length is trimmed to 16-byte
    /// boundaries.
    ///
    /// # Safety
    /// The span is valid for reads and writes and used by nothing else while
    /// the allocator lives; no other thread calls the allocator while
    /// `init` runs (it may choose the geometry, which every call reads).
    ///
    /// # Panics
    /// If the heap already has memory, or the trimmed span is shorter than
    /// [`Region::min_len`] of the heap's geometry (for `region_uninit`,
    /// shorter than [`Region::MIN_LEN`]).
    pub unsafe fn init(&self, start: *mut u8, len: usize) {
        #[cfg(fork_handlers)]
        fork::ensure_handlers();
        let accept = |len| {
            let config = if self.backing.picks_config {
                let Some(config) = Region::config_for(len) else {
                    panic!(
                        "pymalloc: a region of {len} usable bytes is below Region::MIN_LEN ({})",
                        Region::MIN_LEN
                    )
                };
                config
            } else {
                Region::fitted(self.config(), len)
            };
            let min_len = Region::min_len(config);
            assert!(
                len >= min_len,
                "pymalloc: a region of {len} usable bytes is below the {min_len} bytes \
                 its Config needs (Region::min_len); give more or choose a smaller Config"
            );
            self.config.set(config);
        };
        // SAFETY: forwarded contract.
        unsafe { self.backing.set_span(start, len, accept) }
    }
}

impl<B: Backing> PyMalloc<B> {
    loom_const_fn! {
        /// A heap over any backing.
        pub fn with_backing(backing: B, config: Config) -> Self {
            PyMalloc {
                set: AtomicPtr::new(ptr::null_mut()),
                #[cfg(thread_cache)]
                id: AtomicUsize::new(0),
                config: ConfigCell::new(config),
                backing,
                large: LargeCounters {
                    objects: AtomicUsize::new(0),
                    bytes: AtomicUsize::new(0),
                    requested: AtomicUsize::new(0),
                },
                gate: Gate::new(),
                #[cfg(feature = "debug")]
                large_blocks: Lock::new(debug::LargeList::new()),
            }
        }
    }

    /// The heap's geometry.
    pub fn config(&self) -> Config {
        self.config.get()
    }

    /// The backing the heap draws from.
    pub fn backing(&self) -> &B {
        &self.backing
    }

    /// A snapshot of the heap, like CPython's `sys._debugmallocstats()`.
    /// Does not allocate.
    ///
    /// Blocks the calling thread caches go back to their pools first, so a
    /// single-threaded program sees exactly what it holds; blocks other
    /// threads cache count as free ([`Stats::cached_blocks`]). Every heap's
    /// inbox of remotely freed blocks, and its shelf of blocks freed
    /// without a cache, is emptied on the way, and its retired arenas that
    /// have waited out the release delay go back.
    ///
    /// Each heap and each cache is read at its own moment: while other
    /// threads allocate or free, a block a cache fetched from its heap
    /// between the two readings counts as free twice, and the parts of the
    /// arenas ([`Stats::accounted_arena_bytes`]) add up exactly only when
    /// no other thread allocates or frees during the call.
    pub fn stats(&self) -> Stats {
        let config = self.config();
        let mut stats = Stats::empty(config.pool_size(), config.arena_size());
        if B::BOUNDED {
            stats.small_threshold = config.pool_limit();
        }
        let set = self.set.load(Ordering::Acquire);
        if !set.is_null() {
            let _internal = track::internal();
            #[cfg(thread_cache)]
            thread_cache::flush_all(self);
            // SAFETY: a published set lives as long as `self`.
            let set = unsafe { &*set };
            for index in 0..set.count() {
                let mut held = set.hold_exactly(index, &self.backing);
                // Shelved blocks are free: back in their pools, they count
                // so, and arenas they alone kept go back (after the
                // release delay, which those that waited it out have).
                held.clear_shelf(&self.backing);
                held.release_expired(&self.backing);
                held.gather(&mut stats);
            }
            stats.bookkeeping_bytes += set.bytes();
            #[cfg(thread_cache)]
            thread_cache::gather(self.cache_id(), set, &mut stats);
            #[cfg(not(thread_cache))]
            {
                stats.requested_bytes = stats
                    .requested_bytes
                    .wrapping_add(set.requested.load(Ordering::Relaxed));
            }
        }
        stats.large_objects = self.large.objects.load(Ordering::Relaxed);
        stats.large_bytes = self.large.bytes.load(Ordering::Relaxed);
        stats.retained_arena_bytes = self.backing.retained_arena_bytes();
        stats.requested_bytes = stats
            .requested_bytes
            .wrapping_add(self.large.requested.load(Ordering::Relaxed));
        stats
    }

    /// The heaps, made now if this is the first use; null when the backing
    /// has no memory for them.
    #[inline]
    pub(crate) fn heap_set(&self) -> *const HeapSet {
        let set = self.set.load(Ordering::Acquire);
        if set.is_null() {
            self.create_heap_set()
        } else {
            set
        }
    }

    #[cold]
    fn create_heap_set(&self) -> *const HeapSet {
        track::detect();
        // Before the first lock the handlers take can be held.
        #[cfg(fork_handlers)]
        fork::ensure_handlers();
        // Caches only where they hold a small share of the memory: a
        // bounded span of at least CACHED_SPAN_SHARE full caches.
        #[cfg(thread_cache)]
        let cached = self.config().thread_caches()
            && track::thread_caches_allowed()
            && self.backing.span_len().is_none_or(|len| {
                len / CACHED_SPAN_SHARE
                    >= thread_cache::max_cache_bytes(self.config().medium_tier())
            });
        #[cfg(not(thread_cache))]
        let cached = false;
        // Shelves where no cache will serve, except under the debug
        // feature, whose double-free check asks a block's pool whether it
        // is free, and loom, whose models count blocks back in their pools
        // (a shelf is single-threaded code under the heap's lock and
        // changes nothing they check).
        let shelved = !cached && !cfg!(feature = "debug") && !cfg!(loom);
        let set = HeapSet::create(self.config(), &self.backing, shelved);
        if set.is_null() {
            return set;
        }
        match self
            .set
            .compare_exchange(ptr::null_mut(), set, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                #[cfg(thread_cache)]
                {
                    let id = if cached {
                        thread_cache::register()
                    } else {
                        thread_cache::UNCACHED
                    };
                    self.id.store(id, Ordering::Relaxed);
                }
                set
            }
            Err(winner) => {
                // SAFETY: ours alone: it was never published.
                unsafe { HeapSet::destroy(set, &self.backing) };
                winner
            }
        }
    }

    /// What thread caches call this allocator; 0 if nothing yet.
    #[cfg(thread_cache)]
    #[inline]
    fn cache_id(&self) -> usize {
        self.id.load(Ordering::Relaxed)
    }

    /// The published heap set.
    ///
    /// # Safety
    /// A block of this allocator is live (so the set exists).
    unsafe fn live_set(&self) -> &HeapSet {
        // SAFETY: per the contract the set was published before the block
        // was handed out, and lives as long as `self`.
        unsafe { &*self.set.load(Ordering::Acquire) }
    }

    /// Whether every request goes to the backing: AddressSanitizer's
    /// passthrough mode (see `build.rs`) over the system allocator.
    const PASSTHROUGH: bool = cfg!(passthrough) && B::SYSTEM_ALLOCATOR;

    /// The size class that serves `layout` from the pools; `None` sends
    /// it to the backing. Under AddressSanitizer's passthrough mode (see
    /// `build.rs`) a heap over the system allocator sends it every
    /// request, so the sanitizer sees each block; over a bounded backing,
    /// requests above `Config::pool_limit` go there too (one compare, and
    /// none over an unbounded backing: `B::BOUNDED` is a constant).
    #[inline(always)]
    pub(crate) fn pool_class(&self, layout: Layout) -> Option<usize> {
        if Self::PASSTHROUGH {
            return None;
        }
        if B::BOUNDED && layout.size() > self.config.pool_limit() {
            return None;
        }
        let class = class_for(layout.size(), layout.align());
        if let Some(class) = class {
            // SAFETY: `class_for` names classes of at most 512 bytes, of
            // which there are `CLASS_COUNT`. Knowing it, the compiler drops
            // the bounds checks of the per-class arrays on the fast path.
            unsafe { core::hint::assert_unchecked(class < CLASS_COUNT) };
        }
        class
    }

    /// The medium class that serves `layout`, for a request `pool_class`
    /// turned down; `None` sends it to the backing: too large, the tier
    /// off (as in a region under 256 MiB, `Region::fitted`) or the
    /// sanitizer's passthrough. Never on the small path, which keeps its
    /// instructions.
    #[inline]
    fn medium_class(&self, layout: Layout) -> Option<usize> {
        if Self::PASSTHROUGH || !self.config.medium_tier() {
            return None;
        }
        medium_class_for(layout.size(), layout.align())
    }

    /// The small or medium class serving `layout`, if any.
    #[inline]
    fn block_class(&self, layout: Layout) -> Option<usize> {
        self.pool_class(layout)
            .or_else(|| self.medium_class(layout))
    }

    /// Allocates `layout`, counting `requested` bytes as asked for, with
    /// its first `layout.size()` bytes zeroed if `zeroed`. A medium class
    /// takes the same path as a small one, the thread cache first.
    #[inline]
    pub(crate) fn allocate(&self, layout: Layout, requested: usize, zeroed: bool) -> *mut u8 {
        // Inline only what calls nothing (a tail call to `memset` aside):
        // with the refill, the shared path and the medium tier's lookup in
        // the same body, every allocation saved and restored six
        // registers around a fast path that needs none of them (split, a
        // LIFO pair runs 44 % fewer instructions, trees and churn 13 %).
        #[cfg(thread_cache)]
        if let Some(class) = self.pool_class(layout) {
            if let Some(block) = thread_cache::pop(self, class, requested) {
                // SAFETY: a fresh block of this class: `layout.size()` fits.
                return unsafe { Self::handed_out(block, layout.size(), zeroed) };
            }
        }
        self.allocate_slow(layout, requested, zeroed)
    }

    /// `allocate` past the thread cache's fast path: binding, refills, the
    /// shared path, the medium tier, large blocks.
    #[cfg_attr(thread_cache, inline(never))]
    #[cfg_attr(not(thread_cache), inline)]
    fn allocate_slow(&self, layout: Layout, requested: usize, zeroed: bool) -> *mut u8 {
        match self.pool_class(layout) {
            Some(class) => self.allocate_of_class(class, layout, requested, zeroed),
            None => self.allocate_beyond_small(layout, requested, zeroed),
        }
    }

    /// `allocate_slow` for a request over the small classes: its medium
    /// class, or a large block. Out of line, and reached by tail call, so
    /// that the small path keeps no frame.
    #[inline(never)]
    fn allocate_beyond_small(&self, layout: Layout, requested: usize, zeroed: bool) -> *mut u8 {
        match self.medium_class(layout) {
            Some(class) => self.allocate_of_class(class, layout, requested, zeroed),
            None => self.allocate_large(layout, requested, zeroed),
        }
    }

    /// `allocate_slow` once the small or medium `class` is known.
    #[inline(always)]
    fn allocate_of_class(
        &self,
        class: usize,
        layout: Layout,
        requested: usize,
        zeroed: bool,
    ) -> *mut u8 {
        // A never-cached allocator skips the cache's second look.
        #[cfg(thread_cache)]
        let cached = (self.cache_id() != thread_cache::UNCACHED)
            .then(|| thread_cache::alloc(self, class, requested))
            .flatten();
        #[cfg(thread_cache)]
        match cached {
            // SAFETY: a fresh block of this class: `layout.size()` fits.
            Some(block) if !block.is_null() => unsafe {
                Self::handed_out(block, layout.size(), zeroed)
            },
            // No cache, or its heap ran dry: the shared path reclaims
            // before it gives up.
            _ => self.alloc_shared(class, requested, layout.size(), zeroed),
        }
        #[cfg(not(thread_cache))]
        self.alloc_shared(class, requested, layout.size(), zeroed)
    }

    /// `block`, fresh from a class that `size` bytes fit, made the user's:
    /// told to memory tools and zeroed if `zeroed`. Null passes through.
    ///
    /// # Safety
    /// `block` is null or a fresh block of at least `size` bytes.
    #[inline(always)]
    unsafe fn handed_out(block: *mut u8, size: usize, zeroed: bool) -> *mut u8 {
        // SAFETY: per the contract.
        unsafe { track::allocated(block, size) };
        if zeroed && !block.is_null() {
            // SAFETY: the block has at least `size` bytes.
            unsafe { block.write_bytes(0, size) };
        }
        block
    }

    /// `handed_out` for a block that leaves a heap's hands (not a cache's).
    ///
    /// # Safety
    /// As for `handed_out`.
    #[inline(always)]
    unsafe fn heap_handed_out(block: *mut u8, size: usize, zeroed: bool) -> *mut u8 {
        if !block.is_null() {
            // SAFETY: per the contract.
            unsafe { track::heap_allocated(block, size) };
        }
        // SAFETY: per the contract.
        unsafe { Self::handed_out(block, size, zeroed) }
    }

    /// A large block, from the backing.
    fn allocate_large(&self, layout: Layout, requested: usize, zeroed: bool) -> *mut u8 {
        // A region's store (and the debug list of large blocks) may be
        // locked first here, before any heap set exists.
        #[cfg(fork_handlers)]
        fork::ensure_handlers();
        let layout = large_layout(layout);
        // A backing may have zeroed memory for free (fresh pages).
        let get = || {
            if zeroed {
                self.backing.alloc_zeroed(layout)
            } else {
                self.backing.alloc(layout)
            }
        };
        let mut block = get();
        if block.is_null() && self.reclaim() {
            block = get();
        }
        if !block.is_null() {
            self.large.add(layout.size(), requested);
        }
        block
    }

    /// Before a null: the calling thread's cached blocks go back to their
    /// pools, inboxes and shelves are emptied and every heap's spare and
    /// retired arenas go back to the backing. False if there are no heaps (so nothing
    /// to reclaim).
    #[cold]
    fn reclaim(&self) -> bool {
        let set = self.set.load(Ordering::Acquire);
        if set.is_null() {
            return false;
        }
        let _internal = track::internal();
        #[cfg(thread_cache)]
        thread_cache::flush_all(self);
        // SAFETY: a published set lives as long as `self`.
        unsafe { &*set }.release_free_arenas(&self.backing);
        true
    }

    /// A block of `class` for `size` bytes (`requested` asked for, zeroed
    /// if `zeroed`), handed out, from a heap chosen without thread-local
    /// storage. Its common case, a block on the shelf of a heap free to
    /// take, calls nothing when there is one heap a group, so it saves no
    /// registers: everything else leaves by tail call, the held heap
    /// passed on in registers.
    #[inline(always)]
    fn alloc_shared(&self, class: usize, requested: usize, size: usize, zeroed: bool) -> *mut u8 {
        let set = self.set.load(Ordering::Acquire);
        // SAFETY: a published set lives as long as `self`.
        let set = unsafe { set.as_ref() };
        // The debug feature's heaps have no shelves (its double-free check
        // asks the pools), so the fast path would only take a frame.
        let Some(set) = set.filter(|_| !cfg!(feature = "debug")) else {
            return self.alloc_locked(None, class, requested, size, zeroed);
        };
        if set.heaps() != 1 {
            return self.alloc_shared_hinted(set, class, requested, size, zeroed);
        }
        self.alloc_shared_from(set, set.group(class), class, requested, size, zeroed)
    }

    /// `alloc_shared` among several heaps a group: the hint that spreads
    /// threads over them takes a local's address, so this path keeps a
    /// frame and is out of line.
    #[inline(never)]
    fn alloc_shared_hinted(
        &self,
        set: &HeapSet,
        class: usize,
        requested: usize,
        size: usize,
        zeroed: bool,
    ) -> *mut u8 {
        let index = set.group(class) + set.stack_heap();
        self.alloc_shared_from(set, index, class, requested, size, zeroed)
    }

    /// `alloc_shared` from heap `index` of `set`, tried first.
    #[inline(always)]
    fn alloc_shared_from(
        &self,
        set: &HeapSet,
        index: usize,
        class: usize,
        requested: usize,
        size: usize,
        zeroed: bool,
    ) -> *mut u8 {
        let Some(mut held) = set.try_take(index, &self.backing) else {
            return self.alloc_locked(None, class, requested, size, zeroed);
        };
        let internal = track::internal();
        let block = held.take_shelved(class);
        if block.is_null() {
            drop(internal);
            return self.alloc_locked(Some(held), class, requested, size, zeroed);
        }
        // Counted under the lock already held: a shared counter would cost
        // every call an atomic add.
        held.requested = held.requested.wrapping_add(requested);
        let left = held.leave();
        drop(internal);
        match left {
            // SAFETY: a fresh block of this class: `size` fits.
            Ok(()) => unsafe { Self::heap_handed_out(block, size, zeroed) },
            // SAFETY: as above.
            Err(mail) => unsafe { Self::handed_out_after_mail(mail, block, size, zeroed) },
        }
    }

    /// `alloc_shared` that found mail on leaving: collects it, then hands
    /// `block` out.
    ///
    /// # Safety
    /// As for `handed_out`.
    #[cold]
    #[inline(never)]
    unsafe fn handed_out_after_mail(
        mail: Mail<'_, B>,
        block: *mut u8,
        size: usize,
        zeroed: bool,
    ) -> *mut u8 {
        let internal = track::internal();
        mail.collect();
        drop(internal);
        // SAFETY: forwarded contract.
        unsafe { Self::heap_handed_out(block, size, zeroed) }
    }

    /// `alloc_shared` past its fast path, with the heap it took (`None`:
    /// the set is not made yet or that heap was busy). Zeroing is a
    /// parameter of the type so that the rest takes six arguments, all in
    /// registers, and both calls to it are tail calls.
    #[inline(always)]
    fn alloc_locked(
        &self,
        held: Option<Held<'_, B>>,
        class: usize,
        requested: usize,
        size: usize,
        zeroed: bool,
    ) -> *mut u8 {
        if zeroed {
            self.alloc_locked_as::<true>(held, class, requested, size)
        } else {
            self.alloc_locked_as::<false>(held, class, requested, size)
        }
    }

    /// `alloc_locked`, zeroing if `ZEROED`.
    #[inline(never)]
    fn alloc_locked_as<const ZEROED: bool>(
        &self,
        held: Option<Held<'_, B>>,
        class: usize,
        requested: usize,
        size: usize,
    ) -> *mut u8 {
        let set = self.heap_set();
        if set.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: a published set lives as long as `self`.
        let set = unsafe { &*set };
        let internal = track::internal();
        let mut held = match held {
            Some(mut held) => {
                held.take_mail();
                held
            }
            None => set.hold(class, set.stack_heap(), &self.backing),
        };
        let mut block = held.alloc(class, &self.backing);
        if !block.is_null() {
            held.requested = held.requested.wrapping_add(requested);
        }
        drop(held);
        set.tend(&self.backing);
        if block.is_null() {
            // Null means the memory is gone: first the calling thread's
            // cached blocks go back, then every heap is asked in turn.
            #[cfg(thread_cache)]
            thread_cache::flush_all(self);
            block = set.alloc_from_any(class, &self.backing);
            if !block.is_null() {
                set.requested.fetch_add(requested, Ordering::Relaxed);
            }
        }
        drop(internal);
        // SAFETY: null, or a fresh block of this class: `size` fits.
        unsafe { Self::heap_handed_out(block, size, ZEROED) }
    }

    /// Frees a small block of `class`; first forgets its trace if
    /// `tracing` (tracemalloc's filter says the block may have one, and the
    /// caller has not dealt with it).
    ///
    /// # Safety
    /// `ptr` came from `allocate` with a layout of class `class` and
    /// `requested` bytes, and has not been freed since.
    #[inline]
    unsafe fn free_small(&self, ptr: *mut u8, class: usize, requested: usize, tracing: bool) {
        #[cfg(thread_cache)]
        // SAFETY: forwarded contract.
        if !tracing && unsafe { thread_cache::free(self, ptr, class, requested, false) } {
            return;
        }
        // SAFETY: forwarded contract.
        unsafe { self.free_slow(ptr, class, requested, tracing) }
    }

    /// The rest of `free_small`, out of line with thread caches so that
    /// the inlined path has one call for all of it: a block that may be
    /// traced to `free_traced`, the rest to `free_binding`. It only
    /// tail-calls, so it keeps no frame.
    ///
    /// # Safety
    /// As for `free_small`.
    #[cfg_attr(thread_cache, inline(never))]
    unsafe fn free_slow(&self, ptr: *mut u8, class: usize, requested: usize, tracing: bool) {
        #[cfg(all(feature = "std", not(loom)))]
        if tracing {
            // SAFETY: forwarded contract.
            return unsafe { self.free_traced(ptr, class, requested) };
        }
        let _ = tracing;
        // SAFETY: forwarded contract.
        unsafe { self.free_binding(ptr, class, requested) }
    }

    /// `free_slow` for a block tracemalloc may trace: the trace goes first
    /// (once freed, another thread may be given the address and record its
    /// own trace there).
    ///
    /// # Safety
    /// As for `free_small`.
    #[cfg(all(feature = "std", not(loom)))]
    #[cold]
    #[inline(never)]
    unsafe fn free_traced(&self, ptr: *mut u8, class: usize, requested: usize) {
        tracemalloc::forget(ptr, self.pool_place(class));
        // SAFETY: forwarded contract.
        unsafe { self.free_binding(ptr, class, requested) }
    }

    /// Frees a small block through a cache not yet bound to this
    /// allocator, bound here if it can be, or else into its heap.
    ///
    /// # Safety
    /// As for `free_small`.
    #[cfg_attr(thread_cache, inline(never))]
    unsafe fn free_binding(&self, ptr: *mut u8, class: usize, requested: usize) {
        // An allocator that is never cached asks no cache: its every free
        // comes here, and the look at the thread's cache and the frame it
        // needs cost each free 9 instructions.
        #[cfg(thread_cache)]
        if self.cache_id() != thread_cache::UNCACHED
            // SAFETY: forwarded contract.
            && unsafe { self.free_to_binding_cache(ptr, class, requested) }
        {
            return;
        }
        let _ = class;
        // SAFETY: forwarded contract: the block is live, its user done.
        unsafe { track::heap_freed(ptr) };
        let _internal = track::internal();
        // SAFETY: forwarded contract: the block is live.
        let set = unsafe { self.live_set() };
        // SAFETY: forwarded contract.
        unsafe { set.free(ptr, class, requested, &self.backing) };
    }

    /// `free_binding`'s try of the thread's cache, binding it to this
    /// allocator if it can be: out of line, so that the locked path that
    /// follows it keeps no frame.
    ///
    /// # Safety
    /// As for `free_small`.
    #[cfg(thread_cache)]
    #[inline(never)]
    unsafe fn free_to_binding_cache(&self, ptr: *mut u8, class: usize, requested: usize) -> bool {
        // SAFETY: forwarded contract.
        unsafe { thread_cache::free(self, ptr, class, requested, true) }
    }

    /// Frees what `allocate(layout, requested)` returned.
    ///
    /// # Safety
    /// `ptr` came from `allocate` with this `layout` and `requested` and has
    /// not been freed since.
    #[inline]
    pub(crate) unsafe fn deallocate(&self, ptr: *mut u8, layout: Layout, requested: usize) {
        if let Some(class) = self.pool_class(layout) {
            // SAFETY: forwarded contract: the block is live with this size
            // and its user is done with it.
            unsafe {
                track::freed(ptr, layout.size());
                self.free_small(ptr, class, requested, false)
            }
        } else {
            // SAFETY: forwarded contract.
            unsafe { self.deallocate_beyond_small(ptr, layout, requested) }
        }
    }

    /// # Safety
    /// As for `deallocate`, with a layout of no small class.
    #[inline(never)]
    unsafe fn deallocate_beyond_small(&self, ptr: *mut u8, layout: Layout, requested: usize) {
        if let Some(class) = self.medium_class(layout) {
            // SAFETY: forwarded contract: `allocate` served this layout
            // from the medium class it still names (the tier's switch is
            // fixed while blocks live).
            return unsafe {
                track::freed(ptr, layout.size());
                self.free_small(ptr, class, requested, false)
            };
        }
        let layout = large_layout(layout);
        // SAFETY: forwarded contract; `large_layout` is the layout
        // `allocate` gave the backing.
        unsafe { self.backing.dealloc(ptr, layout) };
        self.large.remove(layout.size(), requested);
    }

    /// Resizes what `allocate(layout, requested)` returned to `new_size`
    /// bytes (`new_requested` asked for): in place within a class (small
    /// or medium), by the backing for large to large, by copying the old
    /// block's bytes, no more, otherwise.
    ///
    /// # Safety
    /// As for `deallocate`.
    pub(crate) unsafe fn reallocate(
        &self,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
        requested: usize,
        new_requested: usize,
    ) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return ptr::null_mut();
        };
        let old_class = self.block_class(layout);
        let new_class = self.block_class(new_layout);
        if old_class.is_some() && old_class == new_class {
            // SAFETY: forwarded contract: the block is live, and `new_size`
            // fits its class.
            unsafe { track::resized(ptr, layout.size(), new_size) };
            let delta = new_requested.wrapping_sub(requested);
            #[cfg(thread_cache)]
            if thread_cache::add_requested(self, delta) {
                return ptr;
            }
            // SAFETY: forwarded contract: the block is live.
            let set = unsafe { self.live_set() };
            set.requested.fetch_add(delta, Ordering::Relaxed);
            return ptr;
        }
        if old_class.is_none() && new_class.is_none() {
            let (old, new) = (large_layout(layout), large_layout(new_layout));
            // SAFETY: forwarded contract; `new` is a valid layout.
            let block = unsafe { self.backing.realloc(ptr, old, new.size()) };
            if !block.is_null() {
                self.large.remove(old.size(), requested);
                self.large.add(new.size(), new_requested);
            }
            return block;
        }
        let block = self.allocate(new_layout, new_requested, false);
        if !block.is_null() {
            // SAFETY: both blocks are live, distinct, and at least this long;
            // the old one is then freed once, per the contract.
            unsafe {
                ptr::copy_nonoverlapping(ptr, block, layout.size().min(new_size));
                self.deallocate(ptr, layout, requested);
            }
        }
        block
    }
}

#[cfg(feature = "debug")]
impl<B: Backing> debug::Unchecked for PyMalloc<B> {
    #[inline]
    fn allocate(&self, layout: Layout, requested: usize, zeroed: bool) -> *mut u8 {
        PyMalloc::allocate(self, layout, requested, zeroed)
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: *mut u8, layout: Layout, requested: usize) {
        // SAFETY: forwarded contract.
        unsafe { PyMalloc::deallocate(self, ptr, layout, requested) }
    }

    #[inline]
    unsafe fn reallocate(
        &self,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
        requested: usize,
        new_requested: usize,
    ) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { PyMalloc::reallocate(self, ptr, layout, new_size, requested, new_requested) }
    }

    fn pool_class(&self, layout: Layout) -> Option<usize> {
        PyMalloc::block_class(self, layout)
    }

    fn block_status(&self, block: *mut u8, class: usize) -> BlockStatus {
        let set = self.set.load(Ordering::Acquire);
        if set.is_null() {
            return BlockStatus::Foreign;
        }
        let _internal = track::internal();
        // SAFETY: a published set lives as long as `self`.
        unsafe { &*set }.status(block, class, &self.backing)
    }

    fn large_blocks(&self) -> &Lock<debug::LargeList> {
        &self.large_blocks
    }
}

#[cfg(thread_cache)]
impl<B: Backing> thread_cache::CacheOwner for PyMalloc<B> {
    type Backing = B;

    #[inline]
    fn cache_id(&self) -> usize {
        PyMalloc::cache_id(self)
    }

    #[inline]
    fn heap_set(&self) -> *const HeapSet {
        PyMalloc::heap_set(self)
    }

    #[inline]
    fn backing(&self) -> &B {
        &self.backing
    }
}

impl<B: Backing> Drop for PyMalloc<B> {
    /// Gives the arenas back to the backing. Large objects still live stay
    /// with the backing: only their owners know where they are.
    fn drop(&mut self) {
        // First, so that no thread cache touches our blocks from now on.
        #[cfg(thread_cache)]
        thread_cache::unregister(self.cache_id());
        let set = self.set.load(Ordering::Acquire);
        if !set.is_null() {
            let _internal = track::internal();
            // SAFETY: `&mut self` means no allocation call is in progress,
            // no thread cache refers to the set any more, and a block must
            // not outlive the allocator that served it.
            unsafe { HeapSet::destroy(set, &self.backing) }
        }
    }
}

/// The layout a large request takes from the backing: a zero-size request
/// (only possible with an alignment over 512) gets one alignment's worth,
/// since backings need not serve zero bytes.
#[inline]
fn large_layout(layout: Layout) -> Layout {
    if layout.size() == 0 {
        // SAFETY: `align` is a power of two and, as a size rounded to
        // itself, cannot overflow `isize`.
        unsafe { Layout::from_size_align_unchecked(layout.align(), layout.align()) }
    } else {
        layout
    }
}

/// The `GlobalAlloc` calls behind the limit and injection gate (the entry
/// points are in `inject.rs`): tracemalloc's hook, then the debug checks or
/// not. The hooks are the same in every mode, so sampling costs the fast
/// path what tracing off does: `alloc` counts its size down on a thread
/// local and calls the sampler only when that runs out (see
/// `tracemalloc::counted_out`), and `dealloc` tests the address filter,
/// all zeros while tracing is off (see `quick_dealloc`).
impl<B: Backing> PyMalloc<B> {
    #[inline(always)]
    pub(crate) fn front_alloc(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        // A countdown run out leaves by a tail call: the sampling decision
        // called out of line and came back, so every allocation saved
        // registers for it.
        #[cfg(all(feature = "std", not(loom)))]
        if tracemalloc::counted_out(layout.size()) {
            return self.counted_out_alloc(layout, zeroed);
        }
        self.untraced_alloc(layout, zeroed)
    }

    /// `front_alloc` once the thread's countdown ran out: traced if
    /// tracemalloc samples this one.
    #[cfg(all(feature = "std", not(loom)))]
    #[cold]
    #[inline(never)]
    fn counted_out_alloc(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        if tracemalloc::sample_point(layout.size()) {
            return self.traced_alloc(layout, zeroed);
        }
        self.untraced_alloc(layout, zeroed)
    }

    /// # Safety
    /// As for `GlobalAlloc::dealloc`.
    #[inline(always)]
    pub(crate) unsafe fn front_dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(all(feature = "std", not(loom)))]
        if tracemalloc::may_be_traced(ptr) {
            // SAFETY: forwarded contract.
            return unsafe { self.traced_dealloc(ptr, layout) };
        }
        // SAFETY: forwarded contract.
        unsafe { self.untraced_dealloc(ptr, layout) }
    }

    /// The free fast path, inlined into every caller: a small block of a
    /// class-step alignment, to the bound thread cache or, through one
    /// out-of-line call (`free_slow`), to tracemalloc's filter, a cache
    /// still to bind or its heap. False, with nothing done, for everything
    /// else (debug checks, large blocks, large alignments), which the
    /// caller sends to the gated path: one cold call site instead of one
    /// per case keeps `dealloc` small enough for LLVM to inline into drop
    /// glue (a recursive drop such as a tree's paid a call and a frame per
    /// node otherwise).
    ///
    /// # Safety
    /// As for `GlobalAlloc::dealloc`.
    #[inline(always)]
    pub(crate) unsafe fn quick_dealloc(&self, ptr: *mut u8, layout: Layout) -> bool {
        // Alignments above a class step need rounding: rare, so they take
        // the long way and the inlined path has none of that code.
        if cfg!(feature = "debug") || layout.align() > CLASS_STEP {
            return false;
        }
        let Some(class) = self.pool_class(layout) else {
            return false;
        };
        // The filter alone, not `on()` first: it is all zeros while
        // tracing is off, so one test serves every mode, and a free while
        // sampling stays on the inline path unless its block may be traced.
        #[cfg(all(feature = "std", not(loom)))]
        let tracing = tracemalloc::may_be_traced(ptr);
        #[cfg(not(all(feature = "std", not(loom))))]
        let tracing = false;
        // SAFETY: forwarded contract: the block is live with this size and
        // its user is done with it.
        unsafe {
            track::freed(ptr, layout.size());
            self.free_small(ptr, class, layout.size(), tracing);
        }
        true
    }

    /// # Safety
    /// As for `GlobalAlloc::realloc`.
    #[inline(always)]
    pub(crate) unsafe fn front_realloc(
        &self,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
    ) -> *mut u8 {
        #[cfg(all(feature = "std", not(loom)))]
        if tracemalloc::on() {
            // SAFETY: forwarded contract.
            return unsafe { self.traced_realloc(ptr, layout, new_size) };
        }
        // SAFETY: forwarded contract.
        unsafe { self.untraced_realloc(ptr, layout, new_size) }
    }

    #[inline(always)]
    fn untraced_alloc(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        #[cfg(feature = "debug")]
        return debug::alloc(self, layout, zeroed);
        #[cfg(not(feature = "debug"))]
        self.allocate(layout, layout.size(), zeroed)
    }

    /// # Safety
    /// As for `GlobalAlloc::dealloc`.
    #[inline(always)]
    unsafe fn untraced_dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(feature = "debug")]
        // SAFETY: forwarded contract.
        unsafe {
            debug::dealloc(self, ptr, layout)
        }
        #[cfg(not(feature = "debug"))]
        // SAFETY: forwarded contract.
        unsafe {
            self.deallocate(ptr, layout, layout.size())
        }
    }

    /// # Safety
    /// As for `GlobalAlloc::realloc`.
    #[inline(always)]
    unsafe fn untraced_realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        #[cfg(feature = "debug")]
        // SAFETY: forwarded contract.
        return unsafe { debug::realloc(self, ptr, layout, new_size) };
        #[cfg(not(feature = "debug"))]
        // SAFETY: forwarded contract.
        unsafe {
            self.reallocate(ptr, layout, new_size, layout.size(), new_size)
        }
    }

    /// Where tracemalloc keeps the trace of a block of `layout`: in its
    /// pool's side array, or (large blocks, and the `debug` feature's
    /// wrapped ones) by address.
    #[cfg(all(feature = "std", not(loom)))]
    #[inline]
    fn trace_place(&self, layout: Layout) -> tracemalloc::Place {
        match self.pool_class(layout) {
            Some(class) if !cfg!(feature = "debug") => self.pool_place(class),
            _ => tracemalloc::Place::ELSEWHERE,
        }
    }

    /// Where tracemalloc keeps the trace of a pool block of `class`.
    #[cfg(all(feature = "std", not(loom)))]
    #[inline]
    fn pool_place(&self, class: usize) -> tracemalloc::Place {
        tracemalloc::Place::pool(
            self.config.pool_size(),
            super::size_class::class_size(class),
        )
    }

    /// Allocates and records the block with tracemalloc; if the trace
    /// cannot be stored, frees it and fails, as CPython does.
    #[cfg(all(feature = "std", not(loom)))]
    #[cold]
    #[inline(never)]
    fn traced_alloc(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let block = self.untraced_alloc(layout, zeroed);
        if block.is_null() || tracemalloc::record(block, layout.size(), self.trace_place(layout)) {
            return block;
        }
        // SAFETY: a live block of `layout`, just allocated, freed once.
        unsafe { self.untraced_dealloc(block, layout) };
        ptr::null_mut()
    }

    /// Forgets the block's trace, then frees it.
    ///
    /// # Safety
    /// As for `GlobalAlloc::dealloc`.
    #[cfg(all(feature = "std", not(loom)))]
    #[cold]
    #[inline(never)]
    unsafe fn traced_dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Before the free: once freed, another thread may be given the
        // address and record its own trace there.
        tracemalloc::forget(ptr, self.trace_place(layout));
        // SAFETY: forwarded contract.
        unsafe { self.untraced_dealloc(ptr, layout) }
    }

    /// `realloc` that moves the block's trace with it, or puts it back if
    /// the block stays where it was because the request failed.
    ///
    /// # Safety
    /// As for `GlobalAlloc::realloc`.
    #[cfg(all(feature = "std", not(loom)))]
    #[cold]
    unsafe fn traced_realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Taken off first, as in `dealloc`: the old address may be freed.
        let place = self.trace_place(layout);
        let removed = tracemalloc::forget(ptr, place);
        // SAFETY: forwarded contract.
        let block = unsafe { self.untraced_realloc(ptr, layout, new_size) };
        if block.is_null() {
            if let Some(removed) = removed {
                tracemalloc::restore(ptr, place, removed);
            }
        } else if tracemalloc::sample(new_size) {
            // The user's old block may be gone: the new one cannot be
            // failed, so a trace that cannot be stored is just not kept.
            // (The new layout is valid: the block was allocated with it.)
            let new_place = Layout::from_size_align(new_size, layout.align())
                .map_or(tracemalloc::Place::ELSEWHERE, |new| self.trace_place(new));
            tracemalloc::record(block, new_size, new_place);
        }
        block
    }
}
