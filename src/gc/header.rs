//! The memory layout of a `Cc` allocation and the intrusive list links.
//!
//! A tracked allocation is `[Link | Counts | value]`: two list words, a
//! vtable pointer, then `u32` strong and weak counts (32 bytes on 64-bit).
//! An untracked one (a type that cannot hold a `Cc`) is `[Counts | value]`,
//! smaller than `Rc`'s header. A `Cc` points at the `Counts`, so the link of
//! a tracked object is always `size_of::<Link>()` bytes before it.
//!
//! Like CPython's `PyGC_Head`, the low bits of both link words carry flags
//! (links are 8-aligned on 64-bit, 4-aligned on 32-bit, so 2 bits are free
//! everywhere), and during a collection `prev` holds `gc_refs` instead of a
//! pointer.

use alloc::vec::Vec;
use core::alloc::Layout;
use core::cell::Cell;
use core::ptr::{self, NonNull};

/// Number of flag bits in each link word.
pub(crate) const FLAG_BITS: u32 = 2;
const FLAG_MASK: usize = (1 << FLAG_BITS) - 1;

// Flags kept in `prev`, valid whether it holds a pointer or `gc_refs`.
/// The finalizer has run (PEP 442: never twice).
pub(crate) const FINALIZED: usize = 1;
/// Part of the set being collected; `prev` holds `gc_refs`.
pub(crate) const COLLECTING: usize = 2;

// Flags kept in `next`.
/// Tentatively unreachable (in the unreachable list), or during teardown:
/// confirmed garbage whose handles the clear pass may empty.
pub(crate) const UNREACHABLE: usize = 1;
/// Weak references were cleared by the collector: `upgrade` fails forever.
pub(crate) const WEAK_CLEARED: usize = 2;

/// The largest strong count. `gc_refs` must fit in a link word beside the
/// flags, which matters only on 32-bit targets.
pub(crate) const MAX_STRONG: u32 = if usize::BITS > 32 {
    u32::MAX - 1
} else {
    (u32::MAX >> (FLAG_BITS + 1)) - 1
};

/// Added to the `gc_refs` of an object that could not be traced, so that no
/// number of subtractions (at most its strong count) brings it to zero: the
/// object then counts as referenced from outside.
pub(crate) const ROOT_BIAS: usize = MAX_STRONG as usize + 1;

/// Per-type operations the collector needs on a type-erased object.
pub(crate) struct VTable {
    /// Calls the value's `Trace::trace`.
    pub(crate) trace: unsafe fn(NonNull<Link>, &mut Visitor<'_>),
    /// Calls the value's `Trace::FINALIZER`, if it has one.
    pub(crate) finalize: Option<unsafe fn(NonNull<Link>)>,
    /// Drops the value in place.
    pub(crate) drop_value: unsafe fn(NonNull<Link>),
    /// `core::any::type_name` of the value.
    pub(crate) type_name: fn() -> &'static str,
    /// Layout of the whole allocation.
    pub(crate) layout: Layout,
}

/// Two list words and a vtable: the first 24 bytes of a tracked object, and
/// the list heads inside a `Collector`.
#[repr(C)]
pub(crate) struct Link {
    next: Cell<*const Link>,
    prev: Cell<*const Link>,
    pub(crate) vtable: &'static VTable,
}

/// Strong and weak counts. `weak` includes one for all strong references
/// together, as in `Rc`, so the memory goes when `weak` reaches zero.
#[repr(C)]
pub(crate) struct Counts {
    pub(crate) strong: Cell<u32>,
    pub(crate) weak: Cell<u32>,
}

/// A tracked allocation.
#[repr(C)]
pub(crate) struct TrackedBox<T> {
    pub(crate) link: Link,
    pub(crate) counts: Counts,
    pub(crate) value: T,
}

/// An untracked allocation.
#[repr(C)]
pub(crate) struct PlainBox<T> {
    pub(crate) counts: Counts,
    pub(crate) value: T,
}

// The size budget: a 32-byte tracked header, so a 24-byte payload takes 56
// bytes; an untracked header is 8 bytes, half of `Rc`'s.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(core::mem::size_of::<Link>() + core::mem::size_of::<Counts>() == 32);
    assert!(core::mem::size_of::<TrackedBox<[u64; 3]>>() == 56);
};
const _: () = assert!(core::mem::size_of::<PlainBox<u32>>() == 12);

