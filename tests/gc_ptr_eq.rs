//! `Cc::ptr_eq` on handles the collector emptied: equal to nothing, since
//! the objects they pointed at can no longer be told apart.
#![cfg(feature = "std")]

use pymalloc::{gc, Cc, Trace};
use std::cell::{Cell, RefCell};

thread_local! {
    static SEEN: Cell<Option<(bool, bool, bool)>> = const { Cell::new(None) };
}

#[derive(Trace)]
struct Node {
    first: RefCell<Option<Cc<Node>>>,
    second: RefCell<Option<Cc<Node>>>,
    watch: bool,
}

impl Drop for Node {
    fn drop(&mut self) {
        if !self.watch {
            return;
        }
        let (first, second) = (self.first.borrow(), self.second.borrow());
        let (first, second) = (first.as_ref().unwrap(), second.as_ref().unwrap());
        SEEN.with(|seen| {
            seen.set(Some((
                Cc::strong_count(first) == 0 && Cc::strong_count(second) == 0,
                Cc::ptr_eq(first, second),
                Cc::ptr_eq(first, first),
            )))
        });
    }
}

fn node(watch: bool) -> Cc<Node> {
    Cc::new(Node {
        first: RefCell::new(None),
        second: RefCell::new(None),
        watch,
    })
}

#[test]
fn emptied_handles_equal_nothing() {
    let (hub, a, b) = (node(true), node(false), node(false));
    *hub.first.borrow_mut() = Some(a.clone());
    *hub.second.borrow_mut() = Some(b.clone());
    *a.first.borrow_mut() = Some(hub.clone());
    *b.first.borrow_mut() = Some(hub.clone());
    let live = a.clone();
    assert!(Cc::ptr_eq(&live, &a) && !Cc::ptr_eq(&a, &b));
    drop((hub, a, b, live));
    gc::collect();
    let (emptied, across, itself) = SEEN.with(Cell::get).expect("the hub was dropped");
    assert!(emptied, "the hub's handles were emptied before its drop");
    assert!(!across, "two emptied handles of different objects");
    assert!(!itself, "an emptied handle and itself");
}
