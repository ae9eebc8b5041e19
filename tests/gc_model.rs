//! Model-based test: random graphs of `Cc` nodes are built, rewired and
//! dropped, collected, and checked against a reachability model: everything
//! unreachable freed exactly once, everything reachable untouched.
//!
//! Half the runs give every node a finalizer (which empties the edges of
//! every third node, as a finalizer breaking its own cycle would), so the
//! finalize-then-recheck path is modelled too: each node is finalized
//! exactly once, when it dies.
//!
//! `PYMALLOC_MODEL_ROUNDS` sets the number of rounds (default 300).
#![cfg(feature = "std")]

mod common;

use common::rng::Rng;
use pymalloc::{gc, Cc, Trace, Visitor, Weak};
use std::cell::RefCell;
use std::collections::BTreeSet;

thread_local! {
    static DROPS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    static FINALIZED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// A graph node; with `F`, it has a finalizer.
struct MNode<const F: bool> {
    id: usize,
    edges: RefCell<Vec<Cc<MNode<F>>>>,
}

impl<const F: bool> MNode<F> {
    fn finalize(&self) {
        FINALIZED.with(|f| {
            let mut f = f.borrow_mut();
            f[self.id] += 1;
            assert_eq!(f[self.id], 1, "node {} finalized twice", self.id);
        });
        assert_eq!(
            DROPS.with(|d| d.borrow()[self.id]),
            0,
            "finalized after drop"
        );
        if self.id % 3 == 0 {
            self.edges.borrow_mut().clear();
        }
    }
}

// SAFETY: visits only the handles in `edges`, which it owns.
unsafe impl<const F: bool> Trace for MNode<F> {
    const FINALIZER: Option<fn(&Self)> = if F { Some(Self::finalize) } else { None };

    fn trace(&self, visitor: &mut Visitor<'_>) {
        self.edges.trace(visitor);
    }
}

impl<const F: bool> Drop for MNode<F> {
    fn drop(&mut self) {
        DROPS.with(|d| {
            let mut d = d.borrow_mut();
            d[self.id] += 1;
            assert_eq!(d[self.id], 1, "node {} dropped twice", self.id);
        });
    }
}

struct Model<const F: bool> {
    /// Edges of every node not yet known dead.
    edges: Vec<Vec<usize>>,
    weaks: Vec<Weak<MNode<F>>>,
    roots: Vec<(usize, Cc<MNode<F>>)>,
    dead: BTreeSet<usize>,
}

impl<const F: bool> Model<F> {
    fn new() -> Self {
        Model {
            edges: Vec::new(),
            weaks: Vec::new(),
            roots: Vec::new(),
            dead: BTreeSet::new(),
        }
    }

    fn alive(&self, rng: &mut Rng) -> Option<(usize, Cc<MNode<F>>)> {
        let n = self.weaks.len();
        if n == 0 {
            return None;
        }
        let id = rng.below(n);
        self.weaks[id].upgrade().map(|cc| (id, cc))
    }

    fn step(&mut self, rng: &mut Rng) {
        match rng.below(10) {
            0..=2 => {
                let id = self.weaks.len();
                DROPS.with(|d| d.borrow_mut().push(0));
                FINALIZED.with(|f| f.borrow_mut().push(0));
                let node = Cc::new(MNode {
                    id,
                    edges: RefCell::new(Vec::new()),
                });
                self.weaks.push(Cc::downgrade(&node));
                self.edges.push(Vec::new());
                match self.alive(rng) {
                    Some((parent, p)) if rng.below(2) == 0 && parent != id => {
                        p.edges.borrow_mut().push(node);
                        self.edges[parent].push(id);
                    }
                    _ => self.roots.push((id, node)),
                }
            }
            3..=5 => {
                if let (Some((i, a)), Some((j, b))) = (self.alive(rng), self.alive(rng)) {
                    a.edges.borrow_mut().push(b);
                    self.edges[i].push(j);
                }
            }
            6 | 7 => {
                if let Some((i, a)) = self.alive(rng) {
                    let len = a.edges.borrow().len();
                    if len > 0 {
                        let k = rng.below(len);
                        let removed = a.edges.borrow_mut().remove(k);
                        self.edges[i].remove(k);
                        drop(removed);
                    }
                }
            }
            8 => {
                if !self.roots.is_empty() {
                    let k = rng.below(self.roots.len());
                    self.roots.swap_remove(k);
                }
            }
            _ => {
                if let Some((i, a)) = self.alive(rng) {
                    self.roots.push((i, a));
                }
            }
        }
    }

    fn reachable(&self) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<usize> = self.roots.iter().map(|(id, _)| *id).collect();
        while let Some(id) = stack.pop() {
            if seen.insert(id) {
                stack.extend(&self.edges[id]);
            }
        }
        seen
    }

    /// Reachable nodes are intact; after a full collection, the rest are
    /// freed exactly once.
    fn check(&mut self, full: bool) {
        let reachable = self.reachable();
        let drops = DROPS.with(|d| d.borrow().clone());
        let finalized = FINALIZED.with(|f| f.borrow().clone());
        for (id, weak) in self.weaks.iter().enumerate() {
            if reachable.contains(&id) {
                let node = weak.upgrade().expect("reachable node freed");
                assert_eq!(node.id, id);
                let edges: Vec<usize> = node.edges.borrow().iter().map(|e| e.id).collect();
                assert_eq!(
                    edges, self.edges[id],
                    "edges of reachable node {id} changed"
                );
                assert_eq!(drops[id], 0);
                assert_eq!(finalized[id], 0);
            } else if full {
                assert!(weak.upgrade().is_none(), "unreachable node {id} survived");
                assert_eq!(drops[id], 1, "unreachable node {id} not dropped once");
                assert_eq!(finalized[id], u32::from(F), "node {id} finalizer count");
                if self.dead.insert(id) {
                    self.edges[id].clear();
                }
            }
        }
    }
}

fn run<const F: bool>(seed: u64, rounds: usize) {
    let mut rng = Rng::new(seed);
    let mut model = Model::<F>::new();
    gc::set_threshold(1 + rng.below(50), 1 + rng.below(5), 1 + rng.below(5));
    for _ in 0..rounds {
        for _ in 0..rng.below(40) {
            model.step(&mut rng);
        }
        match rng.below(4) {
            0 => {
                gc::collect();
                model.check(true);
            }
            1 => {
                gc::collect_generation(rng.below(2));
                model.check(false);
            }
            _ => {}
        }
    }
    model.roots.clear();
    gc::collect();
    model.check(true);
    assert_eq!(gc::tracked_count(), 0);
}

fn rounds() -> usize {
    std::env::var("PYMALLOC_MODEL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

#[test]
fn random_graphs_match_the_reachability_model() {
    for seed in 1..=8u64 {
        // Each seed on a fresh thread, hence a fresh default collector.
        let rounds = rounds();
        let seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let run = if seed % 2 == 0 {
            run::<true>
        } else {
            run::<false>
        };
        std::thread::spawn(move || run(seed, rounds))
            .join()
            .unwrap();
    }
}
