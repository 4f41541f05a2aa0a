//! The hub's trust and economy over real HTTP: a sealed run (attestation, ciphertext only,
//! verdicts that must pay what their receipts say, a verifiable ledger) and epochs of usage
//! closed into the ledger with exact payouts.

mod common;

use common::*;

/// The validator's side of a sealed run, done by hand with the trust crate (the real validator
/// needs libtorch to score; its tests drive it end to end).
struct TestValidator {
    opening: tessera_trust::OpeningKey,
    signing: tessera_trust::Identity,
    attestation: tessera_trust::ValidatorAttestation,
    ledger: tessera_trust::ledger::Ledger,
}

impl TestValidator {
    fn new() -> TestValidator {
        let opening = tessera_trust::OpeningKey::generate().unwrap();
        let signing = tessera_trust::Identity::generate().unwrap();
        let data = tessera_trust::report_data(&opening.public().0, &signing.public().0);
        let attestation = tessera_trust::ValidatorAttestation {
            sealing_key: hex::encode(opening.public().0),
            signing_key: signing.public().hex(),
            evidence: tessera_trust::Evidence::insecure_dev(&data, "test"),
        };
        TestValidator { opening, signing, attestation, ledger: tessera_trust::ledger::Ledger::default() }
    }

    fn sync(&mut self, url: &str) {
        let bytes = client(url).ledger(self.ledger.len()).unwrap();
        self.ledger.extend(&bytes).unwrap();
    }

    fn register(&mut self, url: &str, attestation: &tessera_trust::ValidatorAttestation) -> StatusCode {
        self.sync(url);
        let mut next = self.ledger.clone();
        let body = tessera_trust::ledger::Body::Validator { attestation: self.attestation.clone() };
        let entry = next.append(0, now_ms(), true, body, &self.signing).unwrap();
        let r = client(url).with_validator_token(VALIDATOR).post_attestation(attestation, &hex::encode(entry));
        if r.is_ok() {
            self.ledger = next;
        }
        status(r, StatusCode::CREATED)
    }
}

fn seal(v: &TestValidator, c: &Client, run: &RunInfo, plain: &[u8]) -> Vec<u8> {
    let mut run_id = [0u8; 16];
    hex::decode_to_slice(&run.run_id, &mut run_id).unwrap();
    let mut base = [0u8; 32];
    hex::decode_to_slice(&run.checkpoint, &mut base).unwrap();
    let header = tessera_trust::SealedHeader {
        run_id,
        base_round: 0,
        base_checkpoint: base,
        contributor: c.key.public(),
        recipient: [0; 32],
    };
    v.opening.public().seal(header, plain, &c.key).unwrap()
}

/// Every file under `dir` and the database file: does any contain `needle`?
fn anywhere(dir: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            anywhere(&p, needle)
        } else {
            std::fs::read(&p).unwrap_or_default().windows(needle.len()).any(|w| w == needle)
        }
    })
}

