//! A byte limit and allocation-failure injection, for fuzz targets and
//! out-of-memory tests: code that handles a null from the allocator
//! (`try_reserve`, `Box::try_new`-style paths) only runs when one comes.
//!
//! * [`PyMalloc::set_limit`] caps the bytes an allocator hands out, like the
//!   `cap` crate: an allocation that would pass it returns null, so a fuzz
//!   target meets its own error handling instead of libFuzzer's RSS limit.
//! * [`PyMalloc::fail_nth`], [`PyMalloc::fail_randomly`],
//!   [`PyMalloc::count_allocations`] and [`PyMalloc::each_failure`] (with
//!   `std`) act on the calling thread only, after wasmtime's `OomTest` and
//!   SpiderMonkey's `oomTest`: count the allocations a closure makes, then
//!   make each one fail in turn.
//!
//! Both are off by default, and then cost one load and one predictable
//! branch per call: the front compares the request's size with a bound, a
//! field of the allocator that is one past the largest small size while
//! nothing is armed and drops to zero while a limit or an injection is on,
//! sending every call to the out-of-line path here (see `Gate::passes`). Where the pool path is inlined (`dealloc`), that
//! compare replaces the small-size test it would make anyway.
//!
//! Only allocations count (`alloc`, `alloc_zeroed`, `realloc`); frees always
//! succeed. Sizes are what the caller asked for (`Layout::size`).

use super::backing::Backing;
use super::front::PyMalloc;
use core::alloc::{GlobalAlloc, Layout};
use core::ptr;
use core::sync::atomic::Ordering;

impl<B: Backing> PyMalloc<B> {
    /// From now on, an allocation that would take the bytes this allocator
    /// has handed out since the limit was first set (less those freed since)
    /// past `bytes` returns null. The count is of requested bytes
    /// (`Layout::size`), and exact under threads. Setting it again changes
    /// the limit and keeps the count.
    ///
    #[cfg_attr(feature = "std", doc = "```")]
    #[cfg_attr(not(feature = "std"), doc = "```ignore")]
    /// use pymalloc::PyMalloc;
    ///
    /// #[global_allocator]
    /// static ALLOC: PyMalloc = PyMalloc::system();
    ///
    /// ALLOC.set_limit(1 << 20);
    /// let mut v: Vec<u8> = Vec::new();
    /// assert!(v.try_reserve_exact(2 << 20).is_err());
    /// assert!(v.try_reserve_exact(1 << 19).is_ok());
    /// drop(v);
    /// ALLOC.remove_limit();
    /// ```
    pub fn set_limit(&self, bytes: usize) {
        let gate = &self.gate;
        let bytes = bytes.min(usize::MAX - 1);
        if gate.max.load(Ordering::Relaxed) == usize::MAX {
            gate.used.store(0, Ordering::Relaxed);
        }
        if gate.max.swap(bytes, Ordering::Relaxed) == usize::MAX {
            gate.arm(1);
        }
    }

    /// Lifts the limit of [`PyMalloc::set_limit`].
    pub fn remove_limit(&self) {
        if self.gate.max.swap(usize::MAX, Ordering::Relaxed) != usize::MAX {
            self.gate.arm(-1);
        }
    }

    /// Bytes still allowed under the limit; `None` without one.
    pub fn limit_remaining(&self) -> Option<usize> {
        let max = self.gate.max.load(Ordering::Relaxed);
        (max != usize::MAX).then(|| max.saturating_sub(self.gate.used.load(Ordering::Relaxed)))
    }

    /// What the calling thread's injection calls this allocator.
    fn key(&self) -> usize {
        ptr::from_ref(self).addr()
    }

    /// `alloc` off the fast path: a large request, or something armed.
    /// Every large request comes this way, so the unarmed case is kept
    /// lean: what the limit and injection need is out of line.
    #[inline(never)]
    pub(crate) fn gated_alloc(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        if self.gate.is_armed() {
            return self.limited_alloc(layout, zeroed);
        }
        self.front_alloc(layout, zeroed)
    }

