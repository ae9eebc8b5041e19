//! Backings: where a heap gets its arenas and its large objects.
//!
//! * [`System`] (feature `std`): arenas are mapped straight from the kernel
//!   on 64-bit Linux (as CPython does), so releasing one returns its pages at
//!   once, but for the last [`RETAINED_ARENAS`] freed, which stay mapped
//!   for the next arena; elsewhere they come from `std::alloc::System`.
//!   Large objects go to `std::alloc::System`.
//! * [`Region`]: a fixed span of memory given by the user (firmware, no OS).
//!   Arenas and large objects are carved from it by its store (`store.rs`).

use super::store::Store;
#[cfg(fork_handlers)]
use super::sync::ForkGate;
use super::sync::Lock;
use core::alloc::Layout;
use core::ptr;

/// A source of memory for a [`PyMalloc`](crate::PyMalloc) heap.
///
/// # Safety
/// Implementors promise what `GlobalAlloc` promises: every non-null pointer
/// returned by `alloc`, `realloc` or `alloc_arena` is valid for reads and
/// writes of the requested size, does not overlap any other live block, and
/// stays so until given back; `alloc` and `realloc` honour the layout's
/// alignment. Failure is a null pointer, never a panic or an unwind.
pub unsafe trait Backing {
    /// Whether `alloc` is the system allocator, the one sanitizers and leak
    /// checkers watch. Under AddressSanitizer (without the `asan-pools`
    /// feature) a `PyMalloc` over such a backing hands it every request.
    const SYSTEM_ALLOCATOR: bool = false;

    /// Whether the backing is a fixed span, whose heaps honour
    /// [`Config::pool_limit`](crate::Config::pool_limit): a compile-time answer, so that a heap over
    /// an unbounded backing has no compare for it on the fast path.
    const BOUNDED: bool = false;

    /// The bytes a bounded backing holds in all (a region's span), `None`
    /// for one that grows on demand. Thread caches are sized by it.
    fn span_len(&self) -> Option<usize> {
        None
    }

    /// A block for a large object, or null.
    fn alloc(&self, layout: Layout) -> *mut u8;

    /// As `alloc`, with the block's bytes zeroed. Backings that get zeroed
    /// memory for free (fresh pages from the kernel) override it.
    fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let block = self.alloc(layout);
        if !block.is_null() {
            // SAFETY: a fresh block of `layout.size()` bytes.
            unsafe { block.write_bytes(0, layout.size()) };
        }
        block
    }

    /// Gives back a block from `alloc` or `realloc`.
    ///
    /// # Safety
    /// `ptr` came from this backing's `alloc`/`realloc` with `layout` and has
    /// not been given back.
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout);

    /// Resizes a block from `alloc` to `new_size` bytes (same alignment),
    /// keeping its contents up to the smaller size; null (and the old block
    /// untouched) on failure.
    ///
    /// # Safety
    /// As for `dealloc`; `new_size`, rounded up to the alignment, does not
    /// overflow `isize`.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` forms a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let new = self.alloc(new_layout);
        if !new.is_null() {
            // SAFETY: both blocks are live, distinct, and at least this long.
            unsafe {
                ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }

    /// `size` bytes for an arena, ideally aligned to `pool_size` (the heap
    /// gives up one pool when it is not), or null.
    fn alloc_arena(&self, size: usize, pool_size: usize) -> *mut u8 {
        match Layout::from_size_align(size, pool_size) {
            Ok(layout) => self.alloc(layout),
            Err(_) => ptr::null_mut(),
        }
    }

    /// Gives back an arena from `alloc_arena`.
    ///
    /// # Safety
    /// `ptr` came from `alloc_arena(size, pool_size)` and is no longer used.
    unsafe fn dealloc_arena(&self, ptr: *mut u8, size: usize, pool_size: usize) {
        // SAFETY: `alloc_arena` made this very layout.
        unsafe { self.dealloc(ptr, Layout::from_size_align_unchecked(size, pool_size)) }
    }

    /// Bytes of arenas given back that the backing keeps for the next
    /// `alloc_arena` instead of returning them (see [`RETAINED_ARENAS`]).
    fn retained_arena_bytes(&self) -> usize {
        0
    }

    /// Milliseconds since some fixed moment, on a clock that never goes
    /// back, if the backing has one: heaps then keep wholly free arenas
    /// for [`Config::release_delay_ms`](crate::Config::release_delay_ms)
    /// before giving them back (`retired.rs`). The default has none, and
    /// arenas go back at once. It wraps every 49 days.
    fn clock_ms(&self) -> Option<u32> {
        None
    }

    /// Tells the backing that nothing in `ptr..ptr + len`, part of an arena
    /// it handed out, is needed any more: it may give those pages back to
    /// the system while the arena stays the caller's. True if it did (the
    /// bytes then read as zeros, or as anything: the caller rewrites them
    /// before use); false, and the bytes untouched, if it cannot. The
    /// default cannot: a region has no one to give pages to.
    ///
    /// # Safety
    /// The span lies inside a live arena from this backing's `alloc_arena`
    /// and holds nothing anyone reads before writing it again.
    unsafe fn purge(&self, ptr: *mut u8, len: usize) -> bool {
        let _ = (ptr, len);
        false
    }
}

