//! Cross-thread stress in the style of mimalloc's `test-stress.c` and
//! larson: many threads allocate blocks of random sizes and alignments,
//! stamp each with a cookie naming the block, and hand them to one another
//! through channels; the receiver checks the cookie, sometimes reallocs,
//! and frees. Threads are created and joined in rounds, with blocks
//! outliving the thread that allocated them, since thread exit is where
//! per-thread caches get flushed.
//!
//! A block handed out twice while live would have its cookie overwritten by
//! the second owner's stamp (or by the debug feature's dead fill when that
//! owner frees it), so every check doubles as a "never handed out twice"
//! check. At the end every block is freed and every thread joined, so the
//! heap must report nothing live and hold only a few spare arenas.
//!
//! The allocators are plain `static`s called through `GlobalAlloc`, not the
//! `#[global_allocator]`: the test harness, channels and `Vec`s allocate
//! from the system, so the accounting counts only the test's own blocks.
//! Each test has its own heap, so the two can run in parallel and each
//! final count is exact.
#![cfg(feature = "std")]

mod common;

use common::rng::Rng;
use pymalloc::{Backing, Config, PyMalloc, Region, Stats};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// The heap of the larson-style test.
static ALLOC: PyMalloc = PyMalloc::system();

/// The heap of the producer/consumer test.
static PIPELINE_ALLOC: PyMalloc = PyMalloc::system();

/// The producer/consumer test again, over a fixed region: several heaps
/// (the default eight) share one region store.
static mut REGION: [u8; 64 << 20] = [0; 64 << 20];
// SAFETY: REGION is used by this allocator alone.
static REGION_ALLOC: PyMalloc<Region> = unsafe { PyMalloc::region(&raw mut REGION) };

/// The heap of the locked-path test: no thread caches and one heap, so
/// every call takes the same lock.
static LOCKED_ALLOC: PyMalloc =
    PyMalloc::system_with(Config::DEFAULT.with_thread_caches(false).with_heaps(1));

/// What the tests need of a heap, whatever its backing.
trait TestHeap: GlobalAlloc + Sync {
    fn stats(&self) -> Stats;
}

impl<B: Backing + Sync> TestHeap for PyMalloc<B> {
    fn stats(&self) -> Stats {
        PyMalloc::stats(self)
    }
}

/// Arenas a heap may still hold once everything is freed. Today's heap
/// keeps at most one spare; a heap split into several may keep one spare
/// in each. Sixteen allows for that, while a failure to give arenas back
/// (the producer/consumer test peaks at over 30) still fails.
const SPARE_ARENAS_MAX: usize = 16;

/// Largest request: well past the 512-byte small limit, into the fallback.
const LARGE_MAX: usize = 16 * 1024;

/// The requests the stress makes.
trait Requests {
    fn size(&mut self) -> usize;
    fn layout(&mut self) -> Layout;
}

impl Requests for Rng {
    /// A request size: mostly small, skewed to the smallest classes, and
    /// one in twenty large.
    fn size(&mut self) -> usize {
        match self.below(20) {
            0 => 513 + self.below(LARGE_MAX - 512),
            1..=9 => 1 + self.below(64),
            _ => 1 + self.below(512),
        }
    }

    /// A request: random size, power-of-two alignment from 1 to 64.
    fn layout(&mut self) -> Layout {
        let align = 1 << self.below(7);
        Layout::from_size_align(self.size(), align).unwrap()
    }
}

/// The byte at offset `i` of a block stamped with `cookie`.
fn pattern(cookie: u64, i: usize) -> u8 {
    (cookie >> ((i % 8) * 8)) as u8 ^ (i / 8) as u8
}

/// One live allocation, owned by whoever holds this value.
struct Block {
    heap: &'static dyn TestHeap,
    ptr: *mut u8,
    layout: Layout,
    /// Unique over the whole run, so two blocks never share a cookie.
    id: u64,
}

// SAFETY: a `Block` is the only handle to its allocation, and `PyMalloc`
// serves and frees blocks from any thread, so moving the handle moves the
// ownership with it.
unsafe impl Send for Block {}

impl Block {
    /// Allocates `layout` from `heap` and stamps it.
    fn new(heap: &'static dyn TestHeap, layout: Layout, id: u64) -> Block {
        // SAFETY: `layout` has a non-zero size (`Rng::size` is at least 1).
        let ptr = unsafe { heap.alloc(layout) };
        assert!(!ptr.is_null(), "allocation of {layout:?} failed");
        assert_eq!(ptr as usize % layout.align(), 0, "{layout:?} misaligned");
        let block = Block {
            heap,
            ptr,
            layout,
            id,
        };
        block.stamp();
        block
    }

