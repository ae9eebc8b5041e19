//! Leak triage: census by type, by allocation site, referrers, save_all.
#![cfg(feature = "std")]

mod common;

use common::{drops, Node};
use pymalloc::{gc, Cc, Trace};
use std::cell::RefCell;

#[derive(Trace)]
struct Handler {
    context: RefCell<Option<Cc<Context>>>,
}

#[derive(Trace)]
struct Context {
    handler: RefCell<Option<Cc<Handler>>>,
    payload: String,
}

fn leak_pair() {
    let context = Cc::new(Context {
        handler: RefCell::new(None),
        payload: "request".into(),
    });
    let handler = Cc::new(Handler {
        context: RefCell::new(Some(context.clone())),
    });
    *context.handler.borrow_mut() = Some(handler);
}

#[test]
fn census_counts_by_type_and_diffs_largest_first() {
    gc::disable();
    let _keep = Node::new(1);
    let before = gc::census();
    for _ in 0..5 {
        leak_pair();
    }
    let leak_nodes: Vec<_> = (0..3).map(Node::new).collect();
    let after = gc::census();
    assert_eq!(after.get("Handler"), 5);
    assert_eq!(after.get("census::Context"), 5);
    assert_eq!(after.get("Node"), 4);
    assert_eq!(after.total(), 14);
    let diff = after.diff(&before);
    let rows: Vec<_> = diff.rows.iter().map(|r| (r.type_name, r.growth)).collect();
    assert_eq!(
        rows,
        vec![
            ("census::Context", 5),
            ("census::Handler", 5),
            ("census::common::Node", 3)
        ]
    );
    let text = diff.to_string();
    assert!(text.starts_with("1  +5  5  census::Context\n"), "{text}");
    assert!(after.to_string().contains("census::Handler"));
    drop(leak_nodes);
    assert_eq!(gc::collect(), 10);
    assert!(gc::census().diff(&before).rows.is_empty());
}

#[test]
fn site_census_finds_the_line_that_leaks() {
    gc::disable();
    assert!(!gc::site_tracing());
    leak_pair(); // not recorded: tracing is off
    gc::set_site_tracing(true);
    let before = gc::site_census();
    for _ in 0..100 {
        leak_pair();
    }
    let line = line!() + 1;
    let extra: Vec<_> = (0..10).map(Node::new).collect();
    let diff = gc::site_census().diff(&before);
    let top = diff.rows[0];
    assert!(top.site.file.ends_with("census.rs"));
    assert_eq!(top.growth.count, 100);
    assert_eq!(diff.rows.len(), 3);
    let node_site = diff
        .rows
        .iter()
        .find(|r| r.site.file.ends_with("common/mod.rs"))
        .unwrap();
    assert_eq!(node_site.growth.count, 10);
    assert!(
        gc::site_census().get(file!(), line).count == 0,
        "Node::new is the site, not the caller"
    );
    let text = diff.to_string();
    let first = text.lines().next().unwrap();
    assert!(first.starts_with("1  "), "{text}");
    assert!(first.ends_with(&format!("  100  {}", top.site)), "{text}");
    assert!(text.contains(" KB  100  "), "{text}");
    drop(extra);
    gc::set_site_tracing(false);
    assert!(gc::site_census().top().is_empty());
    gc::collect();
}

#[test]
fn referrers_by_type_name() {
    let context = Cc::new(Context {
        handler: RefCell::new(None),
        payload: String::new(),
    });
    let handler = Cc::new(Handler {
        context: RefCell::new(Some(context.clone())),
    });
    let holder = Node::new(1);
    assert_eq!(gc::referrers(&context), vec!["census::Handler"]);
    assert!(gc::referrers(&handler).is_empty());
    assert!(gc::referrers(&holder).is_empty());
    assert_eq!(context.payload, "");
}

#[test]
fn save_all_keeps_garbage_for_inspection() {
    gc::disable();
    gc::set_save_all(true);
    for _ in 0..3 {
        leak_pair();
    }
    let n = Node::new(0);
    Node::link(&n, &n);
    drop(n);
    assert_eq!(gc::collect(), 7);
    assert_eq!(gc::garbage_count(), 7);
    assert_eq!(gc::census().get("Handler"), 3);
    assert_eq!(drops(), 0);
    assert_eq!(gc::stats()[2].uncollectable, 7);
    gc::set_save_all(false);
    gc::clear_garbage();
    assert_eq!(gc::garbage_count(), 0);
    assert_eq!(gc::collect(), 7);
    assert_eq!(drops(), 1);
    assert_eq!(gc::census().total(), 0);
}
