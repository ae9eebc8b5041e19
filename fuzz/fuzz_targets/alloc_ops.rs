//! A byte string drives alloc/realloc/free of random sizes and alignments
//! on a `Region` heap (its pools poisoned under ASan), checked against the model
//! (contents, overlap, alignment) and the heap's own statistics.
#![no_main]

#[path = "../../tests/common/model.rs"]
mod model;

use libfuzzer_sys::fuzz_target;
use model::Model;
use pymalloc::{Config, PyMalloc, Region};
use std::sync::Mutex;

fuzz_target!(|ops: &[u8]| {
    // The first byte picks the geometry: small pools, default pools, and
    // default pools with the medium tier (a region has it from 256 MiB).
    let (config, len) = match ops.first().map(|b| b & 3) {
        Some(3) => (Config::DEFAULT, Region::MEDIUM_SPAN),
        Some(1) => (Config::DEFAULT, 1 << 20),
        _ => (Config::SMALL, 128 << 10),
    };
    // One span for every input, taken once: mapping and unmapping 256 MiB
    // for each input cost five runs in six.
    static SPAN: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    let mut memory = SPAN.lock().unwrap();
    if memory.len() < len {
        *memory = vec![0u8; Region::MEDIUM_SPAN];
    }
    let heap = PyMalloc::region_uninit_with(config);
    // SAFETY: `memory` is locked until `heap` is dropped below, and nothing
    // else touches it meanwhile.
    unsafe { heap.init(memory.as_mut_ptr(), len) };
    let mut model = Model::new(&heap, true);
    model.run(ops.get(1..).unwrap_or_default());
    let stats = heap.stats();
    assert_eq!(stats.accounted_arena_bytes(), stats.arena_bytes());
    assert_eq!(stats.live_allocations(), model.live_blocks());
    model.free_all();
    let stats = heap.stats();
    assert_eq!((stats.live_allocations(), stats.requested_bytes), (0, 0));
    drop(heap);
    drop(memory);
});
