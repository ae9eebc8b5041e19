//! The medium tier (513 B to 64 KiB): every class serves its sizes with
//! their contents intact, alignments are honoured or routed to the
//! fallback, `realloc` crosses the small, medium and large boundaries
//! keeping the bytes, freed runs give their arenas back, the statistics
//! add up, blocks freed on another thread come home, heaps keep a spare
//! arena each, and with the tier off everything over 512 bytes goes to the
//! fallback as before.
#![cfg(feature = "std")]
#![cfg(not(feature = "debug"))]

use pymalloc::size_class::{ALL_CLASS_COUNT, CLASS_COUNT, MEDIUM_LIMIT};
use pymalloc::{Config, PyMalloc, Stats};
use std::alloc::{GlobalAlloc, Layout};

fn medium_blocks(stats: &Stats) -> usize {
    stats.classes[CLASS_COUNT..]
        .iter()
        .map(|c| c.blocks_in_use)
        .sum()
}

fn fill(p: *mut u8, len: usize, seed: usize) {
    for i in 0..len {
        // SAFETY: the caller's block has `len` bytes.
        unsafe { *p.add(i) = (i.wrapping_mul(31) ^ seed) as u8 };
    }
}

fn check(p: *mut u8, len: usize, seed: usize) {
    for i in 0..len {
        // SAFETY: as in `fill`.
        let byte = unsafe { *p.add(i) };
        assert_eq!(byte, (i.wrapping_mul(31) ^ seed) as u8, "byte {i} of {len}");
    }
}

fn assert_adds_up(stats: &Stats) {
    assert_eq!(
        stats.accounted_arena_bytes(),
        stats.arena_bytes(),
        "{stats}"
    );
}

#[test]
fn every_medium_class_serves_its_sizes_with_contents_intact() {
    let heap = PyMalloc::system();
    let sizes = heap.stats().classes.map(|c| c.size);
    assert_eq!(sizes[CLASS_COUNT], 640);
    assert_eq!(sizes[ALL_CLASS_COUNT - 1], MEDIUM_LIMIT);
    let mut live = Vec::new();
    for class in CLASS_COUNT..ALL_CLASS_COUNT {
        let smallest = sizes[class - 1] + 1;
        for (n, size) in [smallest, (smallest + sizes[class]) / 2, sizes[class]]
            .into_iter()
            .enumerate()
        {
            let layout = Layout::from_size_align(size, 8).unwrap();
            for copy in 0..3 {
                // SAFETY: non-zero size; freed below with this layout.
                let p = unsafe { heap.alloc(layout) };
                assert!(!p.is_null());
                fill(p, size, class + n + copy);
                live.push((p, layout, class + n + copy, class));
            }
        }
    }
    let stats = heap.stats();
    assert_adds_up(&stats);
    for class in CLASS_COUNT..ALL_CLASS_COUNT {
        assert_eq!(stats.classes[class].blocks_in_use, 9, "class {class}");
    }
    assert_eq!(stats.large_objects, 0);
    for (p, layout, seed, _) in live {
        check(p, layout.size(), seed);
        // SAFETY: allocated above with this layout.
        unsafe { heap.dealloc(p, layout) };
    }
    let stats = heap.stats();
    assert_eq!((stats.live_allocations(), stats.requested_bytes), (0, 0));
    assert_adds_up(&stats);
}

#[test]
fn alignments_are_honoured_in_the_tier_or_routed_to_the_fallback() {
    let heap = PyMalloc::system();
    for align in (0..=16).map(|s| 1usize << s) {
        for size in [0, 1, 100, 513, 3000, 20_000, MEDIUM_LIMIT] {
            let layout = Layout::from_size_align(size, align).unwrap();
            let before = heap.stats();
            // SAFETY: a zero-size layout is served too (see the fallback).
            let p = unsafe { heap.alloc(layout) };
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0, "size {size} align {align}");
            fill(p, size, align);
            let after = heap.stats();
            let rounded = size.max(1).next_multiple_of(align);
            let medium = rounded <= MEDIUM_LIMIT && (rounded > 512 || align > 512);
            assert_eq!(
                medium_blocks(&after) - medium_blocks(&before),
                medium as usize,
                "size {size} align {align}"
            );
            assert_adds_up(&after);
            check(p, size, align);
            // SAFETY: allocated above with this layout.
            unsafe { heap.dealloc(p, layout) };
        }
    }
    assert_eq!(heap.stats().live_allocations(), 0);
}

#[test]
fn realloc_across_small_medium_and_large_keeps_the_bytes() {
    let heap = PyMalloc::system();
    let mut size = 8;
    let mut layout = Layout::from_size_align(size, 8).unwrap();
    // SAFETY: non-zero size.
    let mut p = unsafe { heap.alloc(layout) };
    fill(p, size, 7);
    // Up through every tier in steps of about 1.3x (as a Vec of odd
    // growth would), then back down.
    let mut sizes: Vec<usize> = std::iter::successors(Some(8usize), |s| Some(s + s / 3 + 1))
        .take_while(|&s| s < 200_000)
        .collect();
    let down: Vec<usize> = sizes.iter().rev().copied().collect();
    sizes.extend(down);
    for new in sizes.into_iter().skip(1) {
        // SAFETY: `p` is live with `layout`; the new size is non-zero.
        let q = unsafe { heap.realloc(p, layout, new) };
        assert!(!q.is_null());
        check(q, size.min(new), 7);
        fill(q, new, 7);
        (p, size) = (q, new);
        layout = Layout::from_size_align(size, 8).unwrap();
    }
    // Within one medium class a resize stays in place.
    let big = Layout::from_size_align(3000, 8).unwrap();
    // SAFETY: non-zero size; then resized within the 3072-byte class.
    unsafe {
        let q = heap.alloc(big);
        assert_eq!(heap.realloc(q, big, 3072), q);
        heap.dealloc(q, Layout::from_size_align(3072, 8).unwrap());
        heap.dealloc(p, layout);
    }
    let stats = heap.stats();
    assert_eq!((stats.live_allocations(), stats.requested_bytes), (0, 0));
}

