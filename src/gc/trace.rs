//! How an object shows the collector the `Cc`s it holds.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::marker::PhantomData;

use core::alloc::Layout;
use core::ptr::{self, NonNull};

use super::header::{counts_of, Counts, Link, PlainBox, TrackedBox, VTable, Visitor};

/// A type whose `Cc` references the cycle collector can find.
///
/// `trace` reports, through [`Visitor::visit`], the `Cc`s the value owns
/// (directly or inside its fields and containers). Derive it with
/// `#[derive(Trace)]`: the derive writes the `unsafe impl` for you, is
/// correct by construction (it traces every field with that field's own
/// `Trace`), and `#[trace(skip)]` on a field only leaks.
///
/// # Safety
///
/// The collector empties the handles `trace` reports when it decides that
/// their owner is garbage, and it decides that from those same reports. So
/// an implementation must visit **only `Cc` handles owned by `self`**: handles
/// stored in `self` or in memory `self` owns exclusively (its fields, boxes,
/// collections, cells), which nothing else can reach except through `self`.
/// Never a handle reached through shared ownership (an `Rc`, a `static`, a
/// `thread_local!`, a raw pointer, the value behind another `Cc`, which
/// traces itself), and never a temporary clone. Visiting such a handle can
/// make the collector believe a live object is garbage and empty a handle
/// inside it while a `&T` obtained from that handle is still in use: a use
/// after free. No check can tell an owned handle from a borrowed one, which
/// is why the trait is `unsafe` (as in `gc`, `dumpster` and `rust-cc`).
///
/// Within that rule, mistakes are safe:
/// * visiting fewer handles than `self` owns only leaks (a handle not
///   visited counts as a reference from outside, so the cycle through it is
///   never collected);
/// * visiting the same owned handle more than once in one `trace` call is
///   noticed and counted once;
/// * `trace` may panic: the collection unwinds and the collector stays
///   consistent (the next collection releases what it held);
/// * a value that cannot be inspected right now (a `RefCell` borrowed
///   mutably) calls [`Visitor::untraceable`]; the collector then treats it
///   as reachable from outside for this collection.
///
/// Whatever `Drop` and finalizers do with an honest `Trace`, there is no
/// undefined behaviour either: a `Drop` of garbage that touches a dead
/// sibling finds an emptied handle and panics, `Weak::upgrade` to garbage
/// returns `None`, and panics in `Drop` or finalizers leak at most their
/// own object. (A finalizer that panics when the last `Cc` goes away
/// leaves its object, and only it, alive until the next collection drops
/// it; on a thread whose collector is already gone, at exit, the object
/// and everything it owns leak.)
///
/// [`MAY_CONTAIN_CC`](Trace::MAY_CONTAIN_CC) carries no safety obligation:
/// a wrong value only stops the collector from seeing the type's cycles.
///
/// A plain `impl` does not compile:
///
/// ```compile_fail,E0200
/// struct Sneaky;
/// impl pymalloc::Trace for Sneaky {
///     fn trace(&self, _: &mut pymalloc::Visitor<'_>) {}
/// }
/// ```
///
/// `'static` because the collector may trace and drop garbage long after
/// the code that made it returned: a borrow inside it would have expired.
///
/// A hand-written implementation delegates to the fields' own impls:
///
#[cfg_attr(feature = "std", doc = "```")]
#[cfg_attr(not(feature = "std"), doc = "```ignore")]
/// use pymalloc::{Cc, Trace, Visitor};
/// use core::cell::RefCell;
///
/// struct Node {
///     label: String,
///     children: RefCell<Vec<Cc<Node>>>,
/// }
///
/// // SAFETY: visits only the handles in `children`, which `self` owns.
/// unsafe impl Trace for Node {
///     fn trace(&self, visitor: &mut Visitor<'_>) {
///         self.children.trace(visitor);
///     }
/// }
///
/// let a = Cc::new(Node { label: "a".into(), children: RefCell::new(Vec::new()) });
/// a.children.borrow_mut().push(a.clone());
/// drop(a);
/// assert_eq!(pymalloc::gc::collect(), 1);
/// ```
pub unsafe trait Trace: 'static {
    /// Whether a value of this type may hold a `Cc`. When `false`, a
    /// `Cc<Self>` is not tracked by the collector and costs what an `Rc`
    /// costs. The default, `true`, is always safe.
    const MAY_CONTAIN_CC: bool = true;

    /// The finalizer: runs once before the value is destroyed, whether by
    /// reference counting or by the cycle collector, on an intact value
    /// (PEP 442). During a collection it may resurrect objects by storing
    /// clones of `Cc`s somewhere reachable. `#[derive(Trace)]` with
    /// `#[trace(finalize)]` sets it to [`Finalize::finalize`]. A constant,
    /// so that types without one cost nothing, and collections skip the
    /// finalizer pass when no garbage has one.
    const FINALIZER: Option<fn(&Self)> = None;

    /// Visits every `Cc` this value owns.
    fn trace(&self, visitor: &mut Visitor<'_>);
}

