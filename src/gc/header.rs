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

use core::alloc::Layout;
use core::cell::Cell;
use core::ptr::{self, NonNull};

use super::trace::{Trace, Visitor};

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
    link: Link,
    counts: Counts,
    value: T,
}

/// An untracked allocation.
#[repr(C)]
pub(crate) struct PlainBox<T> {
    counts: Counts,
    value: T,
}

// The size budget: a 32-byte tracked header, so a 24-byte payload takes 56
// bytes; an untracked header is 8 bytes, half of `Rc`'s.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(core::mem::size_of::<Link>() + core::mem::size_of::<Counts>() == 32);
    assert!(core::mem::size_of::<TrackedBox<[u64; 3]>>() == 56);
};
const _: () = assert!(core::mem::size_of::<PlainBox<u32>>() == 12);

/// Where `T`'s value lives relative to its `Counts`, and the allocation layout.
pub(crate) struct Shape<T>(core::marker::PhantomData<T>);

impl<T: Trace> Shape<T> {
    /// Whether objects of this type are linked into the collector's lists.
    pub(crate) const TRACKED: bool = T::MAY_CONTAIN_CC;
    /// Bytes from the start of the allocation to the `Counts`.
    pub(crate) const COUNTS_OFFSET: usize = if Self::TRACKED {
        core::mem::offset_of!(TrackedBox<T>, counts)
    } else {
        0
    };
    /// Bytes from the `Counts` to the value.
    pub(crate) const VALUE_OFFSET: usize = if Self::TRACKED {
        core::mem::offset_of!(TrackedBox<T>, value) - Self::COUNTS_OFFSET
    } else {
        core::mem::offset_of!(PlainBox<T>, value)
    };
    /// Layout of the allocation.
    pub(crate) const LAYOUT: Layout = if Self::TRACKED {
        Layout::new::<TrackedBox<T>>()
    } else {
        Layout::new::<PlainBox<T>>()
    };
    /// The vtable stored in tracked objects of this type.
    pub(crate) const VTABLE: VTable = VTable {
        trace: Self::trace,
        finalize: if T::FINALIZER.is_some() {
            Some(Self::finalize)
        } else {
            None
        },
        drop_value: Self::drop_value,
        type_name: core::any::type_name::<T>,
        layout: Self::LAYOUT,
    };

    /// The value of the object whose counts are at `counts`.
    ///
    /// # Safety
    /// `counts` must point at the `Counts` of a live allocation of this
    /// shape. The result may be dereferenced only while the value is
    /// initialised and not dropped.
    pub(crate) unsafe fn value(counts: NonNull<Counts>) -> NonNull<T> {
        // SAFETY: the value lies `VALUE_OFFSET` bytes after the counts inside
        // the same allocation, by the definition of the boxes above.
        unsafe { counts.byte_add(Self::VALUE_OFFSET).cast() }
    }

    /// The value of the tracked object at `link`.
    ///
    /// # Safety
    /// `link` must be the link of a live tracked allocation of this shape.
    unsafe fn value_of_link(link: NonNull<Link>) -> NonNull<T> {
        // SAFETY: the caller's promise, and counts follow the link directly.
        unsafe { Self::value(counts_of(link)) }
    }

    /// # Safety
    /// `link` belongs to a live tracked `T` whose value is initialised.
    unsafe fn trace(link: NonNull<Link>, visitor: &mut Visitor<'_>) {
        // SAFETY: the caller's promise; the collector traces only values
        // whose strong count is positive or that it holds, never dropped ones.
        unsafe { Self::value_of_link(link).as_ref() }.trace(visitor)
    }

    /// # Safety
    /// As for `trace`.
    unsafe fn finalize(link: NonNull<Link>) {
        if let Some(finalize) = T::FINALIZER {
            // SAFETY: as in `trace`.
            finalize(unsafe { Self::value_of_link(link).as_ref() });
        }
    }

    /// # Safety
    /// `link` belongs to a live tracked `T` whose value is initialised, has
    /// not been dropped, and will never be used again.
    pub(crate) unsafe fn drop_value(link: NonNull<Link>) {
        // SAFETY: the caller's promise.
        unsafe { ptr::drop_in_place(Self::value_of_link(link).as_ptr()) }
    }
}

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