#[test]
fn freeing_everything_in_the_tier_gives_its_arenas_back() {
    let heap = PyMalloc::system();
    let layouts: Vec<Layout> = (0..4000)
        .map(|i| Layout::from_size_align(513 + (i * 7919) % (MEDIUM_LIMIT - 512), 8).unwrap())
        .collect();
    // SAFETY: non-zero sizes; each freed once below.
    let blocks: Vec<*mut u8> = layouts.iter().map(|&l| unsafe { heap.alloc(l) }).collect();
    let full = heap.stats();
    assert!(full.medium.current >= 2, "{full}");
    assert_adds_up(&full);
    for (&p, &l) in blocks.iter().zip(&layouts) {
        // SAFETY: allocated above with this layout.
        unsafe { heap.dealloc(p, l) };
    }
    let empty = heap.stats();
    assert_adds_up(&empty);
    assert_eq!(medium_blocks(&empty), 0);
    assert!(
        empty.medium.current - empty.medium.retired <= 1,
        "one spare at most, beside arenas waiting out the release delay: {empty}"
    );
    assert_eq!(
        empty.medium.reclaimed + empty.medium.current,
        empty.medium.allocated_total
    );
    assert!(empty
        .to_string()
        .contains("# medium arenas allocated current"));
}

#[test]
fn medium_blocks_freed_on_another_thread_come_home() {
    let heap = PyMalloc::system();
    let layout = Layout::from_size_align(6000, 8).unwrap();
    let blocks: Vec<usize> = std::thread::scope(|s| {
        s.spawn(|| {
            (0..2000)
                .map(|i| {
                    // SAFETY: non-zero size.
                    let p = unsafe { heap.alloc(layout) };
                    fill(p, layout.size(), i);
                    p as usize
                })
                .collect()
        })
        .join()
        .unwrap()
    });
    std::thread::scope(|s| {
        for half in blocks.chunks(1000) {
            let (blocks, heap) = (&blocks, &heap);
            s.spawn(move || {
                for &p in half {
                    let i = blocks.iter().position(|&b| b == p).unwrap();
                    check(p as *mut u8, layout.size(), i);
                    // SAFETY: allocated above with this layout, freed once.
                    unsafe { heap.dealloc(p as *mut u8, layout) };
                }
                // Flushes this thread's cache now: its exit may come after
                // the join below, which waits for this closure only.
                heap.stats();
            });
        }
    });
    let stats = heap.stats();
    assert_eq!((stats.live_allocations(), stats.requested_bytes), (0, 0));
    assert_adds_up(&stats);
    assert!(stats.medium.current <= 1, "{stats}");
}

#[test]
fn heaps_taking_turns_keep_their_arenas() {
    // Two threads, two heaps (each thread's cache has its own home), each
    // emptying its medium arena in turn: a spare between them would be
    // unmapped and mapped again on every turn.
    let heap = PyMalloc::system_with(Config::DEFAULT.with_heaps(2));
    let layout = Layout::from_size_align(4096, 8).unwrap();
    let turn = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        for first in [true, false] {
            let (heap, turn) = (&heap, &turn);
            s.spawn(move || {
                for _ in 0..20 {
                    if !first {
                        turn.wait();
                    }
                    // SAFETY: a non-zero size; freed at once.
                    unsafe { heap.dealloc(heap.alloc(layout), layout) };
                    // Flushes this thread's cache: the arena is wholly free.
                    heap.stats();
                    if first {
                        turn.wait();
                    }
                }
            });
        }
    });
    let stats = heap.stats();
    assert_eq!(medium_blocks(&stats), 0);
    // (Two without thread caches too, unless both stacks pick one heap.)
    assert!(stats.medium.current <= 2, "{stats}");
    assert_eq!(
        stats.medium.allocated_total, stats.medium.current,
        "none unmapped and mapped again: {stats}"
    );
}

#[test]
fn with_the_tier_off_everything_over_512_bytes_is_large() {
    let heap = PyMalloc::system_with(Config::DEFAULT.with_medium_tier(false));
    assert!(!heap.config().medium_tier() && Config::DEFAULT.medium_tier());
    let layouts = [513, 4096, MEDIUM_LIMIT].map(|n| Layout::from_size_align(n, 8).unwrap());
    // SAFETY: non-zero sizes, freed below.
    let blocks = layouts.map(|l| unsafe { heap.alloc(l) });
    let small = Layout::from_size_align(1, 1024).unwrap();
    // SAFETY: as above.
    let aligned = unsafe { heap.alloc(small) };
    let stats = heap.stats();
    assert_eq!((stats.large_objects, medium_blocks(&stats)), (4, 0));
    assert_eq!(stats.medium.allocated_total, 0);
    // SAFETY: allocated above with these layouts.
    unsafe {
        for (p, l) in blocks.into_iter().zip(layouts) {
            heap.dealloc(p, l);
        }
        heap.dealloc(aligned, small);
    }
    assert_eq!(heap.stats().live_allocations(), 0);
}
