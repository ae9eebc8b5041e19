//! The Region backing: fixed heaps, bad spans, filling to null and back.

use pymalloc::{Config, PyMalloc, Region};
use std::alloc::{GlobalAlloc, Layout};

const KIB: usize = 1024;

/// Allocates blocks of the given sizes in turn, dropping each size once it
/// gets a null, until none fits; returns the blocks, each filled with its
/// index.
fn fill_until_null(heap: &PyMalloc<Region>, sizes: &[usize]) -> Vec<(*mut u8, Layout)> {
    let mut sizes = sizes.to_vec();
    let mut blocks = Vec::new();
    let mut i = 0;
    while !sizes.is_empty() {
        i = (i + 1) % sizes.len();
        let layout = Layout::from_size_align(sizes[i], 8).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { heap.alloc(layout) };
        if p.is_null() {
            sizes.remove(i);
            continue;
        }
        // SAFETY: the block has `layout.size()` bytes.
        unsafe { p.write_bytes(blocks.len() as u8, layout.size()) };
        blocks.push((p, layout));
    }
    blocks
}

fn free_checked(heap: &PyMalloc<Region>, blocks: Vec<(*mut u8, Layout)>) {
    for (i, (p, layout)) in blocks.into_iter().enumerate() {
        // SAFETY: live blocks filled by `fill_until_null`.
        let bytes = unsafe { std::slice::from_raw_parts(p, layout.size()) };
        assert!(bytes.iter().all(|&b| b == i as u8), "block {i} corrupted");
        // SAFETY: freed once with its layout.
        unsafe { heap.dealloc(p, layout) };
    }
}

#[test]
fn a_64_kib_region_fills_to_null_empties_and_fills_again() {
    static mut HEAP: [u8; 64 * KIB] = [0; 64 * KIB];
    // SAFETY: HEAP is used by this heap alone, and this test runs once.
    let heap = unsafe { PyMalloc::region_with(&raw mut HEAP, Config::SMALL) };
    let sizes = [8, 24, 100, 512, 700];
    let first = fill_until_null(&heap, &sizes);
    let first_len = first.len();
    assert!(first_len > 200, "only {first_len} blocks fit");
    let full = heap.stats();
    assert!(full.arenas_current >= 1);
    free_checked(&heap, first);
    let empty = heap.stats();
    assert_eq!(empty.live_allocations(), 0);
    assert!(empty.arenas_current <= 1);
    let second = fill_until_null(&heap, &sizes);
    assert!(
        second.len() * 10 >= first_len * 9,
        "the region did not come back whole"
    );
    free_checked(&heap, second);
}

#[test]
fn allocation_before_init_returns_null_and_init_makes_it_work() {
    let heap = PyMalloc::region_uninit_with(Config::SMALL);
    let layout = Layout::from_size_align(32, 8).unwrap();
    // SAFETY: non-zero size.
    assert!(unsafe { heap.alloc(layout) }.is_null());
    assert!(unsafe { heap.alloc(Layout::from_size_align(4096, 8).unwrap()) }.is_null());
    let mut memory = vec![0u8; 100 * KIB + 3];
    // SAFETY: `memory` outlives `heap` and is used by nothing else; the odd
    // start and length are trimmed.
    unsafe { heap.init(memory.as_mut_ptr().add(3), memory.len() - 3) };
    // SAFETY: non-zero size.
    let p = unsafe { heap.alloc(layout) };
    assert!(!p.is_null());
    let span = memory.as_ptr_range();
    assert!(span.contains(&p.cast_const()));
    // SAFETY: live block.
    unsafe { heap.dealloc(p, layout) };
    drop(heap);
}

#[test]
#[should_panic(expected = "its Config needs")]
fn a_region_too_small_for_one_arena_is_refused_at_init() {
    let heap = PyMalloc::region_uninit_with(Config::SMALL);
    let mut memory = vec![0u8; 8 * KIB];
    // SAFETY: refused before anything is written.
    unsafe { heap.init(memory.as_mut_ptr(), memory.len()) };
}

