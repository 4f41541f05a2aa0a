//! Governance in the ledger: proposals and votes signed by holders, the tally a pure function of
//! the entries, applied changes recomputed from the spec; every way the hub could steer alone
//! (an unauthorised or altered change, a forged, doubled, late or post-snapshot vote, a wrong
//! tally) is refused by the verifier and named.

use tessera_protocol::api::governance::{
    Bounds, Change, Choice, GovernanceSpec, ProposalMessage, Signed, Tally, VoteMessage,
};
use tessera_protocol::api::{DataSource, DataSpec, InnerSpec, OuterSpec};
use tessera_protocol::{Codec, RunSpec, TensorSpec};
use tessera_trust::ledger::{Body, Ledger, sign_governance, spec_hash};
use tessera_trust::{AttestationPolicy, Identity};

fn spec() -> RunSpec {
    RunSpec {
        name: "steered".into(),
        model: serde_json::json!({"model_type": "llama"}),
        tensors: vec![TensorSpec { name: "w".into(), shape: vec![4, 8] }],
        data: DataSpec {
            name: "embedded".into(),
            fingerprint: "f".into(),
            source: DataSource::Embedded { seed: 1, train_chars: 100, val_chars: 10 },
            loss_floor: None,
        },
        inner: InnerSpec {
            batch_size: 2,
            seq_len: 8,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 0,
            grad_clip: 1.0,
            weight_decay: 0.1,
        },
        inner_steps: 5,
        rounds: 20,
        outer: OuterSpec { lr: 0.7, momentum: 0.9, nesterov: true },
        codec: Codec::F32,
        feedback_decay: 1.0,
        broadcast_codec: Codec::F32,
        quorum: 2,
        round_deadline_ms: 60_000,
        max_staleness: 1,
        staleness_decay: 0.5,
        seed: 7,
        aggregation: tessera_protocol::Aggregation::Mean,
        contest: None,
        trust: None,
        phases: Vec::new(),
        fragments: 0,
        until_loss: None,
        economy: None,
        governance: Some(GovernanceSpec {
            voting_rounds: 2,
            quorum_ppm: 400_000,
            threshold_ppm: 500_001,
            min_proposer_balance: 10,
            bounds: Bounds {
                inner_steps: Some([2, 50]),
                outer_lr: Some([0.1, 1.0]),
                codecs: vec!["int8:64".parse().unwrap()],
                releases: true,
                ..Bounds::default()
            },
        }),
    }
}

struct World {
    hub: Identity,
    holders: Vec<Identity>,
    ledger: Ledger,
}

/// Genesis, the spec, allocations of 100, 60 and 40 to three holders, a root.
fn world() -> World {
    let hub = Identity::generate().unwrap();
    let holders: Vec<Identity> = (0..3).map(|_| Identity::generate().unwrap()).collect();
    let mut l = Ledger::default();
    let policy = AttestationPolicy { allow_insecure_dev: true, ..Default::default() };
    l.append(0, 1, false, Body::Genesis { run_id: "run".into(), policy }, &hub).unwrap();
    l.append(0, 1, false, Body::Spec { spec: serde_json::to_string(&spec()).unwrap() }, &hub).unwrap();
    for (h, amount) in holders.iter().zip([100, 60, 40]) {
        l.append(0, 1, false, Body::Allocation { holder: h.public().hex(), amount }, &hub).unwrap();
    }
    root(&mut l, &hub, 0);
    World { hub, holders, ledger: l }
}

fn root(l: &mut Ledger, hub: &Identity, round: u64) {
    let body = Body::Root { size: l.len(), root: l.root() };
    l.append(round, 2, false, body, hub).unwrap();
}

fn attestation(signing: &Identity) -> tessera_trust::ValidatorAttestation {
    let sealing = tessera_trust::OpeningKey::generate().unwrap();
    let data = tessera_trust::report_data(&sealing.public().0, &signing.public().0);
    tessera_trust::ValidatorAttestation {
        sealing_key: hex::encode(sealing.public().0),
        signing_key: signing.public().hex(),
        evidence: tessera_trust::Evidence::insecure_dev(&data, "dev"),
    }
}

