//! A run steered by its holders (`docs/governance.md`): proposals and votes, signed by holders,
//! checked against the ledger when they arrive and held in SQL until the next round boundary;
//! at each boundary the transaction that publishes the round writes them to the ledger, with
//! the tally of every vote that closes and every passed change that applies, and the spec after
//! those changes. The ledger's verifier recomputes each of these, so the hub cannot steer alone.
//!
//! Cost: a proposal or vote is one signature check, a few map lookups in the ledger and one
//! small transaction; a boundary with nothing to write reads the pending table once (empty) and
//! scans the proposals (O(proposals)); one with something to write copies the ledger once
//! (O(its bytes), as a sealed round does) and appends one entry per proposal, vote, outcome and
//! change, plus a root.

use std::collections::HashMap;

use tessera_protocol::api::governance::{
    Choice, GovernanceReceipt, ProposalMessage, ProposalView, Proposals, Signed, Tally, VoteMessage,
};
use tessera_protocol::{ApiError, ErrorCode, RunSpec};
use tessera_trust::PublicKey;
use tessera_trust::ledger::{Body, Ledger, verify_governance};

use crate::HubError;
use crate::db::{PendingGovernance, Steered, Written};
use crate::hub::{Hub, Live, api, internal, now_ms};

/// The message of a proposal or vote the hub took (its signature was verified then).
fn taken_message<T: serde::de::DeserializeOwned>(row: &PendingGovernance) -> Option<T> {
    let signed: Signed = serde_json::from_str(&row.signed).ok()?;
    serde_json::from_slice(&hex::decode(signed.message).ok()?).ok()
}

/// What a round boundary writes for a steered run.
#[derive(Default)]
pub(crate) struct Steer {
    /// Ledger entries (`(seq, hex)`) after the round's own, and the ledger with them.
    pub rows: Vec<(u64, String)>,
    pub next: Option<Ledger>,
    pub steered: Steered,
    /// The spec after the changes that apply now.
    pub spec: Option<RunSpec>,
}

impl Hub {
    /// Changes voted into the spec so far (`Assignment::revision`, `ScoringJob::revision`).
    pub(crate) fn spec_revision(&self) -> u64 {
        self.trust.read().map(|t| t.ledger.spec_changes()).unwrap_or(0)
    }

    /// Takes a holder's signed proposal (its signer must be the holder): checked against the
    /// run's bounds and the holder's balance now, then written to the ledger at the next round
    /// boundary (its snapshot).
    pub async fn propose(&self, signer: &PublicKey, signed: Signed) -> Result<GovernanceReceipt, ApiError> {
        self.take_governance(signer, signed, "proposal").await
    }

    /// Takes a holder's signed vote: a later one replaces the holder's earlier vote on the same
    /// proposal until the vote closes.
    pub async fn vote(&self, signer: &PublicKey, signed: Signed) -> Result<GovernanceReceipt, ApiError> {
        self.take_governance(signer, signed, "vote").await
    }

    async fn take_governance(
        &self,
        signer: &PublicKey,
        signed: Signed,
        kind: &str,
    ) -> Result<GovernanceReceipt, ApiError> {
        if self.spec().governance.is_none() {
            return Err(api(ErrorCode::BadRequest, "this run is not steered by its holders"));
        }
        if signed.holder != signer.hex() {
            return Err(api(ErrorCode::Unauthorized, "a holder sends its own proposals and votes"));
        }
        let (bytes, id) = verify_governance(&signed).map_err(|e| api(ErrorCode::Unauthorized, e))?;
        let mut live = self.live.lock().await;
        loop {
            self.sync(&mut live).await.map_err(internal)?;
            if live.run.finished() {
                return Err(api(ErrorCode::RunFinished, "the run has finished"));
            }
            let round = live.run.round();
            let (proposal, time_ms) = if kind == "proposal" {
                let m: ProposalMessage = serde_json::from_slice(&bytes)
                    .map_err(|e| api(ErrorCode::BadRequest, format!("the proposal: {e}")))?;
                self.check_pending(round, Body::Proposal { signed: signed.clone() }, None).await?;
                (id.clone(), m.time_ms)
            } else {
                let m: VoteMessage =
                    serde_json::from_slice(&bytes).map_err(|e| api(ErrorCode::BadRequest, format!("the vote: {e}")))?;
                self.check_pending(round, Body::Vote { signed: signed.clone() }, Some(&m)).await?;
                (m.proposal.clone(), m.time_ms)
            };
            let row = PendingGovernance {
                id: 0,
                kind: kind.to_owned(),
                proposal: proposal.clone(),
                holder: signed.holder.clone(),
                signed: serde_json::to_string(&signed).map_err(|e| api(ErrorCode::Internal, e.to_string()))?,
                time_ms,
            };
            match self.db.add_governance(&row, live.seq).await.map_err(internal)? {
                Written::At(seq) => {
                    live.seq = seq;
                    tracing::info!(kind, proposal = %proposal, holder = %signed.holder, "governance message taken");
                    return Ok(GovernanceReceipt { proposal, recorded_at_boundary_of: round });
                }
                Written::Duplicate => {
                    return Err(api(
                        ErrorCode::Duplicate,
                        format!("this {kind} is taken already (a vote replaces an earlier one only if signed later)"),
                    ));
                }
                Written::Stale => {} // Another replica decided meanwhile: check again.
            }
        }
    }