/// The counts of the tracked object at `link`.
pub(crate) fn counts_of(link: NonNull<Link>) -> NonNull<Counts> {
    // SAFETY: the counts follow the link directly inside every tracked
    // allocation, so the result is in bounds and non-null.
    unsafe { link.byte_add(core::mem::size_of::<Link>()).cast() }
}

/// The link of the tracked object whose counts are at `counts`.
///
/// # Safety
/// `counts` must belong to a tracked allocation.
pub(crate) unsafe fn link_of(counts: NonNull<Counts>) -> NonNull<Link> {
    // SAFETY: the caller's promise; the link precedes the counts directly.
    unsafe { counts.byte_sub(core::mem::size_of::<Link>()).cast() }
}

/// Vtable of list heads, which are never traced, finalized or dropped.
static HEAD_VTABLE: VTable = VTable {
    trace: |_, _| {},
    finalize: None,
    drop_value: |_| {},
    type_name: || "list head",
    layout: Layout::new::<Link>(),
};

fn strip(p: *const Link) -> *const Link {
    p.map_addr(|a| a & !FLAG_MASK)
}

impl Link {
    /// A list head (call `init_ring` once it has its final address).
    pub(crate) fn head() -> Self {
        Link {
            next: Cell::new(ptr::null()),
            prev: Cell::new(ptr::null()),
            vtable: &HEAD_VTABLE,
        }
    }

    /// An unlinked object link.
    pub(crate) fn new(vtable: &'static VTable) -> Self {
        Link {
            next: Cell::new(ptr::null()),
            prev: Cell::new(ptr::null()),
            vtable,
        }
    }

    /// Links this node to itself: an empty list if it is a head, an
    /// untracked node (that unlinks harmlessly) if it is an object.
    pub(crate) fn init_ring(&self) {
        self.next.set(self);
        self.prev.set(self);
    }

    /// The next node (flags stripped).
    pub(crate) fn next(&self) -> *const Link {
        strip(self.next.get())
    }

    /// Sets the next node, keeping the flags.
    pub(crate) fn set_next(&self, p: *const Link) {
        let flags = self.next.get().addr() & FLAG_MASK;
        self.next.set(p.map_addr(|a| a | flags));
    }

    /// The previous node. Meaningless while `COLLECTING` is set.
    pub(crate) fn prev(&self) -> *const Link {
        strip(self.prev.get())
    }

    /// Sets the previous node, keeping the flags.
    pub(crate) fn set_prev(&self, p: *const Link) {
        let flags = self.prev.get().addr() & FLAG_MASK;
        self.prev.set(p.map_addr(|a| a | flags));
    }

    /// `gc_refs`, valid while `COLLECTING` is set.
    pub(crate) fn gc_refs(&self) -> usize {
        self.prev.get().addr() >> FLAG_BITS
    }

    /// Stores `gc_refs` in `prev`, keeping the flags.
    pub(crate) fn set_gc_refs(&self, refs: usize) {
        let flags = self.prev.get().addr() & FLAG_MASK;
        self.prev
            .set(ptr::without_provenance((refs << FLAG_BITS) | flags));
    }

    /// Sets `COLLECTING` and stores `gc_refs` in `prev`, keeping
    /// `FINALIZED`: the start of a collection for this node.
    pub(crate) fn start_collecting(&self, refs: usize) {
        let finalized = self.prev.get().addr() & FINALIZED;
        self.prev.set(ptr::without_provenance(
            (refs << FLAG_BITS) | COLLECTING | finalized,
        ));
    }

