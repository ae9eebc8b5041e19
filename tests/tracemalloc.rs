//! tracemalloc over `PyMalloc` as the global allocator: leaks found at
//! their line, with exact counts and sizes, from any thread; frees, moves,
//! large blocks; grouping, filters, sampling; start, stop and snapshots
//! while other threads allocate.
#![cfg(feature = "std")]

mod common;

use common::rng::Rng;
use pymalloc::tracemalloc::{self, Filter, KeyType, Snapshot, Statistic, StatisticDiff};
use pymalloc::{Config, PyMalloc};
use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};

#[global_allocator]
static ALLOC: PyMalloc = PyMalloc::system();

/// tracemalloc is one per process: its tests take turns.
fn serial() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

fn here(frame: &tracemalloc::Frame, line: u32) -> bool {
    frame.filename.ends_with("tracemalloc.rs") && frame.lineno == line
}

fn diff_at(diffs: &[StatisticDiff], line: u32) -> Option<&StatisticDiff> {
    diffs.iter().find(|d| here(&d.traceback.frames()[0], line))
}

fn stat_at(stats: &[Statistic], line: u32) -> Option<&Statistic> {
    stats
        .iter()
        .find(|s| !s.traceback.frames().is_empty() && here(&s.traceback.frames()[0], line))
}

fn count_at(snapshot: &Snapshot, line: u32) -> usize {
    stat_at(&snapshot.statistics(KeyType::Lineno), line).map_or(0, |s| s.count)
}

#[test]
fn a_leak_at_a_known_line_tops_the_diff() {
    let _turn = serial();
    tracemalloc::start(1);
    assert!(tracemalloc::is_tracing());
    assert_eq!(tracemalloc::get_traceback_limit(), 1);
    // Built with frame pointers (as `.ci/run` does once), the fast unwinder
    // must be the one chosen.
    if std::env::var("RUSTFLAGS").is_ok_and(|f| f.contains("force-frame-pointers=yes")) {
        assert_eq!(
            tracemalloc::unwinder(),
            Some(tracemalloc::Unwinder::FramePointers)
        );
    }
    let mut kept = Vec::with_capacity(1000);
    let before = tracemalloc::take_snapshot();
    let line = line!() + 2;
    for _ in 0..1000 {
        kept.push(Box::new([7u8; 100]));
    }
    let after = tracemalloc::take_snapshot();
    tracemalloc::stop();
    let diffs = after.compare_to(&before, KeyType::Lineno);
    let top = &diffs[0];
    assert!(
        here(&top.traceback.frames()[0], line),
        "top: {top}\n{diffs:#?}"
    );
    assert_eq!((top.count, top.count_diff), (1000, 1000));
    assert_eq!((top.size, top.size_diff), (100_000, 100_000));
    let printed = top.to_string();
    assert!(
        printed.ends_with(&format!(
            "tracemalloc.rs:{line}: size=97.7 KiB (+97.7 KiB), count=1000 (+1000), average=100 B"
        )),
        "{printed}"
    );
    assert!(!tracemalloc::is_tracing());
    black_box(kept);
}

#[test]
fn leaks_on_another_thread_are_seen() {
    let _turn = serial();
    tracemalloc::start(1);
    let before = tracemalloc::take_snapshot();
    let line = line!() + 2;
    let kept = std::thread::spawn(move || {
        let kept: Vec<Box<[u64; 8]>> = (0..500).map(|i| Box::new([i; 8])).collect();
        kept
    })
    .join()
    .unwrap();
    let diffs = tracemalloc::take_snapshot().compare_to(&before, KeyType::Lineno);
    tracemalloc::stop();
    let leak = diff_at(&diffs, line).unwrap_or_else(|| panic!("line {line}: {diffs:#?}"));
    // 500 boxes and the Vec that collects them.
    assert_eq!((leak.count_diff, leak.size_diff), (501, 500 * 64 + 500 * 8));
    black_box(kept);
}

