//! [`PyMalloc`]: the `GlobalAlloc` front, routing each request to the pools
//! or to the backing's fallback.

use crate::backing::Backing;
use crate::backing::Region;
#[cfg(feature = "std")]
use crate::backing::System;
use crate::config::Config;
use crate::heap::Heap;
use crate::size_class::class_for;
use crate::stats::Stats;
use crate::sync::{loom_const_fn, AtomicUsize, Lock, Ordering};
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
    heap: Lock<Heap>,
    backing: B,
    large: LargeCounters,
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
                heap: Lock::new(Heap::new(config)),
                backing,
                large: LargeCounters {
                    objects: AtomicUsize::new(0),
                    bytes: AtomicUsize::new(0),
                    requested: AtomicUsize::new(0),
                },
            }
        }
    }

    /// The heap's geometry.
    pub fn config(&self) -> Config {
        self.heap.lock().config()
    }

    /// The backing the heap draws from.
    pub fn backing(&self) -> &B {
        &self.backing
    }

    /// A snapshot of the heap, like CPython's `sys._debugmallocstats()`.
    /// Does not allocate.
    pub fn stats(&self) -> Stats {
        let heap = self.heap.lock();
        let config = heap.config();
        let mut stats = Stats::empty(config.pool_size(), config.arena_size());
        heap.gather(&mut stats);
        drop(heap);
        stats.large_objects = self.large.objects.load(Ordering::Relaxed);
        stats.large_bytes = self.large.bytes.load(Ordering::Relaxed);
        stats.requested_bytes += self.large.requested.load(Ordering::Relaxed);
        stats
    }

    #[cfg(feature = "debug")]
    pub(crate) fn lock_heap(&self) -> crate::sync::LockGuard<'_, Heap> {
        self.heap.lock()
    }

    /// Allocates `layout`, counting `requested` bytes as asked for, with
    /// its first `layout.size()` bytes zeroed if `zeroed`.
    #[inline]
    pub(crate) fn allocate(&self, layout: Layout, requested: usize, zeroed: bool) -> *mut u8 {
        match class_for(layout.size(), layout.align()) {
            Some(class) => {
                let mut heap = self.heap.lock();
                let block = heap.alloc(class, &self.backing);
                if block.is_null() {
                    return block;
                }
                heap.requested = heap.requested.wrapping_add(requested);
                drop(heap);
                if zeroed {
                    // SAFETY: the block has at least `layout.size()` bytes.
                    unsafe { block.write_bytes(0, layout.size()) };
                }
                block
            }
            None => {
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
        }
    }

    /// Frees a small block with the heap already locked.
    ///
    /// # Safety
    /// `ptr` came from `allocate` with a `layout` of a small class and has
    /// not been freed since.
    #[inline]
    pub(crate) unsafe fn free_small(&self, heap: &mut Heap, ptr: *mut u8, requested: usize) {
        // SAFETY: forwarded contract.
        unsafe { heap.free(ptr, &self.backing) };
        heap.requested = heap.requested.wrapping_sub(requested);
    }

    /// Frees what `allocate(layout, requested)` returned.
    ///
    /// # Safety
    /// `ptr` came from `allocate` with this `layout` and `requested` and has
    /// not been freed since.
    #[inline]
    pub(crate) unsafe fn deallocate(&self, ptr: *mut u8, layout: Layout, requested: usize) {
        if class_for(layout.size(), layout.align()).is_some() {
            // SAFETY: forwarded contract.
            unsafe { self.free_small(&mut self.heap.lock(), ptr, requested) }
        } else {
            let layout = large_layout(layout);
            // SAFETY: forwarded contract; `large_layout` is the layout
            // `allocate` gave the backing.
            unsafe { self.backing.dealloc(ptr, layout) };
            self.large.remove(layout.size(), requested);
        }
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
            let mut heap = self.heap.lock();
            heap.requested = heap
                .requested
                .wrapping_sub(requested)
                .wrapping_add(new_requested);
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
        // SAFETY: `&mut self` means no allocation call is in progress, and a
        // block must not outlive the allocator that served it.
        unsafe { self.heap.lock().release_all(&self.backing) }
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
        return self.debug_alloc(layout, false);
        #[cfg(not(feature = "debug"))]
        self.allocate(layout, layout.size(), false)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        #[cfg(feature = "debug")]
        return self.debug_alloc(layout, true);
        #[cfg(not(feature = "debug"))]
        self.allocate(layout, layout.size(), true)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
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

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        #[cfg(feature = "debug")]
        // SAFETY: forwarded contract.
        return unsafe { self.debug_realloc(ptr, layout, new_size) };
        #[cfg(not(feature = "debug"))]
        // SAFETY: forwarded contract.
        unsafe {
            self.reallocate(ptr, layout, new_size, layout.size(), new_size)
        }
    }
}
