//! Size classes: which block size serves a request.
//!
//! Requests of 1..=512 bytes fall into 64 classes 8 bytes apart
//! (8, 16, …, 512), as in CPython's classic obmalloc. Alignment is folded into
//! the size: a request aligned to `a > 8` is rounded up to a multiple of `a`,
//! and every block of a class is aligned to the largest power of two that
//! divides the class size (each pool places its first block
//! accordingly). So `(24, 8)` → 24-byte blocks, `(24, 16)` → 32-byte
//! blocks (16-aligned), `(1, 256)` → 256-byte blocks (256-aligned).
//!
//! Why 8-byte steps and not CPython ≥ 3.8's 16: Rust hands every request its
//! real alignment, so the 16-byte rounding that C's `malloc` contract forces
//! on CPython is only paid by requests that ask for it; an 8-aligned
//! 24-byte request keeps its 24-byte block instead of taking 32.

use static_assertions::const_assert;

/// Largest request (size, and alignment) served from pools.
pub const SMALL_REQUEST_THRESHOLD: usize = 512;

/// Distance between consecutive class sizes.
pub const CLASS_STEP: usize = 8;

/// Number of size classes.
pub const CLASS_COUNT: usize = SMALL_REQUEST_THRESHOLD / CLASS_STEP;

const_assert!(CLASS_STEP.is_power_of_two());
const_assert!(SMALL_REQUEST_THRESHOLD == super::config::MAX_POOL_LIMIT);
const_assert!(SMALL_REQUEST_THRESHOLD.is_power_of_two());
const_assert!(SMALL_REQUEST_THRESHOLD % CLASS_STEP == 0);
// A free block stores the free-list link in place, so it must hold an
// aligned pointer.
const_assert!(CLASS_STEP >= core::mem::size_of::<usize>());
const_assert!(CLASS_STEP >= core::mem::align_of::<usize>());

/// The class serving `size` bytes aligned to `align` (a power of two), or
/// `None` when the request goes to the large-object fallback.
#[inline]
pub const fn class_for(size: usize, align: usize) -> Option<usize> {
    if size > SMALL_REQUEST_THRESHOLD || align > SMALL_REQUEST_THRESHOLD {
        return None;
    }
    if align <= CLASS_STEP {
        // Every class is aligned to the step: the common case needs no
        // rounding. (Zero-size requests still get a distinct block.)
        return Some(size.saturating_sub(1) / CLASS_STEP);
    }
    let step = if align > CLASS_STEP {
        align
    } else {
        CLASS_STEP
    };
    // Zero-size requests still get a distinct block.
    let size = if size == 0 { 1 } else { size };
    let rounded = (size + step - 1) & !(step - 1);
    if rounded > SMALL_REQUEST_THRESHOLD {
        None
    } else {
        Some(rounded / CLASS_STEP - 1)
    }
}

/// Largest request (size, and alignment) the medium tier serves.
pub const MEDIUM_LIMIT: usize = 64 * 1024;

/// Medium classes per power of two.
const MEDIUM_STEPS: usize = 4;

/// Number of medium classes: four for each power of two from 1 KiB to
/// [`MEDIUM_LIMIT`].
pub const MEDIUM_CLASS_COUNT: usize = MEDIUM_STEPS
    * (MEDIUM_LIMIT.trailing_zeros() - SMALL_REQUEST_THRESHOLD.trailing_zeros()) as usize;

/// Small and medium classes: medium class numbers follow the small ones.
pub const ALL_CLASS_COUNT: usize = CLASS_COUNT + MEDIUM_CLASS_COUNT;

/// The medium class serving `size` bytes aligned to `align`, or `None`
/// when it is small or too large for the tier. Out of the small path:
/// only requests `class_for` turned down come here.
#[inline]
pub const fn medium_class_for(size: usize, align: usize) -> Option<usize> {
    if align > MEDIUM_LIMIT {
        return None;
    }
    // A size rounded up to `align` lands in a class whose alignment is at
    // least `align` (between 2^e and 2^(e+1) the multiples of 2^(e-1) are
    // class sizes, and the steps are 2^(e-2)), so rounding is enough; a
    // small size reaching here is over-aligned, and takes the smallest
    // medium class so aligned.
    let size = if size <= SMALL_REQUEST_THRESHOLD {
        SMALL_REQUEST_THRESHOLD + 1
    } else {
        size
    };
    let size = (size + align - 1) & !(align - 1);
    if size > MEDIUM_LIMIT {
        return None;
    }
    // 2^e < size <= 2^(e+1), in steps of 2^(e-2).
    let e = (usize::BITS - 1 - (size - 1).leading_zeros()) as usize;
    let step = 1 << (e - 2);
    let steps = (size - (1 << e)).div_ceil(step);
    let group = e - SMALL_REQUEST_THRESHOLD.trailing_zeros() as usize;
    Some(CLASS_COUNT + group * MEDIUM_STEPS + steps - 1)
}