    /// Points `prev` at `p` and clears `COLLECTING`, keeping `FINALIZED`:
    /// the end of a collection for this node.
    pub(crate) fn restore_prev(&self, p: *const Link) {
        let finalized = self.prev.get().addr() & FINALIZED;
        self.prev.set(p.map_addr(|a| a | finalized));
    }

    /// `gc_refs -= 1`, valid while `COLLECTING` is set; `false` (and no
    /// change) if `gc_refs` is already 0.
    pub(crate) fn dec_gc_refs(&self) -> bool {
        let word = self.prev.get().addr();
        if word >> FLAG_BITS == 0 {
            return false;
        }
        // The flags sit below `gc_refs`: one subtraction keeps them.
        self.prev
            .set(ptr::without_provenance(word - (1 << FLAG_BITS)));
        true
    }

    /// Whether `flag` is set in `prev`.
    pub(crate) fn prev_flag(&self, flag: usize) -> bool {
        self.prev.get().addr() & flag != 0
    }

    /// Sets or clears `flag` in `prev`.
    pub(crate) fn set_prev_flag(&self, flag: usize, on: bool) {
        let p = self.prev.get();
        self.prev
            .set(p.map_addr(|a| if on { a | flag } else { a & !flag }));
    }

    /// Whether `flag` is set in `next`.
    pub(crate) fn next_flag(&self, flag: usize) -> bool {
        self.next.get().addr() & flag != 0
    }

    /// Sets or clears `flag` in `next`.
    pub(crate) fn set_next_flag(&self, flag: usize, on: bool) {
        let p = self.next.get();
        self.next
            .set(p.map_addr(|a| if on { a | flag } else { a & !flag }));
    }

    /// Whether this head's list is empty.
    pub(crate) fn is_empty(&self) -> bool {
        ptr::eq(self.next(), self)
    }

    /// Unlinks this node from its list and leaves it linked to itself, so a
    /// second unlink is harmless.
    ///
    /// # Safety
    /// The node is in a well-formed circular list (valid `prev` pointers)
    /// whose nodes are all alive.
    #[inline]
    pub(crate) unsafe fn unlink(&self) {
        // Each word read once: the neighbours' writes below keep the flags
        // of the words they write, so this node's flags are still these
        // afterwards (even when it is its own neighbour).
        let (next_word, prev_word) = (self.next.get(), self.prev.get());
        // SAFETY: the caller's promise: neighbours are live links.
        let (prev, next) = unsafe { (&*strip(prev_word), &*strip(next_word)) };
        prev.set_next(next);
        next.set_prev(prev);
        let this: *const Link = self;
        self.next
            .set(this.map_addr(|a| a | (next_word.addr() & FLAG_MASK)));
        self.prev
            .set(this.map_addr(|a| a | (prev_word.addr() & FLAG_MASK)));
    }

    /// Appends `node` at the tail of the list headed by `self`.
    ///
    /// # Safety
    /// `self` heads a well-formed list of live nodes, `node` is live and in
    /// no list (or linked to itself).
    pub(crate) unsafe fn push_back(&self, node: &Link) {
        // SAFETY: the caller's promise: the tail is a live link.
        let tail = unsafe { &*self.prev() };
        tail.set_next(node);
        node.set_prev(tail);
        node.set_next(self);
        self.set_prev(node);
    }

    /// `push_back` for a node that has never been in a list: its flags are
    /// all clear and the head's `prev` has none, so those words are written
    /// without reading them first.
    ///
    /// # Safety
    /// As for `push_back`, and `node` has no flags set.
    pub(crate) unsafe fn push_back_fresh(&self, node: &Link) {
        debug_assert_eq!(node.prev.get().addr() & FLAG_MASK, 0);
        debug_assert_eq!(node.next.get().addr() & FLAG_MASK, 0);
        // SAFETY: the caller's promise: the tail is a live link.
        let tail = unsafe { &*self.prev() };
        tail.set_next(node);
        node.prev.set(tail);
        node.next.set(self);
        self.prev.set(node);
    }

