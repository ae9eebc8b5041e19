//! Telling a memory tool which bytes of the pools are live blocks, as
//! mimalloc's `track.h` does: without this AddressSanitizer and valgrind see
//! an arena as one big addressable span and miss every bug in it.
//!
//! * a pool's block area is *no access* from the moment the pool is set up
//!   ([`fresh`]);
//! * a block handed out is a malloc'd block of exactly the requested bytes
//!   ([`allocated`], [`resized`]); freed, it is no access again ([`freed`]),
//!   before the allocator writes its free-list link into it;
//! * the allocator's own reads and writes of a free block's link open that
//!   word for the access only ([`read_link`], [`write_link`]), so the blocks
//!   waiting in pools, inboxes and thread caches stay closed;
//! * an arena going back to the backing is plain memory again
//!   ([`released`]).
//!
//! Pool headers stay open: the allocator reads them on every call.
//!
//! The tool is AddressSanitizer's manual poisoning (`cfg(asan)`, see
//! `build.rs`) or valgrind's client requests (the `valgrind` feature); with
//! neither every function here is a plain access or nothing at all.

#[cfg(all(asan, not(feature = "valgrind")))]
use asan as tool;
#[cfg(feature = "valgrind")]
use valgrind as tool;

/// A block of `size` bytes at `block` was handed out.
///
/// # Safety
/// `block..block + size` lies in a pool's block area and is the start of a
/// block nobody else uses.
#[inline(always)]
pub(crate) unsafe fn allocated(block: *mut u8, size: usize) {
    #[cfg(track_blocks)]
    tool::allocated(block, size);
    #[cfg(not(track_blocks))]
    let _ = (block, size);
}

/// The live block of `size` bytes at `block` is being freed.
///
/// # Safety
/// `block` was handed out with `size` bytes (as last resized) and is not
/// touched by its user any more.
#[inline(always)]
pub(crate) unsafe fn freed(block: *mut u8, size: usize) {
    #[cfg(track_blocks)]
    tool::freed(block, size);
    #[cfg(not(track_blocks))]
    let _ = (block, size);
}

/// The live block at `block` now holds `new` bytes instead of `old`,
/// within its size class.
///
/// # Safety
/// As for [`freed`] with `old`, and `new` bytes fit the block's class.
#[inline(always)]
pub(crate) unsafe fn resized(block: *mut u8, old: usize, new: usize) {
    #[cfg(track_blocks)]
    tool::resized(block, old, new);
    #[cfg(not(track_blocks))]
    let _ = (block, old, new);
}

/// `start..start + len`, a new pool's block area, holds no live block.
///
/// # Safety
/// The span belongs to a pool of the caller's, with no live block in it.
#[inline(always)]
pub(crate) unsafe fn fresh(start: *mut u8, len: usize) {
    #[cfg(track_blocks)]
    tool::no_access(start, len);
    #[cfg(not(track_blocks))]
    let _ = (start, len);
}

/// `start..start + len`, an arena, goes back to its backing as plain
/// memory.
///
/// # Safety
/// The span is an arena of the caller's that nothing uses any more.
#[inline(always)]
pub(crate) unsafe fn released(start: *mut u8, len: usize) {
    #[cfg(track_blocks)]
    tool::released(start, len);
    #[cfg(not(track_blocks))]
    let _ = (start, len);
}

/// Reads the free-list link at `link`, the first word of a free block.
///
/// # Safety
/// `link` is the first word of a free block whose link was written, and no
/// other thread accesses that word meanwhile.
#[inline(always)]
pub(crate) unsafe fn read_link<T>(link: *mut *mut T) -> *mut T {
    #[cfg(track_blocks)]
    {
        tool::open_link(link.cast(), true);
        // SAFETY: forwarded contract; the word is open for this read.
        let value = unsafe { *link };
        tool::close_link(link.cast());
        value
    }
    // SAFETY: forwarded contract.
    #[cfg(not(track_blocks))]
    unsafe {
        *link
    }
}

/// Writes `value` into the free-list link at `link`.
///
/// # Safety
/// `link` is the first word of a block that is free (or being freed), and
/// no other thread accesses that word meanwhile.
#[inline(always)]
pub(crate) unsafe fn write_link<T>(link: *mut *mut T, value: *mut T) {
    #[cfg(track_blocks)]
    {
        tool::open_link(link.cast(), false);
        // SAFETY: forwarded contract; the word is open for this write.
        unsafe { *link = value };
        tool::close_link(link.cast());
    }
    // SAFETY: forwarded contract.
    #[cfg(not(track_blocks))]
    unsafe {
        *link = value
    }
}

/// Notes whether the program runs under a tool that needs telling; called
/// once the allocator makes its heaps, before any block exists.
#[inline]
pub(crate) fn detect() {
    #[cfg(feature = "valgrind")]
    valgrind::detect();
}

