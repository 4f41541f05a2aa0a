//! The round core driven by random event sequences: many contributors, duplicates, replays,
//! stale and late work, deadlines, scores, phase changes, and a crash and reload at any point.
//!
//! Two shells take the same operations: one never stops, the other persists every event into a
//! [`Snapshot`] and, whenever the sequence says so, throws its state away and restores it from
//! that snapshot. They must answer every operation identically and end in the same state; and
//! every accepted submission counts in exactly one published round, every round publishes
//! once, in order, and every refusal names its reason.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tessera_protocol::api::{
    ApiError, ContestSpec, DataSource, DataSpec, ErrorCode, InnerSpec, OuterSpec, PhaseSpec, RunSpec, ScoreReport,
    SubmissionScore, TensorSpec,
};
use tessera_protocol::{Aggregation, Codec};
use tessera_round::{Event, Facts, Judgement, MessageHeader, Outcome, Run, Snapshot, Submission, Tick};

fn spec(quorum: u32, max_staleness: u64, scored: bool, phased: bool, until_loss: Option<f64>) -> RunSpec {
    let table =
        |n: u64| vec![TensorSpec { name: "a".into(), shape: vec![n] }, TensorSpec { name: "b".into(), shape: vec![2] }];
    RunSpec {
        name: "t".into(),
        model: serde_json::json!({}),
        tensors: table(4),
        data: DataSpec { name: "d".into(), fingerprint: "f".into(), source: DataSource::External, loss_floor: None },
        inner: InnerSpec {
            batch_size: 1,
            seq_len: 1,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 0,
            grad_clip: 1.0,
            weight_decay: 0.0,
        },
        inner_steps: 3,
        rounds: 6,
        outer: OuterSpec { lr: 0.7, momentum: 0.9, nesterov: true },
        codec: Codec::F32,
        feedback_decay: 1.0,
        broadcast_codec: Codec::F32,
        quorum,
        round_deadline_ms: 1_000,
        max_staleness,
        staleness_decay: 0.5,
        seed: 1,
        aggregation: Aggregation::Mean,
        contest: scored.then(|| ContestSpec {
            score_timeout_ms: 5_000,
            promote_top: 2,
            promote_at: Some(2),
            ..ContestSpec::default()
        }),
        trust: None,
        phases: if phased {
            vec![PhaseSpec {
                name: "two".into(),
                model: serde_json::json!({}),
                tensors: table(8),
                rounds: 3,
                seed: 2,
                qualify_top: scored.then_some(2),
                until_loss: None,
            }]
        } else {
            Vec::new()
        },
        fragments: 0,
        until_loss: if phased { until_loss } else { None },
        economy: None,
        governance: None,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Register,
    /// A submission from contributor `who` (mod the registered), trained `back` rounds ago;
    /// `copy`: the bytes of the last accepted submission; `wrong_base`: a base hash the round
    /// never had; `twice`: the same contributor and base again with new bytes.
    Submit {
        who: u8,
        back: u8,
        copy: bool,
        wrong_base: bool,
        loss: u8,
    },
    /// A submission its header already disqualifies (another phase's table, or garbage).
    Malformed {
        who: u8,
    },
    /// Time passes (or the clock steps back, as an NTP correction can).
    Wait {
        ms: i16,
    },
    /// The validator reports the closed round's scores (`held_out` picks the loss).
    Scores {
        held_out: u8,
        seed: u8,
    },
    /// The validator reports scores out of order.
    BadScores,
    /// The shell stops and restores from what it persisted.
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Register),
        8 => (any::<u8>(), 0u8..4, proptest::bool::weighted(0.1), proptest::bool::weighted(0.1), any::<u8>())
            .prop_map(|(who, back, copy, wrong_base, loss)| Op::Submit { who, back, copy, wrong_base, loss }),
        1 => any::<u8>().prop_map(|who| Op::Malformed { who }),
        3 => (-1000i16..3000).prop_map(|ms| Op::Wait { ms }),
        3 => (any::<u8>(), any::<u8>()).prop_map(|(held_out, seed)| Op::Scores { held_out, seed }),
        1 => Just(Op::BadScores),
        2 => Just(Op::Crash),
    ]
}

