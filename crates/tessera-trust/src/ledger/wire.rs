//! The ledger's bytes: each entry's binary encoding (the layout in the module docs above), its
//! decoding, which treats its input as hostile, and the message its signature covers.

use tessera_protocol::api::governance::{Signed, Tally};

use crate::{Identity, PublicKey};

use super::{Body, DOMAIN, Entry, MAGIC, MAX_ENTRY_BYTES};

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.0.extend_from_slice(b);
    }
    fn hex32(&mut self, h: &str) -> Result<(), String> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(h, &mut b).map_err(|_| format!("{h:?} is not 64 hex digits"))?;
        self.0.extend_from_slice(&b);
        Ok(())
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or("truncated")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        self.take(u32::from_le_bytes(a) as usize)
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "a string is not UTF-8".into())
    }
    fn hex32(&mut self) -> Result<String, String> {
        Ok(hex::encode(self.take(32)?))
    }
    fn flag(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format!("a flag byte is {v}")),
        }
    }
}

fn encode_body(w: &mut Writer, body: &Body) -> Result<(), String> {
    match body {
        Body::Genesis { run_id, policy } => {
            w.u8(0);
            w.bytes(run_id.as_bytes());
            w.bytes(&serde_json::to_vec(policy).map_err(|e| e.to_string())?);
        }
        Body::Validator { attestation } => {
            w.u8(1);
            w.bytes(&serde_json::to_vec(attestation).map_err(|e| e.to_string())?);
        }
        Body::Receipt { contributor, submission, score, data_fit, flag, units } => {
            w.u8(2);
            w.hex32(contributor)?;
            w.hex32(submission)?;
            w.u64(score.to_bits());
            match data_fit {
                Some(f) => {
                    w.u8(1);
                    w.u64(f.to_bits());
                }
                None => w.u8(0),
            }
            w.bytes(flag.as_bytes());
            w.u64(*units);
        }
        Body::Emission { units } => {
            w.u8(3);
            w.u64(*units);
        }
        Body::Usage { epoch, account, prompt_tokens, completion_tokens, revenue } => {
            w.u8(4);
            w.u64(*epoch);
            w.bytes(account.as_bytes());
            w.u64(*prompt_tokens);
            w.u64(*completion_tokens);
            w.u64(*revenue);
        }
        Body::Payout { epoch, holder, amount } => {
            w.u8(5);
            w.u64(*epoch);
            w.bytes(holder.as_bytes());
            w.u64(*amount);
        }
        Body::Root { size, root } => {
            w.u8(6);
            w.u64(*size);
            w.hex32(root)?;
        }
        Body::Allocation { holder, amount } => {
            w.u8(7);
            w.bytes(holder.as_bytes());
            w.u64(*amount);
        }
        Body::EpochClose { epoch, revenue, funding_ppm, funding, payable } => {
            w.u8(8);
            w.u64(*epoch);
            w.u64(*revenue);
            w.u64(u64::from(*funding_ppm));
            w.u64(*funding);
            w.u64(*payable);
        }
        Body::Funding { ppm } => {
            w.u8(9);
            w.u64(u64::from(*ppm));
        }
        Body::ValidatorFault { validator, task, agreed, detail } => {
            w.u8(10);
            w.bytes(validator.as_bytes());
            w.u64(u64::from(*task));
            w.u64(agreed.len() as u64);
            for a in agreed {
                w.bytes(a.as_bytes());
            }
            w.bytes(detail.as_bytes());
        }
        Body::Spec { spec } => {
            w.u8(11);
            w.bytes(spec.as_bytes());
        }
        Body::Proposal { signed } => {
            w.u8(12);
            signed_body(w, signed)?;
        }
        Body::Vote { signed } => {
            w.u8(13);
            signed_body(w, signed)?;
        }
        Body::Outcome { proposal, tally } => {
            w.u8(14);
            w.hex32(proposal)?;
            for v in [tally.yes, tally.no, tally.abstain, tally.power] {
                w.u64(v);
            }
            w.u8(u8::from(tally.passed));
        }
        Body::Applied { proposal, spec, checkpoint } => {
            w.u8(15);
            w.hex32(proposal)?;
            w.hex32(spec)?;
            w.hex32(checkpoint)?;
        }
    }
    Ok(())
}

/// A holder's signed message: its key, the message's bytes, the 64-byte signature.
fn signed_body(w: &mut Writer, s: &Signed) -> Result<(), String> {
    w.hex32(&s.holder)?;
    w.bytes(&hex::decode(&s.message).map_err(|_| "a signed message is not hex".to_string())?);
    let sig = hex::decode(&s.signature).map_err(|_| "a signature is not hex".to_string())?;
    if sig.len() != 64 {
        return Err("a signature is 64 bytes".into());
    }
    w.0.extend_from_slice(&sig);
    Ok(())
}

fn read_signed(r: &mut Reader) -> Result<Signed, String> {
    Ok(Signed { holder: r.hex32()?, message: hex::encode(r.bytes()?), signature: hex::encode(r.take(64)?) })
}

