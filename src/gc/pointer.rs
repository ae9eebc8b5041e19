//! `Cc<T>` and `Weak<T>`: `Rc` with a cycle collector behind it.

use core::borrow::Borrow;
use core::cell::Cell;
use core::cmp::Ordering;
use core::fmt;
use core::hash::{Hash, Hasher};
use core::marker::PhantomData;
use core::ops::Deref;
use core::panic::Location;
use core::ptr::{self, NonNull};

use alloc::vec::Vec;

use super::ambient::{self, destroy_tracked};
use super::collector::{trace, Collector};
use super::header::{
    abort, handle, inc_strong, link_of, release_weak, unmarked, Counts, Link, Op, Visitor, CLEARED,
    COLLECTING, MARK, MAX_STRONG, NO_ALLOCATION, WEAK_CLEARED,
};
use super::trace::{Shape, Trace};

/// A single-threaded reference-counted pointer whose cycles the collector
/// finds and frees. Like `Rc` in every other way.
///
#[cfg_attr(feature = "std", doc = "```")]
#[cfg_attr(not(feature = "std"), doc = "```ignore")]
/// use pymalloc::{Cc, Trace};
/// use core::cell::RefCell;
///
/// #[derive(Trace)]
/// struct Node {
///     next: RefCell<Option<Cc<Node>>>,
/// }
///
/// let a = Cc::new(Node { next: RefCell::new(None) });
/// let b = Cc::new(Node { next: RefCell::new(Some(a.clone())) });
/// *a.next.borrow_mut() = Some(b.clone());
/// let weak = Cc::downgrade(&a);
/// drop((a, b));
/// assert!(weak.upgrade().is_some()); // a cycle keeps itself alive...
/// assert_eq!(pymalloc::gc::collect(), 2); // ...until the collector runs
/// assert!(weak.upgrade().is_none());
/// ```
///
/// When the collector frees a cycle it first empties the `Cc`s inside the
/// garbage (as CPython's `tp_clear` does), then drops the values. A `Drop`
/// impl of garbage that uses such an emptied `Cc` gets a panic naming the
/// cause, never a dangling pointer.
pub struct Cc<T: Trace> {
    handle: Cell<NonNull<Counts>>,
    _owns: PhantomData<T>,
}

/// A non-owning reference to a `Cc` allocation; `upgrade` fails once the
/// value is gone or the collector found it to be garbage.
pub struct Weak<T: Trace> {
    ptr: NonNull<Counts>,
    _marker: PhantomData<T>,
}

#[cold]
#[track_caller]
fn cleared() -> ! {
    panic!(
        "pymalloc: this Cc was emptied by the cycle collector because the object holding it \
         was cyclic garbage (a Drop impl touched a dead sibling)"
    )
}

impl<T: Trace> Cc<T> {
    /// Allocates `value` and returns the first reference to it.
    #[inline]
    #[track_caller]
    pub fn new(value: T) -> Self {
        let counts = Self::allocate();
        // SAFETY: `allocate` returned an allocation of this shape whose value
        // slot is uninitialised and not shared with anyone.
        unsafe { Self::value_ptr(counts).as_ptr().write(value) };
        // SAFETY: the value is initialised now.
        unsafe { Self::publish(counts, Location::caller()) }
    }

    /// Builds a value that holds a weak reference to itself, as
    /// `Rc::new_cyclic`. The `Weak` cannot be upgraded while `data_fn` runs.
    #[track_caller]
    pub fn new_cyclic(data_fn: impl FnOnce(&Weak<T>) -> T) -> Self {
        let counts = Self::allocate();
        // The allocation's one weak reference; if `data_fn` panics, dropping
        // it frees the memory (or leaves it to the clones `data_fn` kept).
        let weak = Weak {
            ptr: counts,
            _marker: PhantomData,
        };
        let value = data_fn(&weak);
        // The weak reference becomes the one all strong references share.
        core::mem::forget(weak);
        // SAFETY: the value slot is uninitialised and the strong count is
        // zero, so no one reads it.
        unsafe { Self::value_ptr(counts).as_ptr().write(value) };
        // SAFETY: the value is initialised now.
        unsafe { Self::publish(counts, Location::caller()) }
    }

