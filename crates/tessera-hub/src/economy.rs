//! The run's ledger and its usage economy: the genesis (with the run's allocations and the
//! funding share, fixed there), epochs of served usage closed by the run's operator into
//! exact payouts, and the ledger's bytes and inclusion proofs for anyone to verify.

use tessera_protocol::api::{EpochReport, EpochSettled};
use tessera_protocol::{ApiError, ErrorCode, RunSpec};
use tessera_trust::ledger::{Body as LedgerBody, Ledger};
use tessera_trust::{Identity, PublicKey};

use crate::HubError;
use crate::db::{Db, Written};
use crate::hub::{CurrentValidator, Hub, api, internal, now_ms};

impl Hub {
    /// Closes an epoch of API usage, reported by the run's operator: writes a usage entry per
    /// account, the epoch closing (revenue, the funding share, what is payable) and a payout per
    /// holder by the ledger's own largest-remainder split of the balances, then a root over them
    /// all — signed by the hub, in one transaction.
    pub async fn close_epoch(&self, signer: &PublicKey, report: EpochReport) -> Result<EpochSettled, ApiError> {
        let Some(economy) = &self.spec().economy else {
            return Err(api(ErrorCode::BadRequest, "this run has no usage economy (start the hub with --operator)"));
        };
        if signer.hex() != economy.operator {
            return Err(api(ErrorCode::Unauthorized, "only the run's API operator may report usage"));
        }
        let mut accounts = std::collections::BTreeSet::new();
        if report.usage.iter().any(|u| u.account.is_empty() || !accounts.insert(u.account.as_str())) {
            return Err(api(ErrorCode::BadRequest, "each account must appear once, with a name"));
        }
        let mut live = self.live.lock().await; // No round publishes meanwhile.
        self.sync(&mut live).await.map_err(internal)?;
        let round = live.run.round();
        let mut next = self.trust.read().map_err(|_| api(ErrorCode::Internal, "trust poisoned"))?.ledger.clone();
        if let Some(last) = next.epochs.keys().next_back().copied().filter(|&l| report.epoch <= l) {
            return Err(api(
                ErrorCode::Conflict,
                format!("epoch {} is not after the last closed epoch {last}", report.epoch),
            ));
        }
        let from = next.len();
        let refused =
            |e: tessera_trust::ledger::LedgerError| api(ErrorCode::BadRequest, format!("refused by the ledger: {e}"));
        for u in &report.usage {
            let body = LedgerBody::Usage {
                epoch: report.epoch,
                account: u.account.clone(),
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                revenue: u.revenue,
            };
            next.append(round, now_ms(), false, body, &self.identity).map_err(refused)?;
        }
        let revenue = report.usage.iter().try_fold(0u64, |a, u| a.checked_add(u.revenue));
        let revenue = revenue.ok_or_else(|| api(ErrorCode::BadRequest, "the epoch's revenue overflows"))?;
        let balances = next.balances();
        let (funding, payable) = tessera_trust::ledger::epoch_split(revenue, economy.funding_ppm, &balances);
        let close =
            LedgerBody::EpochClose { epoch: report.epoch, revenue, funding_ppm: economy.funding_ppm, funding, payable };
        next.append(round, now_ms(), false, close, &self.identity).map_err(refused)?;
        let payouts = tessera_trust::ledger::split_pro_rata(payable, &balances);
        for (holder, amount) in &payouts {
            let body = LedgerBody::Payout { epoch: report.epoch, holder: holder.clone(), amount: *amount };
            next.append(round, now_ms(), false, body, &self.identity).map_err(refused)?;
        }
        let root = LedgerBody::Root { size: next.len(), root: next.root() };
        next.append(round, now_ms(), false, root, &self.identity).map_err(refused)?;
        let to = next.len();
        let rows: Vec<(u64, String)> =
            (from..to).filter_map(|s| next.entry_bytes(s).map(|b| (s, hex::encode(b)))).collect();
        live.seq = self.ledger_written(self.db.append_ledger(&rows, live.seq).await.map_err(internal)?)?;
        self.trust.write().map_err(|_| api(ErrorCode::Internal, "trust poisoned"))?.ledger = next;
        drop(live);
        tracing::info!(epoch = report.epoch, revenue, funding, payable, holders = payouts.len(), "epoch closed");
        Ok(EpochSettled { epoch: report.epoch, revenue, funding, payable, payouts, ledger_from: from, ledger_to: to })
    }

    /// The journal's end after a ledger write; a replica's ledger write that came between this
    /// one's reading and writing is a refusal to retry (the entries would not chain).
    pub(crate) fn ledger_written(&self, written: Written) -> Result<u64, ApiError> {
        match written {
            Written::At(seq) => Ok(seq),
            _ => Err(api(ErrorCode::Busy, "another hub replica wrote the ledger meanwhile; retry")),
        }
    }

    /// The economy the ledger records, as JSON: closed epochs, usage, balances, allocations,
    /// reward units and payouts.
    pub fn economy(&self) -> Result<tessera_trust::ledger::Economy, ApiError> {
        Ok(self.trust.read().map_err(|_| api(ErrorCode::Internal, "trust poisoned"))?.ledger.economy())
    }

    /// The ledger's bytes from entry `from` on.
    pub fn ledger_bytes(&self, from: u64) -> Vec<u8> {
        self.trust.read().map(|t| t.ledger.bytes_from(from).to_vec()).unwrap_or_default()
    }

