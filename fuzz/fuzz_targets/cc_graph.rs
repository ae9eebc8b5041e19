//! A byte string builds, rewires and drops a graph of `Cc` nodes (some with
//! finalizers that resurrect what they hold or break their own edges),
//! collects full and young generations, and after every step checks the
//! real graph against a reachability model: nothing reachable is dropped,
//! finalized or weakly cleared, nothing is dropped or finalized twice, a
//! weak reference to a dropped node never upgrades, and after a full
//! collection everything unreachable has been dropped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pymalloc::{gc, Cc, PyMalloc, Trace, Visitor, Weak};
use std::cell::RefCell;
use std::mem;

#[global_allocator]
static ALLOC: PyMalloc = PyMalloc::system();

/// Nodes per input, so each run stays fast.
const MAX_NODES: usize = 200;

/// What a node's finalizer does.
#[derive(Clone, Copy, PartialEq)]
enum Finalizer {
    /// Only counts that it ran.
    Count,
    /// Stores a clone of the node's first edge in `RESURRECTED`.
    Resurrect,
    /// Empties the node's edges, as a finalizer breaking its cycle would.
    Break,
}

/// Per-node events, indexed by node id.
#[derive(Default)]
struct Log {
    drops: Vec<u8>,
    finalized: Vec<u8>,
    /// Nodes whose `Break` finalizer emptied their edges, in order.
    broken: Vec<usize>,
}

thread_local! {
    static LOG: RefCell<Log> = RefCell::default();
    /// Where `Resurrect` finalizers store what they save: a second root set.
    static RESURRECTED: RefCell<Vec<Edge>> = const { RefCell::new(Vec::new()) };
}

/// A node; `F` says whether its type has a finalizer at all, so both of the
/// collector's paths (with and without a finalizer pass) run.
struct Node<const F: bool> {
    id: usize,
    finalizer: Finalizer,
    edges: RefCell<Vec<Edge>>,
}

impl<const F: bool> Node<F> {
    fn finalize(&self) {
        let finalized = LOG.with(|log| {
            let mut log = log.borrow_mut();
            assert_eq!(
                log.drops[self.id], 0,
                "node {} finalized after drop",
                self.id
            );
            log.finalized[self.id] += 1;
            log.finalized[self.id]
        });
        assert_eq!(finalized, 1, "node {} finalized twice", self.id);
        match self.finalizer {
            Finalizer::Count => {}
            Finalizer::Resurrect => {
                if let Some(first) = self.edges.borrow().first().cloned() {
                    RESURRECTED.with(|r| r.borrow_mut().push(first));
                }
            }
            Finalizer::Break => {
                LOG.with(|log| log.borrow_mut().broken.push(self.id));
                // Taken out first: dropping the edges runs other nodes' code.
                drop(mem::take(&mut *self.edges.borrow_mut()));
            }
        }
    }
}

// SAFETY: visits only the handles in `edges`, which the node owns.
unsafe impl<const F: bool> Trace for Node<F> {
    const FINALIZER: Option<fn(&Self)> = if F { Some(Self::finalize) } else { None };

    fn trace(&self, visitor: &mut Visitor<'_>) {
        self.edges.trace(visitor);
    }
}

impl<const F: bool> Drop for Node<F> {
    fn drop(&mut self) {
        LOG.with(|log| {
            let mut log = log.borrow_mut();
            log.drops[self.id] += 1;
            assert_eq!(log.drops[self.id], 1, "node {} dropped twice", self.id);
            if F {
                assert_eq!(
                    log.finalized[self.id], 1,
                    "node {} dropped unfinalized",
                    self.id
                );
            }
        });
    }
}

/// A handle to a node of either kind.
#[derive(Clone, Trace)]
enum Edge {
    Plain(Cc<Node<false>>),
    Final(Cc<Node<true>>),
}

enum WeakEdge {
    Plain(Weak<Node<false>>),
    Final(Weak<Node<true>>),
}

impl Edge {
    fn new(id: usize, finalizer: Option<Finalizer>) -> Edge {
        let edges = RefCell::new(Vec::new());
        match finalizer {
            None => Edge::Plain(Cc::new(Node {
                id,
                finalizer: Finalizer::Count,
                edges,
            })),
            Some(finalizer) => Edge::Final(Cc::new(Node {
                id,
                finalizer,
                edges,
            })),
        }
    }

