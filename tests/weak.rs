//! `test_weakref` behaviours: Weak, WeakSet, WeakValueMap.
#![cfg(feature = "std")]

mod common;

use common::Node;
use pymalloc::{gc, Cc, Weak, WeakSet, WeakValueMap};

#[test]
fn weak_dies_with_its_value() {
    let a = Cc::new(String::from("a"));
    let w = Cc::downgrade(&a);
    assert_eq!(w.upgrade().as_deref().map(String::as_str), Some("a"));
    assert_eq!(w.strong_count(), 1);
    assert!(w.ptr_eq(&w.clone()));
    drop(a);
    assert!(w.upgrade().is_none());
    assert_eq!(w.strong_count(), 0);
    assert!(Weak::<String>::new().ptr_eq(&Weak::new()));
}

#[test]
fn weak_to_garbage_is_cleared_by_collection() {
    let a = Node::new(1);
    Node::link(&a, &a);
    let w = Cc::downgrade(&a);
    drop(a);
    assert!(w.upgrade().is_some());
    gc::collect();
    assert!(w.upgrade().is_none());
}

#[test]
fn weak_set_sees_live_members_only() {
    let mut set = WeakSet::new();
    let a = Node::new(1);
    let b = Node::new(2);
    assert!(set.insert(&a));
    assert!(!set.insert(&a));
    assert!(set.insert(&b));
    assert_eq!(set.len(), 2);
    assert!(set.contains(&b));
    drop(b);
    assert_eq!(set.len(), 1);
    let ids: Vec<_> = set.iter().map(|n| n.id).collect();
    assert_eq!(ids, vec![1]);
    assert!(set.remove(&a));
    assert!(!set.remove(&a));
    assert!(set.is_empty());
}

#[test]
fn weak_set_members_in_garbage_cycles_disappear_after_collection() {
    let mut set = WeakSet::new();
    for i in 0..10 {
        let n = Node::new(i);
        Node::link(&n, &n);
        set.insert(&n);
    }
    assert_eq!(set.len(), 10);
    gc::collect();
    assert_eq!(set.len(), 0);
}

#[test]
fn weak_set_stays_small_under_churn() {
    let mut set = WeakSet::new();
    let keep: Vec<_> = (0..10).map(|i| Cc::new(i as u64)).collect();
    for k in &keep {
        set.insert(k);
    }
    for i in 0..1_000_000u64 {
        let member = Cc::new(i);
        set.insert(&member);
    }
    assert_eq!(set.len(), 10);
    assert!(set.slots() <= 64, "slots {}", set.slots());
}

#[test]
fn weak_value_map_drops_dead_entries() {
    let mut map = WeakValueMap::new();
    let v = Node::new(1);
    assert!(map.insert("a", &v).is_none());
    assert_eq!(map.get("a").map(|n| n.id), Some(1));
    let w = Node::new(2);
    assert_eq!(map.insert("a", &w).map(|n| n.id), Some(1));
    assert!(map.contains_key("a"));
    drop(w);
    assert!(map.get("a").is_none());
    assert_eq!(map.len(), 0);
    map.insert("b", &v);
    assert_eq!(map.remove("b").map(|n| n.id), Some(1));
    assert!(map.remove("b").is_none());
    let mut many = WeakValueMap::new();
    for i in 0..100_000u32 {
        let value = Cc::new(i);
        many.insert(i, &value);
    }
    assert!(many.slots() <= 64, "slots {}", many.slots());
    assert_eq!(many.iter().count(), 0);
}