/// A thread that was allocating before `start` looks whether tracing is
/// on every 64 KiB it allocates (the countdown that replaces a test of a
/// flag on every allocation): it is traced from then on.
#[test]
fn a_thread_busy_before_start_is_traced_within_64_kib() {
    // A size no other allocation here has: its traces are the worker's boxes,
    // whichever line a debug or a release build attributes them to.
    const SIZE: usize = 328;
    let _turn = serial();
    let (started, warmed) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let worker = {
        let (started, warmed) = (started.clone(), warmed.clone());
        std::thread::spawn(move || {
            black_box(vec![Box::new([0u8; SIZE]); 100]);
            warmed.wait();
            started.wait();
            let kept: Vec<Box<[u8; SIZE]>> = (0..1000).map(|i| Box::new([i as u8; SIZE])).collect();
            kept
        })
    };
    warmed.wait();
    tracemalloc::start(1);
    started.wait();
    let kept = worker.join().unwrap();
    let snapshot = tracemalloc::take_snapshot();
    tracemalloc::stop();
    let count = snapshot.traces().iter().filter(|t| t.size == SIZE).count();
    // At most 64 KiB, 200 boxes, before the worker's first look.
    assert!(
        (1000 - 64 * 1024 / SIZE..=1000).contains(&count),
        "{count} of 1000 traced"
    );
    black_box(kept);
}

#[test]
fn freed_blocks_vanish_from_the_next_snapshot() {
    let _turn = serial();
    tracemalloc::start(1);
    let line = line!() + 1;
    let blocks: Vec<String> = (0..300).map(|i| format!("block number {i:>20}")).collect();
    let with = tracemalloc::take_snapshot();
    assert_eq!(count_at(&with, line), 301, "300 strings and their Vec");
    let (traced, peak) = tracemalloc::get_traced_memory();
    assert!(traced >= 300 * 32 && peak >= traced);
    drop(blocks);
    let without = tracemalloc::take_snapshot();
    assert_eq!(count_at(&without, line), 0);
    let diff = without.compare_to(&with, KeyType::Lineno);
    let gone = diff_at(&diff, line).expect("the freed line, with a negative diff");
    assert_eq!((gone.count, gone.count_diff), (0, -301));
    assert!(tracemalloc::get_traced_memory().0 < traced);
    tracemalloc::stop();
}

#[test]
fn realloc_moves_the_trace() {
    let _turn = serial();
    tracemalloc::start(1);
    let first = line!() + 1;
    let mut grown: Vec<u8> = black_box(Vec::with_capacity(16));
    let second = line!() + 1;
    grown.reserve_exact(100_000);
    let snapshot = tracemalloc::take_snapshot();
    tracemalloc::stop();
    assert_eq!(count_at(&snapshot, first), 0);
    let stats = snapshot.statistics(KeyType::Lineno);
    let moved = stat_at(&stats, second).expect("the trace at the realloc's line");
    assert_eq!((moved.count, moved.size), (1, grown.capacity()));
    black_box(grown);
}

#[test]
fn large_blocks_are_traced() {
    let _turn = serial();
    tracemalloc::start(1);
    let line = line!() + 1;
    let big = black_box(vec![1u8; 10 << 20]);
    let snapshot = tracemalloc::take_snapshot();
    let (current, peak) = tracemalloc::get_traced_memory();
    assert!(current >= 10 << 20 && peak >= current);
    drop(big);
    let stats = snapshot.statistics(KeyType::Lineno);
    let large = stat_at(&stats, line).expect("the large block");
    assert_eq!((large.count, large.size), (1, 10 << 20));
    assert_eq!(
        large.to_string().split_once(": ").unwrap().1,
        "size=10.0 MiB, count=1, average=10.0 MiB"
    );
    assert!(tracemalloc::get_traced_memory().0 < 10 << 20);
    tracemalloc::reset_peak();
    assert!(tracemalloc::get_traced_memory().1 < 10 << 20);
    assert!(tracemalloc::get_tracemalloc_memory() > 0);
    tracemalloc::stop();
}

#[inline(never)]
#[allow(clippy::vec_box)] // one allocation per handler is the point
fn make_handlers(n: usize, out: &mut Vec<Box<[u8; 40]>>) {
    for _ in 0..n {
        out.push(Box::new([3u8; 40])); // the allocating line
    }
}