#[test]
#[should_panic(expected = "its Config needs")]
fn an_empty_region_is_refused_at_init() {
    let heap = PyMalloc::region_uninit_with(Config::SMALL);
    // SAFETY: refused before anything is written.
    unsafe { heap.init(std::ptr::NonNull::dangling().as_ptr(), 0) };
}

#[test]
#[should_panic(expected = "already has memory")]
fn a_region_is_given_memory_once() {
    let heap = PyMalloc::region_uninit_with(Config::SMALL);
    let mut memory = vec![0u8; 64 * KIB];
    // SAFETY: the second call panics before touching anything.
    unsafe {
        heap.init(memory.as_mut_ptr(), memory.len());
        heap.init(memory.as_mut_ptr(), memory.len());
    }
}

#[test]
fn a_misaligned_region_never_writes_outside_its_span() {
    // Guard zones around the span: any write outside would change them.
    let mut memory = vec![0xA5u8; 80 * KIB];
    let (start, len) = (4 * KIB + 5, 64 * KIB - 9);
    {
        let heap = PyMalloc::region_uninit_with(Config::SMALL);
        // SAFETY: the span lies inside `memory`, which outlives `heap`.
        unsafe { heap.init(memory.as_mut_ptr().add(start), len) };
        let blocks = fill_until_null(&heap, &[16, 48, 512, 1500]);
        free_checked(&heap, blocks);
    }
    assert!(memory[..start].iter().all(|&b| b == 0xA5));
    assert!(memory[start + len..].iter().all(|&b| b == 0xA5));
}

#[test]
fn a_region_of_min_len_after_trimming_serves_a_small_block() {
    let mut configs = vec![
        Config::SMALL,
        Config::DEFAULT,
        Config::DEFAULT.with_heaps(32),
    ];
    // The debug feature's header and guards outgrow the smallest store.
    if !cfg!(feature = "debug") {
        configs.push(Region::config_for(Region::MIN_LEN).unwrap());
    }
    for config in configs {
        let len = Region::min_len(config);
        for misalignment in [0, 1, 7, 15] {
            let mut memory = vec![0u8; len + 64];
            // A start 64-aligned plus `misalignment`, and enough bytes that
            // `len` remain once the start is trimmed to 16 bytes.
            let offset = memory.as_ptr().align_offset(64) + misalignment;
            let given = len + (16 - misalignment) % 16;
            let heap = PyMalloc::region_uninit_with(config);
            // SAFETY: `memory` outlives `heap` and nothing else uses it; the
            // span lies within it.
            unsafe { heap.init(memory.as_mut_ptr().add(offset), given) };
            // The store-only geometry's minimum holds one smallest block.
            let size = if config.pool_limit() == 0 { 16 } else { 512 };
            let layout = Layout::from_size_align(size, 8).unwrap();
            // SAFETY: non-zero size; freed below.
            let block = unsafe { heap.alloc(layout) };
            assert!(!block.is_null(), "{config:?} +{misalignment}");
            // SAFETY: allocated above.
            unsafe { heap.dealloc(block, layout) };
            drop(heap);
            drop(memory);
        }
    }
}

#[test]
fn the_default_constructor_picks_a_geometry_for_any_span() {
    // One smallest block of the store after trimming a misaligned start.
    assert_eq!(Region::MIN_LEN, 32);
    assert_eq!(Region::config_for(Region::MIN_LEN - 1), None);
    let mut len = Region::MIN_LEN;
    while len <= 1 << 30 {
        let config = Region::config_for(len).unwrap();
        assert!(Region::min_len(config) <= len, "{len}: {config:?}");
        assert_eq!(config.pool_limit(), Region::pool_limit_for(len));
        if len < Region::DEFAULT_SPAN {
            assert_eq!(config.heaps(), 1);
        } else {
            let medium = len >= Region::MEDIUM_SPAN;
            assert_eq!(config, Config::DEFAULT.with_medium_tier(medium));
        }
        assert_eq!(config.medium_tier(), len >= Region::MEDIUM_SPAN);
        len = len * 3 / 2;
    }
    // Under 128 KiB the store serves everything; from 2 MiB the pools
    // serve every small request, as over the system allocator.
    assert_eq!(Region::config_for(64 * KIB).unwrap().pool_limit(), 0);
    assert_eq!(Region::config_for(256 * KIB).unwrap().pool_limit(), 128);
    assert_eq!(Region::config_for(2 << 20).unwrap().pool_limit(), 512);
}

