//! The validator's side of the protocol: the round waiting for scores and its submissions,
//! the scores (or, in a sealed run, the aggregate and the verdict with its ledger entries),
//! and an attested validator's registration.

use bytes::Bytes;
use tessera_aggregate::decode_view;
use tessera_protocol::api::{JobSubmission, ScoreReport, ScoringJob, ValidatorInfo, Verdict};
use tessera_protocol::{ApiError, Codec, ErrorCode, MessageView};
use tessera_round::Judgement;
use tessera_trust::ValidatorAttestation;
use tessera_trust::ledger::Body as LedgerBody;

use crate::HubError;
use crate::hub::{CurrentValidator, Hub, api, internal, now_ms};
use crate::rounds::Sealed;
use crate::store::submission_key;

impl Hub {
    /// The round waiting for scores, if any: its submissions in arrival order and the revealed
    /// evaluation seed.
    /// In a run scored by many validators: the next task for `validator`, leased to it.
    pub async fn scoring_job(&self, validator: &str) -> Result<Option<ScoringJob>, HubError> {
        let mut live = self.live.lock().await;
        self.sync(&mut live).await?;
        if let Some(spec) = self.task_spec() {
            return self.task_job(&mut live, validator, &spec).await;
        }
        let run = &live.run;
        if run.closed().is_none() || run.finished() || self.spec().contest.is_none() {
            return Ok(None);
        }
        let round = run.round();
        let (eval_seed, eval_commitment) = self.db.eval_seed(round).await?;
        let submissions = run.arrival_order().into_iter().map(|r| self.job_submission(r)).collect();
        Ok(Some(ScoringJob {
            revision: self.spec_revision(),
            round,
            phase: run.phase() as u32,
            base_checkpoint: run.checkpoint().to_owned(),
            eval_seed,
            eval_commitment,
            submissions,
            task: None,
        }))
    }

    /// An accepted submission as a scoring job lists it: which windows its assignment trained on
    /// (its slot, and the inner steps of its base round) and whose key signed it.
    pub(crate) fn job_submission(&self, r: tessera_round::Accepted) -> JobSubmission {
        // H as it was when its base round was assigned (a steered run's H may have changed since).
        let at = self.trust.read().ok().and_then(|t| t.ledger.inner_steps_at(r.base_round));
        let h = at.unwrap_or_else(|| self.spec().inner_steps);
        JobSubmission {
            contributor: r.contributor,
            slot: r.contributor,
            base_round: r.base_round,
            schedule_step: r.base_round * h,
            inner_steps: h,
            weight: r.weight,
            contributor_key: self.key_of(r.contributor).map(|k| k.hex()).unwrap_or_default(),
            blob: r.blob,
            received_ms: r.received_ms,
        }
    }

    /// Where a stored submission's bytes are, for the validator: checked to name a submission
    /// of this run (one indexed lookup), then streamed from the store.
    pub async fn submission_blob_key(&self, blob: &str) -> Result<String, ApiError> {
        crate::intake::blob_name(blob)?;
        if self.db.blob_owner(blob).await.map_err(internal)?.is_none() {
            return Err(api(ErrorCode::NotFound, format!("no submission {blob}")));
        }
        Ok(submission_key(blob))
    }

    /// A stored submission's bytes, whole (for in-process validators).
    pub async fn submission_blob(&self, blob: &str) -> Result<Bytes, ApiError> {
        let key = self.submission_blob_key(blob).await?;
        self.store.get(&key).await.map_err(internal)
    }

    /// Takes the validator's scores for the round being scored and publishes it.
    pub async fn post_scores(&self, validator: &str, report: ScoreReport) -> Result<(), ApiError> {
        if self.spec().trust.is_some() {
            return Err(api(ErrorCode::BadRequest, "a sealed run is settled with POST /v1/validator/verdict"));
        }
        if self.task_spec().is_some() || report.task.is_some() {
            return self.post_task_scores(validator, report).await;
        }
        let mut live = self.live.lock().await;
        self.sync(&mut live).await.map_err(internal)?;
        live.run.check_report(&report)?;
        let closed_by = live.run.closed().map(|c| c.closed_by.clone()).unwrap_or_default();
        self.finish(&mut live, Judgement::Scored(&report), &closed_by, Sealed::default()).await.map_err(internal)
    }

