//! Out of memory from the backing: every failure is a null, the heap stays
//! consistent, and it recovers when memory comes back.

use pymalloc::{Backing, Config, PyMalloc};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, refusing every request once `budget` runs out.
struct Failing {
    budget: AtomicUsize,
    refused: AtomicUsize,
}

impl Failing {
    fn take(&self) -> bool {
        let ok = self
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .is_ok();
        if !ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }
}

// SAFETY: forwards to the system allocator or answers null.
unsafe impl Backing for Failing {
    fn alloc(&self, layout: Layout) -> *mut u8 {
        if !self.take() {
            return std::ptr::null_mut();
        }
        // SAFETY: the heap never asks for zero bytes.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[test]
fn failures_are_nulls_and_the_heap_recovers() {
    for budget in 0..12 {
        let heap = PyMalloc::with_backing(
            Failing {
                budget: AtomicUsize::new(budget),
                refused: AtomicUsize::new(0),
            },
            Config::SMALL,
        );
        let mut live = Vec::new();
        let mut nulls = 0;
        for i in 0..3000usize {
            let size = if i % 10 == 0 { 600 + i } else { 1 + i % 512 };
            let layout = Layout::from_size_align(size, 8).unwrap();
            // SAFETY: non-zero size.
            let p = unsafe { heap.alloc(layout) };
            if p.is_null() {
                nulls += 1;
            } else {
                // SAFETY: the block has `size` bytes.
                unsafe { p.write_bytes(i as u8, size) };
                live.push((p, layout, i as u8));
            }
        }
        assert!(nulls > 0 && heap.backing().refused.load(Ordering::Relaxed) > 0);
        let stats = heap.stats();
        assert_eq!(stats.accounted_arena_bytes(), stats.arena_bytes());
        assert_eq!(stats.live_allocations(), live.len());
        // Memory comes back: the same requests now succeed.
        heap.backing().budget.store(usize::MAX, Ordering::Relaxed);
        for i in 0..3000usize {
            let layout = Layout::from_size_align(1 + i % 512, 8).unwrap();
            // SAFETY: non-zero size.
            let p = unsafe { heap.alloc(layout) };
            assert!(!p.is_null());
            live.push((p, layout, 0));
            // SAFETY: the block has `layout.size()` bytes.
            unsafe { p.write_bytes(0, layout.size()) };
        }
        for (p, layout, fill) in live {
            // SAFETY: live blocks written above.
            let bytes = unsafe { std::slice::from_raw_parts(p, layout.size()) };
            assert!(bytes.iter().all(|&b| b == fill));
            // SAFETY: freed once with its layout.
            unsafe { heap.dealloc(p, layout) };
        }
        let stats = heap.stats();
        assert_eq!(stats.live_allocations(), 0);
        assert!(stats.arenas_current <= 1);
    }
}