fn propose(holder: &Identity, change: Change, time_ms: i64) -> (Signed, String) {
    let m = ProposalMessage { run_id: "run".into(), title: "t".into(), change, apply_at: None, time_ms };
    let bytes = serde_json::to_vec(&m).unwrap();
    (sign_governance(holder, &bytes), blake3::hash(&bytes).to_hex().to_string())
}

fn vote(holder: &Identity, proposal: &str, choice: Choice, time_ms: i64) -> Signed {
    let m = VoteMessage { run_id: "run".into(), proposal: proposal.into(), choice, time_ms };
    sign_governance(holder, &serde_json::to_vec(&m).unwrap())
}

/// A proposal recorded at round 1 (closes at 3) with holders 0 and 2 voting yes, 1 no.
fn voted(w: &mut World, change: Change) -> String {
    let (p, id) = propose(&w.holders[0], change, 1);
    w.ledger.append(1, 3, false, Body::Proposal { signed: p }, &w.hub).unwrap();
    for (h, c) in [(0, Choice::Yes), (1, Choice::No), (2, Choice::Yes)] {
        w.ledger.append(2, 4, false, Body::Vote { signed: vote(&w.holders[h], &id, c, 10) }, &w.hub).unwrap();
    }
    id
}

fn name(r: Result<Vec<u8>, tessera_trust::ledger::LedgerError>) -> String {
    match r {
        Ok(_) => "accepted".into(),
        Err(e) => format!("{}: {e}", e.name()),
    }
}

#[test]
fn a_passed_change_is_tallied_applied_and_recomputed_by_anyone() {
    let mut w = world();
    let change = Change::OuterLr { value: 0.5 };
    let id = voted(&mut w, change.clone());
    let tally = w.ledger.proposals()[&id].tally(spec().governance.as_ref().unwrap());
    assert_eq!(tally, Tally { yes: 140, no: 60, abstain: 0, power: 200, passed: true });
    w.ledger.append(3, 5, false, Body::Outcome { proposal: id.clone(), tally }, &w.hub).unwrap();
    let next = change.apply(&spec(), 3).unwrap();
    assert_eq!(next.outer.lr, 0.5);
    let applied = Body::Applied { proposal: id.clone(), spec: spec_hash(&next), checkpoint: "ab".repeat(32) };
    w.ledger.append(3, 5, false, applied, &w.hub).unwrap();
    root(&mut w.ledger, &w.hub, 3);
    // Anyone holding the bytes gets the same spec, tally and history.
    let again = Ledger::from_bytes(w.ledger.bytes()).unwrap();
    let (s, hash) = again.spec().unwrap();
    assert_eq!((s, hash), (&next, spec_hash(&next).as_str()));
    assert_eq!(again.spec_changes(), 1);
    assert_eq!(again.proposals()[&id].outcome.map(|o| o.1), Some(tally));
    assert!(again.overdue(10).is_empty());
}

#[test]
fn a_changed_vote_replaces_the_earlier_and_a_rejected_proposal_cannot_be_applied() {
    let mut w = world();
    let id = voted(&mut w, Change::InnerSteps { value: 10 });
    let g = spec().governance.unwrap();
    // What the tally will be with a taken, not yet recorded vote: the same as once it is recorded;
    // one signed no later than the recorded vote, or by a key with no power, changes nothing.
    let h2 = w.holders[2].public().hex();
    let outsider = Identity::generate().unwrap().public().hex();
    let p = &w.ledger.proposals()[&id];
    let expected = Tally { yes: 100, no: 100, abstain: 0, power: 200, passed: false };
    assert_eq!(p.tally_with(&[(h2.as_str(), Choice::No, 11), (outsider.as_str(), Choice::Yes, 11)], &g), (expected, 3));
    assert_eq!(p.tally_with(&[(h2.as_str(), Choice::No, 10)], &g), (p.tally(&g), 3));
    // Holder 2 changes its mind before the close: its later vote replaces its yes.
    w.ledger.append(2, 6, false, Body::Vote { signed: vote(&w.holders[2], &id, Choice::No, 11) }, &w.hub).unwrap();
    let tally = w.ledger.proposals()[&id].tally(&g);
    assert_eq!(tally, Tally { yes: 100, no: 100, abstain: 0, power: 200, passed: false });
    // The hub cannot record it as passed…
    let forged = Tally { passed: true, ..tally };
    let e = name(w.ledger.append(3, 7, false, Body::Outcome { proposal: id.clone(), tally: forged }, &w.hub));
    assert!(e.starts_with("governance") && e.contains("the recorded votes give"), "{e}");
    w.ledger.append(3, 7, false, Body::Outcome { proposal: id.clone(), tally }, &w.hub).unwrap();
    // …nor apply it.
    let next = Change::InnerSteps { value: 10 }.apply(&spec(), 3).unwrap();
    let applied = Body::Applied { proposal: id.clone(), spec: spec_hash(&next), checkpoint: "ab".repeat(32) };
    let e = name(w.ledger.append(3, 8, false, applied, &w.hub));
    assert!(e.contains("was rejected: nothing authorises"), "{e}");
}

