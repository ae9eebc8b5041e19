//! The geometry of a heap: how big a pool is, how many pools an arena holds,
//! and how many independent heaps share the work of several threads.

/// Most pools one arena may hold. CPython uses 64 in every configuration; the
/// arena index (`Heap::last_with_free`) is an array of this size plus one.
pub const MAX_ARENA_POOLS: usize = 64;

/// Smallest pool: one 512-byte block must still fit beside the pool header.
pub const MIN_POOL_SIZE: usize = 1024;

/// Largest pool: block offsets inside a pool are kept in 32 bits.
pub const MAX_POOL_SIZE: usize = 1 << 24;

/// Most heaps one allocator may hold.
pub const MAX_HEAPS: usize = 32;

/// Heaps in [`Config::DEFAULT`]: enough that up to eight threads each find
/// a heap of their own, few enough that the spare arena and partly used
/// pools each heap keeps stay small beside a desktop program.
pub const DEFAULT_HEAPS: usize = 8;

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
        }
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
