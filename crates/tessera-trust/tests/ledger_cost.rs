//! What one append and one proof cost, as bytes allocated, on a ledger of thousands of
//! entries: before, each append copied the whole ledger (O(n) per entry, O(n²) for a run) and
//! each proof rebuilt the Merkle tree (O(n) per anonymous request). Alone in its test binary:
//! it counts this process's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use tessera_trust::ledger::{Body, Ledger};
use tessera_trust::{AttestationPolicy, Evidence, Identity, OpeningKey, ValidatorAttestation, report_data};

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED.load(Ordering::Relaxed);
    let out = f();
    (out, ALLOCATED.load(Ordering::Relaxed) - before)
}

#[test]
fn an_append_and_a_proof_cost_no_copy_of_the_ledger() {
    let (hub, validator, c) =
        (Identity::generate().unwrap(), Identity::generate().unwrap(), Identity::generate().unwrap());
    let mut l = Ledger::default();
    let policy = AttestationPolicy { allow_insecure_dev: true, ..Default::default() };
    l.append(0, 1, false, Body::Genesis { run_id: "run".into(), policy }, &hub).unwrap();
    let sealing = OpeningKey::generate().unwrap();
    let attestation = ValidatorAttestation {
        sealing_key: hex::encode(sealing.public().0),
        signing_key: validator.public().hex(),
        evidence: Evidence::insecure_dev(&report_data(&sealing.public().0, &validator.public().0), "dev"),
    };
    l.append(0, 2, true, Body::Validator { attestation }, &validator).unwrap();
    let receipt = |round: u64, i: u64| Body::Receipt {
        contributor: c.public().hex(),
        submission: hex::encode(blake3::hash(&[round.to_le_bytes(), i.to_le_bytes()].concat()).as_bytes()),
        score: 0.1,
        data_fit: None,
        flag: String::new(),
        units: 1,
    };
    for round in 0..20u64 {
        for i in 0..200 {
            l.append(round, 10, true, receipt(round, i), &validator).unwrap();
        }
        l.append(round, 11, true, Body::Emission { units: 200 }, &validator).unwrap();
        let root = Body::Root { size: l.len(), root: l.root() };
        l.append(round, 12, true, root, &validator).unwrap();
    }
    let size = l.bytes().len();
    assert!(size > 512 << 10, "a ledger of {size} bytes is too small to tell");
    // Averaged over 200 appends: a buffer that doubles now and then is amortised, a copy of
    // the ledger per append is not.
    let (_, appends) = allocated_by(|| {
        for i in 0..200 {
            l.append(20, 10, true, receipt(20, i), &validator).unwrap();
        }
    });
    let append = appends / 200;
    assert!(append < 32 << 10, "an append allocated {append} bytes on average on a ledger of {size}");
    // The first proof after a root builds its tree once; the next ones reuse it.
    let _ = l.prove(5).unwrap();
    let (proof, cost) = allocated_by(|| l.prove(3_000).unwrap());
    assert_eq!(proof.seq, 3_000);
    assert!(cost < 64 << 10, "a proof allocated {cost} bytes on a ledger of {size}");
}
