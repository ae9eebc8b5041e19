//! CPython's memory story for Rust.
//!
//! * [`PyMalloc`] is a small-object allocator in the style of CPython's
//!   `obmalloc`: 256 KiB arenas of 4 KiB pools, each pool serving one size
//!   class of blocks up to 512 bytes, anything larger handed to a fallback.
//!   Threads share several heaps taken with try-locks, frees from other
//!   threads go through lock-free inboxes, and (with `std` on glibc)
//!   per-thread caches make most calls lock-free.
//! * `Cc<T>` / `Weak<T>` are reference-counted pointers backed by a
//!   generational trial-deletion cycle collector like CPython's `gc`.
//!
//! The crate is `#![no_std]`; the `std` feature (on by default) adds the
//! [`System`] backing and the thread-local default collector.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[cfg(any(feature = "std", test))]
extern crate std;

extern crate alloc;

mod sync;
#[cfg(loom)]
#[doc(hidden)]
pub use sync::loom_model;

// The allocator.
mod allocator;
mod arena;
pub mod backing;
pub mod config;
#[cfg(feature = "debug")]
pub mod debug;
#[cfg(fork_handlers)]
mod fork;
mod heap;
mod heaps;
mod list;
mod pool;
pub mod size_class;
pub mod stats;
#[cfg(thread_cache)]
mod thread_cache;

pub use allocator::{DefaultBacking, PyMalloc};

/// Whether this build gives each thread a cache of free blocks in front of
/// the shared heaps: with `std`, on Linux with glibc, without the `debug`
/// feature (see `build.rs` for why only there). Without them every
/// allocation takes a heap's lock, chosen without thread-local storage.
pub const THREAD_CACHES: bool = cfg!(thread_cache);
#[cfg(feature = "std")]
pub use backing::System;
pub use backing::{Backing, Region};
pub use config::Config;
pub use stats::{ClassDelta, ClassStats, Stats, StatsDiff};

// Reference counting and the cycle collector.
extern crate self as pymalloc;
mod ambient;
mod census;
mod collector;
pub mod gc;
mod header;
mod pointer;
mod trace;
mod weak_collections;
pub use collector::Collector;
pub use pointer::{Cc, Weak};
pub use pymalloc_derive::Trace;
pub use trace::{Finalize, Trace, Visitor};
pub use weak_collections::{WeakSet, WeakValueMap};