    /// The validator cannot score the round waiting for scores: it is aggregated unscored now
    /// (what its score timeout would do later), its cause recorded in how it closed.
    ///
    /// In a run scored by many validators, the failing validator's tasks go to the others
    /// instead; only a hub with no other validator aggregates the round unscored.
    pub async fn post_failure(
        &self,
        validator: &str,
        failure: tessera_protocol::api::ScoringFailure,
    ) -> Result<(), ApiError> {
        let mut live = self.live.lock().await;
        self.sync(&mut live).await.map_err(internal)?;
        let run = &live.run;
        if run.closed().is_none() || run.finished() || self.spec().contest.is_none() || failure.round != run.round() {
            return Err(api(
                ErrorCode::NotScoring,
                format!("round {} is not waiting for scores (the run is at round {})", failure.round, run.round()),
            ));
        }
        let reason: String = failure
            .reason
            .chars()
            .filter(|c| !c.is_control())
            .take(tessera_protocol::api::ScoringFailure::REASON_MAX)
            .collect();
        if self.task_spec().is_some() && self.validator_count() > 1 {
            tracing::warn!(round = failure.round, validator, %reason, "a validator cannot score; its tasks go to the others");
            return self.release_tasks(&live, validator).await.map_err(internal);
        }
        let closed_by = run.closed().map(|c| c.closed_by.clone()).unwrap_or_default();
        tracing::warn!(round = failure.round, %reason, "the validator could not score the round; aggregating unscored");
        let closed_by = format!("{closed_by} (validator failed: {reason})");
        self.finish(&mut live, Judgement::Unscored, &closed_by, Sealed::default()).await.map_err(internal)
    }

    /// A sealed run: the validator's aggregate Δ̄ of the round being scored (an f32 message
    /// whose base is the round's checkpoint). Kept until its verdict arrives.
    pub async fn post_aggregate(&self, round: u64, body: Bytes) -> Result<(), ApiError> {
        if self.spec().trust.is_none() {
            return Err(api(ErrorCode::BadRequest, "only a sealed run takes its aggregate from the validator"));
        }
        let mut live = self.live.lock().await;
        self.sync(&mut live).await.map_err(internal)?;
        let run = &live.run;
        if run.closed().is_none() || run.finished() || round != run.round() {
            return Err(api(ErrorCode::NotScoring, format!("round {round} is not being scored")));
        }
        let decoded = decode_aggregate(run, round, body.clone()).await?;
        // Kept in the store too, so the verdict may reach any replica (the aggregate is what the
        // round's update publishes anyway, not anyone's submission).
        self.store.put(&aggregate_key(round), body).await.map_err(internal)?;
        live.sealed_mean = Some((round, decoded));
        Ok(())
    }

