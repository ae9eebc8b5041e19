//! `#[derive(Trace)]`: shapes, generics, skip, self-reference, MAY_CONTAIN_CC.
#![cfg(feature = "std")]

use pymalloc::{gc, Cc, Trace, Weak};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

#[derive(Trace)]
struct Node {
    next: RefCell<Option<Cc<Node>>>,
}

#[derive(Trace)]
struct List {
    value: u32,
    next: Option<Box<List>>,
}

#[derive(Trace)]
struct ListOfCc {
    value: Cc<u32>,
    next: Option<Box<ListOfCc>>,
}

#[derive(Trace)]
struct Mixed {
    children: Vec<(ListOfCc, Cc<Mixed>)>,
    back: Option<Box<Mixed>>,
}

#[derive(Trace)]
struct Wrapper<T> {
    inner: T,
}

#[derive(Trace)]
enum Tree {
    Leaf(u32),
    Branch {
        left: Cc<RefCell<Tree>>,
        right: Cc<RefCell<Tree>>,
    },
    Empty,
}

#[derive(Trace)]
struct Skipped {
    #[trace(skip)]
    hidden: RefCell<Option<Cc<Skipped>>>,
}

#[derive(Trace)]
struct Tuple(u8, String, Weak<Node>);

#[derive(Trace)]
struct Maps {
    by_name: HashMap<String, Cc<Maps>>,
    ordered: BTreeMap<u32, String>,
}

// Checked at compile time.
const _: () = {
    assert!(Node::MAY_CONTAIN_CC);
    assert!(!List::MAY_CONTAIN_CC, "a Box list of u32 holds no Cc");
    assert!(ListOfCc::MAY_CONTAIN_CC);
    assert!(Mixed::MAY_CONTAIN_CC);
    assert!(!Wrapper::<String>::MAY_CONTAIN_CC);
    assert!(Wrapper::<Cc<u8>>::MAY_CONTAIN_CC);
    assert!(Tree::MAY_CONTAIN_CC);
    assert!(!Tuple::MAY_CONTAIN_CC, "Weak keeps nothing alive");
    assert!(Maps::MAY_CONTAIN_CC);
};

#[test]
fn types_without_cc_are_untracked() {
    assert!(!gc::is_tracked(&Cc::new(List {
        value: 1,
        next: None
    })));
}

#[test]
fn self_referential_node_derives_and_collects() {
    let a = Cc::new(Node {
        next: RefCell::new(None),
    });
    *a.next.borrow_mut() = Some(a.clone());
    drop(a);
    assert_eq!(gc::collect(), 1);
    let l = List {
        value: 1,
        next: Some(Box::new(List {
            value: 2,
            next: None,
        })),
    };
    assert_eq!(l.next.as_ref().map(|n| n.value + l.value), Some(3));
}

#[test]
fn enums_are_traced() {
    let leaf = Cc::new(RefCell::new(Tree::Leaf(1)));
    let root = Cc::new(RefCell::new(Tree::Empty));
    *root.borrow_mut() = Tree::Branch {
        left: leaf.clone(),
        right: root.clone(),
    };
    drop(root);
    assert_eq!(gc::collect(), 1);
    assert_eq!(Cc::strong_count(&leaf), 1);
}

#[test]
fn generics_are_traced() {
    type Inner = Wrapper<RefCell<Option<Cc<u8>>>>;
    let w: Cc<Wrapper<RefCell<Option<Cc<Inner>>>>> = Cc::new(Wrapper {
        inner: RefCell::new(None),
    });
    assert!(gc::is_tracked(&w));
    let m = Cc::new(Maps {
        by_name: HashMap::new(),
        ordered: BTreeMap::from([(1, "one".to_string())]),
    });
    assert_eq!(m.ordered[&1], "one");
    assert!(m.by_name.is_empty());
}

#[test]
fn skipped_fields_count_as_outside_references() {
    let s = Cc::new(Skipped {
        hidden: RefCell::new(None),
    });
    *s.hidden.borrow_mut() = Some(s.clone());
    let w = Cc::downgrade(&s);
    drop(s);
    assert_eq!(
        gc::collect(),
        0,
        "a skipped Cc is never traced: a leak, not UB"
    );
    assert!(w.upgrade().is_some());
    let t = Tuple(1, "x".into(), Weak::new());
    assert_eq!((t.0, t.1.as_str(), t.2.upgrade().is_none()), (1, "x", true));
}
