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
/// `#[derive(Trace)]`: see the `pymalloc-derive` crate for what it
/// generates. Options go where they mean something, anything else is an
/// error: `#[trace(skip)]` on a field, not on the type or a variant,
///
/// ```compile_fail
/// #[derive(pymalloc::Trace)]
/// enum Node {
///     #[trace(skip)]
///     Leaf(pymalloc::Cc<u32>),
/// }
/// ```
///
/// ```compile_fail
/// #[derive(pymalloc::Trace)]
/// #[trace(skip)]
/// struct Node(pymalloc::Cc<u32>);
/// ```
///
/// `#[trace(finalize)]` on the type, not on a field:
///
/// ```compile_fail
/// #[derive(pymalloc::Trace)]
/// struct Node {
///     #[trace(finalize)]
///     next: Option<pymalloc::Cc<Node>>,
/// }
/// ```
///
/// and `#[trace(crate = path)]`, on the type, names the crate where it is
/// not `::pymalloc` (a renamed dependency, a re-export); the generated code
/// uses that path, so a wrong one does not compile:
///
/// ```compile_fail
/// #[derive(pymalloc::Trace)]
/// #[trace(crate = nowhere)]
/// struct Node(u32);
/// ```
///
/// ```
/// extern crate pymalloc as collected;
///
/// #[derive(collected::Trace)]
/// #[trace(crate = collected)]
/// struct Node(Option<collected::Cc<Node>>);
/// assert!(<Node as collected::Trace>::MAY_CONTAIN_CC);
/// ```
pub use pymalloc_derive::Trace;
pub use trace::{Finalize, Trace, Visitor};
pub use weak_collections::{WeakSet, WeakValueMap};
