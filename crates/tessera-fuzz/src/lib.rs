//! Every decoder of bytes from outside, as a fuzz target: a function that takes any bytes and
//! must return (an error is fine) without panicking, hanging or allocating without bound.
//!
//! `fuzz/fuzz_targets/*.rs` hand these to libFuzzer (`cargo +nightly fuzz run NAME`); the test
//! suite replays every kept input under `fuzz/corpus/NAME/` and random ones through them, so a
//! crash once found stays fixed without nightly.

use std::sync::OnceLock;

use tessera_protocol::api::AttestationPolicy;
use tessera_protocol::codec::Codec;
use tessera_protocol::pseudograd::{MessageView, PseudoGradient};
use tessera_protocol::{TensorSpec, decode_weights};
use tessera_trust::identity::{CONTENT_HEADER, KEY_HEADER, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use tessera_trust::{Audience, Evidence, OpeningKey, PublicKey, SealedHeader, ValidatorAttestation};

// The OpenAI request parser is compiled here from its own source, without the server's
// libtorch engine.
#[path = "../../tessera-serve/src/openai.rs"]
#[allow(dead_code)]
mod openai;

/// A fuzz target: any bytes in, no panic out.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/NAME.rs` and `fuzz/corpus/NAME/` know it.
pub const TARGETS: &[(&str, Target)] = &[
    ("message", message),
    ("envelope", envelope),
    ("attestation", attestation),
    ("ledger", ledger),
    ("request_head", request_head),
    ("data", data),
    ("openai", openai_request),
    ("governance", governance),
    ("serving", serving),
];

/// Decoded values at most: a length field cannot make a target allocate more than this.
const MAX_VALUES: u64 = 1 << 20;

/// A pseudo-gradient message (parse, then decode each tensor), a codec's encoded tensor, or a
/// checkpoint's weights, as the first byte chooses.
pub fn message(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => {
            if let Ok(view) = MessageView::parse(rest) {
                let _ = view.tensors.len();
            }
            if let Ok(g) = PseudoGradient::from_bytes(rest) {
                for i in 0..g.view().tensors.len() {
                    if g.view().tensors[i].shape.iter().product::<u64>() <= MAX_VALUES {
                        let _ = g.decode_tensor(i);
                    }
                }
            }
        }
        1 => {
            // codec parameters and a length, then the encoded bytes
            if rest.len() < 7 {
                return;
            }
            let a = u16::from_le_bytes([rest[1], rest[2]]) as u32;
            let b = u16::from_le_bytes([rest[3], rest[4]]) as u32;
            let n = u16::from_le_bytes([rest[5], rest[6]]) as u64;
            let codec = match rest[0] % 5 {
                0 => Codec::F32,
                1 => Codec::Bf16,
                2 => Codec::Int8 { block: a },
                3 => Codec::Int4 { block: a },
                _ => Codec::TopK { chunk: a, k: b },
            };
            if codec.validate().is_ok() {
                let _ = codec.decode(&rest[7..], n);
            }
        }
        _ => {
            let table =
                [TensorSpec { name: "a".into(), shape: vec![3, 5] }, TensorSpec { name: "b".into(), shape: vec![7] }];
            let _ = decode_weights(rest, &table);
        }
    }
}

fn opening_key() -> &'static OpeningKey {
    static KEY: OnceLock<OpeningKey> = OnceLock::new();
    KEY.get_or_init(|| OpeningKey::generate().expect("the OS gives randomness"))
}

/// A sealed submission's clear header, and opening it.
pub fn envelope(data: &[u8]) {
    let _ = SealedHeader::parse(data);
    let _ = opening_key().open(data);
}

const SEV_VCEK: &[u8] = include_bytes!("../../tessera-trust/testdata/vcek_milan.der");
const TDX_COLLATERAL: &str = include_str!("../../tessera-trust/testdata/tdx_quote_collateral.json");

/// Attestation evidence: an SEV-SNP report (with the sample VCEK), a TDX quote (with the sample
/// collateral), or a whole `ValidatorAttestation` in JSON, as the first byte chooses.
pub fn attestation(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let policy = AttestationPolicy::default();
    let expected = [0u8; 64];
    let evidence = match mode % 3 {
        0 => Evidence::SevSnp { report: hex::encode(rest), vcek: hex::encode(SEV_VCEK) },
        1 => match serde_json::from_str(TDX_COLLATERAL) {
            Ok(collateral) => Evidence::Tdx { quote: hex::encode(rest), collateral },
            Err(_) => return,
        },
        _ => {
            if let Ok(a) = serde_json::from_slice::<ValidatorAttestation>(rest) {
                let _ = a.verify(&policy, 1_750_000_000);
            }
            return;
        }
    };
    let _ = tessera_trust::attest::verify(&evidence, &policy, &expected, 1_750_000_000);
}

/// Ledger bytes: one entry, and a whole ledger through its verifier.
pub fn ledger(data: &[u8]) {
    let _ = tessera_trust::ledger::decode_entry(data);
    let _ = tessera_trust::ledger::Ledger::from_bytes(data);
}