/// What one operation answered, for comparing the two shells.
type Answer = Vec<Result<String, (ErrorCode, String)>>;

/// A shell around the core: persists every event into `db`, keeps the store's side facts
/// (blob owners, who submitted for which base), and records what was accepted and published.
struct Shell {
    run: Run,
    db: Snapshot,
    crashes: bool,
    owners: BTreeMap<String, u64>,
    submitted: std::collections::BTreeSet<(u64, u64)>,
    now: i64,
    next_blob: u64,
    last_blob: Option<String>,
    /// Every accepted (contributor, base round), and the round each publication included it in.
    accepted: Vec<(u64, u64)>,
    included: BTreeMap<(u64, u64), Vec<u64>>,
    published: Vec<u64>,
}

impl Shell {
    fn new(spec: RunSpec, crashes: bool) -> Shell {
        let db = Snapshot::new(spec, "ab".repeat(16), hash(0), commitment(0));
        Shell {
            run: Run::restore(db.clone()).unwrap(),
            db,
            crashes,
            owners: BTreeMap::new(),
            submitted: Default::default(),
            now: 1_000_000,
            next_blob: 0,
            last_blob: None,
            accepted: Vec::new(),
            included: BTreeMap::new(),
            published: Vec::new(),
        }
    }

    /// Persist, then apply.
    fn commit(&mut self, events: &[Event]) {
        for e in events {
            self.db.record(e);
            if let Event::Accepted(a) = e {
                self.owners.insert(a.blob.clone(), a.contributor);
                self.submitted.insert((a.contributor, a.base_round));
                self.accepted.push((a.contributor, a.base_round));
                self.last_blob = Some(a.blob.clone());
            }
            self.run.apply(e).unwrap();
        }
    }

    fn refuse(&mut self, who: u64, e: ApiError) -> Result<String, (ErrorCode, String)> {
        assert!(!e.message.is_empty() && e.code != ErrorCode::Internal, "a refusal without its reason: {e:?}");
        if let Some(ev) = self.run.refused(who, &e, self.now) {
            self.commit(&[ev]);
        }
        Err((e.code, e.message))
    }

    /// Judges, "aggregates" (the checkpoint is a function of the round) and publishes.
    fn finish(&mut self, judgement: Judgement<'_>, closed_by: &str) -> Result<String, (ErrorCode, String)> {
        let plan = match self.run.plan(judgement, closed_by) {
            Ok(p) => p,
            Err(e) => return Err((e.code, e.message)),
        };
        let round = plan.round;
        for r in &plan.rows {
            self.included.entry((r.contributor, r.base_round)).or_default().push(round);
        }
        assert_eq!(plan.rows.len(), self.run.pending().len(), "a plan covers every pending submission");
        let used = plan.weights.iter().filter(|&&w| w > 0.0).count() as u64;
        let outcome = Outcome { result_checkpoint: hash(round + 1), used, weight: plan.weights.iter().sum() };
        let next_phase = plan.next_phase;
        let event = self.run.publish(plan, outcome, self.now, Some(commitment(round + 1)));
        self.commit(&[event]);
        self.published.push(round);
        Ok(format!("published {round} (next phase {next_phase:?})"))
    }

    fn tick(&mut self) -> Answer {
        let mut out = Vec::new();
        while let Some(t) = self.run.tick(self.now) {
            match t {
                Tick::Close(e) => {
                    self.commit(&[e]);
                    out.push(Ok("closed at the deadline".into()));
                }
                Tick::Finish { closed_by } => out.push(self.finish(Judgement::Unscored, &closed_by)),
            }
        }
        out
    }

