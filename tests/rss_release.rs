//! Freed arenas go back to the operating system: the process's resident set
//! shrinks after a spike of small objects is freed and the release delay
//! has passed, but for the few arenas the backing keeps mapped for the
//! next ones; a medium arena kept as a spare stays mapped without its
//! pages. Within the delay, freed arenas are taken again rather than
//! mapped afresh.
#![cfg(all(feature = "std", target_os = "linux"))]

use pymalloc::backing::RETAINED_ARENAS;
use pymalloc::config::DEFAULT_RELEASE_DELAY_MS;
use pymalloc::{Config, PyMalloc};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::Mutex;
use std::time::Duration;

#[global_allocator]
static ALLOC: PyMalloc = PyMalloc::system();

fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// The tests count arenas and resident pages: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Sleeps until arenas retired before the call have waited out the
/// default release delay: the next `stats()` gives them back.
fn wait_out_the_release_delay() {
    std::thread::sleep(Duration::from_millis(2 * DEFAULT_RELEASE_DELAY_MS as u64));
}

#[test]
fn a_spike_of_small_objects_is_returned_after_it_is_freed() {
    let _serial = SERIAL.lock().unwrap();
    let before = resident_bytes();
    let arenas_before = ALLOC.stats().arenas_current;
    let spike: Vec<Box<[u64; 8]>> = (0..1_000_000).map(|i| Box::new([i; 8])).collect();
    let peak = resident_bytes();
    let at_peak = ALLOC.stats();
    assert!(
        peak - before > 60 << 20,
        "the spike should be resident: {} MiB",
        (peak - before) >> 20
    );
    assert!(at_peak.arenas_current > arenas_before + 200);
    assert!(spike.iter().enumerate().all(|(i, b)| b[7] == i as u64));
    drop(spike);
    wait_out_the_release_delay();
    let stats = ALLOC.stats();
    let after = resident_bytes();
    assert!(stats.arenas_current <= arenas_before + 1, "{stats}");
    // Of the 250-odd arenas freed, the last few are kept mapped, no more.
    assert_eq!(
        stats.retained_arena_bytes,
        RETAINED_ARENAS * stats.arena_size,
        "{stats}"
    );
    // The next arenas come from those kept, before any fresh mapping.
    let again: Vec<Box<[u64; 8]>> = (0..8 * 4096).map(|i| Box::new([i; 8])).collect();
    assert!(ALLOC.stats().retained_arena_bytes < stats.retained_arena_bytes);
    drop(again);
    assert!(
        after - before.min(after) < (peak - before) / 10,
        "resident: {} MiB before, {} MiB at peak, {} MiB after",
        before >> 20,
        peak >> 20,
        after >> 20
    );
}

/// Blocks of one class, more than one arena holds.
const ARENA_OF_BLOCKS: usize = 5000;

/// A thread cache does not keep the arenas of a spike being freed: the
/// last blocks out in an arena, sitting in the freeing thread's lists,
/// would keep the arena from the backing. Thirty arenas each hold, beside
/// 64-byte blocks, one block of a class of its own (so that it sits in a
/// pool of that arena), freed before or after a hundred and thirty
/// arenas of 64-byte blocks, which gives arenas back.
fn spike_with_pins(pins_last: bool) {
    if !pymalloc::THREAD_CACHES {
        return;
    }
    let _serial = SERIAL.lock().unwrap();
    // Read from another thread, which leaves this thread's cache alone.
    let arenas =
        || std::thread::scope(|s| s.spawn(|| ALLOC.stats().arenas_current).join().unwrap());
    let filler = Layout::from_size_align(64, 8).unwrap();
    let pinning = |k: usize| Layout::from_size_align(264 + 8 * k, 8).unwrap();
    let before = arenas();
    // The filler's addresses a vector per arena, each a medium block: one
    // of 5 MB would come from glibc, and its free raise glibc's mmap
    // threshold, so that the next test's vector stays resident.
    let mut fill = Vec::new();
    let mut pins = Vec::new();
    for k in 0..130 {
        // SAFETY: a non-zero size.
        fill.push(
            (0..ARENA_OF_BLOCKS)
                .map(|_| unsafe { ALLOC.alloc(filler) })
                .collect::<Vec<_>>(),
        );
        if k < 30 {
            // SAFETY: as above.
            pins.push((unsafe { ALLOC.alloc(pinning(k)) }, pinning(k)));
        }
    }
    let fill = fill.into_iter().flatten().map(|p| (p, filler));
    assert!(fill
        .clone()
        .chain(pins.iter().copied())
        .all(|(p, _)| !p.is_null()));
    assert!(arenas() >= before + 130);
    let frees: Vec<Box<dyn Iterator<Item = (*mut u8, Layout)>>> = if pins_last {
        vec![Box::new(fill), Box::new(pins.into_iter())]
    } else {
        vec![Box::new(pins.into_iter()), Box::new(fill)]
    };
    for (block, layout) in frees.into_iter().flatten() {
        // SAFETY: allocated above with this layout, freed once.
        unsafe { ALLOC.dealloc(block, layout) };
    }
    // The spare and the arena of the filler blocks still cached, no more.
    wait_out_the_release_delay();
    let after = arenas();
    assert!(after <= before + 2, "{before} arenas before, {after} after");
}

/// Blocks cached before the spike is freed go back with it.
#[test]
fn cached_blocks_do_not_keep_the_arenas_of_a_freed_spike() {
    spike_with_pins(false);
}

