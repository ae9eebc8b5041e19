//! The rest of CPython's `gc` debugging toolbox on a [`Collector`]:
//! `set_debug` with CPython's flags and print formats, `get_referents`,
//! and the garbage `DEBUG_SAVEALL` keeps, as a census.
//!
//! Debug output goes to stderr with `std`; without it, to the callback
//! given to [`Collector::set_debug_print`] (nowhere until one is given).

use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;
use core::time::Duration;

use crate::census::{short_name, Census};
use crate::collector::{trace, Collector, Op, GENERATIONS, PERMANENT, SAVED};
use crate::header::{link_of, Link};
use crate::pointer::handle;
use crate::{Cc, Trace};

/// Print each collection's generation, object counts and time
/// (`gc.DEBUG_STATS`).
pub const DEBUG_STATS: u32 = 1;
/// Print each collectable object found (`gc.DEBUG_COLLECTABLE`).
pub const DEBUG_COLLECTABLE: u32 = 2;
/// Print each object found unreachable but kept alive
/// (`gc.DEBUG_UNCOLLECTABLE`).
pub const DEBUG_UNCOLLECTABLE: u32 = 4;
/// Keep garbage instead of freeing it (`gc.DEBUG_SAVEALL`, the same switch
/// as [`Collector::set_save_all`]).
pub const DEBUG_SAVEALL: u32 = 32;
/// What a leak hunt wants: the three above (`gc.DEBUG_LEAK`).
pub const DEBUG_LEAK: u32 = DEBUG_COLLECTABLE | DEBUG_UNCOLLECTABLE | DEBUG_SAVEALL;

/// Where debug output goes: one formatted line per call, newline included.
pub type DebugPrint = fn(fmt::Arguments<'_>);

#[cfg(feature = "std")]
fn stderr(args: fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = std::io::stderr().write_fmt(args);
}

/// The default sink: stderr with `std`, nothing without.
pub(crate) const DEFAULT_PRINT: Option<DebugPrint> = {
    #[cfg(feature = "std")]
    {
        Some(stderr)
    }
    #[cfg(not(feature = "std"))]
    {
        None
    }
};

impl Collector {
    /// Sets the debugging flags (`gc.set_debug`): any of [`DEBUG_STATS`],
    /// [`DEBUG_COLLECTABLE`], [`DEBUG_UNCOLLECTABLE`], [`DEBUG_SAVEALL`],
    /// or [`DEBUG_LEAK`]. Output is formatted as CPython prints it:
    ///
    /// ```text
    /// gc: collecting generation 2...
    /// gc: objects in each generation: 12 0 0
    /// gc: objects in permanent generation: 0
    /// gc: collectable <Handler 0x5581f3c0a010>
    /// gc: done, 2 unreachable, 0 uncollectable, 0.0001s elapsed
    /// ```
    pub fn set_debug(&self, flags: u32) {
        self.debug.set(flags & !DEBUG_SAVEALL);
        self.set_save_all(flags & DEBUG_SAVEALL != 0);
    }

    /// The debugging flags (`gc.get_debug`).
    pub fn get_debug(&self) -> u32 {
        self.debug.get() | if self.save_all() { DEBUG_SAVEALL } else { 0 }
    }

    /// Sends debug output to `print` instead of stderr (without `std`, the
    /// only way to see it).
    pub fn set_debug_print(&self, print: DebugPrint) {
        self.print.set(Some(print));
    }

    fn debug_print(&self, args: fmt::Arguments<'_>) {
        if let Some(print) = self.print.get() {
            print(args);
        }
    }

    /// `DEBUG_STATS` at the start of a collection of `generation`.
    pub(crate) fn debug_collection_start(&self, generation: usize) {
        if self.debug.get() & DEBUG_STATS == 0 {
            return;
        }
        // SAFETY: between collections every list is well formed.
        let sizes: [usize; GENERATIONS] = core::array::from_fn(|g| unsafe { self.head(g).len() });
        // SAFETY: as above.
        let permanent = unsafe { self.head(PERMANENT).len() };
        self.debug_print(format_args!("gc: collecting generation {generation}...\n"));
        self.debug_print(format_args!(
            "gc: objects in each generation: {} {} {}\ngc: objects in permanent generation: {permanent}\n",
            sizes[0], sizes[1], sizes[2]
        ));
    }

    /// `DEBUG_STATS` at the end of a collection.
    pub(crate) fn debug_collection_done(
        &self,
        unreachable: usize,
        uncollectable: usize,
        elapsed: Duration,
    ) {
        if self.debug.get() & DEBUG_STATS != 0 {
            self.debug_print(format_args!(
                "gc: done, {unreachable} unreachable, {uncollectable} uncollectable, {:.4}s elapsed\n",
                elapsed.as_secs_f64()
            ));
        }
    }

    /// `DEBUG_COLLECTABLE`: each object of the garbage list `garbage`.
    ///
    /// # Safety
    /// `garbage` heads a list of live objects with intact `next` links.
    pub(crate) unsafe fn debug_collectable(&self, garbage: &Link) {
        if self.debug.get() & DEBUG_COLLECTABLE != 0 {
            // SAFETY: the caller's promise.
            unsafe { garbage.for_each(|link| self.debug_object("collectable", link)) };
        }
    }

    /// The addresses of the garbage, if `DEBUG_UNCOLLECTABLE` will want to
    /// know which of it survives being cleared.
    ///
    /// # Safety
    /// As for `debug_collectable`.
    pub(crate) unsafe fn debug_garbage_before_clear(&self, garbage: &Link) -> BTreeSet<usize> {
        let mut addresses = BTreeSet::new();
        if self.debug.get() & DEBUG_UNCOLLECTABLE != 0 {
            // SAFETY: the caller's promise.
            unsafe {
                garbage.for_each(|link| {
                    addresses.insert(link.addr().get());
                })
            };
        }
        addresses
    }

    /// `DEBUG_UNCOLLECTABLE`: the garbage still alive after clearing, which
    /// `release` moved to the oldest generation.
    pub(crate) fn debug_uncollectable(&self, garbage: BTreeSet<usize>) {
        if garbage.is_empty() {
            return;
        }
        // SAFETY: between collection steps the oldest generation is a well
        // formed list of live objects; freed garbage is only compared by
        // address, never read.
        unsafe {
            self.head(GENERATIONS - 1).for_each(|link| {
                if garbage.contains(&link.addr().get()) {
                    self.debug_object("uncollectable", link);
                }
            })
        };
    }

    /// `gc: <what> <Type 0x...>`, as CPython's `debug_cycle`.
    fn debug_object(&self, what: &str, link: NonNull<Link>) {
        // SAFETY: callers pass live objects.
        let name = short_name((unsafe { link.as_ref() }.vtable.type_name)());
        self.debug_print(format_args!("gc: {what} <{name} {:p}>\n", link.as_ptr()));
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

    /// What `save_all` kept (`gc.garbage`), counted by type name; empty it
    /// with [`clear_garbage`](Collector::clear_garbage).
    pub fn garbage(&self) -> Census {
        let mut names = Vec::new();
        // SAFETY: `SAVED` is a well-formed list of live objects.
        unsafe {
            self.head(SAVED)
                .for_each(|link| names.push((link.as_ref().vtable.type_name)()))
        };
        Census::of(names)
    }
}