    /// A sealed run: the validator's verdict on the round being scored, with the ledger entries
    /// that record it. Publishes the round.
    pub async fn post_verdict(&self, verdict: Verdict) -> Result<(), ApiError> {
        if self.spec().trust.is_none() {
            return Err(api(ErrorCode::BadRequest, "only a sealed run is settled by the validator"));
        }
        let mut live = self.live.lock().await;
        self.sync(&mut live).await.map_err(internal)?;
        let rows = live.run.check_verdict(&verdict)?;
        // The aggregate stays posted until the verdict is accepted: a refused verdict can be
        // fixed and sent again.
        let round = live.run.round();
        if !matches!(live.sealed_mean, Some((r, _)) if r == round)
            && let Ok(body) = self.store.get(&aggregate_key(round)).await
        {
            // Posted through another replica.
            live.sealed_mean = Some((round, decode_aggregate(&live.run, round, body).await?));
        }
        if !matches!(live.sealed_mean, Some((r, _)) if r == round) {
            return Err(api(
                ErrorCode::NotScoring,
                "post the round's aggregate (POST /v1/validator/aggregate/{round}) before its verdict",
            ));
        }
        // The entries must chain onto the ledger, be signed by the attested validator, and pay
        // exactly what the verdict says to the round's submitters.
        let raw = hex::decode(&verdict.ledger).map_err(|_| api(ErrorCode::BadRequest, "ledger entries are not hex"))?;
        let (mut next, current) = {
            let t = self.trust.read().map_err(|_| api(ErrorCode::Internal, "trust poisoned"))?;
            (t.ledger.clone(), t.validator.as_ref().map(|v| v.attestation.signing_key.clone()))
        };
        let from = next.len();
        if verdict.ledger_from != from {
            return Err(api(
                ErrorCode::NotScoring,
                format!("the ledger has {from} entries, not {}: fetch it again and re-sign", verdict.ledger_from),
            ));
        }
        next.extend(&raw).map_err(|e| api(ErrorCode::BadRequest, format!("ledger entries refused: {e}")))?;
        let added: Vec<tessera_trust::ledger::Entry> = (from..next.len()).filter_map(|s| next.entry(s)).collect();
        if added.iter().any(|e| Some(&e.signer) != current.as_ref()) {
            return Err(api(ErrorCode::WrongValidator, "a round is settled by the current validator's key only"));
        }
        let receipts: Vec<_> = added.iter().filter(|e| matches!(e.body, LedgerBody::Receipt { .. })).collect();
        let matches = receipts.len() == rows.len()
            && rows.iter().zip(&receipts).zip(&verdict.settled).all(|((row, e), s)| match &e.body {
                LedgerBody::Receipt { contributor, submission, units, .. } => {
                    e.round == row.round
                        && *submission == row.blob
                        && *units == s.reward
                        && self.key_of(row.contributor).is_some_and(|k| k.hex() == *contributor)
                }
                _ => false,
            });
        if !matches || next.check_committed().is_err() {
            return Err(api(
                ErrorCode::BadRequest,
                "the ledger entries must be one receipt per submission (in the job's order, paying what the \
                 verdict says), the round's emission, and a signed root",
            ));
        }
        // The seed the validator drew and committed, revealed now and checked against it.
        let revealed = verdict
            .eval_seed
            .as_deref()
            .filter(|s| tessera_contest::commit::verify_hex(live.run.commitment(), s).is_ok());
        let Some(seed) = revealed.map(str::to_owned) else {
            return Err(api(
                ErrorCode::BadRequest,
                "the verdict must reveal the round's evaluation seed, matching the commitment the validator made",
            ));
        };
        let ledger = (from..next.len()).filter_map(|s| next.entry_bytes(s).map(|b| (s, hex::encode(b)))).collect();
        self.db.reveal_seed(round, &seed).await.map_err(internal)?;
        let Some((_, mean)) = live.sealed_mean.take() else {
            return Err(api(ErrorCode::Internal, "the posted aggregate vanished"));
        };
        let closed_by = live.run.closed().map(|c| c.closed_by.clone()).unwrap_or_default();
        let sealed = Sealed { mean: Some(mean), ledger, next: Some(next) };
        self.finish(&mut live, Judgement::Sealed(&verdict), &closed_by, sealed).await.map_err(internal)
    }

    /// A sealed run: the validator's commitment to the current round's evaluation seed, which it
    /// drew inside its TEE. Taken once per round, before the round takes submissions.
    pub async fn post_commitment(&self, c: tessera_protocol::api::SeedCommitment) -> Result<(), ApiError> {
        let mut live = self.live.lock().await;
        for _ in 0..8 {
            self.sync(&mut live).await.map_err(internal)?;
            let Some(event) = live.run.commit_seed(c.round, &c.commitment)? else { return Ok(()) };
            match self.db.commit_seed(c.round, &c.commitment, live.seq).await.map_err(internal)? {
                crate::db::Written::At(seq) => {
                    live.run.apply(&event).map_err(|e| api(ErrorCode::Internal, e.to_string()))?;
                    live.seq = seq;
                    tracing::info!(round = c.round, commitment = %c.commitment, "the validator committed the round's evaluation seed");
                    return Ok(());
                }
                _ => continue,
            }
        }
        Err(api(ErrorCode::Busy, "the run kept changing; retry"))
    }