    /// The address and id, mixed: a block moved by realloc, or another
    /// block at the same address, has a different cookie.
    fn cookie(&self) -> u64 {
        (self.ptr as u64) ^ self.id.wrapping_mul(0xD6E8_FEB8_6659_FD93)
    }

    fn stamp(&self) {
        let cookie = self.cookie();
        // SAFETY: the block is live, non-null (checked on allocation) and
        // `layout.size()` bytes long; `GlobalAlloc` promises a live block
        // to its one owner, this handle (the cookies check that promise).
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) };
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = pattern(cookie, i);
        }
    }

    /// Checks the first `len` bytes against `cookie`.
    fn check_with(&self, cookie: u64, len: usize, when: &str) {
        // SAFETY: the block is live, non-null and at least `len` bytes
        // long; it is this handle's alone, and nothing writes to it while
        // the slice lives.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, len) };
        if let Some(i) = (0..len).find(|&i| bytes[i] != pattern(cookie, i)) {
            panic!(
                "block {:#x} at {:p} ({:?}) {when}: byte {i} is {:#04x}, expected {:#04x}; \
                 overwritten, or handed out twice",
                self.id,
                self.ptr,
                self.layout,
                bytes[i],
                pattern(cookie, i)
            );
        }
    }

    fn check(&self) {
        self.check_with(self.cookie(), self.layout.size(), "before free");
    }

    /// Resizes to `new_size` bytes, same alignment; the old contents must
    /// survive up to the shorter length. Restamps for the new address.
    fn realloc(&mut self, new_size: usize) {
        let old_cookie = self.cookie();
        // SAFETY: `ptr` is live with `layout`; `new_size` is non-zero and,
        // at most 16 KiB, cannot overflow `isize` when rounded to the
        // alignment.
        let ptr = unsafe { self.heap.realloc(self.ptr, self.layout, new_size) };
        assert!(
            !ptr.is_null(),
            "realloc of {:?} to {new_size} failed",
            self.layout
        );
        assert_eq!(ptr as usize % self.layout.align(), 0, "realloc misaligned");
        let kept = self.layout.size().min(new_size);
        self.ptr = ptr;
        self.layout = Layout::from_size_align(new_size, self.layout.align()).unwrap();
        self.check_with(old_cookie, kept, "after realloc");
        self.stamp();
    }

    /// Checks the cookie and frees.
    fn free(self) {
        self.check();
        // SAFETY: `ptr` is live with `layout`, and `self` is its only
        // handle, consumed here.
        unsafe { self.heap.dealloc(self.ptr, self.layout) };
    }

    /// What a receiver does with a block: check it, sometimes realloc it
    /// first, then free it.
    fn receive(mut self, rng: &mut Rng) {
        if rng.chance(25) {
            self.check();
            let new_size = rng.size();
            self.realloc(new_size);
        }
        self.free();
    }
}

/// The assertions once all blocks are freed and all threads joined.
fn assert_drained(stats: &Stats) {
    assert_eq!(
        stats.live_allocations(),
        0,
        "blocks still counted live:\n{stats}"
    );
    assert_eq!(stats.blocks_in_use(), 0, "{stats}");
    assert_eq!((stats.large_objects, stats.large_bytes), (0, 0), "{stats}");
    assert!(
        stats.arenas_current - stats.arenas_retired <= SPARE_ARENAS_MAX,
        "{} arenas still held with nothing live:\n{stats}",
        stats.arenas_current
    );
    assert_eq!(
        stats.arenas_reclaimed + stats.arenas_current,
        stats.arenas_allocated_total,
        "{stats}"
    );
    assert_eq!(
        stats.accounted_arena_bytes(),
        stats.arena_bytes(),
        "{stats}"
    );
}

/// Calls `stats()` while `threads` run, so snapshots race with allocation
/// and arena release. The snapshots are checked only loosely: a heap split
/// in parts need not give an atomic view of them all.
fn watch(heap: &PyMalloc, threads: &[thread::JoinHandle<()>]) {
    while !threads.iter().all(thread::JoinHandle::is_finished) {
        let stats = heap.stats();
        assert!(stats.arenas_current <= stats.arenas_allocated_total);
        thread::sleep(Duration::from_millis(2));
    }
}

/// Blocks the larson threads of one round leave to later rounds.
static CARRIED: Mutex<Vec<Block>> = Mutex::new(Vec::new());

const THREADS: usize = 8;
const ROUNDS: usize = 6;
/// Operations per thread per round.
const STEPS: usize = 12_000;
/// Blocks a thread holds at once.
const LOCAL_MAX: usize = 200;

