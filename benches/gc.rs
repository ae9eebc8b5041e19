//! Cycle-collector benchmark: pymalloc's `Cc` against `std::rc::Rc` (the
//! floor) and the peer crates, ns per object, all under `PyMalloc` as the
//! global allocator.
//!
//! Every contender runs in its own process (collectors keep thread-local
//! state and allocator statistics must not mix), on a thread with a 1 GiB
//! stack: some peers drop a chain recursively, and a 100k-node chain would
//! overflow the default 8 MiB. The driver interleaves the repetitions of all
//! contenders and keeps each figure's minimum.
//!
//! Every node is the same shape for everyone: one optional pointer to the
//! next node in a `RefCell` (`GcCell` for `gc`), padded to a 24-byte value.
//!
//! `cargo bench -p pymalloc-bench --bench gc [-- REPS]` (5 repetitions by default)

mod driver;

use driver::time;
use std::cell::RefCell;
use std::hint::black_box;

use pymalloc::PyMalloc;

#[global_allocator]
static ALLOC: PyMalloc = PyMalloc::system();

/// `Contender`'s pointer type, `node` and `link` for a node whose `next`
/// is a `RefCell`-like cell of an optional `$ptr<Node>`.
macro_rules! node_and_link {
    ($ptr:ident, $node:expr) => {
        type Ptr = $ptr<Node>;
        fn node() -> $ptr<Node> {
            $ptr::new($node)
        }
        fn link(from: &$ptr<Node>, to: &$ptr<Node>) {
            *from.next.borrow_mut() = Some(to.clone());
        }
    };
}

/// What the workloads need from a reference-counted or collected pointer.
trait Contender {
    /// A handle to a node.
    type Ptr: Clone;
    /// Whether freeing needs a collection even without cycles (a tracing
    /// collector): the acyclic workload then collects after dropping.
    const TRACING: bool = false;
    /// A node with no successor.
    fn node() -> Self::Ptr;
    /// Makes `to` the successor of `from`.
    fn link(from: &Self::Ptr, to: &Self::Ptr);
    /// A full collection.
    fn collect();
    /// The collection to run when the garbage is young and the rest of the
    /// heap old; a full one for collectors without generations.
    fn collect_young() {
        Self::collect();
    }
    /// Lets go of the last handle to a ring.
    fn drop_ring(head: Self::Ptr) {
        drop(head);
    }
}

mod rc {
    use super::*;
    use std::rc::Rc;

    pub struct Node {
        next: RefCell<Option<Rc<Node>>>,
        _pad: u64,
    }
    const _: () = assert!(size_of::<Node>() == 24);

    pub struct Std;

    impl Contender for Std {
        node_and_link!(
            Rc,
            Node {
                next: RefCell::new(None),
                _pad: 0,
            }
        );
        fn collect() {}
        /// `Rc` cannot collect a ring: it is broken by hand, the floor.
        fn drop_ring(head: Rc<Node>) {
            head.next.borrow_mut().take();
        }
    }
}

mod pymalloc_cc {
    use super::*;
    use pymalloc::{gc, Cc, Trace};

    #[derive(Trace)]
    pub struct Node {
        next: RefCell<Option<Cc<Node>>>,
    }
    const _: () = assert!(size_of::<Node>() == 24);

    pub struct Pymalloc;

    impl Contender for Pymalloc {
        node_and_link!(
            Cc,
            Node {
                next: RefCell::new(None),
            }
        );
        fn collect() {
            gc::collect();
        }
        /// Generations 0 and 1: everything but the long-lived objects.
        fn collect_young() {
            gc::collect_generation(1);
        }
    }
}

mod rust_cc_peer {
    use super::*;
    use rust_cc::{collect_cycles, Cc, Finalize, Trace};

    #[derive(Trace, Finalize)]
    pub struct Node {
        next: RefCell<Option<Cc<Node>>>,
        _pad: u64,
    }
    const _: () = assert!(size_of::<Node>() == 24);

    pub struct RustCc;

    impl Contender for RustCc {
        node_and_link!(
            Cc,
            Node {
                next: RefCell::new(None),
                _pad: 0,
            }
        );
        fn collect() {
            collect_cycles();
        }
    }
}

mod gcmodule_peer {
    use super::*;
    use gcmodule::{collect_thread_cycles, Cc, Trace, Tracer};

    pub struct Node {
        next: RefCell<Option<Cc<Node>>>,
        _pad: u64,
    }
    const _: () = assert!(size_of::<Node>() == 24);

