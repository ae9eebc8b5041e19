//! CPython `test_gc` basics: cycles, traps, panics, deep structures.
#![cfg(feature = "std")]

mod common;

use common::{drops, on_small_stack, Node};
use pymalloc::{gc, Cc, Trace, Visitor};
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

#[test]
fn simple_cycle_is_collected() {
    let a = Node::new(1);
    let b = Node::new(2);
    Node::link(&a, &b);
    Node::link(&b, &a);
    let weak = Cc::downgrade(&a);
    drop((a, b));
    assert_eq!(drops(), 0);
    assert_eq!(gc::collect(), 2);
    assert_eq!(drops(), 2);
    assert!(weak.upgrade().is_none());
    assert_eq!(gc::collect(), 0);
}

#[test]
fn self_cycle_is_collected() {
    let a = Node::new(1);
    Node::link(&a, &a);
    drop(a);
    assert_eq!(gc::collect(), 1);
    assert_eq!(drops(), 1);
}

#[derive(Trace)]
struct Holder {
    items: RefCell<Vec<Option<Cc<Holder>>>>,
    name: String,
}

#[test]
fn cycle_through_a_container_is_collected() {
    let h = Cc::new(Holder {
        items: RefCell::new(Vec::new()),
        name: "h".into(),
    });
    h.items.borrow_mut().push(None);
    h.items.borrow_mut().push(Some(h.clone()));
    assert_eq!(h.name, "h");
    let weak = Cc::downgrade(&h);
    drop(h);
    assert_eq!(gc::collect(), 1);
    assert!(weak.upgrade().is_none());
}

#[test]
fn cycle_with_an_external_reference_is_kept_until_it_goes() {
    let a = Node::new(1);
    let b = Node::new(2);
    Node::link(&a, &b);
    Node::link(&b, &a);
    drop(b);
    assert_eq!(gc::collect(), 0);
    assert_eq!(drops(), 0);
    assert_eq!(a.edges.borrow()[0].edges.borrow()[0].id, 1);
    drop(a);
    assert_eq!(gc::collect(), 2);
    assert_eq!(drops(), 2);
}

#[test]
fn garbage_pointing_at_a_live_object_leaves_its_count_right() {
    let live = Node::new(0);
    let a = Node::new(1);
    let b = Node::new(2);
    Node::link(&a, &b);
    Node::link(&b, &a);
    Node::link(&a, &live);
    Node::link(&b, &live);
    assert_eq!(Cc::strong_count(&live), 3);
    drop((a, b));
    assert_eq!(gc::collect(), 2);
    assert_eq!(Cc::strong_count(&live), 1);
    assert_eq!(live.id, 0);
    drop(live);
    assert_eq!(drops(), 3);
}

#[test]
fn untracked_types_are_not_tracked() {
    let s = Cc::new(String::from("x"));
    let n = Node::new(1);
    assert!(!gc::is_tracked(&s));
    assert!(gc::is_tracked(&n));
    assert!(!gc::is_tracked(&Cc::new(5u32)));
    assert!(!gc::is_tracked(&Cc::new(vec![String::new()])));
    assert!(gc::is_tracked(&Cc::new(vec![n.clone()])));
    let before = gc::tracked_count();
    let more: Vec<_> = (0..10).map(|i| Cc::new(i.to_string())).collect();
    assert_eq!(gc::tracked_count(), before);
    drop(more);
}

#[test]
fn rc_api() {
    let mut a = Cc::new(5u32);
    *Cc::get_mut(&mut a).unwrap() += 1;
    let b = a.clone();
    assert!(Cc::get_mut(&mut a).is_none());
    assert!(Cc::ptr_eq(&a, &b));
    assert_eq!(Cc::strong_count(&a), 2);
    let w = Cc::downgrade(&a);
    assert_eq!(Cc::weak_count(&a), 1);
    assert_eq!(w.strong_count(), 2);
    drop(b);
    assert_eq!(Cc::try_unwrap(a), Ok(6));
    assert!(w.upgrade().is_none());
    assert!(pymalloc::Weak::<u32>::new().upgrade().is_none());

    let mut n = Node::new(3);
    assert!(
        Cc::get_mut(&mut n).is_none(),
        "tracked values are never lent mutably"
    );
    let node = Cc::try_unwrap(n).ok().unwrap();
    assert_eq!(node.id, 3);
    assert_eq!(format!("{:?}", Cc::new(7)), "7");
    assert!(Cc::new(1) < Cc::new(2));
    assert_eq!(
        Cc::into_inner(Cc::new(String::from("s"))).as_deref(),
        Some("s")
    );
}

