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
    Ok(())
}