    /// By hand: gcmodule's derive makes `is_type_tracked` ask the field
    /// types, which recurses forever on a self-referential node.
    impl Trace for Node {
        fn trace(&self, tracer: &mut Tracer<'_>) {
            self.next.trace(tracer);
        }
        fn is_type_tracked() -> bool {
            true
        }
    }

    pub struct GcModule;

    impl Contender for GcModule {
        node_and_link!(
            Cc,
            Node {
                next: RefCell::new(None),
                _pad: 0,
            }
        );
        fn collect() {
            collect_thread_cycles();
        }
    }
}

mod bacon_rajan_peer {
    use super::*;
    use bacon_rajan_cc::{collect_cycles, Cc, Trace, Tracer};

    pub struct Node {
        next: RefCell<Option<Cc<Node>>>,
        _pad: u64,
    }
    const _: () = assert!(size_of::<Node>() == 24);

    impl Trace for Node {
        fn trace(&self, tracer: &mut Tracer<'_>) {
            self.next.trace(tracer);
        }
    }

    pub struct BaconRajan;

    impl Contender for BaconRajan {
        node_and_link!(
            Cc,
            Node {
                next: RefCell::new(None),
                _pad: 0,
            }
        );
        fn collect() {
            collect_cycles();
        }
    }
}

mod dumpster_peer {
    use super::*;
    use dumpster::unsync::{collect, Gc};
    use dumpster::Trace;

    #[derive(Trace)]
    pub struct Node {
        next: RefCell<Option<Gc<Node>>>,
    }
    const _: () = assert!(size_of::<Node>() == 24);

    pub struct Dumpster;

    impl Contender for Dumpster {
        node_and_link!(
            Gc,
            Node {
                next: RefCell::new(None),
            }
        );
        fn collect() {
            collect();
        }
    }
}

// gc_derive 0.5 expands to impls inside a const item.
#[allow(non_local_definitions)]
mod gc_peer {
    use super::*;
    use gc::{force_collect, Finalize, Gc, GcCell, Trace};

    #[derive(Trace, Finalize)]
    pub struct Node {
        next: GcCell<Option<Gc<Node>>>,
    }
    const _: () = assert!(size_of::<Node>() == 24);

    pub struct RustGc;

    impl Contender for RustGc {
        const TRACING: bool = true;
        node_and_link!(
            Gc,
            Node {
                next: GcCell::new(None),
            }
        );
        fn collect() {
            force_collect();
        }
    }
}

/// Bytes the allocator hands out now: (allocated, requested).
fn heap_bytes() -> (usize, usize) {
    let stats = ALLOC.stats();
    (
        stats.allocated_block_bytes() + stats.large_bytes,
        stats.requested_bytes,
    )
}

/// Allocations alive now.
fn live_allocations() -> usize {
    let stats = ALLOC.stats();
    stats.blocks_in_use() + stats.large_objects
}

const CHAIN: usize = 100_000;

/// Builds a chain of `CHAIN` nodes and drops it from the head.
fn chain<C: Contender>() -> usize {
    let mut head = C::node();
    for _ in 1..CHAIN {
        let next = C::node();
        C::link(&next, &head);
        head = next;
    }
    drop(head);
    if C::TRACING {
        C::collect();
    }
    CHAIN
}

/// Short-lived, request-scoped structures: chains of `SHORT` nodes built
/// and dropped one after another, `SHORT_CHAINS` of them. They die young,
/// so the allocation count never reaches a collection threshold.
const SHORT: usize = 100;
const SHORT_CHAINS: usize = 10_000;

fn short_chains<C: Contender>() -> usize {
    for _ in 0..SHORT_CHAINS {
        let mut head = C::node();
        for _ in 1..SHORT {
            let next = C::node();
            C::link(&next, &head);
            head = next;
        }
        drop(head);
    }
    // A tracing collector frees them on its own schedule; one collection
    // at the end accounts for what is left.
    if C::TRACING {
        C::collect();
    }
    SHORT * SHORT_CHAINS
}

/// Builds `rings` rings of `len` nodes, dropping each once built.
fn ring_garbage<C: Contender>(rings: usize, len: usize) {
    for _ in 0..rings {
        let first = C::node();
        let mut last = first.clone();
        for _ in 1..len {
            let next = C::node();
            C::link(&last, &next);
            last = next;
        }
        C::link(&last, &first);
        drop(last);
        C::drop_ring(first);
    }
}

