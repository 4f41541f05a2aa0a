//! The ledger on a small real history: every tamper is detected and named.

use std::collections::BTreeMap;

use tessera_trust::ledger::{Body, Ledger, LedgerError, decode_entry, encode_entry, verify_proof};
use tessera_trust::{AttestationPolicy, Evidence, Identity, OpeningKey, ValidatorAttestation, report_data};

struct World {
    hub: Identity,
    validator: Identity,
    contributors: Vec<Identity>,
    ledger: Ledger,
}

fn attestation(signing: &Identity) -> ValidatorAttestation {
    let sealing = OpeningKey::generate().unwrap();
    let data = report_data(&sealing.public().0, &signing.public().0);
    ValidatorAttestation {
        sealing_key: hex::encode(sealing.public().0),
        signing_key: signing.public().hex(),
        evidence: Evidence::insecure_dev(&data, "dev"),
    }
}

fn receipt(c: &Identity, units: u64, score: f64) -> Body {
    Body::Receipt {
        contributor: c.public().hex(),
        submission: hex::encode(blake3::hash(&units.to_le_bytes()).as_bytes()),
        score,
        data_fit: Some(0.01),
        flag: String::new(),
        units,
    }
}

/// Genesis, a validator, two scored rounds, an epoch of usage and payouts; each block ends in a
/// signed root.
fn world() -> World {
    let (hub, validator) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let contributors: Vec<Identity> = (0..3).map(|_| Identity::generate().unwrap()).collect();
    let mut l = Ledger::default();
    let policy = AttestationPolicy { allow_insecure_dev: true, ..Default::default() };
    l.append(0, 1, false, Body::Genesis { run_id: "run".into(), policy }, &hub).unwrap();
    l.append(0, 2, true, Body::Validator { attestation: attestation(&validator) }, &validator).unwrap();
    for round in 0..2u64 {
        let split = [(0, 600), (1, 300), (2, 100)];
        for (c, units) in split {
            l.append(round, 10, true, receipt(&contributors[c], units + round, 0.1), &validator).unwrap();
        }
        l.append(round, 11, true, Body::Emission { units: 1000 + 3 * round }, &validator).unwrap();
        let root = Body::Root { size: l.len(), root: l.root() };
        l.append(round, 12, true, root, &validator).unwrap();
    }
    l.append(2, 20, false, usage(500), &hub).unwrap();
    for (c, amount) in [(0, 300), (1, 200)] {
        l.append(2, 21, false, Body::Payout { epoch: 0, holder: contributors[c].public().hex(), amount }, &hub)
            .unwrap();
    }
    let root = Body::Root { size: l.len(), root: l.root() };
    l.append(2, 22, true, root, &validator).unwrap();
    World { hub, validator, contributors, ledger: l }
}

fn usage(revenue: u64) -> Body {
    Body::Usage { epoch: 0, account: "key-1".into(), prompt_tokens: 10, completion_tokens: 20, revenue }
}

/// The entries' byte ranges.
fn spans(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let (_, n) = decode_entry(&bytes[at..]).unwrap();
        out.push((at, at + n));
        at += n;
    }
    out
}

#[test]
fn an_honest_ledger_verifies_and_recomputes_every_balance() {
    let w = world();
    let l = Ledger::from_bytes(w.ledger.bytes()).unwrap();
    assert_eq!(l.len(), 16);
    let units: BTreeMap<String, u64> =
        [(0, 1201), (1, 601), (2, 201)].into_iter().map(|(c, u)| (w.contributors[c].public().hex(), u)).collect();
    assert_eq!(l.units, units);
    assert_eq!(l.payouts.values().sum::<u64>(), 500);
    let v: Vec<_> = l.validators().collect();
    assert_eq!(v.len(), 1);
    assert!(v[0].insecure, "the development attester is on the record as insecure");
    assert_eq!(l.hub(), Some(w.hub.public()));
    // Every entry has an inclusion proof under a root the validator signed.
    for seq in 0..l.len() - 1 {
        let p = l.prove(seq).unwrap();
        assert_eq!(verify_proof(&p, &w.validator.public()).unwrap().seq, seq);
        let mut bad = p.clone();
        let mut raw = hex::decode(&bad.entry).unwrap();
        let last = raw.len() - 70;
        raw[last] ^= 1;
        bad.entry = hex::encode(raw);
        assert!(verify_proof(&bad, &w.validator.public()).is_err());
        assert!(verify_proof(&p, &w.hub.public()).is_err(), "only the validator's root counts");
    }
}

