//! The lifetimes around per-thread caches: blocks cached by a thread that
//! exits go back, blocks cached by a live thread count as free, a dropped
//! allocator is forgotten by every cache that served it, and a moved one
//! keeps being served. Without thread caches (`THREAD_CACHES` false) the
//! same programs must give the same answers, less the cached counts.
#![cfg(feature = "std")]

use pymalloc::{Config, PyMalloc, THREAD_CACHES};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::mpsc;
use std::thread;

fn layout() -> Layout {
    Layout::from_size_align(40, 8).unwrap()
}

/// Allocates `n` blocks from `heap` and frees them all, newest first.
fn churn(heap: &PyMalloc, n: usize) {
    cycle(heap, layout(), n, 1);
}

/// Allocates `n` blocks of `layout` from `heap`, then frees them all,
/// newest first, `rounds` times over.
fn cycle(heap: &PyMalloc, layout: Layout, n: usize, rounds: usize) {
    for _ in 0..rounds {
        // SAFETY: non-zero size; each block is freed once, with its layout.
        let blocks: Vec<*mut u8> = (0..n).map(|_| unsafe { heap.alloc(layout) }).collect();
        assert!(blocks.iter().all(|b| !b.is_null()));
        for &block in blocks.iter().rev() {
            // SAFETY: as above.
            unsafe { heap.dealloc(block, layout) };
        }
    }
}

#[test]
fn a_live_threads_cached_blocks_count_as_free_and_go_back_when_it_exits() {
    static HEAP: PyMalloc = PyMalloc::system();
    let (done, wait) = mpsc::channel::<()>();
    let (ready, is_ready) = mpsc::channel::<()>();
    let worker = thread::spawn(move || {
        churn(&HEAP, 1000);
        ready.send(()).unwrap();
        wait.recv().unwrap();
    });
    is_ready.recv().unwrap();
    let stats = HEAP.stats();
    assert_eq!(stats.live_allocations(), 0);
    assert_eq!(stats.requested_bytes, 0);
    assert_eq!(stats.accounted_arena_bytes(), stats.arena_bytes());
    assert_eq!(stats.cached_blocks > 0, THREAD_CACHES, "{stats}");
    done.send(()).unwrap();
    worker.join().unwrap();
    let stats = HEAP.stats();
    assert_eq!((stats.live_allocations(), stats.cached_blocks), (0, 0));
    assert_eq!(
        stats.classes[4].pools, 0,
        "every pool of the class is empty"
    );
    assert!(stats.arenas_current <= 1, "{stats}");
}

#[test]
fn an_allocator_configured_without_caches_keeps_every_free_block_in_its_pools() {
    let uncached = PyMalloc::system_with(Config::DEFAULT.with_thread_caches(false));
    let cached = PyMalloc::system();
    assert!(!uncached.config().thread_caches());
    let (done, wait) = mpsc::channel::<()>();
    let (ready, is_ready) = mpsc::channel::<()>();
    let (uncached, cached) = (&uncached, &cached);
    // Read while the thread lives (its cache holds what it holds), checked
    // once it has gone, so that a failed check cannot leave it waiting.
    let (without, with) = thread::scope(|scope| {
        scope.spawn(move || {
            churn(uncached, 1000);
            churn(cached, 1000);
            ready.send(()).unwrap();
            let _ = wait.recv();
        });
        is_ready.recv().unwrap();
        let seen = (uncached.stats(), cached.stats());
        done.send(()).unwrap();
        seen
    });
    assert_eq!((without.live_allocations(), without.cached_blocks), (0, 0));
    assert_eq!(without.accounted_arena_bytes(), without.arena_bytes());
    // The same calls on the default configuration leave blocks cached:
    // the switch, not the workload, made the difference.
    assert_eq!(with.cached_blocks > 0, THREAD_CACHES, "{with}");
}