    fn id(&self) -> usize {
        match self {
            Edge::Plain(n) => n.id,
            Edge::Final(n) => n.id,
        }
    }

    fn edges(&self) -> &RefCell<Vec<Edge>> {
        match self {
            Edge::Plain(n) => &n.edges,
            Edge::Final(n) => &n.edges,
        }
    }

    fn downgrade(&self) -> WeakEdge {
        match self {
            Edge::Plain(n) => WeakEdge::Plain(Cc::downgrade(n)),
            Edge::Final(n) => WeakEdge::Final(Cc::downgrade(n)),
        }
    }
}

impl WeakEdge {
    /// The id of the node it upgrades to, if it does.
    fn upgrade_id(&self) -> Option<usize> {
        match self {
            WeakEdge::Plain(w) => w.upgrade().map(|n| n.id),
            WeakEdge::Final(w) => w.upgrade().map(|n| n.id),
        }
    }
}

/// The graph as it should be.
#[derive(Default)]
struct Model {
    /// Edges of each node, by id.
    edges: Vec<Vec<usize>>,
    /// Ids of the harness's roots, parallel to the real ones.
    roots: Vec<usize>,
    /// Nodes that were once unreachable from the harness's roots: the
    /// collector may have cleared their weak references and finalized them.
    condemned: Vec<bool>,
    /// How many entries of `Log::broken` are applied to `edges`.
    broken_seen: usize,
}

impl Model {
    /// Ids reachable from `roots`.
    fn reach(&self, roots: impl IntoIterator<Item = usize>) -> Vec<bool> {
        let mut seen = vec![false; self.edges.len()];
        let mut stack: Vec<usize> = roots.into_iter().collect();
        while let Some(id) = stack.pop() {
            if !mem::replace(&mut seen[id], true) {
                stack.extend(&self.edges[id]);
            }
        }
        seen
    }
}

/// The fuzz input, read a byte at a time (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }

    fn index(&mut self, len: usize) -> usize {
        usize::from(self.byte()) % len
    }
}

struct Harness {
    roots: Vec<Edge>,
    weaks: Vec<(usize, WeakEdge)>,
    model: Model,
}

impl Harness {
    fn new_node(&mut self, kind: u8) {
        let id = self.model.edges.len();
        self.model.edges.push(Vec::new());
        self.model.condemned.push(false);
        self.model.roots.push(id);
        LOG.with(|log| {
            let mut log = log.borrow_mut();
            log.drops.push(0);
            log.finalized.push(0);
        });
        let finalizer = match kind % 4 {
            0 => None,
            1 => Some(Finalizer::Count),
            2 => Some(Finalizer::Resurrect),
            _ => Some(Finalizer::Break),
        };
        // May run an automatic collection.
        self.roots.push(Edge::new(id, finalizer));
    }

    fn step(&mut self, input: &mut Input<'_>) {
        match input.byte() % 12 {
            9 => {
                gc::collect();
                self.check(true);
                return;
            }
            10 => {
                gc::collect_generation(usize::from(input.byte() % 2));
            }
            11 => {
                // Rescue a resurrected node into the roots, or let one go.
                let taken = RESURRECTED.with(|r| r.borrow_mut().pop());
                if let Some(edge) = taken {
                    if input.byte() % 2 == 0 {
                        self.model.roots.push(edge.id());
                        self.roots.push(edge);
                    }
                }
            }
            op if op < 2 || self.roots.is_empty() => {
                if self.model.edges.len() < MAX_NODES {
                    self.new_node(input.byte());
                }
            }
            2 | 3 => {
                let (from, to) = (input.index(self.roots.len()), input.index(self.roots.len()));
                let target = self.roots[to].clone();
                self.roots[from].edges().borrow_mut().push(target);
                let to = self.model.roots[to];
                self.model.edges[self.model.roots[from]].push(to);
            }
            4 => {
                let from = input.index(self.roots.len());
                let len = self.roots[from].edges().borrow().len();
                if len > 0 {
                    let k = input.index(len);
                    self.model.edges[self.model.roots[from]].remove(k);
                    let edge = self.roots[from].edges().borrow_mut().remove(k);
                    drop(edge); // outside the borrow: may run finalizers
                }
            }
            5 => {
                let from = input.index(self.roots.len());
                let len = self.roots[from].edges().borrow().len();
                if len > 0 {
                    let k = input.index(len);
                    let edge = self.roots[from].edges().borrow()[k].clone();
                    self.model.roots.push(edge.id());
                    self.roots.push(edge);
                }
            }
            6 | 7 => {
                let i = input.index(self.roots.len());
                self.model.roots.swap_remove(i);
                drop(self.roots.swap_remove(i));
            }
            _ => {
                let i = input.index(self.roots.len());
                self.weaks
                    .push((self.model.roots[i], self.roots[i].downgrade()));
            }
        }
        self.check(false);
    }

