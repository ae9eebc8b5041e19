//! Random alloc/realloc/free sequences against the model: no overlap, every
//! alignment honoured, contents kept across realloc.

mod common;

use common::model::Model;
use pymalloc::{Config, PyMalloc};

fn random_ops(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn check_stats_add_up<B: pymalloc::Backing>(heap: &PyMalloc<B>) {
    let stats = heap.stats();
    assert_eq!(
        stats.accounted_arena_bytes(),
        stats.arena_bytes(),
        "{stats}"
    );
}

#[test]
#[cfg(feature = "std")]
fn system_heap_matches_the_model() {
    for seed in 1..=8 {
        let heap = PyMalloc::system();
        let mut model = Model::new(&heap, false);
        let ops = random_ops(seed, 200_000);
        for chunk in ops.chunks(4000) {
            model.run(chunk);
            check_stats_add_up(&heap);
            assert_eq!(heap.stats().live_allocations(), model.live_blocks());
        }
        model.free_all();
        let stats = heap.stats();
        assert_eq!((stats.live_allocations(), stats.requested_bytes), (0, 0));
        // The spare at most, beside arenas waiting out the release delay.
        assert!(stats.arenas_current - stats.arenas_retired <= 1, "{stats}");
    }
}

#[test]
fn small_region_heap_matches_the_model_and_runs_out_cleanly() {
    let mut memory = vec![0u8; 256 * 1024];
    let heap = PyMalloc::region_uninit_with(Config::SMALL);
    // SAFETY: `memory` outlives `heap` and nothing else touches it.
    unsafe { heap.init(memory.as_mut_ptr(), memory.len()) };
    let mut model = Model::new(&heap, true);
    for seed in 1..=4 {
        model.run(&random_ops(seed, 100_000));
        check_stats_add_up(&heap);
    }
    assert!(
        model.nulls > 0,
        "the workload should exhaust a 256 KiB region"
    );
    model.free_all();
    assert_eq!(heap.stats().blocks_in_use(), 0);
    drop(heap);
    drop(memory);
}
