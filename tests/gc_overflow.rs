//! A strong count that would overflow aborts the process rather than wrap.
//! The overflow runs in a child copy of this test binary, which must die of
//! SIGABRT after saying why.
#![cfg(all(feature = "std", target_pointer_width = "64", unix))]

use pymalloc::{Cc, Trace};
use std::cell::RefCell;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CASE: &str = "PYMALLOC_OVERFLOW_CASE";
/// SIGABRT, 6 on every unix Rust supports.
const SIGABRT: i32 = 6;

#[derive(Trace)]
struct Node {
    next: RefCell<Option<Cc<Node>>>,
}

/// In the child, runs `overflow` (which must abort); in the parent, runs
/// the child and checks how it died.
fn expect_abort(name: &str, overflow: impl FnOnce()) {
    if std::env::var(CASE).as_deref() == Ok(name) {
        overflow();
        panic!("the count overflowed without aborting");
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CASE, name)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(SIGABRT),
        "the child did not abort:\n{stderr}"
    );
    assert!(
        stderr.contains("pymalloc: reference count overflow"),
        "no overflow message in:\n{stderr}"
    );
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
