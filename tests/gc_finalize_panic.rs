//! A finalizer that panics when the last `Cc` goes away keeps only its own
//! object alive, until the next collection; its children are not leaked.
#![cfg(feature = "std")]

use pymalloc::{gc, Cc, Finalize, Trace};
use std::cell::Cell;

thread_local! {
    static TREE_DROPS: Cell<usize> = const { Cell::new(0) };
    static BOMB_DROPS: Cell<usize> = const { Cell::new(0) };
    static FINALIZED: Cell<usize> = const { Cell::new(0) };
}

#[derive(Trace)]
struct Tree {
    children: Vec<Cc<Tree>>,
}

impl Drop for Tree {
    fn drop(&mut self) {
        TREE_DROPS.with(|d| d.set(d.get() + 1));
    }
}

#[derive(Trace)]
#[trace(finalize)]
struct Bomb {
    tree: Cc<Tree>,
}

impl Finalize for Bomb {
    fn finalize(&self) {
        FINALIZED.with(|f| f.set(f.get() + 1));
        panic!("boom in a finalizer");
    }
}

impl Drop for Bomb {
    fn drop(&mut self) {
        BOMB_DROPS.with(|d| d.set(d.get() + 1));
    }
}

const NODES: usize = 10_000;

/// A tree of `NODES` nodes: a spine as deep as a tenth of them, each spine
/// node with nine leaves (built bottom-up, without recursion).
fn tree() -> Cc<Tree> {
    let mut node = Cc::new(Tree {
        children: Vec::new(),
    });
    let mut count = 1;
    while count < NODES {
        let mut children = vec![node];
        while children.len() < 10 && count + children.len() < NODES {
            children.push(Cc::new(Tree {
                children: Vec::new(),
            }));
        }
        count += children.len();
        node = Cc::new(Tree { children });
    }
    node
}

#[test]
fn a_panicking_finalizer_leaves_only_its_own_node_alive() {
    gc::collect();
    let baseline = gc::tracked_count();
    let bomb = Cc::new(Bomb { tree: tree() });
    let weak = Cc::downgrade(&bomb);
    let tracked = gc::tracked_count() - baseline;
    assert_eq!(tracked, NODES + 1);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(bomb)));
    assert!(result.is_err());
    assert_eq!(FINALIZED.with(Cell::get), 1);
    // The dying node cannot be reached again, and its subtree waits for it.
    assert!(weak.upgrade().is_none());
    assert_eq!(TREE_DROPS.with(Cell::get), 0);
    gc::collect();
    assert_eq!(TREE_DROPS.with(Cell::get), tracked - 1, "every tree node");
    assert_eq!(BOMB_DROPS.with(Cell::get), 1);
    assert_eq!(
        FINALIZED.with(Cell::get),
        1,
        "the finalizer does not run again"
    );
    assert_eq!(gc::tracked_count(), baseline);
    assert_eq!(gc::collect(), 0);
}
