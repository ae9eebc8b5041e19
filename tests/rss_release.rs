//! Freed arenas go back to the operating system: the process's resident set
//! shrinks after a spike of small objects is freed, but for the few arenas
//! the backing keeps mapped for the next ones.
#![cfg(all(feature = "std", target_os = "linux"))]

use pymalloc::backing::RETAINED_ARENAS;
use pymalloc::PyMalloc;

#[global_allocator]
static ALLOC: PyMalloc = PyMalloc::system();

fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn a_spike_of_small_objects_is_returned_after_it_is_freed() {
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
    let after = resident_bytes();
    let stats = ALLOC.stats();
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
