//! `tessera bench trust`: what trust costs, against memcpy and BLAKE3 of the same bytes.

use anyhow::{Result, bail};
use clap::Args;
use tessera_trust::Identity;
use tessera_trust::ledger::{Body, Ledger};

#[derive(Args)]
pub struct BenchTrustArgs {
    /// Submission size in bytes (default: an int8:64 message of a 100M-parameter model).
    #[arg(long, default_value_t = 106_250_000)]
    bytes: usize,
    /// Signed requests to sign and verify.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Ledger receipts to write and verify.
    #[arg(long, default_value_t = 5000)]
    entries: usize,
    /// Holders voting on one proposal in the steered ledger measured against the receipts.
    #[arg(long, default_value_t = 10_000)]
    voters: usize,
    /// Repeats of each timing (the best is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

fn best<T>(repeats: usize, mut f: impl FnMut() -> Result<T>) -> Result<(f64, T)> {
    let mut out = None;
    let mut fastest = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = std::time::Instant::now();
        let v = f()?;
        fastest = fastest.min(t.elapsed().as_secs_f64());
        out = Some(v);
    }
    Ok((fastest, out.ok_or_else(|| anyhow::anyhow!("nothing timed"))?))
}

pub fn bench_trust(args: BenchTrustArgs) -> Result<()> {
    use tessera_trust::{OpeningKey, SealedHeader};
    let message: Vec<u8> = (0..args.bytes).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mb = args.bytes as f64 / 1e6;
    let (memcpy, _) = best(args.repeats, || Ok(std::hint::black_box(message.clone())))?;
    let (hash, _) = best(args.repeats, || Ok(blake3::hash(std::hint::black_box(&message))))?;
    let validator = OpeningKey::generate()?;
    let me = Identity::generate()?;
    let header = SealedHeader {
        run_id: [1; 16],
        base_round: 0,
        base_checkpoint: [2; 32],
        contributor: me.public(),
        recipient: [0; 32],
    };
    let (seal, sealed) = best(args.repeats, || Ok(validator.public().seal(header.clone(), &message, &me)?))?;
    let (open, opened) = best(args.repeats, || Ok(validator.open(&sealed)?))?;
    if opened.1 != message {
        bail!("the opened message differs from the sealed one");
    }
    println!("submission of {mb:.1} MB (one thread):");
    println!("  {:<34} {:>9} {:>10} {:>12}", "", "seconds", "MB/s", "× BLAKE3");
    for (what, s) in
        [("memcpy", memcpy), ("BLAKE3 (the hub's checksum)", hash), ("HPKE seal", seal), ("HPKE open", open)]
    {
        println!("  {what:<34} {s:>9.4} {:>10.0} {:>12.2}", mb / s, s / hash);
    }

    let body = vec![7u8; 64];
    let audience = tessera_trust::Audience { hub_key: me.public(), run_id: "bench".into() };
    let (sign, headers) = best(args.repeats, || {
        let mut all = Vec::with_capacity(args.requests);
        for _ in 0..args.requests {
            all.push(me.sign_request(&audience, "POST", "/v1/submissions", &body, 1_000)?);
        }
        Ok(all)
    })?;
    let (verify, _) = best(args.repeats, || {
        for h in &headers {
            let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
            tessera_trust::verify_request(get, &audience, "POST", "/v1/submissions", &body, 1_000)?;
        }
        Ok(())
    })?;
    let per = |s: f64| s / args.requests as f64 * 1e6;
    println!("signed requests: sign {:.1} µs, verify {:.1} µs each", per(sign), per(verify));

    let validator_key = Identity::generate()?;
    let hub = Identity::generate()?;
    let (write, ledger) = best(args.repeats, || {
        let mut l = Ledger::default();
        let policy = tessera_protocol::api::AttestationPolicy { allow_insecure_dev: true, ..Default::default() };
        l.append(0, 0, false, Body::Genesis { run_id: "bench".into(), policy }, &hub)?;
        let sealing = OpeningKey::generate()?;
        let data = tessera_trust::report_data(&sealing.public().0, &validator_key.public().0);
        let attestation = tessera_trust::ValidatorAttestation {
            sealing_key: hex::encode(sealing.public().0),
            signing_key: validator_key.public().hex(),
            evidence: tessera_trust::Evidence::insecure_dev(&data, "bench"),
        };
        l.append(0, 0, true, Body::Validator { attestation }, &validator_key)?;
        let mut raw: Vec<Vec<u8>> = Vec::new();
        for i in 0..args.entries {
            let body = Body::Receipt {
                contributor: me.public().hex(),
                submission: blake3::hash(&i.to_le_bytes()).to_hex().to_string(),
                score: 0.01,
                data_fit: Some(0.001),
                flag: String::new(),
                units: 1,
            };
            let prev = if raw.is_empty() { l.head() } else { blake3::hash(&raw[raw.len() - 1]).to_hex().to_string() };
            raw.push(
                tessera_trust::ledger::encode_entry(l.len() + i as u64, 0, 0, &prev, true, &body, &validator_key)
                    .map_err(anyhow::Error::msg)?,
            );
        }
        l.extend(&raw.concat())?;
        l.append(0, 0, true, Body::Emission { units: args.entries as u64 }, &validator_key)?;
        let root = Body::Root { size: l.len(), root: l.root() };
        l.append(0, 0, true, root, &validator_key)?;
        Ok(l)
    })?;
    let bytes = ledger.bytes().to_vec();
    let (verify_ledger, _) = best(args.repeats, || Ok(Ledger::from_bytes(&bytes)?))?;
    println!(
        "ledger of {} entries ({:.1} MB): write and check {:.0} entries/s, verify from bytes {:.0} entries/s",
        ledger.len(),
        bytes.len() as f64 / 1e6,
        ledger.len() as f64 / write,
        ledger.len() as f64 / verify_ledger
    );
    if args.voters > 0 {
        let per_receipt = verify_ledger / ledger.len() as f64;
        steered_ledger(&args, &hub, per_receipt)?;
    }
    Ok(())
}

