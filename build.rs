//! Decides two platform questions once, as cfgs the code can name:
//!
//! * `mmap_arenas`: the `System` backing maps arenas itself with `mmap`
//!   (64-bit Linux on the architectures whose mmap flags it declares), so a
//!   released arena's pages leave the process at once.
//! * `thread_cache`: the allocator gets per-thread caches.
//! * `fork_handlers`: `pthread_atfork` handlers keep every allocator lock
//!   sound across `fork` (unix with `std`, spin locks: a `critical-section`
//!   lock belongs to its implementation, and loom has no processes).
//!
//! They need `std`'s thread locals with a destructor, and a guarantee that
//! registering that destructor never calls the global allocator (which may
//! be this crate, mid-allocation). glibc's `__cxa_thread_atexit_impl`, which
//! `std` uses on Linux with glibc, allocates with glibc's own `calloc`; other
//! targets may fall back to a `Vec` of destructors, so they go without.
//! The `debug` feature goes without too: its double-free check needs every
//! free to reach the block's pool, and loom models the paths without them.
//!
//! And one tool question: is the crate being built with AddressSanitizer
//! (`-Zsanitizer=address`, what `cargo fuzz` passes)? `cfg(sanitize)` is
//! unstable, so the flags are read from `CARGO_ENCODED_RUSTFLAGS`. Then:
//!
//! * `passthrough` (unless the `asan-pools` feature is on): a heap over the
//!   system allocator hands every request to it, so ASan, LeakSanitizer and
//!   libFuzzer see each object;
//! * otherwise (`asan-pools`, or a backing that is not the system
//!   allocator, such as `Region`) the pools stay, and poison every byte
//!   that is not part of a live block.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(thread_cache)");
    println!("cargo::rustc-check-cfg=cfg(mmap_arenas)");
    println!("cargo::rustc-check-cfg=cfg(asan)");
    println!("cargo::rustc-check-cfg=cfg(passthrough)");
    println!("cargo::rustc-check-cfg=cfg(fork_handlers)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let has = |name: &str| std::env::var_os(name).is_some();
    let is = |name: &str, value: &str| std::env::var(name).is_ok_and(|v| v == value);
    if has("CARGO_FEATURE_STD")
        && is("CARGO_CFG_TARGET_OS", "linux")
        && ["x86_64", "aarch64", "riscv64"]
            .iter()
            .any(|arch| is("CARGO_CFG_TARGET_ARCH", arch))
    {
        println!("cargo::rustc-cfg=mmap_arenas");
    }
    if has("CARGO_FEATURE_STD")
        && !has("CARGO_FEATURE_CRITICAL_SECTION")
        && !has("CARGO_CFG_LOOM")
        && has("CARGO_CFG_UNIX")
    {
        println!("cargo::rustc-cfg=fork_handlers");
    }
    if has("CARGO_FEATURE_STD")
        && !has("CARGO_FEATURE_DEBUG")
        && !has("CARGO_CFG_LOOM")
        && is("CARGO_CFG_TARGET_OS", "linux")
        && is("CARGO_CFG_TARGET_ENV", "gnu")
    {
        println!("cargo::rustc-cfg=thread_cache");
    }
    let asan = address_sanitizer(&std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default());
    if asan {
        println!("cargo::rustc-cfg=asan");
        if !has("CARGO_FEATURE_ASAN_POOLS") {
            println!("cargo::rustc-cfg=passthrough");
        }
    }
}

/// Whether the flags (separated by 0x1f) ask for AddressSanitizer:
/// `-Zsanitizer=address`, `-Z sanitizer=address`, or a list naming it.
fn address_sanitizer(flags: &str) -> bool {
    flags.split('\x1f').any(|flag| {
        flag.strip_prefix("-Z")
            .unwrap_or(flag)
            .strip_prefix("sanitizer=")
            .is_some_and(|list| list.split(',').any(|s| s == "address"))
    })
}
