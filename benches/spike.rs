//! Resident memory after a spike (issue 15): 400 MB of small and medium
//! objects (half the bytes 8-512 B, half 513 B-64 KiB, sizes drawn from a
//! seeded generator, interleaved), freed in random order. Shown for glibc,
//! PyMalloc and mimalloc, and, for PyMalloc, where what stays resident
//! sits, from its statistics.
//!
//! Resident figures are deterministic but for the process's own noise, so
//! the minimum of the interleaved runs is kept as elsewhere.
//!
//! `cargo bench -p pymalloc-bench --bench spike [-- REPS]`

// No timing here, and glibc is only a column.
#[allow(dead_code)]
mod driver;
mod global;
#[allow(dead_code)]
mod peers;
// Only the contender lookup and the generator are used here.
#[allow(dead_code)]
mod workloads;

use peers::{choice, id, CONTENDERS, PYMALLOC};
use workloads::Rng;

/// Bytes the spike allocates.
const SPIKE: usize = 400_000_000;

/// Resident bytes of this process.
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

/// A size for the next object: small while the small objects hold no more
/// bytes than the medium ones, else medium, log-uniform over 513 B-64 KiB
/// (so that every medium class sees traffic, not only the largest).
fn next_size(rng: &mut Rng, small: usize, medium: usize) -> usize {
    if small <= medium {
        return 8 + rng.below(505);
    }
    let log2 = 9.0 + 7.0 * (rng.below(1 << 20) as f64 / (1 << 20) as f64);
    (2f64.powf(log2) as usize).clamp(513, 64 << 10)
}

/// MiB, for the table.
fn mib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn child(contender: usize) {
    assert_eq!(choice(), contender);
    let mut rng = Rng(15);
    let baseline = resident_bytes();
    let mut objects = Vec::new();
    let (mut small, mut medium) = (0, 0);
    while small + medium < SPIKE {
        let size = next_size(&mut rng, small, medium);
        // Every byte written, so every page is resident.
        objects.push(vec![size as u8; size].into_boxed_slice());
        if size <= 512 {
            small += size;
        } else {
            medium += size;
        }
    }
    let peak = resident_bytes() - baseline;
    // Freed in random order (Fisher-Yates), as a program's objects die.
    for i in (1..objects.len()).rev() {
        objects.swap(i, rng.below(i + 1));
    }
    for object in objects {
        assert_eq!(object[0], object.len() as u8);
    }
    let after = resident_bytes().saturating_sub(baseline);
    println!("baseline RSS MiB\t{}", mib(baseline));
    println!("peak RSS above baseline MiB\t{}", mib(peak));
    println!("left after freeing MiB\t{}", mib(after));
    println!("left, % of peak\t{}", 100.0 * after as f64 / peak as f64);
    // mimalloc returns freed memory after a delay (10 ms for pages, 100 ms
    // for what is back in its arenas), PyMalloc once a heap has used no
    // arena for 50 ms (`Config::with_release_delay_ms`), both on a later
    // call: what a program that goes on working sees.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let later: Vec<Box<[u8]>> = (0..1000).map(|i| vec![1; 8 + i % 505].into()).collect();
    drop(later);
    let later = resident_bytes().saturating_sub(baseline);
    println!("left 100 ms and 1000 allocations later MiB\t{}", mib(later));
    println!("  % of peak\t{}", 100.0 * later as f64 / peak as f64);
    for (row, bytes) in where_it_sits(contender, later, baseline) {
        println!("{row} MiB\t{}", bytes.map_or(f64::NAN, mib));
    }
}

/// PyMalloc's account of what is left, from its statistics (`None` for
/// the other contenders). `after` is the resident set above `baseline`
/// after the free.
fn where_it_sits(
    contender: usize,
    after: usize,
    baseline: usize,
) -> [(&'static str, Option<usize>); 14] {
    // Read from another thread, which counts this thread's cached blocks
    // as free and leaves them cached; then this thread's own call returns
    // them to their pools: what the resident set loses then is what the
    // cache held (the arenas its blocks kept from being released).
    let pymalloc = contender == id::PYMALLOC;
    let stats = pymalloc
        .then(|| std::thread::scope(|s| s.spawn(|| PYMALLOC.stats()).join()))
        .map(|s| s.expect("stats thread"));
    if pymalloc {
        PYMALLOC.stats();
    }
    let after_flush = resident_bytes().saturating_sub(baseline);
    let field = |f: fn(&pymalloc::Stats) -> usize| stats.as_ref().map(f);
    [
        (
            "retained arenas (backing)",
            field(|s| s.retained_arena_bytes),
        ),
        (
            "retired arenas, small and medium (release delay)",
            field(|s| s.arenas_retired * s.arena_size + s.medium.retired * s.medium.arena_size),
        ),
        (
            "small arenas held (mapped)",
            field(|s| s.arenas_current * s.arena_size),
        ),
        (
            "  of which unused pools",
            field(|s| s.unused_pools * s.pool_size),
        ),
        ("  of which free small blocks", field(small_free_bytes)),
        (
            "medium arenas held (mapped)",
            field(|s| s.medium.current * s.medium.arena_size),
        ),
        (
            "  of which unused runs",
            field(|s| s.medium.unused_runs * s.medium.run_size),
        ),
        (
            "  of which free medium blocks",
            field(|s| s.available_block_bytes() - small_free_bytes(s)),
        ),
        ("blocks still in use", field(|s| s.allocated_block_bytes())),
        ("fallback (large blocks)", field(|s| s.large_bytes)),
        ("bookkeeping", field(|s| s.bookkeeping_bytes)),
        (
            "thread cache: blocks (count, not MiB)",
            field(|s| s.cached_blocks << 20),
        ),
        (
            "thread cache: RSS drop when returned",
            pymalloc.then(|| after.saturating_sub(after_flush)),
        ),
        (
            "left after the cache is returned",
            pymalloc.then_some(after_flush),
        ),
    ]
}

/// Bytes of free blocks in the small classes' used pools.
fn small_free_bytes(stats: &pymalloc::Stats) -> usize {
    stats.classes[..pymalloc::size_class::CLASS_COUNT]
        .iter()
        .map(|c| c.blocks_free * c.size)
        .sum()
}

fn main() {
    driver::main(&CONTENDERS, child, print_table);
}

fn print_table(best: &driver::Best) {
    best.print_table(
        &CONTENDERS,
        &format!(
            "MiB (and %), minimum of {} interleaved runs; the rows below the \
             percentage: PyMalloc's statistics after the free",
            best.reps
        ),
        &[],
        |_| Vec::new(),
    );
}
