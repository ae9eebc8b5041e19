//! Statistics: the analogue of CPython's `sys._debugmallocstats()`, and
//! snapshots whose difference shows what grew.
//!
//! Gathering walks the arenas under the heap's lock and fills a fixed-size
//! value: it never allocates, so it is safe to call from inside a global
//! allocator's user, a signal-free diagnostic path, or firmware.

use super::config::{MEDIUM_ARENA_RUNS, MEDIUM_RUN_SIZE};
use super::size_class::{class_size, ALL_CLASS_COUNT, CLASS_COUNT, SMALL_REQUEST_THRESHOLD};
use core::fmt;

/// Pools and blocks of one size class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassStats {
    /// Block size of the class.
    pub size: usize,
    /// Pools serving the class (used or full; empty pools are "unused").
    pub pools: usize,
    /// Blocks handed out.
    pub blocks_in_use: usize,
    /// Blocks free in those pools (on free lists or not yet carved).
    pub blocks_free: usize,
}

/// The medium tier's arenas, counted apart from the small ones': their
/// runs (the medium tier's pools) and arenas are larger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MediumArenas {
    /// Bytes in a run.
    pub run_size: usize,
    /// Bytes in a medium arena.
    pub arena_size: usize,
    /// Medium arenas ever taken from the backing.
    pub allocated_total: usize,
    /// Medium arenas given back to the backing.
    pub reclaimed: usize,
    /// Most medium arenas held at once (summed over heaps).
    pub highwater: usize,
    /// Medium arenas held now.
    pub current: usize,
    /// Of those, wholly free ones waiting out the release delay
    /// ([`Config::with_release_delay_ms`](crate::Config::with_release_delay_ms)).
    pub retired: usize,
    /// Runs with no block out: empty or never carved.
    pub unused_runs: usize,
}

/// A snapshot of a [`PyMalloc`](crate::PyMalloc) heap.
///
/// The arena bytes add up exactly:
/// `allocated + available + unused pools and runs + pool headers +
/// quantization + arena alignment == arenas_current × arena_size +
/// medium arenas × their size` (see [`Stats::accounted_arena_bytes`]).
/// Medium classes (see [`Config::with_medium_tier`](crate::Config::with_medium_tier))
/// follow the small ones in [`Stats::classes`]; their runs count as pools
/// there, and their headers and quantization with the small ones'.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Bytes in a pool.
    pub pool_size: usize,
    /// Bytes in an arena.
    pub arena_size: usize,
    /// Largest request served from pools: 512, or a region's
    /// [`Config::pool_limit`](crate::Config::pool_limit).
    pub small_threshold: usize,
    /// Per size class, smallest first: the small classes, then the
    /// medium ones.
    pub classes: [ClassStats; ALL_CLASS_COUNT],
    /// Arenas ever taken from the backing.
    pub arenas_allocated_total: usize,
    /// Arenas given back to the backing.
    pub arenas_reclaimed: usize,
    /// Most arenas held at once.
    pub arenas_highwater: usize,
    /// Arenas held now.
    pub arenas_current: usize,
    /// Of those, wholly free ones waiting out the release delay
    /// ([`Config::with_release_delay_ms`](crate::Config::with_release_delay_ms)):
    /// their pools count as unused.
    pub arenas_retired: usize,
    /// The medium tier's arenas.
    pub medium: MediumArenas,
    /// Pools with no block out: empty or never carved.
    pub unused_pools: usize,
    /// Bytes taken by pool headers.
    pub pool_header_bytes: usize,
    /// Bytes in used pools too few to make another block.
    pub quantization_bytes: usize,
    /// Bytes lost because an arena's memory did not start on a pool
    /// boundary.
    pub arena_alignment_bytes: usize,
    /// Bytes of arena records and of the heaps themselves, held outside the
    /// arenas.
    pub bookkeeping_bytes: usize,
    /// Free blocks held in other threads' caches (counted in
    /// `blocks_free`): ready for those threads, not yet back in their pools.
    pub cached_blocks: usize,
    /// Live objects served by the fallback (over `small_threshold` bytes
    /// or over-aligned).
    pub large_objects: usize,
    /// Bytes of those objects.
    pub large_bytes: usize,
    /// Bytes callers asked for and still hold, small and large (with the
    /// `debug` feature: without the debug header and guards).
    pub requested_bytes: usize,
    /// Bytes of arenas given back that the backing keeps mapped for the
    /// next one (for [`System`](crate::System), process-wide, at most
    /// [`RETAINED_ARENAS`](crate::backing::RETAINED_ARENAS) arenas): freed,
    /// still resident, not part of this allocator's totals.
    pub retained_arena_bytes: usize,
}

