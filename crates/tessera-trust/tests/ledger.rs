//! The ledger on a small real history: every tamper is detected and named.

use std::collections::BTreeMap;

use tessera_trust::ledger::{Body, Ledger, LedgerError, decode_entry, encode_entry, split_pro_rata, verify_proof};
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

/// Genesis, a backer's allocation, a validator, two scored rounds, an epoch of usage closed
/// with its payouts; each block ends in a signed root.
fn world() -> World {
    let (hub, validator) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let contributors: Vec<Identity> = (0..3).map(|_| Identity::generate().unwrap()).collect();
    let mut l = opened(&hub);
    l.append(0, 1, false, Body::Allocation { holder: "backer".into(), amount: 2000 }, &hub).unwrap();
    l.append(0, 1, false, Body::Funding { ppm: 200_000 }, &hub).unwrap();
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
    close_epoch(&mut l, &hub, 0, 200_000);
    let root = Body::Root { size: l.len(), root: l.root() };
    l.append(2, 22, true, root, &validator).unwrap();
    World { hub, validator, contributors, ledger: l }
}

/// Closes `epoch` with the funding share `ppm` and writes its payouts, as the hub does.
fn close_epoch(l: &mut Ledger, hub: &Identity, epoch: u64, ppm: u32) {
    let revenue = l.usage.get(&epoch).map_or(0, |u| u.values().map(|r| r.2).sum());
    let (funding, payable) = tessera_trust::ledger::epoch_split(revenue, ppm, &l.balances());
    let close = Body::EpochClose { epoch, revenue, funding_ppm: ppm, funding, payable };
    l.append(2, 21, false, close, hub).unwrap();
    for (holder, amount) in split_pro_rata(payable, &l.balances()) {
        l.append(2, 21, false, Body::Payout { epoch, holder, amount }, hub).unwrap();
    }
}