/// One larson thread: a mix of allocating, freeing its own blocks, sending
/// blocks to peers, freeing what peers sent, and trading with the blocks
/// left over from threads of earlier rounds.
fn larson(
    thread_no: usize,
    round: usize,
    inbox: Receiver<Block>,
    peers: Vec<Sender<Block>>,
    carried: &Mutex<Vec<Block>>,
) {
    let mut rng = Rng::new((round * THREADS + thread_no) as u64);
    let id_base = ((round as u64) << 48) | ((thread_no as u64) << 40);
    let mut next_id = 0u64;
    let mut local: Vec<Block> = Vec::with_capacity(LOCAL_MAX);
    let send = |block: Block, rng: &mut Rng| {
        let mut to = rng.below(THREADS - 1);
        if to >= thread_no {
            to += 1;
        }
        // The peer keeps its inbox until every sender is gone.
        peers[to].send(block).unwrap();
    };

    for _ in 0..STEPS {
        match rng.below(100) {
            0..=44 => {
                next_id += 1;
                let block = Block::new(&ALLOC, rng.layout(), id_base | next_id);
                if local.len() < LOCAL_MAX {
                    local.push(block);
                } else {
                    let at = rng.below(local.len());
                    let old = std::mem::replace(&mut local[at], block);
                    if rng.chance(50) {
                        old.free();
                    } else {
                        send(old, &mut rng);
                    }
                }
            }
            45..=69 if !local.is_empty() => {
                let block = local.swap_remove(rng.below(local.len()));
                send(block, &mut rng);
            }
            70..=84 if !local.is_empty() => {
                let block = local.swap_remove(rng.below(local.len()));
                block.free();
            }
            85..=89 if !local.is_empty() => {
                // Trade with the blocks of threads gone by.
                let mut pile = carried.lock().unwrap();
                if !pile.is_empty() {
                    let at = rng.below(pile.len());
                    let theirs = pile.swap_remove(at);
                    let mine = local.swap_remove(rng.below(local.len()));
                    pile.push(mine);
                    drop(pile);
                    theirs.check();
                    local.push(theirs);
                }
            }
            _ => {}
        }
        while let Ok(block) = inbox.try_recv() {
            if local.len() < LOCAL_MAX && rng.chance(20) {
                // Adopt it: it may travel on, or be freed here later.
                block.check();
                local.push(block);
            } else {
                block.receive(&mut rng);
            }
        }
    }

    // Leave some blocks to the threads of later rounds.
    for block in local {
        if rng.chance(30) {
            carried.lock().unwrap().push(block);
        } else {
            block.free();
        }
    }
    drop(peers);
    for block in inbox {
        block.receive(&mut rng);
    }
}

#[test]
fn larson_threads_trade_blocks_across_rounds() {
    let start = Instant::now();
    let mut highwater = 0;
    for round in 0..ROUNDS {
        let (senders, inboxes): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| mpsc::channel()).unzip();
        let threads: Vec<_> = inboxes
            .into_iter()
            .enumerate()
            .map(|(t, inbox)| {
                let peers = senders.clone();
                thread::spawn(move || larson(t, round, inbox, peers, &CARRIED))
            })
            .collect();
        drop(senders);
        watch(&ALLOC, &threads);
        for t in threads {
            t.join().unwrap();
        }
        let left = CARRIED.lock().unwrap().len();
        let stats = ALLOC.stats();
        highwater = highwater.max(stats.arenas_highwater);
        // Only the carried blocks are live. A heap may learn of remote
        // frees lazily, so this is a lower bound; the exact zero is checked
        // at the end.
        assert!(
            stats.live_allocations() >= left,
            "round {round}: {left} blocks carried over but {} counted live",
            stats.live_allocations()
        );
    }
    // The blocks left over go on a thread of their own, not this one: a
    // heap may cache frees per thread until the thread exits.
    thread::spawn(|| {
        let pile = std::mem::take(&mut *CARRIED.lock().unwrap());
        pile.into_iter().for_each(Block::free);
    })
    .join()
    .unwrap();
    let stats = ALLOC.stats();
    assert_drained(&stats);
    eprintln!(
        "larson: {ROUNDS} rounds of {THREADS} threads in {:?}, arena high-water {highwater}, \
         {} arenas held at the end",
        start.elapsed(),
        stats.arenas_current
    );
}

const PIPELINE_ROUNDS: usize = 12;
/// Blocks per batch sent from producer to consumer.
const BATCH: usize = 256;
/// Batches per streaming round.
const STREAM_BATCHES: usize = 60;
/// Batches per burst round: some 50,000 blocks, tens of arenas.
const BURST_BATCHES: usize = 200;

