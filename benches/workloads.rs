//! What the two global-allocator benchmarks (`alloc`, and `tracemalloc`
//! for its overhead table) share: how a process learns its contender before
//! `main`, and the single-threaded workloads, so that both measure the same
//! code.

use std::collections::HashMap;
use std::hint::black_box;

extern "C" {
    fn getenv(name: *const std::ffi::c_char) -> *const std::ffi::c_char;
}

/// The contender in `BENCH_CONTENDER` (0 if unset), read without
/// allocating: a global allocator asks at its first allocation, before
/// `main`, when `std::env` cannot be used.
pub fn contender_from_env() -> u8 {
    // SAFETY: a NUL-terminated name; getenv does not allocate, and its
    // answer, when not null, is a NUL-terminated string.
    let value = unsafe { getenv(c"BENCH_CONTENDER".as_ptr()) };
    if value.is_null() {
        return 0;
    }
    // SAFETY: see above.
    unsafe { std::ffi::CStr::from_ptr(value) }
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A small deterministic generator, the same sequence for every contender.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// 10k live blocks of random small sizes; each step frees one at random
/// and allocates a new one in its place.
pub fn churn(steps: usize) -> usize {
    let mut rng = Rng(1);
    let mut live: Vec<Vec<u8>> = (0..10_000).map(|_| vec![1u8; 8 + rng.below(505)]).collect();
    for _ in 0..steps {
        let slot = rng.below(live.len());
        live[slot] = vec![2u8; 8 + rng.below(505)];
    }
    black_box(&live);
    steps
}

/// Allocate 100 blocks, free them newest first, over and over.
pub fn lifo(rounds: usize) -> usize {
    let mut stack: Vec<Box<[u64; 4]>> = Vec::with_capacity(100);
    for r in 0..rounds {
        for i in 0..100 {
            stack.push(Box::new([(r + i) as u64; 4]));
        }
        while let Some(b) = stack.pop() {
            black_box(b);
        }
    }
    rounds * 100
}

/// Build and drop complete binary trees (the benchmarks-game workload).
pub fn binary_trees(rounds: usize) -> usize {
    struct Node(Option<Box<(Node, Node)>>);
    fn build(depth: u32) -> Node {
        Node((depth > 0).then(|| Box::new((build(depth - 1), build(depth - 1)))))
    }
    fn count(n: &Node) -> usize {
        n.0.as_ref().map_or(1, |c| 1 + count(&c.0) + count(&c.1))
    }
    let mut nodes = 0;
    for _ in 0..rounds {
        nodes += count(&build(16));
    }
    nodes
}

/// Build and drop JSON-like records: maps of short strings.
pub fn json(records: usize) -> usize {
    let mut rng = Rng(3);
    let mut batch = Vec::new();
    for i in 0..records {
        let mut record: HashMap<String, String> = HashMap::new();
        for f in 0..6 {
            record.insert(format!("field{f}"), "v".repeat(1 + rng.below(40)));
        }
        batch.push(record);
        if i % 1000 == 999 {
            batch.clear();
        }
    }
    records * 13
}