impl Stats {
    /// A snapshot with nothing in it, for a heap of this geometry.
    pub(crate) fn empty(pool_size: usize, arena_size: usize) -> Stats {
        let mut classes = [ClassStats::default(); ALL_CLASS_COUNT];
        for (class, entry) in classes.iter_mut().enumerate() {
            entry.size = class_size(class);
        }
        Stats {
            pool_size,
            arena_size,
            small_threshold: SMALL_REQUEST_THRESHOLD,
            classes,
            arenas_allocated_total: 0,
            arenas_reclaimed: 0,
            arenas_highwater: 0,
            arenas_current: 0,
            arenas_retired: 0,
            medium: MediumArenas {
                run_size: MEDIUM_RUN_SIZE,
                arena_size: MEDIUM_RUN_SIZE * MEDIUM_ARENA_RUNS,
                ..MediumArenas::default()
            },
            unused_pools: 0,
            pool_header_bytes: 0,
            quantization_bytes: 0,
            arena_alignment_bytes: 0,
            bookkeeping_bytes: 0,
            cached_blocks: 0,
            large_objects: 0,
            large_bytes: 0,
            requested_bytes: 0,
            retained_arena_bytes: 0,
        }
    }

    /// Small and medium blocks handed out.
    pub fn blocks_in_use(&self) -> usize {
        self.classes.iter().map(|c| c.blocks_in_use).sum()
    }

    /// Allocations alive now: small and medium blocks handed out plus
    /// large objects.
    pub fn live_allocations(&self) -> usize {
        self.blocks_in_use() + self.large_objects
    }

    /// Bytes in small and medium blocks handed out.
    pub fn allocated_block_bytes(&self) -> usize {
        self.classes.iter().map(|c| c.blocks_in_use * c.size).sum()
    }

    /// Bytes in free blocks of used pools.
    pub fn available_block_bytes(&self) -> usize {
        self.classes.iter().map(|c| c.blocks_free * c.size).sum()
    }

    /// Bytes in the arenas held now, small and medium.
    pub fn arena_bytes(&self) -> usize {
        self.arenas_current * self.arena_size + self.medium.current * self.medium.arena_size
    }

    /// The parts of the arenas, added up; equals [`Stats::arena_bytes`].
    pub fn accounted_arena_bytes(&self) -> usize {
        self.allocated_block_bytes()
            + self.available_block_bytes()
            + self.unused_pools * self.pool_size
            + self.medium.unused_runs * self.medium.run_size
            + self.pool_header_bytes
            + self.quantization_bytes
            + self.arena_alignment_bytes
    }

    /// Everything the heap holds from its backing: arenas, large objects and
    /// bookkeeping.
    pub fn held_bytes(&self) -> usize {
        self.arena_bytes() + self.large_bytes + self.bookkeeping_bytes
    }

    /// What changed from `before` to `self`, largest growth first.
    pub fn diff(&self, before: &Stats) -> StatsDiff {
        let mut classes = [ClassDelta::default(); ALL_CLASS_COUNT];
        let mut changed = 0;
        for (now, then) in self.classes.iter().zip(before.classes.iter()) {
            let delta = ClassDelta {
                size: now.size,
                pools: signed(now.pools) - signed(then.pools),
                blocks: signed(now.blocks_in_use) - signed(then.blocks_in_use),
                bytes: (signed(now.blocks_in_use) - signed(then.blocks_in_use)) * signed(now.size),
            };
            if delta.pools != 0 || delta.blocks != 0 {
                classes[changed] = delta;
                changed += 1;
            }
        }
        classes[..changed].sort_unstable_by(|a, b| b.bytes.cmp(&a.bytes).then(a.size.cmp(&b.size)));
        StatsDiff {
            classes,
            changed,
            arenas: signed(self.arenas_current) - signed(before.arenas_current),
            arena_size: self.arena_size,
            blocks: signed(self.blocks_in_use()) - signed(before.blocks_in_use()),
            large_objects: signed(self.large_objects) - signed(before.large_objects),
            large_bytes: signed(self.large_bytes) - signed(before.large_bytes),
            requested_bytes: signed(self.requested_bytes) - signed(before.requested_bytes),
            held_bytes: signed(self.held_bytes()) - signed(before.held_bytes()),
        }
    }
}

fn signed(n: usize) -> isize {
    n as isize
}

