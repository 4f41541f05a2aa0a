//! The reward ledger: an append-only log of signed entries, hash-chained, committed by signed
//! Merkle roots (RFC 6962, through `ct-merkle`), that anyone can verify from its bytes alone.
//!
//! ```text
//! entry   offset  size  field
//!              0     4  magic "TLE1"
//!              4     4  length n of the rest (u32 LE)
//!              8     8  seq: its index in the log (u64 LE)
//!             16     8  round
//!             24     8  time (Unix ms, i64 LE)
//!             32    32  prev: BLAKE3 of the previous entry's bytes (zeros for the first)
//!             64     1  insecure: 1 if signed by a validator with no TEE behind it
//!             65     1  kind (see `Body`), then its fields
//!              …    32  signer's Ed25519 key
//!              …    64  signature over everything before it, under the domain "tessera-ledger-v1"
//! ```
//!
//! Integers are little-endian; strings and byte strings are a u32 length then the bytes; an
//! optional f64 is a presence byte then its bits. A ledger file is its entries back to back, in
//! order; a leaf of the Merkle tree is an entry's bytes.
//!
//! Who may sign what: the genesis entry (first, and only first) names the run, the hub's key and
//! the attestation policy. A `Validator` entry is signed by the key its attestation binds and must
//! verify under the genesis policy; receipts, emissions and roots are signed by a validator so
//! introduced, and carry its insecure flag; allocations, usage, epoch closings and payouts are
//! signed by the hub; a root may be signed by a validator or by the hub (each commits what it
//! added).
//!
//! The economy: a holder's balance is its allocations (e.g. the sale that funded the run) plus
//! the reward units its key earned in receipts. An `EpochClose` fixes an epoch's revenue (the
//! sum of its usage entries), the share that funds the next phase, and what is paid out; the
//! payouts must follow it immediately, one per holder with a non-zero share in holder order, each
//! exactly its largest-remainder share of the payable amount by balance ([`split_pro_rata`]), so
//! they sum to it exactly. No usage may be added to an epoch once it is closed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use ct_merkle::mem_backed_tree::MemoryBackedTree;
use ct_merkle::{InclusionProof, RootHash};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use tessera_protocol::api::governance::{Signed, Tally};

use crate::{AttestationPolicy, Identity, PublicKey, ValidatorAttestation, Verified};

mod governance;
mod wire;

pub use governance::{Proposal, sign_governance, spec_hash, verify_governance};
use wire::signing_message;
pub use wire::{decode_entry, encode_entry};

const MAGIC: &[u8; 4] = b"TLE1";
const DOMAIN: &[u8] = b"tessera-ledger-v1";
/// Largest entry accepted (a TDX attestation with its collateral is about 50 kB).
pub const MAX_ENTRY_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LedgerError {
    #[error("entry at byte {offset}: malformed: {reason}")]
    Malformed { offset: usize, reason: String },
    #[error("entry {index} says it is entry {seq}: entries were deleted, inserted or reordered")]
    OutOfOrder { index: u64, seq: u64 },
    #[error("entry {seq}: does not chain to the entry before it (altered, or something before it was)")]
    BrokenChain { seq: u64 },
    #[error("entry {seq}: bad signature")]
    BadSignature { seq: u64 },
    #[error("entry {seq}: signed by {signer}, who may not sign a {kind}")]
    UnknownSigner { seq: u64, signer: String, kind: &'static str },
    #[error("entry {seq}: the genesis entry must come first, and only once")]
    Genesis { seq: u64 },
    #[error("entry {seq}: validator attestation refused: {reason}")]
    BadAttestation { seq: u64, reason: String },
    #[error("entry {seq}: its insecure flag does not match its signer's attestation")]
    HiddenInsecurity { seq: u64 },
    #[error("entry {seq}: Merkle root does not match the entries before it")]
    BadRoot { seq: u64 },
    #[error("round {round}: receipts pay {receipts} units but the round emitted {emitted}")]
    Unbalanced { round: u64, receipts: u64, emitted: u64 },
    #[error("epoch {epoch}: payouts {paid} exceed the epoch's revenue {revenue}")]
    Overpaid { epoch: u64, paid: u64, revenue: u64 },
    #[error("entry {seq}: {reason}")]
    Economy { seq: u64, reason: String },
    #[error("entry {seq}: {reason}")]
    Governance { seq: u64, reason: String },
    #[error("entries from {from} on are not committed by a signed root")]
    Uncommitted { from: u64 },
    #[error("the ledger is empty")]
    Empty,
}

impl LedgerError {
    /// A short stable name of the kind of tamper, for tests and tools.
    pub fn name(&self) -> &'static str {
        match self {
            LedgerError::Malformed { .. } => "malformed",
            LedgerError::OutOfOrder { .. } => "out-of-order",
            LedgerError::BrokenChain { .. } => "broken-chain",
            LedgerError::BadSignature { .. } => "bad-signature",
            LedgerError::UnknownSigner { .. } => "unknown-signer",
            LedgerError::Genesis { .. } => "genesis",
            LedgerError::BadAttestation { .. } => "bad-attestation",
            LedgerError::HiddenInsecurity { .. } => "hidden-insecurity",
            LedgerError::BadRoot { .. } => "bad-root",
            LedgerError::Unbalanced { .. } => "unbalanced",
            LedgerError::Overpaid { .. } => "overpaid",
            LedgerError::Economy { .. } => "economy",
            LedgerError::Governance { .. } => "governance",
            LedgerError::Uncommitted { .. } => "uncommitted",
            LedgerError::Empty => "empty",
        }
    }
}