/// `bytes` (a non-zero multiple of 4096) of zeroed, page-aligned memory
/// from the operating system, never one of the arenas kept for reuse: for
/// the crate's own tables (tracemalloc's), which must not call the global
/// allocator. Null when the system has none.
#[cfg(all(feature = "std", not(loom)))]
pub(crate) fn os_pages(bytes: usize) -> *mut u8 {
    arena_memory::fresh(bytes)
}

/// Gives back what [`os_pages`] returned.
///
/// # Safety
/// `ptr` came from `os_pages(bytes)`, and nothing uses it any more.
#[cfg(all(feature = "std", not(loom)))]
pub(crate) unsafe fn free_os_pages(ptr: *mut u8, bytes: usize) {
    // SAFETY: forwarded contract.
    unsafe { arena_memory::unmap(ptr, bytes) }
}

/// Freed arenas of the default geometry that [`System`] keeps mapped, for
/// the whole process, to hand out again instead of mapping fresh pages.
/// Without them a program whose live set swings by a few MiB (a tree
/// built and dropped in a loop) maps, faults in and unmaps the same
/// memory every time: binary trees of depth 16 (2 MiB of nodes, eight
/// arenas) ran at 1.53× mimalloc's time with every free arena unmapped,
/// 1.09× with eight kept. Eight arenas are 2 MiB; everything past them
/// goes back to the kernel at once, so after a spike at most that much of
/// it stays resident (`Stats::retained_arena_bytes`). mimalloc and
/// jemalloc keep freed memory too, for a delay; a count needs no clock.
pub const RETAINED_ARENAS: usize = 8;

/// Arenas and large objects from the operating system (feature `std`).
#[cfg(feature = "std")]
#[derive(Clone, Copy, Debug, Default)]
pub struct System;

/// The block `System` hands out for a zero-size layout: `GlobalAlloc`
/// must never see one, and zero bytes need no memory (`NonNull::dangling`
/// for that alignment).
#[cfg(feature = "std")]
fn empty_block(layout: Layout) -> *mut u8 {
    ptr::without_provenance_mut(layout.align())
}

// SAFETY: large objects are `std::alloc::System`'s blocks, which keep the
// `GlobalAlloc` promises (zero-size layouts never reach it: their block is
// a dangling, aligned pointer, valid for zero bytes and overlapping
// nothing); arenas are private anonymous mappings (or System blocks),
// valid and unshared until unmapped.
#[cfg(feature = "std")]
unsafe impl Backing for System {
    const SYSTEM_ALLOCATOR: bool = true;