/// How one size class changed between two snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassDelta {
    /// Block size of the class.
    pub size: usize,
    /// Change in pools serving it.
    pub pools: isize,
    /// Change in blocks handed out.
    pub blocks: isize,
    /// Change in bytes handed out (`blocks × size`).
    pub bytes: isize,
}

/// The difference between two [`Stats`]: what grew, largest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsDiff {
    classes: [ClassDelta; ALL_CLASS_COUNT],
    changed: usize,
    arena_size: usize,
    /// Change in arenas held.
    pub arenas: isize,
    /// Change in small blocks handed out.
    pub blocks: isize,
    /// Change in live large objects.
    pub large_objects: isize,
    /// Change in bytes of large objects.
    pub large_bytes: isize,
    /// Change in bytes requested by live allocations.
    pub requested_bytes: isize,
    /// Change in bytes held from the backing.
    pub held_bytes: isize,
}

impl StatsDiff {
    /// The size classes that changed, largest growth in bytes first.
    pub fn classes(&self) -> &[ClassDelta] {
        &self.classes[..self.changed]
    }
}

/// Formats an integer with thousands separators (and a `+` when asked),
/// honouring width and alignment, without allocating.
struct Grouped {
    value: i128,
    plus: bool,
}

fn grouped(value: usize) -> Grouped {
    Grouped {
        value: value as i128,
        plus: false,
    }
}

fn delta(value: isize) -> Grouped {
    Grouped {
        value: value as i128,
        plus: true,
    }
}

impl fmt::Display for Grouped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 64];
        let mut at = buf.len();
        let mut rest = self.value.unsigned_abs();
        let mut digits = 0;
        loop {
            if digits > 0 && digits % 3 == 0 {
                at -= 1;
                buf[at] = b',';
            }
            at -= 1;
            buf[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            digits += 1;
            if rest == 0 {
                break;
            }
        }
        if self.value < 0 {
            at -= 1;
            buf[at] = b'-';
        } else if self.plus {
            at -= 1;
            buf[at] = b'+';
        }
        // Only ASCII digits, commas and signs were written.
        f.pad(core::str::from_utf8(&buf[at..]).unwrap_or("?"))
    }
}

impl fmt::Display for Stats {
    /// The layout of CPython's `sys._debugmallocstats()`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Small block threshold = {}, in {CLASS_COUNT} size classes.\n",
            self.small_threshold
        )?;
        writeln!(f, "class   size   num pools   blocks in use  avail blocks")?;
        writeln!(f, "-----   ----   ---------   -------------  ------------")?;
        for (class, c) in self.classes.iter().enumerate() {
            if c.pools != 0 {
                writeln!(
                    f,
                    "{class:>5} {:>6} {:>11} {:>15} {:>13}",
                    c.size, c.pools, c.blocks_in_use, c.blocks_free
                )?;
            }
        }
        writeln!(f)?;
        let line = |f: &mut fmt::Formatter<'_>, label: &str, n: usize| {
            writeln!(f, "{label:<35}= {:>21}", grouped(n))
        };
        // One group of arena rows: (total, reclaimed, highwater, current).
        let arenas = |f: &mut fmt::Formatter<'_>,
                      kind: &'static str,
                      [total, reclaimed, highwater, current, retired]: [usize; 5],
                      arena_size: usize| {
            let label = |what: &str| {
                let mut buf = StackString::<64>::new();
                let _ = fmt::write(&mut buf, format_args!("# {kind} {what}"));
                buf
            };
            line(f, label("allocated total").as_str(), total)?;
            line(f, label("reclaimed").as_str(), reclaimed)?;
            line(f, label("highwater mark").as_str(), highwater)?;
            line(f, label("allocated current").as_str(), current)?;
            line(f, label("retired (free, kept mapped)").as_str(), retired)?;
            writeln!(
                f,
                "{:<35}= {:>21}",
                ArenaProduct(current, arena_size, kind, "arena"),
                grouped(current * arena_size)
            )
        };
        arenas(
            f,
            "arenas",
            [
                self.arenas_allocated_total,
                self.arenas_reclaimed,
                self.arenas_highwater,
                self.arenas_current,
                self.arenas_retired,
            ],
            self.arena_size,
        )?;
        let m = &self.medium;
        arenas(
            f,
            "medium arenas",
            [
                m.allocated_total,
                m.reclaimed,
                m.highwater,
                m.current,
                m.retired,
            ],
            m.arena_size,
        )?;
        writeln!(f)?;
        line(
            f,
            "# bytes in allocated blocks",
            self.allocated_block_bytes(),
        )?;
        line(
            f,
            "# bytes in available blocks",
            self.available_block_bytes(),
        )?;
        writeln!(
            f,
            "{:<35}= {:>21}",
            ArenaProduct(self.unused_pools, self.pool_size, "unused pools", "pool"),
            grouped(self.unused_pools * self.pool_size)
        )?;
        writeln!(
            f,
            "{:<35}= {:>21}",
            ArenaProduct(m.unused_runs, m.run_size, "unused runs", "run"),
            grouped(m.unused_runs * m.run_size)
        )?;
        line(f, "# blocks free in thread caches", self.cached_blocks)?;
        line(f, "# bytes lost to pool headers", self.pool_header_bytes)?;
        line(f, "# bytes lost to quantization", self.quantization_bytes)?;
        line(
            f,
            "# bytes lost to arena alignment",
            self.arena_alignment_bytes,
        )?;
        line(f, "Total", self.accounted_arena_bytes())?;
        writeln!(f)?;
        line(f, "# large objects", self.large_objects)?;
        line(f, "# bytes in large objects", self.large_bytes)?;
        line(f, "# bytes of arena bookkeeping", self.bookkeeping_bytes)?;
        line(f, "# bytes held from the backing", self.held_bytes())?;
        line(f, "# bytes requested by live blocks", self.requested_bytes)?;
        line(
            f,
            "# bytes of freed arenas kept mapped",
            self.retained_arena_bytes,
        )
    }
}

