//! `fork()` in a multithreaded program: `pthread_atfork` handlers that take
//! every allocator lock before the fork and release them on both sides, so
//! that the child never inherits a lock held by a thread it does not have.
//!
//! * **Reaching the locks.** Allocators are values (several, moved,
//!   dropped), but their heap sets stay put: every set is on one global
//!   list (kept in `heap_set.rs`), whose links live in the sets
//!   themselves, so the handlers reach each heap's lock without
//!   allocating. The thread-cache registry, which also holds the lists of
//!   bound caches, is a `static`.
//! * **Locks in values that may move** (a [`Region`](crate::Region)'s
//!   store, the debug feature's list of large blocks) cannot be listed by
//!   address. Their holders pass a `ForkGate` (`sync.rs`) instead: a count
//!   of threads inside, which the prepare handler closes and waits to
//!   drain.
//! * **Order.** The handlers take the locks in the order the allocator
//!   nests them: the large-block gate (its holders then take heap locks),
//!   the list of sets, every heap, the cache registry, and last the region
//!   gate (taken under a heap lock to get an arena).
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

use super::backing::REGION_GATE;
#[cfg(feature = "debug")]
use super::debug::LARGE_GATE;
use super::heap_set::{for_each_set, HeapSet, SETS};
use super::sync::{AtomicPtr, AtomicUsize, Ordering};
#[cfg(thread_cache)]
use super::thread_cache;
use core::ffi::c_int;
use core::ptr;

extern "C" {
    fn pthread_atfork(
        prepare: Option<unsafe extern "C" fn()>,
        parent: Option<unsafe extern "C" fn()>,
        child: Option<unsafe extern "C" fn()>,
    ) -> c_int;
}

/// The first listed set, as the prepare handler found it: the list cannot
/// change until the handlers release [`SETS`].
static FIRST: AtomicPtr<HeapSet> = AtomicPtr::new(ptr::null_mut());

/// 0: no handlers yet; 1: being registered; 2: registered (or refused).
static HANDLERS: AtomicUsize = AtomicUsize::new(0);

/// Registers the atfork handlers, once, before any lock they take can be
/// held. Called where no allocator lock is held (a set's creation, a gate's
/// entry: a gate entered under a heap lock finds them registered, since
/// that heap's set registered them first). If `pthread_atfork` fails (out
/// of memory), forks go without, as they did before.
pub(crate) fn ensure_handlers() {
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
    LARGE_GATE.close();
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
        thread_cache::registry_lock_across_fork();
    }
    REGION_GATE.close();
}

/// Releases what `prepare` took, in reverse order.
///
/// # Safety
/// `prepare` ran in this process (or the parent of this child) and nothing
/// released its locks since.
unsafe fn release_all(child: bool) {
    REGION_GATE.open(child);
    let first = FIRST.load(Ordering::Relaxed);
    // SAFETY: per the contract, each lock below is held by `prepare`'s
    // forgotten guards, `SETS` included until its release last, so the
    // list is the one `prepare` walked.
    unsafe {
        #[cfg(thread_cache)]
        {
            thread_cache::registry_release_after_fork();
        }
        for_each_set(first, |set| {
            set.heap_locks().for_each(|lock| lock.release_after_fork())
        });
        SETS.release_after_fork();
    }
    #[cfg(feature = "debug")]
    LARGE_GATE.open(child);
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
        thread_cache::keep_only_this_thread();
    }
}
