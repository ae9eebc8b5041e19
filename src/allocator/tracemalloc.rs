//! CPython's `tracemalloc`, for every allocation a [`PyMalloc`](crate::PyMalloc)
//! global allocator serves: which line allocated the memory that is still
//! live, with snapshots and diffs.
//!
//! ```
//! use pymalloc::tracemalloc::{self, KeyType};
//! use pymalloc::PyMalloc;
//!
//! #[global_allocator]
//! static ALLOC: PyMalloc = PyMalloc::system();
//!
//! tracemalloc::start(1);
//! let before = tracemalloc::take_snapshot();
//! let leak: Vec<Box<[u8; 100]>> = (0..1000).map(|_| Box::new([0; 100])).collect();
//! let after = tracemalloc::take_snapshot();
//! tracemalloc::stop();
//! for stat in after.compare_to(&before, KeyType::Lineno).iter().take(3) {
//!     println!("{stat}"); // src/main.rs:10: size=97.7 KiB (+97.7 KiB), count=1000 (+1000), average=100 B
//! }
//! # drop(leak);
//! ```
//!
//! # How it works, and what it costs
//! * The front's hooks are the same in every mode, so sampling costs its
//!   fast path what tracing off does. `alloc` subtracts the size from this
//!   thread's countdown and calls `sample_point` only when it runs out:
//!   while tracing is off that just winds it up again by `POLL` (64 KiB,
//!   so another thread than `start`'s begins tracing within 64 KiB of its
//!   own allocations); while tracing exactly it leaves it at zero (every
//!   allocation asks); while sampling it draws the next countdown.
//!   `dealloc` tests a count of live traces by address bits (no hash,
//!   inline), all zeros while tracing is off. Sampling at 512 KiB costs
//!   the bench's workloads +0.02 to +0.3 % instructions, where a flag
//!   tested first and out-of-line calls to the countdown and the filter
//!   cost +7 to +20 %.
//! * A traced allocation captures the return addresses on the stack (no
//!   symbols: those come later), interns them once in a traceback table,
//!   and records its size and traceback in one of sixteen shards, each
//!   under a spin lock. A free removes its trace; `realloc` moves it.
//!   Allocations made before `start` are not traced, as in CPython.
//! * A pool block's trace is 4 bytes, `traceback << 10 | (size + 1)` (0: no
//!   trace), in a side array of its pool indexed by block number
//!   (`(address - pool) / block size`, whatever the pool header); the
//!   front passes the pool size and class it knows anyway. Arrays are
//!   found by pool address in a small hash table (one array per run of
//!   1024 blocks, for pools over 4 KiB), carved from chunks of OS memory
//!   by power-of-two size and given back to a free list when their last
//!   trace goes; a shard is chosen by pool, so a pool's arrays share a
//!   lock. Large blocks, the `debug` feature's wrapped ones, any trace
//!   whose traceback id does not fit 22 bits and, when sampling, every
//!   trace (a pool then holds a trace or two, for which an array would
//!   cost a page) go to a table by address (16 bytes a slot, open
//!   addressing). Measured on binary trees (16-byte nodes): exact tracing
//!   with one frame takes under +20 % RSS this way, +55 % with every trace
//!   in the address table.
//! * The tables live in memory mapped from the OS (`backing::os_pages`:
//!   zeroed pages, never one of the arenas `System` keeps for reuse), never
//!   in the global allocator; nothing is allocated and no lock is held while the stack is
//!   walked. A per-thread flag leaves untraced the allocations tracemalloc
//!   makes itself (symbolising, snapshots). If a trace cannot be recorded
//!   (the tables cannot grow) the allocation fails, as in CPython.
//! * Frames are resolved to file, line and function in
//!   [`take_snapshot`], once per distinct address per process, by the
//!   `backtrace` crate. The leading frames inside `pymalloc`, `alloc`,
//!   `core`, `std` (and std's `hashbrown`) are skipped, so the first frame
//!   is the user's line. Without line tables the function name stands in:
//!   set `debug = "line-tables-only"` in the release profile.
//!
//! # The unwinder
//! [`start`] picks one by trying both: a frame-pointer walk (tens of
//! nanoseconds for ten frames) when the binary keeps frame pointers, which
//! it proves by comparing the walk with a DWARF unwind of the same stack;
//! otherwise libgcc's DWARF unwinder through `backtrace::trace_unsynchronized`
//! (about a microsecond a trace, warmed up at `start` so its lazy set-up
//! does not happen inside an allocation). Build with
//! `RUSTFLAGS="-C force-frame-pointers=yes"` for the fast one; [`unwinder`]
//! says which is in use. The walk only reads words between the stack
//! pointer and the top of the thread's stack, so a frame without a frame
//! pointer can end it early but never make it read outside the stack.
//! (The frame-pointer walk is for Linux with glibc on x86-64 and AArch64,
//! the DWARF unwinder for unix; elsewhere tracebacks come out empty.)
//!
//! # Sampling
//! [`start_sampled`] samples each byte with probability `1/mean_bytes`:
//! every thread counts down an exponentially distributed number of bytes
//! (as jemalloc and tcmalloc do), and the block that crosses zero is traced.
//! A block of `z` bytes is so traced with probability `p = 1 - e^(-z/mean)`
//! (large blocks almost always), and statistics weigh each trace by `1/p`:
//! unbiased estimates, marked `(estimated)` when printed.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::cell::Cell;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::collections::HashMap;

use super::sync::Lock;

/// The most frames a traceback keeps ([`start`]'s limit).
pub const MAX_FRAMES: usize = 64;
/// Raw frames captured beyond the limit, for the allocator's own frames
/// and those of `alloc`/`std` above the user's, skipped at resolution.
/// Few in an optimised build (`alloc`'s code is inlined into the user's),
/// more with the DWARF unwinder (its own frames come first) and in debug
/// builds. Kept small: every extra frame makes more raw tracebacks
/// distinct (recursive code has one per path), and each is stored.
fn skip_slack() -> usize {
    let unwinder = if UNWINDER.load(Ordering::Relaxed) == 1 {
        6
    } else {
        14
    };
    unwinder + if cfg!(debug_assertions) { 16 } else { 0 }
}
const MAX_RAW: usize = MAX_FRAMES + 30;

/// Whether the front calls the hooks: the one flag it tests.
static ON: AtomicBool = AtomicBool::new(false);
/// Frames kept per traceback.
static LIMIT: AtomicUsize = AtomicUsize::new(1);
/// Mean bytes between samples; 0: every allocation is traced.
static MEAN: AtomicUsize = AtomicUsize::new(0);
/// Tracing session: a trace recorded for an older session is dropped.
static EPOCH: AtomicUsize = AtomicUsize::new(0);
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The chosen [`Unwinder`], as its discriminant; 0 until `start`.
static UNWINDER: AtomicU8 = AtomicU8::new(0);
/// Serialises start, stop, clear and snapshot (never taken by the hooks).
static CONTROL: std::sync::Mutex<()> = std::sync::Mutex::new(());

const SHARDS: usize = 16;
static TRACES: [Lock<Shard>; SHARDS] = [const { Lock::new(Shard::new()) }; SHARDS];
static TRACEBACKS: Lock<Tracebacks> = Lock::new(Tracebacks::new());

/// How many live traces there are in each slot, by address bits 3 to 16:
/// a free whose slot reads zero has no trace, and skips the locks (most
/// frees, when sampling). No hash: the test is inline in the sampled free.
/// Changed only under the lock of the trace's shard.
const FILTER_SLOTS: usize = 1 << 14;
static FILTER: [AtomicU32; FILTER_SLOTS] = [const { AtomicU32::new(0) }; FILTER_SLOTS];

