//! `fork()` in a multithreaded program: `pthread_atfork` handlers that take
//! every allocator lock before the fork and release them on both sides, so
//! that the child never inherits a lock held by a thread it does not have.
//!
//! * **Reaching the locks.** Allocators are values (several, moved,
//!   dropped), but their heap sets stay put: every set is on one global
//!   list ([`enlist`] at creation, [`delist`] before destruction), whose
//!   links live in the sets themselves, so the handlers reach each heap's
//!   lock and each set's cache list without allocating. The thread-cache
//!   registry is a `static`.
//! * **Locks in values that may move** (a [`Region`](crate::Region)'s
//!   store, the debug feature's list of large blocks) cannot be listed by
//!   address. Their holders pass a [`Gate`] instead: a count of threads
//!   inside, which the prepare handler closes and waits to drain.
//! * **Order.** The handlers take the locks in the order the allocator
//!   nests them: the large-block gate (its holders then take heap locks),
//!   the list of sets, every heap, the cache registry, every cache list,
//!   and last the region gate (taken under a heap lock to get an arena).
//! * **The child** has one thread, the one that forked. Its thread cache is
//!   intact. The other threads' caches are unlinked from their lists and
//!   never touched again: their memory may be reused for the child's new
//!   threads, and what they held at the fork cannot be told apart from
//!   blocks they were handing out. Their blocks stay in use, leaked, as
//!   glibc leaks the dead threads' tcaches; the bytes requested through them
//!   move to their set's count, so `requested_bytes` still adds up.
//! * Blocks another thread pushed to an inbox while the handlers held its
//!   heap wait there for the heap's next holder (or `stats()`), since the
//!   handlers, knowing no backing, cannot free them.

use crate::heaps::HeapSet;
use crate::sync::{AtomicPtr, AtomicUsize, Lock, Ordering};
use core::ffi::c_int;
use core::ptr;

extern "C" {
    fn pthread_atfork(
        prepare: Option<unsafe extern "C" fn()>,
        parent: Option<unsafe extern "C" fn()>,
        child: Option<unsafe extern "C" fn()>,
    ) -> c_int;
}

/// A heap set's place on the global list; changed only under [`SETS`].
pub(crate) struct Links {
    prev: AtomicPtr<HeapSet>,
    next: AtomicPtr<HeapSet>,
}

impl Links {
    pub(crate) const fn new() -> Self {
        Links {
            prev: AtomicPtr::new(ptr::null_mut()),
            next: AtomicPtr::new(ptr::null_mut()),
        }
    }
}

/// The first set of the global list.
struct Sets {
    first: *mut HeapSet,
}

// SAFETY: the pointer is only followed under the lock, to sets that stay
// alive until they leave the list under it.
unsafe impl Send for Sets {}

static SETS: Lock<Sets> = Lock::new(Sets {
    first: ptr::null_mut(),
});

/// Puts a new set on the global list (and registers the handlers, once).
///
/// # Safety
/// `set` is initialised, on no list, and stays alive until [`delist`]ed.
pub(crate) unsafe fn enlist(set: *mut HeapSet) {
    ensure_handlers();
    let mut sets = SETS.lock();
    // SAFETY: `set` is alive (contract) and so is the first set (listed).
    unsafe {
        (*set).fork.prev.store(ptr::null_mut(), Ordering::Relaxed);
        (*set).fork.next.store(sets.first, Ordering::Relaxed);
        if let Some(first) = sets.first.as_ref() {
            first.fork.prev.store(set, Ordering::Relaxed);
        }
    }
    sets.first = set;
}

/// Takes a set off the global list.
///
/// # Safety
/// `set` was [`enlist`]ed and not delisted since.
pub(crate) unsafe fn delist(set: *mut HeapSet) {
    let mut sets = SETS.lock();
    // SAFETY: `set` and its neighbours are listed, hence alive; we hold the
    // list's lock.
    unsafe {
        let prev = (*set).fork.prev.load(Ordering::Relaxed);
        let next = (*set).fork.next.load(Ordering::Relaxed);
        match prev.as_ref() {
            Some(prev) => prev.fork.next.store(next, Ordering::Relaxed),
            None => sets.first = next,
        }
        if let Some(next) = next.as_ref() {
            next.fork.prev.store(prev, Ordering::Relaxed);
        }
    }
}

/// The first listed set, as the prepare handler found it: the list cannot
/// change until the handlers release [`SETS`].
static FIRST: AtomicPtr<HeapSet> = AtomicPtr::new(ptr::null_mut());

/// Calls `f` on every set of the list starting at `set`.
///
/// # Safety
/// `set` is the first of the list, and its lock is held from before the
/// read of `set` until after this call.
unsafe fn for_each_set(mut set: *mut HeapSet, mut f: impl FnMut(&HeapSet)) {
    // SAFETY: with the lock held the list is stable and its sets alive.
    while let Some(s) = unsafe { set.as_ref() } {
        f(s);
        set = s.fork.next.load(Ordering::Relaxed);
    }
}

