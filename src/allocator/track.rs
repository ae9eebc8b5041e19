//! Telling a memory tool which bytes of the pools are live blocks, as
//! mimalloc's `track.h` does: without this AddressSanitizer and valgrind see
//! an arena as one big addressable span and miss every bug in it.
//!
//! * a pool's block area is *no access* from the moment the pool is set up
//!   ([`fresh`]);
//! * a block handed out is a malloc'd block of exactly the requested bytes;
//!   freed, it is no access again, before the allocator writes its
//!   free-list link into it; a block resized in place changes size
//!   ([`resized`]);
//! * the allocator's own reads and writes of a free block's link open that
//!   word for the access only ([`read_link`], [`write_link`]), so blocks
//!   waiting in pools and inboxes stay closed;
//! * an arena going back to the backing is plain memory again
//!   ([`released`]).
//!
//! * under valgrind, a pool's header is no access too ([`closed_header`]):
//!   an overflow from the last block of one pool into the next pool's
//!   header, or before a pool's first block, is reported like any other.
//!   The allocator's own reads and writes of headers are not reported,
//!   because every call that reaches the heaps runs inside [`internal`],
//!   which turns memcheck's error reporting off for the calling thread.
//!   Under AddressSanitizer headers stay open: ASan has no such switch, and
//!   poisoning them would need every header access wrapped.
//!
//! The tools are AddressSanitizer's manual poisoning (`cfg(asan)`, see
//! `build.rs`) and valgrind's client requests (the `valgrind` feature; the
//! two cannot be combined). With neither, every function here is a plain
//! access or nothing at all.
//!
//! They hook in at different places. ASan sees blocks at the front
//! ([`allocated`], [`freed`]) and thread caches keep their blocks poisoned
//! ([`read_cached_link`], [`write_cached_link`]). Under valgrind the
//! allocator runs without thread caches ([`thread_caches_allowed`]), so
//! every block passes through a heap, where valgrind sees it
//! ([`heap_allocated`], [`heap_freed`]): a program built with the feature
//! but not run under valgrind pays nothing on the thread-cache fast path.

/// The block at `block` (or null: nothing) was handed out for `size`
/// bytes, from a thread cache or a heap.
///
/// # Safety
/// `block` is null or a block of a pool that `size` bytes fit, that nobody
/// else uses.
#[inline(always)]
pub(crate) unsafe fn allocated(block: *mut u8, size: usize) {
    #[cfg(asan)]
    if !block.is_null() {
        asan::unpoison(block, size);
    }
    let _ = (block, size);
}

/// The live block of `size` bytes at `block` is being freed, to a thread
/// cache or a heap.
///
/// # Safety
/// `block` was handed out with `size` bytes (as last resized) and is not
/// touched by its user any more.
#[inline(always)]
pub(crate) unsafe fn freed(block: *mut u8, size: usize) {
    // Rounded up: the rest of the last granule is poisoned already, and
    // the whole granule is then closed.
    #[cfg(asan)]
    asan::poison(block, size.next_multiple_of(8));
    let _ = (block, size);
}

/// A heap handed out the block at `block` for `size` bytes.
///
/// # Safety
/// As for [`allocated`], `block` not null.
#[inline(always)]
pub(crate) unsafe fn heap_allocated(block: *mut u8, size: usize) {
    // No red zone, not zeroed (a zeroing caller writes the zeros after).
    #[cfg(feature = "valgrind")]
    valgrind::tell(valgrind::MALLOCLIKE_BLOCK, block, size, 0, 0);
    let _ = (block, size);
}

/// The live block at `block` is being freed into its heap.
///
/// # Safety
/// As for [`freed`].
#[inline(always)]
pub(crate) unsafe fn heap_freed(block: *mut u8) {
    #[cfg(feature = "valgrind")]
    valgrind::tell(valgrind::FREELIKE_BLOCK, block, 0, 0, 0);
    let _ = block;
}

