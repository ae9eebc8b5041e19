// The collector half: `Cc`, `Weak`, `Trace` and CPython's generational
// cycle collector, with this module, the `gc` toolbox, as its face.
//
// Design
// ------
// A `Cc<T>` points at `[Link | Counts | T]`: two list words and a vtable
// (the object's place in a generation, like `PyGC_Head`), then strong and
// weak counts. Reference counting frees what it can at once; the collector
// finds the rest the way `Python/gc.c` does, by trial deletion: copy each
// strong count into `gc_refs`, subtract the references the objects of the
// collected generations report through `Trace`, and whatever no survivor
// reaches is garbage. The layers, bottom to top, each using only those
// below it:
//
//   header     the allocation's layout, the link words and their flags, the
//              counts, the marked-handle encoding, the vtable, and the
//              `Visitor` with the per-handle operations of a collection
//              (subtract, reach, clear...): these types refer to each
//              other (a link names its vtable, whose trace entry takes a
//              visitor, whose operations work on links), so they are one
//              file, and the user-facing `Visitor::visit` is added above,
//              beside `Cc`, which it takes
//   trace      the `Trace` and `Finalize` traits, their impls for std
//              types, and `Shape<T>`: where a `T` sits and its vtable
//   collector  `Collector`: generations, thresholds, the passes, PEP 442
//              finalizers, weak clearing, the trashcan, statistics
//   ambient    where `Cc::new` and drop find their collector (a thread
//              local with std, `install` without) and hand objects to it
//   pointer    `Cc`, `Weak`, their `Trace` impls, `Visitor::visit`
//   census     counts of live objects by type and by allocation site
//   weak_collections  `WeakSet`, `WeakValueMap`
//   mod.rs     the `gc` functions, each forwarding to the ambient collector
//
// The collector never allocates during a collection and never recurses
// with the data: passes iterate lists, reachable objects found late go on
// a stack threaded through their own `prev` words, and deep drops go
// through a trashcan. It reaches memory only through the global allocator,
// so it runs over `PyMalloc` or any other; the allocator half knows nothing
// of it. README-collector.md has the longer story and the soundness
// argument.

//! CPython's `gc` toolbox, on the ambient collector of this thread (the
//! thread-local default with `std`, the one given to `gc::install` without).
//!
//! Each function forwards to the [`Collector`] method of the same name;
//! with no ambient collector (none installed) they do nothing and return
//! zero or empty values.
//!
#![cfg_attr(feature = "std", doc = "```")]
#![cfg_attr(not(feature = "std"), doc = "```ignore")]
//! use pymalloc::{gc, Cc, Trace};
//! use core::cell::RefCell;
//!
//! #[derive(Trace)]
//! struct Handler {
//!     context: RefCell<Option<Cc<Handler>>>,
//! }
//!
//! gc::set_site_tracing(true);
//! let before = gc::site_census();
//! for _ in 0..10 {
//!     let h = Cc::new(Handler { context: RefCell::new(None) });
//!     *h.context.borrow_mut() = Some(h.clone()); // a leak, until collected
//! }
//! let diff = gc::site_census().diff(&before);
//! assert_eq!(diff.rows[0].growth.count, 10);
//! println!("{diff}"); // like `1  560 B  10  src/main.rs:17`
//! assert_eq!(gc::census().get("Handler"), 10);
//! assert_eq!(gc::collect(), 10);
//! gc::set_site_tracing(false);
//! ```

pub(crate) mod ambient;
pub(crate) mod census;
pub(crate) mod collector;
pub(crate) mod header;
pub(crate) mod pointer;
pub(crate) mod trace;
pub(crate) mod weak_collections;

use alloc::vec::Vec;

#[cfg(not(feature = "std"))]
pub use ambient::install;
pub use census::{
    Census, CensusDiff, Site, SiteCensus, SiteDiff, SiteGrowth, SiteStat, TypeGrowth,
};
pub use collector::{
    CallbackHandle, CallbackInfo, Collector, DebugPrint, GenerationStats, Phase, DEBUG_COLLECTABLE,
    DEBUG_LEAK, DEBUG_SAVEALL, DEBUG_STATS, DEBUG_UNCOLLECTABLE, GENERATIONS,
};
use pointer::Cc;
use trace::Trace;

