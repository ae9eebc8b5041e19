//! CPython's `gc` debugging flags, their printed lines, `get_referents`,
//! and the garbage `DEBUG_SAVEALL` keeps.
#![cfg(feature = "std")]

mod common;

use common::Node;
use pymalloc::{gc, Cc, Trace};
use std::cell::RefCell;

thread_local! {
    static OUT: RefCell<String> = const { RefCell::new(String::new()) };
}

fn capture(args: std::fmt::Arguments<'_>) {
    OUT.with(|out| out.borrow_mut().push_str(&args.to_string()));
}

fn take_output() -> String {
    OUT.with(|out| std::mem::take(&mut *out.borrow_mut()))
}

#[derive(Trace)]
struct Handler {
    next: RefCell<Option<Cc<Handler>>>,
}

fn handler_cycle() {
    let a = Cc::new(Handler {
        next: RefCell::new(None),
    });
    let b = Cc::new(Handler {
        next: RefCell::new(Some(a.clone())),
    });
    *a.next.borrow_mut() = Some(b);
}

#[test]
fn flags_round_trip_and_saveall_is_save_all() {
    assert_eq!(gc::get_debug(), 0);
    gc::set_debug(gc::DEBUG_LEAK);
    assert_eq!(gc::get_debug(), gc::DEBUG_LEAK);
    assert_eq!(
        gc::DEBUG_LEAK,
        gc::DEBUG_COLLECTABLE | gc::DEBUG_UNCOLLECTABLE | gc::DEBUG_SAVEALL
    );
    assert!(gc::save_all());
    gc::set_debug(gc::DEBUG_STATS);
    assert!(!gc::save_all());
    gc::set_save_all(true);
    assert_eq!(gc::get_debug(), gc::DEBUG_STATS | gc::DEBUG_SAVEALL);
    gc::set_debug(0);
    assert_eq!(gc::get_debug(), 0);
}

#[test]
fn stats_print_as_cpython_prints_them() {
    gc::set_debug_print(capture);
    gc::disable();
    handler_cycle();
    let _live = Node::new(1);
    gc::set_debug(gc::DEBUG_STATS);
    assert_eq!(gc::collect(), 2);
    gc::set_debug(0);
    let out = take_output();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(lines[0], "gc: collecting generation 2...");
    assert_eq!(lines[1], "gc: objects in each generation: 3 0 0");
    assert_eq!(lines[2], "gc: objects in permanent generation: 0");
    let done = lines[3]
        .strip_prefix("gc: done, 2 unreachable, 0 uncollectable, ")
        .unwrap_or_else(|| panic!("{out}"));
    let seconds = done.strip_suffix("s elapsed").unwrap();
    assert_eq!(seconds.split_once('.').unwrap().1.len(), 4, "{done}");
}

#[test]
fn collectable_objects_are_named_with_their_address() {
    gc::set_debug_print(capture);
    gc::disable();
    handler_cycle();
    gc::set_debug(gc::DEBUG_COLLECTABLE);
    assert_eq!(gc::collect(), 2);
    gc::set_debug(0);
    let out = take_output();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for line in lines {
        let address = line
            .strip_prefix("gc: collectable <Handler 0x")
            .and_then(|l| l.strip_suffix('>'))
            .unwrap_or_else(|| panic!("{line}"));
        assert!(usize::from_str_radix(address, 16).unwrap() != 0);
    }
}

#[test]
fn leak_debugging_keeps_the_garbage_to_look_at() {
    gc::set_debug_print(capture);
    gc::disable();
    handler_cycle();
    handler_cycle();
    gc::set_debug(gc::DEBUG_LEAK);
    assert_eq!(gc::collect(), 4);
    assert_eq!(take_output().lines().count(), 4);
    let garbage = gc::garbage();
    assert_eq!(garbage.get("Handler"), 4);
    assert_eq!(garbage.total(), 4);
    gc::set_debug(0);
    gc::clear_garbage();
    assert_eq!(gc::garbage().total(), 0);
    assert_eq!(gc::collect(), 4);
    assert_eq!(gc::census().get("Handler"), 0);
}

#[test]
fn referents_name_what_an_object_holds() {
    let a = Cc::new(Handler {
        next: RefCell::new(None),
    });
    let b = Cc::new(Handler {
        next: RefCell::new(Some(a.clone())),
    });
    assert_eq!(gc::get_referents(&b), vec!["gc_debug::Handler"]);
    assert!(gc::get_referents(&a).is_empty());
    let node = Node::new(0);
    Node::link(&node, &node);
    Node::link(&node, &Node::new(1));
    assert_eq!(gc::get_referents(&node).len(), 2);
    assert!(gc::get_referents(&Cc::new(String::from("untracked"))).is_empty());
    *b.next.borrow_mut() = None;
    node.edges.borrow_mut().clear();
}

/// Reports a fresh clone of its handle instead of the handle itself: the
/// collector counts the edge, but clearing empties the clone, so a cycle
/// of these survives being cleared, CPython's "uncollectable".
struct Stubborn {
    other: RefCell<Option<Cc<Stubborn>>>,
}

// SAFETY: the clone it reports is a handle to what `self` owns a handle to,
// so the counts come out as for the real edge; only clearing misses it,
// which leaks the pair and breaks nothing.
unsafe impl Trace for Stubborn {
    fn trace(&self, visitor: &mut pymalloc::Visitor<'_>) {
        let clone = self.other.borrow().clone();
        clone.trace(visitor);
    }
}

#[test]
fn garbage_that_survives_clearing_is_named_uncollectable() {
    gc::set_debug_print(capture);
    gc::disable();
    let a = Cc::new(Stubborn {
        other: RefCell::new(None),
    });
    let b = Cc::new(Stubborn {
        other: RefCell::new(Some(a.clone())),
    });
    *a.other.borrow_mut() = Some(b.clone());
    let (a_addr, b_addr) = (Cc::as_ptr(&a) as usize, Cc::as_ptr(&b) as usize);
    let before = gc::stats()[2].uncollectable;
    drop((a, b));
    gc::set_debug(gc::DEBUG_UNCOLLECTABLE);
    gc::collect();
    gc::set_debug(0);
    assert_eq!(gc::stats()[2].uncollectable - before, 2);
    let out = take_output();
    let mut named: Vec<usize> = out
        .lines()
        .map(|line| {
            let hex = line
                .strip_prefix("gc: uncollectable <Stubborn 0x")
                .and_then(|l| l.strip_suffix('>'))
                .unwrap_or_else(|| panic!("{out}"));
            usize::from_str_radix(hex, 16).unwrap()
        })
        .collect();
    named.sort_unstable();
    assert_eq!(named.len(), 2, "{out}");
    // The addresses printed are the objects' headers, a fixed distance
    // before their values.
    let mut values = [a_addr, b_addr];
    values.sort_unstable();
    assert_eq!(values[0] - named[0], values[1] - named[1]);
    assert!(values[0] > named[0]);
    assert_eq!(gc::census().get("Stubborn"), 2);
}
