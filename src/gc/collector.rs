//! The `Collector`: CPython's generational trial-deletion cycle collector.
//!
//! A collection of generation `g` (CPython's `gc_collect_main`):
//! 1. splice generations `0..=g` into a working list, copy each strong
//!    count into `gc_refs` (kept in the `prev` word);
//! 2. subtract every reference found by tracing objects of that list; what
//!    stays above zero is referenced from outside;
//! 3. move everything not reachable from those objects to an unreachable
//!    list (CPython's `move_unreachable`, with no recursion and no
//!    allocation: objects the scan passed over and something reachable
//!    revives go on a stack threaded through their `prev` words, so nothing
//!    is moved out and back);
//! 4. take a reference to each unreachable object (nothing in it can be
//!    freed while we work), clear its weak references, run finalizers once;
//! 5. if a finalizer ran, redo 1–3 inside the unreachable set: what it resurrected,
//!    and all it reaches, survives untouched;
//! 6. empty the `Cc` handles inside the garbage that point to garbage
//!    (CPython's `tp_clear`, done generically through `Trace`), then drop our
//!    references: reference counting frees the values, whose `Drop` sees
//!    emptied handles (a panic if used), never a dropped sibling.
//!
//! Values are only ever dropped when their strong count reaches zero, and
//! memory only freed when the weak count does, so with a `Trace` that keeps
//! its safety contract no `Cc` can dangle.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::fmt;
use core::panic::Location;
use core::ptr::{self, NonNull};
use core::time::Duration;

use super::header::{
    counts_of, inc_strong, release_weak, Counts, Link, Op, Visitor, COLLECTING, FINALIZED,
    ROOT_BIAS, UNREACHABLE, WEAK_CLEARED,
};
use super::trace::{Shape, Trace};

/// Number of generations (not counting the permanent one).
pub const GENERATIONS: usize = 3;

// Indices of the list heads.
pub(crate) const PERMANENT: usize = 3;
/// Garbage kept by `save_all` (CPython's `gc.garbage`); each holds +1.
pub(crate) const SAVED: usize = 4;
/// Objects a collection still held when a panic unwound through it.
const HELD: usize = 5;
const YOUNG: usize = 6;
const UNREACH: usize = 7;
const GARBAGE: usize = 8;
const LISTS: usize = 9;

/// Lists whose objects are alive and not being collected.
const LIVE_LISTS: [usize; 6] = [0, 1, 2, PERMANENT, SAVED, HELD];

/// Depth of nested `Cc` drops past which further drops are queued
/// (CPython's trashcan), so a long chain does not overflow the stack.
const TRASH_DEPTH: usize = 64;

/// Per-generation statistics, as `gc.get_stats()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenerationStats {
    /// Collections of this generation.
    pub collections: usize,
    /// Objects freed by them.
    pub collected: usize,
    /// Objects found unreachable but not freed (kept by `save_all`, or kept
    /// alive by a `Trace` that could not be followed).
    pub uncollectable: usize,
    /// Time spent in them (always zero without `std`, which has no clock).
    pub time: Duration,
}

/// When a collection callback is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before the collection.
    Start,
    /// After the collection.
    Stop,
}

/// What a collection callback is told, as the `info` of `gc.callbacks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallbackInfo {
    /// Start or stop.
    pub phase: Phase,
    /// The generation being collected.
    pub generation: usize,
    /// Objects freed (zero at start).
    pub collected: usize,
    /// Objects found unreachable but not freed (zero at start).
    pub uncollectable: usize,
}

/// Identifies a registered callback, for [`Collector::remove_callback`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallbackHandle(u64);

type Callback = Rc<dyn Fn(&CallbackInfo)>;

/// One cycle collector: its generations, thresholds, statistics and
/// diagnostics. See the [`gc`](crate::gc) module for the functions that use
/// the ambient one.
pub struct Collector {
    /// List heads, boxed so their addresses survive moving the collector.
    heads: Box<[Link; LISTS]>,
    count: [Cell<usize>; GENERATIONS],
    threshold: [Cell<usize>; GENERATIONS],
    enabled: Cell<bool>,
    long_lived_total: Cell<usize>,
    long_lived_pending: Cell<usize>,
    stats: [Cell<GenerationStats>; GENERATIONS],
    callbacks: RefCell<Vec<(u64, Callback)>>,
    next_callback: Cell<u64>,
    save_all: Cell<bool>,
    /// Whether the objects of `UNREACH` hold a reference we took.
    unreach_held: Cell<bool>,
    /// A panic interrupted a collection, so some handles may still carry
    /// subtract-pass marks.
    marks_dirty: Cell<bool>,
    trash_depth: Cell<usize>,
    /// Objects whose drop was deferred, chained through `next`.
    trash: Cell<*const Link>,
    pub(crate) site_tracing: Cell<bool>,
    /// Allocation site of each object created while site tracing was on,
    /// keyed by link address (a side table keeps the header at 32 bytes).
    pub(crate) sites: RefCell<BTreeMap<usize, &'static Location<'static>>>,
    /// `set_debug` flags, `DEBUG_SAVEALL` aside (that is `save_all`).
    pub(crate) debug: Cell<u32>,
    /// Where debug output goes.
    pub(crate) print: Cell<Option<DebugPrint>>,
}