    /// Whether a proposal or vote would be recorded at this boundary. A vote on a proposal
    /// still waiting for the boundary is checked as far as it can be: its signature, that the
    /// voter holds something now (its snapshot is taken when the proposal is recorded).
    async fn check_pending(&self, round: u64, body: Body, vote: Option<&VoteMessage>) -> Result<(), ApiError> {
        let refused = |e: String| api(ErrorCode::BadRequest, format!("refused by the ledger's rules: {e}"));
        let pending_proposal = match vote {
            Some(v) if !self.ledger_has(&v.proposal)? => {
                if !self.db.proposal_pending(&v.proposal).await.map_err(internal)? {
                    return Err(api(ErrorCode::NotFound, format!("no proposal {}", v.proposal)));
                }
                true
            }
            _ => false,
        };
        let trust = self.trust.read().map_err(|_| api(ErrorCode::Internal, "trust poisoned"))?;
        if !pending_proposal {
            return trust.ledger.precheck(round, &body).map_err(refused);
        }
        let (Body::Vote { signed }, Some(v)) = (&body, vote) else { return Ok(()) };
        if v.run_id != self.run_id() {
            return Err(refused(format!("a vote for run {}, not this one", v.run_id)));
        }
        if trust.ledger.balances().get(&signed.holder).copied().unwrap_or(0) == 0 {
            return Err(refused(format!("{} holds nothing, so has no power to vote", signed.holder)));
        }
        Ok(())
    }

    fn ledger_has(&self, proposal: &str) -> Result<bool, ApiError> {
        let t = self.trust.read().map_err(|_| api(ErrorCode::Internal, "trust poisoned"))?;
        Ok(t.ledger.proposals().contains_key(proposal))
    }

    /// The run's rules and every proposal, newest first: those in the ledger with their tallies
    /// (votes still waiting for the boundary included while the vote is open), and those waiting
    /// to be recorded.
    /// Computed once per journal sequence number (a proposal, vote or publication moves it), so
    /// anonymous requests cost a lookup, not a scan of the run's proposals.
    pub async fn proposals(&self) -> Result<std::sync::Arc<Proposals>, ApiError> {
        let seq = self.db.last_seq().await.map_err(internal)?;
        self.views
            .proposals
            .at(seq, "proposals", || async { self.compute_proposals().await.map_err(|e| HubError::Corrupt(e.message)) })
            .await
            .map_err(internal)
    }

    /// Cost: one read of the waiting messages (decoded, not verified again: each was verified
    /// when taken), then O(proposals + waiting votes); no proposal's snapshot is copied.
    async fn compute_proposals(&self) -> Result<Proposals, ApiError> {
        let round = self.live.lock().await.run.round();
        let pending = self.db.pending_governance().await.map_err(internal)?;
        let spec = self.spec();
        let g = spec.governance.clone();
        // The waiting votes by proposal: (holder, choice, time).
        let mut waiting: HashMap<&str, Vec<(&str, Choice, i64)>> = HashMap::new();
        for v in pending.iter().filter(|v| v.kind == "vote") {
            if let Some(m) = taken_message::<VoteMessage>(v) {
                waiting.entry(v.proposal.as_str()).or_default().push((v.holder.as_str(), m.choice, m.time_ms));
            }
        }
        let t = self.trust.read().map_err(|_| api(ErrorCode::Internal, "trust poisoned"))?;
        let mut out = Vec::new();
        for p in t.ledger.proposals().values() {
            let (tally, voters) = match (&p.outcome, &g) {
                (Some((_, tally)), _) => (*tally, p.votes.len() as u64),
                (None, Some(g)) => p.tally_with(waiting.get(p.id.as_str()).map_or(&[], Vec::as_slice), g),
                (None, None) => (Tally::default(), p.votes.len() as u64),
            };
            let state = match (&p.outcome, p.applied) {
                (_, Some(_)) => "applied",
                (Some((_, t)), None) if t.passed => "passed",
                (Some(_), None) => "rejected",
                (None, None) => "open",
            };
            out.push(ProposalView {
                id: p.id.clone(),
                proposer: p.proposer.clone(),
                title: p.message.title.clone(),
                description: p.message.change.describe(),
                change: p.message.change.clone(),
                recorded_round: Some(p.round),
                seq: Some(p.seq),
                closes: p.closes,
                apply_at: p.apply_at,
                state: state.into(),
                tally,
                voters,
                outcome_seq: p.outcome.map(|(s, _)| s),
                applied_seq: p.applied,
            });
        }
        for row in pending.iter().filter(|r| r.kind == "proposal") {
            let Some(m) = taken_message::<ProposalMessage>(row) else { continue };
            let closes = round + g.as_ref().map_or(0, |g| g.voting_rounds);
            out.push(ProposalView {
                id: row.proposal.clone(),
                proposer: row.holder.clone(),
                title: m.title.clone(),
                description: m.change.describe(),
                change: m.change,
                recorded_round: None,
                seq: None,
                closes,
                apply_at: m.apply_at.unwrap_or(closes),
                state: "pending".into(),
                tally: Tally::default(),
                voters: waiting.get(row.proposal.as_str()).map_or(0, Vec::len) as u64,
                outcome_seq: None,
                applied_seq: None,
            });
        }
        out.sort_by(|a, b| b.seq.unwrap_or(u64::MAX).cmp(&a.seq.unwrap_or(u64::MAX)));
        Ok(Proposals { round, governance: g, proposals: out })
    }

