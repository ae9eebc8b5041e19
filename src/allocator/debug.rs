//! The `debug` feature: CPython's `PYTHONMALLOC=debug` for Rust.
//!
//! Every block gets a header and a trailer around the caller's bytes:
//!
//! ```text
//! base                                   data = base + prefix
//! | padding | prev | next | size | FD×8 | caller's bytes (CD…) | FD×8 |
//!                                  └ leading guard                └ trailing guard
//! ```
//!
//! `prefix` is `max(align, 32)`, so the data keeps the caller's alignment.
//! `size` is the size requested; `prev`/`next` link the live large blocks
//! (the pools already know their own blocks). Fresh bytes are `0xCD`, freed
//! blocks are filled with `0xDD`, guards are `0xFD`, as in CPython.
//!
//! On free and realloc the checks run in this order, each reading only
//! memory the heap is known to own: the pointer belongs to the heap and is a
//! live block of its layout's class (else: foreign pointer, double free, or
//! wrong layout); the leading guard (first, since a corrupt size would
//! mislead the tail check); the recorded size against the layout; the
//! trailing guard. A failed check prints a report naming the address, the
//! size requested, the check and the bytes around it, then aborts.

use super::heap::BlockStatus;
use super::list;
#[cfg(fork_handlers)]
use super::sync::ForkGate;
use super::sync::Lock;
use core::alloc::Layout;
use core::fmt;
use core::ptr;

/// Fill for freshly allocated bytes.
pub const CLEAN_BYTE: u8 = 0xCD;
/// Fill for freed blocks.
pub const DEAD_BYTE: u8 = 0xDD;
/// Guard bytes around each block.
pub const FORBIDDEN_BYTE: u8 = 0xFD;

const GUARD: usize = 8;

/// The words before the leading guard.
#[repr(C)]
struct Header {
    prev: *mut Header,
    next: *mut Header,
    size: usize,
    guard: [u8; GUARD],
}

const HEADER: usize = core::mem::size_of::<Header>();

/// Around every use of an allocator's list of large blocks: the lists live
/// in `PyMalloc` values, which may move, so the fork handlers cannot reach
/// their locks and close this gate instead.
#[cfg(fork_handlers)]
pub(crate) static LARGE_GATE: ForkGate = ForkGate::new();

/// Live large blocks, linked through their headers.
pub(crate) struct LargeList {
    head: *mut Header,
}

// SAFETY: the headers belong to live large blocks of the allocator that
// owns the list, not to any thread; the list is only used under its lock.
unsafe impl Send for LargeList {}

impl LargeList {
    pub(crate) const fn new() -> Self {
        LargeList {
            head: ptr::null_mut(),
        }
    }

    /// # Safety
    /// `header` is a live large block's header, not on the list.
    unsafe fn push(&mut self, header: *mut Header) {
        // SAFETY: forwarded contract; list members are live headers.
        unsafe { list::push_front(&mut self.head, header) }
    }

    /// Whether `header` is on the list; compares addresses only, so any
    /// pointer may be asked about.
    fn contains(&self, header: *mut Header) -> bool {
        let mut cursor = self.head;
        while !cursor.is_null() {
            if cursor == header {
                return true;
            }
            // SAFETY: list members are live headers.
            cursor = unsafe { (*cursor).next };
        }
        false
    }

    /// # Safety
    /// `header` is on the list.
    unsafe fn remove(&mut self, header: *mut Header) {
        // SAFETY: forwarded contract; list members are live headers.
        unsafe { list::unlink(&mut self.head, header) }
    }
}

list::impl_links!(Header);

/// The layout the heap really serves for a caller's `layout`, and the
/// offset of the caller's bytes in it; `None` if it would overflow.
fn wrap(layout: Layout) -> Option<(Layout, usize)> {
    let prefix = layout.align().max(HEADER);
    let size = prefix.checked_add(layout.size())?.checked_add(GUARD)?;
    Some((Layout::from_size_align(size, layout.align()).ok()?, prefix))
}

fn is_small(a: &impl Unchecked, inner: Layout) -> bool {
    a.pool_class(inner).is_some()
}

/// What went wrong with a block, for the report.
#[derive(Clone, Copy)]
enum Fault {
    Foreign,
    DoubleFree,
    NotABlock,
    LargeUnknown,
    LeadingPad,
    SizeMismatch,
    TrailingPad,
}

impl Fault {
    fn headline(self) -> &'static str {
        match self {
            Fault::Foreign => "free of a pointer this heap never handed out",
            Fault::DoubleFree => "double free: the block is already free",
            Fault::NotABlock => "free of a pointer that is not the start of a block of its layout's size class",
            Fault::LargeUnknown => "free of a pointer that is not a live large block of this heap (double free or foreign pointer)",
            Fault::LeadingPad => "bad leading pad byte",
            Fault::SizeMismatch => "the layout given to free does not match the size requested",
            Fault::TrailingPad => "bad trailing pad byte",
        }
    }

    /// Whether the block is known to be ours and live, so its bytes may be
    /// read for the dump.
    fn block_readable(self) -> bool {
        matches!(
            self,
            Fault::LeadingPad | Fault::SizeMismatch | Fault::TrailingPad
        )
    }
}