#[test]
fn grouping_by_file_line_and_traceback() {
    let _turn = serial();
    tracemalloc::start(8);
    let alloc_line = line!() - 8;
    let mut kept = Vec::with_capacity(30);
    let from_a = line!() + 1;
    make_handlers(10, &mut kept);
    let from_b = line!() + 1;
    make_handlers(20, &mut kept);
    let snapshot = tracemalloc::take_snapshot();
    tracemalloc::stop();
    assert_eq!(snapshot.traceback_limit(), 8);

    let by_line = snapshot.statistics(KeyType::Lineno);
    let at_alloc = stat_at(&by_line, alloc_line).unwrap();
    assert_eq!((at_alloc.count, at_alloc.size), (30, 30 * 40));

    let by_traceback = snapshot.statistics(KeyType::Traceback);
    let called_from = |line: u32| {
        by_traceback
            .iter()
            .filter(|s| here(&s.traceback.frames()[0], alloc_line))
            .filter(|s| s.traceback.frames().iter().any(|f| here(f, line)))
            .map(|s| s.count)
            .sum::<usize>()
    };
    assert_eq!(called_from(from_a), 10);
    assert_eq!(called_from(from_b), 20);
    let deep = by_traceback
        .iter()
        .find(|s| here(&s.traceback.frames()[0], alloc_line))
        .unwrap();
    assert!(deep.traceback.frames().len() > 1 && deep.traceback.frames().len() <= 8);
    let printed = deep.traceback.to_string();
    assert!(printed
        .lines()
        .next()
        .unwrap()
        .ends_with(&format!("tracemalloc.rs:{alloc_line}")));

    let by_file = snapshot.statistics(KeyType::Filename);
    let file = by_file
        .iter()
        .find(|s| s.traceback.frames()[0].filename.ends_with("tracemalloc.rs"))
        .unwrap();
    assert_eq!(file.traceback.frames()[0].lineno, 0);
    assert!(file.count >= 31);
    assert!(file.to_string().contains("tracemalloc.rs:0: size="));
    black_box(kept);
}

#[test]
fn filters_keep_and_drop_by_file_and_line() {
    let _turn = serial();
    tracemalloc::start(1);
    let line = line!() + 1;
    let kept: Vec<Box<u64>> = (0..50).map(Box::new).collect();
    let snapshot = tracemalloc::take_snapshot();
    tracemalloc::stop();
    let ours = snapshot.filter_traces(&[Filter::new(true, "*tracemalloc.rs")]);
    assert!(ours
        .traces()
        .iter()
        .all(|t| t.traceback.frames()[0].filename.ends_with("tracemalloc.rs")));
    assert_eq!(count_at(&ours, line), 51);
    let others = snapshot.filter_traces(&[Filter::new(false, "*tests/tracemalloc.rs")]);
    assert_eq!(count_at(&others, line), 0);
    assert_eq!(
        others.traces().len() + ours.traces().len(),
        snapshot.traces().len()
    );
    let one_line = snapshot.filter_traces(&[Filter {
        lineno: Some(line),
        ..Filter::new(true, "*tracemalloc.rs")
    }]);
    assert_eq!(one_line.traces().len(), 51);
    black_box(kept);
}

#[test]
fn sampled_estimates_are_close_to_the_truth() {
    let _turn = serial();
    // Small blocks only: the `debug` feature's list of large blocks makes
    // tens of thousands of them slow to free.
    let mean = 8 << 10;
    tracemalloc::start_sampled(1, mean);
    let mut rng = Rng::new(11);
    let line = line!() + 3;
    let mut kept: Vec<Vec<u8>> = Vec::with_capacity(40_000);
    for _ in 0..40_000 {
        kept.push(Vec::with_capacity(16 + rng.below(497)));
    }
    let truth: usize = kept.iter().map(Vec::capacity).sum();
    let snapshot = tracemalloc::take_snapshot();
    tracemalloc::stop();
    assert_eq!(snapshot.sample_mean(), Some(mean));
    let stats = snapshot.statistics(KeyType::Lineno);
    let estimate = stat_at(&stats, line).expect("sampled traces at the line");
    assert!(estimate.estimated && estimate.to_string().ends_with(" (estimated)"));
    // About truth/mean = 1290 samples: a standard error near 3 %; 12 % is
    // four of them.
    let error = (estimate.size as f64 - truth as f64).abs() / truth as f64;
    assert!(
        error < 0.12,
        "estimated {} for {truth} bytes",
        estimate.size
    );
    let count_error = (estimate.count as f64 - 40_000.0).abs() / 40_000.0;
    assert!(
        count_error < 0.12,
        "estimated {} blocks for 40000",
        estimate.count
    );
    // Far fewer traces than blocks.
    assert!(snapshot.traces().len() < 4000);
    black_box(kept);
}