    /// `alloc` with this allocator's limit or an injection on.
    #[cold]
    #[inline(never)]
    fn limited_alloc(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        if thread::fails(self.key(), layout) || !self.gate.charge(layout.size()) {
            return ptr::null_mut();
        }
        let block = self.front_alloc(layout, zeroed);
        if block.is_null() {
            self.gate.credit(layout.size());
        }
        block
    }

    /// `dealloc` off the fast path: armed, traced, large or checked.
    ///
    /// # Safety
    /// As for `GlobalAlloc::dealloc`.
    #[inline(never)]
    pub(crate) unsafe fn gated_dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { self.front_dealloc(ptr, layout) };
        if self.gate.is_armed() {
            self.gate.credit(layout.size());
        }
    }

    /// `realloc` off the fast path: with something armed, a failure leaves
    /// the block as it was, as a failed `realloc` must.
    ///
    /// # Safety
    /// As for `GlobalAlloc::realloc`.
    #[inline(never)]
    pub(crate) unsafe fn gated_realloc(
        &self,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
    ) -> *mut u8 {
        if !self.gate.is_armed() {
            // SAFETY: forwarded contract.
            return unsafe { self.front_realloc(ptr, layout, new_size) };
        }
        // SAFETY: forwarded contract.
        unsafe { self.limited_realloc(ptr, layout, new_size) }
    }

    /// `realloc` with this allocator's limit or an injection on.
    ///
    /// # Safety
    /// As for `GlobalAlloc::realloc`.
    #[cold]
    #[inline(never)]
    unsafe fn limited_realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        let grow = new_size.saturating_sub(old);
        // The layout reported is the new one: that is what was asked for.
        let asked = Layout::from_size_align(new_size, layout.align()).unwrap_or(layout);
        if thread::fails(self.key(), asked) || !self.gate.charge(grow) {
            return ptr::null_mut();
        }
        // SAFETY: forwarded contract.
        let block = unsafe { self.front_realloc(ptr, layout, new_size) };
        if block.is_null() {
            self.gate.credit(grow);
        } else {
            self.gate.credit(old.saturating_sub(new_size));
        }
        block
    }
}

// SAFETY: blocks come from pools (disjoint blocks of arenas the heap owns,
// aligned per `size_class`) or from the backing, which keeps the same
// promises; every path returns null rather than panic when memory runs out.
unsafe impl<B: Backing> GlobalAlloc for PyMalloc<B> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !self.gate.passes(layout) {
            return self.gated_alloc(layout, false);
        }
        self.front_alloc(layout, false)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !self.gate.passes(layout) {
            return self.gated_alloc(layout, true);
        }
        self.front_alloc(layout, true)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract; the block is freed once, by the fast
        // path or, if that declines, by the gated one.
        unsafe {
            if !(self.gate.passes(layout) && self.quick_dealloc(ptr, layout)) {
                self.gated_dealloc(ptr, layout);
            }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !self.gate.passes(layout) {
            // SAFETY: forwarded contract.
            return unsafe { self.gated_realloc(ptr, layout, new_size) };
        }
        // SAFETY: forwarded contract.
        unsafe { self.front_realloc(ptr, layout, new_size) }
    }
}

/// Without `std` there are no thread locals: nothing is injected.
#[cfg(not(feature = "std"))]
mod thread {
    pub(super) fn fails(_: usize, _: core::alloc::Layout) -> bool {
        false
    }
}

#[cfg(feature = "std")]
pub use thread::report_failures;

/// The calling thread's injection state. Its thread local has a constant
/// initialiser and no destructor, so reading it never allocates.
#[cfg(feature = "std")]
mod thread {
    use crate::allocator::backing::Backing;
    use crate::allocator::front::PyMalloc;
    use core::alloc::Layout;
    use core::cell::Cell;

    /// What the thread's injection is set to do.
    #[derive(Clone, Copy)]
    enum Plan {
        /// Count only.
        Count,
        /// Fail the allocation with this number (once).
        Nth(u64),
        /// Fail when the next random number is below the threshold.
        Random { state: u64, threshold: u64 },
    }

    struct State {
        /// The plan, if this thread injects.
        plan: Cell<Option<Plan>>,
        /// The allocator it injects into (its address).
        target: Cell<usize>,
        /// Allocations seen under the plan.
        seen: Cell<u64>,
        /// Failures injected under the plan.
        failed: Cell<u64>,
        /// Print each injected failure with a backtrace.
        report: Cell<bool>,
        /// Inside a report: the reporter's own allocations pass.
        reporting: Cell<bool>,
    }

