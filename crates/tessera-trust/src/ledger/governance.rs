//! The ledger's rules for a run steered by its holders: the spec it starts from, proposals and
//! votes signed by holders (the hub records them, but cannot forge, alter or replay them), the
//! tally of each vote as a pure function of the entries before it, and every applied change
//! recomputed from the spec before it (`Change::apply`), so a spec the hub serves that no passed
//! proposal produced is caught by comparing it with [`Ledger::spec`].
//!
//! Cost: one snapshot of the balances per open proposal (O(holders); dropped at its outcome),
//! one map entry per voter per proposal, and the spec (its JSON parsed, O(tensors)).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tessera_protocol::RunSpec;
use tessera_protocol::api::governance::{Change, Choice, ProposalMessage, Signed, Tally, VoteMessage};

use super::Ledger;
use crate::{Identity, PublicKey};

/// Domain of a holder's signature over a governance message.
const GOVERNANCE_DOMAIN: &[u8] = b"tessera-governance-v1";

/// Signs a governance message (its JSON bytes) as a holder.
pub fn sign_governance(identity: &Identity, message: &[u8]) -> Signed {
    Signed {
        holder: identity.public().hex(),
        message: hex::encode(message),
        signature: hex::encode(identity.sign(&[GOVERNANCE_DOMAIN, message].concat())),
    }
}

/// Checks a signed governance message: returns its bytes and their id (hex BLAKE3).
pub fn verify_governance(s: &Signed) -> Result<(Vec<u8>, String), String> {
    let key = PublicKey::parse(&s.holder).map_err(|_| "the holder is not a hex Ed25519 key".to_owned())?;
    let message = hex::decode(&s.message).map_err(|_| "the message is not hex".to_owned())?;
    let sig = hex::decode(&s.signature).map_err(|_| "the signature is not hex".to_owned())?;
    key.verify(&[GOVERNANCE_DOMAIN, &message].concat(), &sig)
        .map_err(|_| "the holder's signature does not verify (forged or altered)".to_owned())?;
    let id = blake3::hash(&message).to_hex().to_string();
    Ok((message, id))
}

/// Hex BLAKE3 of a spec's JSON, as the ledger records it.
pub fn spec_hash(spec: &RunSpec) -> String {
    blake3::hash(&serde_json::to_vec(spec).unwrap_or_default()).to_hex().to_string()
}

/// A proposal as the ledger knows it.
#[derive(Debug, Clone, Serialize)]
pub struct Proposal {
    pub id: String,
    /// Its entry: the snapshot of the balances is taken there.
    pub seq: u64,
    pub proposer: String,
    pub message: ProposalMessage,
    /// The round it was recorded in; votes count while their entries' round is before
    /// `closes`; a passed change applies at the start of `apply_at`.
    pub round: u64,
    pub closes: u64,
    pub apply_at: u64,
    /// All the power at the snapshot.
    pub power: u64,
    /// Each voter's live vote: (choice, power at the snapshot, the vote's time).
    pub votes: BTreeMap<String, (Choice, u64, i64)>,
    /// The outcome's entry and tally, once recorded.
    pub outcome: Option<(u64, Tally)>,
    /// The applied change's entry, once recorded.
    pub applied: Option<u64>,
    /// Balances at the snapshot, kept until the outcome.
    #[serde(skip)]
    snapshot: BTreeMap<String, u64>,
}

impl Proposal {
    /// The votes as they stand, under the run's rules.
    pub fn tally(&self, g: &tessera_protocol::api::governance::GovernanceSpec) -> Tally {
        tally_of(self.votes.values().map(|(c, p, _)| (*c, *p)), self.power, g)
    }

    /// The tally once `waiting` votes — (holder, choice, time), taken but not yet recorded —
    /// are recorded too: each at its holder's power at the snapshot, replacing the holder's
    /// recorded vote when signed later, as the ledger will take them. With the number of voters.
    pub fn tally_with(
        &self,
        waiting: &[(&str, Choice, i64)],
        g: &tessera_protocol::api::governance::GovernanceSpec,
    ) -> (Tally, u64) {
        let mut votes: BTreeMap<&str, (Choice, u64, i64)> = self.votes.iter().map(|(h, v)| (h.as_str(), *v)).collect();
        for &(holder, choice, time) in waiting {
            let power = self.power_of(holder);
            if power > 0 && votes.get(holder).is_none_or(|(_, _, t)| *t < time) {
                votes.insert(holder, (choice, power, time));
            }
        }
        (tally_of(votes.values().map(|(c, p, _)| (*c, *p)), self.power, g), votes.len() as u64)
    }