/// The counts of a tracked object.
///
/// # Safety
/// `link` is the link of a live tracked object, which stays alive while the
/// result is used.
unsafe fn counts<'a>(link: NonNull<Link>) -> &'a Counts {
    // SAFETY: the caller's promise.
    unsafe { counts_of(link).as_ref() }
}

/// Traces one object with `op`; returns the op and whether it was untraceable.
///
/// # Safety
/// `link` is a live tracked object whose value is initialised.
pub(crate) unsafe fn trace<'a>(link: NonNull<Link>, op: Op<'a>) -> (Op<'a>, bool) {
    let mut visitor = Visitor {
        op,
        untraceable: false,
    };
    // SAFETY: the caller's promise.
    let untraceable = unsafe { trace_with(link, &mut visitor) };
    (visitor.op, untraceable)
}

/// Traces one object with a visitor a whole pass reuses; returns whether
/// the object was untraceable.
///
/// # Safety
/// `link` is a live tracked object whose value is initialised.
#[inline]
unsafe fn trace_with(link: NonNull<Link>, visitor: &mut Visitor<'_>) -> bool {
    visitor.untraceable = false;
    // SAFETY: the caller's promise; the vtable matches the value's type.
    unsafe { (link.as_ref().vtable.trace)(link, visitor) };
    visitor.untraceable
}

/// `destroy_tracked` when there is no collector (the thread is exiting): no
/// bookkeeping, no trashcan.
///
/// # Safety
/// As for `destroy_tracked`.
#[cold]
#[inline(never)]
pub(crate) unsafe fn destroy_without_collector(link: NonNull<Link>) {
    // SAFETY: the caller's promise.
    unsafe {
        retire(link);
        drop_now(link);
    }
}

/// First half of destroying: unlinks the object and runs its finalizer if
/// it has not run yet.
///
/// # Safety
/// As for `destroy_tracked`.
#[inline]
unsafe fn retire(link: NonNull<Link>) {
    // SAFETY: the caller's promise: live and in a well-formed list.
    unsafe { link.as_ref().unlink() };
    // SAFETY: the caller's promise.
    unsafe { finalize_once(link) };
}

/// Runs the finalizer of an object whose strong count reached zero, unless
/// it already ran.
///
/// # Safety
/// `link` is a live tracked object with strong count zero and an initialised
/// value.
#[inline]
unsafe fn finalize_once(link: NonNull<Link>) {
    // SAFETY: the caller's promise.
    let l = unsafe { link.as_ref() };
    if let Some(finalize) = l.vtable.finalize {
        if !l.prev_flag(FINALIZED) {
            l.set_prev_flag(FINALIZED, true);
            // SAFETY: the value is initialised; with the strong count at
            // zero the finalizer cannot resurrect it (`upgrade` fails).
            unsafe { finalize(link) };
        }
    }
}

/// `drop_now` for a `T` known at compile time.
///
/// # Safety
/// As for `drop_now`, and `link` belongs to a tracked `T`.
#[inline(always)]
unsafe fn drop_now_typed<T: Trace>(link: NonNull<Link>) {
    // SAFETY: the caller's promise: `T` is the type of the value.
    unsafe { Shape::<T>::drop_value(link) };
    // SAFETY: the value is dropped and the shared weak reference is ours;
    // a tracked `T`'s allocation has `T`'s layout and starts at its link.
    unsafe { release_weak(counts_of(link), link.cast(), Shape::<T>::LAYOUT) };
}

/// Drops the value and the strong references' shared weak reference.
///
/// # Safety
/// `link` is a live tracked object with strong count zero whose value is
/// initialised and will not be used again.
unsafe fn drop_now(link: NonNull<Link>) {
    // SAFETY: the caller's promise.
    let layout = unsafe { link.as_ref() }.vtable.layout;
    // SAFETY: the caller's promise.
    unsafe { (link.as_ref().vtable.drop_value)(link) };
    // SAFETY: the value is dropped and the shared weak reference is ours.
    unsafe { release_weak(counts_of(link), link.cast(), layout) };
}

// Whether a collection is running, per thread of control rather than per
// collector, so that no collection can start inside another on the same
// thread.
#[cfg(feature = "std")]
std::thread_local! {
    static BUSY: Cell<bool> = const { Cell::new(false) };
}
#[cfg(not(feature = "std"))]
static BUSY: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

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

/// Undoes a collection's partial work if a panic unwinds through it.
struct Recover<'a>(&'a Collector);

