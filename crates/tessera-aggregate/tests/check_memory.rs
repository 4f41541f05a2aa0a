//! Checking a submission on arrival holds a bounded scratch, whatever the model's largest
//! tensor: before, each core decoded a whole tensor at once (cores × largest tensor × 4 bytes
//! for every submission checked, far beyond an int8 or top-k body). Alone in its test binary:
//! it counts this process's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use tessera_aggregate::{CHECK_CHUNK, DELTA_ABS_MAX, check_view};
use tessera_protocol::Codec;
use tessera_protocol::pseudograd::{MessageView, PseudoGradient};

struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let held = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(held, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn checking_a_submission_holds_a_bounded_scratch() {
    let n = 8 << 20; // one 8M-value tensor: 32 MiB decoded, 8.5 MiB as int8
    let values: Vec<f32> = (0..n).map(|i| ((i % 255) as f32 - 127.0) / 1024.0).collect();
    for codec in [Codec::Int8 { block: 64 }, Codec::TopK { chunk: 256, k: 8 }, Codec::Bf16] {
        let message = PseudoGradient::build(codec, [0; 16], 0, [0; 32], [("emb", &[n as u64][..], &values[..])])
            .unwrap()
            .to_bytes();
        let view = MessageView::parse(&message).unwrap();
        let before = HELD.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        check_view(&[n], &view).unwrap();
        let scratch = PEAK.load(Ordering::Relaxed) - before;
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        // The bound: one chunk (of whole blocks) per core, plus threads' own small allocations.
        let bound = cores * (CHECK_CHUNK + 256) * 4 + (1 << 20);
        assert!(scratch <= bound, "{codec}: checking held {scratch} bytes beyond the message (bound {bound})");
        // A value out of range in the last chunk is still found.
        let mut bad = values.clone();
        bad[n - 3] = DELTA_ABS_MAX * 1e3;
        let bytes =
            PseudoGradient::build(codec, [0; 16], 0, [0; 32], [("emb", &[n as u64][..], &bad[..])]).unwrap().to_bytes();
        let err = check_view(&[n], &MessageView::parse(&bytes).unwrap()).unwrap_err().to_string();
        // (top-k gives the chunk's kept values one shared magnitude, so an earlier one may be
        // the first found.)
        assert!(err.contains("beyond"), "{codec}: {err}");
    }
}