/// Whether `class` is a medium class.
#[inline]
pub const fn is_medium(class: usize) -> bool {
    class >= CLASS_COUNT
}

/// Bytes in each block of `class`.
#[inline]
pub const fn class_size(class: usize) -> usize {
    if !is_medium(class) {
        return (class + 1) * CLASS_STEP;
    }
    let medium = class - CLASS_COUNT;
    let base = SMALL_REQUEST_THRESHOLD << (medium / MEDIUM_STEPS);
    base + (medium % MEDIUM_STEPS + 1) * (base / MEDIUM_STEPS)
}

/// Alignment every block of `class` has: the largest power of two dividing
/// its size.
#[inline]
pub const fn class_alignment(class: usize) -> usize {
    let size = class_size(class);
    size & size.wrapping_neg()
}

const_assert!(class_size(CLASS_COUNT - 1) == SMALL_REQUEST_THRESHOLD);
const_assert!(class_alignment(CLASS_COUNT - 1) == SMALL_REQUEST_THRESHOLD);
const_assert!(class_size(CLASS_COUNT) == 640);
const_assert!(class_size(ALL_CLASS_COUNT - 1) == MEDIUM_LIMIT);

#[cfg(test)]
mod tests {
    use super::*;

    fn round_up(n: usize, to: usize) -> usize {
        n.div_ceil(to) * to
    }

    #[test]
    fn every_size_and_alignment_gets_the_smallest_fitting_aligned_class() {
        for size in 0..=SMALL_REQUEST_THRESHOLD + 64 {
            let mut align = 1;
            while align <= 4096 {
                let step = align.max(CLASS_STEP);
                let want = round_up(size.max(1), step);
                match class_for(size, align) {
                    Some(class) => {
                        assert!(align <= SMALL_REQUEST_THRESHOLD);
                        assert_eq!(class_size(class), want, "size {size} align {align}");
                        assert!(class_size(class) >= size.max(1));
                        assert_eq!(class_alignment(class) % align, 0);
                        assert!(class < CLASS_COUNT);
                    }
                    None => assert!(want > SMALL_REQUEST_THRESHOLD, "size {size} align {align}"),
                }
                align *= 2;
            }
        }
    }

    #[test]
    fn classes_are_eight_bytes_apart_up_to_512() {
        assert_eq!(CLASS_COUNT, 64);
        for class in 0..CLASS_COUNT {
            assert_eq!(class_size(class), 8 * (class + 1));
            assert_eq!(class_for(class_size(class), 1), Some(class));
        }
        assert_eq!(class_for(513, 1), None);
        assert_eq!(class_for(8, 1024), None);
    }

    #[test]
    fn medium_classes_are_the_smallest_fitting_aligned_and_waste_under_a_quarter() {
        let sizes: std::vec::Vec<usize> = (CLASS_COUNT..ALL_CLASS_COUNT).map(class_size).collect();
        assert!(sizes.is_sorted() && sizes.len() == 28, "{sizes:?}");
        for size in SMALL_REQUEST_THRESHOLD - 64..=MEDIUM_LIMIT + 64 {
            let mut align = 1;
            while align <= 2 * MEDIUM_LIMIT {
                let fits = |c: usize| class_size(c) >= size.max(1) && class_alignment(c) >= align;
                let best = (CLASS_COUNT..ALL_CLASS_COUNT).find(|&c| fits(c));
                if class_for(size, align).is_none() {
                    assert_eq!(
                        medium_class_for(size, align),
                        best,
                        "size {size} align {align}"
                    );
                }
                if let (Some(c), 1, true) = (best, align, size > SMALL_REQUEST_THRESHOLD) {
                    assert!(
                        (class_size(c) - size) * 4 < size,
                        "size {size}: {}",
                        class_size(c)
                    );
                }
                align *= 2;
            }
        }
        assert_eq!(medium_class_for(1, 4096).map(class_size), Some(4096));
        assert_eq!(medium_class_for(MEDIUM_LIMIT + 1, 1), None);
    }
}