impl Drop for Recover<'_> {
    fn drop(&mut self) {
        let c = self.0;
        c.marks_dirty.set(true);
        let held_unreach = c.unreach_held.replace(false);
        for (list, held) in [(YOUNG, false), (UNREACH, held_unreach), (GARBAGE, true)] {
            let head = c.head(list);
            // SAFETY: panics come only from user code, which runs between
            // our list operations, so every `next` chain is intact; `restore`
            // rebuilds the `prev` words that held `gc_refs`.
            unsafe {
                head.restore();
                // Objects we hold a reference to are parked until the next
                // collection releases them; running their `Drop` now, during
                // unwinding, could abort.
                head.splice_into(c.head(if held { HELD } else { GENERATIONS - 1 }));
            }
        }
    }
}

/// Decrements the trashcan depth when a drop finishes or unwinds.
struct Depth<'a>(&'a Cell<usize>);

impl Drop for Depth<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

impl Default for Collector {
    fn default() -> Self {
        Self::new()
    }
}

impl Collector {
    /// A collector with CPython's default thresholds (700, 10, 10), enabled.
    pub fn new() -> Self {
        let heads = Box::new(core::array::from_fn(|_| Link::head()));
        for head in heads.iter() {
            head.init_ring();
        }
        Collector {
            heads,
            count: Default::default(),
            threshold: [Cell::new(700), Cell::new(10), Cell::new(10)],
            enabled: Cell::new(true),
            long_lived_total: Cell::new(0),
            long_lived_pending: Cell::new(0),
            stats: Default::default(),
            callbacks: RefCell::new(Vec::new()),
            next_callback: Cell::new(0),
            save_all: Cell::new(false),
            unreach_held: Cell::new(false),
            marks_dirty: Cell::new(false),
            trash_depth: Cell::new(0),
            trash: Cell::new(ptr::null()),
            site_tracing: Cell::new(false),
            sites: RefCell::new(BTreeMap::new()),
            debug: Cell::new(0),
            print: Cell::new(DEFAULT_PRINT),
        }
    }

    pub(crate) fn head(&self, list: usize) -> &Link {
        &self.heads[list]
    }

    /// Calls `f` on every object of the live lists.
    pub(crate) fn for_each_live(&self, mut f: impl FnMut(NonNull<Link>)) {
        for list in LIVE_LISTS {
            // SAFETY: live lists are well formed and hold live objects; `f`
            // runs no user code.
            unsafe { self.head(list).for_each(&mut f) };
        }
    }

    /// Calls `f`, which may run user code, on every object of the live
    /// lists. A reference to each is held meanwhile, so user code cannot
    /// free an object before we visit it.
    fn for_each_live_held(&self, mut f: impl FnMut(NonNull<Link>)) {
        let mut objects = Vec::new();
        self.for_each_live(|link| {
            // SAFETY: live objects of our lists.
            inc_strong(unsafe { counts(link) });
            objects.push(link);
        });
        for &link in &objects {
            f(link);
        }
        for link in objects {
            // SAFETY: we hold one reference to each, and live-list objects
            // are not part of a collection.
            unsafe { self.drop_ref(link) };
        }
    }

    /// Links a new object into generation 0, then maybe collects. Inlined
    /// into `Cc::new`: the rare parts (site tracing, the collection) are
    /// out of line.
    #[inline]
    pub(crate) fn track(&self, link: NonNull<Link>, site: &'static Location<'static>) {
        // SAFETY: a fresh object, in no list, without flags.
        unsafe { self.head(0).push_back_fresh(link.as_ref()) };
        if self.site_tracing.get() {
            self.record_site(link, site);
        }
        let count = self.count[0].get() + 1;
        self.count[0].set(count);
        // An automatic collection once generation 0 passed its threshold
        // (0 disables them), unless one is running.
        let threshold = self.threshold[0].get();
        if count > threshold && threshold != 0 && self.enabled.get() {
            self.collect_if_idle();
        }
    }

    /// Records the allocation site of a new object (site tracing on).
    #[cold]
    #[inline(never)]
    fn record_site(&self, link: NonNull<Link>, site: &'static Location<'static>) {
        self.sites.borrow_mut().insert(link.addr().get(), site);
    }

    /// The automatic collection `track` asks for, unless one is running.
    #[cold]
    #[inline(never)]
    fn collect_if_idle(&self) {
        if !busy() {
            self.collect_generations();
        }
    }

    /// Bookkeeping for an object leaving the lists for good.
    #[inline]
    pub(crate) fn untrack(&self, link: &Link) {
        self.count[0].set(self.count[0].get().saturating_sub(1));
        // Records exist only while site tracing is on (switching it off
        // forgets them), so the common case tests one flag.
        if self.site_tracing.get() {
            self.forget_site(link);
        }
    }

    /// Removes the allocation site record of an object leaving the lists.
    #[cold]
    #[inline(never)]
    fn forget_site(&self, link: &Link) {
        if let Ok(mut sites) = self.sites.try_borrow_mut() {
            if !sites.is_empty() {
                sites.remove(&(link as *const Link).addr());
            }
        }
    }

