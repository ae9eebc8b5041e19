//! PEP 442 finalization and weak-reference clearing, in CPython's order.
#![cfg(feature = "std")]

use pymalloc::{gc, Cc, Finalize, Trace, Weak};
use std::cell::{Cell, RefCell};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Record,
    Resurrect,
    BreakCycle,
    Panic,
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Record) };
    static FINALIZED: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    static WEAK_SEEN: RefCell<Vec<bool>> = const { RefCell::new(Vec::new()) };
    static STASH: RefCell<Vec<Cc<Fin>>> = const { RefCell::new(Vec::new()) };
    static DROPPED: Cell<usize> = const { Cell::new(0) };
}

#[derive(Trace)]
#[trace(finalize)]
struct Fin {
    id: usize,
    edges: RefCell<Vec<Cc<Fin>>>,
    me: RefCell<Weak<Fin>>,
}

impl Finalize for Fin {
    fn finalize(&self) {
        FINALIZED.with(|f| f.borrow_mut().push(self.id));
        WEAK_SEEN.with(|w| w.borrow_mut().push(self.me.borrow().upgrade().is_some()));
        match MODE.with(Cell::get) {
            Mode::Record => {}
            Mode::Resurrect => {
                if let Some(next) = self.edges.borrow().first() {
                    STASH.with(|s| s.borrow_mut().push(next.clone()));
                }
            }
            Mode::BreakCycle => self.edges.borrow_mut().clear(),
            Mode::Panic => panic!("boom in finalizer"),
        }
    }
}

impl Drop for Fin {
    fn drop(&mut self) {
        DROPPED.with(|d| d.set(d.get() + 1));
    }
}

fn fin(id: usize) -> Cc<Fin> {
    let f = Cc::new(Fin {
        id,
        edges: RefCell::new(Vec::new()),
        me: RefCell::new(Weak::new()),
    });
    *f.me.borrow_mut() = Cc::downgrade(&f);
    f
}

fn ring(n: usize) -> Vec<Weak<Fin>> {
    let nodes: Vec<_> = (0..n).map(fin).collect();
    for i in 0..n {
        nodes[i].edges.borrow_mut().push(nodes[(i + 1) % n].clone());
    }
    nodes.iter().map(Cc::downgrade).collect()
}

fn finalized() -> Vec<usize> {
    let mut v = FINALIZED.with(|f| f.borrow().clone());
    v.sort();
    v
}

fn dropped() -> usize {
    DROPPED.with(Cell::get)
}

#[test]
fn cycle_with_finalizer_is_finalized_then_freed() {
    let weaks = ring(3);
    assert_eq!(gc::collect(), 3);
    assert_eq!(finalized(), vec![0, 1, 2]);
    assert_eq!(dropped(), 3);
    assert!(weaks.iter().all(|w| w.upgrade().is_none()));
}

#[test]
fn weak_references_are_cleared_before_finalizers_run() {
    ring(2);
    gc::collect();
    assert_eq!(WEAK_SEEN.with(|w| w.borrow().clone()), vec![false, false]);
}

#[test]
fn resurrection_keeps_the_object_and_all_it_reaches_intact() {
    MODE.with(|m| m.set(Mode::Resurrect));
    let weaks = ring(3);
    gc::collect();
    // Every finalizer ran once; each stashed its successor, so all survive.
    assert_eq!(finalized(), vec![0, 1, 2]);
    assert_eq!(dropped(), 0);
    let stashed = STASH.with(|s| s.borrow().len());
    assert_eq!(stashed, 3);
    STASH.with(|s| {
        let s = s.borrow();
        let first = &s[0];
        assert_eq!(
            first.edges.borrow()[0].edges.borrow()[0].edges.borrow()[0].id,
            first.id
        );
    });
    // Weak references cleared for the collection stay cleared.
    assert!(weaks.iter().all(|w| w.upgrade().is_none()));

    // Let go: the finalizers never run twice.
    MODE.with(|m| m.set(Mode::Record));
    STASH.with(|s| s.borrow_mut().clear());
    assert_eq!(gc::collect(), 3);
    assert_eq!(finalized(), vec![0, 1, 2]);
    assert_eq!(dropped(), 3);
}

#[test]
fn resurrecting_part_of_a_cycle_keeps_what_it_reaches() {
    MODE.with(|m| m.set(Mode::Resurrect));
    // A chain garbage cycle of 2 plus a tail only the cycle reaches.
    let a = fin(0);
    let b = fin(1);
    let tail = fin(2);
    a.edges.borrow_mut().push(tail.clone());
    tail.edges.borrow_mut().push(b.clone());
    b.edges.borrow_mut().push(a.clone());
    drop((a, b, tail));
    gc::collect();
    assert_eq!(dropped(), 0);
    MODE.with(|m| m.set(Mode::Record));
    STASH.with(|s| s.borrow_mut().clear());
    gc::collect();
    assert_eq!(dropped(), 3);
    assert_eq!(finalized(), vec![0, 1, 2]);
}

#[test]
fn finalizer_that_breaks_its_own_cycle() {
    MODE.with(|m| m.set(Mode::BreakCycle));
    ring(4);
    assert_eq!(gc::collect(), 4);
    assert_eq!(dropped(), 4);
    assert_eq!(finalized(), vec![0, 1, 2, 3]);
}

#[test]
fn finalizer_runs_once_on_the_reference_counting_path() {
    let f = fin(7);
    drop(f);
    assert_eq!(finalized(), vec![7]);
    assert_eq!(dropped(), 1);
}

#[derive(Trace)]
#[trace(finalize)]
struct Plain(u32);

impl Finalize for Plain {
    fn finalize(&self) {
        FINALIZED.with(|f| f.borrow_mut().push(self.0 as usize));
    }
}

#[test]
fn untracked_values_are_finalized_too() {
    let p = Cc::new(Plain(5));
    assert!(!gc::is_tracked(&p));
    drop(p);
    assert_eq!(finalized(), vec![5]);
}

#[derive(Trace)]
struct Dropper {
    other: RefCell<Option<Cc<Dropper>>>,
    victim: RefCell<Option<Cc<Fin>>>,
}

#[test]
fn finalizer_dropping_other_garbage() {
    // The finalizer of a ring member drops references to other garbage.
    MODE.with(|m| m.set(Mode::BreakCycle));
    let weaks = ring(3);
    let d = Cc::new(Dropper {
        other: RefCell::new(None),
        victim: RefCell::new(weaks[0].upgrade()),
    });
    *d.other.borrow_mut() = Some(d.clone());
    drop(d);
    gc::collect();
    assert_eq!(dropped(), 3);
    assert!(weaks.iter().all(|w| w.upgrade().is_none()));
}

#[test]
fn panic_in_a_finalizer_leaves_the_collector_working() {
    MODE.with(|m| m.set(Mode::Panic));
    let weaks = ring(2);
    let result = std::panic::catch_unwind(gc::collect);
    assert!(result.is_err());
    MODE.with(|m| m.set(Mode::Record));
    assert_eq!(dropped(), 0);
    gc::collect();
    assert_eq!(dropped(), 2);
    assert!(weaks.iter().all(|w| w.upgrade().is_none()));
    // Each finalizer ran at most once (the one that panicked is not rerun).
    let ran = finalized();
    assert!(ran == vec![0, 1] || ran.len() == 1, "{ran:?}");
    assert_eq!(gc::collect(), 0);
}
