//! PyMalloc as the global allocator under real std workloads.
#![cfg(feature = "std")]

use pymalloc::PyMalloc;
use std::collections::{BTreeMap, HashMap};
use std::sync::{mpsc, Mutex};
use std::thread;

#[global_allocator]
static ALLOC: PyMalloc = PyMalloc::system();

/// The tests run one at a time: the statistics add up exactly only while
/// no other thread allocates (see `PyMalloc::stats`), and with the two
/// run side by side one run in thirty found them 3,968 bytes apart.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn vectors_strings_and_maps_keep_their_contents() {
    let _serial = SERIAL.lock().unwrap();
    let mut words: Vec<String> = (0..20_000)
        .map(|i| format!("word-{i}-{}", "x".repeat(i % 40)))
        .collect();
    let mut by_len: HashMap<usize, Vec<String>> = HashMap::new();
    for w in &words {
        by_len.entry(w.len()).or_default().push(w.clone());
    }
    let ordered: BTreeMap<String, usize> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), i))
        .collect();
    words.retain(|w| w.len() % 3 != 0);
    for w in &words {
        assert!(by_len[&w.len()].contains(w));
        assert_eq!(&words[words.iter().position(|x| x == w).unwrap()], w);
    }
    assert_eq!(ordered.len(), 20_000);
    for (i, (w, &idx)) in ordered.iter().enumerate().take(100) {
        assert!(w.starts_with("word-"), "{i}");
        assert_eq!(ordered[w], idx);
    }
    let total: usize = by_len.values().map(Vec::len).sum();
    assert_eq!(total, 20_000);
    assert!(ALLOC.stats().blocks_in_use() > 0);
}

#[test]
fn threads_allocate_and_free_each_others_blocks() {
    let _serial = SERIAL.lock().unwrap();
    let (tx, rx) = mpsc::channel::<Vec<Box<[u64]>>>();
    let producers: Vec<_> = (0..4)
        .map(|t| {
            let tx = tx.clone();
            thread::spawn(move || {
                for round in 0..200 {
                    let batch: Vec<Box<[u64]>> = (0..50)
                        .map(|i| {
                            vec![(t * 1_000_000 + round * 1000 + i) as u64; 1 + i % 70]
                                .into_boxed_slice()
                        })
                        .collect();
                    tx.send(batch).unwrap();
                }
            })
        })
        .collect();
    drop(tx);
    let mut seen = 0;
    for batch in rx {
        for (i, block) in batch.iter().enumerate() {
            assert_eq!(block.len(), 1 + i % 70);
            assert!(block.iter().all(|&v| v == block[0]));
        }
        seen += batch.len();
    }
    for p in producers {
        p.join().unwrap();
    }
    assert_eq!(seen, 4 * 200 * 50);
    let stats = ALLOC.stats();
    assert_eq!(stats.accounted_arena_bytes(), stats.arena_bytes());
}