    /// An inclusion proof of entry `seq` under the first signed root after it.
    pub fn ledger_proof(&self, seq: u64) -> Result<tessera_trust::ledger::Proof, ApiError> {
        let t = self.trust.read().map_err(|_| api(ErrorCode::Internal, "trust poisoned"))?;
        let l = &t.ledger;
        if seq >= l.len() {
            return Err(api(ErrorCode::NotFound, format!("the ledger has {} entries", l.len())));
        }
        l.prove(seq).ok_or_else(|| api(ErrorCode::NotFound, format!("entry {seq} is not under a signed root yet")))
    }
}

/// Loads and verifies the run's ledger, writing its genesis (signed by `identity`) if it has
/// none; the validator submissions are sealed to is the last one it registered.
pub(crate) async fn open_ledger(
    db: &Db,
    run_id: &str,
    spec: &RunSpec,
    identity: &Identity,
) -> Result<(Ledger, Option<CurrentValidator>), HubError> {
    // Replicas opening a new run at once: one writes the genesis, the others read it.
    for _ in 0..8 {
        if let Some(opened) = try_open_ledger(db, run_id, spec, identity).await? {
            return Ok(opened);
        }
    }
    Err(HubError::Corrupt("the ledger kept changing while its genesis was written".into()))
}

async fn try_open_ledger(
    db: &Db,
    run_id: &str,
    spec: &RunSpec,
    identity: &Identity,
) -> Result<Option<(Ledger, Option<CurrentValidator>)>, HubError> {
    let at = db.last_seq().await?;
    let mut raw = Vec::new();
    for entry in db.ledger().await? {
        raw.extend(hex::decode(&entry).map_err(|e| HubError::Corrupt(format!("ledger entry: {e}")))?);
    }
    let mut ledger = Ledger::default();
    ledger.extend(&raw).map_err(|e| HubError::Corrupt(format!("the run's ledger does not verify: {e}")))?;
    if ledger.is_empty() {
        let policy = spec.trust.clone().unwrap_or_default();
        let genesis = LedgerBody::Genesis { run_id: run_id.to_owned(), policy };
        let bytes = ledger
            .append(0, now_ms(), false, genesis, identity)
            .map_err(|e| HubError::Corrupt(format!("ledger genesis: {e}")))?;
        let mut rows = vec![(0, hex::encode(bytes))];
        // The spec as created: what every change its holders vote is applied to, so anyone can
        // compare the spec the hub serves with the one its ledger allows.
        let body = LedgerBody::Spec {
            spec: serde_json::to_string(spec).map_err(|e| HubError::Corrupt(format!("the run's spec: {e}")))?,
        };
        let bytes = ledger.append(0, now_ms(), false, body, identity).map_err(|e| HubError::Config(e.to_string()))?;
        rows.push((ledger.len() - 1, hex::encode(bytes)));
        // The run's allocations are part of it from the start.
        for (holder, amount) in spec.economy.iter().flat_map(|e| e.allocations.iter()) {
            let body = LedgerBody::Allocation { holder: holder.clone(), amount: *amount };
            let bytes = ledger
                .append(0, now_ms(), false, body, identity)
                .map_err(|e| HubError::Config(format!("allocation to {holder:?}: {e}")))?;
            rows.push((ledger.len() - 1, hex::encode(bytes)));
        }
        // So is the share of revenue that funds the next phase: fixed here, never changed.
        if let Some(economy) = &spec.economy {
            let body = LedgerBody::Funding { ppm: economy.funding_ppm };
            let bytes =
                ledger.append(0, now_ms(), false, body, identity).map_err(|e| HubError::Config(e.to_string()))?;
            rows.push((ledger.len() - 1, hex::encode(bytes)));
        }
        // Committed by a root the hub signs, so a ledger that never gets another entry (an
        // unsealed run's) still verifies.
        {
            let root = LedgerBody::Root { size: ledger.len(), root: ledger.root() };
            let bytes =
                ledger.append(0, now_ms(), false, root, identity).map_err(|e| HubError::Corrupt(e.to_string()))?;
            rows.push((ledger.len() - 1, hex::encode(bytes)));
        }
        if db.append_ledger(&rows, at).await? == Written::Stale {
            return Ok(None);
        }
    } else if ledger.hub() != Some(identity.public()) {
        return Err(HubError::Config(format!(
            "this hub's key {} is not the key {} that signed the run's ledger: start it with the run's key file",
            identity.public(),
            ledger.hub().map(|k| k.hex()).unwrap_or_default()
        )));
    }
    // The last validator registered; the ledger verified its attestation when it was read.
    let last = ledger.entries().into_iter().rev().find_map(|e| match e.body {
        LedgerBody::Validator { attestation } => Some((e.seq, attestation)),
        _ => None,
    });
    let mut validator = None;
    if let Some((seq, attestation)) = last {
        let corrupt = |m: String| HubError::Corrupt(format!("ledger validator {seq}: {m}"));
        let key = PublicKey::parse(&attestation.signing_key).map_err(|e| corrupt(e.to_string()))?;
        let verified = ledger.validator(&key).ok_or_else(|| corrupt("not known to the ledger".into()))?.verified();
        let recipient = tessera_trust::SealingKey::parse(&attestation.sealing_key)
            .map_err(|e| corrupt(e.to_string()))?
            .fingerprint();
        validator = Some(CurrentValidator { attestation, verified, recipient, seq });
    }
    Ok(Some((ledger, validator)))
}