    /// Drops a reference the collector took; returns whether the object
    /// lives on.
    ///
    /// # Safety
    /// The caller owns one strong reference to the live tracked object
    /// `link`, which is in a well-formed list and not `COLLECTING`.
    unsafe fn drop_ref(&self, link: NonNull<Link>) -> bool {
        // SAFETY: the caller's reference keeps the object alive.
        let c = unsafe { counts(link) };
        let strong = c.strong.get() - 1;
        c.strong.set(strong);
        if strong == 0 {
            // SAFETY: count zero, value initialised, not collecting.
            unsafe { self.destroy(link) };
        }
        strong != 0
    }

    /// `destroy_tracked` with this collector doing the bookkeeping.
    ///
    /// # Safety
    /// As for `destroy_tracked`.
    unsafe fn destroy(&self, link: NonNull<Link>) {
        // SAFETY: the caller's promise: live and in a well-formed list.
        unsafe { link.as_ref().unlink() };
        // SAFETY: the caller's promise; now unlinked.
        unsafe { self.destroy_unlinked(link) };
    }

    /// `destroy` for a `T` known at compile time, inline: `T`'s finalizer
    /// (none tested for when it has none), drop and layout.
    ///
    /// # Safety
    /// As for `destroy_tracked`.
    #[inline(always)]
    pub(crate) unsafe fn destroy_typed<T: Trace>(&self, link: NonNull<Link>) {
        // SAFETY: the caller's promise: live and in a well-formed list.
        let l = unsafe { link.as_ref() };
        // SAFETY: as above.
        unsafe { l.unlink() };
        if T::FINALIZER.is_some() {
            // SAFETY: the caller's promise; unlinked now.
            unsafe { self.finalize_or_park(link) };
        }
        self.untrack(l);
        // SAFETY: the caller's promise: unlinked now, strong count zero,
        // value initialised; `trashcan_with` calls the closure only on
        // `link`, a `T`, and only once.
        unsafe { self.trashcan_with(link, |link| drop_now_typed::<T>(link)) };
    }

    /// `destroy` for an object already unlinked (linked to itself).
    ///
    /// # Safety
    /// As for `destroy_tracked`, and `link` is in no list.
    #[inline(always)]
    unsafe fn destroy_unlinked(&self, link: NonNull<Link>) {
        // SAFETY: the caller's promise.
        unsafe { self.finalize_or_park(link) };
        // SAFETY: `link` is still allocated (its weak count is held).
        self.untrack(unsafe { link.as_ref() });
        // SAFETY: the caller's promise; unlinked.
        unsafe { self.trashcan(link) };
    }