#[test]
fn new_cyclic_holds_a_weak_to_itself() {
    #[derive(Trace)]
    struct Me {
        me: pymalloc::Weak<Me>,
        other: RefCell<Option<Cc<Me>>>,
    }
    let me = Cc::new_cyclic(|w| {
        assert!(w.upgrade().is_none());
        Me {
            me: w.clone(),
            other: RefCell::new(None),
        }
    });
    assert!(Cc::ptr_eq(&me.me.upgrade().unwrap(), &me));
    *me.other.borrow_mut() = Some(me.clone());
    let w = Cc::downgrade(&me);
    drop(me);
    assert_eq!(gc::collect(), 1);
    assert!(w.upgrade().is_none());
}

/// Touches its sibling in Drop: must panic with a clear message, not read freed memory.
#[derive(Trace)]
struct Toucher {
    other: RefCell<Option<Cc<Toucher>>>,
}

impl Drop for Toucher {
    fn drop(&mut self) {
        if let Some(other) = self.other.borrow().as_ref() {
            let _ = other.other.borrow().is_some();
        }
    }
}

#[test]
fn drop_touching_a_dead_sibling_panics_cleanly() {
    let a = Cc::new(Toucher {
        other: RefCell::new(None),
    });
    let b = Cc::new(Toucher {
        other: RefCell::new(Some(a.clone())),
    });
    *a.other.borrow_mut() = Some(b.clone());
    drop((a, b));
    let err = catch_unwind(AssertUnwindSafe(gc::collect)).unwrap_err();
    let message = err.downcast_ref::<&str>().copied().unwrap_or_default();
    assert!(
        message.contains("emptied by the cycle collector"),
        "{message}"
    );
    // The sibling's Drop, run when the next collection lets go of the
    // objects the panic left held, panics the same way.
    assert!(catch_unwind(AssertUnwindSafe(gc::collect)).is_err());
    // The collector is consistent and works afterwards.
    let c = Node::new(9);
    Node::link(&c, &c);
    drop(c);
    gc::collect();
    assert_eq!(gc::collect(), 0);
}

#[derive(Trace)]
struct PanicOnDrop {
    me: RefCell<Option<Cc<PanicOnDrop>>>,
}

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        panic!("boom in drop");
    }
}

#[test]
fn panic_in_drop_during_collection_leaves_the_collector_working() {
    for _ in 0..3 {
        let a = Cc::new(PanicOnDrop {
            me: RefCell::new(None),
        });
        *a.me.borrow_mut() = Some(a.clone());
        let b = Node::new(1);
        Node::link(&b, &b);
        drop((a, b));
        let result = catch_unwind(AssertUnwindSafe(gc::collect));
        assert!(result.is_err());
    }
    let before = drops();
    let c = Node::new(2);
    Node::link(&c, &c);
    drop(c);
    gc::collect();
    gc::collect();
    assert!(drops() > before);
    assert_eq!(gc::collect(), 0);
}

#[derive(Trace)]
struct Reenter {
    me: RefCell<Option<Cc<Reenter>>>,
}

impl Drop for Reenter {
    fn drop(&mut self) {
        assert_eq!(gc::collect(), 0, "collect inside a collection is a no-op");
    }
}

#[test]
fn collect_from_drop_during_collection_returns_zero() {
    let a = Cc::new(Reenter {
        me: RefCell::new(None),
    });
    *a.me.borrow_mut() = Some(a.clone());
    drop(a);
    assert_eq!(gc::collect(), 1);
}

#[test]
fn refcell_borrowed_during_collection_is_kept() {
    let a = Node::new(1);
    let c = Node::new(2);
    Node::link(&c, &c);
    Node::link(&a, &c);
    drop(c);
    let guard = a.edges.borrow_mut();
    // `a` cannot be traced while borrowed, so what it holds is kept.
    assert_eq!(gc::collect(), 0);
    assert_eq!(guard[0].id, 2);
    assert_eq!(guard[0].edges.borrow()[0].id, 2);
    drop(guard);
    drop(a);
    assert_eq!(drops(), 1);
    assert_eq!(gc::collect(), 1);
    assert_eq!(drops(), 2);
}

