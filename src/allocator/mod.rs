//! The allocator half: [`PyMalloc`](front::PyMalloc), from the `GlobalAlloc`
//! front down to the memory it is carved from.
//!
//! # Design
//!
//! CPython's `obmalloc` serves small objects from *pools* (4 KiB, one size
//! class each) inside *arenas* (256 KiB, taken from the system), and hands
//! anything over 512 bytes to `malloc`. That is still the core here; what
//! Rust adds is a `Layout` on every call, so a free needs no lookup to tell
//! small from large, and threads, so the core is wrapped in layers that
//! keep threads out of each other's way. One allocation goes straight down,
//! and each file uses only the files below it:
//!
//! ```text
//! inject        GlobalAlloc's entry points: one gate test, then the front;
//!               the byte limit and failure injection that arm the gate
//! front         PyMalloc: routing by Layout, large objects, stats()
//! fork          pthread_atfork: every lock taken before fork, released after
//! tracemalloc   every allocation's traceback, in tables mapped from the OS
//! gate          the fast path's bound and the limit's count
//! debug         PYTHONMALLOC=debug: guards, fill patterns, ownership checks
//! thread_cache  per-thread LIFO lists per class, no lock or atomic RMW
//! heap_set      N heaps behind try-locks (and N medium ones), remote-free
//!               inboxes, one fixed block
//! heap          per-class lists of used pools; arenas sorted fullest first
//! shelf         per class, blocks freed without a cache, before the pools
//! retired       wholly free arenas kept mapped for the release delay
//! arena         one span from the backing, cut into pools; records outside it
//! pool          a page-sized run of one class's blocks: free list, bump, header
//! stats         the _debugmallocstats snapshot, filled in by the layers above
//! size_class    8-byte classes, then medium ones; alignment folded in
//! backing       System (mmap'd arenas) or Region (your span), large objects
//! store         a region's free spans: best fit, merged on free
//! config, list  geometry; intrusive lists
//! track         memory-tool hooks: ASan poisoning, valgrind client requests
//! sync          locks, atomics, the fork gate (loom under cfg(loom))
//! ```
//!
//! Why this order:
//!
//! * **The front decides once.** `class_for(size, align)` either names a
//!   small class or sends the request to the backing. Small requests try the
//!   calling thread's cache first; only a cache that is empty (or full, on a
//!   free) or absent goes down to the heap set.
//! * **A thread cache knows heaps, not allocators.** It binds to one
//!   allocator by a process-unique id and moves blocks to and from that
//!   allocator's heap set in batches; what it needs of the allocator (its
//!   id, its heap set, its backing) it asks through the small
//!   `thread_cache::CacheOwner` trait that the front
//!   implements, so the dependency points down.
//! * **The heap set owns the heaps' addresses.** A `PyMalloc` value may
//!   move; pools, inboxes and caches refer to heaps by address, so the heaps
//!   live in one block taken from the backing on first use. Choosing a heap
//!   needs no thread-local storage (a hash of the stack address, then
//!   try-locks), which is what firmware and non-glibc targets run on.
//! * **A heap is obmalloc.** Everything below the heap set runs under one
//!   heap's lock and is single-threaded code: CPython's usable-arena order
//!   (`nfp2lasta`), its pool states (used, full, empty), its lazy carving.
//!   Pools point at their arena record only as an opaque address, which the
//!   heap (above both) turns back into an `arena::Arena`.
//! * **Without a cache, a shelf.** Where no thread cache serves (no `std`,
//!   small regions, `Config::with_thread_caches(false)`) every call takes
//!   a heap's lock, and CPython's free touches the block's pool header each
//!   time, a cache miss among many live blocks. Each small heap then keeps
//!   a shelf (`shelf.rs`): per class up to a pool's bytes of blocks freed
//!   under its lock, handed out again first; pools see the overflow. It is
//!   emptied before a null, for the statistics and for spare arenas.
//! * **Backings know nothing of pools.** A backing hands out arenas and
//!   large blocks; how many bytes a region must have for a given `Config`
//!   is a question about the heap set, so `Region::min_len` is answered in
//!   `heap_set.rs`, where those sizes are known.
//!
//! * **Medium objects are small objects in larger pools.** Requests of 513
//!   bytes to 64 KiB (classes four to a power of two) are served by a
//!   second group of the same `Heap`s, whose pools are 512 KiB *runs* in
//!   16 MiB arenas of their own: a run is aligned to its size, so a free
//!   finds its header by masking, as a small block's pool, and the class
//!   (from the `Layout`) says which mask. No page map, and nothing new
//!   below the heap set: caches, inboxes, arena release, statistics and
//!   debug checks take a class and work on both groups. The small path
//!   does not see the tier: `class_for` turns a medium request down and
//!   the out-of-line `medium_or_large` hands its class back into the same
//!   inlined body (the small probe's instruction count stays within
//!   0.2 %). Arenas hold a run of every class so that a churn over the
//!   classes does not empty (and unmap) whole arenas. A region has the
//!   tier from 256 MiB (`Region::fitted`), its arenas a 64th of the span
//!   (from eight runs to the full 16 MiB from 1 GiB), carved from the store
//!   like small arenas and given back to it when empty; in a smaller span
//!   the runs each class strands in each heap would weigh too much, and
//!   the store, which packs blocks tightly, keeps those sizes. Turning the
//!   tier off (`Config::with_medium_tier(false)`) is CPython's behaviour.
//!
//! * **Small regions spend bytes, not speed.** In a region of tens of KiB
//!   what decides how much of it ends up in live blocks is how much sits
//!   outside any arena and how many partly used pools the size classes
//!   strand. Arenas of four 1 KiB pools instead of sixteen took 8–300 B
//!   from 39 % to 59 % of a 64 KiB span on the first fill (so
//!   `Region::config_for` picks arenas of a sixteenth of the span); lending
//!   a larger class's free block when no pool is left gained up to 4
//!   points after churn at no cost to the hot path; a null comes only after
//!   the thread's cache, every heap (its shelf emptied) and the spare arena
//!   were tried; thread
//!   caches are off under 32 MiB, where a cache could hold more than 1/64
//!   of the span; and one allocator keeps one spare arena, not one per
//!   heap. That still left 59 / 76 / 44 / 74 % on the four mixes of
//!   `tests/utilisation.rs`. Pools cannot reach 85 % on 8–64 B at all:
//!   rounding to 8-byte classes alone costs 9 % of those requests, headers
//!   5 % of each pool. So a region routes requests above
//!   `Config::pool_limit` to its own store (`store.rs`), the list of free
//!   spans that already serves large blocks and arenas from the same span,
//!   so bytes move between pools and store blocks as the load changes.
//!   Measured with the store's best fit (below; percent of the span in
//!   live blocks, first fill / lowest after churn on the workload's seed 1,
//!   then ns per allocation and free in a debug-free test build, for the
//!   mixes 8–300, 8–64, 16–512, 100–2000 B):
//!
//!   ```text
//!   span    limit  8-300    8-64     16-512   100-2000  ns (4 mixes)
//!   64 KiB    0    97/94    90/90    98/93    97/92     283 452 358 394
//!   64 KiB   32    89/85    78/75    88/85    97/92     264 224 275 419
//!   64 KiB   64    86/81    76/66    83/80    97/92     248  62 257 748
//!   64 KiB  128    78/61    76/66    72/41    89/47     283  62 372 389
//!   64 KiB  512    59/46    76/66    44/39    74/65     106  62 152 397
//!   256 KiB   0    97/96    91/90    98/96    99/96     623 4109 514 550
//!   256 KiB  64    89/84    79/73    92/90    99/96     508  63 496 545
//!   256 KiB 128    90/82    79/73    90/87    92/88     350  65 419 549
//!   256 KiB 512    73/66    79/73    65/59    85/81     113  67 150 480
//!   1 MiB     0    97/97    90/90    98/97    99/97     3869 14158 4637 1948
//!   1 MiB   256    90/78    83/81    90/84    87/85     321 101 1815 2421
//!   1 MiB   512    81/74    83/81    78/67    79/75     216 108 210 1247
//!   ```
//!
//!   Only the store alone reaches 85 % on every mix in 64 KiB, and it is
//!   as fast there as the pools on three mixes; but its search walks the
//!   free gaps, whose number grows with the span, while the pools' waste
//!   stays a few KiB whatever the span. Hence `Region::pool_limit_for`:
//!   the store serves everything under 128 KiB, the pools take requests up
//!   to 128 B from 128 KiB, 256 B from 512 KiB and every small request from
//!   2 MiB (so large regions keep CPython's geometry and speed). The limit
//!   costs a heap over the system allocator nothing (`Backing::BOUNDED` is
//!   a constant) and one compare on a region's fast path. Smaller pool
//!   headers and coarser classes were not tried: the first is bounded by
//!   the 5 % a header costs, the second makes rounding worse, and neither
//!   closes the gap to the store on 8–64 B.
//!
//!   The store's fit closed the last gap. It was linked_list_allocator's
//!   first fit, which after churn on 100–2000 B kept 86 % on seed 1, where
//!   embedded-alloc's TLSF keeps 88 %. It is now its own: the same
//!   address-ordered list of holes, headers inside the holes (no per-block
//!   header: Rust's `dealloc` gives the size), merged with both
//!   neighbours on free, blocks rounded to 8 bytes and at least 16 (one
//!   hole header), but a request takes the smallest hole that fits, the
//!   lowest on a tie. A hole that would be left with 1 to 15 bytes on
//!   either side of the block is passed over, as linked_list_allocator
//!   does (such a remainder cannot hold a header), and that rule decides
//!   the outcome: simulated best fit that gave such remainders to the
//!   block (noted here before) lost 3 points on seed 1; with the rule,
//!   best fit gains on every mix. Mean after churn over seeds 1–8, first
//!   fit → best fit (first fills do not change):
//!
//!   ```text
//!   span/limit  8-300        8-64         16-512       100-2000
//!   16 KiB/0    86.2 → 90.6  87.8 → 89.8  81.5 → 87.7  66.7 → 69.6
//!   64 KiB/0    91.7 → 95.0  90.0 → 90.7  90.2 → 94.5  85.7 → 90.1
//!   256 KiB/128 79.6 → 80.2  75.3 → 75.3  85.8 → 87.5  59.0 → 63.2
//!   1 MiB/256   80.2 → 80.2  81.2 → 81.2  83.0 → 84.8  80.4 → 85.9
//!   ```
//!
//!   Seed 1 loses only in 16 KiB on 16–512 B (84 → 81 %), and in
//!   64 KiB with a pool limit of 128, which no span gets by default
//!   (16–512 B 67 → 41 %, 100–2000 B 78 → 47 %; over the seeds −0.7 to
//!   −1.4 points). Simulated and no better on average: carving from a
//!   hole's top, large requests from the span's top (best on some seeds,
//!   worse on others), 8-byte minimum blocks with 32-bit headers (a point
//!   more on 8–64 B's first fill, half a point less after churn), 16-byte
//!   rounding, and passing over holes that would keep under 64 or 128 B.
//!   Best fit walks every hole (first fit stops at the first that fits; a
//!   free walks to its place in both). In 64 KiB that costs time: in
//!   `benches/utilisation.rs` pymalloc took 1.03–1.16×
//!   linked_list_allocator's time with first fit, and with best fit 1.4–1.5×
//!   on 8–300 and 16–512 B, 1.2× on 8–64 B and 0.8–1.1× on 100–2000 B (the
//!   walk is pointer chasing: testing the size before the fit changed
//!   nothing); stopping early at a hole that fits nearly exactly (within
//!   16–64 B, or 1/16–1/4 of the request) was simulated and gives back 0.5–2
//!   points of the gain. On large blocks (513 B–64 KiB) in a 1 GiB region it
//!   was 458 ns per allocation against first fit's 210 (the system allocator
//!   151 and 130 in those runs). So from `store::FIRST_FIT_SPAN` (2 MiB),
//!   where the pools take every small request and the store holds only arenas
//!   and large blocks, the search stops at the first hole that fits, as
//!   before.
//!
//! The debug checks wrap the front's unchecked paths the same way: they ask
//! for them through the `debug::Unchecked` trait, so they sit
//! below the front that implements it, and compile out without the feature.
//!
//! Memory-tool hooks (`track.rs`) sit at the bottom beside `sync`, as
//! mimalloc's `track.h` does: the pool, heap, cache and front layers call
//! them, and they compile to nothing without a tool. The limit and failure
//! injection sit on top: `GlobalAlloc` is implemented in `inject.rs`, which
//! tests the gate once and calls the front.