std::thread_local! {
    /// Set while this thread records a trace or runs tracemalloc's own
    /// code: allocations made meanwhile are not traced.
    static BUSY: Cell<bool> = const { Cell::new(false) };
    /// Bytes this thread may allocate before it next calls the sampler:
    /// until its next sample, or while tracing is off until it next looks
    /// whether tracing is on (`POLL`), or 0 while tracing exactly. Apart
    /// from the rest of the sampler's state, so that the countdown alone is
    /// touched on most allocations.
    static LEFT: Cell<i64> = const { Cell::new(0) };
    /// The sampler's random state (0: not seeded yet).
    static RNG: Cell<u64> = const { Cell::new(0) };
    /// The session (`EPOCH`) the countdown was drawn for: a countdown
    /// left from another one (or from polling) is drawn afresh.
    static DRAWN_IN: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Bytes a thread allocates between two looks at whether tracing is on,
/// while it is off: a thread other than `start`'s begins tracing within
/// this many bytes of its own allocations. One look every 64 KiB costs
/// nothing measurable; the front's test of the countdown replaces a test
/// of `ON`, so sampling costs the fast path no more than tracing off.
const POLL: i64 = 64 * 1024;

/// Holds this thread's busy flag; `None` if it was held already.
struct Busy;

impl Busy {
    fn enter() -> Option<Busy> {
        // A `const` thread local without a destructor is always reachable.
        // (Lazily: an eager `then_some(Busy)` would drop a `Busy`, clearing
        // the flag, when it was already set.)
        BUSY.with(|busy| (!busy.replace(true)).then(|| Busy))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.with(|busy| busy.set(false));
    }
}

// ---------------------------------------------------------------------------
// Memory from the OS.

const PAGE: usize = 4096;

/// `bytes` (a multiple of the page size) zeroed, straight from the OS
/// (anonymous mappings on Linux); null when the OS has none.
fn os_map(bytes: usize) -> *mut u8 {
    super::backing::os_pages(bytes)
}

/// Gives back what `os_map(bytes)` returned.
///
/// # Safety
/// `ptr` came from `os_map(bytes)`, and nothing uses it any more.
unsafe fn os_unmap(ptr: *mut u8, bytes: usize) {
    // SAFETY: forwarded contract.
    unsafe { super::backing::free_os_pages(ptr, bytes) };
}

/// An array of `T` in memory from [`os_map`], zeroed; all-zero bytes must
/// be a valid `T`.
struct OsArray<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the array owns its memory; access is serialised by the lock
// around whatever holds it.
unsafe impl<T: Send> Send for OsArray<T> {}

impl<T: Copy> OsArray<T> {
    const fn empty() -> Self {
        Self {
            ptr: core::ptr::null_mut(),
            len: 0,
        }
    }

    /// `len` zeroed elements, or `None` when the OS has no memory.
    fn zeroed(len: usize) -> Option<Self> {
        let ptr = os_map(Self::bytes_for(len)?).cast::<T>();
        (!ptr.is_null()).then_some(Self { ptr, len })
    }

    fn bytes_for(len: usize) -> Option<usize> {
        let bytes = len.checked_mul(core::mem::size_of::<T>())?;
        Some(bytes.checked_add(PAGE - 1)? & !(PAGE - 1))
    }

    fn bytes(&self) -> usize {
        Self::bytes_for(self.len).unwrap_or(0)
    }

    fn as_slice(&self) -> &[T] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `len` initialised (zeroed or written) elements we own.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only view.
        unsafe { core::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T> Drop for OsArray<T> {
    fn drop(&mut self) {
        if self.len != 0 {
            let bytes = self.len * core::mem::size_of::<T>();
            // SAFETY: `zeroed` got exactly this from `os_map`, and the
            // array is the memory's only user.
            unsafe { os_unmap(self.ptr.cast(), (bytes + PAGE - 1) & !(PAGE - 1)) };
        }
    }
}

// ---------------------------------------------------------------------------
// Open addressing, for traces by address and side arrays by pool.

fn hash_addr(addr: usize) -> u64 {
    let mut x = addr as u64;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 29;
    x
}

/// A slot of an [`OpenTable`]: all-zero bytes are an empty slot, and a
/// full one has a nonzero key.
///
/// # Safety
/// All-zero bytes must be a valid value of the type.
unsafe trait Keyed: Copy {
    fn key(&self) -> usize;
}

/// An open-addressing table, linear probing, deletion by backward shift
/// (no tombstones); grows by doubling past three quarters full.
struct OpenTable<S> {
    slots: OsArray<S>,
    len: usize,
}

/// A table could not get memory for more slots.
#[derive(Debug)]
pub(crate) struct OutOfMemory;

impl<S: Keyed> OpenTable<S> {
    const fn new() -> Self {
        Self {
            slots: OsArray::empty(),
            len: 0,
        }
    }

    fn bytes(&self) -> usize {
        self.slots.bytes()
    }

    /// Where `key` is, or the empty slot where it would go; the table must
    /// have slots.
    fn find(&self, key: usize) -> usize {
        let slots = self.slots.as_slice();
        let mask = slots.len() - 1;
        let mut i = hash_addr(key) as usize & mask;
        while slots[i].key() != key && slots[i].key() != 0 {
            i = (i + 1) & mask;
        }
        i
    }

    fn get_mut(&mut self, key: usize) -> Option<&mut S> {
        if self.len == 0 {
            return None;
        }
        let i = self.find(key);
        let slot = &mut self.slots.as_mut_slice()[i];
        (slot.key() != 0).then_some(slot)
    }

    /// The slot of `key`, and whether `make` just made it (`make` gives
    /// `None` when it has no memory).
    fn find_or_insert(
        &mut self,
        key: usize,
        make: impl FnOnce() -> Option<S>,
    ) -> Result<(&mut S, bool), OutOfMemory> {
        debug_assert_ne!(key, 0);
        if (self.len + 1) * 4 > self.slots.len * 3 {
            self.grow()?;
        }
        let i = self.find(key);
        let fresh = self.slots.as_slice()[i].key() == 0;
        if fresh {
            self.slots.as_mut_slice()[i] = make().ok_or(OutOfMemory)?;
            self.len += 1;
        }
        Ok((&mut self.slots.as_mut_slice()[i], fresh))
    }

    fn grow(&mut self) -> Result<(), OutOfMemory> {
        // At first as many slots as fit a page: a few traces, a page.
        let first = 1 << (PAGE / core::mem::size_of::<S>()).ilog2();
        let len = (self.slots.len * 2).max(first);
        let old = core::mem::replace(&mut self.slots, OsArray::zeroed(len).ok_or(OutOfMemory)?);
        for slot in old.as_slice().iter().filter(|s| s.key() != 0) {
            let i = self.find(slot.key());
            self.slots.as_mut_slice()[i] = *slot;
        }
        Ok(())
    }

    /// Takes `key` out; returns its slot if it was there.
    fn remove(&mut self, key: usize) -> Option<S> {
        if self.len == 0 {
            return None;
        }
        let mut hole = self.find(key);
        let mask = self.slots.len - 1;
        let slots = self.slots.as_mut_slice();
        let found = slots[hole];
        if found.key() == 0 {
            return None;
        }
        // Pull back each later entry of the run that may sit in the hole:
        // one whose home is not cyclically within (hole, j].
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let key = slots[j].key();
            if key == 0 {
                break;
            }
            let home = hash_addr(key) as usize & mask;
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                slots[hole] = slots[j];
                hole = j;
            }
        }
        slots[hole] = empty_slot();
        self.len -= 1;
        Some(found)
    }

    fn iter(&self) -> impl Iterator<Item = &S> + '_ {
        self.slots.as_slice().iter().filter(|s| s.key() != 0)
    }
}

/// An empty slot: all-zero bytes, which every [`Keyed`] type accepts.
fn empty_slot<S: Keyed>() -> S {
    // SAFETY: all-zero bytes are a valid `Keyed` value, per its contract.
    unsafe { core::mem::zeroed() }
}

// ---------------------------------------------------------------------------
// Traces of blocks outside pools: address -> (size, traceback).

/// One slot: the block's address (0: empty) and its size (low 40 bits,
/// up to 1 TiB) packed with its traceback id (high 24 bits).
#[derive(Clone, Copy)]
#[repr(C)]
struct Slot {
    addr: usize,
    packed: u64,
}

// SAFETY: two integers.
unsafe impl Keyed for Slot {
    fn key(&self) -> usize {
        self.addr
    }
}

const SIZE_BITS: u32 = 40;
const MAX_TRACEBACKS: u32 = 1 << (64 - SIZE_BITS);

fn pack(size: usize, traceback: u32) -> u64 {
    (size as u64).min((1 << SIZE_BITS) - 1) | (u64::from(traceback) << SIZE_BITS)
}

fn unpack(packed: u64) -> (usize, u32) {
    (
        (packed & ((1 << SIZE_BITS) - 1)) as usize,
        (packed >> SIZE_BITS) as u32,
    )
}

/// Traces by block address (16 bytes a slot): large blocks, all blocks
/// under passthrough or the `debug` feature, and sampled ones.
struct TraceTable(OpenTable<Slot>);

impl TraceTable {
    const fn new() -> Self {
        Self(OpenTable::new())
    }

    fn len(&self) -> usize {
        self.0.len
    }

    /// Records `addr`; returns what it replaces, if it was there.
    fn insert(
        &mut self,
        addr: usize,
        size: usize,
        traceback: u32,
    ) -> Result<Option<(usize, u32)>, OutOfMemory> {
        let (slot, fresh) = self
            .0
            .find_or_insert(addr, || Some(Slot { addr, packed: 0 }))?;
        let old = (!fresh).then(|| unpack(slot.packed));
        slot.packed = pack(size, traceback);
        Ok(old)
    }

    /// Forgets `addr`; returns its size and traceback if it was there.
    fn remove(&mut self, addr: usize) -> Option<(usize, u32)> {
        self.0.remove(addr).map(|slot| unpack(slot.packed))
    }

    /// Size and traceback of `addr`, if traced.
    #[cfg(test)]
    fn get(&mut self, addr: usize) -> Option<(usize, u32)> {
        self.0.get_mut(addr).map(|slot| unpack(slot.packed))
    }

    /// Every trace as (address, size, traceback).
    fn iter(&self) -> impl Iterator<Item = (usize, usize, u32)> + '_ {
        self.0.iter().map(|s| {
            let (size, tb) = unpack(s.packed);
            (s.addr, size, tb)
        })
    }
}

// ---------------------------------------------------------------------------
// Traces of pool blocks: 4 bytes a block, in side arrays by pool.

/// Where the front put a block: in a pool of `pool_size` bytes (aligned to
/// it) whose blocks are `block_size` apart, or elsewhere (`pool_size` 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Place {
    pool_size: usize,
    block_size: usize,
}

impl Place {
    /// Not in a pool: a large block, or one the `debug` feature wraps.
    pub(crate) const ELSEWHERE: Place = Place {
        pool_size: 0,
        block_size: 0,
    };

    /// In a pool of `pool_size` bytes (a power of two, the pool aligned to
    /// it) serving blocks of `block_size` bytes.
    pub(crate) const fn pool(pool_size: usize, block_size: usize) -> Place {
        Place {
            pool_size,
            block_size,
        }
    }
}

/// Entries of one side array at most (4 KiB): a pool with more blocks
/// (pools over 4 KiB) has one array per run of this many.
const ARRAY_ENTRIES: usize = 1024;
/// Bits of an entry for `size + 1` (pool blocks are at most 512 bytes);
/// the traceback id takes the rest, and 0 is no trace.
const ENTRY_SIZE_BITS: u32 = 10;
const ENTRY_MAX_TRACEBACK: u32 = u32::MAX >> ENTRY_SIZE_BITS;

/// The side-array coordinates of a pool block: the key of its array, the
/// block's entry there, and which run of `ARRAY_ENTRIES` blocks that is.
#[derive(Clone, Copy)]
struct Entry {
    key: usize,
    index: usize,
    run: usize,
}

