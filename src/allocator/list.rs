//! Intrusive doubly linked lists with a head pointer and null ends: the
//! class lists of used pools, the usable arenas, and the debug feature's
//! live large blocks all link this way.

use core::ptr;

/// A node type with `prev` and `next` fields of its own type.
pub(crate) trait Links: Sized {
    /// Where `node` keeps its `prev` and `next` pointers.
    ///
    /// # Safety
    /// `node` points to a live node.
    unsafe fn links(node: *mut Self) -> (*mut *mut Self, *mut *mut Self);
}

/// Links `node` right after `after`, or first when `after` is null.
///
/// # Safety
/// `node`, `after` (unless null) and every node on the list are live;
/// `after` is on the list and `node` is not.
pub(crate) unsafe fn insert_after<T: Links>(head: &mut *mut T, after: *mut T, node: *mut T) {
    // SAFETY: per the contract every pointer dereferenced is a live node.
    unsafe {
        let next = if after.is_null() {
            *head
        } else {
            *T::links(after).1
        };
        let (prev_of_node, next_of_node) = T::links(node);
        *prev_of_node = after;
        *next_of_node = next;
        if after.is_null() {
            *head = node;
        } else {
            *T::links(after).1 = node;
        }
        if !next.is_null() {
            *T::links(next).0 = node;
        }
    }
}

/// Links `node` first.
///
/// # Safety
/// As for [`insert_after`] with a null `after`.
pub(crate) unsafe fn push_front<T: Links>(head: &mut *mut T, node: *mut T) {
    // SAFETY: forwarded contract.
    unsafe { insert_after(head, ptr::null_mut(), node) }
}

/// Unlinks `node`.
///
/// # Safety
/// `node` is on the list, and every node on it is live.
pub(crate) unsafe fn unlink<T: Links>(head: &mut *mut T, node: *mut T) {
    // SAFETY: per the contract every pointer dereferenced is a live node.
    unsafe {
        let (prev_of_node, next_of_node) = T::links(node);
        let (prev, next) = (*prev_of_node, *next_of_node);
        if prev.is_null() {
            *head = next;
        } else {
            *T::links(prev).1 = next;
        }
        if !next.is_null() {
            *T::links(next).0 = prev;
        }
    }
}

/// Implements [`Links`] for a type with `prev` and `next` fields.
macro_rules! impl_links {
    ($node:ty) => {
        impl $crate::allocator::list::Links for $node {
            unsafe fn links(node: *mut Self) -> (*mut *mut Self, *mut *mut Self) {
                // SAFETY: the caller guarantees `node` is live; only field
                // addresses are taken.
                unsafe {
                    (
                        core::ptr::addr_of_mut!((*node).prev),
                        core::ptr::addr_of_mut!((*node).next),
                    )
                }
            }
        }
    };
}
pub(crate) use impl_links;