    /// A voter's power at the snapshot (none once the outcome is recorded).
    pub fn power_of(&self, holder: &str) -> u64 {
        self.snapshot.get(holder).copied().unwrap_or(0)
    }
}

/// Votes (choice, power) counted against all the `power` at the snapshot.
fn tally_of(
    votes: impl Iterator<Item = (Choice, u64)>,
    power: u64,
    g: &tessera_protocol::api::governance::GovernanceSpec,
) -> Tally {
    let (mut yes, mut no, mut abstain) = (0u64, 0u64, 0u64);
    for (choice, p) in votes {
        let t = match choice {
            Choice::Yes => &mut yes,
            Choice::No => &mut no,
            Choice::Abstain => &mut abstain,
        };
        *t = t.saturating_add(p);
    }
    Tally { yes, no, abstain, power, passed: Tally::passes(yes, no, abstain, power, g) }
}

/// The governance part of a ledger's state.
#[derive(Debug, Clone, Default)]
pub(super) struct Governance {
    pub spec: Option<Arc<RunSpec>>,
    /// H as created, and each applied change of it: (the round it applies at, H).
    pub inner_steps: (u64, Vec<(u64, u64)>),
    pub spec_hash: String,
    pub changes: u64,
    pub proposals: BTreeMap<String, Proposal>,
    /// The largest round of any entry so far: governance entries never go back before it.
    pub max_round: u64,
}

impl Ledger {
    /// The run's spec as its ledger records it (its genesis spec with every applied change), and
    /// the hex BLAKE3 of its JSON; `None` for a ledger from before specs were recorded.
    pub fn spec(&self) -> Option<(&RunSpec, &str)> {
        self.gov.spec.as_deref().map(|s| (s, self.gov.spec_hash.as_str()))
    }

    /// Whether the spec a hub serves for phase `phase` (`GET /v1/run`, which it signs) is the one
    /// its ledger allows: the spec as created with every applied change. A difference is a
    /// change no passed proposal authorised; the error names the fields that differ.
    pub fn check_served_spec(&self, served: &RunSpec, phase: usize) -> Result<(), String> {
        let Some((spec, _)) = self.spec() else { return Ok(()) };
        let allowed = spec.at_phase(phase);
        if allowed == *served {
            return Ok(());
        }
        let (a, b) = (serde_json::to_value(&allowed), serde_json::to_value(served));
        let differ: Vec<String> = match (a, b) {
            (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                keys.into_iter()
                    .filter(|k| a.get(*k) != b.get(*k))
                    .map(|k| {
                        format!(
                            "{k}: ledger {} served {}",
                            a.get(k).map_or("none".into(), |v| v.to_string()),
                            b.get(k).map_or("none".into(), |v| v.to_string())
                        )
                    })
                    .collect()
            }
            _ => vec!["the spec".into()],
        };
        Err(format!(
            "the hub serves a spec that no passed proposal authorises ({} change(s) recorded): {}",
            self.gov.changes,
            differ.join("; ")
        ))
    }

    /// H in effect at round `round`: the spec's as created, then each change voted into it
    /// (`None` for a ledger that records no spec). What a submission trained on a given base
    /// round was assigned, whatever H is now.
    pub fn inner_steps_at(&self, round: u64) -> Option<u64> {
        self.gov.spec.as_ref()?;
        let (first, changes) = &self.gov.inner_steps;
        Some(changes.iter().take_while(|(at, _)| *at <= round).last().map_or(*first, |(_, h)| *h))
    }

    /// Whether a hub's signed answer to `GET /v1/run` is this ledger's hub serving the spec the
    /// ledger allows: signed by the key of its genesis, and [`Ledger::check_served_spec`].
    pub fn check_served_run(&self, run: &tessera_protocol::api::RunInfo) -> Result<(), String> {
        let hub = self.hub.map(|k| k.hex()).unwrap_or_default();
        if run.hub_key != hub {
            return Err(format!("the hub's key {} is not the key {hub} that signed its ledger", run.hub_key));
        }
        self.check_served_spec(&run.spec, run.phase as usize)
    }

    /// Changes applied to the spec so far.
    pub fn spec_changes(&self) -> u64 {
        self.gov.changes
    }

