//! The geometry of a heap: how big a pool is, how many pools an arena holds,
//! and how many independent heaps share the work of several threads.

use super::sync::{loom_const_fn, AtomicBool, AtomicUsize, Ordering};

/// Most pools one arena may hold. CPython uses 64 in every configuration; the
/// arena index (`Heap::last_with_free`) is an array of this size plus one.
pub const MAX_ARENA_POOLS: usize = 64;

/// Smallest pool: one 512-byte block must still fit beside the pool header.
pub const MIN_POOL_SIZE: usize = 1024;

/// Largest pool: block offsets inside a pool are kept in 32 bits.
pub const MAX_POOL_SIZE: usize = 1 << 24;

/// Most heaps one allocator may hold.
pub const MAX_HEAPS: usize = 32;

/// Largest request a heap can serve from its pools (its largest size
/// class), and what [`Config::pool_limit`] is unless lowered.
pub const MAX_POOL_LIMIT: usize = 512;

/// Bytes in one run of the medium tier: its pools, one class each,
/// aligned to their size so that a block's run is found by masking, as a
/// small block's pool is. Large enough for seven 64 KiB blocks (mimalloc's
/// medium pages are as large); only the pages a class's blocks reach are
/// ever touched (runs are carved lazily).
pub const MEDIUM_RUN_SIZE: usize = 512 * 1024;

/// Runs in one arena of the medium tier (16 MiB, touched only as runs are
/// carved). Room for a run of every medium class in one arena: with 1 MiB
/// arenas, a churn over the classes emptied whole arenas, which went back
/// to the system and came back as fresh pages to fault in, and the
/// 513 B - 64 KiB row was no faster than the fallback.
pub const MEDIUM_ARENA_RUNS: usize = 32;

/// Heaps in [`Config::DEFAULT`]: enough that up to eight threads each find
/// a heap of their own, few enough that the spare arena and partly used
/// pools each heap keeps stay small beside a desktop program.
pub const DEFAULT_HEAPS: usize = 8;

/// Milliseconds a heap over a backing with a clock keeps its wholly free
/// arenas once it stops using arenas, in [`Config::DEFAULT`] (see
/// [`Config::with_release_delay_ms`]). Between mimalloc's two purge delays
/// (10 ms for pages, 100 ms for memory back in its arenas); 10 ms still let
/// serde_json's rebuild fault in a third of its pages again (42 k faults
/// against 23 k), 20 ms and more none.
pub const DEFAULT_RELEASE_DELAY_MS: usize = 50;

/// Pool size, pools per arena and heap count of a
/// [`PyMalloc`](crate::PyMalloc).
///
/// The default is CPython's classic layout, 4 KiB pools, 64 to an arena of
/// 256 KiB, in [`DEFAULT_HEAPS`] heaps. [`Config::SMALL`] suits heaps of
/// tens of KiB (firmware): 1 KiB pools, 16 to an arena of 16 KiB, one heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pool_size: usize,
    arena_pools: usize,
    heaps: usize,
    pool_limit: usize,
    thread_caches: bool,
    medium_tier: bool,
    release_delay_ms: usize,
}

impl Config {
    /// 4 KiB pools, 64 pools (256 KiB) an arena, [`DEFAULT_HEAPS`] heaps.
    pub const DEFAULT: Config = Config::new(4096, 64);

    /// 1 KiB pools, 16 pools (16 KiB) an arena, one heap: a 64 KiB region
    /// holds three arenas and still has room for a few large objects.
    pub const SMALL: Config = Config::new(1024, 16).with_heaps(1);

    /// A geometry of `arena_pools` pools of `pool_size` bytes each.
    ///
    /// # Panics
    /// If `pool_size` is not a power of two between [`MIN_POOL_SIZE`] and
    /// [`MAX_POOL_SIZE`], or `arena_pools` is not in `1..=MAX_ARENA_POOLS`.
    /// In a `static` initializer that panic is a compile-time error.
    pub const fn new(pool_size: usize, arena_pools: usize) -> Self {
        assert!(
            pool_size.is_power_of_two() && pool_size >= MIN_POOL_SIZE && pool_size <= MAX_POOL_SIZE,
            "pymalloc: pool size must be a power of two from 1 KiB to 16 MiB"
        );
        assert!(
            arena_pools >= 1 && arena_pools <= MAX_ARENA_POOLS,
            "pymalloc: an arena holds from 1 to 64 pools"
        );
        Config {
            pool_size,
            arena_pools,
            heaps: DEFAULT_HEAPS,
            pool_limit: MAX_POOL_LIMIT,
            thread_caches: true,
            medium_tier: true,
            release_delay_ms: DEFAULT_RELEASE_DELAY_MS,
        }
    }