/// A steered run's spec, for [`governance`]: two phases, a contest, and every bound set.
fn steered_spec() -> &'static tessera_protocol::RunSpec {
    static SPEC: OnceLock<tessera_protocol::RunSpec> = OnceLock::new();
    SPEC.get_or_init(|| {
        let t = serde_json::json!([{"name": "w", "shape": [4, 8]}]);
        serde_json::from_value(serde_json::json!({
            "name": "fuzz", "model": {}, "tensors": t,
            "data": {"name": "e", "fingerprint": "f", "source": {"kind": "embedded", "seed": 1, "train_chars": 10, "val_chars": 10}},
            "inner": {"batch_size": 1, "seq_len": 8, "lr": 0.001, "min_lr": 0.0001, "warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 0.1},
            "inner_steps": 5, "rounds": 20, "outer": {"lr": 0.7, "momentum": 0.9, "nesterov": true},
            "codec": "f32", "broadcast_codec": "f32", "quorum": 2, "round_deadline_ms": 1000, "max_staleness": 1,
            "staleness_decay": 0.5, "seed": 1,
            "contest": {"reward_units": 100, "reward_power": 2.0, "top": null, "eval_windows": 4, "fit_windows": 4,
                        "score_timeout_ms": 1000, "promote_top": 3},
            "phases": [{"name": "two", "model": {}, "tensors": t, "rounds": 10, "seed": 2}],
            "governance": {"voting_rounds": 2, "quorum_ppm": 1000, "threshold_ppm": 500001, "bounds": {
                "inner_steps": [1, 100], "quorum": [1, 10], "outer_lr": [0.1, 1.0], "codecs": ["int8:64", "bf16"],
                "phase_start": [1, 1000], "phase_loss": [0.0, 10.0], "promote_top": [1, 50], "releases": true}}
        }))
        .expect("the fuzz target's spec")
    })
}

/// A holder's governance message as the hub takes it: the `Signed` body and its signature, and
/// (whether or not a signature holds) the message inside as a proposal — its change applied to a
/// steered spec, at a round the first byte names — or a vote.
pub fn governance(data: &[u8]) {
    if let Ok(signed) = serde_json::from_slice::<tessera_protocol::api::governance::Signed>(data) {
        let _ = tessera_trust::ledger::verify_governance(&signed);
    }
    let Some((&at, rest)) = data.split_first() else { return };
    if let Ok(p) = serde_json::from_slice::<tessera_protocol::api::governance::ProposalMessage>(rest) {
        let _ = p.change.describe();
        if let Ok(next) = p.change.apply(steered_spec(), u64::from(at)) {
            let _ = tessera_trust::ledger::spec_hash(&next);
        }
    }
    let _ = serde_json::from_slice::<tessera_protocol::api::governance::VoteMessage>(rest);
}

/// A signed request's headers: five values split at NUL bytes.
pub fn request_head(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let values: Vec<&str> = (0..5).map(|_| parts.next().unwrap_or("")).collect();
    let names = [KEY_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER, CONTENT_HEADER];
    let header = |name: &str| names.iter().position(|n| *n == name).map(|i| values[i]);
    let audience = Audience { hub_key: PublicKey([7; 32]), run_id: "00112233445566778899aabbccddeeff".into() };
    if let Ok(head) =
        tessera_trust::verify_request_head(header, &audience, "POST", "/v1/submissions", 1_750_000_000_000)
    {
        let _ = head.check_body(data);
    }
}

/// A dataset's manifest, or one of its shards, as the first byte chooses.
pub fn data(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        if let Ok((m, _)) = tessera_data::Manifest::parse(rest) {
            let _ = m.check();
        }
    } else {
        let _ = tessera_data::shard::Shard::decode(rest);
        let entry = tessera_data::manifest::ShardEntry {
            hash: tessera_data::manifest::hash_hex(rest),
            split: tessera_data::manifest::Split::Train,
            tokens: 16,
            documents: 1,
            bytes: rest.len() as u64,
            sources: Vec::new(),
        };
        let _ = tessera_data::manifest::decode_shard(rest, &entry, 1000);
    }
}

/// An OpenAI completion or chat request body.
pub fn openai_request(data: &[u8]) {
    let _ = openai::parse_completion(data);
    if let Ok(chat) = openai::parse_chat(data) {
        let _ = openai::chat_prompt(&chat.messages);
    }
}

/// What a client of attested serving decodes (a report, a signature, a signed stream) and what
/// the server opens (a sealed request), as the first byte chooses.
pub fn serving(data: &[u8]) {
    use tessera_trust::serving::{self, Expected, ResponseSignature, ServerAttestation};
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => {
            if let Ok(a) = serde_json::from_slice::<ServerAttestation>(rest) {
                let _ = a.report_data();
                let policy = tessera_trust::AttestationPolicy { allow_insecure_dev: true, ..Default::default() };
                let _ = a.verify(&policy, &Expected::default(), 0);
            }
        }
        1 => {
            if let Ok(s) = serde_json::from_slice::<ResponseSignature>(rest) {
                let key = tessera_trust::PublicKey([9; 32]);
                let _ = s.verify(&key, &s.id.clone(), rest, rest);
            }
        }
        2 => {
            if let Ok(opener) = tessera_trust::OpeningKey::generate() {
                let client = opener.public().clone();
                let _ = serving::open_request(&opener, &client, rest);
                let _ = serving::open_response(&opener, b"request", 0, rest);
            }
        }
        _ => {
            let _ = serving::split_stream(rest);
        }
    }
}
