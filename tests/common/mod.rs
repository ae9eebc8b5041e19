//! Shared test helpers: the allocator model, and a graph node that counts
//! its drops and finalizations per thread. Each test file uses some of them.
#![allow(dead_code)]

pub mod model;

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
