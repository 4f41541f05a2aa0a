//! A run steered by its holders over real HTTP (SQLite): proposals and votes signed by holders
//! and taken by the hub, recorded at the round boundary with the tally and the change, applied
//! to the spec the hub serves and its assignments; every refusal named; and a spec changed behind
//! the ledger's back (in the database) caught by comparing what the hub serves with its ledger.

mod common;

use common::*;
use tessera_protocol::api::EconomySpec;
use tessera_protocol::api::governance::{
    Bounds, Change, Choice, GovernanceSpec, ProposalMessage, Proposals, Tally, VoteMessage,
};
use tessera_trust::Identity;
use tessera_trust::ledger::Ledger;

fn steered(holders: &[Arc<Identity>]) -> RunSpec {
    RunSpec {
        rounds: 8,
        economy: Some(EconomySpec {
            operator: Identity::generate().unwrap().public().hex(),
            funding_ppm: 0,
            allocations: holders.iter().zip([500, 300, 200]).map(|(h, a)| (h.public().hex(), a)).collect(),
        }),
        governance: Some(GovernanceSpec {
            voting_rounds: 1,
            quorum_ppm: 500_000,
            threshold_ppm: 500_001,
            min_proposer_balance: 100,
            bounds: Bounds {
                inner_steps: Some([2, 20]),
                outer_lr: Some([0.1, 1.0]),
                releases: true,
                ..Bounds::default()
            },
        }),
        ..spec(1)
    }
}

fn proposal(run: &RunInfo, change: Change, time_ms: i64) -> ProposalMessage {
    ProposalMessage { run_id: run.run_id.clone(), title: "test".into(), change, apply_at: None, time_ms }
}

fn vote_on(run: &RunInfo, id: &str, choice: Choice, time_ms: i64) -> VoteMessage {
    VoteMessage { run_id: run.run_id.clone(), proposal: id.into(), choice, time_ms }
}

/// Publishes the current round with one submission.
fn publish_round(url: &str, c: &Client) {
    let run = info(url);
    c.submit(&run, run.round, &run.checkpoint, &delta(0.01)).unwrap();
    assert_eq!(info(url).round, run.round + 1);
}

fn verified_ledger(url: &str) -> Ledger {
    Ledger::from_bytes(&client(url).ledger(0).unwrap()).unwrap()
}

#[test]
fn holders_steer_the_run_and_a_change_behind_the_ledgers_back_is_caught() {
    steer_on("sqlite");
}

/// On PostgreSQL with a second replica: proposals and votes taken by one replica are recorded by
/// the other's publication, and both serve the changed spec and the same ledger.
#[test]
fn holders_steer_a_run_served_by_two_replicas() {
    steer_on("postgres");
}

