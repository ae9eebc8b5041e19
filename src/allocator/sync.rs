//! Every lock and atomic the crate uses, in one place, so that `cfg(loom)`
//! can swap in loom's modelled types and the firmware build can swap the spin
//! lock for a critical section.

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicUsize, Ordering};

/// Declares a `const fn`, except under `cfg(loom)`, where loom's types cannot
/// be built in a `const` and the same function is declared plain.
macro_rules! loom_const_fn {
    ($(#[$meta:meta])* $vis:vis unsafe fn $($rest:tt)*) => {
        #[cfg(not(loom))]
        $(#[$meta])* $vis const unsafe fn $($rest)*
        #[cfg(loom)]
        $(#[$meta])* $vis unsafe fn $($rest)*
    };
    ($(#[$meta:meta])* $vis:vis fn $($rest:tt)*) => {
        #[cfg(not(loom))]
        $(#[$meta])* $vis const fn $($rest)*
        #[cfg(loom)]
        $(#[$meta])* $vis fn $($rest)*
    };
}
pub(crate) use loom_const_fn;

use core::ops::{Deref, DerefMut};

/// A mutual-exclusion lock around `T`.
///
/// * default: a spin lock (`spin::Mutex`). Right for hosted programs and for
///   firmware whose interrupt handlers never allocate.
/// * feature `critical-section`: the lock is a critical section from the
///   `critical-section` crate. On a single core that masks interrupts, so an
///   interrupt handler that allocates can never spin forever on a lock its
///   own interrupted code holds (the deadlock spin-locked embedded heaps hit).
/// * `cfg(loom)`: loom's mutex, so the model checker explores every order in
///   which threads can take it.
pub(crate) struct Lock<T> {
    #[cfg(loom)]
    inner: loom::sync::Mutex<T>,
    #[cfg(all(not(loom), not(feature = "critical-section")))]
    inner: spin::Mutex<T>,
    #[cfg(all(not(loom), feature = "critical-section"))]
    inner: core::cell::UnsafeCell<T>,
}

// SAFETY: every access to the inner value goes through `lock`, which hands out
// one guard at a time (spin lock, loom mutex, or a critical section that
// excludes every other core and interrupt handler); so sharing `Lock<T>`
// between threads only ever moves `T` between them, which `T: Send` allows.
#[cfg(all(not(loom), feature = "critical-section"))]
unsafe impl<T: Send> Sync for Lock<T> {}

/// Proof of holding a [`Lock`]; releases it when dropped.
pub(crate) struct LockGuard<'a, T> {
    #[cfg(loom)]
    inner: loom::sync::MutexGuard<'a, T>,
    #[cfg(all(not(loom), not(feature = "critical-section")))]
    inner: spin::MutexGuard<'a, T>,
    #[cfg(all(not(loom), feature = "critical-section"))]
    inner: CriticalGuard<'a, T>,
}

impl<T> Lock<T> {
    loom_const_fn! {
        /// A lock around `value`.
        pub(crate) fn new(value: T) -> Self {
            Self {
                #[cfg(loom)]
                inner: loom::sync::Mutex::new(value),
                #[cfg(all(not(loom), not(feature = "critical-section")))]
                inner: spin::Mutex::new(value),
                #[cfg(all(not(loom), feature = "critical-section"))]
                inner: core::cell::UnsafeCell::new(value),
            }
        }
    }

    /// Waits until the lock is free, then holds it.
    pub(crate) fn lock(&self) -> LockGuard<'_, T> {
        #[cfg(loom)]
        let inner = self.inner.lock().unwrap();
        #[cfg(all(not(loom), not(feature = "critical-section")))]
        let inner = self.spin_then_yield();
        #[cfg(all(not(loom), feature = "critical-section"))]
        let inner = CriticalGuard {
            // SAFETY: the matching `release` runs in `CriticalGuard::drop`,
            // with this state, exactly once, and guards are dropped in the
            // reverse order of their creation because each borrows the stack
            // frame that made it.
            state: unsafe { critical_section::acquire() },
            cell: &self.inner,
        };
        LockGuard { inner }
    }

    /// Waits for the spin lock: a few spins for a holder that is about to
    /// leave, then, with `std`, yields between looks, so that on a machine
    /// with more threads than cores a waiter does not burn the time slice
    /// its preempted holder needs to finish.
    #[cfg(all(not(loom), not(feature = "critical-section")))]
    fn spin_then_yield(&self) -> spin::MutexGuard<'_, T> {
        let mut looks = 0u32;
        loop {
            if let Some(guard) = self.inner.try_lock() {
                return guard;
            }
            while self.inner.is_locked() {
                looks = looks.saturating_add(1);
                #[cfg(feature = "std")]
                if looks > 100 {
                    std::thread::yield_now();
                    continue;
                }
                core::hint::spin_loop();
            }
        }
    }

    /// Holds the lock if it is free now; `None` if another holder has it.
    /// A critical section is never held by anyone else while we run, so
    /// there it always succeeds.
    pub(crate) fn try_lock(&self) -> Option<LockGuard<'_, T>> {
        #[cfg(loom)]
        let inner = self.inner.try_lock().ok()?;
        #[cfg(all(not(loom), not(feature = "critical-section")))]
        let inner = self.inner.try_lock()?;
        #[cfg(all(not(loom), feature = "critical-section"))]
        return Some(self.lock());
        #[cfg(any(loom, not(feature = "critical-section")))]
        Some(LockGuard { inner })
    }
}

/// The two halves of holding a lock across `fork`, for the atfork handlers
/// (which take a lock in one call and release it in another).
#[cfg(fork_handlers)]
impl<T> Lock<T> {
    /// Waits for the lock and keeps it held after returning; the value is
    /// the caller's until `release_after_fork`.
    pub(crate) fn lock_across_fork(&self) -> &mut T {
        spin::MutexGuard::leak(self.spin_then_yield())
    }

    /// Releases a lock taken by `lock_across_fork`.
    ///
    /// # Safety
    /// This process holds the lock through `lock_across_fork` (in the child
    /// of a `fork`, the copy of that hold), and nothing else uses that hold.
    pub(crate) unsafe fn release_after_fork(&self) {
        // SAFETY: per the contract the lock is held and its guard forgotten,
        // so no guard will unlock it again.
        unsafe { self.inner.force_unlock() }
    }
}

impl<T> Deref for LockGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> DerefMut for LockGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

/// Holds a critical section and the value it protects.
#[cfg(all(not(loom), feature = "critical-section"))]
pub(crate) struct CriticalGuard<'a, T> {
    state: critical_section::RestoreState,
    cell: &'a core::cell::UnsafeCell<T>,
}

#[cfg(all(not(loom), feature = "critical-section"))]
impl<T> Deref for CriticalGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the critical section held by `self` excludes every other
        // holder, so no `&mut T` to the cell exists elsewhere.
        unsafe { &*self.cell.get() }
    }
}