#[test]
fn snapshots_while_other_threads_allocate_and_free() {
    let _turn = serial();
    tracemalloc::start(1);
    const THREADS: usize = 3;
    const KEEP: usize = 1000;
    let line = line!() + 6;
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let block = || Box::new([t as u8; 48]);
                let mut rng = Rng::new(t as u64);
                let mut live: Vec<Box<[u8; 48]>> = Vec::with_capacity(4 * KEEP);
                for _ in 0..40_000 {
                    if live.len() < 3 * KEEP && rng.chance(60) {
                        live.push(block());
                    } else if !live.is_empty() {
                        live.swap_remove(rng.below(live.len()));
                    }
                }
                live.truncate(KEEP.min(live.len()));
                while live.len() < KEEP {
                    live.push(block());
                }
                barrier.wait(); // holding exactly KEEP
                barrier.wait(); // the main thread has counted
                drop(live);
            })
        })
        .collect();
    let mut snapshots = 0;
    while !workers.iter().all(|w| w.is_finished()) && snapshots < 20 {
        let during = tracemalloc::take_snapshot();
        assert!(count_at(&during, line) <= THREADS * 4 * KEEP);
        snapshots += 1;
        if snapshots == 3 {
            break;
        }
    }
    barrier.wait();
    let held = tracemalloc::take_snapshot();
    barrier.wait();
    for worker in workers {
        worker.join().unwrap();
    }
    let after = tracemalloc::take_snapshot();
    tracemalloc::stop();
    let stats = held.statistics(KeyType::Lineno);
    let live = stat_at(&stats, line).expect("the workers' blocks");
    assert_eq!(
        (live.count, live.size),
        (THREADS * KEEP, THREADS * KEEP * 48)
    );
    assert_eq!(count_at(&after, line), 0, "no phantom traces");
}

#[test]
fn start_and_stop_while_threads_allocate() {
    let _turn = serial();
    let stop = Arc::new(AtomicBool::new(false));
    let line = line!() + 8;
    let workers: Vec<_> = (0..2)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(100 + t);
                let mut live: Vec<Box<[u8; 24]>> = Vec::with_capacity(512);
                while !stop.load(Ordering::Relaxed) {
                    live.push(Box::new([1; 24]));
                    if live.len() == 512 || rng.chance(40) {
                        live.swap_remove(rng.below(live.len()));
                    }
                }
            })
        })
        .collect();
    for round in 0..40 {
        if round % 2 == 0 {
            tracemalloc::start(1 + round % 3);
        } else {
            tracemalloc::stop();
        }
        std::thread::yield_now();
        if round % 4 == 1 {
            tracemalloc::clear_traces();
        }
    }
    tracemalloc::start(1);
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().unwrap();
    }
    // Every block the workers made is freed: none may stay traced.
    let after = tracemalloc::take_snapshot();
    assert_eq!(count_at(&after, line), 0, "no phantom traces");
    tracemalloc::clear_traces();
    assert_eq!(tracemalloc::take_snapshot().traces().len(), 0);
    assert_eq!(tracemalloc::get_traced_memory(), (0, 0));
    tracemalloc::stop();
    assert_eq!(tracemalloc::take_snapshot().traces().len(), 0);
}

/// An allocator of 64 KiB pools beside the global one (4 KiB pools): its
/// pools have more blocks than one side array holds.
static WIDE: PyMalloc = PyMalloc::system_with(Config::new(64 << 10, 4));