/// The live block at `block` now holds `new` bytes instead of `old`,
/// within its size class.
///
/// # Safety
/// As for [`freed`] with `old`, and `new` bytes fit the block's class.
#[inline(always)]
pub(crate) unsafe fn resized(block: *mut u8, old: usize, new: usize) {
    #[cfg(asan)]
    {
        asan::poison(block, old.next_multiple_of(8));
        asan::unpoison(block, new);
    }
    #[cfg(feature = "valgrind")]
    valgrind::tell(valgrind::RESIZEINPLACE_BLOCK, block, old, new, 0);
    let _ = (block, old, new);
}

/// `start..start + len`, a new pool's block area, holds no live block.
///
/// # Safety
/// The span belongs to a pool of the caller's, with no live block in it.
#[inline(always)]
pub(crate) unsafe fn fresh(start: *mut u8, len: usize) {
    #[cfg(asan)]
    asan::poison(start, len);
    #[cfg(feature = "valgrind")]
    valgrind::tell(valgrind::MAKE_MEM_NOACCESS, start, len, 0, 0);
    let _ = (start, len);
}

/// `pool..pool + len`, a pool's header (and the padding after it), was
/// just written: under valgrind it is no access from now on.
///
/// # Safety
/// The span is the header of a pool of the caller's, which the allocator
/// then touches only inside [`internal`].
#[inline(always)]
pub(crate) unsafe fn closed_header(pool: *mut u8, len: usize) {
    #[cfg(feature = "valgrind")]
    valgrind::tell(valgrind::MAKE_MEM_NOACCESS, pool, len, 0, 0);
    let _ = (pool, len);
}

/// Marks a stretch of the allocator's own work on the heaps (where it reads
/// and writes pool headers that memory tools see as closed): under
/// valgrind, memcheck reports no error on this thread until the guard
/// drops. Taken after the request that tells the tool about the user's
/// block, so that a bad free is still reported.
#[inline(always)]
pub(crate) fn internal() -> Internal {
    Internal {
        #[cfg(feature = "valgrind")]
        disabled: valgrind::disable_errors(1),
    }
}

/// See [`internal`].
#[must_use]
pub(crate) struct Internal {
    /// Whether the guard turned reporting off (only under valgrind).
    #[cfg(feature = "valgrind")]
    disabled: bool,
}

#[cfg(feature = "valgrind")]
impl Drop for Internal {
    #[inline(always)]
    fn drop(&mut self) {
        if self.disabled {
            valgrind::disable_errors(-1);
        }
    }
}

/// `start..start + len` is a new arena.
///
/// LeakSanitizer scans the stacks, globals and malloc'd blocks for
/// pointers, not memory mapped by other means: a block of the system
/// allocator that only a pool block points to would be reported as leaked.
/// So an arena is one of its root regions while it lives.
///
/// # Safety
/// The span is an arena of the caller's, released later with
/// [`released`] and the same span.
#[inline(always)]
pub(crate) unsafe fn opened(start: *mut u8, len: usize) {
    #[cfg(asan)]
    asan::root_region(start, len, true);
    let _ = (start, len);
}

/// `start..start + len`, an arena, goes back to its backing as plain
/// memory.
///
/// # Safety
/// The span is an arena of the caller's, given to [`opened`], that nothing
/// uses any more.
#[inline(always)]
pub(crate) unsafe fn released(start: *mut u8, len: usize) {
    #[cfg(asan)]
    {
        asan::root_region(start, len, false);
        asan::unpoison(start, len);
    }
    #[cfg(feature = "valgrind")]
    valgrind::tell(valgrind::MAKE_MEM_UNDEFINED, start, len, 0, 0);
    let _ = (start, len);
}

/// Reads the free-list link at `link`, the first word of a free block in a
/// pool or an inbox.
///
/// # Safety
/// `link` is the first word of a free block whose link was written, and no
/// other thread accesses that word meanwhile.
#[inline(always)]
pub(crate) unsafe fn read_link<T>(link: *mut *mut T) -> *mut T {
    #[cfg(feature = "valgrind")]
    if valgrind::active() {
        valgrind::request([valgrind::MAKE_MEM_DEFINED, link as usize, LINK, 0, 0, 0]);
        // SAFETY: forwarded contract; the word is open for this read.
        let value = unsafe { *link };
        valgrind::request([valgrind::MAKE_MEM_NOACCESS, link as usize, LINK, 0, 0, 0]);
        return value;
    }
    // SAFETY: forwarded contract.
    unsafe { read_cached_link(link) }
}