/// What an entry records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    /// The run, the hub's key and the attestation policy validators must meet. Signed by the hub.
    Genesis { run_id: String, policy: AttestationPolicy },
    /// A validator's keys and their attestation. Signed by the key it attests.
    Validator { attestation: ValidatorAttestation },
    /// One scored submission and what it earned.
    Receipt {
        contributor: String,
        /// Hex BLAKE3 of the sealed submission.
        submission: String,
        score: f64,
        data_fit: Option<f64>,
        /// Why it earned nothing, if it did not (`copy`, `non_positive`, `malformed`…); empty if not.
        flag: String,
        units: u64,
    },
    /// The units a round emitted: its receipts' units sum to exactly this.
    Emission { units: u64 },
    /// Tokens served to an API account in an epoch, and the revenue they brought. Signed by the hub.
    Usage { epoch: u64, account: String, prompt_tokens: u64, completion_tokens: u64, revenue: u64 },
    /// Revenue paid to a holder for an epoch. Signed by the hub.
    Payout { epoch: u64, holder: String, amount: u64 },
    /// Tokens allocated to a holder outside of rewards (the sale that funded the run). Signed by
    /// the hub, and only among the run's opening entries: nobody can dilute holders later.
    Allocation { holder: String, amount: u64 },
    /// The share of each epoch's revenue (parts per million) that funds the next phase, fixed
    /// once among the run's opening entries; every epoch closing uses it. Signed by the hub.
    Funding { ppm: u32 },
    /// The end of an epoch: its revenue (the sum of its usage entries), the part that funds the
    /// next phase (`revenue · funding_ppm / 10⁶`, rounded down; all of it when no one holds
    /// anything) and the rest, paid out by the payouts that follow. Signed by the hub.
    EpochClose { epoch: u64, revenue: u64, funding_ppm: u32, funding: u64, payable: u64 },
    /// The Merkle root of the first `size` entries (all before this one). Signed by a validator.
    Root { size: u64, root: String },
    /// A validator's result on a scoring task that the other validators who scored it
    /// contradicted (a run scored by many validators; the entry's round is the task's round).
    /// Signed by the hub, which compared them.
    ValidatorFault { validator: String, task: u32, agreed: Vec<String>, detail: String },
    /// The run's spec as created (its JSON), among the opening entries: what every later
    /// change is applied to. Signed by the hub.
    Spec { spec: String },
    /// A holder's proposal, as the holder signed it; its id is the BLAKE3 of the message, and
    /// the balances at this entry are its snapshot. Recorded (signed) by the hub.
    Proposal { signed: Signed },
    /// A holder's vote, as the holder signed it. Recorded (signed) by the hub.
    Vote { signed: Signed },
    /// A closed vote's tally, which must equal the one its recorded votes give. Signed by the hub.
    Outcome { proposal: String, tally: Tally },
    /// A passed proposal applied at the round it names: the hex BLAKE3 of the spec after it
    /// (unchanged for a release) and the checkpoint the run held then. Signed by the hub.
    Applied { proposal: String, spec: String, checkpoint: String },
}

