//! Every geometry `Config::new` accepts works over the `System` backing:
//! each class allocates, and no arena loses a pool to alignment (a one-pool
//! arena with pools larger than a page used to hold no pool at all).
#![cfg(feature = "std")]

use pymalloc::config::{MAX_ARENA_POOLS, MAX_POOL_SIZE, MIN_POOL_SIZE};
use pymalloc::size_class::{class_size, CLASS_COUNT};
use pymalloc::{Config, PyMalloc};
use std::alloc::{GlobalAlloc, Layout};

#[test]
fn every_accepted_geometry_serves_every_class_from_whole_arenas() {
    let pool_sizes = (0..).map(|shift| MIN_POOL_SIZE << shift);
    for pool_size in pool_sizes.take_while(|&size| size <= MAX_POOL_SIZE) {
        for arena_pools in 1..=MAX_ARENA_POOLS {
            let config = Config::new(pool_size, arena_pools).with_heaps(1);
            let owned = PyMalloc::system_with(config);
            let heap = &owned;
            let blocks: Vec<(*mut u8, Layout)> = (0..CLASS_COUNT)
                .flat_map(|class| {
                    let layout = Layout::from_size_align(class_size(class), 8).unwrap();
                    // SAFETY: non-zero size.
                    (0..3).map(move |_| (unsafe { heap.alloc(layout) }, layout))
                })
                .collect();
            assert!(
                blocks.iter().all(|(block, _)| !block.is_null()),
                "{config:?}: an allocation failed"
            );
            let stats = heap.stats();
            assert_eq!(stats.arena_alignment_bytes, 0, "{config:?}");
            // The small classes' pools, in this geometry's arenas (with the
            // `debug` feature the largest requests, guards added, are
            // medium blocks, whose runs are in arenas of their own).
            let pools: usize = stats.classes[..CLASS_COUNT]
                .iter()
                .map(|class| class.pools)
                .sum();
            assert!(pools <= stats.arenas_current * arena_pools, "{config:?}");
            for (block, layout) in blocks {
                // SAFETY: allocated above with `layout`, freed once.
                unsafe { heap.dealloc(block, layout) };
            }
        }
    }
}