/// Blocks freed at the end of the spike, after the cache let arenas go,
/// are not cached.
#[test]
fn the_last_blocks_of_a_freed_spike_are_not_cached() {
    spike_with_pins(true);
}

/// The heap of the medium test alone. The global allocator's medium heaps
/// also serve the test harness's threads: without thread caches (the
/// `debug` feature) a thread's heap follows its stack address, and a
/// harness block landing in the test's arena kept it from ever being
/// wholly free (one run in five failed so).
static MEDIUM_ALLOC: PyMalloc = PyMalloc::system();

/// A medium arena kept as its heap's spare hands its pages back: twelve
/// MiB of 4 KiB blocks, written and freed, leave the arena mapped (the
/// next ones come from it) but not resident.
#[test]
fn a_spare_medium_arena_does_not_stay_resident() {
    let _serial = SERIAL.lock().unwrap();
    let layout = Layout::from_size_align(4096, 8).unwrap();
    let count = (12 << 20) / layout.size();
    let before = resident_bytes();
    let blocks: Vec<*mut u8> = (0..count)
        .map(|i| {
            // SAFETY: a non-zero size.
            let p = unsafe { MEDIUM_ALLOC.alloc(layout) };
            assert!(!p.is_null());
            // SAFETY: the block has `layout.size()` bytes.
            unsafe { p.write_bytes(i as u8, layout.size()) };
            p
        })
        .collect();
    let peak = resident_bytes();
    assert!(peak - before >= 10 << 20, "{} MiB", (peak - before) >> 20);
    for p in blocks {
        // SAFETY: allocated above with this layout, freed once.
        unsafe { MEDIUM_ALLOC.dealloc(p, layout) };
    }
    // Back in their runs (the cache flushed), the arena wholly free.
    let stats = MEDIUM_ALLOC.stats();
    assert!(stats.medium.current >= 1, "kept as the spare: {stats}");
    let after = resident_bytes();
    assert!(
        after < before + (2 << 20),
        "resident: {} MiB before, {} at the peak, {} after",
        before >> 20,
        peak >> 20,
        after >> 20
    );
}

/// Bytes of 64-byte blocks filling about 40 small arenas.
const REFILL: usize = 40 * 4000;

/// Allocates `REFILL` 64-byte blocks from `alloc`, writing each, and
/// frees them all.
fn fill_and_free(alloc: &PyMalloc) {
    let layout = Layout::from_size_align(64, 8).unwrap();
    let blocks: Vec<*mut u8> = (0..REFILL)
        .map(|i| {
            // SAFETY: a non-zero size.
            let p = unsafe { alloc.alloc(layout) };
            assert!(!p.is_null());
            // SAFETY: the block has 64 bytes.
            unsafe { p.write_bytes(i as u8, 64) };
            p
        })
        .collect();
    for p in blocks {
        // SAFETY: allocated above with this layout, freed once.
        unsafe { alloc.dealloc(p, layout) };
    }
}

/// Within the release delay, the arenas of a round just freed serve the
/// next round: none is mapped afresh, and their pages stay resident
/// instead of being faulted in again.
#[test]
fn a_second_round_within_the_delay_takes_the_first_rounds_arenas() {
    // A delay no test run outlasts, so nothing expires meanwhile.
    static KEEPING: PyMalloc =
        PyMalloc::system_with(Config::DEFAULT.with_release_delay_ms(1 << 30));
    let _serial = SERIAL.lock().unwrap();
    fill_and_free(&KEEPING);
    let first = KEEPING.stats();
    assert!(first.arenas_allocated_total >= 30, "{first}");
    assert!(
        first.arenas_retired >= first.arenas_allocated_total - 3,
        "{first}"
    );
    assert_eq!(first.arenas_reclaimed, 0, "{first}");
    fill_and_free(&KEEPING);
    let second = KEEPING.stats();
    assert_eq!(
        second.arenas_allocated_total, first.arenas_allocated_total,
        "the second round mapped arenas of its own: {second}"
    );
    assert_eq!(second.arenas_retired, first.arenas_retired, "{second}");
}

/// Once the delay has passed, the next call into the allocator gives the
/// retired arenas back, and with them their pages.
#[test]
fn retired_arenas_go_back_once_the_delay_has_passed() {
    static BRIEF: PyMalloc = PyMalloc::system_with(Config::DEFAULT.with_release_delay_ms(5));
    let _serial = SERIAL.lock().unwrap();
    let before = resident_bytes();
    fill_and_free(&BRIEF);
    std::thread::sleep(Duration::from_millis(20));
    // Blocks of a class no cache holds, so that the calls reach a heap
    // (the cache's refill and flush, where the set sweeps; or, without
    // caches, the heap itself). Not `stats()`, which would release the
    // arenas itself.
    let layout = Layout::from_size_align(200, 8).unwrap();
    // SAFETY: a non-zero size; each block freed once.
    let blocks: Vec<*mut u8> = (0..2000).map(|_| unsafe { BRIEF.alloc(layout) }).collect();
    for p in blocks {
        // SAFETY: allocated above with this layout.
        unsafe { BRIEF.dealloc(p, layout) };
    }
    let after = resident_bytes();
    let stats = BRIEF.stats();
    assert!(stats.arenas_retired <= 2, "{stats}");
    assert!(stats.arenas_reclaimed >= 30, "{stats}");
    assert_eq!(
        stats.arenas_reclaimed + stats.arenas_current,
        stats.arenas_allocated_total,
        "{stats}"
    );
    assert!(
        after < before + (4 << 20),
        "resident: {} MiB before, {} after",
        before >> 20,
        after >> 20
    );
}