#[test]
fn every_way_of_steering_alone_is_refused_and_named() {
    let mut w = world();
    let change = Change::Codec { value: "int8:64".parse().unwrap() };
    let (p, id) = propose(&w.holders[0], change.clone(), 1);
    w.ledger.append(1, 3, false, Body::Proposal { signed: p.clone() }, &w.hub).unwrap();
    let l = &mut w.ledger;
    // A proposal recorded twice.
    assert!(name(l.append(1, 3, false, Body::Proposal { signed: p }, &w.hub)).contains("recorded already"));
    // A forged vote: a holder's signed vote with its choice altered.
    let mut forged = vote(&w.holders[1], &id, Choice::No, 10);
    let altered = serde_json::to_vec(&VoteMessage {
        run_id: "run".into(),
        proposal: id.clone(),
        choice: Choice::Yes,
        time_ms: 10,
    })
    .unwrap();
    forged.message = hex::encode(altered);
    let e = name(l.append(1, 4, false, Body::Vote { signed: forged }, &w.hub));
    assert!(e.contains("does not verify (forged or altered)"), "{e}");
    // A vote by a key that held nothing at the snapshot and earned its balance after it.
    let outsider = Identity::generate().unwrap();
    let validator = Identity::generate().unwrap();
    l.append(1, 3, true, Body::Validator { attestation: attestation(&validator) }, &validator).unwrap();
    let receipt = Body::Receipt {
        contributor: outsider.public().hex(),
        submission: "cd".repeat(32),
        score: 0.1,
        data_fit: None,
        flag: String::new(),
        units: 500,
    };
    l.append(1, 3, true, receipt, &validator).unwrap();
    l.append(1, 3, true, Body::Emission { units: 500 }, &validator).unwrap();
    assert_eq!(l.balances()[&outsider.public().hex()], 500);
    let e = name(l.append(1, 4, false, Body::Vote { signed: vote(&outsider, &id, Choice::Yes, 10) }, &w.hub));
    assert!(e.contains("held nothing at proposal") && e.contains("balances after it do not vote"), "{e}");
    // A double vote, and a replay of an earlier one after a change.
    l.append(1, 4, false, Body::Vote { signed: vote(&w.holders[1], &id, Choice::Yes, 10) }, &w.hub).unwrap();
    let e = name(l.append(1, 4, false, Body::Vote { signed: vote(&w.holders[1], &id, Choice::Yes, 10) }, &w.hub));
    assert!(e.contains("double or replayed vote"), "{e}");
    l.append(1, 4, false, Body::Vote { signed: vote(&w.holders[1], &id, Choice::No, 20) }, &w.hub).unwrap();
    let e = name(l.append(1, 4, false, Body::Vote { signed: vote(&w.holders[1], &id, Choice::Yes, 15) }, &w.hub));
    assert!(e.contains("double or replayed vote"), "{e}");
    // A vote recorded after the close (round 3), and one backdated behind a later entry.
    let late = vote(&w.holders[2], &id, Choice::Yes, 30);
    let e = name(l.append(3, 9, false, Body::Vote { signed: late.clone() }, &w.hub));
    assert!(e.contains("vote closed at round 3"), "{e}");
    root(l, &w.hub, 2);
    let e = name(l.append(1, 9, false, Body::Vote { signed: late }, &w.hub));
    assert!(e.contains("after an entry of round 2"), "{e}");
    // An outcome before the close, an applied change with no outcome at all.
    let tally = l.proposals()[&id].tally(&spec().governance.unwrap());
    let e = name(l.append(2, 9, false, Body::Outcome { proposal: id.clone(), tally }, &w.hub));
    assert!(e.contains("before the vote closes"), "{e}");
    let next = change.apply(&spec(), 3).unwrap();
    let applied = Body::Applied { proposal: id.clone(), spec: spec_hash(&next), checkpoint: "ab".repeat(32) };
    let e = name(l.append(3, 9, false, applied, &w.hub));
    assert!(e.contains("has no outcome yet"), "{e}");
    // A proposal nobody made: the hub's own signature is not a holder's.
    let (mut mine, _) = propose(&w.hub, Change::InnerSteps { value: 7 }, 2);
    mine.holder = w.holders[0].public().hex();
    let e = name(l.append(2, 9, false, Body::Proposal { signed: mine }, &w.hub));
    assert!(e.contains("does not verify"), "{e}");
    // The hub's overdue entries are visible: the vote closed at 3, no outcome by round 5.
    assert_eq!(l.overdue(5).len(), 1);
}