impl Entry {
    /// The entry of the block at `addr` in `place`, if in a pool. Blocks
    /// are numbered by `(addr - pool) / block_size`, which is unique
    /// whatever the pool header's size; a pool of `n` such numbers has
    /// arrays `pool + 0, pool + 1, ...` (the pool's alignment leaves room).
    fn of(addr: usize, place: Place) -> Option<Entry> {
        if place.pool_size == 0 || place.block_size == 0 {
            return None;
        }
        let pool = addr & !(place.pool_size - 1);
        let block = (addr - pool) / place.block_size;
        let run = block / ARRAY_ENTRIES;
        Some(Entry {
            key: pool + run,
            index: block % ARRAY_ENTRIES,
            run,
        })
    }

    /// Entries of this entry's array, made when its first trace comes.
    fn array_len(&self, place: Place) -> usize {
        let blocks = (place.pool_size - 1) / place.block_size + 1;
        (blocks - self.run * ARRAY_ENTRIES).min(ARRAY_ENTRIES)
    }
}

fn pack_entry(size: usize, traceback: u32) -> Option<u32> {
    let size = u32::try_from(size)
        .ok()
        .filter(|&s| s < (1 << ENTRY_SIZE_BITS) - 1)?;
    (traceback <= ENTRY_MAX_TRACEBACK).then_some((traceback << ENTRY_SIZE_BITS) | (size + 1))
}

fn unpack_entry(entry: u32) -> (usize, u32) {
    (
        (entry & ((1 << ENTRY_SIZE_BITS) - 1)) as usize - 1,
        entry >> ENTRY_SIZE_BITS,
    )
}

/// A pool's (or a run of a pool's) side array: `len` entries at
/// `entries`, `count` of them traces.
#[derive(Clone, Copy)]
struct PoolSlot {
    key: usize,
    entries: *mut u32,
    len: u32,
    count: u32,
}

// SAFETY: `entries` is memory of the shard's `ArrayHeap`, used only under
// the shard's lock.
unsafe impl Send for PoolSlot {}

// SAFETY: integers and a raw pointer (null when zero).
unsafe impl Keyed for PoolSlot {
    fn key(&self) -> usize {
        self.key
    }
}

impl PoolSlot {
    fn entries(&mut self) -> &mut [u32] {
        // SAFETY: `entries` holds `len` entries from `ArrayHeap::take`,
        // owned by this slot until `give` (and `&mut self` is the only view).
        unsafe { core::slice::from_raw_parts_mut(self.entries, self.len as usize) }
    }

    fn traces(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        // SAFETY: as in `entries`, shared.
        let entries = unsafe { core::slice::from_raw_parts(self.entries, self.len as usize) };
        entries
            .iter()
            .filter(|&&e| e != 0)
            .map(|&e| unpack_entry(e))
    }
}

/// Sizes of side arrays: powers of two from 64 bytes to 4 KiB.
const ARRAY_CLASSES: usize = 7;
const MIN_ARRAY_BYTES: usize = 64;
/// Chunks of side arrays come from the OS doubling from this, up to
/// `MAX_CHUNK`: a few pools traced cost a few pages.
const MIN_CHUNK: usize = PAGE;
const MAX_CHUNK: usize = 256 << 10;
/// A chunk begins with the previous chunk's address and its own size.
const CHUNK_HEADER: usize = 64;

fn array_class(len: usize) -> usize {
    let bytes = (len * 4).max(MIN_ARRAY_BYTES).next_power_of_two();
    (bytes.trailing_zeros() - MIN_ARRAY_BYTES.trailing_zeros()) as usize
}

/// Side arrays, carved from chunks of OS memory and kept on a free list
/// per size once given back (zeroed, but for the list's link).
struct ArrayHeap {
    free: [*mut u32; ARRAY_CLASSES],
    bump: *mut u8,
    end: *mut u8,
    /// The newest chunk; each one's header links to the one before.
    chunks: *mut u8,
    mapped: usize,
}

// SAFETY: the heap owns its chunks; used only under its shard's lock.
unsafe impl Send for ArrayHeap {}

impl ArrayHeap {
    const fn new() -> Self {
        Self {
            free: [core::ptr::null_mut(); ARRAY_CLASSES],
            bump: core::ptr::null_mut(),
            end: core::ptr::null_mut(),
            chunks: core::ptr::null_mut(),
            mapped: 0,
        }
    }

    /// A zeroed array of `len` (at most `ARRAY_ENTRIES`) entries; `None`
    /// when the OS has no memory.
    fn take(&mut self, len: usize) -> Option<*mut u32> {
        let class = array_class(len);
        let head = self.free[class];
        if !head.is_null() {
            // SAFETY: a free array of this class, its first 8 bytes the
            // link to the next and the rest zero.
            unsafe {
                self.free[class] = head.cast::<*mut u32>().read();
                head.cast::<*mut u32>().write(core::ptr::null_mut());
            }
            return Some(head);
        }
        let bytes = MIN_ARRAY_BYTES << class;
        if (self.end as usize - self.bump as usize) < bytes {
            let chunk_bytes = self
                .mapped
                .clamp(MIN_CHUNK, MAX_CHUNK)
                .max((bytes + CHUNK_HEADER).next_power_of_two());
            let chunk = os_map(chunk_bytes);
            if chunk.is_null() {
                return None;
            }
            // SAFETY: a fresh chunk of `chunk_bytes`, over `CHUNK_HEADER`.
            unsafe {
                chunk
                    .cast::<(*mut u8, usize)>()
                    .write((self.chunks, chunk_bytes));
                self.bump = chunk.add(CHUNK_HEADER);
                self.end = chunk.add(chunk_bytes);
            }
            self.chunks = chunk;
            self.mapped += chunk_bytes;
        }
        let array = self.bump;
        // SAFETY: `bytes` fit between `bump` and `end`, in the chunk.
        self.bump = unsafe { array.add(bytes) };
        Some(array.cast())
    }

    /// Takes back an array of `len` entries.
    ///
    /// # Safety
    /// `array` came from `take(len)` on this heap, is all zero, and is not
    /// used any more.
    unsafe fn give(&mut self, array: *mut u32, len: usize) {
        let class = array_class(len);
        // SAFETY: per the contract, an array of at least 64 bytes (8-byte
        // aligned) of ours, no longer used.
        unsafe { array.cast::<*mut u32>().write(self.free[class]) };
        self.free[class] = array;
    }
}

impl Drop for ArrayHeap {
    fn drop(&mut self) {
        let mut chunk = self.chunks;
        while !chunk.is_null() {
            // SAFETY: every chunk starts with its header, and came from
            // `os_map` of that size; no array of this heap is used any more.
            unsafe {
                let (previous, bytes) = chunk.cast::<(*mut u8, usize)>().read();
                os_unmap(chunk, bytes);
                chunk = previous;
            }
        }
    }
}

/// One shard of the traces: pool blocks in side arrays, the rest (and
/// pool blocks whose traceback id is too big for an entry, or traced
/// sparsely) by address.
pub(crate) struct Shard {
    traces: TraceTable,
    pools: OpenTable<PoolSlot>,
    arrays: ArrayHeap,
    /// Traces in side arrays.
    pooled: usize,
    /// Traces of pool blocks in the address table.
    unpacked: usize,
}

impl Shard {
    pub(crate) const fn new() -> Self {
        Self {
            traces: TraceTable::new(),
            pools: OpenTable::new(),
            arrays: ArrayHeap::new(),
            pooled: 0,
            unpacked: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.traces.len() + self.pooled
    }

    fn bytes(&self) -> usize {
        self.traces.0.bytes() + self.pools.bytes() + self.arrays.mapped
    }

    /// Records the block at `addr` in `place`; returns the trace it
    /// replaces, if there was one. `sparse`: by address even in a pool,
    /// as when sampling, where a pool has a trace or two and a side array
    /// would cost a page for them.
    pub(crate) fn insert(
        &mut self,
        addr: usize,
        place: Place,
        size: usize,
        traceback: u32,
        sparse: bool,
    ) -> Result<Option<(usize, u32)>, OutOfMemory> {
        let Some(at) = Entry::of(addr, place) else {
            return self.traces.insert(addr, size, traceback);
        };
        if let Some(packed) = pack_entry(size, traceback).filter(|_| !sparse) {
            let arrays = &mut self.arrays;
            let (slot, _) = self.pools.find_or_insert(at.key, || {
                let len = at.array_len(place);
                Some(PoolSlot {
                    key: at.key,
                    entries: arrays.take(len)?,
                    len: len as u32,
                    count: 0,
                })
            })?;
            // (No entry: an array sized for another class, which cannot be
            // while it holds a trace, for a pool changes class only once
            // all its blocks are free. The address table takes it then.)
            if let Some(entry) = slot.entries().get_mut(at.index) {
                let old = core::mem::replace(entry, packed);
                if old != 0 {
                    return Ok(Some(unpack_entry(old)));
                }
                slot.count += 1;
                self.pooled += 1;
                // An old trace whose id did not pack is in the address table.
                return Ok(if self.unpacked == 0 {
                    None
                } else {
                    self.take_unpacked(addr)
                });
            }
        }
        let old = self.remove(addr, place);
        self.traces.insert(addr, size, traceback)?;
        self.unpacked += 1;
        Ok(old)
    }

    /// Takes the trace of the pool block at `addr` out of the address table.
    fn take_unpacked(&mut self, addr: usize) -> Option<(usize, u32)> {
        let found = self.traces.remove(addr);
        self.unpacked -= usize::from(found.is_some());
        found
    }

    /// Forgets the block at `addr` in `place`; returns its size and
    /// traceback if it was traced. A side array left empty goes back.
    pub(crate) fn remove(&mut self, addr: usize, place: Place) -> Option<(usize, u32)> {
        if let Some(at) = Entry::of(addr, place) {
            if let Some(slot) = self.pools.get_mut(at.key) {
                if let Some(entry) = slot.entries().get_mut(at.index).filter(|e| **e != 0) {
                    let found = unpack_entry(*entry);
                    *entry = 0;
                    slot.count -= 1;
                    self.pooled -= 1;
                    if slot.count == 0 {
                        let (entries, len) = (slot.entries, slot.len as usize);
                        self.pools.remove(at.key);
                        // SAFETY: the slot's array, from `take(len)`, now
                        // all zero, and the slot that used it is gone.
                        unsafe { self.arrays.give(entries, len) };
                    }
                    return Some(found);
                }
            }
            return if self.unpacked == 0 {
                None
            } else {
                self.take_unpacked(addr)
            };
        }
        self.traces.remove(addr)
    }

    /// Every trace as (size, traceback).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        let pooled = self.pools.iter().flat_map(PoolSlot::traces);
        pooled.chain(self.traces.iter().map(|(_, size, tb)| (size, tb)))
    }

