//! `fork()` while other threads allocate: the child must find every
//! allocator lock free and its heaps consistent. Eight threads allocate and
//! free in a loop (from the global allocator, a one-heap allocator, a
//! region, and short-lived allocators made and dropped) while the main
//! thread forks a hundred times; each child allocates and frees a few
//! thousand blocks of every class from each allocator, starts a thread
//! that does the same, calls `stats()`, and exits 0. A child that hangs
//! (killed after a timeout) or crashes fails the test.
#![cfg(all(unix, feature = "std", not(feature = "critical-section")))]

use pymalloc::size_class::{class_size, CLASS_COUNT};
use pymalloc::{Config, PyMalloc, Region};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: PyMalloc = PyMalloc::system();

/// One heap: a lock every thread meets.
static ONE_HEAP: PyMalloc = PyMalloc::system_with(Config::DEFAULT.with_heaps(1));

static mut REGION_MEMORY: [u8; 16 << 20] = [0; 16 << 20];
// SAFETY: the array is used by nothing but this allocator.
static REGION: PyMalloc<Region> = unsafe { PyMalloc::region(&raw mut REGION_MEMORY) };

const FORKS: usize = 100;
const THREADS: usize = 8;
const TIMEOUT: Duration = Duration::from_secs(20);

/// Allocates `count` blocks of `size` bytes from `heap`, fills each, checks
/// them all, and frees them; false if an allocation failed or a block was
/// overwritten.
fn churn(heap: &(dyn GlobalAlloc + Sync), size: usize, count: usize) -> bool {
    let layout = Layout::from_size_align(size, 8).unwrap();
    // SAFETY: non-zero size.
    let blocks: Vec<*mut u8> = (0..count).map(|_| unsafe { heap.alloc(layout) }).collect();
    let mut ok = blocks.iter().all(|b| !b.is_null());
    if ok {
        for (i, &block) in blocks.iter().enumerate() {
            // SAFETY: a live block of `size` bytes.
            unsafe { block.write_bytes(i as u8, size) };
        }
        for (i, &block) in blocks.iter().enumerate() {
            // SAFETY: as above.
            let bytes = unsafe { std::slice::from_raw_parts(block, size) };
            ok &= bytes.iter().all(|&b| b == i as u8);
        }
    }
    for block in blocks.into_iter().filter(|b| !b.is_null()) {
        // SAFETY: allocated above with `layout`, freed once.
        unsafe { heap.dealloc(block, layout) };
    }
    ok
}

/// What each child does: every class from every allocator, a few large
/// blocks, statistics, then the same from a new thread (whose thread-local
/// memory may be a dead thread's).
fn child_work() -> bool {
    let heaps: [(&(dyn GlobalAlloc + Sync), usize); 3] =
        [(&GLOBAL, 2000), (&ONE_HEAP, 2000), (&REGION, 100)];
    let once = move || {
        let mut ok = true;
        for (heap, count) in heaps {
            for class in 0..CLASS_COUNT {
                ok &= churn(heap, class_size(class), count);
            }
            ok &= churn(heap, 4000, 20);
        }
        for stats in [GLOBAL.stats(), ONE_HEAP.stats(), REGION.stats()] {
            ok &= stats.arenas_current > 0;
        }
        ok
    };
    once() && std::thread::spawn(once).join().unwrap_or(false)
}

/// What the parent's threads do until `stop`: small and large blocks from
/// every allocator, statistics, and allocators made and dropped. They
/// rest while `pause` is set, so that a child on a small machine gets the
/// processor.
fn worker(seed: usize, stop: &AtomicBool, pause: &AtomicBool) {
    let mut round = seed;
    while !stop.load(Ordering::Relaxed) {
        if pause.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        round = round
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        let size = 1 + (round >> 33) % 700;
        assert!(churn(&GLOBAL, size, 64));
        assert!(churn(&ONE_HEAP, size, 64));
        assert!(churn(&REGION, size, 8));
        if round % 16 == 0 {
            ONE_HEAP.stats();
            REGION.stats();
        }
        if round % 64 == 1 {
            let local = PyMalloc::system_with(Config::new(4096, 4).with_heaps(2));
            assert!(churn(&local, size, 32));
        }
    }
}

/// How a child ended.
enum End {
    Exited(i32),
    Signalled,
    Hung,
}

fn wait_for(pid: libc::pid_t) -> End {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out pointer.
        let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(got >= 0, "waitpid failed");
        if got == pid {
            return if libc::WIFEXITED(status) {
                End::Exited(libc::WEXITSTATUS(status))
            } else {
                End::Signalled
            };
        }
        if start.elapsed() > TIMEOUT {
            // SAFETY: as above; then reap it.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return End::Hung;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn children_of_a_busy_multithreaded_parent_allocate_and_exit() {
    let (stop, pause) = (AtomicBool::new(false), AtomicBool::new(false));
    let started = Instant::now();
    let (mut hung, mut crashed, mut failed) = (0, 0, 0);
    std::thread::scope(|scope| {
        for seed in 0..THREADS {
            let (stop, pause) = (&stop, &pause);
            scope.spawn(move || worker(seed, stop, pause));
        }
        for _ in 0..FORKS {
            pause.store(false, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
            // SAFETY: the child only allocates, spawns a thread and exits
            // with `_exit`, never returning into the test harness.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                let ok = std::panic::catch_unwind(child_work).unwrap_or(false);
                // SAFETY: ends the child at once, running nothing of the
                // parent's (atexit handlers, the harness).
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            pause.store(true, Ordering::Relaxed);
            match wait_for(pid) {
                End::Exited(0) => {}
                End::Exited(_) => failed += 1,
                End::Signalled => crashed += 1,
                End::Hung => hung += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    eprintln!(
        "{FORKS} forks in {:.2?}: {hung} hung, {crashed} crashed, {failed} failed",
        started.elapsed()
    );
    assert_eq!(
        (hung, crashed, failed),
        (0, 0, 0),
        "children that hung, crashed, failed"
    );
}