#[test]
fn an_applied_change_must_be_the_one_voted_at_the_round_it_names() {
    let mut w = world();
    let id = voted(&mut w, Change::InnerSteps { value: 10 });
    let tally = w.ledger.proposals()[&id].tally(&spec().governance.unwrap());
    w.ledger.append(3, 5, false, Body::Outcome { proposal: id.clone(), tally }, &w.hub).unwrap();
    let l = &mut w.ledger;
    // The hub applies something else under the passed proposal's name.
    let other = Change::InnerSteps { value: 40 }.apply(&spec(), 3).unwrap();
    let wrong = Body::Applied { proposal: id.clone(), spec: spec_hash(&other), checkpoint: "ab".repeat(32) };
    let e = name(l.append(3, 5, false, wrong, &w.hub));
    assert!(e.contains("the change applied to the spec before it gives"), "{e}");
    // Or the right change at another round.
    let right = Change::InnerSteps { value: 10 }.apply(&spec(), 3).unwrap();
    let early = Body::Applied { proposal: id.clone(), spec: spec_hash(&right), checkpoint: "ab".repeat(32) };
    let e = name(l.append(4, 5, false, early.clone(), &w.hub));
    assert!(e.contains("it names round 3"), "{e}");
    l.append(3, 5, false, early.clone(), &w.hub).unwrap();
    assert!(name(l.append(3, 5, false, early, &w.hub)).contains("applied already"));
    assert_eq!(l.spec().unwrap().0.inner_steps, 10);
    assert_eq!((l.inner_steps_at(2), l.inner_steps_at(3), l.inner_steps_at(9)), (Some(5), Some(10), Some(10)));
}

#[test]
fn a_proposal_outside_the_bounds_is_refused_with_the_bound_it_breaks() {
    let mut w = world();
    let cases = [
        (Change::OuterLr { value: 3.0 }, "the outer learning rate 3 is outside the run's bound [0.1, 1]"),
        (Change::InnerSteps { value: 1 }, "inner steps per round 1 is outside the run's bound [2, 50]"),
        (Change::Quorum { value: 4 }, "the round quorum is not something this run lets its holders change"),
        (Change::Codec { value: Codec::Bf16 }, "codec bf16 is not among the run's allowed codecs"),
        (Change::Release { version: "v 1".into() }, "letters, digits"),
    ];
    for (i, (change, want)) in cases.into_iter().enumerate() {
        let (p, _) = propose(&w.holders[0], change, i as i64);
        let e = name(w.ledger.append(1, 3, false, Body::Proposal { signed: p }, &w.hub));
        assert!(e.contains(want), "{e} does not say {want:?}");
    }
    // Holder 2 holds 40 ≥ 10 and may propose; a key holding nothing may not.
    let (p, _) = propose(&Identity::generate().unwrap(), Change::InnerSteps { value: 8 }, 9);
    let e = name(w.ledger.append(1, 3, false, Body::Proposal { signed: p }, &w.hub));
    assert!(e.contains("the proposer holds 0"), "{e}");
}

#[test]
fn the_spec_is_an_opening_entry_recorded_once() {
    let mut w = world();
    let body = Body::Spec { spec: serde_json::to_string(&spec()).unwrap() };
    let e = name(w.ledger.append(1, 3, false, body, &w.hub));
    assert!(e.starts_with("economy") && e.contains("opening entries"), "{e}");
}
