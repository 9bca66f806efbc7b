//! Weight bytes on transparent huge pages. Decode streams every weight once per step; with 4 KiB
//! pages that is a TLB miss every 4 KiB of each row stream, and the machines here enable huge
//! pages only where a program asks (`madvise`). A buffer aligned to 2 MiB and advised as huge
//! is backed by 2 MiB pages where the kernel can find them (and by ordinary pages otherwise);
//! a last partial 2 MiB stays on ordinary pages.

use std::alloc::{alloc, dealloc, Layout};
use std::ops::Deref;

/// The huge-page size the buffers are aligned to.
const HUGE_PAGE: usize = 2 << 20;

/// An immutable byte buffer, aligned to 2 MiB and advised for huge pages when it is at least
/// that big (smaller ones are plain allocations).
pub(crate) struct WeightBytes {
    ptr: *mut u8,
    len: usize,
    layout: Option<Layout>,
    small: Vec<u8>,
}

// SAFETY: the buffer is owned, never mutated after construction, and freed once in `drop`.
unsafe impl Send for WeightBytes {}
unsafe impl Sync for WeightBytes {}

impl WeightBytes {
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        // Exactly `len` bytes: only the whole 2 MiB pages are advised, the tail stays on small
        // pages (rounding every matrix up to 2 MiB cost a MoE's many small experts ~35 % more
        // memory, each touched huge page being zeroed and resident whole).
        let layout = Layout::from_size_align(len, HUGE_PAGE);
        let (Ok(layout), true) = (layout, len >= HUGE_PAGE) else {
            return Self::small(bytes);
        };
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc(layout) };
        if ptr.is_null() {
            return Self::small(bytes);
        }
        #[cfg(target_os = "linux")]
        // SAFETY: `ptr` starts a live allocation of `layout.size()` bytes; the advice only
        // changes how the kernel backs it.
        unsafe {
            let whole = len / HUGE_PAGE * HUGE_PAGE;
            libc::madvise(ptr as *mut libc::c_void, whole, libc::MADV_HUGEPAGE);
        }
        // SAFETY: both ranges are `len` bytes and do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, len) };
        Self {
            ptr,
            len,
            layout: Some(layout),
            small: Vec::new(),
        }
    }

    fn small(bytes: Vec<u8>) -> Self {
        Self {
            ptr: std::ptr::null_mut(),
            len: bytes.len(),
            layout: None,
            small: bytes,
        }
    }
}

impl Deref for WeightBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self.layout {
            // SAFETY: `ptr` holds `len` initialized bytes for as long as `self` lives.
            Some(_) => unsafe { std::slice::from_raw_parts(self.ptr, self.len) },
            None => &self.small,
        }
    }
}

impl Clone for WeightBytes {
    fn clone(&self) -> Self {
        Self::new(self.to_vec())
    }
}

impl Drop for WeightBytes {
    fn drop(&mut self) {
        if let Some(layout) = self.layout {
            // SAFETY: allocated in `new` with this layout, freed only here.
            unsafe { dealloc(self.ptr, layout) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_bytes_big_or_small() {
        for len in [0usize, 5, HUGE_PAGE + 3] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let w = WeightBytes::new(bytes.clone());
            assert_eq!(&w[..], &bytes[..]);
            assert_eq!(&w.clone()[..], &bytes[..]);
            if len >= HUGE_PAGE {
                assert_eq!(w.as_ptr() as usize % HUGE_PAGE, 0);
            }
        }
    }
}