    /// Registers an attested validator: its attestation must verify under the run's policy now,
    /// and `entry` must be its signed `Validator` ledger entry chained onto the ledger.
    pub async fn register_validator(&self, attestation: ValidatorAttestation, entry: &str) -> Result<u64, ApiError> {
        let Some(policy) = &self.spec().trust else {
            return Err(api(ErrorCode::BadRequest, "this run does not seal submissions; no attestation is needed"));
        };
        let verified = attestation
            .verify(policy, (now_ms() / 1000) as u64)
            .map_err(|e| api(ErrorCode::Unauthorized, e.to_string()))?;
        let raw = hex::decode(entry).map_err(|_| api(ErrorCode::BadRequest, "the ledger entry is not hex"))?;
        let mut live = self.live.lock().await; // No round publishes meanwhile.
        self.sync(&mut live).await.map_err(internal)?;
        let mut next = self.trust.read().map_err(|_| api(ErrorCode::Internal, "trust poisoned"))?.ledger.clone();
        let seq = next.len();
        next.extend(&raw).map_err(|e| api(ErrorCode::BadRequest, format!("ledger entry refused: {e}")))?;
        match next.entry(seq).map(|e| e.body) {
            Some(LedgerBody::Validator { attestation: a }) if a == attestation && next.len() == seq + 1 => {}
            _ => return Err(api(ErrorCode::BadRequest, "the entry must be this attestation's validator entry")),
        }
        let recipient = tessera_trust::SealingKey::parse(&attestation.sealing_key)
            .map_err(|e| api(ErrorCode::BadRequest, e.to_string()))?
            .fingerprint();
        live.seq =
            self.ledger_written(self.db.append_ledger(&[(seq, hex::encode(&raw))], live.seq).await.map_err(internal)?)?;
        if verified.insecure {
            tracing::warn!(key = %attestation.signing_key, "validator registered with an INSECURE development attestation (no TEE)");
        } else {
            tracing::info!(key = %attestation.signing_key, attestation = %verified, "validator attested");
        }
        let mut t = self.trust.write().map_err(|_| api(ErrorCode::Internal, "trust poisoned"))?;
        t.ledger = next;
        t.validator = Some(CurrentValidator { attestation, verified, recipient, seq });
        Ok(seq)
    }

    /// The validator submissions are sealed to, if one is registered.
    pub fn validator_info(&self) -> Option<ValidatorInfo> {
        let v = self.trust.read().ok()?.validator.clone()?;
        Some(ValidatorInfo {
            attestation: serde_json::to_value(&v.attestation).ok()?,
            verified: serde_json::to_value(&v.verified).ok()?,
            insecure: v.verified.insecure,
            ledger_seq: v.seq,
        })
    }
}

/// Where a sealed round's aggregate from the validator is kept until its verdict.
fn aggregate_key(round: u64) -> String {
    format!("aggregates/{round:08}.tpg")
}

/// A sealed round's aggregate Δ̄, checked: an f32 message for this run's round on its base.
async fn decode_aggregate(run: &tessera_round::Run, round: u64, body: Bytes) -> Result<Vec<Vec<f32>>, ApiError> {
    let (lengths, base, run_id) = (run.lengths(), run.checkpoint().to_owned(), run.run_id());
    tokio::task::spawn_blocking(move || {
        let view = MessageView::parse(&body).map_err(|e| api(ErrorCode::MalformedMessage, e.to_string()))?;
        if view.run_id != run_id || view.round != round || hex::encode(view.base_checkpoint) != base {
            return Err(api(ErrorCode::BaseMismatch, "the aggregate is not for this run's round and base"));
        }
        if view.codec != Codec::F32 {
            return Err(api(ErrorCode::CodecMismatch, "the aggregate travels in f32"));
        }
        decode_view(&lengths, &view).map_err(|e| api(ErrorCode::MalformedMessage, e.to_string()))
    })
    .await
    .map_err(|e| api(ErrorCode::Internal, e.to_string()))?
}