/// A thread caches blocks of a fresh allocator, then waits while the
/// allocator is dropped and `meanwhile` runs here; then it runs `then` and
/// exits, its cache still naming the dropped allocator. Returns what
/// `meanwhile` returned.
fn drop_while_a_thread_caches<R>(
    meanwhile: impl FnOnce() -> R,
    then: impl FnOnce() + Send + 'static,
) -> R {
    let heap: &'static PyMalloc = Box::leak(Box::new(PyMalloc::system()));
    let (go, wait) = mpsc::channel::<()>();
    let (cached, is_cached) = mpsc::channel::<()>();
    let worker = thread::spawn(move || {
        churn(heap, 500);
        cached.send(()).unwrap();
        wait.recv().unwrap();
        then();
    });
    is_cached.recv().unwrap();
    // SAFETY: the box leaked above is ours again: the worker no longer uses
    // `heap` (it waits, then uses other allocators), and no block of it is
    // live (the cached ones are free).
    unsafe { drop(Box::from_raw(std::ptr::from_ref(heap).cast_mut())) };
    let result = meanwhile();
    go.send(()).unwrap();
    worker.join().unwrap();
    result
}

#[test]
fn a_cache_serving_one_allocator_leaves_another_to_the_shared_heaps() {
    let first = PyMalloc::system();
    let second = PyMalloc::system();
    thread::scope(|scope| {
        // Joined by hand: the end of a scope waits for the closure only, and
        // the thread's cache goes back later, with its thread locals.
        scope
            .spawn(|| {
                churn(&first, 500);
                churn(&second, 500);
                churn(&first, 500);
            })
            .join()
            .unwrap();
    });
    for heap in [&first, &second] {
        let stats = heap.stats();
        assert_eq!((stats.live_allocations(), stats.cached_blocks), (0, 0));
        assert_eq!(stats.accounted_arena_bytes(), stats.arena_bytes());
    }
}

#[test]
fn a_dropped_allocator_is_forgotten_by_the_caches_that_served_it() {
    drop_while_a_thread_caches(
        || (),
        || {
            // This thread's cache still names the first allocator, now gone
            // with its arenas: the second must not be handed the old blocks,
            // and must be served all the same.
            let second = PyMalloc::system();
            churn(&second, 500);
            // SAFETY: non-zero size; freed below.
            let kept = unsafe { second.alloc(layout()) };
            let stats = second.stats();
            assert_eq!(stats.live_allocations(), 1);
            let pools: usize = stats.classes.iter().map(|c| c.pools).sum();
            assert_eq!(pools, 1, "one pool, of the second's own");
            assert_eq!(stats.accounted_arena_bytes(), stats.arena_bytes());
            // SAFETY: allocated above with this layout.
            unsafe { second.dealloc(kept, layout()) };
        },
    );
}

#[test]
fn an_allocator_dropped_while_a_thread_caches_its_blocks_is_never_touched() {
    let other = PyMalloc::system();
    // Memory the dropped allocator released is reused at once, so that a
    // stray write by the exiting thread (whose cache names the dropped
    // allocator) would corrupt live data.
    let blocks = drop_while_a_thread_caches(
        || {
            (0..5000)
                .map(|i| {
                    // SAFETY: non-zero size; freed below.
                    let b = unsafe { other.alloc(layout()) };
                    // SAFETY: a fresh block of 40 bytes.
                    unsafe { b.write_bytes(i as u8, 40) };
                    b as usize
                })
                .collect::<Vec<usize>>()
        },
        || (),
    );
    for (i, &b) in blocks.iter().enumerate() {
        // SAFETY: live blocks of 40 bytes, freed once.
        unsafe {
            let b = b as *mut u8;
            assert!(std::slice::from_raw_parts(b, 40)
                .iter()
                .all(|&x| x == i as u8));
            other.dealloc(b, layout());
        }
    }
}

#[test]
fn a_moved_allocator_keeps_its_thread_cache() {
    let heap = PyMalloc::system();
    churn(&heap, 300);
    let moved = Box::new(heap);
    churn(&moved, 300);
    let stats = moved.stats();
    assert_eq!((stats.live_allocations(), stats.cached_blocks), (0, 0));
    assert_eq!(stats.accounted_arena_bytes(), stats.arena_bytes());
}