    fn step(&mut self, op: &Op) -> Answer {
        self.now += 1;
        let mut answer = match op {
            Op::Register => {
                let id = self.run.contributors().len() as u64;
                self.commit(&[Event::Registered { contributor: id }]);
                vec![Ok(format!("registered {id}"))]
            }
            Op::Submit { who, back, copy, wrong_base, loss } => {
                vec![self.submit(*who, *back, *copy, *wrong_base, *loss)]
            }
            Op::Malformed { who } => {
                let Some(who) = self.pick(*who) else { return vec![] };
                let h = MessageHeader {
                    run_id: self.run.run_id(),
                    round: self.run.round(),
                    codec: Codec::Bf16,
                    table: vec![],
                };
                let e = self.run.check_message(who, &h).expect_err("a bf16 message in an f32 run");
                vec![self.refuse(who, e)]
            }
            Op::Wait { ms } => {
                self.now += i64::from(*ms);
                vec![]
            }
            Op::Scores { held_out, seed } => {
                let rows = self.run.arrival_order();
                let report = ScoreReport {
                    round: self.run.round(),
                    scores: rows
                        .iter()
                        .enumerate()
                        .map(|(i, r)| SubmissionScore {
                            contributor: r.contributor,
                            score: f64::from((u32::from(*seed) * 7 + i as u32 * 13) % 11) / 100.0 - 0.03,
                            data_fit: (i % 2 == 0).then_some(0.01),
                            copy_of: (i > 0 && seed % 5 == 0).then_some(0),
                            // Some with their standard error and norm bound, which travel with the row.
                            score_se: (i % 3 == 0).then_some(0.02),
                            norm_bound: (i % 2 == 1).then_some(0.5),
                        })
                        .collect(),
                    held_out_loss: Some(f64::from(*held_out) / 64.0),
                    task: None,
                    samples: Vec::new(),
                };
                match self.run.check_report(&report) {
                    Ok(_) => {
                        let closed_by = self.run.closed().map(|c| c.closed_by.clone()).unwrap_or_default();
                        vec![self.finish(Judgement::Scored(&report), &closed_by)]
                    }
                    Err(e) => vec![Err((e.code, e.message))],
                }
            }
            Op::BadScores => {
                let mut rows = self.run.arrival_order();
                rows.reverse();
                let scores = rows
                    .iter()
                    .map(|r| SubmissionScore {
                        contributor: r.contributor,
                        score: 0.1,
                        data_fit: None,
                        copy_of: None,
                        score_se: None,
                        norm_bound: None,
                    })
                    .collect();
                let report = ScoreReport {
                    round: self.run.round(),
                    scores,
                    held_out_loss: None,
                    task: None,
                    samples: Vec::new(),
                };
                match self.run.check_report(&report) {
                    // Reversed is only the job's order when it has at most one submission (or
                    // one contributor).
                    Ok(_) => vec![Ok("scores in order after all".into())],
                    Err(e) => vec![Err((e.code, e.message))],
                }
            }
            Op::Crash => {
                if self.crashes {
                    self.run = Run::restore(self.db.clone()).expect("what was persisted restores");
                }
                vec![]
            }
        };
        answer.extend(self.tick());
        answer
    }

    fn pick(&self, who: u8) -> Option<u64> {
        let n = self.run.contributors().len() as u64;
        (n > 0).then(|| u64::from(who) % n)
    }

    fn submit(
        &mut self,
        who: u8,
        back: u8,
        copy: bool,
        wrong_base: bool,
        loss: u8,
    ) -> Result<String, (ErrorCode, String)> {
        let Some(who) = self.pick(who) else { return Ok("nobody registered".into()) };
        let base_round = self.run.round().saturating_sub(u64::from(back));
        let h = MessageHeader {
            run_id: self.run.run_id(),
            round: base_round,
            codec: Codec::F32,
            table: self.run.expected_table(who).into_iter().map(|t| (t.name, t.shape)).collect(),
        };
        if let Err(e) = self.run.check_message(who, &h) {
            return self.refuse(who, e);
        }
        let blob = match (&self.last_blob, copy) {
            (Some(b), true) => b.clone(),
            _ => {
                self.next_blob += 1;
                format!("{:064x}", self.next_blob)
            }
        };
        let base_hash = if wrong_base { "ff".repeat(32) } else { hash(base_round) };
        let s = Submission {
            contributor: who,
            base_round,
            base_hash,
            blob,
            bytes: 100,
            inner_loss: Some(f64::from(loss) / 64.0),
            data: tessera_protocol::data::data_assignment(self.run.spec(), base_round, who),
        };
        let facts = Facts {
            blob_owner: self.owners.get(&s.blob).copied(),
            submitted_for_base: self.submitted.contains(&(who, base_round)),
        };
        match self.run.admit(&s, facts, self.now) {
            Ok(admission) => {
                self.commit(&admission.events);
                Ok(format!("accepted {:?}", admission.receipt))
            }
            Err(e) => self.refuse(who, e),
        }
    }
}

