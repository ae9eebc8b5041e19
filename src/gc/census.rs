//! Leak triage: live tracked objects counted by type name and by
//! allocation site, and the growth between two counts.
//!
//! The type census is Python's `Counter(type(o).__name__ for o in
//! gc.get_objects())`; the site census is tracemalloc's `lineno` view. Both
//! allocate (they are diagnostics) but never start a collection.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;
use core::panic::Location;

use super::collector::{short_name, Collector, SAVED};

/// Live tracked objects by type name (`core::any::type_name`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    counts: BTreeMap<&'static str, usize>,
}

/// An allocation site: the `file:line` of a `Cc` constructor call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Site {
    /// Source file.
    pub file: &'static str,
    /// Line in it.
    pub line: u32,
}

/// Objects and bytes of one allocation site.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteStat {
    /// Live objects created there.
    pub count: usize,
    /// Their allocation sizes, headers included.
    pub bytes: usize,
}

/// Live tracked objects by allocation site; only objects created while site
/// tracing was on are counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteCensus {
    sites: BTreeMap<Site, SiteStat>,
}

/// One row of a [`CensusDiff`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeGrowth {
    /// The type.
    pub type_name: &'static str,
    /// Live objects now.
    pub count: usize,
    /// How many more than in the earlier census.
    pub growth: usize,
}

/// The types that grew between two censuses, largest growth first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CensusDiff {
    /// The rows, largest growth first.
    pub rows: Vec<TypeGrowth>,
}

/// One row of a [`SiteDiff`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteGrowth {
    /// The site.
    pub site: Site,
    /// Live objects now.
    pub now: SiteStat,
    /// Growth in objects and bytes since the earlier census.
    pub growth: SiteStat,
}

/// The sites whose objects grew between two site censuses, most bytes first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteDiff {
    /// The rows, largest growth in bytes first.
    pub rows: Vec<SiteGrowth>,
}

impl Census {
    /// Live objects whose type name is `name`, either the full path
    /// (`my_crate::Node`) or its last segment (`Node`).
    pub fn get(&self, name: &str) -> usize {
        self.counts
            .iter()
            .filter(|(full, _)| **full == name || short_name(full) == name)
            .map(|(_, n)| n)
            .sum()
    }

    /// Live tracked objects in all.
    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    /// The types and counts, most numerous first.
    pub fn top(&self) -> Vec<(&'static str, usize)> {
        let mut rows: Vec<_> = self.counts.iter().map(|(k, v)| (*k, *v)).collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        rows
    }

    /// The types with more live objects than in `earlier`, largest growth first.
    pub fn diff(&self, earlier: &Census) -> CensusDiff {
        let rows = growth(&self.counts, &earlier.counts, |n| *n as u64)
            .map(|(type_name, count, before)| TypeGrowth {
                type_name,
                count: *count,
                growth: count - before.copied().unwrap_or(0),
            })
            .collect();
        CensusDiff { rows }
    }
}

impl SiteCensus {
    /// The stats of the site at `file:line`, if any object from it lives.
    pub fn get(&self, file: &str, line: u32) -> SiteStat {
        self.sites
            .iter()
            .find(|(site, _)| site.file == file && site.line == line)
            .map_or_else(SiteStat::default, |(_, stat)| *stat)
    }

    /// The sites and their stats, most bytes first.
    pub fn top(&self) -> Vec<(Site, SiteStat)> {
        let mut rows: Vec<_> = self.sites.iter().map(|(k, v)| (*k, *v)).collect();
        rows.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(a.0.cmp(&b.0)));
        rows
    }

    /// The sites with more bytes live than in `earlier`, most growth first.
    pub fn diff(&self, earlier: &SiteCensus) -> SiteDiff {
        let rows = growth(&self.sites, &earlier.sites, |s| s.bytes as u64)
            .map(|(site, now, before)| {
                let before = before.copied().unwrap_or_default();
                SiteGrowth {
                    site,
                    now: *now,
                    growth: SiteStat {
                        count: now.count.saturating_sub(before.count),
                        bytes: now.bytes - before.bytes,
                    },
                }
            })
            .collect();
        SiteDiff { rows }
    }
}