fn steer_on(kind: &str) {
    let holders: Vec<Arc<Identity>> = (0..3).map(|_| Arc::new(Identity::generate().unwrap())).collect();
    let Some(b) = backend(kind) else { return };
    let server = Server::start(&b, steered(&holders));
    let url = server.url.clone();
    // With PostgreSQL, a second replica takes the proposals and votes; the first publishes.
    let replica = (kind == "postgres").then(|| Server::start(&b, steered(&holders)));
    let voting_url = replica.as_ref().map_or(url.clone(), |r| r.url.clone());
    let run = info(&url);
    let as_holder = |k: usize| Client::with_key(&voting_url, holders[k].clone()).hub;
    let trainer = Client::register(&url, "trainer");
    assert_eq!(trainer.assignment(0).revision, 0);

    // Refused with the bound it breaks, from a key holding too little, or signed by another.
    let e = refused(as_holder(0).propose(&proposal(&run, Change::InnerSteps { value: 50 }, 1)).unwrap_err());
    assert_eq!(e.0, StatusCode::BAD_REQUEST);
    assert!(e.1.message.contains("inner steps per round 50 is outside the run's bound [2, 20]"), "{}", e.1.message);
    let e = refused(as_holder(0).propose(&proposal(&run, Change::Quorum { value: 3 }, 1)).unwrap_err());
    assert!(e.1.message.contains("not something this run lets its holders change"), "{}", e.1.message);
    let poor = Arc::new(Identity::generate().unwrap());
    let e = refused(
        Client::with_key(&url, poor.clone())
            .hub
            .propose(&proposal(&run, Change::InnerSteps { value: 9 }, 1))
            .unwrap_err(),
    );
    assert!(e.1.message.contains("the proposer holds 0"), "{}", e.1.message);

    // Holder 0 proposes H = 9; holders 0 and 2 vote yes, holder 1 no, then changes to abstain.
    let msg = proposal(&run, Change::InnerSteps { value: 9 }, 1);
    let id = as_holder(0).propose(&msg).unwrap().proposal;
    assert_eq!(id, blake3::hash(&serde_json::to_vec(&msg).unwrap()).to_hex().to_string());
    assert_eq!(refused(as_holder(0).propose(&msg).unwrap_err()).0, StatusCode::CONFLICT);
    as_holder(0).vote(&vote_on(&run, &id, Choice::Yes, 10)).unwrap();
    as_holder(1).vote(&vote_on(&run, &id, Choice::No, 10)).unwrap();
    as_holder(1).vote(&vote_on(&run, &id, Choice::Abstain, 11)).unwrap();
    as_holder(2).vote(&vote_on(&run, &id, Choice::Yes, 10)).unwrap();
    // A double vote (not signed later), and a vote by a key that holds nothing.
    let e = refused(as_holder(2).vote(&vote_on(&run, &id, Choice::No, 10)).unwrap_err());
    assert_eq!(e.0, StatusCode::CONFLICT, "{}", e.1.message);
    let e = refused(Client::with_key(&url, poor.clone()).hub.vote(&vote_on(&run, &id, Choice::Yes, 10)).unwrap_err());
    assert!(e.1.message.contains("holds nothing"), "{}", e.1.message);
    let listed: Proposals = client(&url).proposals().unwrap();
    assert_eq!(listed.proposals.len(), 1);
    assert_eq!((listed.proposals[0].state.as_str(), listed.proposals[0].voters), ("pending", 3));

    // The boundary records it all: proposal, votes, the tally, the change at round 1.
    publish_round(&url, &trainer);
    let ledger = verified_ledger(&url);
    let p = &ledger.proposals()[&id];
    let tally = Tally { yes: 700, no: 0, abstain: 300, power: 1000, passed: true };
    assert_eq!(p.outcome.map(|o| o.1), Some(tally), "the tally is recomputed from the recorded votes");
    assert!(p.applied.is_some());
    let now = info(&url);
    assert_eq!(now.spec.inner_steps, 9);
    ledger.check_served_spec(&now.spec, now.phase as usize).unwrap();
    let a = trainer.assignment(0);
    assert_eq!((a.inner_steps, a.revision), (9, 1));
    let listed = client(&voting_url).proposals().unwrap();
    assert_eq!(listed.proposals[0].state, "applied");
    assert_eq!(listed.proposals[0].tally, tally);
    if let Some(r) = &replica {
        // The other replica holds the same ledger and serves the changed spec.
        assert_eq!(client(&r.url).ledger(0).unwrap(), client(&url).ledger(0).unwrap());
        assert_eq!(info(&r.url).spec.inner_steps, 9);
        assert_eq!(Client::register(&r.url, "other").assignment(0).revision, 1);
    }

    // A vote after the close is refused.
    let e = refused(as_holder(1).vote(&vote_on(&run, &id, Choice::No, 20)).unwrap_err());
    assert!(e.1.message.contains("vote closed at round 1"), "{}", e.1.message);

    // A proposal that fails its quorum: only holder 2 (20%) votes.
    let lr = as_holder(1).propose(&proposal(&run, Change::OuterLr { value: 0.5 }, 2)).unwrap().proposal;
    as_holder(2).vote(&vote_on(&run, &lr, Choice::Yes, 30)).unwrap();
    publish_round(&url, &trainer);
    let ledger = verified_ledger(&url);
    assert_eq!(ledger.proposals()[&lr].outcome.map(|o| o.1.passed), Some(false));
    assert_eq!(info(&url).spec.outer.lr, 1.0);
    assert_eq!(
        client(&voting_url).proposals().unwrap().proposals.iter().find(|p| p.id == lr).unwrap().state,
        "rejected"
    );
    server.stop();
    if let Some(r) = replica {
        r.stop();
    }

    // The operator edits the run's spec in the database (quorum 1 → 4) and restarts: the hub
    // serves it, and comparing it with the ledger catches it.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let db = Db::connect(&b.db).await.unwrap();
        let pool = sqlx::AnyPool::connect(&b.db).await.unwrap();
        drop(db);
        let spec: String = sqlx::query_scalar("SELECT spec FROM runs").fetch_one(&pool).await.unwrap();
        let mut spec: RunSpec = serde_json::from_str(&spec).unwrap();
        spec.quorum = 4;
        sqlx::query("UPDATE runs SET spec = $1")
            .bind(serde_json::to_string(&spec).unwrap())
            .execute(&pool)
            .await
            .unwrap();
    });
    let server = Server::start(&b, steered(&holders));
    let served = info(&server.url);
    assert_eq!(served.spec.quorum, 4);
    let e = verified_ledger(&server.url).check_served_spec(&served.spec, 0).unwrap_err();
    assert!(e.contains("no passed proposal authorises") && e.contains("quorum: ledger 1 served 4"), "{e}");
    server.stop();
}
