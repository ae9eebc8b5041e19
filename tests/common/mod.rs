//! Shared test helpers: the allocator model, a random generator, a graph
//! node that counts its
//! drops and finalizations per thread, and a harness for tests whose
//! subject aborts the process. Each test file uses some of them.
#![allow(dead_code)]

pub mod model;
pub mod rng;
pub mod utilisation;

use pymalloc::{Cc, Trace};
use std::cell::{Cell, RefCell};

thread_local! {
    pub static DROPS: Cell<usize> = const { Cell::new(0) };
}

/// Drops of `Node`s on this thread so far.
pub fn drops() -> usize {
    DROPS.with(Cell::get)
}

#[derive(Trace)]
pub struct Node {
    pub id: usize,
    pub edges: RefCell<Vec<Cc<Node>>>,
}

impl Node {
    pub fn new(id: usize) -> Cc<Node> {
        Cc::new(Node {
            id,
            edges: RefCell::new(Vec::new()),
        })
    }

    pub fn link(from: &Cc<Node>, to: &Cc<Node>) {
        from.edges.borrow_mut().push(to.clone());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        DROPS.with(|d| d.set(d.get() + 1));
    }
}

/// Runs `f` on a thread with a small stack, to prove it does not recurse.
pub fn on_small_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

/// For a test whose misbehaviour must abort the process: in a child copy of
/// the test binary (picked by an environment variable naming the test),
/// runs `bad`, which must not return; in the parent, runs that child and
/// checks it died of SIGABRT after printing every `expected` text.
#[cfg(unix)]
pub fn expect_abort_in_child(name: &str, bad: impl FnOnce(), expected: &[&str]) {
    use std::os::unix::process::ExitStatusExt;
    const CASE: &str = "PYMALLOC_TEST_ABORT_CASE";
    /// SIGABRT, 6 on every unix Rust supports.
    const SIGABRT: i32 = 6;
    if std::env::var(CASE).as_deref() == Ok(name) {
        bad();
        panic!("{name}: the misbehaviour was let through instead of aborting");
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CASE, name)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(SIGABRT),
        "the child did not abort:\n{stderr}"
    );
    for text in expected {
        assert!(stderr.contains(text), "missing {text:?} in:\n{stderr}");
    }
}
