//! The reachability scan (`move_unreachable`): objects it passes over before
//! something reachable reaches them must survive with their counts intact,
//! however deep the chain of such revivals, without recursion.
#![cfg(feature = "std")]

mod common;

use common::{drops, on_small_stack, Node};
use pymalloc::{gc, Cc, Trace, Visitor};
use std::cell::RefCell;

/// A chain whose newest node holds all the others: the scan meets every
/// node before its only referrer.
#[test]
fn chain_held_by_its_newest_node_survives_every_generation() {
    on_small_stack(|| {
        gc::disable();
        const N: usize = 100_000;
        let mut head = Node::new(0);
        for id in 1..N {
            let next = Node::new(id);
            Node::link(&next, &head);
            head = next;
        }
        // Garbage beside it, found in the same collection.
        let g = Node::new(usize::MAX);
        Node::link(&g, &g);
        drop(g);
        for generation in 0..3 {
            let freed = gc::collect_generation(generation);
            assert_eq!(
                freed,
                usize::from(generation == 0),
                "generation {generation}"
            );
            assert_eq!(drops(), 1);
        }
        // Intact and in order; every count is 2: its referrer and `cur`.
        let mut cur = head.clone();
        for id in (0..N).rev() {
            assert_eq!(cur.id, id);
            assert_eq!(Cc::strong_count(&cur), 2);
            let next = cur.edges.borrow().first().cloned();
            match next {
                Some(next) => cur = next,
                None => assert_eq!(id, 0),
            }
        }
        drop(cur);
        drop(head);
        assert_eq!(drops(), N + 1);
        assert_eq!(gc::collect(), 0);
        gc::enable();
    });
}

/// A diamond and a garbage cycle pointing into it, created so that the
/// scan passes over every live node before reaching the root.
#[test]
fn revived_objects_keep_exact_counts() {
    gc::disable();
    let (root, weak) = {
        let z = Node::new(0);
        let x = Node::new(1);
        let y = Node::new(2);
        Node::link(&x, &z);
        Node::link(&y, &z);
        let g1 = Node::new(3);
        let g2 = Node::new(4);
        Node::link(&g1, &g2);
        Node::link(&g2, &g1);
        Node::link(&g1, &z);
        let root = Node::new(5);
        Node::link(&root, &x);
        Node::link(&root, &y);
        (root, [x, y, z].map(|n| Cc::downgrade(&n)))
    };
    assert_eq!(gc::collect_generation(0), 2);
    assert_eq!(drops(), 2);
    assert_eq!(weak.each_ref().map(|w| w.strong_count()), [1, 1, 2]);
    drop(root);
    assert_eq!(drops(), 6);
    assert!(weak.iter().all(|w| w.upgrade().is_none()));
    gc::enable();
}

/// Drops the `Cc` it holds whenever it is traced: user code dropping a
/// tracked object to zero in the middle of a collection.
struct Dropper {
    victim: RefCell<Option<Cc<Node>>>,
}

// SAFETY: visits nothing, which the contract allows (it only leaks).
unsafe impl Trace for Dropper {
    fn trace(&self, _: &mut Visitor<'_>) {
        if let Ok(mut victim) = self.victim.try_borrow_mut() {
            victim.take();
        }
    }
}

#[test]
fn trace_dropping_a_cc_mid_collection_defers_it_to_the_next() {
    gc::disable();
    // Garbage on both sides of the victim in the scan order.
    let before = Node::new(0);
    Node::link(&before, &before);
    let victim = Node::new(1);
    let after = Node::new(2);
    Node::link(&after, &after);
    let dropper = Cc::new(Dropper {
        victim: RefCell::new(Some(victim)),
    });
    drop((before, after));
    assert_eq!(gc::collect_generation(0), 2, "the two self-cycles");
    assert_eq!(drops(), 2);
    // The victim, dropped to zero while the collection ran, is left in
    // place and freed by the next one.
    assert_eq!(gc::collect(), 1);
    assert_eq!(drops(), 3);
    drop(dropper);
    gc::enable();
}
