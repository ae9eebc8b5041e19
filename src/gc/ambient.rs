//! Where `Cc::new` and `Cc`'s drop find their collector.
//!
//! Objects cannot afford a collector pointer in their 32-byte header, so
//! there is one *ambient* collector per thread of control:
//! * with `std`, a lazily created thread-local `Collector`;
//! * without `std`, the `&'static Collector` given to [`install`], shared by
//!   everything that runs (Rust cannot tell threads apart without `std`, so
//!   `install` is `unsafe` and the caller promises a single thread of control).

use core::panic::Location;
use core::ptr::NonNull;

use super::collector::{destroy_without_collector, Collector};
use super::header::Link;
use super::trace::Trace;

#[cfg(feature = "std")]
std::thread_local! {
    static DEFAULT: Collector = Collector::new();
}

/// Runs `f` on the ambient collector; `None` if there is none (no `install`
/// without std, or the thread is exiting and its collector is gone).
#[cfg(feature = "std")]
#[inline(always)]
pub(crate) fn with<R>(f: impl FnOnce(&Collector) -> R) -> Option<R> {
    DEFAULT.try_with(f).ok()
}

#[cfg(not(feature = "std"))]
static CURRENT: core::sync::atomic::AtomicPtr<Collector> =
    core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// Runs `f` on the ambient collector; `None` if there is none (no `install`
/// without std, or the thread is exiting and its collector is gone).
#[cfg(not(feature = "std"))]
pub(crate) fn with<R>(f: impl FnOnce(&Collector) -> R) -> Option<R> {
    let current = CURRENT.load(core::sync::atomic::Ordering::Acquire);
    // SAFETY: `install` stored a `&'static Collector`, and its caller
    // promised that only one thread of control uses this crate's pointers.
    (!current.is_null()).then(|| f(unsafe { &*current }))
}

/// Makes `collector` the one every `Cc` of a tracked type is registered with
/// (builds without `std`, where there is no thread-local default).
///
/// Objects created before a second `install` stay in the earlier collector's
/// lists and are collected only by it.
///
/// # Safety
/// Without `std` nothing tells threads apart: the caller promises that from
/// now on only one thread of control (no second core, no interrupt handler
/// that touches `Cc` or `Weak` values) uses this crate's `Cc`, `Weak` and
/// `gc` functions.
#[cfg(not(feature = "std"))]
pub unsafe fn install(collector: &'static Collector) {
    CURRENT.store(
        collector as *const Collector as *mut Collector,
        core::sync::atomic::Ordering::Release,
    );
}

/// Hands a new tracked object (in no list, its link words unset) to the
/// ambient collector, which may then run an automatic collection.
#[inline]
#[track_caller]
pub(crate) fn track(link: NonNull<Link>, site: &'static Location<'static>) {
    if with(|c| c.track(link, site)).is_none() {
        no_collector(link);
    }
}

/// `track` without a collector. With std this means the thread is exiting:
/// the object is linked to itself (so unlinking it is harmless) and stays
/// untracked. Without std it is a setup error.
#[cold]
#[inline(never)]
#[track_caller]
fn no_collector(link: NonNull<Link>) {
    // SAFETY: `track`'s caller passes the link of a live, fresh allocation.
    unsafe { link.as_ref() }.init_ring();
    #[cfg(not(feature = "std"))]
    panic!("pymalloc: no collector installed; call pymalloc::gc::install first");
}

/// Tells the ambient collector a tracked object left its lists.
pub(crate) fn untrack(link: &Link) {
    with(|c| c.untrack(link));
}

/// Destroys a tracked `T` whose strong count reached zero: unlinks it, runs
/// its finalizer once, drops the value (through the trashcan) and releases
/// the memory when no `Weak` remains. `Cc`'s drop knows `T`, so the
/// finalizer, drop and layout are `T`'s own rather than the vtable's.
///
/// # Safety
/// `link` is a live tracked `T` with strong count zero and an initialised
/// value, not part of a running collection (`COLLECTING` clear).
#[inline]
pub(crate) unsafe fn destroy_tracked<T: Trace>(link: NonNull<Link>) {
    // SAFETY: the caller's promise.
    if with(|c| unsafe { c.destroy_typed::<T>(link) }).is_none() {
        // SAFETY: the caller's promise.
        unsafe { destroy_without_collector(link) };
    }
}