/// `"N things * S bytes/thing"`, padded as a unit.
struct ArenaProduct(usize, usize, &'static str, &'static str);

impl fmt::Display for ArenaProduct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Format into a stack buffer so the width applies to the whole phrase.
        let mut buf = StackString::<64>::new();
        let _ = fmt::write(
            &mut buf,
            format_args!("{} {} * {} bytes/{}", self.0, self.2, self.1, self.3),
        );
        f.pad(buf.as_str())
    }
}

/// A fixed-capacity string for formatting without allocating; text past the
/// capacity is dropped.
struct StackString<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackString<N> {
    const fn new() -> Self {
        StackString {
            buf: [0; N],
            len: 0,
        }
    }

    fn as_str(&self) -> &str {
        // Only whole `&str`s are copied in (see `write_str`).
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl<const N: usize> fmt::Write for StackString<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = N - self.len;
        if s.len() > room {
            return Err(fmt::Error);
        }
        self.buf[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
        self.len += s.len();
        Ok(())
    }
}

impl fmt::Display for StatsDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "arenas {} ({} bytes), small blocks {}, large objects {} ({} bytes), \
             requested {} bytes, held {} bytes",
            delta(self.arenas),
            delta(self.arenas * self.arena_size as isize),
            delta(self.blocks),
            delta(self.large_objects),
            delta(self.large_bytes),
            delta(self.requested_bytes),
            delta(self.held_bytes),
        )?;
        if self.changed == 0 {
            return writeln!(f, "no size class changed");
        }
        writeln!(f, " size        blocks           bytes    pools")?;
        for c in self.classes() {
            writeln!(
                f,
                "{:>5} {:>13} {:>15} {:>8}",
                c.size,
                delta(c.blocks),
                delta(c.bytes),
                delta(c.pools)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(format!("{}", grouped(0)), "0");
        assert_eq!(format!("{}", grouped(999)), "999");
        assert_eq!(format!("{}", grouped(1000)), "1,000");
        assert_eq!(format!("{}", grouped(262144)), "262,144");
        assert_eq!(format!("{}", delta(-1234567)), "-1,234,567");
        assert_eq!(format!("{}", delta(5)), "+5");
        assert_eq!(format!("{:>8}", grouped(1234)), "   1,234");
    }

    #[test]
    fn a_diff_lists_growth_largest_first() {
        let before = Stats::empty(4096, 262144);
        let mut after = before.clone();
        after.classes[0].blocks_in_use = 100; // 800 bytes
        after.classes[9].blocks_in_use = 10; // 800 bytes at 80
        after.classes[63].blocks_in_use = 7; // 3584 bytes
        after.classes[63].pools = 1;
        let mut shrunk = before.clone();
        shrunk.classes[2].blocks_in_use = 50;
        after.arenas_current = 1;
        let diff = after.diff(&shrunk);
        let sizes: std::vec::Vec<usize> = diff.classes().iter().map(|c| c.size).collect();
        assert_eq!(sizes, [512, 8, 80, 24]);
        assert_eq!(diff.classes()[3].bytes, -50 * 24);
        assert_eq!(diff.arenas, 1);
        let text = format!("{diff}");
        assert!(text.contains("+3,584"), "{text}");
    }
}