    /// Forgets everything and gives the memory back.
    pub(crate) fn clear(&mut self) {
        *self = Self::new();
    }
}

// ---------------------------------------------------------------------------
// Interned tracebacks: raw return addresses, stored once.

/// Traceback `id` is `frames[starts[id]..starts[id + 1]]`; id 0 is the
/// empty traceback. `index` is an open-addressing set of ids by hash.
struct Tracebacks {
    frames: OsArray<usize>,
    starts: OsArray<usize>,
    /// Tracebacks stored (ids `0..count`), the empty one included once set up.
    count: usize,
    index: OsArray<u32>,
}

fn hash_frames(frames: &[usize]) -> u64 {
    frames.iter().fold(0x243f_6a88_85a3_08d3, |h: u64, &f| {
        (h.rotate_left(5) ^ f as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    })
}

impl Tracebacks {
    const fn new() -> Self {
        Self {
            frames: OsArray::empty(),
            starts: OsArray::empty(),
            count: 0,
            index: OsArray::empty(),
        }
    }

    fn bytes(&self) -> usize {
        self.frames.bytes() + self.starts.bytes() + self.index.bytes()
    }

    fn get(&self, id: u32) -> &[usize] {
        let starts = self.starts.as_slice();
        let id = id as usize;
        if id >= self.count {
            return &[];
        }
        &self.frames.as_slice()[starts[id]..starts[id + 1]]
    }

    fn used_frames(&self) -> usize {
        if self.count == 0 {
            0
        } else {
            self.starts.as_slice()[self.count]
        }
    }

    /// The id of `frames`, stored now if new; `None` without memory.
    fn intern(&mut self, frames: &[usize]) -> Option<u32> {
        if self.count == 0 {
            // Id 0, the empty traceback, takes no frames.
            self.starts = OsArray::zeroed(PAGE / core::mem::size_of::<usize>())?;
            self.count = 1;
        }
        if frames.is_empty() {
            return Some(0);
        }
        if (self.count + 1) * 2 > self.index.len {
            self.grow_index()?;
        }
        let mask = self.index.len - 1;
        let mut i = hash_frames(frames) as usize & mask;
        loop {
            let id = self.index.as_slice()[i];
            if id == 0 {
                break;
            }
            if self.get(id) == frames {
                return Some(id);
            }
            i = (i + 1) & mask;
        }
        let id = u32::try_from(self.count)
            .ok()
            .filter(|&id| id < MAX_TRACEBACKS)?;
        let start = self.used_frames();
        let end = start + frames.len();
        if end > self.frames.len {
            let mut bigger = OsArray::zeroed((end * 2).max(PAGE))?;
            bigger.as_mut_slice()[..start].copy_from_slice(&self.frames.as_slice()[..start]);
            self.frames = bigger;
        }
        if self.count + 2 > self.starts.len {
            let mut bigger = OsArray::zeroed(self.starts.len * 2)?;
            bigger.as_mut_slice()[..=self.count]
                .copy_from_slice(&self.starts.as_slice()[..=self.count]);
            self.starts = bigger;
        }
        self.frames.as_mut_slice()[start..end].copy_from_slice(frames);
        self.count += 1;
        self.starts.as_mut_slice()[self.count] = end;
        self.index.as_mut_slice()[i] = id;
        Some(id)
    }

    fn grow_index(&mut self) -> Option<()> {
        let len = (self.index.len * 2).max(PAGE / core::mem::size_of::<u32>());
        let mut index = OsArray::<u32>::zeroed(len)?;
        for id in 1..self.count as u32 {
            let mut i = hash_frames(self.get(id)) as usize & (len - 1);
            while index.as_slice()[i] != 0 {
                i = (i + 1) & (len - 1);
            }
            index.as_mut_slice()[i] = id;
        }
        self.index = index;
        Some(())
    }

    fn clear(&mut self) {
        *self = Self::new();
    }
}

// ---------------------------------------------------------------------------
// Stack capture.

/// How tracebacks are captured on the allocation path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unwinder {
    /// Following the chain of saved frame pointers: the binary was built
    /// with `-C force-frame-pointers=yes`.
    FramePointers,
    /// libgcc's DWARF unwinder, through the `backtrace` crate: works
    /// everywhere, about a microsecond a trace.
    Dwarf,
}

/// The unwinder [`start`] chose; `None` before the first `start`.
pub fn unwinder() -> Option<Unwinder> {
    match UNWINDER.load(Ordering::Relaxed) {
        1 => Some(Unwinder::FramePointers),
        2 => Some(Unwinder::Dwarf),
        _ => None,
    }
}

#[cfg(all(
    target_os = "linux",
    target_env = "gnu",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod frame_pointers {
    use core::cell::Cell;
    use core::ffi::{c_int, c_void};

    /// Big enough for glibc's `pthread_attr_t` on both architectures.
    #[repr(C, align(8))]
    struct PthreadAttr([u8; 64]);

    extern "C" {
        fn pthread_self() -> usize;
        fn pthread_getattr_np(thread: usize, attr: *mut PthreadAttr) -> c_int;
        fn pthread_attr_getstack(
            attr: *const PthreadAttr,
            addr: *mut *mut c_void,
            size: *mut usize,
        ) -> c_int;
        fn pthread_attr_destroy(attr: *mut PthreadAttr) -> c_int;
    }

    std::thread_local! {
        /// This thread's stack as (lowest, highest) address; (0, 0) until
        /// first asked. glibc's own `malloc` serves what the query needs.
        static STACK: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    }

    fn stack() -> (usize, usize) {
        STACK.with(|stack| {
            if stack.get().1 == 0 {
                let mut attr = PthreadAttr([0; 64]);
                let (mut addr, mut size) = (core::ptr::null_mut(), 0);
                // SAFETY: `attr` is big enough for glibc's pthread_attr_t, is
                // destroyed only after a successful init, and the out
                // pointers are valid.
                let bounds = unsafe {
                    if pthread_getattr_np(pthread_self(), &mut attr) != 0 {
                        (0, 1)
                    } else {
                        let ok = pthread_attr_getstack(&attr, &mut addr, &mut size) == 0;
                        pthread_attr_destroy(&mut attr);
                        if ok {
                            (addr as usize, addr as usize + size)
                        } else {
                            (0, 1)
                        }
                    }
                };
                stack.set(bounds);
            }
            stack.get()
        })
    }

    /// Fills `out` with return addresses by following saved frame pointers
    /// from the caller's frame; returns how many.
    #[inline(always)]
    pub(super) fn walk(out: &mut [usize]) -> usize {
        let (fp, sp): (usize, usize);
        // SAFETY: reads two registers, touches no memory.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            core::arch::asm!("mov {}, rbp", "mov {}, rsp", out(reg) fp, out(reg) sp,
                options(nomem, nostack, preserves_flags));
            #[cfg(target_arch = "aarch64")]
            core::arch::asm!("mov {}, x29", "mov {}, sp", out(reg) fp, out(reg) sp,
                options(nomem, nostack, preserves_flags));
        }
        let (low, high) = stack();
        if sp < low || sp >= high {
            // A stack of the program's own making (a coroutine): unknown bounds.
            return 0;
        }
        let mut fp = fp;
        let mut n = 0;
        // A frame record is [saved frame pointer, return address]; each
        // must lie between the stack pointer and the top of the stack, and
        // each caller's record above its callee's.
        while n < out.len() && fp >= sp && fp % 8 == 0 && fp + 16 <= high {
            // SAFETY: `fp..fp + 16` lies within this thread's live stack
            // (between its stack pointer and its top), which is mapped and
            // which no other thread writes.
            let (next, ret) = unsafe {
                (
                    core::ptr::read_volatile(fp as *const usize),
                    core::ptr::read_volatile((fp + 8) as *const usize),
                )
            };
            if ret == 0 {
                break;
            }
            out[n] = ret;
            n += 1;
            if next <= fp {
                break;
            }
            fp = next;
        }
        n
    }
}

/// Fills `out` through the DWARF unwinder; returns how many. Only on unix,
/// where it is libgcc's (or libunwind's) `_Unwind_Backtrace`: elsewhere
/// the unsynchronised unwinder may not run on several threads at once (on
/// Windows, dbghelp), and the synchronised one takes a lock an allocation
/// inside it would need, so nothing is captured there.
fn dwarf_walk(out: &mut [usize]) -> usize {
    let mut n = 0;
    #[cfg(not(unix))]
    let _ = out;
    #[cfg(unix)]
    // SAFETY: on unix this is `_Unwind_Backtrace`, which is thread-safe;
    // the closure neither allocates nor panics.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            if n == out.len() {
                return false;
            }
            out[n] = frame.ip() as usize;
            n += 1;
            true
        })
    };
    n
}

/// Captures the current stack into `out` with the chosen unwinder.
#[inline(always)]
fn capture(out: &mut [usize]) -> usize {
    #[cfg(all(
        target_os = "linux",
        target_env = "gnu",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    if UNWINDER.load(Ordering::Relaxed) == 1 {
        return frame_pointers::walk(out);
    }
    dwarf_walk(out)
}