/// Runs `f` on the ambient collector, if there is one.
pub fn with_collector<R>(f: impl FnOnce(&Collector) -> R) -> Option<R> {
    ambient::with(f)
}

/// Forwards to the ambient collector's method of the same name.
macro_rules! forward {
    ($($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?;)*) => {$(
        $(#[$doc])*
        #[doc = concat!("\n\nSee [`Collector::", stringify!($name), "`].")]
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            ambient::with(|c| c.$name($($arg),*)).unwrap_or_default()
        }
    )*};
}

forward! {
    /// A full collection; returns the number of unreachable objects found.
    fn collect() -> usize;
    /// Collects generations `0..=generation`.
    fn collect_generation(generation: usize) -> usize;
    /// Turns automatic collection on.
    fn enable();
    /// Turns automatic collection off.
    fn disable();
    /// Whether automatic collection is on.
    fn is_enabled() -> bool;
    /// The per-generation counts.
    fn count() -> [usize; GENERATIONS];
    /// The thresholds.
    fn threshold() -> [usize; GENERATIONS];
    /// Sets the thresholds.
    fn set_threshold(threshold0: usize, threshold1: usize, threshold2: usize);
    /// Moves everything tracked to the permanent generation.
    fn freeze();
    /// Moves the permanent generation back into the oldest one.
    fn unfreeze();
    /// Objects in the permanent generation.
    fn freeze_count() -> usize;
    /// Per-generation statistics.
    fn stats() -> [GenerationStats; GENERATIONS];
    /// Unregisters a collection callback.
    fn remove_callback(handle: CallbackHandle) -> bool;
    /// Number of tracked objects.
    fn tracked_count() -> usize;
    /// Keeps garbage instead of freeing it.
    fn set_save_all(on: bool);
    /// Whether garbage is kept.
    fn save_all() -> bool;
    /// Number of objects kept by `save_all`.
    fn garbage_count() -> usize;
    /// Lets go of the garbage `save_all` kept.
    fn clear_garbage();
    /// Live tracked objects by type name.
    fn census() -> Census;
    /// Switches allocation-site tracing on or off.
    fn set_site_tracing(on: bool);
    /// Whether site tracing is on.
    fn site_tracing() -> bool;
    /// Live tracked objects by allocation site.
    fn site_census() -> SiteCensus;
    /// Sets the debugging flags (`DEBUG_STATS`, `DEBUG_LEAK`...).
    fn set_debug(flags: u32);
    /// The debugging flags.
    fn get_debug() -> u32;
    /// What `save_all` kept, by type name (`gc.garbage`).
    fn garbage() -> Census;
}

/// Sends debug output to `print` (without `std`, the only way to see it).
///
/// See [`Collector::set_debug_print`].
pub fn set_debug_print(print: DebugPrint) {
    ambient::with(|c| c.set_debug_print(print));
}

/// Type names of the tracked objects `cc` holds a `Cc` to.
///
/// See [`Collector::get_referents`].
pub fn get_referents<T: Trace>(cc: &Cc<T>) -> Vec<&'static str> {
    ambient::with(|c| c.get_referents(cc)).unwrap_or_default()
}

/// Registers a collection callback; `None` without an ambient collector.
///
/// See [`Collector::add_callback`].
pub fn add_callback(callback: impl Fn(&CallbackInfo) + 'static) -> Option<CallbackHandle> {
    ambient::with(|c| c.add_callback(callback))
}

/// Type names of the tracked objects holding a `Cc` to `target`.
///
/// See [`Collector::referrers`].
pub fn referrers<T: Trace>(target: &Cc<T>) -> Vec<&'static str> {
    ambient::with(|c| c.referrers(target)).unwrap_or_default()
}

/// Whether the collector tracks `cc` (`gc.is_tracked`): `false` for types
/// that cannot hold a `Cc`, such as `Cc<String>`.
pub fn is_tracked<T: Trace>(cc: &Cc<T>) -> bool {
    Cc::is_tracked(cc)
}