#[test]
fn pool_blocks_of_every_class_and_pool_size_are_traced() {
    let _turn = serial();
    tracemalloc::stop();
    let idle = tracemalloc::get_tracemalloc_memory();
    tracemalloc::start(1);
    let layouts: Vec<Layout> = [
        (1, 1),
        (8, 8),
        (24, 8),
        (100, 4),
        (264, 8),
        (512, 8),
        (48, 16),
    ]
    .iter()
    .map(|&(size, align)| Layout::from_size_align(size, align).unwrap())
    .collect();
    let total: usize = layouts.iter().map(|l| l.size()).sum();
    let mut blocks = Vec::with_capacity(7 * 500);
    let line = line!() + 4;
    for _ in 0..500 {
        for &layout in &layouts {
            // SAFETY: a nonzero size; freed below with the same layout.
            blocks.push((unsafe { ALLOC.alloc(layout) }, layout));
        }
    }
    let wide = Layout::new::<u64>();
    let mut small = Vec::with_capacity(10_000);
    let wide_line = line!() + 3;
    for _ in 0..10_000 {
        // SAFETY: a nonzero size; freed below with the same layout.
        small.push(unsafe { WIDE.alloc(wide) });
    }
    let snapshot = tracemalloc::take_snapshot();
    let stats = snapshot.statistics(KeyType::Lineno);
    let global = stat_at(&stats, line).expect("the global allocator's blocks");
    assert_eq!((global.count, global.size), (3500, 500 * total));
    let wide_stat = stat_at(&stats, wide_line).expect("the wide pools' blocks");
    assert_eq!((wide_stat.count, wide_stat.size), (10_000, 80_000));
    let tables = tracemalloc::get_tracemalloc_memory();
    assert!(tables > idle);

    // Every other block freed; the freed ones allocated again at another
    // line, most at the same addresses, which get the new traceback.
    for block in small.iter_mut().step_by(2) {
        // SAFETY: allocated above with this layout, freed once.
        unsafe { WIDE.dealloc(*block, wide) };
        *block = std::ptr::null_mut();
    }
    assert_eq!(count_at(&tracemalloc::take_snapshot(), wide_line), 5000);
    let again = line!() + 3;
    for block in small.iter_mut().step_by(2) {
        // SAFETY: a nonzero size; freed below with the same layout.
        *block = unsafe { WIDE.alloc(wide) };
    }
    // Resized in place within its class, then moved to another class.
    let (moved, layout) = blocks[2];
    // SAFETY: a live block of `layout`, 24 bytes; 20 fits its class.
    let same = unsafe { ALLOC.realloc(moved, layout, 20) };
    assert_eq!(same, moved);
    let resized = line!() + 2;
    // SAFETY: now a live block of 20 bytes.
    let grown = unsafe { ALLOC.realloc(same, Layout::from_size_align(20, 8).unwrap(), 300) };
    blocks[2] = (grown, Layout::from_size_align(300, 8).unwrap());
    let snapshot = tracemalloc::take_snapshot();
    assert_eq!(count_at(&snapshot, wide_line), 5000);
    assert_eq!(count_at(&snapshot, again), 5000);
    let stats = snapshot.statistics(KeyType::Lineno);
    assert_eq!(
        stat_at(&stats, line).map(|s| (s.count, s.size)),
        Some((3499, 500 * total - 24))
    );
    assert_eq!(
        stat_at(&stats, resized).map(|s| (s.count, s.size)),
        Some((1, 300))
    );

    for (block, layout) in blocks {
        // SAFETY: live blocks of these layouts, each freed once.
        unsafe { ALLOC.dealloc(block, layout) };
    }
    for block in small {
        // SAFETY: live blocks of `wide`, each freed once.
        unsafe { WIDE.dealloc(block, wide) };
    }
    let empty = tracemalloc::take_snapshot();
    assert_eq!(count_at(&empty, line) + count_at(&empty, wide_line), 0);
    assert_eq!(count_at(&empty, again) + count_at(&empty, resized), 0);
    tracemalloc::stop();
    // Stopping gives the side arrays back.
    assert_eq!(tracemalloc::get_tracemalloc_memory(), idle);
}
