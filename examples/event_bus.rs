//! The story this crate exists for: a service whose event bus kept every
//! listener alive.
//!
//! Each request registers a handler on the bus and never removes it. The
//! handler holds its request's context, and the context holds its handler:
//! a reference cycle. With a registry of strong references (`Vec<Cc<_>>`)
//! every request's pair stays reachable forever; with a `WeakSet` the bus
//! no longer owns its listeners, the finished request's pair becomes a
//! garbage cycle, and the cycle collector reclaims it.
//!
//! The program runs both registries, each in its own process so that their
//! numbers do not mix, and prints for each, at a few points in time: the
//! types that grew (census diff), the source lines whose objects grew
//! (allocation-site diff), the tracked objects, the allocator's blocks and
//! arenas, and the process's resident memory. Then it sets the two side by
//! side.
//!
//! Then the same incident in its literal form, without `Cc` at all:
//! handlers are closures (`Box<dyn Fn>`) capturing the request's context,
//! pushed into a plain `Vec` that never forgets them. Nothing here is
//! tracked by the collector, so the census cannot see it; `tracemalloc`
//! can. In the middle of the run, on demand (start, let it serve, take a
//! snapshot, stop: tracing everything all the time costs memory), the
//! `compare_to` diff names the line that registers the handler. With the
//! fixed registry, which drops a request's handler when the request ends,
//! the same diff shows nothing growing.
//!
//! Run: `cargo run --release --example event_bus`

use pymalloc::tracemalloc::{self, KeyType};
use pymalloc::{gc, Cc, PyMalloc, Trace, WeakSet};
use std::cell::RefCell;
use std::collections::HashMap;
use std::process::Command;

#[global_allocator]
static ALLOC: PyMalloc = PyMalloc::system();

/// What a request carries around while it is served.
#[derive(Trace)]
struct RequestContext {
    id: u64,
    user: String,
    payload: Vec<u8>,
    /// The handler this request registered: the back edge of the cycle.
    handler: RefCell<Option<Cc<Handler>>>,
}

/// A listener for the request's completion events.
#[derive(Trace)]
struct Handler {
    context: Cc<RequestContext>,
    topic: String,
    filter: [u32; 16],
}

/// The bus: who gets told about events.
trait Registry {
    fn subscribe(&mut self, handler: &Cc<Handler>);
    fn publish(&mut self, topic: &str) -> usize;
    const NAME: &'static str;
}

/// The bug: the bus owns its listeners, so none is ever freed.
#[derive(Default)]
struct LeakingBus(Vec<Cc<Handler>>);

impl Registry for LeakingBus {
    const NAME: &'static str = "leaking registry (Vec<Cc<Handler>>)";
    fn subscribe(&mut self, handler: &Cc<Handler>) {
        self.0.push(handler.clone());
    }
    fn publish(&mut self, topic: &str) -> usize {
        self.0.iter().filter(|h| h.topic == topic).count()
    }
}

/// The fix: the bus only observes its listeners.
#[derive(Default)]
struct WeakBus(WeakSet<Handler>);

impl Registry for WeakBus {
    const NAME: &'static str = "fixed registry (WeakSet<Handler>)";
    fn subscribe(&mut self, handler: &Cc<Handler>) {
        self.0.insert(handler);
    }
    fn publish(&mut self, topic: &str) -> usize {
        self.0.iter().filter(|h| h.topic == topic).count()
    }
}

/// Serves one request: a context, its handler, each pointing at the other.
fn serve(bus: &mut impl Registry, id: u64) {
    let context = Cc::new(RequestContext {
        id,
        user: format!("user{}", id % 1000),
        payload: vec![id as u8; 256],
        handler: RefCell::new(None),
    });
    let handler = Cc::new(Handler {
        context: context.clone(),
        topic: format!("order/{}", id % 64),
        filter: [id as u32; 16],
    });
    bus.subscribe(&handler);
    *context.handler.borrow_mut() = Some(handler);
    if id % 1000 == 0 {
        bus.publish("order/0");
    }
    assert_eq!(context.id, id);
    // The request is done: `context` goes out of scope here.
}

fn resident_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1 << 20) as f64
}