#[test]
fn a_4_kib_array_works_with_the_default_constructor() {
    static mut HEAP: [u8; 4 * KIB] = [0; 4 * KIB];
    // SAFETY: HEAP is used by this heap alone.
    let heap = unsafe { PyMalloc::region(&raw mut HEAP) };
    for _ in 0..2 {
        let blocks = fill_until_null(&heap, &[8, 64, 300, 1000]);
        let bytes: usize = blocks.iter().map(|(_, l)| l.size()).sum();
        assert!(bytes >= 3 * KIB, "{bytes} bytes in live blocks");
        free_checked(&heap, blocks);
        assert_eq!(heap.stats().live_allocations(), 0);
    }
}

#[test]
#[cfg_attr(
    feature = "debug",
    ignore = "the debug header and guards outgrow a 32-byte region"
)]
fn a_tiny_array_at_min_len_serves_one_small_block() {
    static mut HEAP: [u8; Region::MIN_LEN] = [0; Region::MIN_LEN];
    // SAFETY: HEAP is used by this heap alone.
    let heap = unsafe { PyMalloc::region(&raw mut HEAP) };
    let blocks = fill_until_null(&heap, &[16]);
    assert!(!blocks.is_empty());
    free_checked(&heap, blocks);
}

#[test]
fn init_picks_the_geometry_from_the_span_as_the_default_constructor_does() {
    for len in [4 * KIB, 64 * KIB, 200 * KIB, 3 << 20, 40 << 20] {
        let heap = PyMalloc::region_uninit();
        let mut memory = vec![0u8; len + 16];
        let offset = memory.as_ptr().align_offset(16);
        // SAFETY: the span lies in `memory`, which outlives `heap` and
        // nothing else uses; no other thread calls `heap`.
        unsafe { heap.init(memory.as_mut_ptr().add(offset), len) };
        assert_eq!(Some(heap.config()), Region::config_for(len), "{len}");
        // Filling the largest span to null would only take time.
        let sizes: &[usize] = if len < Region::DEFAULT_SPAN {
            &[8, 100, 512, 3000]
        } else {
            &[1 << 20]
        };
        let blocks = fill_until_null(&heap, sizes);
        let bytes: usize = blocks.iter().map(|(_, l)| l.size()).sum();
        assert!(bytes > len / 2, "{len}: {bytes} bytes in live blocks");
        free_checked(&heap, blocks);
        assert_eq!(heap.stats().live_allocations(), 0);
        drop(heap);
    }
}

#[test]
#[should_panic(expected = "below Region::MIN_LEN")]
fn init_without_a_geometry_refuses_a_span_below_min_len() {
    let heap = PyMalloc::region_uninit();
    let mut memory = [0u8; 16];
    // SAFETY: refused before anything is written.
    unsafe { heap.init(memory.as_mut_ptr(), memory.len()) };
}

/// Blocks in use in the medium classes.
fn medium_blocks(stats: &pymalloc::Stats) -> usize {
    let medium = &stats.classes[pymalloc::size_class::CLASS_COUNT..];
    medium.iter().map(|c| c.blocks_in_use).sum()
}