/// 10k rings of 100 nodes, dropped, then one full collection.
fn rings<C: Contender>() -> usize {
    ring_garbage::<C>(10_000, 100);
    C::collect();
    1_000_000
}

/// Clones and drops one handle.
fn clone_drop<C: Contender>() -> usize {
    const N: usize = 10_000_000;
    let p = C::node();
    for _ in 0..N {
        black_box(black_box(&p).clone());
    }
    N
}

/// The figures of one contender, printed one per line as `name\tvalue`.
fn run<C: Contender>() {
    // Garbage beside live objects: 1M live nodes made old by a full
    // collection, then 100k nodes of ring garbage (rings of 10), dropped
    // and collected young.
    let live: Vec<C::Ptr> = (0..1_000_000).map(|_| C::node()).collect();
    C::collect();
    let before = live_allocations();
    let beside = time(|| {
        ring_garbage::<C>(10_000, 10);
        C::collect_young();
        100_000
    });
    let left = live_allocations().saturating_sub(before);
    drop(live);
    C::collect();

    let base = live_allocations();
    let figures = [
        ("acyclic chain 100k, build + drop", time(chain::<C>)),
        (
            "acyclic chains of 100, build + drop (1M nodes)",
            time(short_chains::<C>),
        ),
        ("10k rings of 100, build + drop + collect", time(rings::<C>)),
        (
            "100k ring garbage beside 1M live, build + drop + collect",
            beside,
        ),
        ("clone + drop of one pointer", time(clone_drop::<C>)),
    ];
    assert!(
        live_allocations() <= base + 1_000,
        "garbage was not freed: {} allocations more than before",
        live_allocations() - base
    );
    for (name, value) in figures {
        println!("{name}\t{value}");
    }
    println!("allocations left after the young collection\t{left}");

    // Bytes per tracked node: the handles' vector is reserved beforehand so
    // that only the nodes count.
    const NODES: usize = 100_000;
    let mut nodes = Vec::with_capacity(NODES);
    let (allocated, requested) = heap_bytes();
    nodes.extend((0..NODES).map(|_| C::node()));
    let (allocated_after, requested_after) = heap_bytes();
    println!(
        "bytes per node (24-byte value), allocated\t{}",
        (allocated_after - allocated) as f64 / NODES as f64
    );
    println!(
        "bytes per node (24-byte value), requested\t{}",
        (requested_after - requested) as f64 / NODES as f64
    );
    drop(nodes);
}

const CONTENDERS: [&str; 7] = [
    "Rc",
    "pymalloc Cc",
    "rust-cc 0.6",
    "gcmodule 0.3",
    "bacon_rajan_cc 0.4",
    "dumpster 2",
    "gc 0.5",
];

fn child(contender: usize) {
    let work = move || match contender {
        0 => run::<rc::Std>(),
        1 => run::<pymalloc_cc::Pymalloc>(),
        2 => run::<rust_cc_peer::RustCc>(),
        3 => run::<gcmodule_peer::GcModule>(),
        4 => run::<bacon_rajan_peer::BaconRajan>(),
        5 => run::<dumpster_peer::Dumpster>(),
        _ => run::<gc_peer::RustGc>(),
    };
    std::thread::Builder::new()
        .stack_size(1 << 30)
        .spawn(work)
        .unwrap()
        .join()
        .unwrap();
}

fn main() {
    driver::main(&CONTENDERS, child, print_table);
}

fn print_table(best: &driver::Best) {
    best.print_table(
        &CONTENDERS,
        &format!(
            "ns per object (bytes and allocation rows as labelled), minimum of {} interleaved runs",
            best.reps
        ),
        &["pymalloc / Rc", "pymalloc / best peer"],
        |at| {
            let py = at(1);
            let peer = (2..CONTENDERS.len()).map(at).fold(f64::INFINITY, f64::min);
            vec![ratio(py, at(0)), ratio(py, peer)]
        },
    );
    println!(
        "\nRc cannot collect: its rings are broken by hand (the floor). gc 0.5 traces: its \
         acyclic row includes a collection. gcmodule's Trace is written by hand (its derive \
         recurses forever on a self-referential node). pymalloc's young collection is \
         collect_generation(1); the peers run their only (full) collection. All run on a \
         1 GiB stack: peers drop a 100k chain recursively."
    );
}

/// `a / b`, or a dash when `b` is zero.
fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "–".to_string()
    } else {
        format!("{:.2}", a / b)
    }
}