    /// A fresh allocation: strong 0, weak 1, value uninitialised, link in no
    /// list (null link words).
    fn allocate() -> NonNull<Counts> {
        let layout = Shape::<T>::LAYOUT;
        // SAFETY: the layout holds at least the counts, so it is not zero-sized.
        let start = unsafe { alloc::alloc::alloc(layout) };
        let Some(start) = NonNull::new(start) else {
            alloc::alloc::handle_alloc_error(layout)
        };
        // SAFETY: the counts lie inside the fresh allocation.
        let counts: NonNull<Counts> = unsafe { start.byte_add(Shape::<T>::COUNTS_OFFSET).cast() };
        // SAFETY: `counts` is in bounds, aligned (from the box layout) and
        // not yet shared.
        unsafe {
            counts.write(Counts {
                strong: Cell::new(0),
                weak: Cell::new(1),
            })
        };
        if Shape::<T>::TRACKED {
            // SAFETY: as above for the link at the start of a tracked box.
            let link = unsafe { link_of(counts) };
            // SAFETY: as above. The link words stay null until `publish`
            // links the object (or, without a collector, links it to
            // itself); until then its strong count is zero, so nothing
            // unlinks it.
            unsafe { link.write(Link::new(&Shape::<T>::VTABLE)) };
        }
        counts
    }

    /// Makes the first strong reference and hands a tracked object to the
    /// collector (which may then run an automatic collection).
    ///
    /// # Safety
    /// `counts` comes from `allocate`, its value is initialised and no
    /// strong reference exists yet.
    unsafe fn publish(counts: NonNull<Counts>, site: &'static Location<'static>) -> Self {
        // SAFETY: the caller's promise: the allocation is alive.
        unsafe { counts.as_ref() }.strong.set(1);
        let this = Cc {
            handle: Cell::new(counts),
            _owns: PhantomData,
        };
        if Shape::<T>::TRACKED {
            // SAFETY: tracked allocations start with a link, in no list
            // since `allocate`.
            ambient::track(unsafe { link_of(counts) }, site);
        }
        this
    }

    /// # Safety
    /// `counts` belongs to an allocation of this shape.
    unsafe fn value_ptr(counts: NonNull<Counts>) -> NonNull<T> {
        // SAFETY: the caller's promise.
        unsafe { Shape::<T>::value(counts) }
    }

    /// The handle cell, for the collector's visitor.
    pub(crate) fn handle(&self) -> &Cell<NonNull<Counts>> {
        &self.handle
    }

    /// The counts this handle refers to, or `None` if the collector emptied it.
    #[inline]
    fn counts(&self) -> Option<NonNull<Counts>> {
        let raw = self.handle.get();
        // Untracked handles are never marked or emptied.
        if !Shape::<T>::TRACKED || raw.addr().get() & MARK == 0 {
            return Some(raw);
        }
        marked_counts(raw)
    }

    #[track_caller]
    fn live_counts(&self) -> NonNull<Counts> {
        match self.counts() {
            Some(counts) => counts,
            None => cleared(),
        }
    }

    /// Makes a `Weak` pointer to this allocation.
    #[track_caller]
    pub fn downgrade(this: &Self) -> Weak<T> {
        let counts = this.live_counts();
        // SAFETY: our strong reference keeps the allocation alive.
        let c = unsafe { counts.as_ref() };
        if c.weak.get() >= MAX_STRONG {
            abort();
        }
        c.weak.set(c.weak.get() + 1);
        Weak {
            ptr: counts,
            _marker: PhantomData,
        }
    }

    /// Number of `Cc`s to this allocation (0 for an emptied handle).
    pub fn strong_count(this: &Self) -> usize {
        // SAFETY: a strong reference keeps the allocation alive.
        this.counts()
            .map_or(0, |c| unsafe { c.as_ref() }.strong.get() as usize)
    }

    /// Number of `Weak`s to this allocation.
    pub fn weak_count(this: &Self) -> usize {
        // SAFETY: a strong reference keeps the allocation alive; `weak`
        // includes the one shared by the strong references.
        this.counts()
            .map_or(0, |c| unsafe { c.as_ref() }.weak.get() as usize - 1)
    }

    /// Whether both point to the same allocation.
    ///
    /// A handle the collector emptied (seen only by the `Drop` of garbage)
    /// points at nothing, so it equals no handle, not even itself: two
    /// emptied handles may have pointed at different objects, and which
    /// they were is gone.
    pub fn ptr_eq(this: &Self, other: &Self) -> bool {
        matches!((this.counts(), other.counts()), (Some(a), Some(b)) if a == b)
    }

