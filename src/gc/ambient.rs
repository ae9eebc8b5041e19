//! Where `Cc::new` and `Cc`'s drop find their collector.
//!
//! Objects cannot afford a collector pointer in their 32-byte header, so
//! there is one *ambient* collector per thread of control:
//! * with `std`, a lazily created thread-local `Collector`;
//! * without `std`, the `&'static Collector` given to [`install`], shared by
//!   everything that runs (Rust cannot tell threads apart without `std`, so
//!   `install` is `unsafe` and the caller promises a single thread of control).
//!
//! A "collection running" flag lives here too rather than in a collector,
//! so that no collection can start inside another on the same thread.

use core::panic::Location;
use core::ptr::NonNull;

use super::collector::Collector;
use super::header::Link;

#[cfg(feature = "std")]
std::thread_local! {
    static DEFAULT: Collector = Collector::new();
    static BUSY: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
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
#[cfg(not(feature = "std"))]
static BUSY: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

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

/// Whether a collection is running on this thread of control (also `true`
/// while the thread is exiting, so none starts then).
pub(crate) fn busy() -> bool {
    #[cfg(feature = "std")]
    return BUSY.try_with(|b| b.get()).unwrap_or(true);
    #[cfg(not(feature = "std"))]
    return BUSY.load(core::sync::atomic::Ordering::Relaxed);
}

fn set_busy(on: bool) {
    #[cfg(feature = "std")]
    let _ = BUSY.try_with(|b| b.set(on));
    #[cfg(not(feature = "std"))]
    BUSY.store(on, core::sync::atomic::Ordering::Relaxed);
}

/// Marks a collection as running until dropped (also by a panic).
pub(crate) struct Busy(());

impl Busy {
    /// `None` if a collection is already running.
    pub(crate) fn enter() -> Option<Busy> {
        if busy() {
            return None;
        }
        set_busy(true);
        Some(Busy(()))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        set_busy(false);
    }
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