fn hash(round: u64) -> String {
    format!("{:064x}", round * 7919 + 1)
}

fn commitment(round: u64) -> String {
    format!("{:064x}", round + 1_000_000)
}

fn check_counts(shell: &Shell) {
    for (key, rounds) in &shell.included {
        assert_eq!(rounds.len(), 1, "{key:?} counted in rounds {rounds:?}");
    }
    let pending: Vec<(u64, u64)> = shell.run.pending().iter().map(|a| (a.contributor, a.base_round)).collect();
    // A sum taken as submissions arrive is the sum a restarted shell takes in arrival order.
    let arrival: Vec<(u64, u64)> = shell.run.arrival_order().iter().map(|a| (a.contributor, a.base_round)).collect();
    assert_eq!(arrival, pending, "arrival order is admission order");
    for a in &shell.accepted {
        let n = shell.included.get(a).map_or(0, Vec::len) + pending.iter().filter(|p| *p == a).count();
        assert_eq!(n, 1, "accepted {a:?} counts {n} times");
    }
    let expected: Vec<u64> = (0..shell.published.len() as u64).collect();
    assert_eq!(shell.published, expected, "every round publishes once, in order");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn reload_then_continue_equals_never_stopping(
        quorum in 1u32..4,
        max_staleness in 0u64..3,
        scored in any::<bool>(),
        phased in any::<bool>(),
        until_loss in proptest::option::of(0.0f64..2.0),
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let spec = spec(quorum, max_staleness, scored, phased, until_loss);
        let (mut steady, mut crashing) = (Shell::new(spec.clone(), false), Shell::new(spec, true));
        for (i, op) in ops.iter().enumerate() {
            let (a, b) = (steady.step(op), crashing.step(op));
            prop_assert_eq!(&a, &b, "operation {} ({:?}) answered differently after reloads", i, op);
            prop_assert_eq!(&Run::restore(crashing.db.clone()).unwrap(), &crashing.run, "state not persisted after {:?}", op);
            check_counts(&steady);
        }
        prop_assert_eq!(&steady.run, &crashing.run);
    }
}

/// A scored run's loss target is judged on the validator's held-out loss, never on the inner
/// losses contributors report; an unscored run has only the latter (signed with each
/// submission).
#[test]
fn the_loss_target_is_the_validators_where_a_validator_exists() {
    for (scored, inner, held_out, grows) in [
        (true, 0.1, Some(2.0), false),
        (true, 5.0, Some(0.5), true),
        (true, 0.1, None, false),
        (false, 0.5, None, true),
        (false, 2.0, Some(0.1), false),
    ] {
        let mut shell = Shell::new(spec(1, 1, scored, true, Some(1.0)), false);
        shell.step(&Op::Register);
        // Admitted straight away: a step's tick would finish an unscored round before we look.
        let loss = (inner * 64.0) as u8;
        shell.submit(0, 0, false, false, loss).unwrap();
        let report = ScoreReport {
            round: 0,
            scores: vec![SubmissionScore {
                contributor: 0,
                score: 0.1,
                data_fit: None,
                copy_of: None,
                score_se: None,
                norm_bound: None,
            }],
            held_out_loss: held_out,
            task: None,
            samples: Vec::new(),
        };
        let judgement = if scored { Judgement::Scored(&report) } else { Judgement::Unscored };
        let plan = shell.run.plan(judgement, "quorum").unwrap();
        assert_eq!(plan.next_phase.is_some(), grows, "scored {scored}, inner {inner}, held out {held_out:?}");
        assert_eq!(plan.early, grows);
    }
}