impl Body {
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Genesis { .. } => "genesis",
            Body::Validator { .. } => "validator",
            Body::Receipt { .. } => "receipt",
            Body::Emission { .. } => "emission",
            Body::Usage { .. } => "usage",
            Body::Payout { .. } => "payout",
            Body::Allocation { .. } => "allocation",
            Body::Funding { .. } => "funding",
            Body::EpochClose { .. } => "epoch close",
            Body::Root { .. } => "root",
            Body::ValidatorFault { .. } => "validator fault",
            Body::Spec { .. } => "spec",
            Body::Proposal { .. } => "proposal",
            Body::Vote { .. } => "vote",
            Body::Outcome { .. } => "outcome",
            Body::Applied { .. } => "applied change",
        }
    }
}

/// One decoded entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub round: u64,
    pub time_ms: i64,
    /// Hex BLAKE3 of the previous entry.
    pub prev: String,
    pub insecure: bool,
    pub body: Body,
    pub signer: String,
    pub signature: String,
}

/// The economy a ledger records, for reports (`GET /v1/economy`, `tessera economy report --json`).
#[derive(Debug, Clone, Serialize)]
pub struct Economy {
    pub epochs: BTreeMap<u64, ClosedEpoch>,
    /// Per epoch and account: (prompt tokens, completion tokens, revenue).
    pub usage: BTreeMap<u64, BTreeMap<String, (u64, u64, u64)>>,
    pub balances: BTreeMap<String, u64>,
    pub allocations: BTreeMap<String, u64>,
    pub reward_units: BTreeMap<String, u64>,
    pub payouts: BTreeMap<String, u64>,
}

/// What an epoch closing fixed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClosedEpoch {
    pub revenue: u64,
    pub funding_ppm: u32,
    pub funding: u64,
    pub payable: u64,
    /// Holders with a balance when it closed, and their balances' sum.
    pub holders: u64,
    pub balance_total: u64,
}

/// An epoch's revenue split into (funding for the next phase, payable to holders): the funding
/// is `revenue · funding_ppm / 10⁶` rounded down, or all of it when no one holds anything.
pub fn epoch_split(revenue: u64, funding_ppm: u32, balances: &BTreeMap<String, u64>) -> (u64, u64) {
    if balances.values().all(|&b| b == 0) {
        return (revenue, 0);
    }
    let funding = (u128::from(revenue) * u128::from(funding_ppm.min(1_000_000)) / 1_000_000) as u64;
    (funding, revenue - funding)
}

/// `amount` split pro rata to `balances` by the largest-remainder method: each holder gets the
/// floor of its exact share, and the units left over go one each to the largest remainders
/// (ties to the holder that sorts first). The parts sum to `amount` exactly and each is within
/// one unit of the exact share. Holders with nothing to receive are left out; in holder order.
pub fn split_pro_rata(amount: u64, balances: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let weights = balances.iter().map(|(h, &b)| (h.clone(), u128::from(b)));
    // Each part is at most `amount`, so it fits a u64.
    tessera_split::pro_rata(u128::from(amount), weights).into_iter().map(|(h, a)| (h, a as u64)).collect()
}

/// A validator known to the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KnownValidator {
    pub key: String,
    pub seq: u64,
    pub kind: String,
    pub measurement: String,
    /// What its attestation established of the platform's TCB (`Verified::tcb`).
    pub tcb: String,
    pub insecure: bool,
}

impl KnownValidator {
    /// What verifying its attestation (at its entry's time) established.
    pub fn verified(&self) -> Verified {
        Verified {
            kind: self.kind.clone(),
            measurement: self.measurement.clone(),
            tcb: self.tcb.clone(),
            insecure: self.insecure,
        }
    }
}