#[test]
fn a_thread_locals_destructor_allocating_at_exit_leaves_nothing_behind() {
    static HEAP: PyMalloc = PyMalloc::system();
    /// Churns `HEAP` when its thread exits: before or after the cache is
    /// handed back, depending on the exit hook and the registration order.
    struct AtExit;
    impl Drop for AtExit {
        fn drop(&mut self) {
            churn(&HEAP, 300);
        }
    }
    thread_local! {
        static AT_EXIT: AtExit = const { AtExit };
    }
    for first in [true, false] {
        thread::spawn(move || {
            if first {
                AT_EXIT.with(|_| ());
            }
            churn(&HEAP, 500);
            AT_EXIT.with(|_| ());
        })
        .join()
        .unwrap();
        let stats = HEAP.stats();
        assert_eq!((stats.live_allocations(), stats.cached_blocks), (0, 0));
        assert_eq!(stats.requested_bytes, 0);
        assert_eq!(stats.accounted_arena_bytes(), stats.arena_bytes());
    }
}

/// `size` bytes, aligned to 8.
fn bytes(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// A list that sends blocks back and fetches them again, round after
/// round, grows until it holds the round (one list of 256-byte blocks
/// starts at 32, and a refill of a grown list fetches half of it); four
/// classes of 448 to 512 bytes cycling 900 blocks each in turn (1.7 MB a
/// round, less than the arenas whose release would send the cache
/// straight) grow within the cache's budget (1 MiB, about 2,300 such
/// blocks); the first list, cycling again, takes the budget back from
/// them; and a drain (`stats()` on the thread) takes the lists back to
/// their starting capacities.
#[test]
fn a_list_cycling_more_blocks_than_it_holds_grows_within_a_budget() {
    static HEAP: PyMalloc = PyMalloc::system();
    let (step, next) = mpsc::channel::<()>();
    let (read, to_read) = mpsc::channel::<()>();
    let worker = thread::spawn(move || {
        cycle(&HEAP, bytes(256), 2000, 10);
        read.send(()).unwrap();
        next.recv().unwrap();
        for _ in 0..10 {
            for size in [448, 480, 504, 512] {
                cycle(&HEAP, bytes(size), 900, 1);
            }
        }
        read.send(()).unwrap();
        next.recv().unwrap();
        cycle(&HEAP, bytes(256), 2000, 10);
        read.send(()).unwrap();
        next.recv().unwrap();
        HEAP.stats();
        cycle(&HEAP, bytes(256), 2000, 1);
        read.send(()).unwrap();
        next.recv().unwrap();
    });
    // Read here, which leaves the worker's cache alone.
    let mut cached = Vec::new();
    for _ in 0..4 {
        to_read.recv().unwrap();
        cached.push(HEAP.stats().cached_blocks);
        step.send(()).unwrap();
    }
    worker.join().unwrap();
    if !THREAD_CACHES {
        assert_eq!(cached, [0; 4]);
        return;
    }
    // At least the round, at most the list's doubled capacity.
    assert!(
        (2000..=8192).contains(&cached[0]),
        "{} blocks cached: the 256-byte list should hold the round",
        cached[0]
    );
    // Grown, within the budget and the starting capacities (8 KiB each).
    assert!(
        (500..=((1 << 20) + 4 * 8192) / 448).contains(&cached[1]),
        "{} blocks cached after cycling 4 × 900",
        cached[1]
    );
    // The 256-byte list grows again, and the four keep no more than their
    // starting capacities (18 blocks or fewer each).
    assert!(
        (2000..=4096 + 4 * 18).contains(&cached[2]),
        "{} blocks cached: the 256-byte list should hold its round again",
        cached[2]
    );
    assert!(cached[3] <= 32, "{} blocks cached after a drain", cached[3]);
}