/// Allocates `batches` batches of blocks from `heap` and hands each to
/// `send`.
fn produce(heap: &'static dyn TestHeap, round: usize, batches: usize, send: impl Fn(Vec<Block>)) {
    let mut rng = Rng::new(1000 + round as u64);
    for batch in 0..batches {
        let blocks = (0..BATCH)
            .map(|i| {
                let id = ((round as u64) << 40) | ((batch * BATCH + i) as u64);
                Block::new(heap, rng.layout(), id)
            })
            .collect();
        send(blocks);
    }
}

/// Checks and frees every block that arrives.
fn consume(batches: impl IntoIterator<Item = Vec<Block>>) -> usize {
    let mut freed = 0;
    for batch in batches {
        freed += batch.len();
        for block in batch {
            block.free();
        }
    }
    freed
}

#[test]
fn a_producer_allocates_and_a_consumer_frees_everything() {
    pipeline(&PIPELINE_ALLOC, "pipeline");
}

#[test]
fn a_producer_and_a_consumer_share_a_region_between_heaps() {
    pipeline(&REGION_ALLOC, "pipeline over a region");
}

/// Two threads on one locked heap, each allocating and freeing its own
/// small blocks in a tight loop and freeing some of the other's: the heap
/// is held most of the time, so frees keep landing in the inbox of a heap
/// the other thread holds, and the locked fast paths' leaves find that
/// mail and collect it. Nothing may be lost or handed out twice.
#[test]
fn two_threads_hammering_one_locked_heap_lose_nothing() {
    const STEPS: u64 = 500_000;
    let work = |thread: u64, send: mpsc::SyncSender<Block>, receive: Receiver<Block>| {
        move || {
            let layout = Layout::from_size_align(32, 8).unwrap();
            let mut rng = Rng::new(thread + 1);
            let mut mine = std::collections::VecDeque::new();
            for step in 0..STEPS {
                mine.push_back(Block::new(&LOCKED_ALLOC, layout, thread << 32 | step));
                if mine.len() > 64 {
                    let block = mine.pop_front().unwrap();
                    if step % 4 == 0 {
                        if let Err(mpsc::TrySendError::Full(block)) = send.try_send(block) {
                            block.free();
                        }
                    } else {
                        block.free();
                    }
                }
                while let Ok(block) = receive.try_recv() {
                    block.receive(&mut rng);
                }
            }
            mine.into_iter().for_each(Block::free);
            drop(send);
            receive
                .into_iter()
                .for_each(|block| block.receive(&mut rng));
        }
    };
    let (to_second, from_first) = mpsc::sync_channel(256);
    let (to_first, from_second) = mpsc::sync_channel(256);
    let first = thread::spawn(work(0, to_second, from_second));
    let second = thread::spawn(work(1, to_first, from_first));
    first.join().unwrap();
    second.join().unwrap();
    assert_drained(&LOCKED_ALLOC.stats());
}

fn pipeline(heap: &'static dyn TestHeap, name: &str) {
    let start = Instant::now();
    for round in 0..PIPELINE_ROUNDS {
        let batches = if round % 2 == 0 {
            STREAM_BATCHES
        } else {
            BURST_BATCHES
        };
        let freed = if round % 2 == 0 {
            // Streaming: both run at once, the channel bounding the blocks
            // in flight, so the producer's heap is refilled by remote frees
            // while it allocates.
            let (tx, rx) = mpsc::sync_channel(8);
            let producer =
                thread::spawn(move || produce(heap, round, batches, |b| tx.send(b).unwrap()));
            let consumer = thread::spawn(move || consume(rx));
            producer.join().unwrap();
            consumer.join().unwrap()
        } else {
            // Burst: the producer allocates everything and exits before the
            // consumer starts, so every free is for a thread that is gone,
            // and the heap grows to many arenas that must go back.
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || produce(heap, round, batches, |b| tx.send(b).unwrap()))
                .join()
                .unwrap();
            thread::spawn(move || consume(rx)).join().unwrap()
        };
        assert_eq!(freed, batches * BATCH);
        let stats = heap.stats();
        assert_drained(&stats);
    }
    let stats = heap.stats();
    assert!(
        stats.arenas_highwater > SPARE_ARENAS_MAX && stats.arenas_reclaimed > 0,
        "the test should have made the heap grow and shrink:\n{stats}"
    );
    eprintln!(
        "{name}: {PIPELINE_ROUNDS} rounds in {:?}, arena high-water {}, \
         {} arenas held at the end",
        start.elapsed(),
        stats.arenas_highwater,
        stats.arenas_current
    );
}