    /// Moves every node of the list headed by `self` to the tail of `to`.
    ///
    /// # Safety
    /// Both heads lead well-formed lists of live nodes.
    pub(crate) unsafe fn splice_into(&self, to: &Link) {
        if self.is_empty() {
            return;
        }
        // SAFETY: the caller's promise: first, last and to's tail are live.
        let (first, last, tail) = unsafe { (&*self.next(), &*self.prev(), &*to.prev()) };
        tail.set_next(first);
        first.set_prev(tail);
        last.set_next(to);
        to.set_prev(last);
        self.init_ring();
    }

    /// Detaches this head from its ring, leaving the nodes linked among
    /// themselves, so they stay valid after the head is gone.
    pub(crate) fn detach_head(&self) {
        if self.next().is_null() || self.is_empty() {
            return;
        }
        // SAFETY: a head's neighbours are live nodes of its own list.
        unsafe { self.unlink() }
    }

    /// Calls `f` on every node, front to back. `f` must not unlink the node
    /// after the current one.
    ///
    /// # Safety
    /// `self` heads a list of live nodes whose `next` words are intact.
    pub(crate) unsafe fn for_each(&self, mut f: impl FnMut(NonNull<Link>)) {
        let mut cur = self.next();
        while !ptr::eq(cur, self) {
            // SAFETY: the caller's promise: `cur` is a live node.
            let node = unsafe { &*cur };
            cur = node.next();
            f(NonNull::from(node));
        }
    }

    /// Rebuilds every `prev` pointer from the `next` chain and clears the
    /// transient collection flags, making the list well formed again.
    /// Returns the number of nodes.
    ///
    /// # Safety
    /// `self` heads a list whose `next` chain is intact and live.
    pub(crate) unsafe fn restore(&self) -> usize {
        let mut prev: *const Link = self;
        let mut n = 0;
        // SAFETY: the caller's promise: every node on the chain is live.
        unsafe {
            self.for_each(|node| {
                let node = node.as_ref();
                // One store per word.
                node.restore_prev(prev);
                node.next
                    .set(node.next.get().map_addr(|a| a & !UNREACHABLE));
                prev = node;
                n += 1;
            });
        }
        self.set_prev(prev);
        n
    }

    /// Number of nodes in the list.
    ///
    /// # Safety
    /// As for `for_each`.
    pub(crate) unsafe fn len(&self) -> usize {
        let mut n = 0;
        // SAFETY: the caller's promise.
        unsafe { self.for_each(|_| n += 1) };
        n
    }

    /// Checks the list is well formed and its transient flags are as
    /// expected (CPython's `validate_list`).
    ///
    /// # Safety
    /// As for `for_each`.
    pub(crate) unsafe fn validate(&self, collecting: bool, unreachable: bool) {
        let mut prev: *const Link = self;
        // SAFETY: the caller's promise.
        unsafe {
            self.for_each(|node| {
                let node = node.as_ref();
                assert!(ptr::eq(node.prev(), prev), "gc list: broken prev link");
                assert_eq!(
                    node.prev_flag(COLLECTING),
                    collecting,
                    "gc list: wrong COLLECTING flag"
                );
                assert_eq!(
                    node.next_flag(UNREACHABLE),
                    unreachable,
                    "gc list: wrong UNREACHABLE flag"
                );
                prev = node;
            });
        }
        assert!(ptr::eq(self.prev(), prev), "gc list: broken tail");
    }
}

/// Low bit of a handle: "already counted" during the collector's subtract
/// pass, so a `Trace` that reports the same `Cc` twice is counted once.
pub(crate) const MARK: usize = 1;
/// `Weak::new`'s address: `NonNull::dangling()`, where no allocation can be.
pub(crate) const NO_ALLOCATION: usize = core::mem::align_of::<Counts>();
/// Address held by a handle the collector emptied (CPython's `tp_clear`).
/// It has the mark bit set, so one test of that bit sends both marked and
/// emptied handles off the fast path.
pub(crate) const CLEARED: usize = NO_ALLOCATION | MARK;

