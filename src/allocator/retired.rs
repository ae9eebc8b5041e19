//! Retired arenas: wholly free arenas a heap keeps mapped for a while
//! before giving them back, so that a program that frees everything and
//! builds it again (one round of a loop, a request handled, a document
//! parsed and dropped) takes its arenas back without mapping them and
//! touching their pages afresh.
//!
//! An arena no spare rule keeps is stamped with the time it came free and
//! joins its heap's list, newest first. A heap needing an arena takes the
//! newest. The retired arenas go back to the backing, oldest first, once
//! the heap has neither let an arena go nor taken a pool for
//! [`Config::release_delay_ms`](crate::Config::release_delay_ms), or one
//! by one as each reaches `MAX_AGE_IN_DELAYS` delays: on the next visit to
//! the heap or, for a heap no thread visits, the heap set's next sweep
//! (`HeapSet::tend`).
//!
//! The delay counts from the heap's last such event, not each arena's own
//! stamp, because draining and rebuilding take time. serde_json dropping
//! a document of 20,000 records frees arenas for 40 ms, and building the
//! next fills a 16 MiB medium arena before it takes another: with a delay
//! of 10 ms from each arena's stamp, most had gone back before they were
//! needed, and every page of them was faulted in again (66 k faults over
//! four rounds; 23 k, what the peak touches once, when none goes back).
//! While a heap carves pools it is growing into its retired arenas; a heap
//! that has done nothing with its arenas for the delay is the one to give
//! them back. mimalloc delays its purges too (10 ms for pages, ten times
//! that for memory back in its arenas), and likewise needs no thread of
//! its own.
//!
//! The delay needs a clock, which only the backing can have
//! ([`Backing::clock_ms`](super::backing::Backing::clock_ms)): a region
//! has none, and its arenas go back at once, as in CPython, to be carved
//! for large objects.

use super::arena::Arena;
use super::list;
use core::ptr;

/// Delays a retired arena waits at most, however busy its heap: a second
/// at the default delay, so a heap that keeps letting arenas go as it
/// shrinks still gives them back.
const MAX_AGE_IN_DELAYS: usize = 100;

/// A heap's retired arenas: off the usable list, wholly free, mapped.
pub(crate) struct Retired {
    /// The newest, linked through `Arena::next` towards older ones.
    newest: *mut Arena,
    /// The oldest, the next to go back; `Arena::prev` leads to newer ones.
    oldest: *mut Arena,
    /// How many.
    count: usize,
    /// When the heap last retired an arena or took a pool.
    last_event: u32,
}

impl Retired {
    pub(crate) const fn new() -> Self {
        Retired {
            newest: ptr::null_mut(),
            oldest: ptr::null_mut(),
            count: 0,
            last_event: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Retires `arena`, come wholly free at `now` (milliseconds on the
    /// backing's clock).
    ///
    /// # Safety
    /// `arena` is a live record of a wholly free arena, on no list.
    pub(crate) unsafe fn push(&mut self, arena: *mut Arena, now: u32) {
        // SAFETY: per the contract `arena` is live and on no list; the
        // list's members are live records.
        unsafe {
            (*arena).retired_at = now;
            list::push_front(&mut self.newest, arena);
        }
        if self.oldest.is_null() {
            self.oldest = arena;
        }
        self.count += 1;
        self.last_event = now;
    }

    /// Notes that the heap took a pool at `now`.
    pub(crate) fn pool_taken(&mut self, now: u32) {
        self.last_event = now;
    }

    /// The newest retired arena, off the list, or null if there is none.
    pub(crate) fn take_newest(&mut self) -> *mut Arena {
        let arena = self.newest;
        if !arena.is_null() {
            // SAFETY: the newest is on the list.
            unsafe { self.unlink(arena) };
        }
        arena
    }

    /// The oldest retired arena, off the list, if by `now` the heap has
    /// had no arena event for `delay` milliseconds or this one has waited
    /// `MAX_AGE_IN_DELAYS` delays; else null.
    pub(crate) fn take_expired(&mut self, now: u32, delay: usize) -> *mut Arena {
        let oldest = self.oldest;
        if oldest.is_null() {
            return oldest;
        }
        // The clock wraps; the difference of two stamps does not, within
        // 49 days.
        let since = |stamp: u32| now.wrapping_sub(stamp) as usize;
        // SAFETY: list members are live records.
        let age = since(unsafe { (*oldest).retired_at });
        if since(self.last_event) < delay && age < delay.saturating_mul(MAX_AGE_IN_DELAYS) {
            return ptr::null_mut();
        }
        // SAFETY: the oldest is on the list.
        unsafe { self.unlink(oldest) };
        oldest
    }

    /// Takes `arena` off the list, its links cleared.
    ///
    /// # Safety
    /// `arena` is on the list.
    unsafe fn unlink(&mut self, arena: *mut Arena) {
        if arena == self.oldest {
            // SAFETY: list members are live records.
            self.oldest = unsafe { (*arena).prev };
        }
        // SAFETY: per the contract `arena` is on the list, whose members
        // are live.
        unsafe { list::unlink(&mut self.newest, arena) };
        self.count -= 1;
        // SAFETY: as above; it is on no list now.
        unsafe { ((*arena).prev, (*arena).next) = (ptr::null_mut(), ptr::null_mut()) };
    }
}
