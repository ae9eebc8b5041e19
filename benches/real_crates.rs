//! Real crates doing real work (issue 15): syn parsing this crate's source,
//! regex compiling and searching, serde_json to a string and back, a rayon
//! map/reduce that allocates, and flate2 compressing and decompressing a
//! few MiB (checksums compared), over glibc, PyMalloc and mimalloc.
//!
//! Each contender runs in its own process; repetitions are interleaved and
//! each figure's minimum kept. Times are milliseconds per workload.
//!
//! `cargo bench -p pymalloc-bench --bench real_crates [-- REPS]`

mod driver;
mod global;
mod peers;
// Only the contender lookup and the generator are used here.
#[allow(dead_code)]
mod workloads;

use peers::{choice, id, CONTENDERS};
use rayon::prelude::*;
use std::hint::black_box;
use std::io::{Read, Write};
use workloads::Rng;

/// Sources syn parses: the largest files of this crate, 6,000 lines.
const SOURCES: [&str; 4] = [
    include_str!("../src/allocator/tracemalloc.rs"),
    include_str!("../src/allocator/front.rs"),
    include_str!("../src/allocator/thread_cache.rs"),
    include_str!("../src/allocator/heap_set.rs"),
];

/// Parses every source `rounds` times into a full syntax tree.
fn syn_parse(rounds: usize) -> usize {
    let mut items = 0;
    for _ in 0..rounds {
        for source in SOURCES {
            let file = syn::parse_file(source).expect("the crate's own source parses");
            items += black_box(file).items.len();
        }
    }
    items
}

/// About `bytes` of log-like lines: words, addresses, dates, numbers.
fn text(bytes: usize) -> String {
    const WORDS: [&str; 12] = [
        "allocating",
        "pool",
        "arena",
        "freed",
        "thread",
        "cache",
        "medium",
        "returned",
        "Größe",
        "run",
        "heap",
        "spilling",
    ];
    let mut rng = Rng(11);
    let mut out = String::with_capacity(bytes + 200);
    while out.len() < bytes {
        let n = rng.next();
        out.push_str(&format!(
            "2026-{:02}-{:02} user{}@host{}.example.org 10.{}.{}.{} {} {} id={}\n",
            1 + n % 12,
            1 + (n >> 4) % 28,
            (n >> 8) % 1000,
            (n >> 20) % 50,
            (n >> 24) % 256,
            (n >> 32) % 256,
            (n >> 40) % 256,
            WORDS[rng.below(WORDS.len())],
            WORDS[rng.below(WORDS.len())],
            rng.next() % 100_000,
        ));
    }
    out
}

const PATTERNS: [&str; 6] = [
    r"[a-z0-9]+@[a-z0-9]+\.example\.(org|com)",
    r"(\d{4})-(\d{2})-(\d{2})",
    r"\b(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\b",
    r"\b\w+ing\b",
    r"(?i)ARENA|POOL|HEAP",
    r"id=(?P<id>[1-9]\d{3,})",
];

/// Compiles the patterns `rounds` times; each round searches the text with
/// one of them, extracting every match's capture groups.
fn regex_search(haystack: &str, rounds: usize) -> usize {
    let mut found = 0;
    for round in 0..rounds {
        let compiled: Vec<regex::Regex> = PATTERNS
            .iter()
            .map(|p| regex::Regex::new(p).expect("a valid pattern"))
            .collect();
        let re = &compiled[round % compiled.len()];
        for caps in re.captures_iter(haystack) {
            found += caps.len();
        }
    }
    found
}

/// A JSON document of `records` objects: numbers, strings, arrays and a
/// nested object each.
fn document(records: usize) -> serde_json::Value {
    let mut rng = Rng(12);
    let items: Vec<serde_json::Value> = (0..records)
        .map(|i| {
            serde_json::json!({
                "id": i,
                "name": format!("record {i} of {records}"),
                // Eighths: exact in a short decimal, so the round trip compares
                // equal without serde_json's float_roundtrip feature.
                "score": rng.below(1_000_000) as f64 / 8.0,
                "tags": (0..1 + rng.below(6)).map(|t| format!("tag{t}")).collect::<Vec<_>>(),
                "owner": { "user": format!("user{}", rng.below(1000)), "active": i % 3 == 0 },
            })
        })
        .collect();
    serde_json::json!({ "version": 1, "items": items })
}

/// Builds the document, then writes it to a string and parses it back,
/// `rounds` times, checking the round trip.
fn json_round_trip(records: usize, rounds: usize) -> usize {
    let mut bytes = 0;
    for _ in 0..rounds {
        let doc = document(records);
        let text = serde_json::to_string(&doc).expect("serializable");
        let back: serde_json::Value = serde_json::from_str(&text).expect("parses back");
        assert!(back == doc, "serde_json round trip changed the document");
        bytes += text.len();
    }
    bytes
}

