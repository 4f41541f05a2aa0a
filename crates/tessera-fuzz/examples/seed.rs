//! Writes a starting corpus of valid inputs for every fuzz target under the directory given
//! (`fuzz/corpus`): libFuzzer mutates structure it is shown far better than noise.
//!
//! `cargo run -p tessera-fuzz --example seed -- fuzz/corpus`

use std::path::Path;

use tessera_protocol::codec::Codec;
use tessera_protocol::pseudograd::PseudoGradient;
use tessera_protocol::{TensorSpec, encode_weights};
use tessera_trust::ledger::{Body, Ledger};
use tessera_trust::{Audience, Evidence, Identity, OpeningKey, PublicKey, SealedHeader, ValidatorAttestation};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: seed DIR (e.g. fuzz/corpus)")?;
    let dir = Path::new(&dir);
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();

    let values: Vec<f32> = (0..96).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
    for (tag, codec) in [
        (0u8, Codec::F32),
        (1, Codec::Bf16),
        (2, Codec::Int8 { block: 16 }),
        (3, Codec::Int4 { block: 16 }),
        (4, Codec::TopK { chunk: 32, k: 4 }),
    ] {
        let shapes: [&[u64]; 2] = [&[8, 8], &[32]];
        let g = PseudoGradient::build(
            codec,
            [1; 16],
            3,
            [2; 32],
            [("w", shapes[0], &values[..64]), ("b", shapes[1], &values[64..])],
        )?;
        seeds.push(("message", [&[0u8][..], &g.to_bytes()].concat()));
        let encoded = codec.encode(&values)?;
        let (a, b) = match codec {
            Codec::Int8 { block } | Codec::Int4 { block } => (block, 0),
            Codec::TopK { chunk, k } => (chunk, k),
            _ => (0, 0),
        };
        let mut raw = vec![1u8, tag];
        raw.extend_from_slice(&(a as u16).to_le_bytes());
        raw.extend_from_slice(&(b as u16).to_le_bytes());
        raw.extend_from_slice(&(values.len() as u16).to_le_bytes());
        raw.extend_from_slice(&encoded);
        seeds.push(("message", raw));
    }
    let table = [TensorSpec { name: "a".into(), shape: vec![3, 5] }, TensorSpec { name: "b".into(), shape: vec![7] }];
    seeds.push(("message", [&[2u8][..], &encode_weights(&table, &[&values[..15], &values[..7]])?].concat()));

    let validator = OpeningKey::generate()?;
    let contributor = Identity::generate()?;
    let header = SealedHeader {
        run_id: [1; 16],
        base_round: 3,
        base_checkpoint: [2; 32],
        contributor: contributor.public(),
        recipient: validator.public().fingerprint(),
    };
    seeds.push((
        "envelope",
        validator.public().seal(
            header,
            &values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
            &contributor,
        )?,
    ));

    let trust = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tessera-trust/testdata");
    let report = std::fs::read_to_string(trust.join("report_milan.hex"))?;
    seeds.push(("attestation", [&[0u8][..], &hex::decode(report.trim())?].concat()));
    seeds.push(("attestation", [&[1u8][..], &std::fs::read(trust.join("tdx_quote.bin"))?].concat()));
    let signing = Identity::generate()?;
    let attestation = ValidatorAttestation {
        sealing_key: hex::encode(validator.public().0),
        signing_key: signing.public().hex(),
        evidence: Evidence::insecure_dev(
            &tessera_trust::report_data(&validator.public().0, &signing.public().0),
            "dev",
        ),
    };
    seeds.push(("attestation", [&[2u8][..], &serde_json::to_vec(&attestation)?].concat()));

    let hub = Identity::generate()?;
    let mut ledger = Ledger::default();
    let policy = tessera_protocol::api::AttestationPolicy { allow_insecure_dev: true, ..Default::default() };
    ledger.append(0, 1_000, false, Body::Genesis { run_id: "seed".into(), policy }, &hub)?;
    seeds.push(("ledger", ledger.bytes().to_vec()));
    // A steered run's governance: a spec, a holder's proposal and vote, the tally, the change.
    let holder = Identity::generate()?;
    let spec = serde_json::json!({"name": "seed", "model": {}, "tensors": [{"name": "w", "shape": [2, 2]}],
        "data": {"name": "e", "fingerprint": "f", "source": {"kind": "embedded", "seed": 1, "train_chars": 10, "val_chars": 10}},
        "inner": {"batch_size": 1, "seq_len": 8, "lr": 0.001, "min_lr": 0.0001, "warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 0.1},
        "inner_steps": 5, "rounds": 9, "outer": {"lr": 0.7, "momentum": 0.9, "nesterov": true}, "codec": "f32",
        "broadcast_codec": "f32", "quorum": 2, "round_deadline_ms": 1000, "max_staleness": 1, "staleness_decay": 0.5,
        "seed": 1, "governance": {"voting_rounds": 1, "quorum_ppm": 1000, "threshold_ppm": 500001,
        "bounds": {"inner_steps": [1, 10], "releases": true}}});
    let mut steered = Ledger::default();
    let policy = tessera_protocol::api::AttestationPolicy { allow_insecure_dev: true, ..Default::default() };
    steered.append(0, 1, false, Body::Genesis { run_id: "seed".into(), policy }, &hub)?;
    steered.append(0, 1, false, Body::Spec { spec: spec.to_string() }, &hub)?;
    steered.append(0, 1, false, Body::Allocation { holder: holder.public().hex(), amount: 10 }, &hub)?;
    let change = tessera_protocol::api::governance::Change::InnerSteps { value: 7 };
    let proposal = tessera_protocol::api::governance::ProposalMessage {
        run_id: "seed".into(),
        title: "seed".into(),
        change: change.clone(),
        apply_at: None,
        time_ms: 1,
    };
    let bytes = serde_json::to_vec(&proposal)?;
    let signed = tessera_trust::ledger::sign_governance(&holder, &bytes);
    seeds.push(("governance", serde_json::to_vec(&signed)?));
    seeds.push(("governance", [&[1u8][..], &bytes].concat()));
    let id = blake3::hash(&bytes).to_hex().to_string();
    steered.append(0, 2, false, Body::Proposal { signed }, &hub)?;
    let vote = tessera_protocol::api::governance::VoteMessage {
        run_id: "seed".into(),
        proposal: id.clone(),
        choice: tessera_protocol::api::governance::Choice::Yes,
        time_ms: 2,
    };
    let vote = serde_json::to_vec(&vote)?;
    seeds.push(("governance", [&[0u8][..], &vote].concat()));
    steered.append(0, 2, false, Body::Vote { signed: tessera_trust::ledger::sign_governance(&holder, &vote) }, &hub)?;
    let tally = tessera_protocol::api::governance::Tally { yes: 10, no: 0, abstain: 0, power: 10, passed: true };
    steered.append(1, 3, false, Body::Outcome { proposal: id.clone(), tally }, &hub)?;
    let next: tessera_protocol::RunSpec = serde_json::from_value(spec)?;
    let next = change.apply(&next, 1)?;
    let applied =
        Body::Applied { proposal: id, spec: tessera_trust::ledger::spec_hash(&next), checkpoint: "ab".repeat(32) };
    steered.append(1, 3, false, applied, &hub)?;
    let root = Body::Root { size: steered.len(), root: steered.root() };
    steered.append(1, 3, false, root, &hub)?;
    seeds.push(("ledger", steered.bytes().to_vec()));

    let audience = Audience { hub_key: PublicKey([7; 32]), run_id: "00112233445566778899aabbccddeeff".into() };
    let signed = contributor.sign_request(&audience, "POST", "/v1/submissions", b"body", 1_750_000_000_000)?;
    seeds.push(("request_head", signed.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>().join("\0").into_bytes()));

    let tmp = std::env::temp_dir().join(format!("tessera-seed-{}", std::process::id()));
    let spec = tessera_data::SyntheticSpec::default();
    let (manifest, _) = tessera_data::Dataset::synthetic(spec, 4_000, 400)?.write_manifest(&tmp, 256)?;
    seeds.push(("data", [&[0u8][..], &manifest.to_bytes()].concat()));
    let first = &manifest.shards[0];
    let shard = std::fs::read(tmp.join(tessera_data::manifest::shard_path(&first.hash)))?;
    seeds.push(("data", [&[1u8][..], &shard].concat()));
    let _ = std::fs::remove_dir_all(&tmp);

    for body in [
        r#"{"model":"tiny","prompt":"Once upon","max_tokens":16,"temperature":0.7,"top_p":0.9,"stop":["\n","END"],"seed":3,"stream":true}"#,
        r#"{"model":"tiny","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":5,"stream_options":{"include_usage":true}}"#,
    ] {
        seeds.push(("openai", body.as_bytes().to_vec()));
    }

    for (target, bytes) in &seeds {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        let name = blake3::hash(bytes).to_hex();
        std::fs::write(d.join(&name[..16]), bytes)?;
    }
    println!("{} seeds written under {}", seeds.len(), dir.display());
    Ok(())
}