/// The promotion boundary and a phase that admits only the top: qualification needs reward
/// units, and a contributor the new phase did not admit learns it from its assignment.
#[test]
fn a_phase_that_admits_the_top_refuses_the_rest() {
    let mut shell = Shell::new(spec(3, 1, true, true, None), false);
    for _ in 0..3 {
        shell.step(&Op::Register);
    }
    for round in 0..3u8 {
        for who in 0..3 {
            shell.step(&Op::Submit { who, back: 0, copy: false, wrong_base: false, loss: 10 });
        }
        assert_eq!(shell.run.round(), u64::from(round), "the round waits for its scores");
        shell.step(&Op::Scores { held_out: 100, seed: 3 });
        assert_eq!(shell.run.round(), u64::from(round) + 1);
    }
    assert_eq!(shell.run.phase(), 1);
    let members = shell.run.members().expect("the second phase admits the top two").clone();
    assert_eq!(members.len(), 2);
    let outsider = (0..3).find(|c| !members.contains(c)).unwrap();
    let e = shell.run.assignment(outsider).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotQualified);
    assert!(shell.run.assignment(*members.iter().next().unwrap()).is_ok());
    // Work trained on the first phase's model is stale, whoever sent it, before membership.
    let old = MessageHeader { run_id: shell.run.run_id(), round: 2, codec: Codec::F32, table: vec![] };
    assert_eq!(shell.run.check_message(outsider, &old).unwrap_err().code, ErrorCode::Stale);
}

/// A manifest run's submission must claim exactly the data its base round assigned its sender:
/// none, another shard, another slot or another round's shard is refused with its reason.
#[test]
fn a_manifest_submission_must_claim_its_assigned_shard() {
    let mut s = spec(4, 1, false, false, None);
    s.data.source = DataSource::Manifest {
        urls: vec!["http://d/".into()],
        train_shards: 5,
        slots_per_round: 2,
        mixture: Vec::new(),
        weights: Vec::new(),
    };
    let mut shell = Shell::new(s, false);
    for _ in 0..3 {
        shell.step(&Op::Register);
    }
    let spec = shell.run.spec().clone();
    let assigned = |round, who| tessera_protocol::data::data_assignment(&spec, round, who);
    let submission = |who: u64, data| Submission {
        contributor: who,
        base_round: 0,
        base_hash: hash(0),
        blob: format!("{who:064x}"),
        bytes: 100,
        inner_loss: None,
        data,
    };
    let mine = assigned(0, 1).expect("a manifest run assigns data");
    assert_eq!(shell.run.assignment(1).unwrap().data, Some(mine));
    let other_shard = tessera_protocol::api::DataAssignment { shard: (mine.shard + 1) % 5, ..mine };
    let other_slot = tessera_protocol::api::DataAssignment { slot: 0, ..mine };
    for (claim, what) in [
        (None, "no data"),
        (Some(other_shard), "another shard"),
        (Some(other_slot), "another slot"),
        (assigned(1, 1), "the next round's shard"),
    ] {
        let e = shell.run.admit(&submission(1, claim), Facts::default(), 1).unwrap_err();
        assert_eq!(e.code, ErrorCode::WrongData, "{what}: {e:?}");
        assert!(e.message.contains(&format!("shard {}", mine.shard)), "{what}: {}", e.message);
    }
    let admitted = shell.run.admit(&submission(1, Some(mine)), Facts::default(), 1).unwrap();
    shell.commit(&admitted.events);
    // Contributor 2 shares slot 0 with contributor 0 (ids mod 2): its own assignment is slot 0's.
    assert_eq!(assigned(0, 2).unwrap().slot, 0);
    shell.run.admit(&submission(2, assigned(0, 2)), Facts::default(), 2).unwrap();
}