    /// This geometry with the medium tier on or off. On (the default),
    /// requests of 513 bytes to
    /// [`MEDIUM_LIMIT`](crate::size_class::MEDIUM_LIMIT) are served from
    /// runs of 512 KiB in arenas of their own, in classes four to a power
    /// of two, through the same heaps, thread caches and inboxes as small
    /// blocks. Off, they go to the backing's fallback as in CPython, whose
    /// obmalloc sends everything over 512 bytes to `malloc`: the
    /// CPython-faithful setting. A [`Region`](crate::Region) has the tier
    /// only from 256 MiB ([`Region::fitted`](crate::Region::fitted)).
    pub const fn with_medium_tier(self, on: bool) -> Self {
        Config {
            medium_tier: on,
            ..self
        }
    }

    /// This geometry with wholly free arenas kept mapped until their heap
    /// has neither let an arena go nor carved a pool for `ms` milliseconds
    /// (or for 100 such delays, however busy), over a backing with a clock
    /// ([`System`](crate::System)); 0 gives them back at once, as CPython
    /// does. A program that frees everything and builds it again takes its
    /// arenas back mapped and resident, instead of mapping them and
    /// faulting every page in afresh; one that stops allocating keeps them
    /// until its next call into the allocator after the delay. The spare arena each heap may keep is apart from this.
    /// A [`Region`](crate::Region) has no clock: its arenas go back at
    /// once, to be carved for large objects.
    pub const fn with_release_delay_ms(self, ms: usize) -> Self {
        Config {
            release_delay_ms: ms,
            ..self
        }
    }

    /// See [`Config::with_release_delay_ms`].
    pub const fn release_delay_ms(&self) -> usize {
        self.release_delay_ms
    }

    /// Whether the medium tier is on (see [`Config::with_medium_tier`]).
    pub const fn medium_tier(&self) -> bool {
        self.medium_tier
    }

    /// This geometry with `heaps` independent heaps. Threads that meet on
    /// one heap's lock move on to another, so more heaps means less waiting
    /// and more memory held in partly used pools; one heap suits a
    /// single-core device.
    ///
    /// # Panics
    /// If `heaps` is not in `1..=MAX_HEAPS`.
    pub const fn with_heaps(self, heaps: usize) -> Self {
        assert!(
            heaps >= 1 && heaps <= MAX_HEAPS,
            "pymalloc: an allocator holds from 1 to 32 heaps"
        );
        Config { heaps, ..self }
    }

    /// This geometry with requests of more than `bytes` bytes sent to the
    /// region's own store, beside the arenas, instead of to the pools (0:
    /// every request). Only a bounded backing ([`Region`]) honours it: over
    /// the system allocator every request up to [`MAX_POOL_LIMIT`] bytes
    /// is pooled, so that the fast path there has no compare for it.
    ///
    /// In a small span, pools cost bytes (each size class in use strands a
    /// partly used pool, every pool has a header) where the store packs
    /// blocks tightly, and memory moves freely between the store's blocks
    /// and the arenas as the load changes.
    ///
    /// [`Region`]: crate::Region
    ///
    /// # Panics
    /// If `bytes` is over [`MAX_POOL_LIMIT`].
    pub const fn with_pool_limit(self, bytes: usize) -> Self {
        assert!(
            bytes <= MAX_POOL_LIMIT,
            "pymalloc: pools serve requests of at most 512 bytes"
        );
        Config {
            pool_limit: bytes,
            ..self
        }
    }

    /// This geometry with thread caches (where the build has them, see
    /// [`THREAD_CACHES`](crate::THREAD_CACHES)) allowed or not. Off, every
    /// small allocation and free takes a heap's lock, as in a build without
    /// `std`: no block sits in a cache where another thread cannot reach
    /// it; a free goes to its heap's shelf (blocks freed without a cache,
    /// handed out again first) or its pool before the call returns. A
    /// region smaller than 32 MiB (256 MiB with the medium tier) goes
    /// without them either way (a cache could hold more than 1/64 of it).
    pub const fn with_thread_caches(self, on: bool) -> Self {
        Config {
            thread_caches: on,
            ..self
        }
    }