#[test]
fn every_flipped_byte_is_detected_and_named() {
    let bytes = world().ledger.bytes().to_vec();
    let mut names = BTreeMap::<&str, usize>::new();
    for i in 0..bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut t = bytes.clone();
            t[i] ^= bit;
            match Ledger::from_bytes(&t) {
                Ok(_) => panic!("flipping bit {bit:#x} of byte {i} went unnoticed"),
                Err(e) => *names.entry(e.name()).or_default() += 1,
            }
        }
    }
    // The signature catches most; malformed framing, the chain and the rest name themselves.
    assert!(names.contains_key("bad-signature") && names.contains_key("malformed"), "{names:?}");
}

#[test]
fn deleted_reordered_truncated_and_forged_entries_are_detected() {
    let w = world();
    let bytes = w.ledger.bytes().to_vec();
    let s = spans(&bytes);
    let without = |skip: usize| -> Vec<u8> {
        s.iter().enumerate().filter(|(i, _)| *i != skip).flat_map(|(_, &(a, b))| bytes[a..b].to_vec()).collect()
    };
    for k in 0..s.len() {
        let e = Ledger::from_bytes(&without(k)).unwrap_err();
        let expected = if k + 1 == s.len() { "uncommitted" } else { "out-of-order" };
        assert_eq!(e.name(), expected, "deleting entry {k}: {e}");
    }
    for k in 0..s.len() - 1 {
        let mut order: Vec<usize> = (0..s.len()).collect();
        order.swap(k, k + 1);
        let t: Vec<u8> = order.iter().flat_map(|&i| bytes[s[i].0..s[i].1].to_vec()).collect();
        assert_eq!(Ledger::from_bytes(&t).unwrap_err().name(), "out-of-order", "swapping {k} and {}", k + 1);
    }
    // A receipt forged by the hub (or anyone but the attested validator), chained correctly.
    let mut l = w.ledger.clone();
    let forged = l.append(3, 30, true, receipt(&w.contributors[0], 1_000_000, 9.0), &w.hub).unwrap_err();
    assert_eq!(forged.name(), "unknown-signer", "{forged}");
    // A receipt the validator signs without its insecure flag.
    let hidden = l.append(3, 30, false, receipt(&w.contributors[0], 1, 0.1), &w.validator).unwrap_err();
    assert_eq!(hidden.name(), "hidden-insecurity");
    // Paying out more than the epoch earned; emitting less than the receipts pay.
    assert_eq!(
        l.append(3, 30, false, Body::Payout { epoch: 0, holder: "x".into(), amount: 1 }, &w.hub).unwrap_err().name(),
        "overpaid"
    );
    l.append(3, 30, true, receipt(&w.contributors[1], 5, 0.1), &w.validator).unwrap();
    let e = l.append(3, 31, true, Body::Emission { units: 6 }, &w.validator).unwrap_err();
    assert!(matches!(e, LedgerError::Unbalanced { round: 3, receipts: 5, emitted: 6 }), "{e}");
    let root = Body::Root { size: l.len(), root: l.root() };
    assert_eq!(l.append(3, 32, true, root, &w.validator).unwrap_err().name(), "unbalanced");
    // A root over other entries; a second genesis; an unattested validator.
    let mut l = w.ledger.clone();
    assert_eq!(
        l.append(3, 30, true, Body::Root { size: 3, root: l.root() }, &w.validator).unwrap_err().name(),
        "bad-root"
    );
    let genesis = Body::Genesis { run_id: "again".into(), policy: AttestationPolicy::default() };
    assert_eq!(l.append(3, 30, false, genesis, &w.hub).unwrap_err().name(), "genesis");
    let rogue = Identity::generate().unwrap();
    let mut att = attestation(&rogue);
    att.sealing_key = hex::encode(OpeningKey::generate().unwrap().public().0);
    assert_eq!(
        l.append(3, 30, true, Body::Validator { attestation: att }, &rogue).unwrap_err().name(),
        "bad-attestation"
    );
    // Entries are appended whole or not at all.
    let before = l.len();
    let good = encode_entry(before, 3, 30, &l.head(), false, &usage(1), &w.hub).unwrap();
    let mut batch = good.clone();
    batch.extend_from_slice(&good);
    assert!(l.extend(&batch).is_err());
    assert_eq!(l.len(), before);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

    #[test]
    fn hostile_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
        let _ = decode_entry(&bytes);
        proptest::prop_assert!(Ledger::from_bytes(&bytes).is_err());
    }

    #[test]
    fn spliced_ledgers_never_panic(cut in 0usize..4000, len in 0usize..64, byte in proptest::prelude::any::<u8>()) {
        let bytes = world().ledger.bytes().to_vec();
        let at = cut % bytes.len();
        let mut t = bytes[..at].to_vec();
        t.extend(std::iter::repeat_n(byte, len));
        t.extend_from_slice(&bytes[at..]);
        if len > 0 {
            proptest::prop_assert!(Ledger::from_bytes(&t).is_err());
        }
    }
}