/// A sealed run's round takes no submission until its validator commits the evaluation seed;
/// the commitment is taken once (the same one again changes nothing, another is refused), is
/// persisted and restored, and the next round waits for its own.
#[test]
fn a_sealed_round_waits_for_its_validators_seed_commitment() {
    let mut s = spec(2, 1, true, false, None);
    s.trust = Some(tessera_protocol::api::AttestationPolicy { allow_insecure_dev: true, ..Default::default() });
    let db = Snapshot::new(s, "ab".repeat(16), hash(0), String::new());
    let mut run = Run::restore(db.clone()).unwrap();
    let submission = Submission {
        contributor: 0,
        base_round: 0,
        base_hash: hash(0),
        blob: format!("{:064x}", 1),
        bytes: 100,
        inner_loss: None,
        data: None,
    };
    assert_eq!(run.admit(&submission, Facts::default(), 1).unwrap_err().code, ErrorCode::Busy);
    assert_eq!(run.commit_seed(0, "zz").unwrap_err().code, ErrorCode::BadRequest);
    assert_eq!(run.commit_seed(1, &commitment(0)).unwrap_err().code, ErrorCode::NotScoring);
    let event = run.commit_seed(0, &commitment(0)).unwrap().expect("a first commitment");
    let mut persisted = db;
    persisted.record(&event);
    run.apply(&event).unwrap();
    assert_eq!(Run::restore(persisted).unwrap(), run, "the commitment is persisted");
    assert_eq!(run.commit_seed(0, &commitment(0)).unwrap(), None, "the same one again");
    assert_eq!(run.commit_seed(0, &commitment(1)).unwrap_err().code, ErrorCode::Conflict);
    run.admit(&submission, Facts::default(), 1).unwrap();
    let unsealed = Run::restore(Snapshot::new(spec(2, 1, true, false, None), "ab".repeat(16), hash(0), commitment(0)));
    assert_eq!(unsealed.unwrap().commit_seed(0, &commitment(0)).unwrap_err().code, ErrorCode::BadRequest);
}

/// A contributor caught cheating (its submission reported a copy) is paid less in later rounds:
/// its conduct record lowers its fit factor, its row says by how much, and a restart keeps the
/// record; an unscored round changes no record.
#[test]
fn a_contributor_caught_cheating_is_paid_less_afterwards() {
    let mut shell = Shell::new(spec(2, 1, true, false, None), true);
    shell.step(&Op::Register);
    shell.step(&Op::Register);
    let report = |round: u64, copy: bool| ScoreReport {
        round,
        scores: (0..2)
            .map(|c| SubmissionScore {
                contributor: c,
                score: 0.02,
                data_fit: None,
                copy_of: (copy && c == 1).then_some(0),
                score_se: None,
                norm_bound: None,
            })
            .collect(),
        held_out_loss: Some(1.0),
        task: None,
        samples: Vec::new(),
    };
    for round in 0..2u64 {
        shell.submit(0, 0, false, false, 10).unwrap();
        shell.submit(1, 0, false, false, 10).unwrap();
        let r = report(round, round == 0);
        let plan = shell.run.plan(Judgement::Scored(&r), "quorum").unwrap();
        let (honest, cheat) = (&plan.scores[0], &plan.scores[1]);
        if round == 0 {
            assert_eq!(cheat.flag.as_deref(), Some("copy"));
            assert_eq!((honest.conduct, cheat.conduct), (Some(1.0), Some(1.0)), "nobody has a record yet");
        } else {
            // One round, caught in it: (2 / 3)^4 of its share and aggregation weight.
            let kept = (2.0f64 / 3.0).powi(4);
            assert_eq!(cheat.flag, None);
            assert!((cheat.conduct.unwrap() - kept).abs() < 1e-12, "{cheat:?}");
            assert!((cheat.fit_factor.unwrap() - kept).abs() < 1e-12 && cheat.weight < honest.weight);
            assert_eq!((honest.conduct, honest.fit_factor), (Some(1.0), Some(1.0)));
            assert!(cheat.reward * 4 < honest.reward, "{honest:?} {cheat:?}");
        }
        shell.finish(Judgement::Scored(&r), "quorum").unwrap();
        // What was persisted restores to the same run, record included.
        let before = shell.run.clone();
        shell.step(&Op::Crash);
        assert_eq!(shell.run, before);
    }
    // A round left unscored (the validators' failure) counts for nobody: a replay refused in it
    // leaves every record as it was.
    let record = shell.db.conduct.clone();
    shell.submit(0, 0, false, false, 10).unwrap();
    let (code, _) = shell.submit(1, 0, true, false, 10).unwrap_err();
    assert_eq!(code, ErrorCode::Replay);
    shell.submit(1, 0, false, false, 10).unwrap();
    shell.finish(Judgement::Unscored, "quorum").unwrap();
    assert_eq!(shell.db.conduct, record);
    assert!(record.iter().any(|(id, c)| *id == 1 && c.caught == 1), "{record:?}");
}
