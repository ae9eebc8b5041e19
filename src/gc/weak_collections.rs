//! `WeakSet` and `WeakValueMap`: registries that do not keep their members
//! alive (Python's `weakref.WeakSet` and `WeakValueDictionary`).
//!
//! Nothing tells a registry when a member dies, so dead entries are purged
//! in bulk once the registry has doubled since its last purge: amortized
//! O(1) per insert, and at most about twice the live members (plus a small
//! constant) are ever held, however many short-lived members pass through.

use alloc::collections::BTreeMap;
use core::borrow::Borrow;
use core::fmt;

use super::pointer::{Cc, Weak};
use super::trace::Trace;

/// Entries held before the first purge.
const MIN_PURGE: usize = 32;

/// The entries of a weak registry, and when to purge the dead ones: once
/// the entry count reaches twice what survived the last purge.
struct WeakTable<K, V: Trace> {
    entries: BTreeMap<K, Weak<V>>,
    purge_at: usize,
}

impl<K: Ord, V: Trace> WeakTable<K, V> {
    const fn new() -> Self {
        WeakTable {
            entries: BTreeMap::new(),
            purge_at: MIN_PURGE,
        }
    }

    /// Drops the dead entries if a purge is due; called before each insert.
    fn purge_if_due(&mut self) {
        if self.entries.len() >= self.purge_at {
            self.entries.retain(|_, weak| alive(weak));
            self.purge_at = (self.entries.len() * 2).max(MIN_PURGE);
        }
    }

    fn live_len(&self) -> usize {
        self.entries.values().filter(|w| alive(w)).count()
    }

    fn any_live(&self) -> bool {
        self.entries.values().any(alive)
    }
}

fn alive<T: Trace>(weak: &Weak<T>) -> bool {
    weak.strong_count() > 0
}

/// A set of `Cc`s that does not keep them alive.
///
/// ```
/// use pymalloc::{Cc, WeakSet};
///
/// let mut handlers = WeakSet::new();
/// let a = Cc::new(String::from("a"));
/// handlers.insert(&a);
/// assert!(handlers.contains(&a));
/// drop(a);
/// assert_eq!(handlers.len(), 0);
/// ```
pub struct WeakSet<T: Trace> {
    /// Keyed by allocation address, which cannot be reused while the `Weak`
    /// in the entry keeps the allocation.
    table: WeakTable<usize, T>,
}

impl<T: Trace> WeakSet<T> {
    /// An empty set.
    pub const fn new() -> Self {
        WeakSet {
            table: WeakTable::new(),
        }
    }

    /// Adds `value`; `false` if it was already a member.
    pub fn insert(&mut self, value: &Cc<T>) -> bool {
        self.table.purge_if_due();
        let weak = Cc::downgrade(value);
        match self.table.entries.get_mut(&weak.addr()) {
            Some(slot) if alive(slot) => false,
            Some(slot) => {
                *slot = weak;
                true
            }
            None => {
                self.table.entries.insert(weak.addr(), weak);
                true
            }
        }
    }

    /// Removes `value`; `false` if it was not a member.
    pub fn remove(&mut self, value: &Cc<T>) -> bool {
        Cc::addr(value)
            .and_then(|addr| self.table.entries.remove(&addr))
            .is_some_and(|weak| alive(&weak))
    }

    /// Whether `value` is a member.
    pub fn contains(&self, value: &Cc<T>) -> bool {
        Cc::addr(value)
            .and_then(|addr| self.table.entries.get(&addr))
            .is_some_and(alive)
    }

    /// Number of live members (O(entries)).
    pub fn len(&self) -> usize {
        self.table.live_len()
    }

    /// Whether no member is alive.
    pub fn is_empty(&self) -> bool {
        !self.table.any_live()
    }

    /// Entries held, dead ones not yet purged included.
    pub fn slots(&self) -> usize {
        self.table.entries.len()
    }

    /// The live members.
    pub fn iter(&self) -> impl Iterator<Item = Cc<T>> + '_ {
        self.table.entries.values().filter_map(Weak::upgrade)
    }
}

impl<T: Trace> Default for WeakSet<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Trace> fmt::Debug for WeakSet<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakSet").field("len", &self.len()).finish()
    }
}

/// A map whose values are `Cc`s it does not keep alive; an entry disappears
/// when its value dies.
///
/// ```
/// use pymalloc::{Cc, WeakValueMap};
///
/// let mut cache = WeakValueMap::new();
/// let v = Cc::new(42u32);
/// cache.insert("answer", &v);
/// assert_eq!(cache.get("answer").as_deref(), Some(&42));
/// drop(v);
/// assert!(cache.get("answer").is_none());
/// ```
pub struct WeakValueMap<K: Ord, V: Trace> {
    table: WeakTable<K, V>,
}

impl<K: Ord, V: Trace> WeakValueMap<K, V> {
    /// An empty map.
    pub const fn new() -> Self {
        WeakValueMap {
            table: WeakTable::new(),
        }
    }

    /// Maps `key` to `value`; returns the previous value if it was alive.
    pub fn insert(&mut self, key: K, value: &Cc<V>) -> Option<Cc<V>> {
        self.table.purge_if_due();
        self.table
            .entries
            .insert(key, Cc::downgrade(value))
            .and_then(|old| old.upgrade())
    }

    /// The value for `key`, if it is alive.
    pub fn get<Q: Ord + ?Sized>(&self, key: &Q) -> Option<Cc<V>>
    where
        K: Borrow<Q>,
    {
        self.table.entries.get(key).and_then(Weak::upgrade)
    }

    /// Removes `key`; returns its value if it was alive.
    pub fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<Cc<V>>
    where
        K: Borrow<Q>,
    {
        self.table.entries.remove(key).and_then(|old| old.upgrade())
    }

    /// Whether `key` maps to a live value.
    pub fn contains_key<Q: Ord + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.table.entries.get(key).is_some_and(alive)
    }

    /// Number of entries whose value is alive (O(entries)).
    pub fn len(&self) -> usize {
        self.table.live_len()
    }

    /// Whether no value is alive.
    pub fn is_empty(&self) -> bool {
        !self.table.any_live()
    }

    /// Entries held, dead ones not yet purged included.
    pub fn slots(&self) -> usize {
        self.table.entries.len()
    }

    /// The live entries, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, Cc<V>)> + '_ {
        self.table
            .entries
            .iter()
            .filter_map(|(k, w)| w.upgrade().map(|v| (k, v)))
    }
}

impl<K: Ord, V: Trace> Default for WeakValueMap<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Ord + fmt::Debug, V: Trace> fmt::Debug for WeakValueMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.table
                    .entries
                    .iter()
                    .filter(|(_, w)| alive(w))
                    .map(|(k, _)| (k, "..")),
            )
            .finish()
    }
}
