//! Without `std`: the user owns a `Collector` and installs it.
#![cfg(not(feature = "std"))]

use core::cell::RefCell;
use pymalloc::{gc, Cc, Collector, Trace};

#[derive(Trace)]
struct Node {
    next: RefCell<Option<Cc<Node>>>,
}

/// One test only: `install` promises a single thread of control, and the
/// test harness runs tests on several threads.
#[test]
fn installed_collector_collects_cycles() {
    let collector: &'static Collector = Box::leak(Box::new(Collector::new()));
    // SAFETY: this is the only test in this binary, so only this thread
    // uses the crate's pointers.
    unsafe { gc::install(collector) };
    let a = Cc::new(Node {
        next: RefCell::new(None),
    });
    *a.next.borrow_mut() = Some(a.clone());
    let weak = Cc::downgrade(&a);
    drop(a);
    assert_eq!(collector.tracked_count(), 1);
    assert_eq!(gc::collect(), 1);
    assert!(weak.upgrade().is_none());
    assert_eq!(collector.stats()[2].collected, 1);
    assert!(!gc::is_tracked(&Cc::new(5u8)));
}