/// Whether the frame-pointer walk sees the stack the DWARF unwinder sees:
/// its first frames must appear, in order, among the unwinder's.
#[inline(never)]
fn frame_pointers_agree() -> bool {
    #[cfg(all(
        target_os = "linux",
        target_env = "gnu",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    {
        let mut walked = [0usize; 4];
        let n = frame_pointers::walk(&mut walked);
        let mut unwound = [0usize; 32];
        let m = dwarf_walk(&mut unwound);
        let unwound = &unwound[..m];
        n >= 2 && unwound.windows(n).any(|window| window == &walked[..n])
    }
    #[cfg(not(all(
        target_os = "linux",
        target_env = "gnu",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )))]
    false
}

// ---------------------------------------------------------------------------
// The hooks, called by the front.

/// Whether tracing is on: the front's one test.
#[inline(always)]
pub(crate) fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// The shard of a block: by its pool for a pool block, so that a pool's
/// side arrays are all in one shard; else by its address.
#[inline(always)]
fn shard_of(addr: usize, place: Place) -> usize {
    let home = if place.pool_size != 0 {
        addr & !(place.pool_size - 1)
    } else {
        addr
    };
    (hash_addr(home) >> 60) as usize % SHARDS
}

#[inline(always)]
fn filter_slot(addr: usize) -> &'static AtomicU32 {
    &FILTER[(addr >> 3) % FILTER_SLOTS]
}

/// The bytes one trace of `size` stands for: its size, or when sampling
/// with mean `mean`, its size over the probability it was sampled.
fn weight(size: usize, mean: usize) -> f64 {
    if mean == 0 {
        size as f64
    } else {
        size as f64 / sample_probability(size, mean)
    }
}

/// `1 - e^(-size/mean)`, through `exp_m1` to stay precise for small blocks.
fn sample_probability(size: usize, mean: usize) -> f64 {
    -(-(size as f64) / mean as f64).exp_m1()
}

/// Counts `size` bytes down on this thread's countdown: true when it runs
/// out, and the allocation must ask [`sample_point`] whether it is traced
/// (tcmalloc's fast path, subtract and test). Inline in the front's
/// `alloc` in every mode, in place of a test of `on()`.
#[inline(always)]
pub(crate) fn counted_out(size: usize) -> bool {
    // One access of the thread local for the read and the write: LLVM
    // does not always inline a thread local's accessor into the caller,
    // and `get` then `set` paid two calls of it on every allocation. (It
    // cannot fail: the cell has no destructor.)
    LEFT.try_with(|left| {
        // `size` is at most `isize::MAX`, and `left` at least 0.
        let remaining = left.get() - size as i64;
        let out = remaining <= 0;
        if !out {
            left.set(remaining);
        }
        out
    })
    .unwrap_or(true)
}

/// Whether an allocation of `size` bytes is to be recorded, for one that
/// is not on the front's `alloc` path (a `realloc` while tracing).
pub(crate) fn sample(size: usize) -> bool {
    counted_out(size) && sample_point(size)
}

/// The countdown ran out: whether this block of `size` bytes is traced,
/// and the next countdown. While tracing is off, none, and the next look
/// in `POLL` bytes; while tracing exactly, every one, and a countdown of
/// zero; while sampling, a hit if the countdown crosses zero.
#[cold]
#[inline(never)]
pub(crate) fn sample_point(size: usize) -> bool {
    if !on() {
        LEFT.set(POLL);
        return false;
    }
    let mean = MEAN.load(Ordering::Relaxed);
    if mean == 0 {
        LEFT.set(0);
        return true;
    }
    let mut rng = RNG.get();
    if rng == 0 {
        static SEEDS: AtomicU64 = AtomicU64::new(0);
        rng = splitmix(SEEDS.fetch_add(1, Ordering::Relaxed)) | 1;
    }
    let epoch = EPOCH.load(Ordering::Relaxed);
    let mut left = LEFT.get();
    if DRAWN_IN.get() != epoch {
        // A poll's remainder, or another session's countdown: the bytes
        // up to here belong to no sample of this session.
        DRAWN_IN.set(epoch);
        left = draw(&mut rng, mean);
    }
    left -= size as i64;
    let hit = left <= 0;
    if hit {
        left = draw(&mut rng, mean);
    }
    RNG.set(rng);
    LEFT.set(left);
    hit
}

/// Whether `ptr` may have a trace: false for most blocks when sampling,
/// and for every block while tracing is off (the filter is all zeros
/// then). Inline in the front's dealloc in every mode, in place of a test
/// of `on()`: a shift, a mask and a load.
#[inline(always)]
pub(crate) fn may_be_traced(ptr: *mut u8) -> bool {
    filter_slot(ptr as usize).load(Ordering::Relaxed) != 0
}

fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Bytes until the next sample: exponential with mean `mean`, at least 1.
fn draw(rng: &mut u64, mean: usize) -> i64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    // Uniform in (0, 1].
    let u = ((*rng >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    ((-u.ln() * mean as f64) as i64).max(1)
}

fn add_current(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

/// Records the block `ptr` of `size` bytes in `place` just allocated (that
/// [`sample`] chose); `false` if the trace could not be stored (the front
/// then fails the allocation).
#[cold]
#[inline(never)]
pub(crate) fn record(ptr: *mut u8, size: usize, place: Place) -> bool {
    let Some(_busy) = Busy::enter() else {
        return true;
    };
    let epoch = EPOCH.load(Ordering::Acquire);
    let mut raw = [0usize; MAX_RAW];
    let depth = (LIMIT.load(Ordering::Relaxed) + skip_slack()).min(MAX_RAW);
    let n = capture(&mut raw[..depth]);
    let Some(traceback) = TRACEBACKS.lock().intern(&raw[..n]) else {
        return false;
    };
    store(ptr as usize, place, size, traceback, epoch)
}

/// Inserts a trace recorded during session `epoch`, unless tracing has
/// stopped or restarted since.
fn store(addr: usize, place: Place, size: usize, traceback: u32, epoch: usize) -> bool {
    let shard = shard_of(addr, place);
    let mut table = TRACES[shard].lock();
    if EPOCH.load(Ordering::Relaxed) != epoch {
        return true;
    }
    let sparse = MEAN.load(Ordering::Relaxed) != 0;
    match table.insert(addr, place, size, traceback, sparse) {
        Ok(old) => {
            if old.is_none() {
                filter_slot(addr).fetch_add(1, Ordering::Relaxed);
            }
            drop(table);
            add_current(weight(size, MEAN.load(Ordering::Relaxed)) as usize);
            true
        }
        Err(OutOfMemory) => false,
    }
}

/// A trace taken off a block, to put back if its `realloc` fails.
pub(crate) struct Removed {
    size: usize,
    traceback: u32,
    epoch: usize,
}

/// Forgets the trace of `ptr`, a block in `place` about to be freed or
/// moved.
#[cold]
#[inline(never)]
pub(crate) fn forget(ptr: *mut u8, place: Place) -> Option<Removed> {
    let addr = ptr as usize;
    if !may_be_traced(ptr) {
        return None;
    }
    let shard = shard_of(addr, place);
    let epoch = EPOCH.load(Ordering::Acquire);
    let (size, traceback) = {
        let mut table = TRACES[shard].lock();
        let found = table.remove(addr, place)?;
        filter_slot(addr).fetch_sub(1, Ordering::Relaxed);
        found
    };
    let bytes = weight(size, MEAN.load(Ordering::Relaxed)) as usize;
    // Saturating: `clear_traces` may have zeroed the count meanwhile.
    let _ = CURRENT.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
        Some(c.saturating_sub(bytes))
    });
    Some(Removed {
        size,
        traceback,
        epoch,
    })
}

/// Puts back a trace `forget` took, the block having stayed where it was.
#[cold]
pub(crate) fn restore(ptr: *mut u8, place: Place, removed: Removed) {
    store(
        ptr as usize,
        place,
        removed.size,
        removed.traceback,
        removed.epoch,
    );
}

// ---------------------------------------------------------------------------
// Control.

fn control() -> std::sync::MutexGuard<'static, ()> {
    CONTROL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts tracing every allocation, keeping `frames` frames of each
/// traceback (CPython's default is 1).
///
/// # Panics
/// If `frames` is 0 or over [`MAX_FRAMES`] (CPython's `ValueError`).
pub fn start(frames: usize) {
    start_with(frames, 0);
}

/// As [`start`], tracing a sample: each byte allocated is sampled with
/// probability `1 / mean_bytes` (512 KiB is jemalloc's default), so a block
/// of `z` bytes is traced with probability `1 - e^(-z/mean_bytes)`.
/// Statistics are then estimates, weighted by that probability.
///
/// # Panics
/// As [`start`]; or if `mean_bytes` is 0.
pub fn start_sampled(frames: usize, mean_bytes: usize) {
    assert!(
        mean_bytes > 0,
        "tracemalloc: the sampling mean must be positive"
    );
    start_with(frames, mean_bytes);
}

fn start_with(frames: usize, mean: usize) {
    assert!(
        (1..=MAX_FRAMES).contains(&frames),
        "tracemalloc: the number of frames must be in the range [1; {MAX_FRAMES}]"
    );
    let _control = control();
    let _busy = Busy::enter();
    if UNWINDER.load(Ordering::Relaxed) == 0 {
        // Warms the DWARF unwinder up (its first use sets itself up) and
        // tells whether frame pointers can be trusted.
        let choice = if frame_pointers_agree() { 1 } else { 2 };
        UNWINDER.store(choice, Ordering::Relaxed);
    }
    ON.store(false, Ordering::SeqCst);
    clear_locked();
    LIMIT.store(frames, Ordering::Relaxed);
    MEAN.store(mean, Ordering::Relaxed);
    ON.store(true, Ordering::SeqCst);
    // This thread's next allocation looks at once (other threads within
    // `POLL` bytes of theirs).
    LEFT.set(0);
}