/// Reports its child twice.
struct TwiceVisitor {
    child: RefCell<Option<Cc<Node>>>,
}

// SAFETY: visits only `child`, which it owns (twice, which the contract
// allows).
unsafe impl Trace for TwiceVisitor {
    fn trace(&self, visitor: &mut Visitor<'_>) {
        self.child.trace(visitor);
        self.child.trace(visitor);
    }
}

#[test]
fn trace_visiting_a_child_twice_is_counted_once() {
    let child = Node::new(1);
    let parent = Cc::new(TwiceVisitor {
        child: RefCell::new(Some(child.clone())),
    });
    Node::link(&child, &child);
    drop(parent);
    // `child` has one external reference (ours): it must survive intact.
    gc::collect();
    assert_eq!(drops(), 0);
    assert_eq!(child.id, 1);
    assert_eq!(child.edges.borrow()[0].id, 1);
    drop(child);
    gc::collect();
    assert_eq!(drops(), 1);
}

#[test]
fn million_node_chain_drops_without_recursion() {
    on_small_stack(|| {
        let mut head = Node::new(0);
        for i in 1..1_000_000 {
            let next = Node::new(i);
            Node::link(&next, &head);
            head = next;
        }
        drop(head);
        assert_eq!(drops(), 1_000_000);
    });
}

#[test]
fn deep_cycle_is_collected_without_recursion() {
    on_small_stack(|| {
        let first = Node::new(0);
        let mut head = first.clone();
        for i in 1..1_000_000 {
            let next = Node::new(i);
            Node::link(&next, &head);
            head = next;
        }
        Node::link(&first, &head);
        drop((first, head));
        gc::collect();
        assert_eq!(drops(), 1_000_000);
    });
}

thread_local!(static PANIC_IN_TRACE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });

/// A `Trace` that panics on demand.
struct Explosive {
    me: RefCell<Option<Cc<Explosive>>>,
}

// SAFETY: visits only `me`, which it owns.
unsafe impl Trace for Explosive {
    fn trace(&self, visitor: &mut Visitor<'_>) {
        if PANIC_IN_TRACE.with(|p| p.get()) {
            panic!("boom in trace");
        }
        self.me.trace(visitor);
    }
}

#[test]
fn panic_in_trace_during_collection_leaves_the_collector_working() {
    let e = Cc::new(Explosive {
        me: RefCell::new(None),
    });
    *e.me.borrow_mut() = Some(e.clone());
    let weak = Cc::downgrade(&e);
    drop(e);
    let n = Node::new(1);
    Node::link(&n, &n);
    drop(n);
    PANIC_IN_TRACE.with(|p| p.set(true));
    assert!(catch_unwind(AssertUnwindSafe(gc::collect)).is_err());
    PANIC_IN_TRACE.with(|p| p.set(false));
    assert!(weak.upgrade().is_some());
    assert_eq!(gc::collect(), 2);
    assert!(weak.upgrade().is_none());
    assert_eq!(drops(), 1);
}

thread_local!(static UPGRADED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) });

/// Upgrades a weak reference to its garbage sibling while being dropped.
#[derive(Trace)]
struct Upgrader {
    me: RefCell<Option<Cc<Upgrader>>>,
    sibling: pymalloc::Weak<Upgrader>,
}

impl Drop for Upgrader {
    fn drop(&mut self) {
        UPGRADED.with(|u| u.set(Some(self.sibling.upgrade().is_some())));
    }
}

#[test]
fn weak_upgrade_inside_drop_during_collection_fails() {
    let a = Cc::new(Upgrader {
        me: RefCell::new(None),
        sibling: pymalloc::Weak::new(),
    });
    let b = Cc::new(Upgrader {
        me: RefCell::new(Some(a.clone())),
        sibling: Cc::downgrade(&a),
    });
    *a.me.borrow_mut() = Some(b.clone());
    drop((a, b));
    assert_eq!(gc::collect(), 2);
    assert_eq!(UPGRADED.with(|u| u.get()), Some(false));
}