    /// Every recorded proposal, by id.
    pub fn proposals(&self) -> &BTreeMap<String, Proposal> {
        &self.gov.proposals
    }

    /// Proposals the hub owes an entry at round `round`: a vote closed before it without an
    /// outcome, or a passed change due before it not applied. Empty for an honest hub.
    pub fn overdue(&self, round: u64) -> Vec<String> {
        let mut out = Vec::new();
        for p in self.gov.proposals.values() {
            match &p.outcome {
                None if p.closes < round => {
                    out.push(format!("proposal {} closed at round {} and has no outcome", p.id, p.closes))
                }
                Some((_, t)) if t.passed && p.applied.is_none() && p.apply_at < round => out.push(format!(
                    "proposal {} passed and was due at round {} but was never applied",
                    p.id, p.apply_at
                )),
                _ => {}
            }
        }
        out
    }

    /// Whether a proposal or a vote would be accepted as the next entry, recorded at `round`:
    /// what the hub checks before it takes one (the entry is checked again when written).
    pub fn precheck(&self, round: u64, body: &super::Body) -> Result<(), String> {
        match body {
            super::Body::Proposal { signed } => self.check_proposal(self.len(), round, signed).map(drop),
            super::Body::Vote { signed } => self.check_vote(round, signed).map(drop),
            other => Err(format!("a {} is not taken from holders", other.kind())),
        }
    }

    pub(super) fn check_spec(&self, json: &str) -> Result<Governance, String> {
        if self.gov.spec.is_some() {
            return Err("the run's spec is recorded once, among its opening entries".into());
        }
        let spec: RunSpec = serde_json::from_str(json).map_err(|e| format!("the run's spec: {e}"))?;
        spec.validate().map_err(|e| format!("the run's spec: {e}"))?;
        Ok(Governance {
            spec_hash: spec_hash(&spec),
            inner_steps: (spec.inner_steps, Vec::new()),
            spec: Some(Arc::new(spec)),
            ..self.gov.clone()
        })
    }

    fn rules(&self) -> Result<(&RunSpec, &tessera_protocol::api::governance::GovernanceSpec), String> {
        let spec = self.gov.spec.as_deref().ok_or("the ledger records no spec: this run cannot be steered")?;
        let g = spec.governance.as_ref().ok_or("this run is not steered by its holders")?;
        Ok((spec, g))
    }

    fn not_backdated(&self, round: u64) -> Result<(), String> {
        if round < self.gov.max_round {
            return Err(format!("recorded at round {round}, after an entry of round {}", self.gov.max_round));
        }
        Ok(())
    }

    pub(super) fn check_proposal(&self, seq: u64, round: u64, s: &Signed) -> Result<Proposal, String> {
        let (spec, g) = self.rules()?;
        self.not_backdated(round)?;
        let (bytes, id) = verify_governance(s)?;
        let message: ProposalMessage = serde_json::from_slice(&bytes).map_err(|e| format!("the proposal: {e}"))?;
        if message.run_id != self.run_id {
            return Err(format!("a proposal for run {}, not this one", message.run_id));
        }
        if self.gov.proposals.contains_key(&id) {
            return Err(format!("proposal {id} is recorded already"));
        }
        let snapshot = self.balances();
        let held = snapshot.get(&s.holder).copied().unwrap_or(0);
        if held == 0 || held < g.min_proposer_balance {
            return Err(format!(
                "the proposer holds {held}; proposing takes at least {}",
                g.min_proposer_balance.max(1)
            ));
        }
        let closes = round.saturating_add(g.voting_rounds);
        let apply_at = message.apply_at.unwrap_or(closes);
        if apply_at < closes {
            return Err(format!("it would apply at round {apply_at}, before its vote closes at round {closes}"));
        }
        message.change.apply(spec, apply_at)?;
        Ok(Proposal {
            id,
            seq,
            proposer: s.holder.clone(),
            round,
            closes,
            apply_at,
            power: snapshot.values().fold(0u64, |t, &b| t.saturating_add(b)),
            votes: BTreeMap::new(),
            outcome: None,
            applied: None,
            snapshot,
            message,
        })
    }

