//! [`PyMalloc`]: the `GlobalAlloc` front, routing each request to the pools
//! or to the backing's fallback.

use crate::backing::Backing;
use crate::backing::Region;
#[cfg(feature = "std")]
use crate::backing::System;
use crate::config::Config;
use crate::heaps::{stack_hint, HeapSet};
use crate::size_class::class_for;
use crate::stats::Stats;
use crate::sync::{loom_const_fn, AtomicPtr, AtomicUsize, Ordering};
#[cfg(thread_cache)]
use crate::thread_cache;
use core::alloc::{GlobalAlloc, Layout};
use core::ptr;

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
/// short per-class lists of free blocks, so most calls take no lock at all.
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
    config: Config,
    backing: B,
    large: LargeCounters,
    /// Live large blocks, for the debug feature's ownership checks.
    #[cfg(feature = "debug")]
    pub(crate) large_blocks: crate::sync::Lock<crate::debug::LargeList>,
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
        /// with the default geometry.
        ///
        /// ```
        /// use pymalloc::{PyMalloc, Region};
        ///
        /// static mut HEAP: [u8; 1 << 20] = [0; 1 << 20];
        /// // SAFETY: HEAP is used by nothing but this allocator.
        /// static ALLOC: PyMalloc<Region> = unsafe { PyMalloc::region(&raw mut HEAP) };
        /// ```
        ///
        /// # Safety
        /// `heap` points to `N` bytes valid for reads and writes that nothing
        /// else uses while the allocator lives (a raw pointer cannot prove
        /// that, hence `unsafe`).
        ///
        /// # Panics
        /// If `N` is too small for one arena plus alignment slack
        /// ([`Region::min_len`]); in a `static` that is a compile error:
        ///
        /// ```compile_fail
        /// use pymalloc::{PyMalloc, Region};
        ///
        /// static mut HEAP: [u8; 64 * 1024] = [0; 64 * 1024];
        /// // A 256 KiB arena cannot fit in 64 KiB: rejected at compile time.
        /// static ALLOC: PyMalloc<Region> = unsafe { PyMalloc::region(&raw mut HEAP) };
        /// ```
        pub unsafe fn region<const N: usize>(heap: *mut [u8; N]) -> Self {
            // SAFETY: forwarded contract.
            unsafe { Self::region_with(heap, Config::DEFAULT) }
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
        /// As for [`PyMalloc::region`].
        pub unsafe fn region_with<const N: usize>(heap: *mut [u8; N], config: Config) -> Self {
            assert!(
                N >= Region::min_len(config),
                "pymalloc: the region is too small for one arena of this Config"
            );
            // SAFETY: forwarded contract.
            Self::with_backing(unsafe { Region::new(heap.cast(), N) }, config)
        }
    }

    loom_const_fn! {
        /// A heap whose region is given later by [`PyMalloc::init`]; until
        /// then every allocation returns null.
        pub fn region_uninit(config: Config) -> Self {
            // SAFETY: an empty span promises nothing.
            Self::with_backing(unsafe { Region::new(ptr::null_mut(), 0) }, config)
        }
    }

    /// Gives a [`PyMalloc::region_uninit`] heap its memory: `len` bytes at
    /// `start`. A misaligned start or odd length is trimmed to 16-byte
    /// boundaries.
    ///
    /// # Safety
    /// The span is valid for reads and writes and used by nothing else while
    /// the allocator lives.
    ///
    /// # Panics
    /// If the heap already has memory, or the trimmed span is shorter than
    /// [`Region::min_len`].
    pub unsafe fn init(&self, start: *mut u8, len: usize) {
        // SAFETY: forwarded contract.
        unsafe { self.backing.set_span(start, len, self.config()) }
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
                config,
                backing,
                large: LargeCounters {
                    objects: AtomicUsize::new(0),
                    bytes: AtomicUsize::new(0),
                    requested: AtomicUsize::new(0),
                },
                #[cfg(feature = "debug")]
                large_blocks: crate::sync::Lock::new(crate::debug::LargeList::new()),
            }
        }
    }

    /// The heap's geometry.
    pub fn config(&self) -> Config {
        self.config
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
    /// inbox of remotely freed blocks is emptied on the way.
    pub fn stats(&self) -> Stats {
        let mut stats = Stats::empty(self.config.pool_size(), self.config.arena_size());
        let set = self.set.load(Ordering::Acquire);
        if !set.is_null() {
            #[cfg(thread_cache)]
            thread_cache::flush_all(self);
            // SAFETY: a published set lives as long as `self`.
            let set = unsafe { &*set };
            for index in 0..set.count() {
                set.hold_exactly(index, &self.backing).gather(&mut stats);
            }
            stats.bookkeeping_bytes += set.bytes();
            stats.requested_bytes = stats
                .requested_bytes
                .wrapping_add(set.requested.load(Ordering::Relaxed));
            #[cfg(thread_cache)]
            set.caches.gather(&mut stats);
        }
        stats.large_objects = self.large.objects.load(Ordering::Relaxed);
        stats.large_bytes = self.large.bytes.load(Ordering::Relaxed);
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
        let set = HeapSet::create(self.config, &self.backing);
        if set.is_null() {
            return set;
        }
        match self
            .set
            .compare_exchange(ptr::null_mut(), set, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                #[cfg(thread_cache)]
                self.id.store(thread_cache::register(), Ordering::Relaxed);
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
    pub(crate) fn cache_id(&self) -> usize {
        self.id.load(Ordering::Relaxed)
    }

    /// Where `block`, claimed to be of `class`, stands in this allocator.
    #[cfg(feature = "debug")]
    pub(crate) fn block_status(&self, block: *mut u8, class: usize) -> crate::heap::BlockStatus {
        let set = self.set.load(Ordering::Acquire);
        if set.is_null() {
            return crate::heap::BlockStatus::Foreign;
        }
        // SAFETY: a published set lives as long as `self`.
        unsafe { &*set }.status(block, class, &self.backing)
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

    /// Allocates `layout`, counting `requested` bytes as asked for, with
    /// its first `layout.size()` bytes zeroed if `zeroed`.
    #[inline]
    pub(crate) fn allocate(&self, layout: Layout, requested: usize, zeroed: bool) -> *mut u8 {
        let Some(class) = class_for(layout.size(), layout.align()) else {
            return self.allocate_large(layout, requested, zeroed);
        };
        #[cfg(thread_cache)]
        let block = match thread_cache::alloc(self, class, requested) {
            Some(block) => block,
            None => self.alloc_shared(class, requested),
        };
        #[cfg(not(thread_cache))]
        let block = self.alloc_shared(class, requested);
        if zeroed && !block.is_null() {
            // SAFETY: the block has at least `layout.size()` bytes.
            unsafe { block.write_bytes(0, layout.size()) };
        }
        block
    }

    /// A large block, from the backing. Out of line: the small path is the
    /// hot one.
    #[inline(never)]
    fn allocate_large(&self, layout: Layout, requested: usize, zeroed: bool) -> *mut u8 {
        let layout = large_layout(layout);
        // A backing may have zeroed memory for free (fresh pages).
        let block = if zeroed {
            self.backing.alloc_zeroed(layout)
        } else {
            self.backing.alloc(layout)
        };
        if !block.is_null() {
            self.large.add(layout.size(), requested);
        }
        block
    }

    /// A block of `class` from a heap chosen without thread-local storage.
    #[cfg_attr(thread_cache, inline(never))]
    fn alloc_shared(&self, class: usize, requested: usize) -> *mut u8 {
        let set = self.heap_set();
        if set.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: a published set lives as long as `self`.
        let set = unsafe { &*set };
        let block = set
            .hold(stack_hint(), &self.backing)
            .alloc(class, &self.backing);
        if !block.is_null() {
            set.requested.fetch_add(requested, Ordering::Relaxed);
        }
        block
    }

    /// Frees a small block of `class`.
    ///
    /// # Safety
    /// `ptr` came from `allocate` with a layout of class `class` and
    /// `requested` bytes, and has not been freed since.
    #[inline]
    unsafe fn free_small(&self, ptr: *mut u8, class: usize, requested: usize) {
        #[cfg(thread_cache)]
        // SAFETY: forwarded contract.
        if unsafe { thread_cache::free(self, ptr, class, requested) } {
            return;
        }
        let _ = class;
        // SAFETY: forwarded contract.
        unsafe { self.free_shared(ptr, requested) }
    }

    /// Frees a small block into its heap, without a thread cache.
    ///
    /// # Safety
    /// As for `free_small`.
    #[cfg_attr(thread_cache, inline(never))]
    unsafe fn free_shared(&self, ptr: *mut u8, requested: usize) {
        // SAFETY: forwarded contract: the block is live.
        let set = unsafe { self.live_set() };
        // SAFETY: forwarded contract.
        unsafe { set.free(ptr, requested, &self.backing) };
    }

    /// Frees what `allocate(layout, requested)` returned.
    ///
    /// # Safety
    /// `ptr` came from `allocate` with this `layout` and `requested` and has
    /// not been freed since.
    #[inline]
    pub(crate) unsafe fn deallocate(&self, ptr: *mut u8, layout: Layout, requested: usize) {
        if let Some(class) = class_for(layout.size(), layout.align()) {
            // SAFETY: forwarded contract.
            unsafe { self.free_small(ptr, class, requested) }
        } else {
            // SAFETY: forwarded contract.
            unsafe { self.deallocate_large(ptr, layout, requested) }
        }
    }

    /// # Safety
    /// As for `deallocate`, with a large `layout`.
    #[inline(never)]
    unsafe fn deallocate_large(&self, ptr: *mut u8, layout: Layout, requested: usize) {
        let layout = large_layout(layout);
        // SAFETY: forwarded contract; `large_layout` is the layout
        // `allocate` gave the backing.
        unsafe { self.backing.dealloc(ptr, layout) };
        self.large.remove(layout.size(), requested);
    }

    /// Resizes what `allocate(layout, requested)` returned to `new_size`
    /// bytes (`new_requested` asked for): in place within a class, by the
    /// backing for large to large, by copying otherwise.
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
        let old_class = class_for(layout.size(), layout.align());
        let new_class = class_for(new_size, layout.align());
        if old_class.is_some() && old_class == new_class {
            // SAFETY: forwarded contract: the block is live.
            let set = unsafe { self.live_set() };
            set.requested
                .fetch_add(new_requested.wrapping_sub(requested), Ordering::Relaxed);
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

impl<B: Backing> Drop for PyMalloc<B> {
    /// Gives the arenas back to the backing. Large objects still live stay
    /// with the backing: only their owners know where they are.
    fn drop(&mut self) {
        // First, so that no thread cache touches our blocks from now on.
        #[cfg(thread_cache)]
        thread_cache::unregister(self.cache_id());
        let set = self.set.load(Ordering::Acquire);
        if !set.is_null() {
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

// SAFETY: blocks come from pools (disjoint blocks of arenas the heap owns,
// aligned per `size_class`) or from the backing, which keeps the same
// promises; every path returns null rather than panic when memory runs out.
unsafe impl<B: Backing> GlobalAlloc for PyMalloc<B> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        #[cfg(feature = "debug")]
        let block = self.debug_alloc(layout, false);
        #[cfg(not(feature = "debug"))]
        let block = self.allocate(layout, layout.size(), false);
        #[cfg(all(feature = "std", not(loom)))]
        if crate::tracemalloc::on() && crate::tracemalloc::wants(layout.size()) {
            // SAFETY: `block` is null or fresh from this very layout.
            return unsafe { self.traced(block, layout) };
        }
        block
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        #[cfg(feature = "debug")]
        let block = self.debug_alloc(layout, true);
        #[cfg(not(feature = "debug"))]
        let block = self.allocate(layout, layout.size(), true);
        #[cfg(all(feature = "std", not(loom)))]
        if crate::tracemalloc::on() && crate::tracemalloc::wants(layout.size()) {
            // SAFETY: as in `alloc`.
            return unsafe { self.traced(block, layout) };
        }
        block
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(all(feature = "std", not(loom)))]
        if crate::tracemalloc::on() && crate::tracemalloc::may_be_traced(ptr) {
            // Before the free: once freed, another thread may be given the
            // address and record its own trace there.
            crate::tracemalloc::forget(ptr);
        }
        // SAFETY: forwarded contract.
        unsafe { self.untraced_dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        #[cfg(all(feature = "std", not(loom)))]
        if crate::tracemalloc::on() {
            // SAFETY: forwarded contract.
            return unsafe { self.traced_realloc(ptr, layout, new_size) };
        }
        // SAFETY: forwarded contract.
        unsafe { self.untraced_realloc(ptr, layout, new_size) }
    }
}

impl<B: Backing> PyMalloc<B> {
    /// `GlobalAlloc::dealloc` without tracemalloc's hook.
    ///
    /// # Safety
    /// As for `GlobalAlloc::dealloc`.
    #[inline]
    unsafe fn untraced_dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(feature = "debug")]
        // SAFETY: forwarded contract.
        unsafe {
            self.debug_dealloc(ptr, layout)
        }
        #[cfg(not(feature = "debug"))]
        // SAFETY: forwarded contract.
        unsafe {
            self.deallocate(ptr, layout, layout.size())
        }
    }

    /// `GlobalAlloc::realloc` without tracemalloc's hook.
    ///
    /// # Safety
    /// As for `GlobalAlloc::realloc`.
    #[inline]
    unsafe fn untraced_realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        #[cfg(feature = "debug")]
        // SAFETY: forwarded contract.
        return unsafe { self.debug_realloc(ptr, layout, new_size) };
        #[cfg(not(feature = "debug"))]
        // SAFETY: forwarded contract.
        unsafe {
            self.reallocate(ptr, layout, new_size, layout.size(), new_size)
        }
    }

    /// Records a fresh `block` of `layout` with tracemalloc; if the trace
    /// cannot be stored, frees it and fails, as CPython does.
    ///
    /// # Safety
    /// `block` is null or was just allocated with `layout` by `self`.
    #[cfg(all(feature = "std", not(loom)))]
    #[cold]
    unsafe fn traced(&self, block: *mut u8, layout: Layout) -> *mut u8 {
        if block.is_null() || crate::tracemalloc::record(block, layout.size()) {
            return block;
        }
        // SAFETY: per the contract, a live block of `layout`, freed once.
        unsafe { self.untraced_dealloc(block, layout) };
        ptr::null_mut()
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
        let removed = crate::tracemalloc::forget(ptr);
        // SAFETY: forwarded contract.
        let block = unsafe { self.untraced_realloc(ptr, layout, new_size) };
        if block.is_null() {
            if let Some(removed) = removed {
                crate::tracemalloc::restore(ptr, removed);
            }
        } else if crate::tracemalloc::wants(new_size) {
            // The user's old block may be gone: the new one cannot be
            // failed, so a trace that cannot be stored is just not kept.
            crate::tracemalloc::record(block, new_size);
        }
        block
    }
}
