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

// The crate's map. Two halves, each in its folder, each opening with its
// design essay:
//
// * `allocator/`: `PyMalloc`, from the `GlobalAlloc` front down to the
//   backings (`allocator/mod.rs` gives the layers and their order).
// * `gc/`: `Cc`, `Weak`, `Trace` and the cycle collector, with the `gc`
//   toolbox as the half's face (`gc/mod.rs`).
//
// The collector reaches memory only through the global allocator, so the
// allocator half imports nothing from the collector half (`.ci/layers`
// checks it). Everything public is re-exported here under the paths users
// know: `pymalloc::PyMalloc`, `pymalloc::stats::Stats`, `pymalloc::Cc`,
// `pymalloc::gc::collect`, ...

#[cfg(any(feature = "std", test))]
extern crate std;

extern crate alloc;
// So that the derive's `::pymalloc::` paths resolve inside the crate too.
extern crate self as pymalloc;

mod allocator;
pub mod gc;

#[cfg(loom)]
#[doc(hidden)]
pub use allocator::sync::loom_model;

#[cfg(feature = "debug")]
pub use allocator::debug;
pub use allocator::front::{DefaultBacking, PyMalloc};
pub use allocator::inject;
#[cfg(all(feature = "std", not(loom)))]
pub use allocator::tracemalloc;
pub use allocator::{backing, config, size_class, stats, THREAD_CACHES};
// Shown as re-exports, as before the move: their home is the public module.
#[cfg(feature = "std")]
#[doc(no_inline)]
pub use backing::System;
#[doc(no_inline)]
pub use backing::{Backing, Region};
#[doc(no_inline)]
pub use config::Config;
#[doc(no_inline)]
pub use stats::{ClassDelta, ClassStats, MediumArenas, Stats, StatsDiff};

pub use gc::collector::Collector;
pub use gc::header::Visitor;
pub use gc::pointer::{Cc, Weak};
pub use gc::trace::{Finalize, Trace};
pub use gc::weak_collections::{WeakSet, WeakValueMap};
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
