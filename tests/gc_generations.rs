//! Generations, thresholds, freeze, stats and callbacks.
#![cfg(feature = "std")]

mod common;

use common::{drops, Node};
use pymalloc::gc::{self, CallbackInfo, Phase};
use pymalloc::{Cc, Trace, Visitor};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

fn garbage_cycle() {
    let a = Node::new(0);
    Node::link(&a, &a);
}

#[test]
fn defaults_are_cpythons() {
    assert_eq!(gc::threshold(), [700, 10, 10]);
    assert_eq!(gc::count(), [0, 0, 0]);
    assert!(gc::is_enabled());
}

#[test]
fn count_is_tracked_allocations_minus_deallocations() {
    gc::disable();
    let a = Node::new(1);
    let b = Node::new(2);
    let _s = Cc::new(String::new());
    assert_eq!(gc::count()[0], 2);
    drop(a);
    assert_eq!(gc::count()[0], 1);
    gc::collect_generation(0);
    assert_eq!(gc::count(), [0, 1, 0]);
    drop(b);
}

#[test]
fn automatic_collection_after_threshold() {
    gc::set_threshold(10, 10, 10);
    for _ in 0..10 {
        garbage_cycle();
    }
    assert_eq!(gc::stats()[0].collections, 0);
    garbage_cycle();
    assert_eq!(gc::stats()[0].collections, 1);
    assert_eq!(drops(), 10, "the new object itself is still referenced");
    gc::disable();
    for _ in 0..100 {
        garbage_cycle();
    }
    assert_eq!(gc::stats()[0].collections, 1);
    gc::enable();
    garbage_cycle();
    assert_eq!(gc::stats()[0].collections, 2);
}

#[test]
fn survivors_move_to_older_generations() {
    gc::disable();
    let a = Node::new(1);
    Node::link(&a, &a);
    gc::collect_generation(0); // a survives into generation 1
    drop(a);
    assert_eq!(
        gc::collect_generation(0),
        0,
        "generation 1 is not collected"
    );
    assert_eq!(gc::collect_generation(1), 1);
    assert_eq!(drops(), 1);
}

thread_local!(static TRACED: Cell<usize> = const { Cell::new(0) });

struct Counted(RefCell<Option<Cc<Counted>>>);

// SAFETY: visits only the handle in its field.
unsafe impl Trace for Counted {
    fn trace(&self, visitor: &mut Visitor<'_>) {
        TRACED.with(|t| t.set(t.get() + 1));
        self.0.trace(visitor);
    }
}

#[test]
fn young_collections_do_not_touch_old_objects() {
    gc::disable();
    let old: Vec<_> = (0..10_000)
        .map(|_| Cc::new(Counted(RefCell::new(None))))
        .collect();
    gc::collect();
    TRACED.with(|t| t.set(0));
    let young = Cc::new(Counted(RefCell::new(Some(old[0].clone()))));
    gc::collect_generation(0);
    // The young object was traced (a few passes), no old one ever.
    assert!(
        TRACED.with(Cell::get) <= 5,
        "traced {}",
        TRACED.with(Cell::get)
    );
    drop((young, old));
}

#[test]
fn full_collections_wait_for_a_quarter_of_new_long_lived_objects() {
    gc::disable();
    let live: Vec<_> = (0..1000).map(Node::new).collect();
    gc::collect();
    gc::set_threshold(2, 1, 1);
    gc::enable();
    let full_before = gc::stats()[2].collections;
    for _ in 0..50 {
        garbage_cycle();
    }
    assert!(gc::stats()[1].collections > 0);
    assert_eq!(
        gc::stats()[2].collections,
        full_before,
        "few new long-lived objects"
    );
    let more: Vec<_> = (0..600).map(Node::new).collect();
    assert!(
        gc::stats()[2].collections > full_before,
        "many new long-lived objects"
    );
    drop((live, more));
}

#[test]
fn freeze_and_unfreeze() {
    gc::disable();
    let keep = Node::new(1);
    garbage_cycle();
    gc::freeze();
    assert_eq!(gc::freeze_count(), 2);
    assert_eq!(gc::count(), [0, 0, 0]);
    assert_eq!(gc::collect(), 0, "frozen objects are ignored");
    gc::unfreeze();
    assert_eq!(gc::freeze_count(), 0);
    assert_eq!(gc::collect(), 1);
    drop(keep);
}

#[test]
fn stats_count_collections_and_collected() {
    gc::disable();
    garbage_cycle();
    garbage_cycle();
    gc::collect_generation(0);
    gc::collect();
    let stats = gc::stats();
    assert_eq!(stats[0].collections, 1);
    assert_eq!(stats[0].collected, 2);
    assert_eq!(stats[2].collections, 1);
    assert_eq!(stats[2].collected, 0);
    assert_eq!(stats[1], Default::default());
}

#[test]
fn callbacks_see_start_and_stop() {
    gc::disable();
    let seen: Rc<RefCell<Vec<CallbackInfo>>> = Rc::default();
    let log = seen.clone();
    let handle = gc::add_callback(move |info| log.borrow_mut().push(*info)).unwrap();
    garbage_cycle();
    gc::collect_generation(1);
    assert_eq!(
        *seen.borrow(),
        vec![
            CallbackInfo {
                phase: Phase::Start,
                generation: 1,
                collected: 0,
                uncollectable: 0
            },
            CallbackInfo {
                phase: Phase::Stop,
                generation: 1,
                collected: 1,
                uncollectable: 0
            },
        ]
    );
    assert!(gc::remove_callback(handle));
    assert!(!gc::remove_callback(handle));
    gc::collect();
    assert_eq!(seen.borrow().len(), 2);
}

#[test]
fn a_callback_may_collect_and_it_is_a_no_op() {
    gc::disable();
    gc::add_callback(|_| assert_eq!(gc::collect(), 0));
    garbage_cycle();
    assert_eq!(gc::collect(), 1);
}