    /// Whether the collector tracks this object (its type may hold a `Cc`).
    pub fn is_tracked(this: &Self) -> bool {
        Shape::<T>::TRACKED && this.counts().is_some()
    }

    /// A mutable reference if this is the only reference, as `Rc::get_mut`.
    ///
    /// Always `None` for tracked types: the collector may read a tracked
    /// value at any allocation, which a `&mut` must exclude. Use a
    /// `RefCell` inside, or `try_unwrap`.
    pub fn get_mut(this: &mut Self) -> Option<&mut T> {
        if Shape::<T>::TRACKED {
            return None;
        }
        let counts = this.handle.get();
        // SAFETY: our strong reference keeps the allocation alive.
        let c = unsafe { counts.as_ref() };
        if c.strong.get() == 1 && c.weak.get() == 1 {
            // SAFETY: no other `Cc` or `Weak` exists and `&mut this`
            // excludes other uses of this one; untracked values are never
            // read by the collector.
            Some(unsafe { Self::value_ptr(counts).as_mut() })
        } else {
            None
        }
    }

    /// The value, if this is the only strong reference; otherwise `this`
    /// back. Moving the value out destroys nothing, so no finalizer runs.
    pub fn try_unwrap(this: Self) -> Result<T, Self> {
        let Some(counts) = this.counts() else {
            return Err(this);
        };
        // SAFETY: our strong reference keeps the allocation alive.
        let c = unsafe { counts.as_ref() };
        if c.strong.get() != 1 {
            return Err(this);
        }
        if Shape::<T>::TRACKED {
            // SAFETY: a tracked allocation starts with its link.
            let link = unsafe { link_of(counts).as_ref() };
            if link.prev_flag(COLLECTING) {
                // The collector is using the link words right now.
                return Err(this);
            }
            // SAFETY: not collecting, so the link is in a well-formed list.
            unsafe { link.unlink() };
            ambient::untrack(link);
        }
        core::mem::forget(this);
        c.strong.set(0);
        // SAFETY: the value is initialised and, with the strong count at
        // zero and our handle consumed, no one else can read it.
        let value = unsafe { Self::value_ptr(counts).as_ptr().read() };
        // SAFETY: we own the weak reference the strong ones shared.
        unsafe { release_weak(counts, Self::start(counts), Shape::<T>::LAYOUT) };
        Ok(value)
    }

    /// The value if this was the last strong reference, as `Rc::into_inner`.
    pub fn into_inner(this: Self) -> Option<T> {
        Self::try_unwrap(this).ok()
    }

    /// Start of the allocation.
    fn start(counts: NonNull<Counts>) -> NonNull<u8> {
        // SAFETY: the counts lie `COUNTS_OFFSET` bytes into the allocation.
        unsafe { counts.cast::<u8>().byte_sub(Shape::<T>::COUNTS_OFFSET) }
    }

    /// Address of the allocation (`None` for an emptied handle), the key
    /// weak collections use.
    pub(crate) fn addr(this: &Self) -> Option<usize> {
        this.counts().map(|c| c.addr().get())
    }

    /// Address of the value, for identity and formatting.
    pub fn as_ptr(this: &Self) -> *const T {
        this.counts()
            // SAFETY: the handle refers to an allocation of this shape.
            .map_or(ptr::null(), |c| unsafe { Self::value_ptr(c) }.as_ptr())
    }

    /// Runs when the last strong reference went away.
    ///
    /// # Safety
    /// The strong count just reached zero and the value is initialised.
    #[cold]
    unsafe fn drop_slow(counts: NonNull<Counts>) {
        if Shape::<T>::TRACKED {
            // SAFETY: a tracked allocation starts with its link.
            let link = unsafe { link_of(counts) };
            // SAFETY: the allocation is alive (weak count still held).
            if unsafe { link.as_ref() }.prev_flag(COLLECTING) {
                // The collector owns the link words now; it will find this
                // object (strong count 0) in its next collection.
                return;
            }
            // SAFETY: the strong count is zero and the object is not part of
            // a running collection.
            unsafe { destroy_tracked::<T>(link) };
        } else {
            // SAFETY: strong count zero: no one else can read the value.
            let value = unsafe { Self::value_ptr(counts) };
            if let Some(finalize) = T::FINALIZER {
                // SAFETY: as above; the value is initialised.
                finalize(unsafe { value.as_ref() });
            }
            // SAFETY: finalize cannot create a strong reference (upgrade
            // fails at zero), so the value is still ours to drop, once.
            unsafe { ptr::drop_in_place(value.as_ptr()) };
            // SAFETY: the shared weak reference is ours now.
            unsafe { release_weak(counts, Self::start(counts), Shape::<T>::LAYOUT) };
        }
    }
}

