//! A heap's shelf: per small class, the blocks last freed into the heap
//! when no thread cache serves its allocator, handed out again before any
//! pool is touched.
//!
//! Without caches (no `std`, a region under 32 MiB,
//! `Config::with_thread_caches(false)`) every call takes a heap's lock, and
//! CPython's path then reads and writes the block's pool header on every
//! free and relinks a pool each time one fills or empties. Among 10k live
//! blocks of random classes those headers miss the cache: a probe's churn
//! ran at 2.5× the cached path, against 1.13× for a bare spin lock around
//! one free list per class. The shelf is that list, kept in the heap under
//! its lock: a free pushes the block, an allocation pops one, and pools
//! see only the overflow.
//!
//! What it may hold is bounded so that a small region does not lose to it
//! the blocks another class needs: a class's shelf holds at most a pool's
//! bytes (4 KiB at most, 1 KiB in the small regions' geometry), and when full, half of it goes back to the pools. Everything on
//! it goes back before an allocation returns null, before the backing is
//! asked for spare arenas, and when `stats()` looks, so a null still means
//! the memory is gone and the statistics still count what a program holds.

use super::pool::FreeBlock;
use super::size_class::{class_size, CLASS_COUNT};
use core::ptr;

/// Most bytes one class's shelf holds, whatever the pool size (larger
/// pools would only pin more).
const MAX_SHELF_BYTES: usize = 4096;

// A shelf's length fits its counter even in the smallest class.
static_assertions::const_assert!(MAX_SHELF_BYTES / class_size(0) <= u16::MAX as usize);

/// Per small class, a LIFO list of free blocks and its length.
pub(crate) struct Shelf {
    heads: [*mut FreeBlock; CLASS_COUNT],
    lens: [u16; CLASS_COUNT],
    /// Bytes one class's shelf may hold.
    bytes: usize,
}

impl Shelf {
    /// An empty shelf for pools of `pool_size` bytes.
    pub(crate) const fn new(pool_size: usize) -> Self {
        Shelf {
            heads: [ptr::null_mut(); CLASS_COUNT],
            lens: [0; CLASS_COUNT],
            bytes: if pool_size < MAX_SHELF_BYTES {
                pool_size
            } else {
                MAX_SHELF_BYTES
            },
        }
    }

    /// The newest block of `class`'s shelf, taken off it; null if empty.
    ///
    /// # Safety
    /// The shelf's blocks are free blocks no one else uses (as `put` makes
    /// them).
    #[inline]
    pub(crate) unsafe fn take(&mut self, class: usize) -> *mut FreeBlock {
        let block = self.heads[class];
        if !block.is_null() {
            // SAFETY: per the contract the block is free and ours, linked
            // through its first word by `put`.
            self.heads[class] = unsafe { FreeBlock::next(block) };
            self.lens[class] -= 1;
        }
        block
    }

    /// Whether `class`'s shelf holds its bytes already, so that a free
    /// must first send some back. A multiply, not a division: this is on
    /// every free.
    #[inline]
    pub(crate) fn is_full(&self, class: usize) -> bool {
        (self.lens[class] as usize + 1) * class_size(class) > self.bytes
    }

    /// Blocks on `class`'s shelf.
    pub(crate) fn len(&self, class: usize) -> usize {
        self.lens[class] as usize
    }

    /// Puts `block` on `class`'s shelf, which is not full (`is_full`).
    ///
    /// # Safety
    /// `block` is a free block of at least `class`'s size that no one else
    /// uses, not on the shelf.
    #[inline]
    pub(crate) unsafe fn put(&mut self, class: usize, block: *mut FreeBlock) {
        // SAFETY: per the contract the block is ours to link.
        unsafe { FreeBlock::set_next(block, self.heads[class]) };
        self.heads[class] = block;
        self.lens[class] += 1;
    }
}