    /// Whether thread caches are allowed (see
    /// [`Config::with_thread_caches`]).
    pub const fn thread_caches(&self) -> bool {
        self.thread_caches
    }

    /// Largest request a region serves from its pools (see
    /// [`Config::with_pool_limit`]).
    pub const fn pool_limit(&self) -> usize {
        self.pool_limit
    }

    /// Independent heaps, each with its own lock, pools and arenas.
    pub const fn heaps(&self) -> usize {
        self.heaps
    }

    /// Bytes in one pool (a power of two; pools are aligned to it).
    pub const fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// Pools in one arena, when the arena's base is pool-aligned.
    pub const fn arena_pools(&self) -> usize {
        self.arena_pools
    }

    /// Bytes in one arena.
    pub const fn arena_size(&self) -> usize {
        self.pool_size * self.arena_pools
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::DEFAULT
    }
}

/// An allocator's [`Config`], which a region given its span at run time
/// ([`PyMalloc::init`](crate::PyMalloc::init)) may still choose: written
/// there, before the span (so before any block exists), read everywhere
/// else. Atomics rather than a lock: `pool_limit` is read on the fast path
/// of a heap over a region, and a plain load is all that costs.
pub(crate) struct ConfigCell {
    pool_size: AtomicUsize,
    arena_pools: AtomicUsize,
    heaps: AtomicUsize,
    pool_limit: AtomicUsize,
    thread_caches: AtomicBool,
    medium_tier: AtomicBool,
    release_delay_ms: AtomicUsize,
}

impl ConfigCell {
    loom_const_fn! {
        pub(crate) fn new(config: Config) -> Self {
            ConfigCell {
                pool_size: AtomicUsize::new(config.pool_size),
                arena_pools: AtomicUsize::new(config.arena_pools),
                heaps: AtomicUsize::new(config.heaps),
                pool_limit: AtomicUsize::new(config.pool_limit),
                thread_caches: AtomicBool::new(config.thread_caches),
                medium_tier: AtomicBool::new(config.medium_tier),
                release_delay_ms: AtomicUsize::new(config.release_delay_ms),
            }
        }
    }

    pub(crate) fn get(&self) -> Config {
        Config {
            pool_size: self.pool_size.load(Ordering::Relaxed),
            arena_pools: self.arena_pools.load(Ordering::Relaxed),
            heaps: self.heaps.load(Ordering::Relaxed),
            pool_limit: self.pool_limit.load(Ordering::Relaxed),
            thread_caches: self.thread_caches.load(Ordering::Relaxed),
            medium_tier: self.medium_tier.load(Ordering::Relaxed),
            release_delay_ms: self.release_delay_ms.load(Ordering::Relaxed),
        }
    }

    /// One field, for the paths that need no more: `get` loads them all.
    #[inline]
    pub(crate) fn pool_limit(&self) -> usize {
        self.pool_limit.load(Ordering::Relaxed)
    }

    /// For tracemalloc's place of a pool block's trace.
    #[cfg(all(feature = "std", not(loom)))]
    #[inline]
    pub(crate) fn pool_size(&self) -> usize {
        self.pool_size.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn medium_tier(&self) -> bool {
        self.medium_tier.load(Ordering::Relaxed)
    }

    /// Ordered before any use by the region's lock, which the span is given
    /// under and every block is carved under.
    pub(crate) fn set(&self, config: Config) {
        self.pool_size.store(config.pool_size, Ordering::Relaxed);
        self.arena_pools
            .store(config.arena_pools, Ordering::Relaxed);
        self.heaps.store(config.heaps, Ordering::Relaxed);
        self.pool_limit.store(config.pool_limit, Ordering::Relaxed);
        self.thread_caches
            .store(config.thread_caches, Ordering::Relaxed);
        self.medium_tier
            .store(config.medium_tier, Ordering::Relaxed);
        self.release_delay_ms
            .store(config.release_delay_ms, Ordering::Relaxed);
    }
}
