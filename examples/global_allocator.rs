//! PyMalloc as the global allocator of a small "service": it builds an
//! in-memory index of documents (many small strings and map nodes), serves
//! some queries, then drops most of it. The statistics before and after
//! show where the memory sat and that the emptied arenas went back.
//!
//! Run: `cargo run --release --example global_allocator`

use pymalloc::PyMalloc;
use std::collections::{BTreeMap, HashMap};

#[global_allocator]
static ALLOC: PyMalloc = PyMalloc::system();

/// A JSON-like document.
#[allow(dead_code)]
enum Value {
    Number(f64),
    Text(String),
    List(Vec<Value>),
    Object(BTreeMap<String, Value>),
}

fn document(id: usize) -> Value {
    let mut fields = BTreeMap::new();
    fields.insert("id".to_string(), Value::Number(id as f64));
    fields.insert(
        "title".to_string(),
        Value::Text(format!("document number {id}")),
    );
    let tags = (0..id % 7)
        .map(|t| Value::Text(format!("tag{}", (id * 31 + t) % 50)))
        .collect();
    fields.insert("tags".to_string(), Value::List(tags));
    Value::Object(fields)
}

fn resident_kib() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    Some(statm.split_whitespace().nth(1)?.parse::<usize>().ok()? * 4)
}

fn main() {
    let start = ALLOC.stats();
    println!(
        "== at start: {} arenas, resident {:?} KiB\n",
        start.arenas_current,
        resident_kib()
    );

    let docs: Vec<Value> = (0..200_000).map(document).collect();
    let mut index: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, doc) in docs.iter().enumerate() {
        if let Value::Object(fields) = doc {
            if let Some(Value::List(tags)) = fields.get("tags") {
                for tag in tags {
                    if let Value::Text(t) = tag {
                        index.entry(t.clone()).or_default().push(i);
                    }
                }
            }
        }
    }
    let hits: usize = (0..50)
        .map(|t| index.get(&format!("tag{t}")).map_or(0, Vec::len))
        .sum();
    println!(
        "indexed {} documents, {} tags, {hits} postings",
        docs.len(),
        index.len()
    );

    let loaded = ALLOC.stats();
    println!("\n== loaded: resident {:?} KiB\n{loaded}", resident_kib());
    println!(
        "== what grew while loading (largest first)\n{}",
        loaded.diff(&start)
    );

    // Keep one document in ten; the rest goes.
    let kept: Vec<Value> = docs.into_iter().step_by(10).collect();
    drop(index);
    let trimmed = ALLOC.stats();
    println!(
        "== after dropping 90 %: {} documents kept, resident {:?} KiB\n{}",
        kept.len(),
        resident_kib(),
        trimmed.diff(&loaded)
    );
    println!(
        "   {} arenas are still held: the survivors are spread over them, and an arena\n   \
         goes back only when every pool in it is empty.\n",
        trimmed.arenas_current
    );

    drop(kept);
    let end = ALLOC.stats();
    println!(
        "== after dropping everything: resident {:?} KiB\n{end}",
        resident_kib()
    );
    println!(
        "{} arenas were taken in all, {} given back to the system, {} held now.",
        end.arenas_allocated_total, end.arenas_reclaimed, end.arenas_current
    );
    println!(
        "What stays resident beyond the {} KiB this heap holds belongs to the system\n\
         allocator: it served the {} large objects (map nodes over 512 bytes) seen at\n\
         the peak and keeps their freed memory on its own free lists.",
        end.held_bytes() / 1024,
        loaded.large_objects
    );
}
