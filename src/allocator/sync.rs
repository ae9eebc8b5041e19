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

use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ops::{Deref, DerefMut};

/// A mutual-exclusion lock around `T`.
///
/// * default: a spin lock (`spin`'s `SpinMutex`). Right for hosted programs
///   and for firmware whose interrupt handlers never allocate.
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
    inner: spin::mutex::SpinMutex<T>,
    #[cfg(all(not(loom), feature = "critical-section"))]
    inner: core::cell::UnsafeCell<T>,
}

// SAFETY: every access to the inner value goes through `lock`, which hands out
// one guard at a time (spin lock, loom mutex, or a critical section that
// excludes every other core and interrupt handler); so sharing `Lock<T>`
// between threads only ever moves `T` between them, which `T: Send` allows.
#[cfg(all(not(loom), feature = "critical-section"))]
unsafe impl<T: Send> Sync for Lock<T> {}

/// Proof of holding a [`Lock`] that does not know which lock: the holder
/// keeps the lock's address itself and gives the proof back through
/// [`Lock::unlock_raw`]. For the spin lock it has no size, so a held heap
/// (its slot's address and the backing's) fits in two registers and the
/// locked paths pass it to their out-of-line rest by tail call.
///
/// Dropping one without `unlock_raw` leaves the spin lock held forever.
#[must_use]
pub(crate) struct RawGuard<'a, T> {
    #[cfg(loom)]
    inner: loom::sync::MutexGuard<'a, T>,
    #[cfg(all(not(loom), feature = "critical-section"))]
    state: critical_section::RestoreState,
    held: PhantomData<&'a mut T>,
}

/// Proof of holding a [`Lock`]; releases it when dropped.
pub(crate) struct LockGuard<'a, T> {
    lock: &'a Lock<T>,
    raw: ManuallyDrop<RawGuard<'a, T>>,
}

impl<T> Lock<T> {
    loom_const_fn! {
        /// A lock around `value`.
        pub(crate) fn new(value: T) -> Self {
            Self {
                #[cfg(loom)]
                inner: loom::sync::Mutex::new(value),
                #[cfg(all(not(loom), not(feature = "critical-section")))]
                inner: spin::mutex::SpinMutex::new(value),
                #[cfg(all(not(loom), feature = "critical-section"))]
                inner: core::cell::UnsafeCell::new(value),
            }
        }
    }