    /// Compares the real graph with the model. After a full collection,
    /// everything unreachable must have been dropped.
    fn check(&mut self, collected: bool) {
        let model = &mut self.model;
        LOG.with(|log| {
            let log = log.borrow();
            for &id in &log.broken[model.broken_seen..] {
                model.edges[id].clear();
            }
            model.broken_seen = log.broken.len();
        });
        let resurrected: Vec<Edge> = RESURRECTED.with(|r| r.borrow().clone());
        let from_roots = model.reach(model.roots.iter().copied());
        let reachable = model.reach(
            model
                .roots
                .iter()
                .copied()
                .chain(resurrected.iter().map(Edge::id)),
        );
        let (drops, finalized) =
            LOG.with(|log| (log.borrow().drops.clone(), log.borrow().finalized.clone()));

        // Walk the real graph: reachable nodes are alive with intact edges.
        let mut seen = vec![false; model.edges.len()];
        let mut stack: Vec<Edge> = self.roots.iter().chain(&resurrected).cloned().collect();
        for (edge, &id) in self.roots.iter().zip(&model.roots) {
            assert_eq!(edge.id(), id, "root mismatch");
        }
        while let Some(edge) = stack.pop() {
            let id = edge.id();
            assert_eq!(drops[id], 0, "reachable node {id} was dropped");
            if mem::replace(&mut seen[id], true) {
                continue;
            }
            let edges = edge.edges().borrow();
            let ids: Vec<usize> = edges.iter().map(Edge::id).collect();
            assert_eq!(ids, model.edges[id], "edges of node {id} changed");
            stack.extend(edges.iter().cloned());
        }
        assert_eq!(seen, reachable, "real and modelled reachability differ");

        for id in 0..model.edges.len() {
            if !from_roots[id] {
                model.condemned[id] = true;
            } else if !model.condemned[id] {
                assert_eq!(finalized[id], 0, "live node {id} was finalized");
            }
            if collected && !reachable[id] {
                assert_eq!(
                    drops[id], 1,
                    "unreachable node {id} survived a full collection"
                );
            }
        }
        for (id, weak) in &self.weaks {
            let upgraded = weak.upgrade_id();
            if drops[*id] == 1 {
                assert_eq!(upgraded, None, "weak to dropped node {id} upgraded");
            } else if from_roots[*id] && !model.condemned[*id] {
                assert_eq!(upgraded, Some(*id), "weak to live node {id} was cleared");
            }
        }
    }

    /// Lets go of everything; every node must then be dropped exactly once.
    fn finish(mut self) {
        self.roots.clear();
        self.model.roots.clear();
        // Finalizers may resurrect into `RESURRECTED` during a collection;
        // each runs once, so this ends.
        loop {
            gc::collect();
            let resurrected = RESURRECTED.with(|r| mem::take(&mut *r.borrow_mut()));
            if resurrected.is_empty() {
                break;
            }
            drop(resurrected);
        }
        self.check(true);
        LOG.with(|log| {
            let log = log.borrow();
            assert!(
                log.drops.iter().all(|&d| d == 1),
                "a node was never dropped"
            );
        });
        assert_eq!(gc::tracked_count(), 0, "tracked objects outlived the graph");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    // Small, input-chosen thresholds make automatic collections frequent.
    let t = input.byte();
    gc::set_threshold(usize::from(t % 32) + 1, usize::from(t >> 5) + 1, 2);
    LOG.with(|log| *log.borrow_mut() = Log::default());
    let mut harness = Harness {
        roots: Vec::new(),
        weaks: Vec::new(),
        model: Model::default(),
    };
    while !input.0.is_empty() {
        harness.step(&mut input);
    }
    harness.finish();
});