/// Stops tracing and forgets every trace (as CPython does); snapshots taken
/// before stay valid.
pub fn stop() {
    let _control = control();
    ON.store(false, Ordering::SeqCst);
    clear_locked();
}

/// Whether allocations are being traced.
pub fn is_tracing() -> bool {
    on()
}

/// Forgets every trace, and the peak; tracing goes on.
pub fn clear_traces() {
    let _control = control();
    clear_locked();
}

fn clear_locked() {
    // A trace being recorded now belongs to the old session and is dropped.
    EPOCH.fetch_add(1, Ordering::SeqCst);
    // Every shard at once: a filter slot counts traces of several shards.
    let mut shards: [_; SHARDS] = core::array::from_fn(|shard| TRACES[shard].lock());
    for slot in &FILTER {
        slot.store(0, Ordering::Relaxed);
    }
    for shard in &mut shards {
        shard.clear();
    }
    drop(shards);
    TRACEBACKS.lock().clear();
    CURRENT.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
}

/// Bytes currently traced and the peak since `start` or [`reset_peak`];
/// estimates when sampling.
pub fn get_traced_memory() -> (usize, usize) {
    let current = CURRENT.load(Ordering::Relaxed);
    (current, PEAK.load(Ordering::Relaxed).max(current))
}

/// Sets the peak to the current traced size.
pub fn reset_peak() {
    PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Bytes tracemalloc's own tables take (memory mapped from the OS, not
/// from the allocator it traces).
pub fn get_tracemalloc_memory() -> usize {
    let traces: usize = TRACES.iter().map(|t| t.lock().bytes()).sum();
    traces + TRACEBACKS.lock().bytes() + core::mem::size_of_val(&FILTER)
}

/// Frames kept per traceback, as given to [`start`].
pub fn get_traceback_limit() -> usize {
    LIMIT.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Snapshots.

/// A frame of a traceback: where an allocation was made.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frame {
    /// The source file, relative to the working directory when inside it;
    /// empty when the binary has no line tables.
    pub filename: Arc<str>,
    /// The line, 0 when unknown (or when grouping by file).
    pub lineno: u32,
    /// The function, demangled, without its hash; empty when unknown.
    pub function: Arc<str>,
}

impl fmt::Display for Frame {
    /// `file:line` as CPython prints a frame; the function name where there
    /// is no file name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.filename.is_empty() {
            write!(f, "{}:{}", self.filename, self.lineno)
        } else if !self.function.is_empty() {
            f.write_str(&self.function)
        } else {
            f.write_str("<unknown>")
        }
    }
}

/// The frames of an allocation, most recent first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Traceback {
    frames: Vec<Frame>,
}

impl Traceback {
    /// The frames, most recent (the allocating line) first.
    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// The most recent frame; an unknown one when nothing was captured.
    fn first(&self) -> Frame {
        self.frames.first().cloned().unwrap_or_else(unknown_frame)
    }
}

/// `frame` as a key of file and line (CPython's frames have no function);
/// the function stays where there is no file to stand in for.
fn line_of(frame: Frame) -> Frame {
    if frame.filename.is_empty() {
        frame
    } else {
        Frame {
            function: Arc::from(""),
            ..frame
        }
    }
}

fn unknown_frame() -> Frame {
    Frame {
        filename: Arc::from(""),
        lineno: 0,
        function: Arc::from(""),
    }
}

impl fmt::Display for Traceback {
    /// One frame a line, most recent first.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.frames.is_empty() {
            return writeln!(f, "<unknown>");
        }
        for frame in &self.frames {
            writeln!(f, "{frame}")?;
        }
        Ok(())
    }
}

/// One live traced block.
#[derive(Clone, Debug)]
pub struct Trace {
    /// Bytes asked for.
    pub size: usize,
    /// Where it was allocated.
    pub traceback: Arc<Traceback>,
}

/// How to group traces in [`Snapshot::statistics`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    /// By the most recent frame's file (its line shown as 0).
    Filename,
    /// By the most recent frame's file and line.
    Lineno,
    /// By the whole traceback.
    Traceback,
}

/// A filter for [`Snapshot::filter_traces`] (CPython's `Filter`).
#[derive(Clone, Debug)]
pub struct Filter {
    /// Keep only matching traces (`true`) or drop them (`false`).
    pub inclusive: bool,
    /// A file name pattern, `fnmatch`-style: `*` any run, `?` any character.
    pub filename_pattern: String,
    /// Only this line, if given.
    pub lineno: Option<u32>,
    /// Match any frame of the traceback, not only the most recent one.
    pub all_frames: bool,
}

impl Filter {
    /// A filter on file names matching `pattern`, any line, most recent frame.
    pub fn new(inclusive: bool, pattern: &str) -> Self {
        Self {
            inclusive,
            filename_pattern: String::from(pattern),
            lineno: None,
            all_frames: false,
        }
    }

    fn matches_frame(&self, frame: &Frame) -> bool {
        glob(&self.filename_pattern, &frame.filename)
            && self.lineno.is_none_or(|line| line == frame.lineno)
    }

    /// Whether a trace with `traceback` passes this filter.
    fn keeps(&self, traceback: &Traceback) -> bool {
        let matched = if self.all_frames {
            traceback.frames.iter().any(|f| self.matches_frame(f))
        } else {
            self.matches_frame(&traceback.first())
        };
        matched == self.inclusive
    }
}

/// `fnmatch` with `*` and `?`, without recursion.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < t.len() {
        if i < p.len() && (p[i] == '?' || p[i] == t[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// The traces live at one moment (CPython's `Snapshot`).
#[derive(Clone, Debug)]
pub struct Snapshot {
    traces: Vec<Trace>,
    traceback_limit: usize,
    sample_mean: usize,
}

/// Total size and count of a group of traces.
#[derive(Clone, Copy, Default)]
struct Sum {
    size: f64,
    count: f64,
}

impl Snapshot {
    /// The live traces.
    pub fn traces(&self) -> &[Trace] {
        &self.traces
    }

    /// Frames kept per traceback when the snapshot was taken.
    pub fn traceback_limit(&self) -> usize {
        self.traceback_limit
    }

    /// The sampling mean in bytes, if the snapshot comes from
    /// [`start_sampled`]: its statistics are then estimates.
    pub fn sample_mean(&self) -> Option<usize> {
        (self.sample_mean != 0).then_some(self.sample_mean)
    }

    /// A snapshot of the traces that pass every filter: if any filter is
    /// inclusive, a trace must match one of them; it must match no
    /// exclusive one.
    pub fn filter_traces(&self, filters: &[Filter]) -> Snapshot {
        let (include, exclude): (Vec<&Filter>, Vec<&Filter>) =
            filters.iter().partition(|f| f.inclusive);
        let traces = self
            .traces
            .iter()
            .filter(|t| include.is_empty() || include.iter().any(|f| f.keeps(&t.traceback)))
            .filter(|t| exclude.iter().all(|f| f.keeps(&t.traceback)))
            .cloned()
            .collect();
        Snapshot { traces, ..*self }
    }

    fn group(&self, key: KeyType) -> HashMap<Traceback, Sum> {
        let mut groups: HashMap<Traceback, Sum> = HashMap::new();
        for trace in &self.traces {
            let key = match key {
                KeyType::Traceback => (*trace.traceback).clone(),
                KeyType::Lineno => Traceback {
                    frames: alloc::vec![line_of(trace.traceback.first())],
                },
                KeyType::Filename => Traceback {
                    frames: alloc::vec![Frame {
                        lineno: 0,
                        ..line_of(trace.traceback.first())
                    }],
                },
            };
            let sum = groups.entry(key).or_default();
            if self.sample_mean == 0 {
                sum.size += trace.size as f64;
                sum.count += 1.0;
            } else {
                let p = sample_probability(trace.size, self.sample_mean);
                sum.size += trace.size as f64 / p;
                sum.count += 1.0 / p;
            }
        }
        groups
    }

    /// Size and count of the live traces grouped by `key`, largest first
    /// (by size, then count, as CPython sorts).
    pub fn statistics(&self, key: KeyType) -> Vec<Statistic> {
        let estimated = self.sample_mean != 0;
        let mut stats: Vec<Statistic> = self
            .group(key)
            .into_iter()
            .map(|(traceback, sum)| Statistic {
                traceback,
                size: sum.size.round() as usize,
                count: sum.count.round() as usize,
                estimated,
            })
            .collect();
        stats.sort_by(|a, b| (b.size, b.count, &b.traceback).cmp(&(a.size, a.count, &a.traceback)));
        stats
    }

    /// What changed since `old`, grouped by `key`, sorted as CPython sorts
    /// (by absolute size difference, then size, then absolute count
    /// difference, then count, largest first).
    pub fn compare_to(&self, old: &Snapshot, key: KeyType) -> Vec<StatisticDiff> {
        let estimated = self.sample_mean != 0 || old.sample_mean != 0;
        let mut old = old.group(key);
        let mut diffs: Vec<StatisticDiff> = Vec::new();
        for (traceback, new) in self.group(key) {
            let before = old.remove(&traceback).unwrap_or_default();
            diffs.push(StatisticDiff::new(traceback, new, before, estimated));
        }
        for (traceback, before) in old {
            diffs.push(StatisticDiff::new(
                traceback,
                Sum::default(),
                before,
                estimated,
            ));
        }
        diffs.sort_by(|a, b| {
            let key = |d: &StatisticDiff| {
                (
                    d.size_diff.unsigned_abs(),
                    d.size,
                    d.count_diff.unsigned_abs(),
                    d.count,
                )
            };
            (key(b), &b.traceback).cmp(&(key(a), &a.traceback))
        });
        diffs
    }
}

/// Size and count of the traces of one group (CPython's `Statistic`).
#[derive(Clone, Debug, PartialEq)]
pub struct Statistic {
    /// The group: one frame, or the whole traceback with [`KeyType::Traceback`].
    pub traceback: Traceback,
    /// Total bytes.
    pub size: usize,
    /// Number of blocks.
    pub count: usize,
    /// Whether `size` and `count` are estimates from a sampled snapshot.
    pub estimated: bool,
}

/// A group's change between two snapshots (CPython's `StatisticDiff`).
#[derive(Clone, Debug, PartialEq)]
pub struct StatisticDiff {
    /// The group.
    pub traceback: Traceback,
    /// Total bytes now.
    pub size: usize,
    /// Bytes now minus bytes then.
    pub size_diff: isize,
    /// Blocks now.
    pub count: usize,
    /// Blocks now minus blocks then.
    pub count_diff: isize,
    /// Whether the figures are estimates from a sampled snapshot.
    pub estimated: bool,
}

impl StatisticDiff {
    fn new(traceback: Traceback, new: Sum, old: Sum, estimated: bool) -> Self {
        let (size, count) = (new.size.round() as usize, new.count.round() as usize);
        let (old_size, old_count) = (old.size.round() as usize, old.count.round() as usize);
        Self {
            traceback,
            size,
            size_diff: size as isize - old_size as isize,
            count,
            count_diff: count as isize - old_count as isize,
            estimated,
        }
    }
}

/// CPython's `_format_size`: bytes below 10 KiB, then KiB, MiB... with one
/// decimal below 100 units; signed if `sign`.
fn format_size(size: f64, sign: bool) -> String {
    let mut size = size;
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"] {
        if size.abs() < 100.0 && unit != "B" {
            return if sign {
                alloc::format!("{size:+.1} {unit}")
            } else {
                alloc::format!("{size:.1} {unit}")
            };
        }
        if size.abs() < 10.0 * 1024.0 || unit == "TiB" {
            return if sign {
                alloc::format!("{size:+.0} {unit}")
            } else {
                alloc::format!("{size:.0} {unit}")
            };
        }
        size /= 1024.0;
    }
    unreachable!("TiB returns")
}

/// Writes `, average=...` when there are blocks, and the estimate mark.
fn write_tail(
    f: &mut fmt::Formatter<'_>,
    size: usize,
    count: usize,
    estimated: bool,
) -> fmt::Result {
    if count != 0 {
        write!(
            f,
            ", average={}",
            format_size(size as f64 / count as f64, false)
        )?;
    }
    if estimated {
        f.write_str(" (estimated)")?;
    }
    Ok(())
}

impl fmt::Display for Statistic {
    /// `src/bus.rs:52: size=97.7 KiB, count=1000, average=100 B`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: size={}, count={}",
            self.traceback.first(),
            format_size(self.size as f64, false),
            self.count
        )?;
        write_tail(f, self.size, self.count, self.estimated)
    }
}