const CHECKPOINTS: u64 = 5;
const REQUESTS_PER_CHECKPOINT: u64 = 40_000;

/// In a child process: serve requests through `bus`, reporting as it goes.
fn run<B: Registry + Default>() {
    gc::set_site_tracing(true);
    let mut bus = B::default();
    let types_at_start = gc::census();
    let sites_at_start = gc::site_census();
    let heap_at_start = ALLOC.stats();
    println!("=== {}\n", B::NAME);
    for checkpoint in 1..=CHECKPOINTS {
        for id in (checkpoint - 1) * REQUESTS_PER_CHECKPOINT..checkpoint * REQUESTS_PER_CHECKPOINT {
            serve(&mut bus, id);
        }
        let served = checkpoint * REQUESTS_PER_CHECKPOINT;
        let heap = ALLOC.stats();
        let tracked = gc::tracked_count();
        let rss = resident_mib();
        println!(
            "after {served} requests: {tracked} tracked objects, {} small blocks in {} arenas, \
             {:.1} MiB held by the heap, resident {rss:.1} MiB",
            heap.blocks_in_use(),
            heap.arenas_current,
            heap.held_bytes() as f64 / (1 << 20) as f64,
        );
        let mut types = gc::census().diff(&types_at_start);
        types.rows.truncate(3);
        let mut sites = gc::site_census().diff(&sites_at_start);
        sites.rows.truncate(3);
        println!("  types that grew since the start (rank  +growth  now  type):");
        print_indented(&types.to_string(), "(none)");
        println!("  allocation sites that grew (rank  bytes  objects  line):");
        print_indented(&sites.to_string(), "(none)");
        println!(
            "@@\t{served}\t{tracked}\t{}\t{}\t{rss:.1}",
            heap.blocks_in_use(),
            heap.arenas_current
        );
    }
    let generations = gc::stats();
    println!(
        "collections by generation: {:?}; objects collected: {}",
        generations.map(|g| g.collections),
        generations.iter().map(|g| g.collected).sum::<usize>()
    );
    println!(
        "heap growth over the run, largest size classes first:\n{}",
        ALLOC.stats().diff(&heap_at_start)
    );
}

/// What a closure handler is told.
struct Event {
    topic: u64,
}

type Callback = Box<dyn Fn(&Event) -> bool>;

/// A registry of closures.
trait ClosureRegistry: Default {
    const NAME: &'static str;
    fn register(&mut self, request: u64, handler: Callback);
    fn publish(&self, event: &Event) -> usize;
    /// The request is over.
    fn finish(&mut self, request: u64);
}

/// The bug, literally: a `Vec` of closures that only ever grows.
#[derive(Default)]
struct ClosureVec(Vec<Callback>);

impl ClosureRegistry for ClosureVec {
    const NAME: &'static str = "leaking closure registry (Vec<Box<dyn Fn>>)";
    fn register(&mut self, _request: u64, handler: Callback) {
        self.0.push(handler);
    }
    fn publish(&self, event: &Event) -> usize {
        self.0.iter().filter(|h| h(event)).count()
    }
    fn finish(&mut self, _request: u64) {}
}

/// The fix: handlers keyed by request, dropped when the request ends.
#[derive(Default)]
struct ClosureMap(HashMap<u64, Callback>);

impl ClosureRegistry for ClosureMap {
    const NAME: &'static str = "fixed closure registry (removed when the request ends)";
    fn register(&mut self, request: u64, handler: Callback) {
        self.0.insert(request, handler);
    }
    fn publish(&self, event: &Event) -> usize {
        self.0.values().filter(|h| h(event)).count()
    }
    fn finish(&mut self, request: u64) {
        self.0.remove(&request);
    }
}

/// What a closure captures: the request's context, by value.
struct ClosureContext {
    id: u64,
    user: String,
    headers: [u32; 48],
}

impl ClosureContext {
    fn wants(&self, event: &Event) -> bool {
        event.topic == self.id % 64 && !self.user.is_empty() && self.headers[0] != 1
    }
}

