//! The layering rules of `src/`: within each half a file uses only the
//! files below it (in the orders the halves' `mod.rs` essays give), and the
//! allocator half never names the collector half.

use std::fs;
use std::path::Path;

/// Top to bottom, as in `src/allocator/mod.rs`.
const ALLOCATOR: &[&str] = &[
    "inject",
    "front",
    "fork",
    "tracemalloc",
    "gate",
    "debug",
    "thread_cache",
    "heap_set",
    "heap",
    "shelf",
    "retired",
    "arena",
    "pool",
    "stats",
    "size_class",
    "backing",
    "store",
    "config",
    "list",
    "track",
    "sync",
];

/// Top to bottom, as in `src/gc/mod.rs`.
const GC: &[&str] = &[
    "mod",
    "weak_collections",
    "census",
    "pointer",
    "ambient",
    "collector",
    "trace",
    "header",
];

/// Public names the crate root re-exports from the collector half: an
/// allocator file naming one through `crate::` would hide an upward use.
const GC_ROOT_NAMES: &[&str] = &[
    "Cc",
    "Weak",
    "Trace",
    "Finalize",
    "Visitor",
    "Collector",
    "WeakSet",
    "WeakValueMap",
];

/// The source of `half/file.rs` without its comment lines.
fn code(half: &str, file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(half)
        .join(format!("{file}.rs"));
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules of `half` that `code` names, as `super::m`,
/// `crate::half::m` or `$crate::half::m`.
fn uses<'a>(code: &str, half: &str, modules: &[&'a str]) -> Vec<&'a str> {
    modules
        .iter()
        .copied()
        .filter(|m| {
            [format!("super::{m}::"), format!("crate::{half}::{m}::")]
                .iter()
                .any(|path| {
                    code.match_indices(path.as_str()).any(|(at, _)| {
                        // Not the tail of a longer name (`super::heap` in `super::heap_set`
                        // is excluded by the trailing `::`; check the head).
                        at == 0 || !code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_')
                    })
                })
        })
        .collect()
}

fn check_order(half: &str, order: &[&str]) -> Vec<String> {
    let mut errors = Vec::new();
    for (i, file) in order.iter().enumerate() {
        let code = code(half, file);
        for used in uses(&code, half, order) {
            let j = order.iter().position(|m| *m == used).unwrap();
            if j <= i && used != *file {
                errors.push(format!(
                    "src/{half}/{file}.rs uses {used}.rs, which is not below it"
                ));
            }
        }
    }
    errors
}

#[test]
fn every_source_file_has_a_place_in_its_half() {
    for (half, order) in [("allocator", ALLOCATOR), ("gc", GC)] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(half);
        for entry in fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let stem = name.strip_suffix(".rs").unwrap();
            assert!(
                order.contains(&stem) || (half == "allocator" && stem == "mod"),
                "src/{half}/{name} is missing from the layer order in tests/layers.rs"
            );
        }
    }
}

#[test]
fn allocator_files_use_only_files_below_them() {
    let errors = check_order("allocator", ALLOCATOR);
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn collector_files_use_only_files_below_them() {
    let errors = check_order("gc", GC);
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn the_allocator_half_never_names_the_collector_half() {
    let mut errors = Vec::new();
    for file in ALLOCATOR.iter().chain(&["mod"]) {
        let code = code("allocator", file);
        for path in ["crate::gc", "super::gc", "super::super::gc", "pymalloc::gc"] {
            if code.contains(path) {
                errors.push(format!("src/allocator/{file}.rs names {path}"));
            }
        }
        for name in GC_ROOT_NAMES {
            for path in [format!("crate::{name}"), format!("pymalloc::{name}")] {
                if code.match_indices(path.as_str()).any(|(at, _)| {
                    !code[at + path.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
                }) {
                    errors.push(format!("src/allocator/{file}.rs names {path}"));
                }
            }
        }
    }
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn the_checker_catches_an_upward_use() {
    // A pool naming the heap, or a header naming a pointer, must be caught.
    assert_eq!(
        uses("use super::heap::Heap;", "allocator", ALLOCATOR),
        ["heap"]
    );
    assert_eq!(
        uses("let x = super::heap_set::X;", "allocator", ALLOCATOR),
        ["heap_set"]
    );
    assert_eq!(uses("crate::gc::pointer::Cc", "gc", GC), ["pointer"]);
    assert!(uses("my_super::heap::X", "allocator", ALLOCATOR).is_empty());
}