    std::thread_local! {
        static STATE: State = const {
            State {
                plan: Cell::new(None),
                target: Cell::new(0),
                seen: Cell::new(0),
                failed: Cell::new(0),
                report: Cell::new(false),
                reporting: Cell::new(false),
            }
        };
    }

    /// Whether this allocation from the calling thread into allocator
    /// `key` is to fail.
    pub(super) fn fails(key: usize, layout: Layout) -> bool {
        STATE
            .try_with(|state| {
                let Some(plan) = state.plan.get() else {
                    return false;
                };
                if state.target.get() != key || state.reporting.get() {
                    return false;
                }
                let seen = state.seen.get() + 1;
                state.seen.set(seen);
                let fail = match plan {
                    Plan::Count => false,
                    Plan::Nth(n) => seen == n,
                    Plan::Random {
                        state: s,
                        threshold,
                    } => {
                        let (next, random) = splitmix(s);
                        state.plan.set(Some(Plan::Random {
                            state: next,
                            threshold,
                        }));
                        random < threshold
                    }
                };
                if fail {
                    state.failed.set(state.failed.get() + 1);
                    injected_failure(seen, layout);
                    if state.report.get() {
                        report(state, seen, layout);
                    }
                }
                fail
            })
            .unwrap_or(false)
    }

    /// Where every injected failure passes, for a debugger's breakpoint
    /// (`break pymalloc::inject::thread::injected_failure`).
    #[inline(never)]
    fn injected_failure(index: u64, layout: Layout) {
        core::hint::black_box((index, layout));
    }

    /// Prints the failing call and where it came from.
    ///
    /// The backtrace allocates: this is the one place the allocator calls
    /// the global allocator from inside a call, which is safe here because
    /// nothing of the allocator has been touched yet (the failure is decided
    /// at the entry, before any lock or cache), and the reporter's own
    /// allocations are let through. It is skipped while the thread panics,
    /// where capturing could deadlock on the backtrace lock a panic holds.
    #[cold]
    fn report(state: &State, index: u64, layout: Layout) {
        state.reporting.set(true);
        let (size, align) = (layout.size(), layout.align());
        if std::thread::panicking() {
            std::eprintln!(
                "pymalloc: injected failure of allocation #{index} ({size} bytes, align {align}) \
                 while panicking; no backtrace"
            );
        } else {
            let trace = std::backtrace::Backtrace::force_capture();
            std::eprintln!(
                "pymalloc: injected failure of allocation #{index} ({size} bytes, align {align}) at\n{trace}"
            );
        }
        state.reporting.set(false);
    }

    /// splitmix64: the next state and a random number.
    fn splitmix(state: u64) -> (u64, u64) {
        let next = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (next, z ^ (z >> 31))
    }

    /// Whether each failure injected on this thread is printed to stderr
    /// with the allocation's number, its layout and a backtrace.
    pub fn report_failures(on: bool) {
        STATE.with(|state| state.report.set(on));
    }