/// Writes `value` into the free-list link at `link`, the first word of a
/// block that is free (or being freed) in a pool or an inbox.
///
/// # Safety
/// `link` is the first word of such a block, and no other thread accesses
/// that word meanwhile.
#[inline(always)]
pub(crate) unsafe fn write_link<T>(link: *mut *mut T, value: *mut T) {
    #[cfg(feature = "valgrind")]
    if valgrind::active() {
        // Undefined, not defined: the word holds nothing yet.
        valgrind::request([valgrind::MAKE_MEM_UNDEFINED, link as usize, LINK, 0, 0, 0]);
        // SAFETY: forwarded contract; the word is open for this write.
        unsafe { *link = value };
        valgrind::request([valgrind::MAKE_MEM_NOACCESS, link as usize, LINK, 0, 0, 0]);
        return;
    }
    // SAFETY: forwarded contract.
    unsafe { write_cached_link(link, value) }
}

/// As [`read_link`], for a block in a thread cache (never under valgrind).
///
/// # Safety
/// As for [`read_link`].
#[inline(always)]
pub(crate) unsafe fn read_cached_link<T>(link: *mut *mut T) -> *mut T {
    #[cfg(asan)]
    asan::unpoison(link.cast(), LINK);
    // SAFETY: forwarded contract; the word is open for this read.
    let value = unsafe { *link };
    #[cfg(asan)]
    asan::poison(link.cast(), LINK);
    value
}

/// As [`write_link`], for a block in a thread cache (never under valgrind).
///
/// # Safety
/// As for [`write_link`].
#[inline(always)]
pub(crate) unsafe fn write_cached_link<T>(link: *mut *mut T, value: *mut T) {
    #[cfg(asan)]
    asan::unpoison(link.cast(), LINK);
    // SAFETY: forwarded contract; the word is open for this write.
    unsafe { *link = value };
    #[cfg(asan)]
    asan::poison(link.cast(), LINK);
}

/// Bytes of a free-list link.
#[cfg(any(asan, feature = "valgrind"))]
const LINK: usize = core::mem::size_of::<usize>();

/// Notes whether the program runs under a tool that needs telling; called
/// once the allocator makes its heaps, before any block exists.
#[inline]
pub(crate) fn detect() {
    #[cfg(feature = "valgrind")]
    valgrind::detect();
}

/// Whether the allocator may give threads caches: not under valgrind,
/// which then sees every block pass through a heap (and runs one thread
/// at a time anyway).
#[cfg(thread_cache)]
#[inline]
pub(crate) fn thread_caches_allowed() -> bool {
    #[cfg(feature = "valgrind")]
    return !valgrind::active();
    #[cfg(not(feature = "valgrind"))]
    true
}

/// AddressSanitizer's manual poisoning. Poisoning is per 8-byte granule,
/// a partial last granule recording how many of its bytes are addressable,
/// so unpoisoning exactly the requested bytes catches a one-byte overflow
/// into the class's rounding; blocks are 8-aligned, so no granule is
/// shared by two blocks. Callers pass spans of their own pools and arenas,
/// per the contracts above.
#[cfg(asan)]
mod asan {
    use core::ffi::c_void;

    extern "C" {
        fn __asan_poison_memory_region(addr: *const c_void, size: usize);
        fn __asan_unpoison_memory_region(addr: *const c_void, size: usize);
        fn __lsan_register_root_region(addr: *const c_void, size: usize);
        fn __lsan_unregister_root_region(addr: *const c_void, size: usize);
    }