/// A sealed run over HTTP: nothing is accepted before a validator attests; an attestation that
/// does not bind its keys is refused; the hub stores only ciphertext (no submission's plaintext
/// is anywhere in its database or store); another contributor can neither claim nor open one;
/// the validator's verdict must pay exactly what its signed receipts say; and the published
/// ledger verifies, with inclusion proofs under the validator's root.
#[test]
fn sealed_rounds() {
    use tessera_protocol::api::{Settled, Verdict};
    use tessera_trust::ledger::{Body, Ledger, verify_proof};

    let b = backend("sqlite").unwrap();
    let trust = tessera_protocol::api::AttestationPolicy { allow_insecure_dev: true, ..Default::default() };
    let contest = ContestSpec { reward_units: 1000, ..ContestSpec::default() };
    let sealed = RunSpec { rounds: 2, contest: Some(contest), trust: Some(trust), ..spec(2) };
    let server = Server::start(&b, sealed);
    let url = server.url.clone();
    let run = info(&url);
    // Sealed: the operator never reads submissions, nor learns the evaluation seed in advance.
    assert!(!run.operator_trusted_with.iter().any(|t| t.starts_with("the evaluation seed")));
    assert!(!run.operator_trusted_with.iter().any(|t| t.contains("in the clear") || t.starts_with("the scores")));
    let (a, c) = (Client::register(&url, "a"), Client::register(&url, "c"));
    let (plain_a, plain_c) = (
        message(&run, Codec::F32, 0, &run.checkpoint, &delta(0.5)),
        message(&run, Codec::F32, 0, &run.checkpoint, &delta(-0.25)),
    );

    // No validator yet: nothing can be sealed to one.
    assert_eq!(status(client(&url).validator(), StatusCode::OK), StatusCode::SERVICE_UNAVAILABLE);
    let mut v = TestValidator::new();
    let (_, e) = a.submit_raw(seal(&v, &a, &run, &plain_a)).unwrap_err();
    assert_eq!(e.code, ErrorCode::NoValidator);
    // An attestation whose report data commits to other keys is refused.
    let mut lying = v.attestation.clone();
    lying.sealing_key = hex::encode(tessera_trust::OpeningKey::generate().unwrap().public().0);
    assert_eq!(v.register(&url, &lying), StatusCode::UNAUTHORIZED);
    let honest = v.attestation.clone();
    assert_eq!(v.register(&url, &honest), StatusCode::CREATED);
    let shown = client(&url).pinning(tessera_trust::PublicKey::parse(&run.hub_key).unwrap()).validator().unwrap();
    assert!(shown.insecure, "the development attester is shown as insecure");

    // The round takes no submission before the validator commits its evaluation seed, which
    // it drew: the hub sees only the commitment.
    let (_, e) = a.submit_raw(seal(&v, &a, &run, &plain_a)).unwrap_err();
    assert_eq!(e.code, ErrorCode::Busy, "{}", e.message);
    assert_eq!(client(&url).eval_seed(0).unwrap().commitment, "");
    let seed = [7u8; 32];
    let commitment = hex::encode(tessera_contest::commit::commitment(&seed));
    let validator = client(&url).with_validator_token(VALIDATOR);
    let commit = |round: u64, c: &str| {
        validator.post_commitment(&tessera_protocol::api::SeedCommitment { round, commitment: c.into() })
    };
    assert!(
        client(&url)
            .post_commitment(&tessera_protocol::api::SeedCommitment { round: 0, commitment: commitment.clone() })
            .is_err(),
        "no token"
    );
    assert!(commit(1, &commitment).is_err(), "not the current round");
    assert!(commit(0, "zz").is_err(), "not hex");
    commit(0, &commitment).unwrap();
    commit(0, &commitment).unwrap();
    assert!(commit(0, &"ab".repeat(32)).is_err(), "a second, different commitment");
    let shown = client(&url).eval_seed(0).unwrap();
    assert_eq!((shown.commitment.as_str(), shown.seed), (commitment.as_str(), None));

    // Plaintext is refused; someone else's envelope cannot be claimed.
    let (_, e) = a.submit_raw(plain_a.clone()).unwrap_err();
    assert_eq!(e.code, ErrorCode::MalformedMessage);
    let sealed_a = seal(&v, &a, &run, &plain_a);
    let (s, e) = c.submit_raw(sealed_a.clone()).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized));
    // …and rewriting its header to claim it makes it unreadable.
    let mut claimed = sealed_a.clone();
    claimed[62..94].copy_from_slice(&c.key.public().0);
    assert!(v.opening.open(&claimed).is_err());
    // The hub refuses it on arrival too: the envelope is not signed by the contributor it
    // names (so neither a sender nor the hub can pass one off as another's).
    let (_, e) = c.submit_raw(claimed).unwrap_err();
    assert_eq!(e.code, ErrorCode::MalformedMessage);
    assert!(e.message.contains("not signed by the contributor"), "{}", e.message);
    // Sealed to a key that is not the validator's: refused by name.
    let other = TestValidator::new();
    let (_, e) = a.submit_raw(seal(&other, &a, &run, &plain_a)).unwrap_err();
    assert_eq!(e.code, ErrorCode::WrongValidator);

    a.submit_raw(sealed_a.clone()).unwrap();
    let (_, e) = a.submit_raw(sealed_a.clone()).unwrap_err();
    assert_eq!(e.code, ErrorCode::Duplicate, "its own envelope again: already accepted");
    c.submit_raw(seal(&v, &c, &run, &plain_c)).unwrap();

    // Contributors cannot fetch submissions: that takes the validator's token.
    let job_blob = blake3::hash(&sealed_a).to_hex().to_string();
    let r = validator_get(&url, &format!("/v1/validator/submissions/{job_blob}"), None);
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // What the hub publishes is signed with the key its run info names: the checkpoint (over its
    // BLAKE3) and the round's announcement.
    let hub_key = tessera_trust::PublicKey::parse(&run.hub_key).unwrap();
    let r = client(&url).get(&format!("/v1/checkpoints/{}", run.checkpoint)).send().unwrap();
    let sig = r.headers()["x-tessera-hub-signature"].to_str().unwrap().to_owned();
    let bytes = r.bytes().unwrap();
    hub_key.verify_hex(&tessera_trust::identity::publication_message(&bytes), &sig).unwrap();
    let r = client(&url).get("/v1/rounds/0").send().unwrap();
    let sig = r.headers()["x-tessera-hub-signature"].to_str().unwrap().to_owned();
    let bytes = r.bytes().unwrap();
    hub_key.verify_hex(&tessera_trust::identity::publication_message(&bytes), &sig).unwrap();
    let round0: tessera_protocol::api::RoundAnnouncement = serde_json::from_slice(&bytes).unwrap();
    assert_eq!((round0.base_checkpoint.as_str(), round0.eval_commitment.is_some()), (run.checkpoint.as_str(), true));
    assert_eq!(status(client(&url).pinning(hub_key).announcement(7), StatusCode::OK), StatusCode::NOT_FOUND);

    // Only ciphertext at rest: no submission's tensor bytes in the database or the store.
    let needle_a = &plain_a[plain_a.len() - 32 - 64..plain_a.len() - 32];
    let needle_c = &plain_c[plain_c.len() - 32 - 64..plain_c.len() - 32];
    for needle in [needle_a, needle_c] {
        assert!(!anywhere(b._dir.path(), needle), "plaintext found at rest");
    }

    // The validator's round: open, settle, aggregate, sign.
    let job: ScoringJob = validator_get(&url, "/v1/validator/job", Some(VALIDATOR)).json().unwrap();
    assert_eq!(job.submissions.len(), 2);
    let mut deltas = Vec::new();
    for s in &job.submissions {
        let env = validator_get(&url, &format!("/v1/validator/submissions/{}", s.blob), Some(VALIDATOR));
        let (header, msg) = v.opening.open(&env.bytes().unwrap()).unwrap();
        assert_eq!(header.contributor.hex(), s.contributor_key);
        deltas.push(MessageView::parse(&msg).unwrap().apply_to(&[vec![0.0; 8], vec![0.0; 32]]).unwrap());
    }
    let mean: Vec<Vec<f32>> =
        (0..2).map(|t| deltas[0][t].iter().zip(&deltas[1][t]).map(|(x, y)| 0.5 * (x + y)).collect()).collect();
    let agg = message(&run, Codec::F32, 0, &run.checkpoint, &mean);
    assert_eq!(status(validator.post_aggregate(0, agg), StatusCode::NO_CONTENT), StatusCode::NO_CONTENT);
    let rewards = [700u64, 300];
    v.sync(&url);
    let entries = |signer: &tessera_trust::Identity, pay: [u64; 2], ledger: &Ledger| {
        let mut next = ledger.clone();
        for (s, units) in job.submissions.iter().zip(pay) {
            let body = Body::Receipt {
                contributor: s.contributor_key.clone(),
                submission: s.blob.clone(),
                score: 0.01,
                data_fit: None,
                flag: String::new(),
                units,
            };
            next.append(0, now_ms(), true, body, signer).unwrap();
        }
        next.append(0, now_ms(), true, Body::Emission { units: pay.iter().sum() }, signer).unwrap();
        let root = Body::Root { size: next.len(), root: next.root() };
        next.append(0, now_ms(), true, root, signer).unwrap();
        (ledger.len(), hex::encode(next.bytes_from(ledger.len())))
    };
    let verdict = |(from, ledger): (u64, String)| Verdict {
        report: ScoreReport {
            round: 0,
            scores: job
                .submissions
                .iter()
                .map(|s| SubmissionScore {
                    contributor: s.contributor,
                    score: 0.01,
                    data_fit: None,
                    copy_of: None,
                    score_se: None,
                    norm_bound: None,
                })
                .collect(),
            held_out_loss: None,
            task: None,
            samples: Vec::new(),
        },
        settled: rewards
            .iter()
            .map(|&r| Settled { weight: 1.0, reward: r, effective: Some(0.01), flag: None })
            .collect(),
        ledger_from: from,
        ledger,
        eval_seed: Some(hex::encode(seed)),
    };
    // Receipts paying other amounts than the verdict, or signed by anyone but the validator.
    let wrong = verdict(entries(&v.signing, [300, 700], &v.ledger));
    assert_eq!(status(validator.post_verdict(&wrong), StatusCode::NO_CONTENT), StatusCode::BAD_REQUEST);
    let rogue = tessera_trust::Identity::generate().unwrap();
    let body = Body::Receipt {
        contributor: job.submissions[0].contributor_key.clone(),
        submission: job.submissions[0].blob.clone(),
        score: 9.0,
        data_fit: None,
        flag: String::new(),
        units: 1000,
    };
    let raw = tessera_trust::ledger::encode_entry(v.ledger.len(), 0, now_ms(), &v.ledger.head(), true, &body, &rogue)
        .unwrap();
    let forged = verdict((v.ledger.len(), hex::encode(raw)));
    let (_, e) = refused(validator.post_verdict(&forged).unwrap_err());
    assert!(e.message.contains("unknown") || e.message.contains("may not sign"), "{}", e.message);
    let good = verdict(entries(&v.signing, rewards, &v.ledger));
    let unrevealed = Verdict { eval_seed: Some(hex::encode([8u8; 32])), ..good.clone() };
    let (_, e) = refused(validator.post_verdict(&unrevealed).unwrap_err());
    assert!(e.message.contains("evaluation seed"), "{}", e.message);
    let r = validator.post_verdict(&good);
    assert!(r.is_ok(), "{r:?}");
    // Revealed with the round; the next round waits for the validator's next commitment.
    assert_eq!(client(&url).eval_seed(0).unwrap().seed, Some(hex::encode(seed)));
    assert_eq!(client(&url).eval_seed(1).unwrap().commitment, "");

    // Published: θ − mean, rewards on the leaderboard, and a ledger anyone can verify.
    let after = info(&url);
    assert_eq!(after.round, 1);
    let theta = weights(&url, &after.checkpoint, &run.spec.tensors);
    assert!((theta[0][7] - (initial()[0][7] - mean[0][7])).abs() < 1e-6);
    let board: Leaderboard = leaderboard(&url);
    assert_eq!(board.rows.iter().map(|r| r.rewards).sum::<u64>(), 1000);
    let ledger = Ledger::from_bytes(&client(&url).ledger(0).unwrap()).unwrap();
    assert_eq!(ledger.units.get(&a.key.public().hex()), Some(&700));
    assert_eq!(ledger.hub(), Some(tessera_trust::PublicKey::parse(&run.hub_key).unwrap()));
    for seq in 0..ledger.len() - 1 {
        let proof: tessera_trust::ledger::Proof =
            serde_json::from_value(client(&url).ledger_proof(seq).unwrap()).unwrap();
        assert_eq!(verify_proof(&proof, &v.signing.public()).unwrap().seq, seq);
    }
    for needle in [needle_a, needle_c] {
        assert!(!anywhere(b._dir.path(), needle), "plaintext found at rest after publishing");
    }
    server.stop();

    // The ledger survives a restart, and so does the validator sealed to.
    let server = Server::start(&b, RunSpec { trust: None, ..spec(2) });
    let resumed = client(&server.url).pinning(hub_key).validator().unwrap();
    assert_eq!(resumed.attestation["signing_key"], v.signing.public().hex());
    assert_eq!(Ledger::from_bytes(&client(&server.url).ledger(0).unwrap()).unwrap().len(), ledger.len());
    server.stop();
}