pub(crate) mod arena;
pub mod backing;
pub mod config;
#[cfg(feature = "debug")]
pub mod debug;
#[cfg(fork_handlers)]
pub(crate) mod fork;
pub(crate) mod front;
pub(crate) mod gate;
pub(crate) mod heap;
pub(crate) mod heap_set;
pub mod inject;
pub(crate) mod list;
pub(crate) mod pool;
pub(crate) mod retired;
pub(crate) mod shelf;
pub mod size_class;
pub mod stats;
pub(crate) mod store;
pub(crate) mod sync;
#[cfg(thread_cache)]
pub(crate) mod thread_cache;
#[cfg(all(feature = "std", not(loom)))]
pub mod tracemalloc;
pub(crate) mod track;

#[cfg(all(feature = "valgrind", asan))]
compile_error!(
    "pymalloc: the `valgrind` feature cannot be combined with AddressSanitizer: \
     valgrind does not run ASan-instrumented programs (each wants the whole address \
     space's shadow); build one binary for each tool"
);
#[cfg(all(feature = "valgrind", not(target_arch = "x86_64")))]
compile_error!(
    "pymalloc: the `valgrind` feature issues its client requests with x86_64 inline \
     assembly; other architectures are not supported yet"
);

/// Whether this build gives each thread a cache of free blocks in front of
/// the shared heaps: with `std` on Linux, macOS, FreeBSD, illumos, Solaris
/// and Windows (MSVC), without the `debug` feature (see `build.rs` for the
/// thread-exit hook of each, and why the others go without). Without them every
/// allocation takes a heap's lock, chosen without thread-local storage.
pub const THREAD_CACHES: bool = cfg!(thread_cache);
