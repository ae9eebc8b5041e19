//! Decides the platform questions once, as cfgs the code can name:
//!
//! * `mmap_arenas`: the `System` backing maps arenas itself with `mmap`
//!   (64-bit Linux on the architectures whose mmap flags it declares), so a
//!   released arena's pages leave the process at once.
//! * `thread_cache`: the allocator gets per-thread caches, and
//!   `thread_exit` names the hook that hands a cache back when its thread
//!   exits (below).
//! * `fork_handlers`: `pthread_atfork` handlers keep every allocator lock
//!   sound across `fork` (unix with `std`, spin locks: a `critical-section`
//!   lock belongs to its implementation, and loom has no processes).
//!
//! A thread cache needs thread-local storage that exists without
//! allocating, and a thread-exit hook whose registration and running never
//! call the global allocator (which may be this crate, mid-allocation).
//! The cache's thread locals are `const`-initialised with no destructor, so
//! on a target with native TLS `std` keeps them in the thread's TLS block,
//! registering nothing; targets without native TLS (Android, OpenHarmony,
//! NetBSD on some CPUs), where `std` would box every thread local on first
//! use through the global allocator, go without caches, as do targets not
//! listed below (untested). Per platform, the hook (`thread_exit`):
//!
//! * Linux with glibc, `tls_destructor`: the cache lives in a `std` thread
//!   local, handed back by the destructor of a second one. `std` registers
//!   that destructor with glibc's `__cxa_thread_atexit_impl`, which
//!   allocates its record with glibc's `calloc`, never the global allocator.
//! * Other Unix (Linux with musl, macOS and the other Apple systems,
//!   FreeBSD, illumos, Solaris), `pthread_key`, as mimalloc uses: a
//!   `pthread_key_create` destructor. `std` there may keep thread-local
//!   destructors in a `Vec` (the global allocator), so it registers none;
//!   the libc's key table is its own (glibc's second-level block comes from
//!   its own `calloc`). The cache itself comes from `std::alloc::System`
//!   (the libc's `malloc`, not the global allocator) and a thread local
//!   holds only its address, so the destructor, which receives that
//!   address, reads no TLS that the libc may already have freed (macOS
//!   frees TLV blocks in key destructors of their own).
//! * Windows with MSVC, `fls`: the same with an `FlsAlloc` callback, which
//!   Windows runs at thread exit (as mimalloc and snmalloc use); kernel32
//!   keeps the values itself. Not built on the Linux machine this crate is
//!   developed on.
//!
//! `--cfg pymalloc_pthread_key` (in `RUSTFLAGS`) picks `pthread_key` on
//! glibc too, so that the code musl and macOS run is built, tested and
//! benchmarked there. The `debug` feature goes without caches: its
//! double-free check needs every free to reach the block's pool. So does
//! loom, which models the paths without them.
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
    println!(
        "cargo::rustc-check-cfg=cfg(thread_exit, values(\"tls_destructor\", \"pthread_key\", \"fls\"))"
    );
    println!("cargo::rustc-check-cfg=cfg(pymalloc_pthread_key)");
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
    if has("CARGO_FEATURE_STD") && !has("CARGO_FEATURE_DEBUG") && !has("CARGO_CFG_LOOM") {
        if let Some(hook) = thread_exit_hook() {
            println!("cargo::rustc-cfg=thread_cache");
            println!("cargo::rustc-cfg=thread_exit=\"{hook}\"");
        }
    }
    let asan = address_sanitizer(&std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default());
    if asan {
        println!("cargo::rustc-cfg=asan");
        if !has("CARGO_FEATURE_ASAN_POOLS") {
            println!("cargo::rustc-cfg=passthrough");
        }
    }
}

/// The thread-exit hook of the target's caches (see the top of this file),
/// or `None` for a target that goes without them.
fn thread_exit_hook() -> Option<&'static str> {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let (os, env) = (var("CARGO_CFG_TARGET_OS"), var("CARGO_CFG_TARGET_ENV"));
    let forced_key = std::env::var_os("CARGO_CFG_PYMALLOC_PTHREAD_KEY").is_some();
    match (os.as_str(), env.as_str()) {
        ("linux", "gnu") if !forced_key => Some("tls_destructor"),
        ("linux", "gnu" | "musl") | ("freebsd" | "illumos" | "solaris", _) => Some("pthread_key"),
        _ if var("CARGO_CFG_TARGET_VENDOR") == "apple" => Some("pthread_key"),
        ("windows", "msvc") => Some("fls"),
        _ => None,
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