/// A steered run's ledger at `--voters` holders: their allocations, one proposal, every holder's
/// signed vote, the outcome and the applied change; verified from its bytes, each vote against
/// a receipt (whose cost `per_receipt` was measured in the same run).
fn steered_ledger(args: &BenchTrustArgs, hub: &Identity, per_receipt: f64) -> Result<()> {
    use tessera_protocol::api::governance::{Change, Choice, ProposalMessage, VoteMessage};
    use tessera_trust::ledger::sign_governance;
    let holders: Vec<Identity> = (0..args.voters).map(|_| Identity::generate()).collect::<Result<_, _>>()?;
    let spec = serde_json::json!({"name": "bench", "model": {}, "tensors": [{"name": "w", "shape": [2, 2]}],
        "data": {"name": "e", "fingerprint": "f", "source": {"kind": "embedded", "seed": 1, "train_chars": 10, "val_chars": 10}},
        "inner": {"batch_size": 1, "seq_len": 8, "lr": 0.001, "min_lr": 0.0001, "warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 0.1},
        "inner_steps": 5, "rounds": 9, "outer": {"lr": 0.7, "momentum": 0.9, "nesterov": true}, "codec": "f32",
        "broadcast_codec": "f32", "quorum": 2, "round_deadline_ms": 1000, "max_staleness": 1, "staleness_decay": 0.5,
        "seed": 1, "governance": {"voting_rounds": 1, "quorum_ppm": 200000, "threshold_ppm": 500001,
        "bounds": {"inner_steps": [1, 10]}}});
    let mut l = Ledger::default();
    let policy = tessera_protocol::api::AttestationPolicy::default();
    l.append(0, 0, false, Body::Genesis { run_id: "bench".into(), policy }, hub)?;
    l.append(0, 0, false, Body::Spec { spec: spec.to_string() }, hub)?;
    for (i, h) in holders.iter().enumerate() {
        l.append(0, 0, false, Body::Allocation { holder: h.public().hex(), amount: 1 + i as u64 % 97 }, hub)?;
    }
    let change = Change::InnerSteps { value: 7 };
    let message = ProposalMessage { run_id: "bench".into(), title: "bench".into(), change, apply_at: None, time_ms: 1 };
    let bytes = serde_json::to_vec(&message)?;
    let id = blake3::hash(&bytes).to_hex().to_string();
    l.append(0, 0, false, Body::Proposal { signed: sign_governance(&holders[0], &bytes) }, hub)?;
    let t = std::time::Instant::now();
    for (i, h) in holders.iter().enumerate() {
        let choice = if i % 3 == 0 { Choice::No } else { Choice::Yes };
        let vote = VoteMessage { run_id: "bench".into(), proposal: id.clone(), choice, time_ms: 2 };
        l.append(0, 0, false, Body::Vote { signed: sign_governance(h, &serde_json::to_vec(&vote)?) }, hub)?;
    }
    let take = t.elapsed().as_secs_f64();
    let g = serde_json::from_value::<tessera_protocol::RunSpec>(spec)?.governance.unwrap_or_default();
    let tally = l.proposals()[&id].tally(&g);
    l.append(1, 0, false, Body::Outcome { proposal: id, tally }, hub)?;
    let root = Body::Root { size: l.len(), root: l.root() };
    l.append(1, 0, false, root, hub)?;
    let bytes = l.bytes().to_vec();
    let (verify, again) = best(args.repeats, || Ok(Ledger::from_bytes(&bytes)?))?;
    let votes = args.voters as f64;
    // Allocations and the rest cost about a receipt each; the votes are what is left.
    let per_vote = (verify - per_receipt * (again.len() as f64 - votes)).max(0.0) / votes;
    println!(
        "steered ledger, {} holders voting on one proposal ({:.1} MB, {} entries): sign and record {:.0} votes/s; \
         verify from bytes {:.2} s in all, a vote {:.1} µs = {:.2} × a receipt (two signatures each); tally {} yes / {} no of {}",
        args.voters,
        bytes.len() as f64 / 1e6,
        again.len(),
        votes / take,
        verify,
        per_vote * 1e6,
        per_vote / per_receipt,
        tally.yes,
        tally.no,
        tally.power,
    );
    Ok(())
}
