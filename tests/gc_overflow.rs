//! A strong count that would overflow aborts the process rather than wrap.
//! The overflow runs in a child copy of this test binary, which must die of
//! SIGABRT after saying why.
#![cfg(all(feature = "std", target_pointer_width = "64", unix))]

mod common;

use pymalloc::{Cc, Trace};
use std::cell::RefCell;

#[derive(Trace)]
struct Node {
    next: RefCell<Option<Cc<Node>>>,
}

fn expect_abort(name: &str, overflow: impl FnOnce()) {
    common::expect_abort_in_child(name, overflow, &["pymalloc: reference count overflow"]);
}

/// Makes and forgets references until a count passes its maximum: ~2^32
/// increments, at most a few seconds with the test profile's optimisation.
fn forget_forever<R>(make: impl Fn() -> R) -> ! {
    loop {
        std::mem::forget(make());
    }
}

#[test]
fn strong_count_overflow_of_a_tracked_cc_aborts() {
    expect_abort("strong_count_overflow_of_a_tracked_cc_aborts", || {
        let cc = Cc::new(Node {
            next: RefCell::new(None),
        });
        forget_forever(|| cc.clone())
    });
}

#[test]
fn strong_count_overflow_of_an_untracked_cc_aborts() {
    expect_abort("strong_count_overflow_of_an_untracked_cc_aborts", || {
        let cc = Cc::new(0u64);
        forget_forever(|| cc.clone())
    });
}

#[test]
fn strong_count_overflow_through_weak_upgrade_aborts() {
    expect_abort("strong_count_overflow_through_weak_upgrade_aborts", || {
        let cc = Cc::new(0u64);
        let weak = Cc::downgrade(&cc);
        forget_forever(|| weak.upgrade())
    });
}

#[test]
fn weak_count_overflow_aborts() {
    expect_abort("weak_count_overflow_aborts", || {
        let cc = Cc::new(0u64);
        forget_forever(|| Cc::downgrade(&cc))
    });
}