/// `raw` with the collector's mark bit cleared.
#[inline]
pub(crate) fn unmarked(raw: NonNull<Counts>) -> NonNull<Counts> {
    // SAFETY: clearing bit 0 of a 4-aligned, non-null address keeps it non-null.
    unsafe { NonNull::new_unchecked(raw.as_ptr().map_addr(|a| a & !MARK)) }
}

/// Collector-side handle operations (the visitor's view of a `Cc`).
pub(crate) mod handle {
    use super::{unmarked, Counts, CLEARED, MARK};
    use core::cell::Cell;
    use core::ptr::NonNull;

    /// The live counts a handle refers to and whether it is marked, or
    /// `None` if the collector emptied it.
    #[inline]
    pub(crate) fn read(handle: &Cell<NonNull<Counts>>) -> Option<(NonNull<Counts>, bool)> {
        let raw = handle.get();
        let addr = raw.addr().get();
        if addr & MARK == 0 {
            // A live, unmarked handle.
            Some((raw, false))
        } else if addr != CLEARED {
            // Marked by the subtract pass (the reach and unmark passes see
            // these often: inline too).
            Some((unmarked(raw), true))
        } else {
            None
        }
    }

    /// Sets or clears the mark of a live handle.
    #[inline]
    pub(crate) fn set_mark(handle: &Cell<NonNull<Counts>>, counts: NonNull<Counts>, on: bool) {
        let raw = counts.as_ptr().map_addr(|a| if on { a | MARK } else { a });
        // SAFETY: derived from a non-null pointer without clearing bits.
        handle.set(unsafe { NonNull::new_unchecked(raw) });
    }

    /// Empties a handle; its reference must be released by the caller.
    pub(crate) fn clear(handle: &Cell<NonNull<Counts>>) {
        handle.set(NonNull::<Counts>::dangling().map_addr(|a| a | MARK));
    }
}

/// Aborts the process, as `Rc` does: only leaking references on a huge
/// scale gets here, and wrapping would free a value still referenced.
#[cold]
pub(crate) fn abort() -> ! {
    #[cfg(feature = "std")]
    {
        std::eprintln!(
            "pymalloc: reference count overflow (more than {MAX_STRONG} references to one Cc \
             allocation); aborting"
        );
        std::process::abort();
    }
    #[cfg(not(feature = "std"))]
    {
        // A panic while panicking aborts, also without std.
        struct Abort;
        impl Drop for Abort {
            fn drop(&mut self) {
                panic!("pymalloc: aborting");
            }
        }
        let _abort = Abort;
        panic!("pymalloc: reference count overflow");
    }
}

/// Adds one strong reference.
#[inline]
pub(crate) fn inc_strong(counts: &Counts) {
    let strong = counts.strong.get();
    if strong >= MAX_STRONG {
        abort();
    }
    counts.strong.set(strong + 1);
}

/// Drops one weak reference and frees the memory when it was the last.
///
/// # Safety
/// `counts` belongs to a live allocation of `layout` starting at `start`,
/// whose value is dropped or was never initialised, and the caller owns one
/// weak reference to it.
#[inline]
pub(crate) unsafe fn release_weak(
    counts: NonNull<Counts>,
    start: NonNull<u8>,
    layout: core::alloc::Layout,
) {
    // SAFETY: the caller's weak reference keeps the allocation alive.
    let weak = unsafe { counts.as_ref() }.weak.get() - 1;
    if weak == 0 {
        // SAFETY: no strong or weak reference is left, so no one can reach
        // the memory again; it came from `alloc` with this layout.
        unsafe { alloc::alloc::dealloc(start.as_ptr(), layout) };
    } else {
        // SAFETY: as above, the allocation is still alive.
        unsafe { counts.as_ref() }.weak.set(weak);
    }
}

