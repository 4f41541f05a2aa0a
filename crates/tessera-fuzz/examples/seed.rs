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