/// From 256 MiB a region serves 513 B - 64 KiB from the medium tier's
/// runs, in arenas of a 64th of the span, beside large blocks in its store;
/// emptied, the arenas go back to the store, and the region fills as far
/// again.
#[test]
fn a_large_region_serves_medium_blocks_from_runs_and_gets_them_back() {
    let span = Box::leak(vec![0u8; Region::MEDIUM_SPAN].into_boxed_slice());
    let heap = PyMalloc::region_uninit();
    // SAFETY: the span is leaked, so this heap's alone for good.
    unsafe { heap.init(span.as_mut_ptr(), span.len()) };
    assert!(heap.config().medium_tier());
    let first = fill_until_null(&heap, &[100, 600, 3000, 20_000, 65_536, 100_000]);
    let full = heap.stats();
    assert_eq!(full.medium.arena_size, Region::MEDIUM_SPAN / 64);
    assert!(medium_blocks(&full) > 1000, "{full}");
    assert!(full.large_objects > 0, "{full}");
    assert_eq!(full.accounted_arena_bytes(), full.arena_bytes(), "{full}");
    let first_len = first.len();
    free_checked(&heap, first);
    let empty = heap.stats();
    assert_eq!(empty.live_allocations(), 0);
    // A spare arena of each kind at most.
    assert!(empty.medium.current <= 1, "{empty}");
    let second = fill_until_null(&heap, &[100, 600, 3000, 20_000, 65_536, 100_000]);
    assert!(
        second.len() * 10 >= first_len * 9,
        "{} blocks fit after {first_len}: the region did not come back whole",
        second.len()
    );
    free_checked(&heap, second);
}

/// Under 256 MiB the medium runs would strand too much of the span: the
/// tier is off, whatever the `Config` asked, and the store serves those
/// sizes.
#[test]
fn a_region_under_256_mib_sends_medium_requests_to_its_store() {
    let span = Box::leak(vec![0u8; 64 << 20].into_boxed_slice());
    let heap = PyMalloc::region_uninit_with(Config::DEFAULT.with_heaps(1));
    // SAFETY: as above.
    unsafe { heap.init(span.as_mut_ptr(), span.len()) };
    assert!(!heap.config().medium_tier());
    assert!(!Region::config_for(64 << 20).unwrap().medium_tier());
    assert!(Region::config_for(Region::MEDIUM_SPAN)
        .unwrap()
        .medium_tier());
    let layout = Layout::from_size_align(3000, 8).unwrap();
    // SAFETY: non-zero size; freed below.
    let p = unsafe { heap.alloc(layout) };
    assert!(!p.is_null());
    let stats = heap.stats();
    assert_eq!((medium_blocks(&stats), stats.large_objects), (0, 1));
    // SAFETY: allocated above with this layout.
    unsafe { heap.dealloc(p, layout) };
}

/// A large block with free memory above it grows and shrinks in place,
/// its bytes kept; one hemmed in moves, its bytes kept too.
#[test]
fn large_blocks_resize_in_place_when_the_memory_above_is_free() {
    let span = Box::leak(vec![0u8; 8 << 20].into_boxed_slice());
    let heap = PyMalloc::region_uninit();
    // SAFETY: the span is leaked, so this heap's alone for good.
    unsafe { heap.init(span.as_mut_ptr(), span.len()) };
    let layout = |size| Layout::from_size_align(size, 8).unwrap();
    // SAFETY: non-zero size.
    let p = unsafe { heap.alloc(layout(100_000)) };
    assert!(!p.is_null());
    // SAFETY: `p` has 100,000 bytes.
    unsafe { p.write_bytes(7, 100_000) };
    let kept = |q: *mut u8, len| {
        // SAFETY: `q` is live with at least `len` bytes, written above.
        unsafe { std::slice::from_raw_parts(q, len) }
            .iter()
            .all(|&b| b == 7)
    };
    // SAFETY: `p` is live with this layout; each resize passes on the
    // block it returns.
    unsafe {
        let grown = heap.realloc(p, layout(100_000), 1_000_000);
        assert_eq!(grown, p);
        assert!(kept(grown, 100_000));
        let shrunk = heap.realloc(grown, layout(1_000_000), 200_000);
        assert_eq!(shrunk, p);
        let wall = heap.alloc(layout(100_000));
        assert!(!wall.is_null());
        let moved = heap.realloc(shrunk, layout(200_000), 400_000);
        assert!(!moved.is_null() && moved != p);
        assert!(kept(moved, 100_000));
        heap.dealloc(wall, layout(100_000));
        heap.dealloc(moved, layout(400_000));
    }
    assert_eq!(heap.stats().live_allocations(), 0);
}