/// Entries of `now` whose `measure` grew since `before`, largest growth
/// first (ties by key), with their earlier value.
fn growth<'a, K: Ord + Copy, V>(
    now: &'a BTreeMap<K, V>,
    before: &'a BTreeMap<K, V>,
    measure: impl Fn(&V) -> u64,
) -> impl Iterator<Item = (K, &'a V, Option<&'a V>)> {
    let mut rows: Vec<_> = now
        .iter()
        .map(|(k, v)| (*k, v, before.get(k)))
        .filter(|(_, v, b)| measure(v) > b.map_or(0, &measure))
        .collect();
    rows.sort_by(|a, b| {
        let grown = |r: &(K, &V, Option<&V>)| measure(r.1) - r.2.map_or(0, &measure);
        grown(b).cmp(&grown(a)).then(a.0.cmp(&b.0))
    });
    rows.into_iter()
}

/// Formats a byte count as tracemalloc does (`48.2 KB`).
struct Size(usize);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 4] = ["B", "KB", "MB", "GB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit < UNITS.len() - 1 {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{:.1} {}", value, UNITS[unit])
        }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

impl fmt::Display for Census {
    /// One line per type, most numerous first: `count  type`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, count) in self.top() {
            writeln!(f, "{count:>9}  {name}")?;
        }
        Ok(())
    }
}

impl fmt::Display for CensusDiff {
    /// One line per grown type: `rank  +growth  now  type`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (rank, row) in self.rows.iter().enumerate() {
            writeln!(
                f,
                "{}  +{}  {}  {}",
                rank + 1,
                row.growth,
                row.count,
                row.type_name
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for SiteCensus {
    /// One line per site, most bytes first: `size  count  file:line`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (site, stat) in self.top() {
            writeln!(f, "{}  {}  {}", Size(stat.bytes), stat.count, site)?;
        }
        Ok(())
    }
}

impl fmt::Display for SiteDiff {
    /// One line per grown site, as tracemalloc: `1  48.2 KB  500  src/main.rs:52`
    /// (rank, growth in bytes, growth in objects, site).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (rank, row) in self.rows.iter().enumerate() {
            writeln!(
                f,
                "{}  {}  {}  {}",
                rank + 1,
                Size(row.growth.bytes),
                row.growth.count,
                row.site
            )?;
        }
        Ok(())
    }
}

impl Census {
    /// Counts the given type names.
    pub(crate) fn of(names: impl IntoIterator<Item = &'static str>) -> Census {
        let mut counts = BTreeMap::new();
        for name in names {
            *counts.entry(name).or_insert(0) += 1;
        }
        Census { counts }
    }
}

impl Collector {
    /// Counts live tracked objects by type name.
    pub fn census(&self) -> Census {
        let mut counts = BTreeMap::new();
        self.for_each_live(|link| {
            // SAFETY: `for_each_live` yields live objects.
            let name = (unsafe { link.as_ref() }.vtable.type_name)();
            *counts.entry(name).or_insert(0) += 1;
        });
        Census { counts }
    }

    /// Switches allocation-site tracing on or off (off by default). While
    /// on, each new tracked object records the `file:line` of the `Cc`
    /// constructor call that made it; switching off forgets the records.
    pub fn set_site_tracing(&self, on: bool) {
        self.site_tracing.set(on);
        if !on {
            self.sites.borrow_mut().clear();
        }
    }

    /// Whether site tracing is on.
    pub fn site_tracing(&self) -> bool {
        self.site_tracing.get()
    }

    /// Counts live tracked objects (and their bytes) by allocation site.
    pub fn site_census(&self) -> SiteCensus {
        let records = self.sites.borrow();
        let mut sites: BTreeMap<Site, SiteStat> = BTreeMap::new();
        self.for_each_live(|link| {
            if let Some(location) = records.get(&link.addr().get()) {
                let stat = sites.entry(Site::from(*location)).or_default();
                stat.count += 1;
                // SAFETY: `for_each_live` yields live objects.
                stat.bytes += unsafe { link.as_ref() }.vtable.layout.size();
            }
        });
        SiteCensus { sites }
    }
}

impl From<&'static Location<'static>> for Site {
    fn from(location: &'static Location<'static>) -> Self {
        Site {
            file: location.file(),
            line: location.line(),
        }
    }
}

// Beside `Census`, which it returns.
impl Collector {
    /// What `save_all` kept (`gc.garbage`), counted by type name; empty it
    /// with [`clear_garbage`](Collector::clear_garbage).
    pub fn garbage(&self) -> Census {
        let mut names = Vec::new();
        // SAFETY: `SAVED` is a well-formed list of live objects.
        unsafe {
            self.head(SAVED)
                .for_each(|link| names.push((link.as_ref().vtable.type_name)()))
        };
        Census::of(names)
    }
}