/// A parallel map/reduce whose map allocates: each item formats a string
/// and collects a vector from it; the reduce concatenates per-thread
/// vectors of strings.
fn rayon_map_reduce(items: usize) -> usize {
    let sum: u64 = (0..items as u64)
        .into_par_iter()
        .map(|i| {
            let s = format!("{i:x}-{}-{}", i.wrapping_mul(0x9e37_79b9), i % 97);
            let v: Vec<u32> = s.bytes().map(u32::from).collect();
            v.iter().map(|&b| u64::from(b)).sum::<u64>()
        })
        .sum();
    let strings: Vec<String> = (0..items / 4)
        .into_par_iter()
        .fold(Vec::new, |mut acc, i| {
            acc.push(format!("item {i}"));
            acc
        })
        .reduce(Vec::new, |mut a, mut b| {
            a.append(&mut b);
            a
        });
    black_box(sum) as usize + strings.len()
}

/// Compresses `data` in members of `member` bytes (each its own zlib
/// stream, as files or HTTP bodies are) and decompresses each; panics
/// unless the CRC-32 of what comes back equals the input's.
fn flate2_round_trip(data: &[u8], member: usize) -> usize {
    let mut compressed = 0;
    let mut whole = crc32fast::Hasher::new();
    for chunk in data.chunks(member) {
        let mut encoder =
            flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(chunk).expect("compress");
        let packed = encoder.finish().expect("finish");
        compressed += packed.len();
        let mut unpacked = Vec::new();
        flate2::read::ZlibDecoder::new(&packed[..])
            .read_to_end(&mut unpacked)
            .expect("decompress");
        assert_eq!(
            crc32fast::hash(chunk),
            crc32fast::hash(&unpacked),
            "flate2 round trip: CRC-32 of a member differs"
        );
        whole.update(&unpacked);
    }
    assert_eq!(
        whole.finalize(),
        crc32fast::hash(data),
        "flate2 round trip: CRC-32 of the whole input differs"
    );
    compressed
}

/// Bytes of one flate2 member: 8 KiB, as small files and HTTP bodies are,
/// so that the row measures the buffers of 512 encoders and decoders (each
/// takes about 400 KiB: dictionaries, hash chains, an 85 KiB output
/// buffer) as much as the compression. With 128 KiB members the three
/// contenders were within noise of each other (186-195 ms).
const FLATE2_MEMBER: usize = 8 << 10;

/// Milliseconds `work` takes.
fn ms(work: impl FnOnce() -> usize) -> f64 {
    driver::time(|| {
        black_box(work());
        1
    }) / 1e6
}

/// The figures, in table order.
const ROWS: [&str; 5] = ["syn", "regex", "serde_json", "rayon", "flate2"];

/// Runs every row, or, when `BENCH_ONLY` lists some (comma-separated, for
/// a profiler run of one child: `BENCH_ONLY=flate2 perf record BENCH
/// --contender 1`), those alone.
fn child(contender: usize) {
    assert_eq!(choice(), contender);
    let only = std::env::var("BENCH_ONLY").ok();
    // Inputs are made before any timing, the same for every contender.
    let haystack = text(2 << 20);
    let deflate_input = text(4 << 20).into_bytes();
    let work: [&dyn Fn() -> usize; 5] = [
        &|| syn_parse(8),
        &|| regex_search(&haystack, 24),
        &|| json_round_trip(20_000, 4),
        &|| rayon_map_reduce(2_000_000),
        &|| flate2_round_trip(&deflate_input, FLATE2_MEMBER),
    ];
    for (row, work) in ROWS.iter().zip(work) {
        if only
            .as_deref()
            .is_none_or(|o| o.split(',').any(|o| o == *row))
        {
            println!("{row}\t{}", ms(work));
        }
    }
}

fn main() {
    driver::main(&CONTENDERS, child, print_table);
}

fn print_table(best: &driver::Best) {
    // The total row adds up the rows' minima, so that the table adds up.
    let mut with_total = driver::Best {
        per_contender: best.per_contender.clone(),
        figures: best.figures.clone(),
        reps: best.reps,
    };
    for c in &mut with_total.per_contender {
        let sum = ROWS.iter().map(|row| c[*row]).sum();
        c.insert("total".to_string(), sum);
    }
    with_total.figures.push("total".to_string());
    with_total.print_table(
        &CONTENDERS,
        &format!(
            "ms per workload, minimum of {} interleaved runs; total: sum of the rows",
            best.reps
        ),
        &["pymalloc/mimalloc", "pymalloc/glibc", "mimalloc/glibc"],
        |at| {
            let (glibc, py, mi) = (at(id::GLIBC), at(id::PYMALLOC), at(id::MIMALLOC));
            [py / mi, py / glibc, mi / glibc]
                .map(|r| format!("{r:.2}"))
                .to_vec()
        },
    );
}