/// An inclusion proof of one entry under a signed root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proof {
    pub seq: u64,
    /// The entry's bytes (hex).
    pub entry: String,
    /// The root entry that commits to it, its bytes (hex).
    pub root_entry: String,
    /// Sibling hashes, leaf to root (hex SHA-256 each, concatenated).
    pub path: String,
}

/// A verified ledger, and what it says.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    bytes: Vec<u8>,
    /// Byte offset of each entry.
    offsets: Vec<usize>,
    tree: MemoryBackedTree<Sha256, Vec<u8>>,
    last_hash: [u8; 32],
    hub: Option<PublicKey>,
    run_id: String,
    policy: AttestationPolicy,
    validators: BTreeMap<PublicKey, KnownValidator>,
    /// Receipts' units per round not yet matched by an emission.
    pending: BTreeMap<u64, u64>,
    emitted: BTreeMap<u64, u64>,
    revenue: HashMap<u64, u64>,
    paid: HashMap<u64, u64>,
    /// Reward units per contributor key, and payouts per holder.
    pub units: BTreeMap<String, u64>,
    pub payouts: BTreeMap<String, u64>,
    /// Allocated tokens per holder.
    pub allocations: BTreeMap<String, u64>,
    /// Closed epochs, by number.
    pub epochs: BTreeMap<u64, ClosedEpoch>,
    /// Usage per epoch and account: (prompt tokens, completion tokens, revenue).
    pub usage: BTreeMap<u64, BTreeMap<String, (u64, u64, u64)>>,
    /// Payouts the last epoch closing still owes, in order.
    owed: std::collections::VecDeque<(u64, String, u64)>,
    /// Seq of the last root entry, if any.
    last_root: Option<u64>,
    /// The tree of the entries under the last root, built by the first proof asked for after
    /// it (so proofs cost O(log n) each, and one O(n) build per root that is asked about).
    root_tree: std::sync::OnceLock<Arc<MemoryBackedTree<Sha256, Vec<u8>>>>,
    /// Set by the first entry that is not one of the run's opening entries (genesis,
    /// allocations, the funding share): from then on none of those is accepted.
    opened: bool,
    /// The funding share the opening entries fixed, if they fixed one.
    pub funding_ppm: Option<u32>,
    /// Scoring tasks on which each validator (by name) was contradicted by the others.
    pub faults: BTreeMap<String, u64>,
    /// The spec, proposals, votes and applied changes (`governance`).
    gov: governance::Governance,
}

impl Ledger {
    /// Verifies a whole ledger from its bytes (see the module docs for what is checked).
    pub fn from_bytes(bytes: &[u8]) -> Result<Ledger, LedgerError> {
        let mut ledger = Ledger::default();
        ledger.extend(bytes)?;
        if ledger.offsets.is_empty() {
            return Err(LedgerError::Empty);
        }
        ledger.check_committed()?;
        Ok(ledger)
    }

