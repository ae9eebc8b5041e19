//! The global allocator of the `real_crates` and `spike` benchmarks: glibc
//! (`System`), PyMalloc over it, or mimalloc, one per process, chosen
//! from `BENCH_CONTENDER` at the first allocation so that no block crosses
//! from one allocator to another.

use pymalloc::PyMalloc;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

/// The contenders in table order; a child's number indexes this.
pub const CONTENDERS: [&str; 3] = ["glibc", "pymalloc", "mimalloc"];

/// Positions in [`CONTENDERS`].
pub mod id {
    pub const GLIBC: usize = 0;
    pub const PYMALLOC: usize = 1;
    pub const MIMALLOC: usize = 2;
}

/// The PyMalloc contender, for its statistics.
pub static PYMALLOC: PyMalloc = PyMalloc::system();
static MIMALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

static CHOICE: AtomicU8 = AtomicU8::new(u8::MAX);

/// This process's contender.
#[inline]
pub fn choice() -> usize {
    match CHOICE.load(Ordering::Relaxed) {
        u8::MAX => choose(),
        c => c,
    }
    .into()
}

#[cold]
fn choose() -> u8 {
    let c = crate::workloads::contender_from_env();
    CHOICE.store(c, Ordering::Relaxed);
    c
}

macro_rules! dispatch {
    ($method:ident($($arg:expr),*)) => {
        match choice() {
            id::PYMALLOC => PYMALLOC.$method($($arg),*),
            id::MIMALLOC => MIMALLOC.$method($($arg),*),
            _ => System.$method($($arg),*),
        }
    };
}

crate::global::dispatching_global_allocator!();