impl fmt::Display for StatisticDiff {
    /// `src/bus.rs:52: size=97.7 KiB (+97.7 KiB), count=1000 (+1000), average=100 B`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: size={} ({}), count={} ({:+})",
            self.traceback.first(),
            format_size(self.size as f64, false),
            format_size(self.size_diff as f64, true),
            self.count,
            self.count_diff
        )?;
        write_tail(f, self.size, self.count, self.estimated)
    }
}

/// The traces live now, resolved to files and lines. Empty when not
/// tracing (where CPython raises).
pub fn take_snapshot() -> Snapshot {
    let _control = control();
    // What this thread allocates from here on is ours, not the program's.
    let _busy = Busy::enter();
    let traceback_limit = LIMIT.load(Ordering::Relaxed);
    let sample_mean = MEAN.load(Ordering::Relaxed);
    if !on() {
        return Snapshot {
            traces: Vec::new(),
            traceback_limit,
            sample_mean,
        };
    }
    // Copied without allocating under a lock: a `Vec` growing is a
    // `realloc` whose hook may need that very lock.
    let mut raw: Vec<(usize, u32)> = Vec::new();
    for table in &TRACES {
        loop {
            let wanted = table.lock().len();
            raw.reserve(wanted);
            let table = table.lock();
            if raw.capacity() - raw.len() >= table.len() {
                raw.extend(table.iter());
                break;
            }
        }
    }
    let mut ids: Vec<u32> = raw.iter().map(|&(_, tb)| tb).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut tracebacks: HashMap<u32, Arc<Traceback>> = HashMap::with_capacity(ids.len());
    let mut frames = [0usize; MAX_RAW];
    for id in ids {
        let n = {
            let store = TRACEBACKS.lock();
            let stored = store.get(id);
            frames[..stored.len()].copy_from_slice(stored);
            stored.len()
        };
        tracebacks.insert(id, Arc::new(resolve(&frames[..n], traceback_limit)));
    }
    let traces = raw
        .into_iter()
        .map(|(size, tb)| Trace {
            size,
            traceback: tracebacks[&tb].clone(),
        })
        .collect();
    Snapshot {
        traces,
        traceback_limit,
        sample_mean,
    }
}

// ---------------------------------------------------------------------------
// Symbolisation, outside the allocation path.

/// A frame as resolved, and whether it is inside the allocation machinery.
struct Resolved {
    frame: Frame,
    internal: bool,
}

type ResolvedCache = HashMap<usize, Arc<[Resolved]>>;

/// Every address resolved so far in this process.
static RESOLVED: std::sync::Mutex<Option<ResolvedCache>> = std::sync::Mutex::new(None);

/// The user's frames of a raw traceback: leading frames of the allocator,
/// `alloc`, `core` and `std` dropped, at most `limit` kept.
fn resolve(raw: &[usize], limit: usize) -> Traceback {
    let mut cache = RESOLVED.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    let cwd = std::env::current_dir().ok();
    let mut frames = Vec::new();
    let mut leading = true;
    for &addr in raw {
        let resolved = cache
            .entry(addr)
            .or_insert_with(|| resolve_address(addr, cwd.as_deref()))
            .clone();
        for r in resolved.iter() {
            leading &= r.internal;
            if !leading && frames.len() < limit {
                frames.push(r.frame.clone());
            }
        }
        if frames.len() == limit {
            break;
        }
    }
    Traceback { frames }
}

fn resolve_address(addr: usize, cwd: Option<&std::path::Path>) -> Arc<[Resolved]> {
    let mut out = Vec::new();
    backtrace::resolve(addr as *mut core::ffi::c_void, |symbol| {
        let function = symbol
            .name()
            .map(|n| alloc::format!("{n:#}"))
            .unwrap_or_default();
        let path = symbol.filename();
        let internal = is_internal(&function, path);
        let filename = path
            .map(|path| {
                let path = cwd
                    .and_then(|cwd| path.strip_prefix(cwd).ok())
                    .unwrap_or(path);
                String::from(path.to_string_lossy())
            })
            .unwrap_or_default();
        out.push(Resolved {
            internal,
            frame: Frame {
                filename: Arc::from(filename),
                lineno: symbol.lineno().unwrap_or(0),
                function: Arc::from(function),
            },
        });
    });
    if out.is_empty() {
        out.push(Resolved {
            frame: Frame {
                function: Arc::from(alloc::format!("{addr:#x}")),
                ..unknown_frame()
            },
            internal: true,
        });
    }
    out.into()
}