#[cfg(all(not(loom), feature = "critical-section"))]
impl<T> DerefMut for CriticalGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference
        // handed out by this guard.
        unsafe { &mut *self.cell.get() }
    }
}

#[cfg(all(not(loom), feature = "critical-section"))]
impl<T> Drop for CriticalGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: `state` came from the `acquire` that opened this section,
        // and this is the only place it is released.
        unsafe { critical_section::release(self.state) }
    }
}

/// Runs `f` under every interleaving loom finds with at most `preemptions`
/// preemptions (`None`: all of them), and insists there were at least
/// `min_runs`: each lock or atomic is a point where loom switches threads,
/// and a model that saw one order would prove nothing. For this crate's
/// loom models, in `src/` and `tests/loom.rs`.
#[cfg(loom)]
#[doc(hidden)]
pub fn loom_model(
    preemptions: Option<usize>,
    min_runs: usize,
    f: impl Fn() + Sync + Send + 'static,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = preemptions;
    builder.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        f()
    });
    let runs = runs.load(Ordering::Relaxed);
    assert!(runs >= min_runs, "only {runs} interleavings explored");
}

/// A count of threads inside the critical sections of a lock that the fork
/// handlers cannot reach (it lives in a value that may move), which they
/// close before a fork instead (see `fork.rs`).
#[cfg(fork_handlers)]
pub(crate) struct ForkGate {
    /// Threads inside, plus `CLOSED`.
    state: AtomicUsize,
}

#[cfg(fork_handlers)]
const CLOSED: usize = 1 << (usize::BITS - 1);

#[cfg(fork_handlers)]
/// Proof of being inside a gate; leaves it when dropped.
pub(crate) struct Pass(&'static ForkGate);

#[cfg(fork_handlers)]
impl ForkGate {
    pub(crate) const fn new() -> Self {
        ForkGate {
            state: AtomicUsize::new(0),
        }
    }

    /// Enters, waiting while a fork is under way. The caller holds no lock
    /// a fork's prepare handler takes after closing this gate.
    pub(crate) fn enter(&'static self) -> Pass {
        loop {
            // Acquire: see what the last thread inside (or the fork) wrote.
            if self.state.fetch_add(1, Ordering::Acquire) & CLOSED == 0 {
                return Pass(self);
            }
            self.state.fetch_sub(1, Ordering::Relaxed);
            while self.state.load(Ordering::Relaxed) & CLOSED != 0 {
                std::thread::yield_now();
            }
        }
    }

    /// Shuts new entrants out and waits for those inside to leave.
    pub(crate) fn close(&self) {
        self.state.fetch_or(CLOSED, Ordering::Acquire);
        // Acquire: pairs with the leavers' release.
        while self.state.load(Ordering::Acquire) != CLOSED {
            std::thread::yield_now();
        }
    }

    /// Lets entrants in again. In the child, the count is zeroed too: it
    /// may include threads of the parent that were backing out.
    pub(crate) fn open(&self, child: bool) {
        if child {
            self.state.store(0, Ordering::Release);
        } else {
            self.state.fetch_and(!CLOSED, Ordering::Release);
        }
    }
}

#[cfg(fork_handlers)]
impl Drop for Pass {
    fn drop(&mut self) {
        // Release: the next fork (and entrant) sees our writes.
        self.0.state.fetch_sub(1, Ordering::Release);
    }
}
