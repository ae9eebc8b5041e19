//! The byte limit and failure injection: every allocation of a workload
//! fails in turn and the workload's error path runs each time; the limit is
//! exact with 8 threads racing for it.
#![cfg(feature = "std")]

use pymalloc::{inject, PyMalloc};
use std::alloc::{GlobalAlloc, Layout};
use std::collections::{HashMap, TryReserveError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;

#[global_allocator]
static ALLOC: PyMalloc = PyMalloc::system();

/// Words counted into a map, their lengths into a growing vector: small,
/// medium and large blocks, reallocations, and only fallible allocations.
fn workload() -> Result<usize, TryReserveError> {
    let text = "the quick brown fox jumps over the lazy dog the end";
    let mut counts: HashMap<String, usize> = HashMap::new();
    counts.try_reserve(16)?;
    let mut lengths: Vec<usize> = Vec::new();
    for word in text.split(' ') {
        let mut key = String::new();
        key.try_reserve_exact(word.len())?;
        key.push_str(word);
        *counts.entry(key).or_default() += 1;
        // One at a time, so the vector is reallocated as it grows.
        lengths.try_reserve(1)?;
        lengths.push(word.len());
    }
    let mut big: Vec<u8> = Vec::new();
    big.try_reserve_exact(4096)?;
    big.extend(lengths.iter().map(|&n| n as u8));
    Ok(counts["the"] * 1000 + lengths.len() + big.len())
}

#[test]
fn every_allocation_of_a_workload_fails_once_and_its_error_path_runs() {
    let expected = workload().unwrap();
    assert_eq!(expected, 3000 + 11 + 11);
    let (result, points) = ALLOC.count_allocations(workload);
    assert_eq!(result.unwrap(), expected);
    let mut errors = 0;
    let checked = ALLOC.each_failure(workload, |n, result| {
        assert!(
            result.is_err(),
            "allocation #{n} failed but the workload succeeded"
        );
        errors += 1;
    });
    assert_eq!(checked, points);
    assert_eq!(errors, points);
    assert!(points >= 14, "{points} allocations");
    // And nothing is left armed: the workload succeeds again.
    assert_eq!(workload().unwrap(), expected);
}

#[test]
fn the_nth_allocation_fails_and_only_it() {
    let (outcomes, failed) = ALLOC.fail_nth(3, || {
        (0..5)
            .map(|_| Vec::<u64>::new().try_reserve_exact(8).is_ok())
            .collect::<Vec<_>>()
    });
    assert!(failed);
    // The first allocation is the collecting vector's own.
    assert_eq!(outcomes, [true, false, true, true, true]);
    let (_, failed) = ALLOC.fail_nth(100, || Box::new(1));
    assert!(!failed, "a closure with fewer allocations sees no failure");
}

#[test]
fn random_failures_follow_the_seed() {
    let run = |p, seed| {
        ALLOC.fail_randomly(p, seed, || {
            let mut ok = 0;
            for _ in 0..1000 {
                ok += usize::from(Vec::<u8>::new().try_reserve_exact(24).is_ok());
            }
            ok
        })
    };
    let (ok, failures) = run(0.25, 7);
    assert_eq!(ok as u64 + failures, 1000);
    assert!(
        (150..350).contains(&failures),
        "{failures} of 1000 at p = 0.25"
    );
    assert_eq!(run(0.25, 7), (ok, failures), "same seed, same failures");
    assert_ne!(run(0.25, 8), (ok, failures), "another seed, other failures");
    assert_eq!(run(0.0, 1), (1000, 0));
    assert_eq!(run(1.0, 1), (0, 1000));
}

#[test]
fn injection_is_scoped_to_the_calling_thread() {
    // The other thread is spawned before, and signalled without allocating:
    // under a failure rate of 1 this thread could not spawn it.
    let (start, done) = (Barrier::new(2), Barrier::new(2));
    let other_ok = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            start.wait();
            let ok = Vec::<u8>::new().try_reserve_exact(64).is_ok();
            other_ok.store(ok, Ordering::Relaxed);
            done.wait();
        });
        let ((), failures) = ALLOC.fail_randomly(1.0, 1, || {
            start.wait();
            done.wait();
            assert!(Vec::<u8>::new().try_reserve_exact(64).is_err());
        });
        assert_eq!(failures, 1);
    });
    assert!(
        other_ok.load(Ordering::Relaxed),
        "the other thread's allocation failed"
    );
}