    /// Adds the span to LeakSanitizer's root regions, or removes it.
    pub(super) fn root_region(start: *mut u8, len: usize, add: bool) {
        // SAFETY: the runtime only records the span, to read it while
        // looking for leaks; a removal names a span added before.
        unsafe {
            if add {
                __lsan_register_root_region(start.cast(), len);
            } else {
                __lsan_unregister_root_region(start.cast(), len);
            }
        }
    }

    pub(super) fn poison(start: *mut u8, len: usize) {
        // SAFETY: the runtime only updates its shadow for the span.
        unsafe { __asan_poison_memory_region(start.cast(), len) }
    }

    pub(super) fn unpoison(start: *mut u8, len: usize) {
        // SAFETY: as for `poison`.
        unsafe { __asan_unpoison_memory_region(start.cast(), len) }
    }
}

/// valgrind client requests, issued with the magic instruction sequence
/// valgrind recognises (a no-op on the real CPU), so no C header or build
/// step is needed. Each is skipped unless the program runs under valgrind,
/// which is asked once: a skipped request costs a load and a branch.
#[cfg(feature = "valgrind")]
mod valgrind {
    use core::sync::atomic::{AtomicBool, Ordering};

    /// Whether the program runs under valgrind (see [`detect`]).
    static ACTIVE: AtomicBool = AtomicBool::new(false);

    /// valgrind.h's request numbers.
    const RUNNING_ON_VALGRIND: usize = 0x1001;
    pub(super) const MALLOCLIKE_BLOCK: usize = 0x1301;
    pub(super) const FREELIKE_BLOCK: usize = 0x1302;
    pub(super) const RESIZEINPLACE_BLOCK: usize = 0x130b;
    const CHANGE_ERR_DISABLEMENT: usize = 0x1801;
    /// memcheck.h's: its tool base, `'M' << 24 | 'C' << 16`, plus 0, 1, 2.
    pub(super) const MAKE_MEM_NOACCESS: usize = 0x4d43_0000;
    pub(super) const MAKE_MEM_UNDEFINED: usize = 0x4d43_0001;
    pub(super) const MAKE_MEM_DEFINED: usize = 0x4d43_0002;

    /// Issues request `args[0]` with arguments `args[1..]`; returns
    /// valgrind's answer, or 0 on the real CPU.
    #[inline(always)]
    pub(super) fn request(args: [usize; 6]) -> usize {
        let mut result: usize = 0;
        // The four rotations of rdi add up to 128 bits, leaving it as it
        // was, and `xchg rbx, rbx` changes nothing: on the real CPU the
        // sequence only clobbers the flags. Under valgrind it is the client
        // request whose argument block is at rax, answer in rdx.
        // SAFETY: so it reads `args` and writes `result`, nothing else.
        unsafe {
            core::arch::asm!(
                "rol rdi, 3",
                "rol rdi, 13",
                "rol rdi, 61",
                "rol rdi, 51",
                "xchg rbx, rbx",
                in("rax") args.as_ptr(),
                inout("rdx") result,
                options(nostack, readonly),
            );
        }
        result
    }

    /// Whether the program runs under valgrind.
    #[inline(always)]
    pub(super) fn active() -> bool {
        ACTIVE.load(Ordering::Relaxed)
    }

    /// Issues `code` with these arguments if under valgrind.
    #[inline(always)]
    pub(super) fn tell(code: usize, a: *mut u8, b: usize, c: usize, d: usize) {
        if active() {
            request([code, a as usize, b, c, d, 0]);
        }
    }

    /// Adds `delta` to the calling thread's count of reasons not to report
    /// errors (memcheck reports while it is 0), if under valgrind; whether
    /// it did.
    #[inline(always)]
    pub(super) fn disable_errors(delta: isize) -> bool {
        let active = active();
        if active {
            request([CHANGE_ERR_DISABLEMENT, delta as usize, 0, 0, 0, 0]);
        }
        active
    }

    pub(super) fn detect() {
        ACTIVE.store(
            request([RUNNING_ON_VALGRIND, 0, 0, 0, 0, 0]) != 0,
            Ordering::Relaxed,
        );
    }
}