    impl<B: Backing> PyMalloc<B> {
        /// Runs `f` under `plan` on this thread; returns its result, the
        /// allocations it made and the failures injected. The previous plan
        /// comes back afterwards, even if `f` panics.
        fn run_plan<R>(&self, plan: Plan, f: impl FnOnce() -> R) -> (R, u64, u64) {
            struct Restore<'a> {
                gate: &'a crate::allocator::gate::Gate,
                saved: (Option<Plan>, usize, u64, u64),
            }
            impl Drop for Restore<'_> {
                fn drop(&mut self) {
                    let (plan, target, seen, failed) = self.saved;
                    STATE.with(|state| {
                        state.plan.set(plan);
                        state.target.set(target);
                        state.seen.set(seen);
                        state.failed.set(failed);
                    });
                    self.gate.arm(-1);
                }
            }
            let saved = STATE.with(|state| {
                (
                    state.plan.replace(Some(plan)),
                    state.target.replace(self.key()),
                    state.seen.replace(0),
                    state.failed.replace(0),
                )
            });
            self.gate.arm(1);
            let restore = Restore {
                gate: &self.gate,
                saved,
            };
            let result = f();
            let (seen, failed) = STATE.with(|state| (state.seen.get(), state.failed.get()));
            drop(restore);
            (result, seen, failed)
        }

        /// Runs `f`, counting the allocations it makes from this allocator
        /// on this thread; none fails.
        ///
        /// ```
        /// use pymalloc::PyMalloc;
        ///
        /// #[global_allocator]
        /// static ALLOC: PyMalloc = PyMalloc::system();
        ///
        /// let (_, n) = ALLOC.count_allocations(|| vec![Box::new(1), Box::new(2)]);
        /// assert_eq!(n, 3);
        /// ```
        pub fn count_allocations<R>(&self, f: impl FnOnce() -> R) -> (R, u64) {
            let (result, seen, _) = self.run_plan(Plan::Count, f);
            (result, seen)
        }

        /// Runs `f` with its `n`-th allocation from this allocator on this
        /// thread (counting from 1) returning null, the others succeeding;
        /// returns `f`'s result and whether the failure happened (false if
        /// `f` made fewer than `n`).
        ///
        /// ```
        /// use pymalloc::PyMalloc;
        ///
        /// #[global_allocator]
        /// static ALLOC: PyMalloc = PyMalloc::system();
        ///
        /// let (result, failed) = ALLOC.fail_nth(2, || {
        ///     let mut a: Vec<u8> = Vec::new();
        ///     let mut b: Vec<u8> = Vec::new();
        ///     (a.try_reserve(10).is_ok(), b.try_reserve(10).is_ok())
        /// });
        /// assert_eq!((result, failed), ((true, false), true));
        /// ```
        pub fn fail_nth<R>(&self, n: u64, f: impl FnOnce() -> R) -> (R, bool) {
            let (result, _, failed) = self.run_plan(Plan::Nth(n), f);
            (result, failed > 0)
        }

        /// Runs `f` with each of its allocations from this allocator on this
        /// thread failing with probability `probability`, drawn from `seed`
        /// (the same seed fails the same allocations of a deterministic `f`);
        /// returns `f`'s result and the failures injected.
        pub fn fail_randomly<R>(
            &self,
            probability: f64,
            seed: u64,
            f: impl FnOnce() -> R,
        ) -> (R, u64) {
            let threshold = (probability.clamp(0.0, 1.0) * 18_446_744_073_709_551_616.0) as u64;
            let plan = Plan::Random {
                state: seed,
                threshold,
            };
            let (result, _, failed) = self.run_plan(plan, f);
            (result, failed)
        }

        /// The out-of-memory test: counts the allocations `f` makes, then
        /// runs it once for each of them with that one failing, handing
        /// `check` the failing allocation's number (from 1) and `f`'s
        /// result; returns how many there were. `f` must allocate the same
        /// way on every run.
        ///
        /// ```
        /// use pymalloc::PyMalloc;
        ///
        /// #[global_allocator]
        /// static ALLOC: PyMalloc = PyMalloc::system();
        ///
        /// fn build() -> Result<Vec<String>, std::collections::TryReserveError> {
        ///     let mut names = Vec::new();
        ///     names.try_reserve(2)?;
        ///     for word in ["left", "right"] {
        ///         let mut name = String::new();
        ///         name.try_reserve(word.len())?;
        ///         name.push_str(word);
        ///         names.push(name);
        ///     }
        ///     Ok(names)
        /// }
        /// let points = ALLOC.each_failure(build, |_, result| assert!(result.is_err()));
        /// assert_eq!(points, 3);
        /// ```
        pub fn each_failure<R>(
            &self,
            mut f: impl FnMut() -> R,
            mut check: impl FnMut(u64, R),
        ) -> u64 {
            let (result, points) = self.count_allocations(&mut f);
            drop(result);
            for n in 1..=points {
                let (result, failed) = self.fail_nth(n, &mut f);
                assert!(
                    failed,
                    "pymalloc: allocation #{n} of {points} did not happen: \
                     the closure does not allocate the same way on every run"
                );
                check(n, result);
            }
            points
        }
    }
}