#[test]
fn a_reported_failure_prints_and_still_fails() {
    inject::report_failures(true);
    let (ok, failed) = ALLOC.fail_nth(1, || Vec::<u8>::new().try_reserve(10).is_ok());
    inject::report_failures(false);
    assert!(failed && !ok);
}

/// An allocator of its own, so the limit binds nobody else in the process.
static LIMITED: PyMalloc = PyMalloc::system();

/// Each of 8 threads allocates `size`-byte blocks until one is refused;
/// returns the blocks.
fn fill_from_8_threads(size: usize) -> Vec<usize> {
    let layout = Layout::from_size_align(size, 8).unwrap();
    let barrier = Barrier::new(8);
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let mut mine = Vec::new();
                    loop {
                        // SAFETY: a non-zero size.
                        let block = unsafe { LIMITED.alloc(layout) };
                        if block.is_null() {
                            return mine;
                        }
                        mine.push(block as usize);
                    }
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    })
}

fn free_all(blocks: &[usize], size: usize) {
    let layout = Layout::from_size_align(size, 8).unwrap();
    for &block in blocks {
        // SAFETY: allocated from LIMITED with this layout, freed once.
        unsafe { LIMITED.dealloc(block as *mut u8, layout) };
    }
}

#[test]
fn the_limit_is_exact_with_8_threads() {
    assert_eq!(LIMITED.limit_remaining(), None);
    let limit = 1_000_003;
    LIMITED.set_limit(limit);
    // Small blocks (pools, thread caches) and large ones (the backing).
    for size in [48, 5000] {
        let blocks = fill_from_8_threads(size);
        assert_eq!(blocks.len(), limit / size, "{size}-byte blocks");
        assert_eq!(LIMITED.limit_remaining(), Some(limit % size));
        free_all(&blocks, size);
        assert_eq!(LIMITED.limit_remaining(), Some(limit));
    }
    // Reallocation counts the growth, and a refused one keeps the block.
    let layout = Layout::from_size_align(100, 8).unwrap();
    // SAFETY: the block is live between alloc and dealloc, with the layout
    // of its last successful resize.
    unsafe {
        let block = LIMITED.alloc(layout);
        block.write_bytes(7, 100);
        assert!(LIMITED.realloc(block, layout, limit + 1).is_null());
        assert_eq!(LIMITED.limit_remaining(), Some(limit - 100));
        let grown = LIMITED.realloc(block, layout, 1000);
        assert!(!grown.is_null() && *grown.add(99) == 7);
        assert_eq!(LIMITED.limit_remaining(), Some(limit - 1000));
        LIMITED.dealloc(grown, Layout::from_size_align(1000, 8).unwrap());
    }
    LIMITED.remove_limit();
    assert_eq!(LIMITED.limit_remaining(), None);
}

#[test]
fn injection_fails_only_the_allocator_it_is_armed_on() {
    static OTHER: PyMalloc = PyMalloc::system();
    let layout = Layout::from_size_align(32, 8).unwrap();
    let ((), failures) = ALLOC.fail_randomly(1.0, 1, || {
        // SAFETY: a non-zero size; the block is freed once, with its layout.
        unsafe {
            let block = OTHER.alloc(layout);
            assert!(!block.is_null());
            OTHER.dealloc(block, layout);
        }
    });
    assert_eq!(failures, 0);
}
