//! The `#[global_allocator]` of a benchmark whose contenders are global
//! allocators: `Dispatch`, forwarding every call through the including
//! file's `dispatch!(method(args))`, which picks the process's contender.

/// Declares `Dispatch` and makes it the global allocator.
macro_rules! dispatching_global_allocator {
    () => {
        /// Forwards to the chosen allocator (see `dispatch!`).
        struct Dispatch;

        // SAFETY: forwards each call, with its contract, to one allocator
        // that never changes after the first allocation.
        unsafe impl GlobalAlloc for Dispatch {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                // SAFETY: forwarded contract.
                unsafe { dispatch!(alloc(layout)) }
            }
            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                // SAFETY: forwarded contract.
                unsafe { dispatch!(alloc_zeroed(layout)) }
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                // SAFETY: forwarded contract.
                unsafe { dispatch!(dealloc(ptr, layout)) }
            }
            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                // SAFETY: forwarded contract.
                unsafe { dispatch!(realloc(ptr, layout, new_size)) }
            }
        }

        #[global_allocator]
        static GLOBAL: Dispatch = Dispatch;
    };
}
pub(crate) use dispatching_global_allocator;