/// Only the run's operator may close an epoch; the hub writes usage, the closing, exact payouts
/// and a root, which verify from the ledger's bytes alone; an epoch closes once.
#[test]
fn epochs_of_usage_close_into_the_ledger_with_exact_payouts() {
    let b = backend("sqlite").unwrap();
    let operator = Arc::new(tessera_trust::Identity::generate().unwrap());
    let economy = tessera_protocol::api::EconomySpec {
        operator: operator.public().hex(),
        funding_ppm: 100_000,
        allocations: vec![("alice".into(), 2), ("bob".into(), 1)],
    };
    let server = Server::start(&b, RunSpec { economy: Some(economy), ..spec(2) });
    let path = "/v1/economy/epochs";
    let report = |epoch: u64, revenue: u64| tessera_protocol::api::EpochReport {
        epoch,
        usage: vec![tessera_protocol::api::AccountUsage {
            account: "key-a".into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            revenue,
        }],
    };
    // Anyone else, even a registered contributor, is refused.
    let stranger = Client::register(&server.url, "stranger");
    let r = stranger.post(path, serde_json::to_vec(&report(0, 1000)).unwrap());
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let operator = client(&server.url).signed_by(operator);
    let settled = operator.close_epoch(&report(0, 1000)).unwrap();
    // 1000 revenue, 10% funding; 900 split 2:1.
    assert_eq!((settled.revenue, settled.funding, settled.payable), (1000, 100, 900));
    assert_eq!(settled.payouts, vec![("alice".to_string(), 600), ("bob".to_string(), 300)]);
    assert_eq!(status(operator.close_epoch(&report(0, 5)), StatusCode::CREATED), StatusCode::CONFLICT);
    let ledger = tessera_trust::ledger::Ledger::from_bytes(&client(&server.url).ledger(0).unwrap()).unwrap();
    assert_eq!(ledger.payouts.values().sum::<u64>(), 900);
    assert_eq!(ledger.allocations.len(), 2);
    server.stop();
}