    /// Appends entries (their bytes back to back), checking each; on error nothing is appended.
    /// One entry is checked and appended in place (its check changes nothing until it has
    /// passed); several are appended to a copy that replaces this ledger once all passed.
    pub fn extend(&mut self, bytes: &[u8]) -> Result<(), LedgerError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let (entry, n) =
            decode_entry(bytes).map_err(|reason| LedgerError::Malformed { offset: self.bytes.len(), reason })?;
        if n == bytes.len() {
            return self.append_checked(&entry, bytes);
        }
        let mut next = self.clone();
        let mut at = 0;
        while at < bytes.len() {
            let offset = self.bytes.len() + at;
            let (entry, n) = decode_entry(&bytes[at..]).map_err(|reason| LedgerError::Malformed { offset, reason })?;
            next.append_checked(&entry, &bytes[at..at + n])?;
            at += n;
        }
        *self = next;
        Ok(())
    }

    /// Checks entry `e` (its bytes `raw`) and appends it. Atomic: every check of an arm comes
    /// before its first change, so a refused entry leaves the ledger as it was.
    fn append_checked(&mut self, e: &Entry, raw: &[u8]) -> Result<(), LedgerError> {
        // Long on purpose: one match arm per entry kind, each the whole rule for that kind,
        // so the verifier reads as its specification.
        let index = self.offsets.len() as u64;
        let seq = e.seq;
        if seq != index {
            return Err(LedgerError::OutOfOrder { index, seq });
        }
        if e.prev != hex::encode(self.last_hash) {
            return Err(LedgerError::BrokenChain { seq });
        }
        let signer = PublicKey::parse(&e.signer).map_err(|_| LedgerError::BadSignature { seq })?;
        signer
            .verify(&signing_message(&raw[..raw.len() - 64]), &raw[raw.len() - 64..])
            .map_err(|_| LedgerError::BadSignature { seq })?;
        let kind = e.body.kind();
        let unknown = || LedgerError::UnknownSigner { seq, signer: e.signer.clone(), kind };
        let by_validator = |l: &Ledger| -> Result<(), LedgerError> {
            let v = l.validators.get(&signer).ok_or_else(unknown)?;
            if v.insecure != e.insecure {
                return Err(LedgerError::HiddenInsecurity { seq });
            }
            Ok(())
        };
        let by_hub = |l: &Ledger| if l.hub == Some(signer) && !e.insecure { Ok(()) } else { Err(unknown()) };
        let economy = |reason: String| LedgerError::Economy { seq, reason };
        let governance = |reason: String| LedgerError::Governance { seq, reason };
        if !self.owed.is_empty() && !matches!(e.body, Body::Payout { .. }) {
            return Err(economy(format!(
                "a {kind} before the {} payouts the last epoch closing owes",
                self.owed.len()
            )));
        }
        // (A second genesis is refused as such below.)
        let opening =
            matches!(e.body, Body::Genesis { .. } | Body::Allocation { .. } | Body::Funding { .. } | Body::Spec { .. });
        if opening && self.opened && !matches!(e.body, Body::Genesis { .. }) {
            return Err(economy(format!(
                "a {kind} after the run's opening entries: allocations and the funding share are fixed at genesis"
            )));
        }
        match &e.body {
            Body::Genesis { run_id, policy } => {
                if seq != 0 || e.insecure {
                    return Err(LedgerError::Genesis { seq });
                }
                self.hub = Some(signer);
                self.run_id = run_id.clone();
                self.policy = policy.clone();
            }
            _ if seq == 0 => return Err(LedgerError::Genesis { seq }),
            Body::Validator { attestation } => {
                if attestation.signing_key != e.signer {
                    return Err(unknown());
                }
                let now_secs = (e.time_ms.max(0) / 1000) as u64;
                let v = attestation
                    .verify(&self.policy, now_secs)
                    .map_err(|err| LedgerError::BadAttestation { seq, reason: err.to_string() })?;
                if v.insecure != e.insecure {
                    return Err(LedgerError::HiddenInsecurity { seq });
                }
                self.validators.insert(
                    signer,
                    KnownValidator {
                        key: e.signer.clone(),
                        seq,
                        kind: v.kind,
                        measurement: v.measurement,
                        tcb: v.tcb,
                        insecure: v.insecure,
                    },
                );
            }
            Body::Receipt { contributor, units, .. } => {
                by_validator(self)?;
                if self.emitted.contains_key(&e.round) {
                    return Err(LedgerError::Unbalanced {
                        round: e.round,
                        receipts: *units,
                        emitted: self.emitted[&e.round],
                    });
                }
                // A validator's numbers are outside input: a sum past u64 is refused, never wrapped.
                let overflow = || economy(format!("receipt units past {} in round {}", u64::MAX, e.round));
                let round =
                    self.pending.get(&e.round).copied().unwrap_or(0).checked_add(*units).ok_or_else(overflow)?;
                let held =
                    self.units.get(contributor).copied().unwrap_or(0).checked_add(*units).ok_or_else(overflow)?;
                self.pending.insert(e.round, round);
                self.units.insert(contributor.clone(), held);
            }
            Body::Emission { units } => {
                by_validator(self)?;
                let receipts = self.pending.get(&e.round).copied().unwrap_or(0);
                if receipts != *units || self.emitted.contains_key(&e.round) {
                    return Err(LedgerError::Unbalanced { round: e.round, receipts, emitted: *units });
                }
                self.pending.remove(&e.round);
                self.emitted.insert(e.round, *units);
            }
            Body::Usage { epoch, account, prompt_tokens, completion_tokens, revenue } => {
                by_hub(self)?;
                if self.epochs.contains_key(epoch) || self.epochs.keys().next_back().is_some_and(|&last| *epoch < last)
                {
                    return Err(economy(format!("usage for epoch {epoch}, which is closed")));
                }
                let total = self.revenue.get(epoch).copied().unwrap_or(0);
                let total = total.checked_add(*revenue).ok_or_else(|| economy("revenue overflows".into()))?;
                self.revenue.insert(*epoch, total);
                let row = self.usage.entry(*epoch).or_default().entry(account.clone()).or_default();
                row.0 = row.0.saturating_add(*prompt_tokens);
                row.1 = row.1.saturating_add(*completion_tokens);
                row.2 = row.2.saturating_add(*revenue);
            }
            Body::Allocation { holder, amount } => {
                by_hub(self)?;
                if holder.is_empty() || *amount == 0 {
                    return Err(economy("an allocation needs a holder and a positive amount".into()));
                }
                let a = self.allocations.get(holder).copied().unwrap_or(0);
                let a = a.checked_add(*amount).ok_or_else(|| economy("allocations overflow".into()))?;
                self.allocations.insert(holder.clone(), a);
            }
            Body::Funding { ppm } => {
                by_hub(self)?;
                if self.funding_ppm.is_some() || *ppm > 1_000_000 {
                    return Err(economy(format!("a funding share of {ppm} ppm: it is fixed once, at most 10⁶")));
                }
                self.funding_ppm = Some(*ppm);
            }
            Body::EpochClose { epoch, revenue, funding_ppm, funding, payable } => {
                by_hub(self)?;
                if self.epochs.keys().next_back().is_some_and(|&last| *epoch <= last) {
                    return Err(economy(format!("epoch {epoch} closes out of order")));
                }
                if self.funding_ppm != Some(*funding_ppm) {
                    return Err(economy(format!(
                        "epoch {epoch} closes with a funding share of {funding_ppm} ppm; the run's genesis fixed {}",
                        self.funding_ppm.map_or("none".to_owned(), |p| format!("{p} ppm"))
                    )));
                }
                let earned = self.revenue.get(epoch).copied().unwrap_or(0);
                let balances = self.balances();
                let (want_funding, want_payable) = epoch_split(earned, *funding_ppm, &balances);
                if *revenue != earned
                    || *funding_ppm > 1_000_000
                    || (*funding, *payable) != (want_funding, want_payable)
                {
                    return Err(economy(format!(
                        "epoch {epoch} closes with revenue {revenue}, funding {funding}, payable {payable}; its usage \
                         and balances give {earned}, {want_funding}, {want_payable}"
                    )));
                }
                self.owed = split_pro_rata(*payable, &balances).into_iter().map(|(h, a)| (*epoch, h, a)).collect();
                self.epochs.insert(
                    *epoch,
                    ClosedEpoch {
                        revenue: *revenue,
                        funding_ppm: *funding_ppm,
                        funding: *funding,
                        payable: *payable,
                        holders: balances.len() as u64,
                        balance_total: balances.values().fold(0u64, |t, &b| t.saturating_add(b)),
                    },
                );
            }
            Body::Payout { epoch, holder, amount } => {
                by_hub(self)?;
                match self.owed.front() {
                    Some((e, h, a)) if (*e, h, *a) == (*epoch, holder, *amount) => {}
                    Some((e, h, a)) => {
                        return Err(economy(format!(
                            "pays {amount} to {holder} for epoch {epoch}; the closing owes {a} to {h} for epoch {e} next"
                        )));
                    }
                    None => return Err(economy(format!("a payout for epoch {epoch} that no epoch closing owes"))),
                }
                let revenue = self.revenue.get(epoch).copied().unwrap_or(0);
                let paid = self.paid.get(epoch).copied().unwrap_or(0).saturating_add(*amount);
                if paid > revenue {
                    return Err(LedgerError::Overpaid { epoch: *epoch, paid, revenue });
                }
                self.owed.pop_front();
                self.paid.insert(*epoch, paid);
                // At most the revenue of every epoch, each checked when its usage came in.
                let total = self.payouts.entry(holder.clone()).or_default();
                *total = total.saturating_add(*amount);
            }
            Body::ValidatorFault { validator, .. } => {
                by_hub(self)?;
                *self.faults.entry(validator.clone()).or_default() += 1;
            }
            Body::Spec { spec } => {
                by_hub(self)?;
                self.gov = self.check_spec(spec).map_err(economy)?;
            }
            Body::Proposal { signed } => {
                by_hub(self)?;
                let p = self.check_proposal(seq, e.round, signed).map_err(governance)?;
                self.record_proposal(p);
            }
            Body::Vote { signed } => {
                by_hub(self)?;
                let v = self.check_vote(e.round, signed).map_err(governance)?;
                self.record_vote(v);
            }
            Body::Outcome { proposal, tally } => {
                by_hub(self)?;
                self.check_outcome(e.round, proposal, tally).map_err(governance)?;
                self.record_outcome(seq, proposal, *tally);
            }
            Body::Applied { proposal, spec, .. } => {
                by_hub(self)?;
                let next = self.check_applied(e.round, proposal, spec).map_err(governance)?;
                self.record_applied(seq, proposal, next);
            }
            Body::Root { size, root } => {
                by_validator(self).or_else(|_| by_hub(self))?;
                if *size != seq || *root != hex::encode(self.tree.root().as_bytes()) {
                    return Err(LedgerError::BadRoot { seq });
                }
                if let Some((&round, &receipts)) = self.pending.iter().next() {
                    return Err(LedgerError::Unbalanced { round, receipts, emitted: 0 });
                }
                self.last_root = Some(seq);
                self.root_tree = std::sync::OnceLock::new();
            }
        }
        self.opened |= !opening;
        self.gov.max_round = self.gov.max_round.max(e.round);
        self.offsets.push(self.bytes.len());
        self.bytes.extend_from_slice(raw);
        self.tree.push(raw.to_vec());
        self.last_hash = *blake3::hash(raw).as_bytes();
        Ok(())
    }

    /// Everything the ledger says about the economy.
    pub fn economy(&self) -> Economy {
        Economy {
            epochs: self.epochs.clone(),
            usage: self.usage.clone(),
            balances: self.balances(),
            allocations: self.allocations.clone(),
            reward_units: self.units.clone(),
            payouts: self.payouts.clone(),
        }
    }

    /// Each holder's balance: allocations plus reward units earned.
    pub fn balances(&self) -> BTreeMap<String, u64> {
        let mut b = self.allocations.clone();
        for (holder, units) in &self.units {
            let v = b.entry(holder.clone()).or_default();
            *v = v.saturating_add(*units);
        }
        b.retain(|_, v| *v > 0);
        b
    }

    /// The epoch closings' payouts not yet written, in the order they must come.
    pub fn owed_payouts(&self) -> impl Iterator<Item = &(u64, String, u64)> {
        self.owed.iter()
    }

    /// Every entry must be under a signed root: the log ends with one.
    pub fn check_committed(&self) -> Result<(), LedgerError> {
        let n = self.offsets.len() as u64;
        match self.last_root {
            Some(r) if r + 1 == n => Ok(()),
            Some(r) => Err(LedgerError::Uncommitted { from: r + 1 }),
            None => Err(LedgerError::Uncommitted { from: 0 }),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn len(&self) -> u64 {
        self.offsets.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// The entries from `seq` on, as bytes.
    pub fn bytes_from(&self, seq: u64) -> &[u8] {
        match self.offsets.get(seq as usize) {
            Some(&o) => &self.bytes[o..],
            None => &[],
        }
    }

    pub fn entry_bytes(&self, seq: u64) -> Option<&[u8]> {
        let i = seq as usize;
        let start = *self.offsets.get(i)?;
        let end = self.offsets.get(i + 1).copied().unwrap_or(self.bytes.len());
        Some(&self.bytes[start..end])
    }

    pub fn entry(&self, seq: u64) -> Option<Entry> {
        decode_entry(self.entry_bytes(seq)?).ok().map(|(e, _)| e)
    }

    pub fn entries(&self) -> Vec<Entry> {
        (0..self.len()).filter_map(|s| self.entry(s)).collect()
    }

    /// Hex BLAKE3 of the last entry: what the next one's `prev` must be.
    pub fn head(&self) -> String {
        hex::encode(self.last_hash)
    }

    /// Hex Merkle root of all entries so far (what a root entry appended now must carry).
    pub fn root(&self) -> String {
        hex::encode(self.tree.root().as_bytes())
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    pub fn hub(&self) -> Option<PublicKey> {
        self.hub
    }

    pub fn policy(&self) -> &AttestationPolicy {
        &self.policy
    }

    pub fn validators(&self) -> impl Iterator<Item = &KnownValidator> {
        self.validators.values()
    }

    /// The validator introduced with signing key `key`, if any.
    pub fn validator(&self, key: &PublicKey) -> Option<&KnownValidator> {
        self.validators.get(key)
    }

    /// Signs `body` as the next entry and appends it.
    pub fn append(
        &mut self,
        round: u64,
        time_ms: i64,
        insecure: bool,
        body: Body,
        signer: &Identity,
    ) -> Result<Vec<u8>, LedgerError> {
        let offset = self.bytes.len();
        let raw = encode_entry(self.len(), round, time_ms, &self.head(), insecure, &body, signer)
            .map_err(|reason| LedgerError::Malformed { offset, reason })?;
        self.extend(&raw)?;
        Ok(raw)
    }

    /// Proof that entry `seq` is under the last root entry (which covers every entry before
    /// it). O(log n), after one O(n) build of that root's tree per root.
    pub fn prove(&self, seq: u64) -> Option<Proof> {
        let root_seq = self.last_root.filter(|&r| seq < r)?;
        let tree = self.root_tree.get_or_init(|| {
            let mut tree: MemoryBackedTree<Sha256, Vec<u8>> = MemoryBackedTree::new();
            for s in 0..root_seq {
                tree.push(self.entry_bytes(s).unwrap_or_default().to_vec());
            }
            Arc::new(tree)
        });
        let path = tree.prove_inclusion(seq as usize);
        Some(Proof {
            seq,
            entry: hex::encode(self.entry_bytes(seq)?),
            root_entry: hex::encode(self.entry_bytes(root_seq)?),
            path: hex::encode(path.as_bytes()),
        })
    }
}

/// Checks a proof on its own: the root entry's signature by `validator` and the path from the
/// entry to its root. Returns the entry.
pub fn verify_proof(proof: &Proof, validator: &PublicKey) -> Result<Entry, String> {
    let raw = hex::decode(&proof.entry).map_err(|_| "entry is not hex")?;
    let root_raw = hex::decode(&proof.root_entry).map_err(|_| "root entry is not hex")?;
    let (entry, n) = decode_entry(&raw)?;
    let (root_entry, m) = decode_entry(&root_raw)?;
    if n != raw.len() || m != root_raw.len() || entry.seq != proof.seq {
        return Err("entry bytes do not match the proof".into());
    }
    if root_entry.signer != validator.hex() {
        return Err("the root is not signed by that validator".into());
    }
    validator
        .verify(&signing_message(&root_raw[..m - 64]), &root_raw[m - 64..])
        .map_err(|_| "the root's signature does not verify")?;
    let Body::Root { size, root } = root_entry.body else { return Err("not a root entry".into()) };
    let mut digest = [0u8; 32];
    hex::decode_to_slice(&root, &mut digest).map_err(|_| "root is not hex")?;
    let root = RootHash::<Sha256>::new(digest.into(), size);
    let path = InclusionProof::<Sha256>::try_from_bytes(hex::decode(&proof.path).map_err(|_| "path is not hex")?)
        .map_err(|_| "malformed path")?;
    root.verify_inclusion(&raw, entry.seq, &path).map_err(|_| "the entry is not under that root")?;
    Ok(entry)
}