    /// The proposal voted on, and the vote as it will stand: (id, voter, choice, power, time).
    pub(super) fn check_vote(&self, round: u64, s: &Signed) -> Result<(String, String, Choice, u64, i64), String> {
        self.rules()?;
        self.not_backdated(round)?;
        let (bytes, _) = verify_governance(s)?;
        let v: VoteMessage = serde_json::from_slice(&bytes).map_err(|e| format!("the vote: {e}"))?;
        if v.run_id != self.run_id {
            return Err(format!("a vote for run {}, not this one", v.run_id));
        }
        let p = self.gov.proposals.get(&v.proposal).ok_or_else(|| format!("no proposal {} is recorded", v.proposal))?;
        if p.outcome.is_some() || round >= p.closes {
            return Err(format!(
                "a vote recorded at round {round}: proposal {}'s vote closed at round {}",
                p.id, p.closes
            ));
        }
        let power = p.power_of(&s.holder);
        if power == 0 {
            return Err(format!(
                "{} held nothing at proposal {}'s snapshot (entry {}): balances after it do not vote",
                s.holder, p.id, p.seq
            ));
        }
        if let Some((_, _, t)) = p.votes.get(&s.holder)
            && *t >= v.time_ms
        {
            return Err(format!(
                "{} voted at {t} already; a vote replaces it only if signed later (a double or replayed vote)",
                s.holder
            ));
        }
        Ok((p.id.clone(), s.holder.clone(), v.choice, power, v.time_ms))
    }

    pub(super) fn check_outcome(&self, round: u64, proposal: &str, recorded: &Tally) -> Result<(), String> {
        let (_, g) = self.rules()?;
        self.not_backdated(round)?;
        let p = self.gov.proposals.get(proposal).ok_or_else(|| format!("no proposal {proposal} is recorded"))?;
        if p.outcome.is_some() {
            return Err(format!("proposal {proposal} has an outcome already"));
        }
        if round < p.closes {
            return Err(format!("an outcome at round {round}, before the vote closes at round {}", p.closes));
        }
        let tally = p.tally(g);
        if tally != *recorded {
            return Err(format!("the outcome says {recorded:?}; the recorded votes give {tally:?}"));
        }
        Ok(())
    }

    /// The spec after the change (`None` for a release, which changes nothing).
    pub(super) fn check_applied(&self, round: u64, proposal: &str, hash: &str) -> Result<Option<RunSpec>, String> {
        let (spec, _) = self.rules()?;
        self.not_backdated(round)?;
        let p = self.gov.proposals.get(proposal).ok_or_else(|| format!("no proposal {proposal} is recorded"))?;
        match &p.outcome {
            Some((_, t)) if t.passed => {}
            Some(_) => return Err(format!("proposal {proposal} was rejected: nothing authorises applying it")),
            None => return Err(format!("proposal {proposal} has no outcome yet: nothing authorises applying it")),
        }
        if p.applied.is_some() {
            return Err(format!("proposal {proposal} is applied already"));
        }
        if round != p.apply_at {
            return Err(format!("applied at round {round}; it names round {}", p.apply_at));
        }
        let change: &Change = &p.message.change;
        let next = change.apply(spec, p.apply_at)?;
        let want = if change.changes_spec() { spec_hash(&next) } else { self.gov.spec_hash.clone() };
        if hash != want {
            return Err(format!("records spec {hash}; the change applied to the spec before it gives {want}"));
        }
        Ok(change.changes_spec().then_some(next))
    }

    pub(super) fn record_proposal(&mut self, p: Proposal) {
        self.gov.proposals.insert(p.id.clone(), p);
    }

    pub(super) fn record_vote(&mut self, (id, voter, choice, power, time): (String, String, Choice, u64, i64)) {
        if let Some(p) = self.gov.proposals.get_mut(&id) {
            p.votes.insert(voter, (choice, power, time));
        }
    }

    pub(super) fn record_outcome(&mut self, seq: u64, proposal: &str, tally: Tally) {
        if let Some(p) = self.gov.proposals.get_mut(proposal) {
            p.outcome = Some((seq, tally));
            p.snapshot = BTreeMap::new();
        }
    }

    pub(super) fn record_applied(&mut self, seq: u64, proposal: &str, next: Option<RunSpec>) {
        if let Some(p) = self.gov.proposals.get_mut(proposal) {
            p.applied = Some(seq);
            if let Change::InnerSteps { value } = p.message.change {
                self.gov.inner_steps.1.push((p.apply_at, value));
            }
        }
        if let Some(next) = next {
            self.gov.spec_hash = spec_hash(&next);
            self.gov.spec = Some(Arc::new(next));
            self.gov.changes += 1;
        }
    }
}