/// The report printed before aborting.
struct Report {
    fault: Fault,
    data: *const u8,
    layout: Layout,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Report {
            fault,
            data,
            layout,
        } = *self;
        writeln!(f, "pymalloc debug: {} at p={data:p}", fault.headline())?;
        writeln!(
            f,
            "    caller's layout: {} bytes, align {}",
            layout.size(),
            layout.align()
        )?;
        if !fault.block_readable() {
            return writeln!(
                f,
                "    (the block is not known to this heap, so its bytes are not read)"
            );
        }
        // SAFETY: the block is live and ours (`block_readable`), so its
        // header, data (of the recorded size when that matches the layout)
        // and trailer are readable.
        unsafe {
            let requested = (*header_of(data)).size;
            writeln!(f, "    {requested} bytes originally requested")?;
            dump_guard(f, "p-8", data.sub(GUARD))?;
            if let Fault::SizeMismatch = fault {
                return writeln!(f, "    the caller's layout says {} bytes", layout.size());
            }
            let size = requested;
            dump_guard(f, "tail", data.add(size))?;
            write!(f, "    data at p:")?;
            let shown = size.min(16);
            for i in 0..shown {
                write!(f, " {:02x}", *data.add(i))?;
            }
            if size > shown {
                write!(f, " ...")?;
                for i in size.saturating_sub(8).max(shown)..size {
                    write!(f, " {:02x}", *data.add(i))?;
                }
            }
            writeln!(f)
        }
    }
}

/// Prints one guard, flagging each byte that is not `FORBIDDEN_BYTE`.
///
/// # Safety
/// `at` points to `GUARD` readable bytes.
unsafe fn dump_guard(f: &mut fmt::Formatter<'_>, name: &str, at: *const u8) -> fmt::Result {
    // SAFETY: per the contract.
    let bytes = unsafe { ptr::read(at.cast::<[u8; GUARD]>()) };
    if bytes.iter().all(|&b| b == FORBIDDEN_BYTE) {
        return writeln!(
            f,
            "    the {GUARD} pad bytes at {name}={at:p} are FORBIDDENBYTE (0xfd), as expected"
        );
    }
    writeln!(
        f,
        "    the {GUARD} pad bytes at {name}={at:p} are not all FORBIDDENBYTE (0xfd):"
    )?;
    for (i, b) in bytes.iter().enumerate() {
        let ouch = if *b == FORBIDDEN_BYTE {
            ""
        } else {
            " *** OUCH"
        };
        writeln!(f, "        at {name}+{i}: 0x{b:02x}{ouch}")?;
    }
    Ok(())
}

fn header_of(data: *const u8) -> *mut Header {
    data.wrapping_sub(HEADER).cast_mut().cast()
}

/// Prints the report and stops the program.
#[cold]
#[inline(never)]
fn fail(report: Report) -> ! {
    #[cfg(feature = "std")]
    {
        // Straight to the unbuffered stderr handle: no allocation, and no
        // test-harness capture that would allocate.
        let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("{report}"));
        std::process::abort()
    }
    #[cfg(not(feature = "std"))]
    {
        // Without std there is no abort; firmware builds with
        // `panic = "abort"`, which makes this one.
        panic!("{report}")
    }
}

/// The allocator's paths without the checks, which the checks wrap. The
/// front implements it, so that this layer does not name the front.
pub(crate) trait Unchecked {
    /// Allocates `layout`, counting `requested` bytes as asked for, zeroed
    /// if `zeroed`; null when out of memory.
    fn allocate(&self, layout: Layout, requested: usize, zeroed: bool) -> *mut u8;

    /// Frees what `allocate(layout, requested)` returned.
    ///
    /// # Safety
    /// `ptr` came from `allocate` with this `layout` and `requested` and has
    /// not been freed since.
    unsafe fn deallocate(&self, ptr: *mut u8, layout: Layout, requested: usize);

    /// Resizes what `allocate(layout, requested)` returned to `new_size`
    /// bytes, `new_requested` of them asked for; null (the block untouched)
    /// when out of memory.
    ///
    /// # Safety
    /// As for `deallocate`.
    unsafe fn reallocate(
        &self,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
        requested: usize,
        new_requested: usize,
    ) -> *mut u8;

    /// The pool class (small or medium) that serves `layout`, or `None`
    /// when it goes to the backing.
    fn pool_class(&self, layout: Layout) -> Option<usize>;

    /// Where `block`, claimed to be of small class `class`, stands.
    fn block_status(&self, block: *mut u8, class: usize) -> BlockStatus;

    /// The live large blocks.
    fn large_blocks(&self) -> &Lock<LargeList>;
}

