//! The geometry of a heap: how big a pool is and how many pools an arena holds.

/// Most pools one arena may hold. CPython uses 64 in every configuration; the
/// arena index (`Heap::last_with_free`) is an array of this size plus one.
pub const MAX_ARENA_POOLS: usize = 64;

/// Smallest pool: one 512-byte block must still fit beside the pool header.
pub const MIN_POOL_SIZE: usize = 1024;

/// Largest pool: block offsets inside a pool are kept in 32 bits.
pub const MAX_POOL_SIZE: usize = 1 << 24;

/// Pool size and pools per arena of a [`PyMalloc`](crate::PyMalloc) heap.
///
/// The default is CPython's classic layout: 4 KiB pools, 64 to an arena of
/// 256 KiB. [`Config::SMALL`] suits heaps of tens of KiB (firmware): 1 KiB
/// pools, 16 to an arena of 16 KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pool_size: usize,
    arena_pools: usize,
}

impl Config {
    /// 4 KiB pools, 64 pools (256 KiB) an arena.
    pub const DEFAULT: Config = Config::new(4096, 64);

    /// 1 KiB pools, 16 pools (16 KiB) an arena: a 64 KiB region holds three
    /// arenas and still has room for a few large objects.
    pub const SMALL: Config = Config::new(1024, 16);

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
        }
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
