//! The batch limit holds while decoding: a body of millions of tiny elements costs no more than
//! the limit's worth of them, measured by a counting allocator (peak bytes live at once).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use tally_schemas::event::{BatchError, decode_batch, split_batch};
use tally_schemas::{Catalog, TimePolicy};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated at the peak of `f`, beyond what was live before it.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - before)
}

#[test]
fn memory_batch_limit_is_enforced_while_decoding() {
    // 16 MiB of `[0,0,...]`: 8 million elements, none an event.
    let n = 8 * 1024 * 1024 - 1;
    let mut body = String::with_capacity(2 * n + 2);
    body.push('[');
    for i in 0..n {
        if i > 0 {
            body.push(',');
        }
        body.push('0');
    }
    body.push(']');
    let (catalog, policy) = (Catalog::builtin(), TimePolicy::default());
    let (got, peak) = peak_of(|| decode_batch(&body, &catalog, &policy, 0, 50_000));
    assert_eq!(got.unwrap_err(), BatchError::TooMany(n));
    // 50,000 results at most: a few MiB, not the gigabytes of 8 million.
    assert!(peak < 16 << 20, "decoding took {} MiB", peak >> 20);
    let (got, peak) = peak_of(|| split_batch(&body, 50_000).map(|v| v.len()));
    assert_eq!(got, Err(BatchError::TooMany(n)));
    assert!(peak < 4 << 20, "splitting took {} MiB", peak >> 20);
    // Under the limit, every element is there.
    let small = format!("[{}]", vec!["0"; 1000].join(","));
    let got = decode_batch(&small, &catalog, &policy, 0, 1000).unwrap();
    assert_eq!(got.len(), 1000);
    assert!(
        got.iter()
            .all(|r| r.as_ref().is_err_and(|e| e.code() == "not_an_object"))
    );
    assert_eq!(
        decode_batch(&small, &catalog, &policy, 0, 999).unwrap_err(),
        BatchError::TooMany(1000)
    );
}