/// Whether a frame belongs to the allocation machinery: by its file, when
/// known (Rust's `library/` and its vendored dependencies, this crate's
/// `src/`), else by its function's crate; the allocator shims and the
/// unwinder too. Generic code of `alloc` instantiated in the user's crate
/// carries `alloc`'s file but may be named after the user's type
/// (`<u8 as alloc::vec::spec_from_elem::SpecFromElem>::from_elem`), hence
/// the file first.
fn is_internal(function: &str, file: Option<&std::path::Path>) -> bool {
    if let Some(file) = file.and_then(|f| f.to_str()) {
        let ours = concat!(env!("CARGO_MANIFEST_DIR"), "/src/");
        if file.starts_with(ours)
            || file.starts_with("/rustc/")
            || file.starts_with("/rust/deps/")
            || ["/library/std/", "/library/core/", "/library/alloc/"]
                .iter()
                .any(|lib| file.contains(lib))
        {
            return true;
        }
    }
    let path = function.trim_start_matches(['<', '&', '*']);
    let path = path.strip_prefix("mut ").unwrap_or(path);
    let path = path.strip_prefix("dyn ").unwrap_or(path);
    let krate = path.split(['<', ':', ' ']).next().unwrap_or("");
    function.is_empty()
        || matches!(
            krate,
            "pymalloc" | "alloc" | "core" | "std" | "hashbrown" | "backtrace" | "__rustc"
        )
        || krate.starts_with("__r")
        || krate.starts_with("_Unwind")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap as Model;

    fn xorshift(seed: u64) -> impl FnMut() -> u64 {
        let mut rng = seed;
        move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        }
    }

    /// Pool geometries of the model test: (pool size, block size), with
    /// pools of 64 KiB (several side arrays each) and odd classes.
    const GEOMETRIES: [(usize, usize); 6] = [
        (1024, 8),
        (4096, 16),
        (4096, 24),
        (4096, 512),
        (16384, 264),
        (65536, 8),
    ];

    /// A block address and its place: the `n`th block of pool `pool` of
    /// geometry `g` (the first block after a 48-byte header), or with
    /// `g == GEOMETRIES.len()` a large block.
    fn block(g: usize, pool: usize, n: usize) -> (usize, Place) {
        let Some(&(pool_size, block_size)) = GEOMETRIES.get(g) else {
            return ((16 << 32) + (pool * 64 + n + 1) * 4096, Place::ELSEWHERE);
        };
        let per_pool = (pool_size - 48) / block_size;
        let base = ((g + 1) << 32) | (pool * pool_size);
        let addr = base + 48 + (n % per_pool) * block_size;
        (addr, Place::pool(pool_size, block_size))
    }

    /// The traces of a shard against a `HashMap` under random inserts,
    /// removes and moves (realloc), for pool blocks of several classes and
    /// pool sizes (side arrays) and large blocks (the address table),
    /// through many growths; blocks freed are traced again with new
    /// tracebacks, some of them too big for a side-array entry, and some
    /// pool blocks traced by address (sparse, as when sampling).
    #[test]
    fn shard_matches_a_model() {
        let mut next = xorshift(0x1234_5678_9abc_def1);
        let mut shard = Shard::new();
        let mut model: Model<usize, (usize, u32)> = Model::new();
        let mut places: Model<usize, Place> = Model::new();
        let mut live: Vec<usize> = Vec::new();
        let pick = |r: u64| {
            let g = (r >> 8) as usize % (GEOMETRIES.len() + 1);
            let (addr, place) = block(g, (r >> 16) as usize % 40, (r >> 24) as usize % 3000);
            (addr, place)
        };
        let size_for = |place: Place, r: u64| {
            if place == Place::ELSEWHERE {
                513 + (r >> 40) as usize % 5000
            } else {
                (r >> 40) as usize % (place.block_size + 1)
            }
        };
        for step in 0..300_000 {
            let r = next();
            let tb = if r % 97 == 0 {
                ENTRY_MAX_TRACEBACK + 1 + (r >> 50) as u32
            } else {
                (r >> 20) as u32 % 1000
            };
            match r % 4 {
                0 | 1 => {
                    let (addr, place) = pick(r);
                    places.insert(addr, place);
                    let size = size_for(place, r);
                    let old = shard.insert(addr, place, size, tb, r % 13 == 0).unwrap();
                    assert_eq!(old, model.insert(addr, (size, tb)));
                    if old.is_none() {
                        live.push(addr);
                    }
                }
                2 if !live.is_empty() => {
                    let victim = live.swap_remove((r >> 32) as usize % live.len());
                    assert_eq!(shard.remove(victim, places[&victim]), model.remove(&victim));
                }
                3 if !live.is_empty() => {
                    // realloc: the trace moves to a new address.
                    let at = (r >> 32) as usize % live.len();
                    let from = live.swap_remove(at);
                    let moved = shard.remove(from, places[&from]).unwrap();
                    assert_eq!(Some(moved), model.remove(&from));
                    let (addr, place) = pick(r.rotate_left(17));
                    places.insert(addr, place);
                    let size = size_for(place, r);
                    let sparse = r % 11 == 0;
                    if shard
                        .insert(addr, place, size, moved.1, sparse)
                        .unwrap()
                        .is_none()
                    {
                        live.push(addr);
                    }
                    model.insert(addr, (size, moved.1));
                }
                _ => {
                    let (addr, place) = pick(r);
                    if let Some(&known) = places.get(&addr) {
                        assert_eq!(shard.remove(addr, known), model.remove(&addr));
                    } else {
                        assert_eq!(shard.remove(addr, place), None);
                    }
                }
            }
            assert_eq!(shard.len(), model.len());
            if step % 20_000 == 0 {
                let mut seen: Vec<_> = shard.iter().collect();
                seen.sort_unstable();
                let mut want: Vec<_> = model.values().copied().collect();
                want.sort_unstable();
                assert_eq!(seen, want);
                assert!(
                    shard.traces.len() < shard.len(),
                    "pool blocks use side arrays"
                );
            }
        }
        // Freed to the last trace, every side array goes back.
        for addr in live.drain(..) {
            assert_eq!(shard.remove(addr, places[&addr]), model.remove(&addr));
        }
        assert_eq!(
            (shard.len(), shard.pools.len, shard.pooled, shard.unpacked),
            (0, 0, 0, 0)
        );
        let mapped = shard.arrays.mapped;
        assert!(mapped > 0);
        shard.clear();
        assert_eq!((shard.len(), shard.bytes()), (0, 0));
    }

    /// A pool's blocks cost 4 bytes each, and side arrays given back are
    /// used again rather than mapped anew.
    #[test]
    fn side_arrays_take_four_bytes_a_block_and_are_reused() {
        let mut shard = Shard::new();
        let (pool_size, block_size) = (4096, 16);
        let per_pool = (pool_size - 48) / block_size;
        for round in 0..3 {
            for pool in 0..64 {
                for n in 0..per_pool {
                    let (addr, place) = block(1, pool, n);
                    let old = shard.insert(addr, place, 16, round + 1, false).unwrap();
                    assert_eq!(old, None);
                }
            }
            assert_eq!(shard.len(), 64 * per_pool);
            assert_eq!(shard.traces.len(), 0);
            // 64 side arrays of 256 entries (1 KiB): 64 KiB, in chunks
            // doubling from a page, less their headers: 128 KiB mapped.
            assert!(shard.arrays.mapped <= 128 << 10, "{}", shard.arrays.mapped);
            let mapped = shard.arrays.mapped;
            for (size, tb) in shard.iter() {
                assert_eq!((size, tb), (16, round + 1));
            }
            for pool in 0..64 {
                for n in 0..per_pool {
                    let (addr, place) = block(1, pool, n);
                    assert_eq!(shard.remove(addr, place), Some((16, round + 1)));
                    assert_eq!(shard.remove(addr, place), None);
                }
            }
            assert_eq!(shard.pools.len, 0);
            assert_eq!(shard.arrays.mapped, mapped);
        }
    }

    /// The address table alone against a `HashMap`, through many growths.
    #[test]
    fn trace_table_matches_a_model() {
        let mut next = xorshift(0x9abc_def1_1234_5678);
        let mut table = TraceTable::new();
        let mut model: Model<usize, (usize, u32)> = Model::new();
        for _ in 0..100_000 {
            let r = next();
            // Addresses cluster like a heap's: 16-aligned, some dense runs.
            let addr = ((r >> 8) as usize % 20_000 + 1) * 16;
            if r % 3 == 0 {
                assert_eq!(table.remove(addr), model.remove(&addr));
            } else {
                let (size, tb) = ((r >> 40) as usize % 5000, (r >> 20) as u32 % 1000);
                assert_eq!(
                    table.insert(addr, size, tb).unwrap(),
                    model.insert(addr, (size, tb))
                );
            }
            assert_eq!(table.len(), model.len());
        }
        for (&a, &v) in &model {
            assert_eq!(table.get(a), Some(v));
        }
        let mut seen: Vec<_> = table.iter().collect();
        seen.sort_unstable();
        let mut want: Vec<_> = model.iter().map(|(&a, &(s, t))| (a, s, t)).collect();
        want.sort_unstable();
        assert_eq!(seen, want);
    }

    #[test]
    fn tracebacks_are_interned_once() {
        let mut store = Tracebacks::new();
        let a = store.intern(&[1, 2, 3]).unwrap();
        let b = store.intern(&[4, 5]).unwrap();
        assert_ne!(a, b);
        assert_eq!(store.intern(&[1, 2, 3]), Some(a));
        assert_eq!(store.intern(&[]), Some(0));
        for i in 0..10_000usize {
            let id = store.intern(&[i, i + 1, i * 7]).unwrap();
            assert_eq!(store.get(id), &[i, i + 1, i * 7]);
        }
        assert_eq!(store.get(a), &[1, 2, 3]);
        assert_eq!(store.intern(&[4, 5]), Some(b));
    }

    #[test]
    fn sizes_print_as_cpython_prints_them() {
        assert_eq!(format_size(100.0, false), "100 B");
        assert_eq!(format_size(10239.0, false), "10239 B");
        assert_eq!(format_size(100_000.0, false), "97.7 KiB");
        assert_eq!(format_size(100_000.0, true), "+97.7 KiB");
        assert_eq!(format_size(-512.0, true), "-512 B");
        assert_eq!(format_size(0.0, true), "+0 B");
        assert_eq!(format_size(5.0 * 1024.0 * 1024.0, false), "5120 KiB");
        assert_eq!(format_size(200.0 * 1024.0 * 1024.0, false), "200 MiB");
        assert_eq!(format_size(50.0 * 1024.0 * 1024.0, false), "50.0 MiB");
    }

    #[test]
    fn glob_matches_like_fnmatch() {
        assert!(glob("*.rs", "src/bus.rs"));
        assert!(glob("src/*", "src/bus.rs"));
        assert!(!glob("src/*.c", "src/bus.rs"));
        assert!(glob("src/b?s.rs", "src/bus.rs"));
        assert!(glob("*", ""));
        assert!(!glob("?", ""));
        assert!(glob("*b*s*", "src/bus.rs"));
    }

    #[test]
    fn internal_frames_are_recognised() {
        for name in [
            "alloc::raw_vec::RawVec<T,A>::grow_one",
            "<pymalloc::PyMalloc<B> as core::alloc::global::GlobalAlloc>::alloc",
            "__rustc::__rust_alloc",
            "__rdl_alloc",
            "<alloc::vec::Vec<T> as core::clone::Clone>::clone",
            "hashbrown::raw::RawTable<T,A>::reserve_rehash",
            "",
        ] {
            assert!(is_internal(name, None), "{name}");
        }
        for name in [
            "event_bus::serve",
            "<event_bus::Handler as core::fmt::Display>::fmt",
            "tracemalloc::leak_here",
        ] {
            assert!(!is_internal(name, None), "{name}");
        }
        let std_file = "/rustc/0123/library/alloc/src/vec/spec_from_elem.rs";
        assert!(is_internal(
            "<u8 as alloc::vec::spec_from_elem::SpecFromElem>::from_elem",
            Some(std_file.as_ref())
        ));
        assert!(is_internal(
            "whatever",
            Some(concat!(env!("CARGO_MANIFEST_DIR"), "/src/heap.rs").as_ref())
        ));
        assert!(!is_internal(
            "<u8 as mine::Trait>::f",
            Some("/work/app/src/main.rs".as_ref())
        ));
    }
}
