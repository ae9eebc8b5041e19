//! A model of what an allocator owes its caller, driven by a byte string:
//! every block aligned, no two live blocks overlapping, contents kept across
//! realloc. Shared by the model tests and the `alloc_ops` fuzz target.

use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;

/// One live block: where, its layout, and the byte its pattern starts at.
struct Block {
    layout: Layout,
    tag: u8,
}

/// Drives an allocator and checks it against the model.
pub struct Model<'a, A: GlobalAlloc> {
    alloc: &'a A,
    /// Live blocks by address.
    live: BTreeMap<usize, Block>,
    /// Whether a null answer is acceptable (a heap that can run out).
    may_run_out: bool,
    /// Allocations that returned null.
    pub nulls: usize,
}

fn pattern(tag: u8, i: usize) -> u8 {
    tag.wrapping_add((i as u8).wrapping_mul(31))
}

impl<'a, A: GlobalAlloc> Model<'a, A> {
    pub fn new(alloc: &'a A, may_run_out: bool) -> Self {
        Model {
            alloc,
            live: BTreeMap::new(),
            may_run_out,
            nulls: 0,
        }
    }

    pub fn live_blocks(&self) -> usize {
        self.live.len()
    }

    /// Checks `[addr, addr + size)` against its neighbours and alignment.
    fn check_placement(&self, addr: usize, layout: Layout) {
        assert_eq!(
            addr % layout.align(),
            0,
            "block {addr:#x} misaligned for {layout:?}"
        );
        let end = addr + layout.size().max(1);
        if let Some((&prev, block)) = self.live.range(..=addr).next_back() {
            assert!(
                prev + block.layout.size().max(1) <= addr,
                "block {addr:#x} overlaps {prev:#x}"
            );
        }
        if let Some((&next, _)) = self.live.range(addr + 1..).next() {
            assert!(
                end <= next,
                "block {addr:#x}+{} overlaps {next:#x}",
                layout.size()
            );
        }
    }

    fn verify(addr: usize, block: &Block, len: usize) {
        // SAFETY: the block is live and at least `len` bytes long.
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
        for (i, &b) in bytes.iter().enumerate() {
            assert_eq!(b, pattern(block.tag, i), "block {addr:#x} byte {i} changed");
        }
    }

    fn fill(addr: usize, tag: u8, from: usize, to: usize) {
        for i in from..to {
            // SAFETY: the block is live and `to` bytes long.
            unsafe { *(addr as *mut u8).add(i) = pattern(tag, i) };
        }
    }

    pub fn alloc(&mut self, size: usize, align: usize, tag: u8) {
        let layout = Layout::from_size_align(size, align).unwrap();
        // SAFETY: the model tests never ask for zero bytes... except on
        // purpose: the allocators under test serve zero-size layouts.
        let ptr = unsafe { self.alloc.alloc(layout) };
        if ptr.is_null() {
            assert!(self.may_run_out, "null for {layout:?}");
            self.nulls += 1;
            return;
        }
        let addr = ptr as usize;
        self.check_placement(addr, layout);
        Self::fill(addr, tag, 0, size);
        self.live.insert(addr, Block { layout, tag });
    }

    fn nth(&self, pick: usize) -> Option<usize> {
        if self.live.is_empty() {
            return None;
        }
        self.live.keys().nth(pick % self.live.len()).copied()
    }

    pub fn free(&mut self, pick: usize) {
        let Some(addr) = self.nth(pick) else { return };
        let block = self.live.remove(&addr).unwrap();
        Self::verify(addr, &block, block.layout.size());
        // SAFETY: allocated by this allocator with this layout, freed once.
        unsafe { self.alloc.dealloc(addr as *mut u8, block.layout) };
    }

    pub fn realloc(&mut self, pick: usize, new_size: usize) {
        let Some(addr) = self.nth(pick) else { return };
        let block = self.live.remove(&addr).unwrap();
        Self::verify(addr, &block, block.layout.size());
        // SAFETY: live block of this layout; new_size rounded to the
        // alignment is far below isize::MAX.
        let ptr = unsafe { self.alloc.realloc(addr as *mut u8, block.layout, new_size) };
        if ptr.is_null() {
            assert!(self.may_run_out, "realloc to {new_size} failed");
            self.nulls += 1;
            // The old block must be untouched.
            Self::verify(addr, &block, block.layout.size());
            self.live.insert(addr, block);
            return;
        }
        let layout = Layout::from_size_align(new_size, block.layout.align()).unwrap();
        let new_addr = ptr as usize;
        self.check_placement(new_addr, layout);
        let kept = block.layout.size().min(new_size);
        Self::verify(new_addr, &block, kept);
        Self::fill(new_addr, block.tag, kept, new_size);
        self.live.insert(
            new_addr,
            Block {
                layout,
                tag: block.tag,
            },
        );
    }

    /// Frees every live block, checking each.
    pub fn free_all(&mut self) {
        while !self.live.is_empty() {
            self.free(0);
        }
    }

    /// Interprets `ops` as a sequence of operations, four bytes each.
    pub fn run(&mut self, ops: &[u8]) {
        for op in ops.chunks_exact(4) {
            let (kind, a, b, c) = (op[0], op[1] as usize, op[2] as usize, op[3]);
            // Mostly small sizes, sometimes large, sometimes huge alignment.
            let size = match kind >> 5 {
                0..=4 => a * 2 + (b & 3),
                5 => a * 8 + b,
                6 => 400 + a + b,
                _ => a * 256 + b,
            };
            let align = 1usize << ((c >> 4) % 13).min(if kind & 1 == 0 { 4 } else { 12 });
            match kind % 8 {
                0..=3 => self.alloc(size, align, c),
                4 | 5 => self.free(a * 256 + b),
                _ => self.realloc(a, size),
            }
        }
    }
}