fn decode_body(r: &mut Reader) -> Result<Body, String> {
    Ok(match r.u8()? {
        0 => Body::Genesis {
            run_id: r.string()?,
            policy: serde_json::from_slice(r.bytes()?).map_err(|e| format!("policy: {e}"))?,
        },
        1 => Body::Validator {
            attestation: serde_json::from_slice(r.bytes()?).map_err(|e| format!("attestation: {e}"))?,
        },
        2 => Body::Receipt {
            contributor: r.hex32()?,
            submission: r.hex32()?,
            score: f64::from_bits(r.u64()?),
            data_fit: if r.flag()? { Some(f64::from_bits(r.u64()?)) } else { None },
            flag: r.string()?,
            units: r.u64()?,
        },
        3 => Body::Emission { units: r.u64()? },
        4 => Body::Usage {
            epoch: r.u64()?,
            account: r.string()?,
            prompt_tokens: r.u64()?,
            completion_tokens: r.u64()?,
            revenue: r.u64()?,
        },
        5 => Body::Payout { epoch: r.u64()?, holder: r.string()?, amount: r.u64()? },
        6 => Body::Root { size: r.u64()?, root: r.hex32()? },
        7 => Body::Allocation { holder: r.string()?, amount: r.u64()? },
        8 => Body::EpochClose {
            epoch: r.u64()?,
            revenue: r.u64()?,
            funding_ppm: u32::try_from(r.u64()?).map_err(|_| "funding_ppm is over u32".to_string())?,
            funding: r.u64()?,
            payable: r.u64()?,
        },
        9 => Body::Funding { ppm: u32::try_from(r.u64()?).map_err(|_| "funding ppm is over u32".to_string())? },
        10 => {
            let validator = r.string()?;
            let task = u32::try_from(r.u64()?).map_err(|_| "a task number is over u32".to_string())?;
            let count = r.u64()?;
            if count > 16 {
                return Err(format!("a fault agreed by {count} validators; at most 16"));
            }
            let agreed = (0..count).map(|_| r.string()).collect::<Result<_, _>>()?;
            Body::ValidatorFault { validator, task, agreed, detail: r.string()? }
        }
        11 => Body::Spec { spec: r.string()? },
        12 => Body::Proposal { signed: read_signed(r)? },
        13 => Body::Vote { signed: read_signed(r)? },
        14 => Body::Outcome {
            proposal: r.hex32()?,
            tally: Tally { yes: r.u64()?, no: r.u64()?, abstain: r.u64()?, power: r.u64()?, passed: r.flag()? },
        },
        15 => Body::Applied { proposal: r.hex32()?, spec: r.hex32()?, checkpoint: r.hex32()? },
        k => return Err(format!("unknown entry kind {k}")),
    })
}

/// The bytes a signature covers: everything up to and including the signer's key.
fn unsigned_bytes(
    seq: u64,
    round: u64,
    time_ms: i64,
    prev: &str,
    insecure: bool,
    body: &Body,
    signer: &PublicKey,
) -> Result<Vec<u8>, String> {
    let mut w = Writer(Vec::with_capacity(256));
    w.0.extend_from_slice(MAGIC);
    w.0.extend_from_slice(&[0; 4]);
    w.u64(seq);
    w.u64(round);
    w.u64(time_ms as u64);
    w.hex32(prev)?;
    w.u8(u8::from(insecure));
    encode_body(&mut w, body)?;
    w.0.extend_from_slice(&signer.0);
    let n = (w.0.len() - 8 + 64) as u32;
    w.0[4..8].copy_from_slice(&n.to_le_bytes());
    Ok(w.0)
}

pub(super) fn signing_message(unsigned: &[u8]) -> Vec<u8> {
    [DOMAIN, unsigned].concat()
}

/// Decodes one entry at the start of `bytes`: the entry and its encoded length.
pub fn decode_entry(bytes: &[u8]) -> Result<(Entry, usize), String> {
    if bytes.len() < 8 {
        return Err("truncated".into());
    }
    if &bytes[..4] != MAGIC {
        return Err("bad magic".into());
    }
    let n = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    if n > MAX_ENTRY_BYTES {
        return Err(format!("{n} bytes is over the {MAX_ENTRY_BYTES}-byte limit"));
    }
    let total = 8 + n;
    if bytes.len() < total || n < 64 + 32 {
        return Err("truncated".into());
    }
    let mut r = Reader { b: &bytes[..total - 96], at: 8 };
    let seq = r.u64()?;
    let round = r.u64()?;
    let time_ms = r.u64()? as i64;
    let prev = r.hex32()?;
    let insecure = r.flag()?;
    let body = decode_body(&mut r)?;
    if r.at != total - 96 {
        return Err("trailing bytes in the entry".into());
    }
    Ok((
        Entry {
            seq,
            round,
            time_ms,
            prev,
            insecure,
            body,
            signer: hex::encode(&bytes[total - 96..total - 64]),
            signature: hex::encode(&bytes[total - 64..total]),
        },
        total,
    ))
}

/// Signs and encodes an entry.
pub fn encode_entry(
    seq: u64,
    round: u64,
    time_ms: i64,
    prev: &str,
    insecure: bool,
    body: &Body,
    signer: &Identity,
) -> Result<Vec<u8>, String> {
    let mut b = unsigned_bytes(seq, round, time_ms, prev, insecure, body, &signer.public())?;
    let sig = signer.sign(&signing_message(&b));
    b.extend_from_slice(&sig);
    Ok(b)
}