    #[inline]
    fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() == 0 {
            return empty_block(layout);
        }
        // SAFETY: a non-zero size.
        unsafe { std::alloc::GlobalAlloc::alloc(&std::alloc::System, layout) }
    }

    #[inline]
    fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() == 0 {
            return empty_block(layout);
        }
        // SAFETY: as in `alloc`.
        unsafe { std::alloc::GlobalAlloc::alloc_zeroed(&std::alloc::System, layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        // SAFETY: forwarded contract; a non-zero size, so the block is
        // `std::alloc::System`'s.
        unsafe { std::alloc::GlobalAlloc::dealloc(&std::alloc::System, ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() == 0 || new_size == 0 {
            // SAFETY: the caller guarantees `new_size` forms a valid layout.
            let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            let new = self.alloc(new_layout);
            if !new.is_null() {
                // SAFETY: forwarded contract; nothing to copy from or into
                // a zero-size block.
                unsafe { self.dealloc(ptr, layout) };
            }
            return new;
        }
        // SAFETY: forwarded contract; both sizes non-zero.
        unsafe { std::alloc::GlobalAlloc::realloc(&std::alloc::System, ptr, layout, new_size) }
    }

    fn alloc_arena(&self, size: usize, pool_size: usize) -> *mut u8 {
        if size == 0 {
            return ptr::null_mut();
        }
        arena_memory::get(size, pool_size)
    }

    unsafe fn dealloc_arena(&self, ptr: *mut u8, size: usize, pool_size: usize) {
        // SAFETY: forwarded contract.
        unsafe { arena_memory::put(ptr, size, pool_size) }
    }

    fn retained_arena_bytes(&self) -> usize {
        arena_memory::retained_bytes()
    }

    /// The monotonic clock, read only where an arena comes wholly free and
    /// where a heap set sweeps its retired arenas. (None under loom, whose
    /// models must not depend on time.)
    fn clock_ms(&self) -> Option<u32> {
        #[cfg(loom)]
        return None;
        #[cfg(not(loom))]
        {
            static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
            Some(
                EPOCH
                    .get_or_init(std::time::Instant::now)
                    .elapsed()
                    .as_millis() as u32,
            )
        }
    }

    /// Where arenas are mappings of our own; the C library's blocks are
    /// its business.
    #[cfg(mmap_arenas)]
    unsafe fn purge(&self, ptr: *mut u8, len: usize) -> bool {
        // SAFETY: forwarded contract.
        unsafe { arena_memory::purge(ptr, len) }
    }
}

/// Arenas as anonymous mappings, declared by hand: std links libc already,
/// and two declarations are lighter than a dependency. (`build.rs` sets
/// `mmap_arenas` where the flag values below hold.)
#[cfg(mmap_arenas)]
mod arena_memory {
    use super::super::config::Config;
    use super::RETAINED_ARENAS;
    use core::ffi::{c_int, c_long, c_void};
    use core::ptr;
    use core::sync::atomic::{AtomicPtr, Ordering};

    extern "C" {
        fn mmap(
            addr: *mut c_void,
            len: usize,
            prot: c_int,
            flags: c_int,
            fd: c_int,
            off: c_long,
        ) -> *mut c_void;
        fn munmap(addr: *mut c_void, len: usize) -> c_int;
        fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
    }

    const PROT_READ_WRITE: c_int = 0x1 | 0x2;
    // MAP_PRIVATE | MAP_ANONYMOUS, same values on the architectures above.
    const MAP_PRIVATE_ANONYMOUS: c_int = 0x02 | 0x20;
    const MAP_FAILED: *mut c_void = !0usize as *mut c_void;
    /// The pages go at once and read as zeros when touched again (so the
    /// resident set shrinks now, unlike `MADV_FREE`); same value on the
    /// architectures above.
    const MADV_DONTNEED: c_int = 4;

    extern "C" {
        fn sysconf(name: c_int) -> c_long;
    }
    /// `_SC_PAGESIZE` in glibc and musl.
    const SC_PAGESIZE: c_int = 30;

    /// A fresh anonymous mapping of `len` bytes, or null.
    fn map(len: usize) -> *mut u8 {
        // SAFETY: an anonymous private mapping at an address of the kernel's
        // choosing aliases nothing; failure is reported as MAP_FAILED.
        let p = unsafe {
            mmap(
                core::ptr::null_mut(),
                len,
                PROT_READ_WRITE,
                MAP_PRIVATE_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == MAP_FAILED {
            core::ptr::null_mut()
        } else {
            p.cast()
        }
    }

    /// Mappings of `RETAINED_SIZE` bytes, page-aligned, that no heap uses:
    /// a slot is taken by swapping null in, so each mapping has one owner.
    static RETAINED: [AtomicPtr<u8>; RETAINED_ARENAS] =
        [const { AtomicPtr::new(ptr::null_mut()) }; RETAINED_ARENAS];
    /// The one size kept: the default geometry's arena, whose pools fit a
    /// page's alignment (what `map` gives), so any kept mapping serves any
    /// request of that size.
    const RETAINED_SIZE: usize = Config::DEFAULT.arena_size();

    /// Whether a mapping of `size` bytes for pools of `pool_size` may be
    /// kept, and taken again.
    fn retainable(size: usize, pool_size: usize, page: usize) -> bool {
        size == RETAINED_SIZE && pool_size <= page
    }

    fn page_size() -> usize {
        // SAFETY: sysconf has no preconditions.
        usize::try_from(unsafe { sysconf(SC_PAGESIZE) }).unwrap_or(4096)
    }

    /// A fresh mapping of `len` bytes (a multiple of the page size):
    /// zeroed, never a kept arena.
    #[cfg(not(loom))]
    pub(super) fn fresh(len: usize) -> *mut u8 {
        map(len)
    }

    /// # Safety
    /// `ptr` came from `fresh(len)` and nothing uses it.
    #[cfg(not(loom))]
    pub(super) unsafe fn unmap(ptr: *mut u8, len: usize) {
        // SAFETY: per the contract, a whole mapping of ours.
        unsafe { munmap(ptr.cast(), len) };
    }

    pub(super) fn retained_bytes() -> usize {
        let kept = RETAINED
            .iter()
            .filter(|slot| !slot.load(Ordering::Relaxed).is_null())
            .count();
        kept * RETAINED_SIZE
    }

    /// `size` bytes aligned to `pool_size`: a kept mapping if one fits,
    /// else a fresh one. The kernel aligns to a page only, so a pool
    /// larger than a page takes an over-sized mapping whose misaligned head
    /// and unneeded tail are unmapped at once: without that, an arena would
    /// lose a pool to alignment (a one-pool arena all of it).
    pub(super) fn get(size: usize, pool_size: usize) -> *mut u8 {
        let page = page_size();
        if retainable(size, pool_size, page) {
            for slot in &RETAINED {
                // Acquire: the heap that gave it back is done with it.
                let kept = slot.swap(ptr::null_mut(), Ordering::Acquire);
                if !kept.is_null() {
                    return kept;
                }
            }
        }
        if pool_size <= page {
            return map(size);
        }
        // Pools, hence arenas, are then whole pages, and so is every span
        // cut below (differences of page-aligned addresses).
        let Some(len) = size.checked_add(pool_size - page) else {
            return core::ptr::null_mut();
        };
        let p = map(len);
        if p.is_null() {
            return p;
        }
        let head = p.align_offset(pool_size);
        let tail = len - head - size;
        // SAFETY: both spans are page-aligned parts of the mapping just
        // made, outside the arena we keep; unmapping them cannot fail.
        unsafe {
            if head > 0 {
                munmap(p.cast(), head);
            }
            if tail > 0 {
                munmap(p.add(head + size).cast(), tail);
            }
            p.add(head)
        }
    }

    /// # Safety
    /// The span lies in a live mapping from `get` and holds nothing needed.
    pub(super) unsafe fn purge(ptr: *mut u8, len: usize) -> bool {
        // SAFETY: per the contract, pages of ours whose contents nobody
        // needs; the call fails (and changes nothing) on a span that is not
        // page-aligned.
        unsafe { madvise(ptr.cast(), len, MADV_DONTNEED) == 0 }
    }

    /// # Safety
    /// `ptr` is a live mapping of `size` bytes from `get` that nothing uses.
    pub(super) unsafe fn put(ptr: *mut u8, size: usize, pool_size: usize) {
        if retainable(size, pool_size, page_size()) {
            for slot in &RETAINED {
                // Release: the next taker sees the memory as we left it.
                let kept = slot.compare_exchange(
                    ptr::null_mut(),
                    ptr,
                    Ordering::Release,
                    Ordering::Relaxed,
                );
                if kept.is_ok() {
                    return;
                }
            }
        }
        // SAFETY: per the contract. munmap of a whole mapping we made cannot
        // fail; if it somehow did the pages would merely stay mapped.
        unsafe { munmap(ptr.cast(), size) };
    }
}

/// Arenas from `std::alloc::System`, where no mapping call is declared.
/// None is kept here: the C library's allocator keeps freed memory by its
/// own rules.
#[cfg(all(feature = "std", not(mmap_arenas)))]
mod arena_memory {
    use core::alloc::{GlobalAlloc, Layout};

    pub(super) fn retained_bytes() -> usize {
        0
    }

    #[cfg(not(loom))]
    pub(super) fn fresh(len: usize) -> *mut u8 {
        match Layout::from_size_align(len, 4096) {
            // SAFETY: never called with a zero size.
            Ok(layout) => unsafe { std::alloc::System.alloc_zeroed(layout) },
            Err(_) => core::ptr::null_mut(),
        }
    }

    /// # Safety
    /// `ptr` came from `fresh(len)` and nothing uses it.
    #[cfg(not(loom))]
    pub(super) unsafe fn unmap(ptr: *mut u8, len: usize) {
        // SAFETY: `fresh` allocated it with this very layout.
        unsafe { std::alloc::System.dealloc(ptr, Layout::from_size_align_unchecked(len, 4096)) }
    }

    pub(super) fn get(size: usize, pool_size: usize) -> *mut u8 {
        match Layout::from_size_align(size, pool_size) {
            // SAFETY: arenas are never zero-sized.
            Ok(layout) => unsafe { std::alloc::System.alloc(layout) },
            Err(_) => core::ptr::null_mut(),
        }
    }

    /// # Safety
    /// `ptr` came from `get(size, pool_size)` and nothing uses it.
    pub(super) unsafe fn put(ptr: *mut u8, size: usize, pool_size: usize) {
        // SAFETY: `get` allocated it with this very layout.
        unsafe {
            std::alloc::System.dealloc(ptr, Layout::from_size_align_unchecked(size, pool_size))
        }
    }
}

/// Around every use of a region's store: regions live in `PyMalloc` values,
/// which may move, so the fork handlers cannot reach their locks and close
/// this gate instead.
#[cfg(fork_handlers)]
pub(crate) static REGION_GATE: ForkGate = ForkGate::new();

/// A fixed span of memory, as in firmware: arenas and large objects are
/// carved from it by a best-fit list of its free spans.
///
/// The span is claimed lazily, on the first allocation, so a `static` heap
/// can be declared entirely in `const` (the runtime may allocate before
/// `main`). A span known only at run time is given with
/// [`PyMalloc::init`](crate::PyMalloc::init); until then every allocation
/// returns null.
pub struct Region {
    store: Lock<RegionStore>,
    /// Whether `PyMalloc::init` picks the geometry from the span it gives
    /// (`PyMalloc::region_uninit`) rather than keep the one chosen.
    pub(crate) picks_config: bool,
}

struct RegionStore {
    holes: Store,
    /// The span to claim on first use; null once claimed or when none given.
    pending: *mut u8,
    pending_len: usize,
}

// SAFETY: the store owns its span exclusively (the contract of `Region::new`
// and `PyMalloc::init`), so moving it between threads moves that ownership.
unsafe impl Send for RegionStore {}

/// Alignment the region's start is rounded up to and its length down to.
pub(crate) const REGION_ALIGN: usize = 16;

impl Region {
    super::sync::loom_const_fn! {
        /// A region over `len` bytes at `start`, claimed on first use.
        ///
        /// # Safety
        /// The span is valid for reads and writes, used by nothing else, for
        /// as long as the heap lives.
        pub(crate) unsafe fn new(start: *mut u8, len: usize) -> Self {
            Region {
                store: Lock::new(RegionStore {
                    holes: Store::empty(),
                    pending: start,
                    pending_len: len,
                }),
                picks_config: false,
            }
        }
    }

    super::sync::loom_const_fn! {
        /// A region without a span until `set_span`; `picks_config` as the
        /// field says.
        pub(crate) fn awaiting_span(picks_config: bool) -> Self {
            // SAFETY: an empty span promises nothing.
            let region = unsafe { Region::new(ptr::null_mut(), 0) };
            Region {
                picks_config,
                ..region
            }
        }
    }

    /// Gives the region its span, once `accept` (called under the
    /// region's lock with the span's length trimmed to `REGION_ALIGN`) has
    /// checked it and chosen the heaps' geometry for it.
    ///
    /// # Safety
    /// As for `new`.
    ///
    /// # Panics
    /// If the region already has a span, or `accept` panics.
    pub(crate) unsafe fn set_span(&self, start: *mut u8, len: usize, accept: impl FnOnce(usize)) {
        #[cfg(fork_handlers)]
        let _pass = REGION_GATE.enter();
        let mut store = self.store.lock();
        assert!(
            store.pending.is_null() && store.holes.span_len() == 0,
            "pymalloc: Region::init called on a region that already has memory"
        );
        let (start, len) = trim(start, len);
        accept(len);
        store.pending = start;
        store.pending_len = len;
    }

    fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        #[cfg(fork_handlers)]
        let _pass = REGION_GATE.enter();
        let mut store = self.store.lock();
        if !store.pending.is_null() {
            let (start, len) = trim(store.pending, store.pending_len);
            store.pending = ptr::null_mut();
            // SAFETY: `Region::new`/`set_span` callers promised us the span;
            // `trim` only shrinks it, and it is at least `min_len` (checked
            // at construction or in `set_span`): a multiple of 16 at a
            // 16-aligned start, at least 16 bytes, as the store needs.
            unsafe { store.holes.init(start, len) };
        }
        f(&mut store.holes)
    }
}

/// `[start, start + len)` shrunk to `REGION_ALIGN` boundaries.
fn trim(start: *mut u8, len: usize) -> (*mut u8, usize) {
    let skip = start.align_offset(REGION_ALIGN);
    let len = len.saturating_sub(skip) & !(REGION_ALIGN - 1);
    (start.wrapping_add(skip), len)
}

// SAFETY: every block comes from the store, which hands out
// non-overlapping, aligned parts of the region we own exclusively.
unsafe impl Backing for Region {
    const BOUNDED: bool = true;

    fn span_len(&self) -> Option<usize> {
        #[cfg(fork_handlers)]
        let _pass = REGION_GATE.enter();
        let store = self.store.lock();
        Some(if store.pending.is_null() {
            store.holes.span_len()
        } else {
            trim(store.pending, store.pending_len).1
        })
    }

    fn alloc(&self, layout: Layout) -> *mut u8 {
        self.with_store(|store| store.alloc(layout))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        self.with_store(|store| unsafe { store.dealloc(ptr, layout) })
    }

    /// In place when the block's neighbour above is free (a `Vec` growing
    /// at the top of the region copies nothing), under one lock either way.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        self.with_store(|store| unsafe { store.realloc(ptr, layout, new_size) })
    }
}