    /// `finalize_once` for an object the reference count is destroying. If
    /// the finalizer panics, the object is parked in `HELD` with one
    /// reference, the collector's, before the panic goes on (its weak
    /// references already fail): the next collection releases it, dropping
    /// the value (the finalizer does not run again) and with it the
    /// references to its children. So until then the panicking object
    /// alone stays alive, and nothing leaks.
    ///
    /// # Safety
    /// As for `destroy_tracked`, and `link` is in no list.
    #[inline(always)]
    unsafe fn finalize_or_park(&self, link: NonNull<Link>) {
        struct Park<'a>(&'a Collector, NonNull<Link>);
        impl Drop for Park<'_> {
            fn drop(&mut self) {
                // SAFETY: the object is alive (its weak count is held), in
                // no list, with strong count zero: the finalizer cannot
                // resurrect it. The reference set here is the one `HELD`
                // objects hold; its weak references stay dead.
                unsafe {
                    let l = self.1.as_ref();
                    counts(self.1).strong.set(1);
                    l.set_next_flag(WEAK_CLEARED, true);
                    self.0.head(HELD).push_back(l);
                }
            }
        }
        let park = Park(self, link);
        // SAFETY: the caller's promise.
        unsafe { finalize_once(link) };
        core::mem::forget(park);
    }

    /// Drops a value now, or queues it when drops are nested too deeply.
    ///
    /// # Safety
    /// As for `drop_now`.
    #[inline]
    unsafe fn trashcan(&self, link: NonNull<Link>) {
        // SAFETY: the caller's promise, which is `drop_now`'s;
        // `trashcan_with` calls the closure only on `link`, once.
        unsafe { self.trashcan_with(link, |link| drop_now(link)) };
    }

    /// `trashcan` dropping the value with `drop_now` (the generic or the
    /// typed one).
    ///
    /// # Safety
    /// As for `drop_now`, and `drop_now(link)` is sound under those
    /// conditions (it is called at most once, on `link`).
    #[inline(always)]
    unsafe fn trashcan_with(&self, link: NonNull<Link>, drop_now: impl FnOnce(NonNull<Link>)) {
        let depth = self.trash_depth.get();
        if depth >= TRASH_DEPTH {
            // SAFETY: the object is unlinked, so its `next` word is free.
            unsafe { link.as_ref() }.set_next(self.trash.get());
            self.trash.set(link.as_ptr());
            return;
        }
        self.trash_depth.set(depth + 1);
        let _depth = Depth(&self.trash_depth);
        drop_now(link);
        if depth == 0 && !self.trash.get().is_null() {
            // The outermost drop empties the queue.
            self.empty_trash();
        }
    }

    /// Drops the queued objects, iteratively.
    #[cold]
    #[inline(never)]
    fn empty_trash(&self) {
        while let Some(next) = NonNull::new(self.trash.get().cast_mut()) {
            // SAFETY: queued objects are live, unlinked, with strong
            // count zero and an initialised value.
            self.trash.set(unsafe { next.as_ref() }.next());
            // SAFETY: as above.
            unsafe { drop_now(next) };
        }
    }

    /// CPython's `gc_collect_generations`: the oldest generation over its
    /// threshold, with the 25 % rule for full collections.
    fn collect_generations(&self) {
        for generation in (0..GENERATIONS).rev() {
            if self.count[generation].get() > self.threshold[generation].get() {
                if generation == GENERATIONS - 1
                    && self.long_lived_pending.get() < self.long_lived_total.get() / 4
                {
                    continue;
                }
                self.collect_generation(generation);
                return;
            }
        }
    }

    /// A full collection. Returns the number of unreachable objects found
    /// (0 if a collection is already running).
    pub fn collect(&self) -> usize {
        self.collect_generation(GENERATIONS - 1)
    }

    /// Collects generations `0..=generation`. Returns the number of
    /// unreachable objects found (0 if a collection is already running).
    ///
    /// # Panics
    /// If `generation` is not 0, 1 or 2.
    pub fn collect_generation(&self, generation: usize) -> usize {
        assert!(generation < GENERATIONS, "generation must be 0, 1 or 2");
        let Some(_busy) = Busy::enter() else {
            return 0;
        };
        self.recover_from_panic();
        self.run_callbacks(CallbackInfo {
            phase: Phase::Start,
            generation,
            collected: 0,
            uncollectable: 0,
        });
        self.debug_collection_start(generation);
        #[cfg(feature = "std")]
        let started = std::time::Instant::now();
        let recover = Recover(self);
        // SAFETY: `Busy` guarantees no other collection runs, so the working
        // lists are ours.
        let (garbage, uncollectable) = unsafe { self.collect_main(generation) };
        core::mem::forget(recover);

        let mut stats = self.stats[generation].get();
        stats.collections += 1;
        stats.collected += garbage - uncollectable;
        stats.uncollectable += uncollectable;
        #[cfg(feature = "std")]
        let elapsed = started.elapsed();
        #[cfg(not(feature = "std"))]
        let elapsed = Duration::ZERO;
        stats.time += elapsed;
        self.stats[generation].set(stats);
        self.debug_collection_done(garbage, uncollectable, elapsed);
        self.run_callbacks(CallbackInfo {
            phase: Phase::Stop,
            generation,
            collected: garbage - uncollectable,
            uncollectable,
        });
        garbage
    }

    /// Validates a list and its transient flags in debug builds (CPython's
    /// `validate_list`).
    fn validate(&self, list: usize, collecting: bool, unreachable: bool) {
        if cfg!(debug_assertions) {
            // SAFETY: callers pass lists with valid links and live objects.
            unsafe { self.head(list).validate(collecting, unreachable) };
        }
    }

    /// The collection proper; returns (garbage found, of which not freed).
    ///
    /// # Safety
    /// Called under `Busy` with the working lists empty.
    unsafe fn collect_main(&self, generation: usize) -> (usize, usize) {
        let young = self.head(YOUNG);
        let unreach = self.head(UNREACH);
        let older = self.head((generation + 1).min(GENERATIONS - 1));
        for list in 0..=generation {
            // SAFETY: generations are well-formed lists.
            unsafe { self.head(list).splice_into(young) };
        }
        self.validate(YOUNG, false, false);

        // SAFETY: `young` holds live objects, and we are the only collection.
        let survivors = unsafe { self.find_unreachable(young, unreach, 0) };
        self.validate(YOUNG, false, false);
        self.validate(UNREACH, true, true);
        // SAFETY: both are well formed after `find_unreachable`.
        unsafe { young.splice_into(older) };

        if generation < GENERATIONS - 1 {
            let next = &self.count[generation + 1];
            next.set(next.get() + 1);
        }
        for count in &self.count[..=generation] {
            count.set(0);
        }
        match generation {
            1 => self
                .long_lived_pending
                .set(self.long_lived_pending.get() + survivors),
            2 => {
                self.long_lived_pending.set(0);
                // `older` was the oldest generation, spliced into `young`:
                // it now holds exactly the survivors.
                self.long_lived_total.set(survivors);
            }
            _ => {}
        }
        if unreach.is_empty() {
            return (0, 0);
        }
        // SAFETY: the unreachable list holds live objects, restored.
        unsafe { self.handle_unreachable() }
    }

    /// Steps 1–3 on `list`: moves what is unreachable from outside into
    /// `out` and restores `list`. Objects in `out` keep `COLLECTING` and
    /// `UNREACHABLE` (with valid `prev` links), and their handles keep the
    /// marks of the subtract pass. `bias` is subtracted from each strong
    /// count first (the reference the collector itself holds). Returns the
    /// number of objects left in `list`.
    ///
    /// # Safety
    /// `list` is a well-formed list of live objects, `out` an empty list,
    /// both working lists of the running collection.
    unsafe fn find_unreachable(&self, list: &Link, out: &Link, bias: u32) -> usize {
        // SAFETY (whole block): the caller's promise; user `Trace` code runs
        // inside, but it cannot unlink objects that are `COLLECTING`
        // (`Cc::drop` and `try_unwrap` leave those alone), so our chains
        // stay intact.
        unsafe {
            list.for_each(|link| {
                let l = link.as_ref();
                let strong = counts(link).strong.get();
                l.start_collecting(strong.saturating_sub(bias) as usize);
            });
            // Subtract internal references; a handle reported twice is
            // counted once thanks to the mark left on it.
            let mut visitor = Visitor {
                op: Op::Subtract { consistent: true },
                untraceable: false,
            };
            list.for_each(|link| {
                if trace_with(link, &mut visitor) {
                    let l = link.as_ref();
                    l.set_gc_refs(l.gc_refs() + ROOT_BIAS);
                }
            });
            if let Op::Subtract { consistent: true } = visitor.op {
                Self::move_unreachable(list, out)
            } else {
                Self::unmark(list);
                list.restore()
            }
        }
    }

    /// CPython's `move_unreachable`, without moving anything twice: scans
    /// `young` front to back; an object with `gc_refs > 0` is reachable and
    /// marks what it reaches, an object with `gc_refs == 0` is flagged
    /// `UNREACHABLE` and left in place. When a reachable object reaches a
    /// flagged one, the flag goes and the object is pushed on a stack
    /// threaded through its `prev` word, which is drained (each object
    /// traced in turn) before the scan moves on: no recursion, no
    /// allocation, each object traced at most once. A last pass moves what
    /// is still flagged to `unreachable` and restores `young` (`prev`
    /// pointers, `COLLECTING` cleared). Returns the number of objects left in
    /// `young`.
    ///
    /// Objects stay where they are and keep `COLLECTING` while user `Trace`
    /// code runs, so a `Cc` it drops to zero is left in place (as in the
    /// other passes) and the `next` chain is never changed under it.
    ///
    /// # Safety
    /// As for `find_unreachable`, with `gc_refs` computed.
    unsafe fn move_unreachable(young: &Link, unreachable: &Link) -> usize {
        let stack: Cell<*const Link> = Cell::new(young);
        let mut visitor = Visitor {
            op: Op::Reach { stack: &stack },
            untraceable: false,
        };
        let mut cur = young.next();
        while !ptr::eq(cur, young) {
            // SAFETY: nodes on the chain are live; the chain does not change
            // during the scan.
            let node = unsafe { &*cur };
            cur = node.next();
            if node.gc_refs() == 0 {
                node.set_next_flag(UNREACHABLE, true);
                continue;
            }
            // SAFETY: live, value initialised.
            unsafe { trace_with(NonNull::from(node), &mut visitor) };
            while !ptr::eq(stack.get(), young) {
                // SAFETY: only live nodes of `young` are pushed.
                let top = unsafe { &*stack.get() };
                stack.set(top.prev());
                top.set_gc_refs(1);
                // SAFETY: live, value initialised.
                unsafe { trace_with(NonNull::from(top), &mut visitor) };
            }
        }
        // Partition: unlink what is still flagged, restore the rest.
        let mut prev: &Link = young;
        let mut survivors = 0;
        let mut cur = young.next();
        while !ptr::eq(cur, young) {
            // SAFETY: nodes on the chain are live.
            let node = unsafe { &*cur };
            cur = node.next();
            if node.next_flag(UNREACHABLE) {
                // SAFETY: `unreachable` is a well-formed list; `node` leaves
                // `young`'s chain (its predecessor is relinked below).
                unsafe { unreachable.push_back(node) };
            } else {
                if !ptr::eq(prev.next(), node) {
                    prev.set_next(node);
                }
                node.restore_prev(prev);
                prev = node;
                survivors += 1;
            }
        }
        prev.set_next(young);
        young.set_prev(prev);
        survivors
    }

    /// Removes the marks the subtract pass left on the handles of `list`.
    ///
    /// # Safety
    /// `list` holds live objects and its `next` chain is intact.
    unsafe fn unmark(list: &Link) {
        // SAFETY: the caller's promise; tracing cannot unlink these objects.
        unsafe {
            list.for_each(|link| {
                trace(link, Op::Unmark);
            });
        }
    }

    /// Steps 4–6 on the unreachable list; returns (garbage, not freed).
    ///
    /// # Safety
    /// Called under `Busy`; `UNREACH` holds live objects with valid `prev`
    /// links, as `find_unreachable` left them.
    unsafe fn handle_unreachable(&self) -> (usize, usize) {
        let unreach = self.head(UNREACH);
        let garbage = self.head(GARBAGE);
        let mut finalizers = false;
        let mut found = 0;
        // SAFETY (whole block): the lists hold live objects; from the first
        // pass on, every object in them holds one reference we took, so user
        // code cannot free them while we iterate.
        unsafe {
            unreach.for_each(|link| {
                let l = link.as_ref();
                found += 1;
                inc_strong(counts(link));
                l.set_next_flag(WEAK_CLEARED, true);
                l.set_prev_flag(COLLECTING, false);
                finalizers |= l.vtable.finalize.is_some() && !l.prev_flag(FINALIZED);
            });
            self.unreach_held.set(true);
            self.validate(UNREACH, false, true);
            if finalizers {
                unreach.for_each(|link| {
                    let l = link.as_ref();
                    if let Some(finalize) = l.vtable.finalize {
                        if !l.prev_flag(FINALIZED) {
                            l.set_prev_flag(FINALIZED, true);
                            finalize(link);
                        }
                    }
                });
                // Finalizers ran user code: find again what is garbage.
                // Whatever they resurrected stays in `unreach`.
                Self::unmark(unreach);
                unreach.restore();
                found -= self.find_unreachable(unreach, garbage, 1);
                self.validate(UNREACH, false, false);
                self.validate(GARBAGE, true, true);
                garbage.for_each(|link| link.as_ref().set_prev_flag(COLLECTING, false));
                self.release(unreach);
            } else {
                unreach.splice_into(garbage);
            }
            self.unreach_held.set(false);

            self.validate(GARBAGE, false, true);
            self.debug_collectable(garbage);
            if self.save_all.get() {
                Self::unmark(garbage);
                garbage.restore();
                garbage.splice_into(self.head(SAVED));
                return (found, found);
            }
            // `tp_clear`: empty every handle that points into the garbage.
            let mut visitor = Visitor {
                op: Op::Clear,
                untraceable: false,
            };
            let watched = self.debug_garbage_before_clear(garbage);
            garbage.for_each(|link| {
                trace_with(link, &mut visitor);
            });
            let kept = self.release(garbage);
            self.debug_uncollectable(watched);
            (found, kept)
        }
    }

    /// Moves each object of `list` to the oldest generation and drops the
    /// reference the collector held; returns how many are still alive.
    ///
    /// # Safety
    /// Every object of `list` (valid `prev` links) holds one reference we
    /// took.
    unsafe fn release(&self, list: &Link) -> usize {
        let oldest = self.head(GENERATIONS - 1);
        let mut kept = 0;
        while !list.is_empty() {
            // SAFETY: the list is not empty and, per the caller, its first
            // node holds our reference, so its value is initialised (values
            // drop only at a zero count); it is unlinked and no longer
            // `COLLECTING` before user code runs, as `destroy_unlinked` needs.
            unsafe {
                let link = NonNull::new_unchecked(list.next().cast_mut());
                let l = link.as_ref();
                l.unlink();
                l.set_prev_flag(COLLECTING, false);
                l.set_next_flag(UNREACHABLE, false);
                let c = counts(link);
                if c.strong.get() == 1 {
                    // Ours is the last reference: destroy it directly (it
                    // would leave `oldest` again at once); it is unlinked.
                    c.strong.set(0);
                    self.destroy_unlinked(link);
                } else {
                    oldest.push_back(l);
                    if self.drop_ref(link) {
                        kept += 1;
                    }
                }
            }
        }
        kept
    }

    /// Cleans up after a collection a panic interrupted: removes stale
    /// marks (else their handles would go uncounted once), then releases the
    /// objects it left held.
    fn recover_from_panic(&self) {
        if self.marks_dirty.get() {
            self.for_each_live_held(|link| {
                // SAFETY: held by `for_each_live_held`.
                unsafe { trace(link, Op::Unmark) };
            });
            self.marks_dirty.set(false);
        }
        // SAFETY: `HELD` objects each hold one reference we took.
        unsafe { self.release(self.head(HELD)) };
    }

    fn run_callbacks(&self, info: CallbackInfo) {
        let callbacks: Vec<Callback> = match self.callbacks.try_borrow() {
            Ok(list) if !list.is_empty() => list.iter().map(|(_, f)| f.clone()).collect(),
            _ => return,
        };
        for callback in callbacks {
            callback(&info);
        }
    }

    /// Turns automatic collection on (`gc.enable`).
    pub fn enable(&self) {
        self.enabled.set(true);
    }

    /// Turns automatic collection off (`gc.disable`).
    pub fn disable(&self) {
        self.enabled.set(false);
    }

    /// Whether automatic collection is on (`gc.isenabled`).
    pub fn is_enabled(&self) -> bool {
        self.enabled.get()
    }

    /// The per-generation counts (`gc.get_count`): tracked allocations minus
    /// deallocations since the last collection, then collections of the
    /// younger generation since the last collection of this one.
    pub fn count(&self) -> [usize; GENERATIONS] {
        self.count.each_ref().map(Cell::get)
    }

    /// The thresholds (`gc.get_threshold`).
    pub fn threshold(&self) -> [usize; GENERATIONS] {
        self.threshold.each_ref().map(Cell::get)
    }

    /// Sets the thresholds (`gc.set_threshold`); a first threshold of 0
    /// disables automatic collection.
    pub fn set_threshold(&self, threshold0: usize, threshold1: usize, threshold2: usize) {
        for (cell, value) in self
            .threshold
            .iter()
            .zip([threshold0, threshold1, threshold2])
        {
            cell.set(value);
        }
    }

    /// Moves every tracked object to the permanent generation, which
    /// collections ignore (`gc.freeze`).
    pub fn freeze(&self) {
        for list in 0..GENERATIONS {
            // SAFETY: outside the working lists, generations are well formed
            // whenever user code can call this.
            unsafe { self.head(list).splice_into(self.head(PERMANENT)) };
            self.count[list].set(0);
        }
    }

    /// Moves the permanent generation back into the oldest (`gc.unfreeze`).
    pub fn unfreeze(&self) {
        // SAFETY: as in `freeze`.
        unsafe { self.head(PERMANENT).splice_into(self.head(GENERATIONS - 1)) };
    }

    /// Number of objects in the permanent generation (`gc.get_freeze_count`).
    pub fn freeze_count(&self) -> usize {
        // SAFETY: as in `freeze`.
        unsafe { self.head(PERMANENT).len() }
    }

    /// Per-generation statistics (`gc.get_stats`).
    pub fn stats(&self) -> [GenerationStats; GENERATIONS] {
        self.stats.each_ref().map(Cell::get)
    }

    /// Registers `callback`, called with [`Phase::Start`] before and
    /// [`Phase::Stop`] after every collection (`gc.callbacks`).
    pub fn add_callback(&self, callback: impl Fn(&CallbackInfo) + 'static) -> CallbackHandle {
        let id = self.next_callback.get();
        self.next_callback.set(id + 1);
        self.callbacks.borrow_mut().push((id, Rc::new(callback)));
        CallbackHandle(id)
    }

    /// Unregisters a callback; `false` if it was not registered.
    pub fn remove_callback(&self, handle: CallbackHandle) -> bool {
        let mut callbacks = self.callbacks.borrow_mut();
        let before = callbacks.len();
        callbacks.retain(|(id, _)| *id != handle.0);
        callbacks.len() != before
    }

    /// Number of objects the collector tracks (all generations, the
    /// permanent one and saved garbage).
    pub fn tracked_count(&self) -> usize {
        let mut n = 0;
        self.for_each_live(|_| n += 1);
        n
    }

    /// Keeps garbage alive in a list instead of freeing it
    /// (`gc.DEBUG_SAVEALL`); it shows in the census.
    pub fn set_save_all(&self, on: bool) {
        self.save_all.set(on);
    }

    /// Whether `save_all` is on.
    pub fn save_all(&self) -> bool {
        self.save_all.get()
    }

    /// Number of objects kept by `save_all` (`len(gc.garbage)`).
    pub fn garbage_count(&self) -> usize {
        // SAFETY: `SAVED` is a well-formed list.
        unsafe { self.head(SAVED).len() }
    }

    /// Lets go of the garbage `save_all` kept (`del gc.garbage[:]`); the
    /// next collection frees it unless `save_all` is still on.
    pub fn clear_garbage(&self) {
        // SAFETY: each `SAVED` object holds one reference we took.
        unsafe { self.release(self.head(SAVED)) };
    }

    /// Type names of the tracked objects that hold a handle to the object
    /// whose counts are at `target`, one entry per referring object.
    pub(crate) fn referrers_of(&self, target: NonNull<Counts>) -> Vec<&'static str> {
        let mut found = Vec::new();
        self.for_each_live_held(|link| {
            // SAFETY: held, so alive with an initialised value.
            let (op, _) = unsafe { trace(link, Op::Find { target, hits: 0 }) };
            if let Op::Find { hits: 1.., .. } = op {
                // SAFETY: held.
                found.push((unsafe { link.as_ref() }.vtable.type_name)());
            }
        });
        found
    }
}

impl fmt::Debug for Collector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Collector")
            .field("count", &self.count())
            .field("threshold", &self.threshold())
            .field("enabled", &self.is_enabled())
            .field("tracked", &self.tracked_count())
            .finish()
    }
}

impl Drop for Collector {
    /// Objects still tracked stay linked among themselves (and are never
    /// collected); only the heads leave their rings.
    fn drop(&mut self) {
        for head in self.heads.iter() {
            head.detach_head();
        }
    }
}

// CPython's `gc.set_debug` flags, and the prints they ask for at each step
// of a collection. Output goes to stderr with `std`; without it, to the
// callback given to `Collector::set_debug_print` (nowhere until then).

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
}

/// The last path segment of a type name, before any generic arguments.
pub(crate) fn short_name(full: &str) -> &str {
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base)
}