/// The counts of a marked or emptied handle, off the fast path.
#[cold]
#[inline(never)]
fn marked_counts(raw: NonNull<Counts>) -> Option<NonNull<Counts>> {
    (raw.addr().get() != CLEARED).then(|| unmarked(raw))
}

/// A `Weak` never keeps its target alive, so it reports nothing.
// SAFETY: visits nothing.
unsafe impl<T: Trace> Trace for Weak<T> {
    const MAY_CONTAIN_CC: bool = false;
    fn trace(&self, _: &mut Visitor<'_>) {}
}

/// `true` whatever `T` is: this is what lets a type that holds a `Cc` of
/// itself compute its own constant without a compile-time cycle.
// SAFETY: visits exactly the handle `self` is.
unsafe impl<T: Trace> Trace for Cc<T> {
    const MAY_CONTAIN_CC: bool = true;
    fn trace(&self, visitor: &mut Visitor<'_>) {
        visitor.visit(self);
    }
}

// `Visitor` itself is defined with the collector's operations in `header.rs`;
// its one method that names `Cc` lives beside `Cc`.
impl Visitor<'_> {
    /// Reports one `Cc` owned by the value being traced (see the safety
    /// contract of [`Trace`]).
    pub fn visit<T: Trace>(&mut self, cc: &Cc<T>) {
        if T::MAY_CONTAIN_CC {
            self.op.visit(cc.handle());
        }
    }
}

// Beside `Cc`, which it takes; the collector's side is `referrers_of`.
impl Collector {
    /// Type names of the tracked objects that hold a `Cc` to `target`
    /// (`gc.get_referrers`), one entry per referring object.
    pub fn referrers<T: Trace>(&self, target: &Cc<T>) -> Vec<&'static str> {
        match handle::read(target.handle()) {
            Some((counts, _)) => self.referrers_of(counts),
            None => Vec::new(),
        }
    }

    /// Type names of the tracked objects `cc`'s value holds a `Cc` to
    /// (`gc.get_referents`), one entry per handle, in tracing order.
    /// Handles to untracked types (which cannot form cycles) are not
    /// reported, as the collector never sees them.
    pub fn get_referents<T: Trace>(&self, cc: &Cc<T>) -> Vec<&'static str> {
        if !Cc::is_tracked(cc) {
            return Vec::new();
        }
        let Some((counts, _)) = handle::read(cc.handle()) else {
            return Vec::new();
        };
        // SAFETY: `cc` is a live tracked handle, so `counts` belongs to a
        // live tracked object with an initialised value, kept alive by `cc`
        // while its `Trace` runs.
        let (op, _) = unsafe { trace(link_of(counts), Op::Referents(Vec::new())) };
        match op {
            Op::Referents(names) => names,
            _ => Vec::new(),
        }
    }
}

impl<T: Trace> Clone for Cc<T> {
    fn clone(&self) -> Self {
        let handle = match self.counts() {
            Some(counts) => {
                // SAFETY: our strong reference keeps the allocation alive.
                inc_strong(unsafe { counts.as_ref() });
                counts
            }
            None => self.handle.get(),
        };
        Cc {
            handle: Cell::new(handle),
            _owns: PhantomData,
        }
    }
}

impl<T: Trace> Drop for Cc<T> {
    fn drop(&mut self) {
        let Some(counts) = self.counts() else {
            // Emptied by the collector, which released the reference.
            return;
        };
        // SAFETY: our strong reference keeps the allocation alive.
        let c = unsafe { counts.as_ref() };
        let strong = c.strong.get() - 1;
        c.strong.set(strong);
        if strong == 0 {
            // SAFETY: the count just reached zero; a handle with a positive
            // count means the value was initialised and not dropped.
            unsafe { Self::drop_slow(counts) };
        }
    }
}

impl<T: Trace> Deref for Cc<T> {
    type Target = T;