/// Allocates `layout` with a header and guards, its bytes `CLEAN_BYTE`
/// or, if `zeroed`, zero.
pub(crate) fn alloc(a: &impl Unchecked, layout: Layout, zeroed: bool) -> *mut u8 {
    let Some((inner, prefix)) = wrap(layout) else {
        return ptr::null_mut();
    };
    let base = a.allocate(inner, layout.size(), false);
    if base.is_null() {
        return base;
    }
    // SAFETY: the block has `inner.size()` bytes: prefix, data, guard.
    let data = unsafe { base.add(prefix) };
    // SAFETY: as above; the header sits just before `data`.
    unsafe {
        header_of(data).write(Header {
            prev: ptr::null_mut(),
            next: ptr::null_mut(),
            size: layout.size(),
            guard: [FORBIDDEN_BYTE; GUARD],
        });
        data.write_bytes(if zeroed { 0 } else { CLEAN_BYTE }, layout.size());
        data.add(layout.size()).write_bytes(FORBIDDEN_BYTE, GUARD);
    }
    if !is_small(a, inner) {
        #[cfg(fork_handlers)]
        let _pass = LARGE_GATE.enter();
        // SAFETY: a live large block, not yet listed.
        unsafe { a.large_blocks().lock().push(header_of(data)) };
    }
    data
}

/// Checks `data` is a live block of `layout` with intact guards, and
/// aborts with a report if not. Returns the real layout and its base.
/// For large blocks, takes the block off the live list.
fn checked_release(a: &impl Unchecked, data: *mut u8, layout: Layout) -> (Layout, *mut u8) {
    let report = |fault| Report {
        fault,
        data,
        layout,
    };
    let Some((inner, prefix)) = wrap(layout) else {
        fail(report(Fault::Foreign));
    };
    let base = data.wrapping_sub(prefix);
    #[cfg(fork_handlers)]
    let _pass = LARGE_GATE.enter();
    let mut large_blocks = a.large_blocks().lock();
    let ownership = match a.pool_class(inner) {
        Some(class) => match a.block_status(base, class) {
            BlockStatus::Live => None,
            BlockStatus::Free => Some(Fault::DoubleFree),
            BlockStatus::Foreign => Some(Fault::Foreign),
            BlockStatus::NotABlock => Some(Fault::NotABlock),
        },
        None if large_blocks.contains(header_of(data)) => None,
        None => Some(Fault::LargeUnknown),
    };
    if let Some(fault) = ownership {
        drop(large_blocks);
        fail(report(fault));
    }
    // SAFETY: the block is live and ours, so header, data and trailer
    // are readable.
    let fault = unsafe {
        let header = &*header_of(data);
        if header.guard != [FORBIDDEN_BYTE; GUARD] {
            Some(Fault::LeadingPad)
        } else if header.size != layout.size() {
            Some(Fault::SizeMismatch)
        } else if ptr::read(data.add(layout.size()).cast::<[u8; GUARD]>())
            != [FORBIDDEN_BYTE; GUARD]
        {
            Some(Fault::TrailingPad)
        } else {
            None
        }
    };
    if let Some(fault) = fault {
        drop(large_blocks);
        fail(report(fault));
    }
    if !is_small(a, inner) {
        // SAFETY: found on the list above, under the same lock.
        unsafe { large_blocks.remove(header_of(data)) };
    }
    (inner, base)
}

/// # Safety
/// As for `GlobalAlloc::dealloc`; violations are reported, not UB, as
/// far as the checks reach.
pub(crate) unsafe fn dealloc(a: &impl Unchecked, data: *mut u8, layout: Layout) {
    let (inner, base) = checked_release(a, data, layout);
    // SAFETY: checked live and ours above; once filled it is freed.
    unsafe {
        base.write_bytes(DEAD_BYTE, inner.size());
        a.deallocate(base, inner, layout.size());
    }
}

/// # Safety
/// As for `GlobalAlloc::realloc`.
pub(crate) unsafe fn realloc(
    a: &impl Unchecked,
    data: *mut u8,
    layout: Layout,
    new_size: usize,
) -> *mut u8 {
    let (inner, base) = checked_release(a, data, layout);
    let relist = |data: *mut u8, inner: Layout| {
        if !is_small(a, inner) {
            #[cfg(fork_handlers)]
            let _pass = LARGE_GATE.enter();
            // SAFETY: a live large block, taken off (or never on) the list.
            unsafe { a.large_blocks().lock().push(header_of(data)) };
        }
    };
    let new_wrapped = Layout::from_size_align(new_size, layout.align())
        .ok()
        .and_then(wrap);
    let Some((new_inner, prefix)) = new_wrapped else {
        relist(data, inner);
        return ptr::null_mut();
    };
    // SAFETY: `base` is live with layout `inner` (checked above).
    let new_base = unsafe { a.reallocate(base, inner, new_inner.size(), layout.size(), new_size) };
    if new_base.is_null() {
        relist(data, inner);
        return new_base;
    }
    // SAFETY: the new block has `new_inner.size()` bytes, and the header
    // was copied (or stayed) with the data, since the prefix is the same.
    let new_data = unsafe {
        let new_data = new_base.add(prefix);
        (*header_of(new_data)).size = new_size;
        if new_size > layout.size() {
            new_data
                .add(layout.size())
                .write_bytes(CLEAN_BYTE, new_size - layout.size());
        }
        new_data.add(new_size).write_bytes(FORBIDDEN_BYTE, GUARD);
        new_data
    };
    relist(new_data, new_inner);
    new_data
}