/// Threads inside the critical sections of one kind of lock that cannot be
/// listed, and whether a fork is shutting them out.
pub(crate) struct Gate {
    /// Threads inside, plus `CLOSED`.
    state: AtomicUsize,
}

const CLOSED: usize = 1 << (usize::BITS - 1);

/// Around every use of a `Region`'s store.
pub(crate) static REGION: Gate = Gate::new();
/// Around every use of the debug feature's list of large blocks.
#[cfg(feature = "debug")]
pub(crate) static LARGE: Gate = Gate::new();

/// Proof of being inside a gate; leaves it when dropped.
pub(crate) struct Pass(&'static Gate);

impl Gate {
    const fn new() -> Self {
        Gate {
            state: AtomicUsize::new(0),
        }
    }

    /// Enters, waiting while a fork is under way. The caller holds no lock
    /// a fork's prepare handler takes after closing this gate.
    pub(crate) fn enter(&'static self) -> Pass {
        ensure_handlers();
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
    fn close(&self) {
        self.state.fetch_or(CLOSED, Ordering::Acquire);
        // Acquire: pairs with the leavers' release.
        while self.state.load(Ordering::Acquire) != CLOSED {
            std::thread::yield_now();
        }
    }

    /// Lets entrants in again. In the child, the count is zeroed too: it
    /// may include threads of the parent that were backing out.
    fn open(&self, child: bool) {
        if child {
            self.state.store(0, Ordering::Release);
        } else {
            self.state.fetch_and(!CLOSED, Ordering::Release);
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        // Release: the next fork (and entrant) sees our writes.
        self.0.state.fetch_sub(1, Ordering::Release);
    }
}

/// 0: no handlers yet; 1: being registered; 2: registered (or refused).
static HANDLERS: AtomicUsize = AtomicUsize::new(0);

/// Registers the atfork handlers, once, before any lock they take can be
/// held. Called where no allocator lock is held (a set's creation, a gate's
/// entry: a gate entered under a heap lock finds them registered, since
/// that heap's set registered them first). If `pthread_atfork` fails (out
/// of memory), forks go without, as they did before.
fn ensure_handlers() {
    if HANDLERS.load(Ordering::Acquire) == 2 {
        return;
    }
    if HANDLERS
        .compare_exchange(0, 1, Ordering::Acquire, Ordering::Acquire)
        .is_ok()
    {
        // SAFETY: the handlers are `extern "C"` functions that never unwind
        // and live as long as the program.
        unsafe { pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        HANDLERS.store(2, Ordering::Release);
        return;
    }
    // Another thread is registering: a lock taken before it finishes would
    // be unprotected by the next fork.
    while HANDLERS.load(Ordering::Acquire) != 2 {
        std::thread::yield_now();
    }
}

/// Before `fork`: takes every lock, in the allocator's nesting order.
unsafe extern "C" fn prepare() {
    #[cfg(feature = "debug")]
    LARGE.close();
    let first = SETS.lock_across_fork().first;
    FIRST.store(first, Ordering::Relaxed);
    // SAFETY: `SETS` is held until `release_all`.
    unsafe {
        for_each_set(first, |set| {
            set.heap_locks().for_each(|lock| {
                lock.lock_across_fork();
            })
        })
    };
    #[cfg(thread_cache)]
    {
        crate::thread_cache::registry_lock_across_fork();
        // SAFETY: as above.
        unsafe { for_each_set(first, |set| set.caches.lock_across_fork()) };
    }
    REGION.close();
}

/// Releases what `prepare` took, in reverse order.
///
/// # Safety
/// `prepare` ran in this process (or the parent of this child) and nothing
/// released its locks since.
unsafe fn release_all(child: bool) {
    REGION.open(child);
    let first = FIRST.load(Ordering::Relaxed);
    // SAFETY: per the contract, each lock below is held by `prepare`'s
    // forgotten guards, `SETS` included until its release last, so the
    // list is the one `prepare` walked.
    unsafe {
        #[cfg(thread_cache)]
        {
            for_each_set(first, |set| set.caches.release_after_fork());
            crate::thread_cache::registry_release_after_fork();
        }
        for_each_set(first, |set| {
            set.heap_locks().for_each(|lock| lock.release_after_fork())
        });
        SETS.release_after_fork();
    }
    #[cfg(feature = "debug")]
    LARGE.open(child);
}

/// After `fork`, in the parent.
unsafe extern "C" fn parent() {
    // SAFETY: `prepare` ran just before the fork.
    unsafe { release_all(false) }
}

/// After `fork`, in the child: releases everything, then (the child has no
/// other thread to race with) takes the dead threads' caches off their
/// lists.
unsafe extern "C" fn child() {
    // SAFETY: `prepare` ran just before the fork.
    unsafe { release_all(true) };
    #[cfg(thread_cache)]
    {
        let sets = SETS.lock();
        // SAFETY: `SETS` is held for the whole walk.
        unsafe { for_each_set(sets.first, |set| set.caches.keep_only_this_thread(set)) };
    }
}