/// AddressSanitizer's manual poisoning (callers pass spans of their own
/// pools and arenas, per the contracts above). Poisoning is per 8-byte granule,
/// a partial last granule recording how many of its bytes are addressable,
/// so unpoisoning exactly the requested bytes catches a one-byte overflow
/// into the class's rounding; blocks are 8-aligned, so no granule is
/// shared by two blocks.
#[cfg(asan)]
mod asan {
    use core::ffi::c_void;

    extern "C" {
        fn __asan_poison_memory_region(addr: *const c_void, size: usize);
        fn __asan_unpoison_memory_region(addr: *const c_void, size: usize);
    }

    /// Bytes of a free-list link.
    const LINK: usize = core::mem::size_of::<usize>();

    fn poison(start: *mut u8, len: usize) {
        // SAFETY: the runtime only updates its shadow for the span; the
        // callers poison only spans of their own pools.
        unsafe { __asan_poison_memory_region(start.cast(), len) }
    }

    fn unpoison(start: *mut u8, len: usize) {
        // SAFETY: as for `poison`.
        unsafe { __asan_unpoison_memory_region(start.cast(), len) }
    }

    pub(super) fn allocated(block: *mut u8, size: usize) {
        unpoison(block, size);
    }

    pub(super) fn freed(block: *mut u8, size: usize) {
        // Rounded up: the rest of the last granule is poisoned already, and
        // the whole granule is then closed.
        poison(block, size.next_multiple_of(8));
    }

    pub(super) fn resized(block: *mut u8, old: usize, new: usize) {
        poison(block, old.next_multiple_of(8));
        unpoison(block, new);
    }

    pub(super) fn no_access(start: *mut u8, len: usize) {
        poison(start, len);
    }

    pub(super) fn released(start: *mut u8, len: usize) {
        unpoison(start, len);
    }

    pub(super) fn open_link(link: *mut u8, _read: bool) {
        unpoison(link, LINK);
    }

    pub(super) fn close_link(link: *mut u8) {
        poison(link, LINK);
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
    const MALLOCLIKE_BLOCK: usize = 0x1301;
    const FREELIKE_BLOCK: usize = 0x1302;
    const RESIZEINPLACE_BLOCK: usize = 0x130b;
    /// memcheck.h's: its tool base, `'M' << 24 | 'C' << 16`, plus 0, 1, 2.
    const MAKE_MEM_NOACCESS: usize = 0x4d43_0000;
    const MAKE_MEM_UNDEFINED: usize = 0x4d43_0001;
    const MAKE_MEM_DEFINED: usize = 0x4d43_0002;

    /// Bytes of a free-list link.
    const LINK: usize = core::mem::size_of::<usize>();

    /// Issues request `args[0]` with arguments `args[1..]`; returns
    /// valgrind's answer, or 0 on the real CPU.
    #[inline(always)]
    fn request(args: [usize; 6]) -> usize {
        let mut result: usize = 0;
        // SAFETY: the four rotations of rdi add up to 128 bits, leaving it
        // unchanged, and `xchg rbx, rbx` changes nothing: on the real CPU
        // the sequence has no effect but on the flags (not preserved).
        // Under valgrind it is the client request whose argument block is
        // at rax and whose answer lands in rdx; valgrind reads `args` and
        // updates only its own shadow state.
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

    #[inline(always)]
    fn tell(code: usize, a: *mut u8, b: usize, c: usize, d: usize) {
        if ACTIVE.load(Ordering::Relaxed) {
            request([code, a as usize, b, c, d, 0]);
        }
    }

    pub(super) fn detect() {
        ACTIVE.store(
            request([RUNNING_ON_VALGRIND, 0, 0, 0, 0, 0]) != 0,
            Ordering::Relaxed,
        );
    }

    pub(super) fn allocated(block: *mut u8, size: usize) {
        // No red zone, not zeroed (a zeroing caller writes the zeros after).
        tell(MALLOCLIKE_BLOCK, block, size, 0, 0);
    }

    pub(super) fn freed(block: *mut u8, _size: usize) {
        tell(FREELIKE_BLOCK, block, 0, 0, 0);
    }

    pub(super) fn resized(block: *mut u8, old: usize, new: usize) {
        tell(RESIZEINPLACE_BLOCK, block, old, new, 0);
    }

    pub(super) fn no_access(start: *mut u8, len: usize) {
        tell(MAKE_MEM_NOACCESS, start, len, 0, 0);
    }

    pub(super) fn released(start: *mut u8, len: usize) {
        tell(MAKE_MEM_UNDEFINED, start, len, 0, 0);
    }

    pub(super) fn open_link(link: *mut u8, read: bool) {
        // A link about to be written holds nothing yet: undefined, so that
        // memcheck still flags a read of it before the write.
        let code = if read {
            MAKE_MEM_DEFINED
        } else {
            MAKE_MEM_UNDEFINED
        };
        tell(code, link, LINK, 0, 0);
    }

    pub(super) fn close_link(link: *mut u8) {
        tell(MAKE_MEM_NOACCESS, link, LINK, 0, 0);
    }
}
