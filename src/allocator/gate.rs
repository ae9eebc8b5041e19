//! The gate in front of the allocator's fast path, and the byte limit's
//! count: the mechanism under `inject.rs`, which arms it (see there).

use super::size_class::SMALL_REQUEST_THRESHOLD;
use super::sync::{loom_const_fn, Lock};
use core::alloc::Layout;
use core::sync::atomic::{AtomicUsize, Ordering};

/// The fast-path bound while nothing is armed: one past the largest small
/// size, so that a request passing it has a small size.
const OPEN: usize = SMALL_REQUEST_THRESHOLD + 1;

/// An allocator's limit, and the gate in front of its fast path.
pub(crate) struct Gate {
    /// Requests whose size is below this take the fast path: `OPEN` while
    /// nothing is armed, 0 while something is.
    pub(crate) below: AtomicUsize,
    /// What is armed: the limit (1 or 0) plus the threads injecting
    /// failures into this allocator. Changed only under this lock, which
    /// also sets `below`.
    pub(crate) armed: Lock<usize>,
    /// The limit; `usize::MAX` for none.
    pub(crate) max: AtomicUsize,
    /// Bytes handed out since the limit was set, less those freed since.
    pub(crate) used: AtomicUsize,
}

impl Gate {
    loom_const_fn! {
        pub(crate) fn new() -> Self {
            Gate {
                below: AtomicUsize::new(OPEN),
                armed: Lock::new(0),
                max: AtomicUsize::new(usize::MAX),
                used: AtomicUsize::new(0),
            }
        }
    }

    /// Whether `layout` may take the fast path: a request of a small size
    /// with nothing armed (the rest goes through the `gated_*` calls). The
    /// alignment is not looked at: one compare is the whole cost, and a
    /// small size with a large alignment, which the front sends to the
    /// backing, needs the gated path only while something is armed, when
    /// every size fails here.
    #[inline(always)]
    pub(crate) fn passes(&self, layout: Layout) -> bool {
        let below = self.below.load(Ordering::Relaxed);
        // SAFETY: `below` is only ever `OPEN` or 0 (see `arm`). Knowing it,
        // the compiler drops the pool path's own small-size test, which
        // this one implies.
        unsafe { core::hint::assert_unchecked(below <= OPEN) };
        layout.size() < below
    }

    /// Whether a limit or an injection is on.
    #[inline]
    pub(crate) fn is_armed(&self) -> bool {
        self.below.load(Ordering::Relaxed) == 0
    }

    pub(crate) fn arm(&self, by: isize) {
        let mut armed = self.armed.lock();
        *armed = armed.wrapping_add_signed(by);
        let below = if *armed == 0 { OPEN } else { 0 };
        self.below.store(below, Ordering::Relaxed);
    }

    /// Takes `bytes` from what is left; false (and nothing taken) if that
    /// would pass the limit. Exact under threads: one compare-and-swap
    /// decides each request.
    pub(crate) fn charge(&self, bytes: usize) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        max == usize::MAX
            || self
                .used
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                    used.checked_add(bytes).filter(|&total| total <= max)
                })
                .is_ok()
    }

    /// Gives `bytes` back (never below zero: a block older than the limit
    /// may be freed under it).
    pub(crate) fn credit(&self, bytes: usize) {
        if self.max.load(Ordering::Relaxed) != usize::MAX {
            let _ = self
                .used
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                    Some(used.saturating_sub(bytes))
                });
        }
    }
}