    #[track_caller]
    fn deref(&self) -> &T {
        let counts = self.live_counts();
        // SAFETY: this handle holds a strong reference, so the value is live
        // (values drop only at a zero count) for as long as `&self`: the
        // collector empties only handles that garbage owns (`Trace`'s
        // contract), and garbage is unreachable, hence not borrowed.
        unsafe { Self::value_ptr(counts).as_ref() }
    }
}

impl<T: Trace> AsRef<T> for Cc<T> {
    fn as_ref(&self) -> &T {
        self
    }
}

impl<T: Trace> Borrow<T> for Cc<T> {
    fn borrow(&self) -> &T {
        self
    }
}

impl<T: Trace + Default> Default for Cc<T> {
    #[track_caller]
    fn default() -> Self {
        Cc::new(T::default())
    }
}

impl<T: Trace> From<T> for Cc<T> {
    #[track_caller]
    fn from(value: T) -> Self {
        Cc::new(value)
    }
}

impl<T: Trace + fmt::Debug> fmt::Debug for Cc<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T: Trace + fmt::Display> fmt::Display for Cc<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&**self, f)
    }
}

impl<T: Trace> fmt::Pointer for Cc<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Pointer::fmt(&Cc::as_ptr(self), f)
    }
}

impl<T: Trace + PartialEq> PartialEq for Cc<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Trace + Eq> Eq for Cc<T> {}

impl<T: Trace + PartialOrd> PartialOrd for Cc<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        (**self).partial_cmp(&**other)
    }
}

impl<T: Trace + Ord> Ord for Cc<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (**self).cmp(&**other)
    }
}

impl<T: Trace + Hash> Hash for Cc<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

impl<T: Trace> Weak<T> {
    /// A `Weak` that never upgrades, pointing at no allocation.
    pub const fn new() -> Self {
        Weak {
            ptr: NonNull::dangling(),
            _marker: PhantomData,
        }
    }

    fn counts(&self) -> Option<&Counts> {
        if self.ptr.addr().get() == NO_ALLOCATION {
            return None;
        }
        // SAFETY: our weak reference keeps the allocation alive.
        Some(unsafe { self.ptr.as_ref() })
    }

    /// Whether the value is alive and not condemned by the collector.
    fn alive(&self) -> Option<&Counts> {
        let c = self.counts()?;
        if c.strong.get() == 0 {
            return None;
        }
        // SAFETY: a tracked allocation starts with its link, alive as long
        // as the counts are.
        if Shape::<T>::TRACKED && unsafe { link_of(self.ptr).as_ref() }.next_flag(WEAK_CLEARED) {
            return None;
        }
        Some(c)
    }

    /// A strong reference, unless the value is gone or the collector found it
    /// to be garbage (then never again, even if a finalizer resurrected it).
    pub fn upgrade(&self) -> Option<Cc<T>> {
        let c = self.alive()?;
        inc_strong(c);
        Some(Cc {
            handle: Cell::new(self.ptr),
            _owns: PhantomData,
        })
    }

    /// Number of strong references `upgrade` could share (0 once cleared).
    pub fn strong_count(&self) -> usize {
        self.alive().map_or(0, |c| c.strong.get() as usize)
    }

    /// Whether both point to the same allocation (or both are `Weak::new`).
    pub fn ptr_eq(&self, other: &Self) -> bool {
        self.ptr == other.ptr
    }

    /// Address of the allocation, usable as a map key while this `Weak`
    /// keeps the memory from being reused.
    pub(crate) fn addr(&self) -> usize {
        self.ptr.addr().get()
    }
}

impl<T: Trace> Default for Weak<T> {
    fn default() -> Self {
        Weak::new()
    }
}

impl<T: Trace> Clone for Weak<T> {
    fn clone(&self) -> Self {
        if let Some(c) = self.counts() {
            if c.weak.get() >= MAX_STRONG {
                abort();
            }
            c.weak.set(c.weak.get() + 1);
        }
        Weak {
            ptr: self.ptr,
            _marker: PhantomData,
        }
    }
}

impl<T: Trace> Drop for Weak<T> {
    fn drop(&mut self) {
        if self.counts().is_some() {
            // SAFETY: we own one weak reference; when it is the last, the
            // strong count is zero, so the value is dropped or was never
            // initialised (`new_cyclic` unwinding).
            unsafe { release_weak(self.ptr, Cc::<T>::start(self.ptr), Shape::<T>::LAYOUT) };
        }
    }
}

impl<T: Trace> fmt::Debug for Weak<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(Weak)")
    }
}