/// A ledger holding only its genesis, by `hub`, for a run that allows the development attester.
fn opened(hub: &Identity) -> Ledger {
    let mut l = Ledger::default();
    let policy = AttestationPolicy { allow_insecure_dev: true, ..Default::default() };
    l.append(0, 1, false, Body::Genesis { run_id: "run".into(), policy }, hub).unwrap();
    l
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
    assert_eq!(l.len(), 21);
    let units: BTreeMap<String, u64> =
        [(0, 1201), (1, 601), (2, 201)].into_iter().map(|(c, u)| (w.contributors[c].public().hex(), u)).collect();
    assert_eq!(l.units, units);
    // 500 of revenue, 20% (100) funds the next phase, 400 goes to balances of 2000 + 2003:
    // exact shares 199.85, 120.01, 60.05, 20.09; the one unit left goes to the largest remainder.
    let epoch = &l.epochs[&0];
    assert_eq!((epoch.revenue, epoch.funding, epoch.payable, epoch.balance_total), (500, 100, 400, 4003));
    assert_eq!(l.payouts["backer"], 200);
    assert_eq!(l.payouts[&w.contributors[0].public().hex()], 120);
    assert_eq!(l.payouts[&w.contributors[1].public().hex()], 60);
    assert_eq!(l.payouts[&w.contributors[2].public().hex()], 20);
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

/// Receipts are a validator's numbers: units that would sum past u64 (per round or per
/// contributor) are refused with a named error, never wrapped (nor a panic in a debug build).
#[test]
fn receipt_units_that_overflow_are_refused() {
    let (hub, validator, c) =
        (Identity::generate().unwrap(), Identity::generate().unwrap(), Identity::generate().unwrap());
    let mut l = opened(&hub);
    l.append(0, 2, true, Body::Validator { attestation: attestation(&validator) }, &validator).unwrap();
    l.append(0, 10, true, receipt(&c, u64::MAX / 2 + 1, 0.1), &validator).unwrap();
    let e = l.append(0, 10, true, receipt(&c, u64::MAX / 2 + 1, 0.2), &validator).unwrap_err();
    assert_eq!(e.name(), "economy", "{e}");
    assert!(e.to_string().contains("receipt units"), "{e}");
    // Across rounds, per contributor.
    let mut l = opened(&hub);
    l.append(0, 2, true, Body::Validator { attestation: attestation(&validator) }, &validator).unwrap();
    for round in 0..2u64 {
        let units = u64::MAX / 2 + 1;
        let appended = l.append(round, 10, true, receipt(&c, units + round, 0.1), &validator);
        if round == 1 {
            assert!(appended.unwrap_err().to_string().contains("receipt units"));
            break;
        }
        appended.unwrap();
        l.append(round, 11, true, Body::Emission { units }, &validator).unwrap();
        let root = Body::Root { size: l.len(), root: l.root() };
        l.append(round, 12, true, root, &validator).unwrap();
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
    // Paying out what no epoch closing owes; emitting less than the receipts pay.
    assert_eq!(
        l.append(3, 30, false, Body::Payout { epoch: 0, holder: "x".into(), amount: 1 }, &w.hub).unwrap_err().name(),
        "economy"
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
    let next_epoch =
        Body::Usage { epoch: 1, account: "key-1".into(), prompt_tokens: 1, completion_tokens: 1, revenue: 1 };
    let good = encode_entry(before, 3, 30, &l.head(), false, &next_epoch, &w.hub).unwrap();
    l.clone().extend(&good).unwrap();
    let mut batch = good.clone();
    batch.extend_from_slice(&good);
    assert!(l.extend(&batch).is_err());
    assert_eq!(l.len(), before);
}

/// The hub cannot dilute holders after the run began, nor change the funding share it fixed:
/// allocations and the share belong to the run's opening entries.
#[test]
fn allocations_and_the_funding_share_are_fixed_at_genesis() {
    let w = world();
    let late: Vec<(&str, Vec<Body>)> = vec![
        ("an allocation after the opening", vec![Body::Allocation { holder: "friend".into(), amount: 1_000_000 }]),
        ("a second funding share", vec![Body::Funding { ppm: 0 }]),
        ("an epoch closed at another share", {
            let revenue = 1000;
            let (funding, payable) = tessera_trust::ledger::epoch_split(revenue, 0, &w.ledger.balances());
            let usage = Body::Usage { epoch: 1, account: "a".into(), prompt_tokens: 1, completion_tokens: 1, revenue };
            vec![usage, Body::EpochClose { epoch: 1, revenue, funding_ppm: 0, funding, payable }]
        }),
    ];
    for (what, bodies) in late {
        let mut l = w.ledger.clone();
        let refused = bodies.into_iter().any(|b| l.append(3, 40, false, b, &w.hub).is_err());
        assert!(refused, "{what} was accepted");
    }
    // A run whose opening fixed no share cannot close an epoch at all.
    let mut l = Ledger::default();
    let policy = tessera_trust::AttestationPolicy::default();
    l.append(0, 1, false, Body::Genesis { run_id: "run".into(), policy }, &w.hub).unwrap();
    l.append(0, 1, false, Body::Allocation { holder: "backer".into(), amount: 10 }, &w.hub).unwrap();
    l.append(0, 2, false, usage(100), &w.hub).unwrap();
    let close = Body::EpochClose { epoch: 0, revenue: 100, funding_ppm: 0, funding: 0, payable: 100 };
    assert!(l.append(0, 3, false, close, &w.hub).is_err());
}

/// Even the hub cannot pay out other than the ledger's own arithmetic, or bill a closed epoch.
#[test]
fn payouts_must_be_exactly_the_pro_rata_split() {
    let w = world();
    let mut base = Ledger::default();
    let s = spans(w.ledger.bytes());
    // Everything up to the usage entry, then the hub's own (re-signed) variations.
    let usage_end = s[s.len() - 7].1;
    base.extend(&w.ledger.bytes()[..usage_end]).unwrap();
    let balances = base.balances();
    let good = Body::EpochClose { epoch: 0, revenue: 500, funding_ppm: 200_000, funding: 100, payable: 400 };
    let cases: Vec<(&str, Vec<Body>)> = vec![
        (
            "funding not the stated share",
            vec![Body::EpochClose { epoch: 0, revenue: 500, funding_ppm: 200_000, funding: 50, payable: 450 }],
        ),
        (
            "revenue not the usage's",
            vec![Body::EpochClose { epoch: 0, revenue: 600, funding_ppm: 200_000, funding: 120, payable: 480 }],
        ),
        ("a share moved between holders", {
            let mut v = vec![good.clone()];
            let split = split_pro_rata(400, &balances);
            for (i, (holder, amount)) in split.into_iter().enumerate() {
                let amount = if i == 0 {
                    amount + 1
                } else if i == 1 {
                    amount - 1
                } else {
                    amount
                };
                v.push(Body::Payout { epoch: 0, holder, amount });
            }
            v
        }),
        (
            "a payout to someone else",
            vec![good.clone(), Body::Payout { epoch: 0, holder: "hub-friend".into(), amount: 200 }],
        ),
        ("something before the payouts", vec![good.clone(), usage(1)]),
        ("usage after the close", {
            let mut v = vec![good.clone()];
            v.extend(split_pro_rata(400, &balances).into_iter().map(|(holder, amount)| Body::Payout {
                epoch: 0,
                holder,
                amount,
            }));
            v.push(usage(10));
            v
        }),
        ("a payout no closing owes", vec![Body::Payout { epoch: 0, holder: "backer".into(), amount: 1 }]),
    ];
    for (what, bodies) in cases {
        let mut l = base.clone();
        let refused = bodies.into_iter().any(|b| l.append(2, 30, false, b, &w.hub).is_err());
        assert!(refused, "{what} was accepted");
    }
    // The honest closing is accepted, and a root the hub signs commits it.
    let mut l = base.clone();
    close_epoch(&mut l, &w.hub, 0, 200_000);
    let root = Body::Root { size: l.len(), root: l.root() };
    l.append(2, 31, false, root, &w.hub).unwrap();
    assert_eq!(Ledger::from_bytes(l.bytes()).unwrap().payouts.values().sum::<u64>(), 400);
}

proptest::proptest! {
    /// Largest remainder: the parts sum to the amount exactly, each within one unit of its
    /// exact share, and a larger balance never gets less.
    #[test]
    fn pro_rata_split_is_exact(amount in 0u64..u64::MAX / 2, balances in proptest::collection::btree_map("[a-z]{1,6}", 0u64..1u64 << 40, 0..12)) {
        let parts = split_pro_rata(amount, &balances);
        let total: u128 = balances.values().map(|&b| u128::from(b)).sum();
        if total == 0 {
            proptest::prop_assert!(parts.is_empty());
        } else {
            proptest::prop_assert_eq!(parts.iter().map(|p| u128::from(p.1)).sum::<u128>(), u128::from(amount));
            let got: BTreeMap<&String, u64> = parts.iter().map(|(h, a)| (h, *a)).collect();
            for (h, &b) in &balances {
                let exact = u128::from(amount) * u128::from(b);
                let a = u128::from(got.get(h).copied().unwrap_or(0));
                proptest::prop_assert!(a * total >= exact.saturating_sub(total) && a * total <= exact + total, "{} off its share", h);
            }
            for (h1, &b1) in &balances {
                for (h2, &b2) in &balances {
                    if b1 > b2 {
                        proptest::prop_assert!(got.get(h1).copied().unwrap_or(0) >= got.get(h2).copied().unwrap_or(0));
                    }
                }
            }
        }
    }
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

/// An entry is checked and appended in place (no copy of the ledger), so a refused one must
/// change nothing: after each refusal below, the honest continuation is still accepted and
/// the ledger reads as before.
#[test]
fn a_refused_entry_changes_nothing() {
    let (hub, validator, c) =
        (Identity::generate().unwrap(), Identity::generate().unwrap(), Identity::generate().unwrap());
    let mut l = opened(&hub);
    // A stranger's receipt is refused, and must not mark the opening entries as over.
    assert!(l.append(0, 2, true, receipt(&c, 5, 0.1), &c).is_err());
    l.append(0, 2, false, Body::Allocation { holder: "backer".into(), amount: u64::MAX - 1 }, &hub).unwrap();
    assert!(l.append(0, 2, false, Body::Allocation { holder: "backer".into(), amount: 2 }, &hub).is_err());
    l.append(0, 2, false, Body::Funding { ppm: 100_000 }, &hub).unwrap();
    assert_eq!(l.allocations["backer"], u64::MAX - 1);
    l.append(0, 3, true, Body::Validator { attestation: attestation(&validator) }, &validator).unwrap();
    l.append(0, 10, true, receipt(&c, 7, 0.1), &validator).unwrap();
    let before = (l.bytes().to_vec(), format!("{:?}", l.economy()));
    // An emission that does not match the receipts keeps them pending.
    assert!(l.append(0, 11, true, Body::Emission { units: 8 }, &validator).is_err());
    assert_eq!((l.bytes().to_vec(), format!("{:?}", l.economy())), before);
    l.append(0, 11, true, Body::Emission { units: 7 }, &validator).unwrap();
    // Revenue past u64 keeps the epoch's revenue as it was.
    l.append(1, 20, false, usage(u64::MAX - 10), &hub).unwrap();
    assert!(l.append(1, 20, false, usage(11), &hub).is_err());
    let revenue = u64::MAX - 10;
    let (funding, payable) = tessera_trust::ledger::epoch_split(revenue, 100_000, &l.balances());
    l.append(1, 21, false, Body::EpochClose { epoch: 0, revenue, funding_ppm: 100_000, funding, payable }, &hub)
        .unwrap();
    // A wrong payout leaves the owed payouts owed.
    let owed = split_pro_rata(payable, &l.balances());
    let (holder, amount) = owed[0].clone();
    let wrong = Body::Payout { epoch: 0, holder: holder.clone(), amount: amount + 1 };
    assert!(l.append(1, 21, false, wrong, &hub).is_err());
    for (holder, amount) in owed {
        l.append(1, 21, false, Body::Payout { epoch: 0, holder, amount }, &hub).unwrap();
    }
    let root = Body::Root { size: l.len(), root: l.root() };
    l.append(1, 22, true, root, &validator).unwrap();
    // The ledger as a verifier reads it from scratch says the same.
    let again = Ledger::from_bytes(l.bytes()).unwrap();
    assert_eq!(format!("{:?}", again.economy()), format!("{:?}", l.economy()));
    assert_eq!(again.root(), l.root());
}

/// Extending by nothing is a no-op (a hub opening a new run reads an empty ledger).
#[test]
fn extending_by_nothing_changes_nothing() {
    let mut l = Ledger::default();
    l.extend(&[]).unwrap();
    assert!(l.is_empty());
    let w = world();
    let mut m = w.ledger.clone();
    m.extend(&[]).unwrap();
    assert_eq!(m.bytes(), w.ledger.bytes());
}

/// A validator fault is the hub's record (it compared the results): counted per validator,
/// refused from anyone else, and read back as written.
#[test]
fn validator_faults_are_signed_by_the_hub_and_counted() {
    let w = world();
    let mut l = Ledger::from_bytes(w.ledger.bytes()).unwrap();
    let fault = Body::ValidatorFault {
        validator: "v2".into(),
        task: 7,
        agreed: vec!["v1".into(), "v3".into()],
        detail: "submission 3: score 0.5 against 0.01".into(),
    };
    let e = l.append(3, 30, true, fault.clone(), &w.validator).unwrap_err();
    assert_eq!(e.name(), "unknown-signer", "{e}");
    let bytes = l.append(3, 30, false, fault.clone(), &w.hub).unwrap();
    assert_eq!(decode_entry(&bytes).unwrap().0.body, fault);
    assert_eq!(l.faults.get("v2"), Some(&1));
    let root = Body::Root { size: l.len(), root: l.root() };
    l.append(3, 31, false, root, &w.hub).unwrap();
    let again = Ledger::from_bytes(l.bytes()).unwrap();
    assert_eq!(again.faults, l.faults);
}