    /// What the boundary into round `next_round` writes: the pending proposals and votes (at
    /// the round they were cast in), the outcome of every vote closing now, every passed change
    /// due now, and a root; built on `base` (the ledger with the round's own entries).
    /// Nothing (and no copy of the ledger) when there is nothing to write.
    pub(crate) async fn steer(
        &self,
        live: &Live,
        base: &Ledger,
        next_round: u64,
        checkpoint: &str,
    ) -> Result<Steer, HubError> {
        let spec = self.spec();
        let Some(g) = &spec.governance else { return Ok(Steer::default()) };
        let pending = self.db.pending_governance().await?;
        let due = base.proposals().values().any(|p| {
            (p.outcome.is_none() && p.closes <= next_round)
                || (p.outcome.is_some_and(|(_, t)| t.passed) && p.applied.is_none() && p.apply_at == next_round)
        });
        if pending.is_empty() && !due {
            return Ok(Steer::default());
        }
        let round = live.run.round();
        let mut next = base.clone();
        let from = next.len();
        let mut done = Vec::new();
        for row in &pending {
            done.push(row.id);
            let Ok(signed) = serde_json::from_str::<Signed>(&row.signed) else { continue };
            let body = if row.kind == "proposal" { Body::Proposal { signed } } else { Body::Vote { signed } };
            if let Err(e) = next.append(round, now_ms(), false, body, &self.identity) {
                tracing::warn!(kind = %row.kind, proposal = %row.proposal, holder = %row.holder, error = %e,
                    "a pending governance message no longer passes the ledger's rules; dropped");
            }
        }
        let closing: Vec<String> = next
            .proposals()
            .values()
            .filter(|p| p.outcome.is_none() && p.closes <= next_round)
            .map(|p| p.id.clone())
            .collect();
        for id in closing {
            let tally = next.proposals()[&id].tally(g);
            next.append(next_round, now_ms(), false, Body::Outcome { proposal: id.clone(), tally }, &self.identity)
                .map_err(|e| HubError::Corrupt(format!("the outcome of proposal {id}: {e}")))?;
            tracing::info!(proposal = %id, yes = tally.yes, no = tally.no, passed = tally.passed, "vote closed");
        }
        let applying: Vec<String> = next
            .proposals()
            .values()
            .filter(|p| p.outcome.is_some_and(|(_, t)| t.passed) && p.applied.is_none() && p.apply_at == next_round)
            .map(|p| p.id.clone())
            .collect();
        let changes_before = next.spec_changes();
        for id in applying {
            let (current, hash) =
                next.spec().ok_or_else(|| HubError::Corrupt("a steered ledger without a spec".into()))?;
            let change = next.proposals()[&id].message.change.clone();
            let hash = if change.changes_spec() {
                let changed = change
                    .apply(current, next_round)
                    .map_err(|e| HubError::Corrupt(format!("proposal {id} no longer applies: {e}")))?;
                tessera_trust::ledger::spec_hash(&changed)
            } else {
                hash.to_owned()
            };
            let body = Body::Applied { proposal: id.clone(), spec: hash, checkpoint: checkpoint.to_owned() };
            next.append(next_round, now_ms(), false, body, &self.identity)
                .map_err(|e| HubError::Corrupt(format!("applying proposal {id}: {e}")))?;
            tracing::info!(proposal = %id, change = %change.describe(), round = next_round, "proposal applied");
        }
        let root = Body::Root { size: next.len(), root: next.root() };
        next.append(next_round, now_ms(), false, root, &self.identity).map_err(|e| HubError::Corrupt(e.to_string()))?;
        let rows = (from..next.len()).filter_map(|s| next.entry_bytes(s).map(|b| (s, hex::encode(b)))).collect();
        let changed = (next.spec_changes() != changes_before).then(|| next.spec().map(|(s, _)| s.clone())).flatten();
        let spec_json = match &changed {
            Some(s) => Some(serde_json::to_string(s).map_err(|e| HubError::Corrupt(e.to_string()))?),
            None => None,
        };
        Ok(Steer { rows, next: Some(next), steered: Steered { spec: spec_json, done }, spec: changed })
    }
}