    /// Waits until the lock is free, then holds it.
    pub(crate) fn lock(&self) -> LockGuard<'_, T> {
        self.guard(self.lock_raw())
    }

    /// Holds the lock if it is free now; `None` if another holder has it.
    pub(crate) fn try_lock(&self) -> Option<LockGuard<'_, T>> {
        Some(self.guard(self.try_lock_raw()?))
    }

    fn guard<'a>(&'a self, raw: RawGuard<'a, T>) -> LockGuard<'a, T> {
        LockGuard {
            lock: self,
            raw: ManuallyDrop::new(raw),
        }
    }

    /// `lock`, with the proof of holding it kept apart from the lock.
    pub(crate) fn lock_raw(&self) -> RawGuard<'_, T> {
        RawGuard {
            #[cfg(loom)]
            inner: self.inner.lock().unwrap(),
            #[cfg(all(not(loom), not(feature = "critical-section")))]
            held: self.spin_then_yield(),
            #[cfg(all(not(loom), feature = "critical-section"))]
            // SAFETY: `unlock_raw` runs the matching `release` with this
            // state exactly once (it consumes the raw guard), and nested holds
            // end innermost first: one the crate takes while holding another
            // ends before it, in that call or in one it makes.
            state: unsafe { critical_section::acquire() },
            #[cfg(any(loom, feature = "critical-section"))]
            held: PhantomData,
        }
    }

    /// `try_lock`, with the proof of holding it kept apart from the lock.
    /// A critical section is never held by anyone else while we run, so
    /// there it always succeeds.
    #[inline(always)]
    pub(crate) fn try_lock_raw(&self) -> Option<RawGuard<'_, T>> {
        #[cfg(loom)]
        return Some(RawGuard {
            inner: self.inner.try_lock().ok()?,
            held: PhantomData,
        });
        #[cfg(all(not(loom), not(feature = "critical-section")))]
        {
            // The guard's `&mut T` goes: `get` reaches the value through the
            // lock's pointer instead.
            spin::mutex::SpinMutexGuard::leak(self.inner.try_lock()?);
            Some(RawGuard { held: PhantomData })
        }
        #[cfg(all(not(loom), feature = "critical-section"))]
        return Some(self.lock_raw());
    }

    /// The value under the lock that `raw` holds.
    ///
    /// # Safety
    /// `raw` was returned by this lock's `lock_raw` or `try_lock_raw`.
    #[inline(always)]
    pub(crate) unsafe fn get<'g>(&'g self, raw: &'g RawGuard<'_, T>) -> &'g T {
        #[cfg(loom)]
        return &raw.inner;
        #[cfg(not(loom))]
        {
            let _ = raw;
            // SAFETY: per the contract this lock is held, and shared
            // borrows of `raw` are all that hand out references to the
            // value meanwhile.
            unsafe { &*self.value_ptr() }
        }
    }

    /// `get`, mutably.
    ///
    /// # Safety
    /// As for `get`.
    #[inline(always)]
    pub(crate) unsafe fn get_mut<'g>(&'g self, raw: &'g mut RawGuard<'_, T>) -> &'g mut T {
        #[cfg(loom)]
        return &mut raw.inner;
        #[cfg(not(loom))]
        {
            let _ = raw;
            // SAFETY: per the contract this lock is held, and the borrow of
            // `raw`, the one proof of it, is exclusive for as long as the
            // reference lives.
            unsafe { &mut *self.value_ptr() }
        }
    }

    /// Releases the lock `raw` holds.
    ///
    /// # Safety
    /// `raw` was returned by this lock's `lock_raw` or `try_lock_raw`.
    #[inline(always)]
    pub(crate) unsafe fn unlock_raw(&self, raw: RawGuard<'_, T>) {
        #[cfg(loom)]
        drop(raw);
        #[cfg(all(not(loom), not(feature = "critical-section")))]
        // SAFETY: per the contract the lock is held, by `raw`, whose leaked
        // guard will never unlock it again, and `raw` is given up here.
        unsafe {
            let _ = raw;
            self.inner.force_unlock()
        }
        #[cfg(all(not(loom), feature = "critical-section"))]
        // SAFETY: per the contract `raw.state` came from the `acquire` that
        // opened this section, and the section is closed once, here.
        unsafe {
            critical_section::release(raw.state)
        }
    }

    #[cfg(not(loom))]
    #[inline(always)]
    fn value_ptr(&self) -> *mut T {
        #[cfg(not(feature = "critical-section"))]
        return self.inner.as_mut_ptr();
        #[cfg(feature = "critical-section")]
        return self.inner.get();
    }

    /// Waits for the spin lock: a few spins for a holder that is about to
    /// leave, then, with `std`, yields between looks, so that on a machine
    /// with more threads than cores a waiter does not burn the time slice
    /// its preempted holder needs to finish.
    #[cfg(all(not(loom), not(feature = "critical-section")))]
    fn spin_then_yield(&self) -> PhantomData<&mut T> {
        let mut looks = 0u32;
        loop {
            if let Some(guard) = self.inner.try_lock() {
                spin::mutex::SpinMutexGuard::leak(guard);
                return PhantomData;
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
}

/// The two halves of holding a lock across `fork`, for the atfork handlers
/// (which take a lock in one call and release it in another).
#[cfg(fork_handlers)]
impl<T> Lock<T> {
    /// Waits for the lock and keeps it held after returning; the value,
    /// for the caller to read, stays as it is until `release_after_fork`.
    pub(crate) fn lock_across_fork(&self) -> &T {
        let _ = self.spin_then_yield();
        // SAFETY: the lock is held, and with its proof dropped nothing
        // writes the value until the release.
        unsafe { &*self.value_ptr() }
    }

    /// Releases a lock taken by `lock_across_fork`.
    ///
    /// # Safety
    /// This process holds the lock through `lock_across_fork` (in the child
    /// of a `fork`, the copy of that hold), and nothing else uses that hold.
    pub(crate) unsafe fn release_after_fork(&self) {
        // SAFETY: per the contract the lock is held and its proof dropped,
        // so nothing will unlock it again.
        unsafe { self.inner.force_unlock() }
    }
}

impl<T> Deref for LockGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `raw` came from this guard's lock.
        unsafe { self.lock.get(&self.raw) }
    }
}

impl<T> DerefMut for LockGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: `raw` came from this guard's lock.
        unsafe { self.lock.get_mut(&mut self.raw) }
    }
}

impl<T> Drop for LockGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: `raw` came from this guard's lock, and is taken once, here.
        unsafe { self.lock.unlock_raw(ManuallyDrop::take(&mut self.raw)) }
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