/// Serves one request whose handler is a closure over its context.
fn serve_closure(bus: &mut impl ClosureRegistry, id: u64) {
    let context = ClosureContext {
        id,
        user: format!("user{}", id % 1000),
        headers: [id as u32; 48],
    };
    bus.register(id, Box::new(move |event| context.wants(event)));
    if id % 1000 == 0 {
        bus.publish(&Event { topic: 0 });
    }
    bus.finish(id);
}

const CLOSURE_WARMUP: u64 = 20_000;
const CLOSURE_TRACED: u64 = 20_000;

/// In a child process: serve requests through a closure registry, and in
/// the middle of the run trace for a while and print what grew.
fn run_closures<B: ClosureRegistry>() {
    println!(
        "=== {}
",
        B::NAME
    );
    let mut bus = B::default();
    for id in 0..CLOSURE_WARMUP {
        serve_closure(&mut bus, id);
    }
    // On demand: start, let the service run, snapshot, stop.
    tracemalloc::start(1);
    let baseline = tracemalloc::take_snapshot();
    for id in CLOSURE_WARMUP..CLOSURE_WARMUP + CLOSURE_TRACED {
        serve_closure(&mut bus, id);
    }
    let now = tracemalloc::take_snapshot();
    let (traced, peak) = tracemalloc::get_traced_memory();
    let tables = tracemalloc::get_tracemalloc_memory();
    tracemalloc::stop();
    println!(
        "traced {CLOSURE_TRACED} requests after {CLOSURE_WARMUP}: {:.1} KiB live since start (peak {:.1} KiB), \
         tracemalloc's tables {:.1} KiB",
        traced as f64 / 1024.0,
        peak as f64 / 1024.0,
        tables as f64 / 1024.0
    );
    println!("  top lines of compare_to(baseline, 'lineno'):");
    let diff = now.compare_to(&baseline, KeyType::Lineno);
    let growing: Vec<_> = diff.iter().filter(|d| d.size_diff > 0).take(3).collect();
    if growing.is_empty() {
        println!("    (nothing grew)");
    }
    for stat in growing {
        println!("    {stat}");
    }
}

fn print_indented(text: &str, empty: &str) {
    if text.is_empty() {
        println!("    {empty}");
    }
    for line in text.lines() {
        println!("    {line}");
    }
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("leaking") => return run::<LeakingBus>(),
        Some("fixed") => return run::<WeakBus>(),
        Some("closures-leaking") => return run_closures::<ClosureVec>(),
        Some("closures-fixed") => return run_closures::<ClosureMap>(),
        _ => {}
    }
    let exe = std::env::current_exe().expect("own path");
    let mut rows: Vec<Vec<Vec<String>>> = Vec::new();
    for mode in ["leaking", "fixed"] {
        let out = Command::new(&exe).arg(mode).output().expect("run a mode");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in text.lines().filter(|l| !l.starts_with("@@")) {
            println!("{line}");
        }
        println!();
        rows.push(
            text.lines()
                .filter_map(|l| l.strip_prefix("@@\t"))
                .map(|l| l.split('\t').map(String::from).collect())
                .collect(),
        );
    }
    println!("=== side by side: leaking | fixed");
    println!(
        "{:>9} | {:>17} | {:>21} | {:>13} | {:>19}",
        "requests", "tracked objects", "small blocks", "arenas", "resident MiB"
    );
    for (leak, fixed) in rows[0].iter().zip(&rows[1]) {
        println!(
            "{:>9} | {:>8} {:>8} | {:>10} {:>10} | {:>6} {:>6} | {:>9} {:>9}",
            leak[0], leak[1], fixed[1], leak[2], fixed[2], leak[3], fixed[3], leak[4], fixed[4]
        );
    }
    println!(
        "\nThe leaking registry grows by one Handler and one RequestContext per request, and the\n\
         site diff names the lines that made them. The WeakSet registry stays flat: each finished\n\
         request leaves a context/handler cycle that only the collector can free, and it does."
    );
    println!();
    for mode in ["closures-leaking", "closures-fixed"] {
        let out = Command::new(&exe).arg(mode).output().expect("run a mode");
        assert!(
            out.status.success(),
            "{mode} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{}", String::from_utf8_lossy(&out.stdout));
    }
    println!(
        "No Cc here, so no census: tracemalloc's diff names the line that registers the closure,\n\
         one per request; with the fixed registry nothing grows."
    );
}