/// The collector's operation on each `Cc` a `Trace` reports.
pub(crate) enum Op<'a> {
    /// Count internal references: `gc_refs -= 1` once per handle.
    Subtract { consistent: bool },
    /// Remove the marks `Subtract` left on handles.
    Unmark,
    /// Mark what a reachable object reaches as reachable; objects the scan
    /// already passed over go on `stack` to be traced in turn.
    Reach { stack: &'a Cell<*const Link> },
    /// Empty handles that point into the garbage.
    Clear,
    /// Count handles that point at `target`.
    Find {
        target: NonNull<Counts>,
        hits: usize,
    },
    /// Name the type of each tracked object reported (`gc.get_referents`).
    Referents(Vec<&'static str>),
}

impl Op<'_> {
    /// The collector's work on one reported handle. The two passes that
    /// trace every object of a collection, garbage or not (subtract,
    /// reach), are handled inline; the rest in `visit_other`, which keeps
    /// this small enough to inline into the `Trace` impls that call it.
    #[inline]
    pub(crate) fn visit(&mut self, cell: &Cell<NonNull<Counts>>) {
        let Some((counts, marked)) = handle::read(cell) else {
            return;
        };
        // SAFETY: `visit` is called only for handles of tracked types (see
        // `Visitor::visit`), and a handle holds a strong reference, so this
        // is the link of a live tracked allocation.
        let link = unsafe { link_of(counts).as_ref() };
        match self {
            Op::Subtract { consistent } => {
                if marked || !link.prev_flag(COLLECTING) {
                    return;
                }
                handle::set_mark(cell, counts, true);
                if !link.dec_gc_refs() {
                    // More references reported than exist: a `Trace` broke
                    // its safety contract (visited a handle it does not
                    // own). Guarded against defensively: the collection
                    // then frees nothing.
                    *consistent = false;
                }
            }
            Op::Reach { stack } => {
                if !link.prev_flag(COLLECTING) {
                    return;
                }
                if marked {
                    // Reachable objects are traced exactly once here, so
                    // this is where the marks `Subtract` left go away.
                    handle::set_mark(cell, counts, false);
                }
                if link.next_flag(UNREACHABLE) {
                    // Passed over as tentatively unreachable, reachable
                    // after all: onto the stack of objects still to trace,
                    // threaded through `prev` (a pointer there reads as
                    // `gc_refs > 0`: reachable, not to be pushed again).
                    link.set_next_flag(UNREACHABLE, false);
                    link.set_prev(stack.get());
                    stack.set(link);
                } else if link.gc_refs() == 0 {
                    // Not reached by the scan yet: it will be traced there.
                    link.set_gc_refs(1);
                }
            }
            _ => self.visit_other(cell, counts, marked, link),
        }
    }

    /// `visit` for the operations that trace only part of a collection
    /// (clear: the garbage), or run after a panic or for diagnostics.
    #[inline(never)]
    fn visit_other(
        &mut self,
        cell: &Cell<NonNull<Counts>>,
        counts: NonNull<Counts>,
        marked: bool,
        link: &Link,
    ) {
        match self {
            Op::Unmark => {
                if marked {
                    handle::set_mark(cell, counts, false);
                }
            }
            Op::Clear => {
                if link.next_flag(UNREACHABLE) {
                    handle::clear(cell);
                    // SAFETY: as in `visit`, the counts are alive.
                    let c = unsafe { counts.as_ref() };
                    // Never reaches zero: the collector holds one reference.
                    c.strong.set(c.strong.get() - 1);
                }
            }
            Op::Find { target, hits } => {
                if counts == *target {
                    *hits += 1;
                }
            }
            Op::Referents(names) => names.push((link.vtable.type_name)()),
            Op::Subtract { .. } | Op::Reach { .. } => unreachable!(),
        }
    }
}

/// Receives the `Cc`s a value owns; handed to [`Trace::trace`](crate::Trace::trace).
pub struct Visitor<'a> {
    pub(crate) op: Op<'a>,
    pub(crate) untraceable: bool,
}

impl Visitor<'_> {
    /// Reports that the value cannot be traced right now; the collector
    /// keeps it (and what it holds) alive for this collection.
    pub fn untraceable(&mut self) {
        self.untraceable = true;
    }
}