/// A finalizer, wired in by `#[derive(Trace)]` with `#[trace(finalize)]`
/// (see [`Trace::FINALIZER`]).
///
#[cfg_attr(feature = "std", doc = "```")]
#[cfg_attr(not(feature = "std"), doc = "```ignore")]
/// use pymalloc::{Cc, Finalize, Trace};
/// use core::cell::{Cell, RefCell};
///
/// #[derive(Trace)]
/// #[trace(finalize)]
/// struct Node {
///     next: RefCell<Option<Cc<Node>>>,
/// }
///
/// std::thread_local!(static FINALIZED: Cell<usize> = Cell::new(0));
///
/// impl Finalize for Node {
///     fn finalize(&self) {
///         FINALIZED.with(|f| f.set(f.get() + 1));
///     }
/// }
///
/// let a = Cc::new(Node { next: RefCell::new(None) });
/// *a.next.borrow_mut() = Some(a.clone());
/// drop(a);
/// pymalloc::gc::collect();
/// assert_eq!(FINALIZED.with(Cell::get), 1);
/// ```
pub trait Finalize {
    /// See [`Trace::FINALIZER`].
    fn finalize(&self);
}

macro_rules! leaf {
    ($($t:ty),* $(,)?) => {$(
        // SAFETY: visits nothing.
        unsafe impl Trace for $t {
            const MAY_CONTAIN_CC: bool = false;
            #[inline]
            fn trace(&self, _: &mut Visitor<'_>) {}
        }
    )*};
}

leaf!(
    (),
    bool,
    char,
    u8,
    u16,
    u32,
    u64,
    u128,
    usize,
    i8,
    i16,
    i32,
    i64,
    i128,
    isize,
    f32,
    f64,
    str,
    String,
    core::time::Duration,
    core::num::NonZeroUsize,
    core::num::NonZeroU32,
    core::num::NonZeroU64,
);

// SAFETY: visits nothing.
unsafe impl<T: ?Sized + 'static> Trace for PhantomData<T> {
    const MAY_CONTAIN_CC: bool = false;
    fn trace(&self, _: &mut Visitor<'_>) {}
}

/// A `Cell` can only be read by copying, and `Copy` types hold no `Cc`.
// SAFETY: visits nothing.
unsafe impl<T: Copy + 'static> Trace for Cell<T> {
    const MAY_CONTAIN_CC: bool = false;
    fn trace(&self, _: &mut Visitor<'_>) {}
}

// SAFETY: the contents are owned by the cell; `T::trace` visits only what
// they own.
unsafe impl<T: Trace + ?Sized> Trace for RefCell<T> {
    const MAY_CONTAIN_CC: bool = T::MAY_CONTAIN_CC;
    fn trace(&self, visitor: &mut Visitor<'_>) {
        if !T::MAY_CONTAIN_CC {
            return;
        }
        match self.try_borrow() {
            Ok(value) => value.trace(visitor),
            // Borrowed mutably: its contents may be mid-change, so keep it.
            Err(_) => visitor.untraceable(),
        }
    }
}

// SAFETY: a box owns its contents exclusively; `T::trace` visits only what
// they own.
unsafe impl<T: Trace + ?Sized> Trace for Box<T> {
    const MAY_CONTAIN_CC: bool = T::MAY_CONTAIN_CC;
    fn trace(&self, visitor: &mut Visitor<'_>) {
        (**self).trace(visitor);
    }
}

// SAFETY: delegates to the contained value's `Trace`.
unsafe impl<T: Trace> Trace for Option<T> {
    const MAY_CONTAIN_CC: bool = T::MAY_CONTAIN_CC;
    fn trace(&self, visitor: &mut Visitor<'_>) {
        if let Some(value) = self {
            value.trace(visitor);
        }
    }
}

// SAFETY: delegates to the contained value's `Trace`.
unsafe impl<T: Trace, E: Trace> Trace for Result<T, E> {
    const MAY_CONTAIN_CC: bool = T::MAY_CONTAIN_CC || E::MAY_CONTAIN_CC;
    fn trace(&self, visitor: &mut Visitor<'_>) {
        match self {
            Ok(value) => value.trace(visitor),
            Err(error) => error.trace(visitor),
        }
    }
}

/// Implements `Trace` for a collection by tracing every item it iterates.
macro_rules! sequence {
    ($([$($gen:tt)*] $t:ty => $item:ident),* $(,)?) => {$(
        // SAFETY: the collection owns its items; each item's `Trace` visits
        // only what the item owns.
        unsafe impl<$($gen)*> Trace for $t {
            const MAY_CONTAIN_CC: bool = $item::MAY_CONTAIN_CC;
            fn trace(&self, visitor: &mut Visitor<'_>) {
                if $item::MAY_CONTAIN_CC {
                    for item in self.iter() {
                        item.trace(visitor);
                    }
                }
            }
        }
    )*};
}

sequence!(
    [T: Trace] [T] => T,
    [T: Trace, const N: usize] [T; N] => T,
    [T: Trace] Vec<T> => T,
    [T: Trace] VecDeque<T> => T,
    [T: Trace] BTreeSet<T> => T,
);

#[cfg(feature = "std")]
sequence!([T: Trace, S: 'static] std::collections::HashSet<T, S> => T);

/// Implements `Trace` for a map by tracing keys and values.
macro_rules! map {
    ($([$($gen:tt)*] $t:ty),* $(,)?) => {$(
        // SAFETY: the map owns its keys and values; their `Trace` impls
        // visit only what they own.
        unsafe impl<$($gen)*> Trace for $t {
            const MAY_CONTAIN_CC: bool = K::MAY_CONTAIN_CC || V::MAY_CONTAIN_CC;
            fn trace(&self, visitor: &mut Visitor<'_>) {
                if Self::MAY_CONTAIN_CC {
                    for (key, value) in self.iter() {
                        key.trace(visitor);
                        value.trace(visitor);
                    }
                }
            }
        }
    )*};
}

map!([K: Trace, V: Trace] BTreeMap<K, V>);
#[cfg(feature = "std")]
map!([K: Trace, V: Trace, S: 'static] std::collections::HashMap<K, V, S>);

macro_rules! tuple {
    ($($name:ident)+) => {
        // SAFETY: a tuple owns its fields; each field's `Trace` visits only
        // what the field owns.
        unsafe impl<$($name: Trace),+> Trace for ($($name,)+) {
            const MAY_CONTAIN_CC: bool = $($name::MAY_CONTAIN_CC)||+;
            #[allow(non_snake_case)]
            fn trace(&self, visitor: &mut Visitor<'_>) {
                let ($($name,)+) = self;
                $($name.trace(visitor);)+
            }
        }
    };
}

tuple!(A);
tuple!(A B);
tuple!(A B C);
tuple!(A B C D);
tuple!(A B C D E);
tuple!(A B C D E F);
tuple!(A B C D E F G);
tuple!(A B C D E F G H);

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
