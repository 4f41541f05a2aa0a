//! Contributors' requests: signatures and nonces, registration, assignments and submissions.
//!
//! Cost per submission: the body is parsed and decoded once off the async workers (O(P)), its
//! blob stored, then two indexed lookups (blob owner; an earlier submission for the same base
//! round) and one transaction; nothing here reads more than the current round.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use tessera_aggregate::check_view;
use tessera_protocol::api::{
    Assignment, DataAssignment, Receipt, Registration, UploadCommit, UploadGrant, UploadRequest,
};
use tessera_protocol::{ApiError, ErrorCode, MessageView};
use tessera_round::{Event, Facts, MessageHeader, Submission};
use tessera_trust::{PublicKey, SealedHeader, SignedHead};

use crate::db::Written;
use crate::hub::{Hub, api, internal, now_ms};
use crate::store::submission_key;

/// What a submission's signed query says about it: the mean loss of its inner steps and, in a
/// manifest run, the data it was trained on (`DataAssignment::query`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Claim {
    pub inner_loss: Option<f64>,
    pub data: Option<DataAssignment>,
}

impl Hub {
    /// Checks a signed request's headers — for this hub and run, fresh, its nonce new, and its
    /// key within its rate — before any of its body is read. The body must then pass
    /// [`tessera_trust::SignedHead::check_body`].
    pub async fn verify_head<'a>(
        &self,
        header: impl Fn(&str) -> Option<&'a str>,
        method: &str,
        path: &str,
    ) -> Result<SignedHead, ApiError> {
        let head = tessera_trust::verify_request_head(header, &self.audience, method, path, now_ms())
            .map_err(|e| api(ErrorCode::Unauthorized, e.to_string()))?;
        if let Some(limits) = &self.key_rate
            && let Err(seconds) = limits.check(&head.by.key)
        {
            metrics::counter!("tessera_edge_refused_total", "why" => "key_rate").increment(1);
            return Err(api(
                ErrorCode::RateLimited,
                format!("key {} is making requests too fast: retry in {seconds} s", head.by.key),
            ));
        }
        if !self.db.use_nonce(&head.by.key.hex(), &head.by.nonce, now_ms()).await.map_err(internal)? {
            return Err(api(
                ErrorCode::ReplayedRequest,
                "this signed request was already received (same key and nonce): a replay is refused",
            ));
        }
        Ok(head)
    }

    /// Reads a request body of at most `limit` bytes for `key` within this replica's budget of
    /// bytes in flight (call it once the request's head is authenticated).
    pub async fn read_body(
        &self,
        key: &str,
        headers: &axum::http::HeaderMap,
        body: axum::body::Body,
        limit: usize,
    ) -> Result<tessera_edge::HeldBody, ApiError> {
        self.bodies.read(key, headers, body, limit).await.map_err(|e| {
            let code = match e {
                tessera_edge::BodyError::TooLarge { .. } => ErrorCode::TooLarge,
                tessera_edge::BodyError::Busy => ErrorCode::Busy,
                tessera_edge::BodyError::KeyBusy => ErrorCode::RateLimited,
                tessera_edge::BodyError::LengthRequired(_)
                | tessera_edge::BodyError::TimedOut
                | tessera_edge::BodyError::Read(_) => ErrorCode::BadRequest,
            };
            api(code, e.to_string())
        })
    }

    /// Forgets rate-limit state of keys idle long enough to be back at a full burst.
    pub(crate) fn forget_idle_keys(&self) {
        if let Some(limits) = &self.key_rate {
            limits.forget_idle();
        }
    }

    /// The registered contributor a verified request comes from (registered through any
    /// replica: one this replica has not heard of yet is looked up).
    pub async fn contributor_of(&self, key: &PublicKey) -> Result<u64, ApiError> {
        let known = self.keys.read().map_err(|_| api(ErrorCode::Internal, "key table poisoned"))?.ids.get(key).copied();
        if let Some(id) = known {
            return Ok(id);
        }
        self.catch_up().await.map_err(internal)?;
        let keys = self.keys.read().map_err(|_| api(ErrorCode::Internal, "key table poisoned"))?;
        keys.ids.get(key).copied().ok_or_else(|| {
            api(ErrorCode::Unauthorized, format!("key {key} is not registered: POST /v1/contributors first"))
        })
    }

    /// Registers `key` under `name`; the same key gets the same id again.
    pub async fn register(&self, name: &str, key: PublicKey) -> Result<Registration, ApiError> {
        let name: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
        // Serialised with the run's decisions, so ids are dense.
        let mut live = self.live.lock().await;
        let id = loop {
            self.sync(&mut live).await.map_err(internal)?;
            match self.db.register(&name, &key.hex(), now_ms(), live.seq).await.map_err(internal)? {
                (Written::At(seq), id) => {
                    if seq > live.seq {
                        live.run.apply(&Event::Registered { contributor: id }).map_err(|e| internal(e.into()))?;
                        live.seq = seq;
                    }
                    break id;
                }
                _ => continue, // Another replica decided meanwhile.
            }
        };
        let mut keys = self.keys.write().map_err(|_| api(ErrorCode::Internal, "key table poisoned"))?;
        keys.ids.insert(key, id);
        keys.keys.insert(id, key);
        tracing::info!(contributor = id, name, key = %key, "registered");
        Ok(Registration { contributor_id: id, public_key: key.hex() })
    }

    /// The contributor's next round. If it has already submitted for the current round, waits
    /// (up to `wait`) for the round to close first.
    pub async fn assign(&self, contributor: u64, wait: Duration) -> Result<Assignment, ApiError> {
        let mut rx = self.round_tx.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            rx.borrow_and_update();
            let done = self.live.lock().await.run.has_submitted(contributor);
            if !done || tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                break;
            }
        }
        let mut a = self.live.lock().await.run.assignment(contributor)?;
        a.revision = self.spec_revision();
        Ok(a)
    }

    /// Validates, stores and records one submission; closes the round at quorum. Every
    /// refusal but `busy` is recorded with its reason.
    pub async fn submit(
        self: &Arc<Self>,
        contributor: u64,
        key: PublicKey,
        body: Bytes,
        claim: Claim,
    ) -> Result<Receipt, ApiError> {
        self.submit_from(contributor, key, body, claim, false).await
    }

    /// Deletes the stored bytes of `blob` after `result` refused them for good, unless an
    /// accepted submission names the same bytes; a hub that is busy or failing keeps them for
    /// the retry.
    async fn drop_refused(&self, blob: &str, result: &Result<Receipt, ApiError>) {
        let for_good = matches!(result, Err(e) if !matches!(e.code, ErrorCode::Busy | ErrorCode::Internal));
        if for_good
            && self.db.blob_owner(blob).await.ok().flatten().is_none()
            && let Err(e) = self.store.delete(&submission_key(blob)).await
        {
            tracing::warn!(blob, error = %e, "could not delete a submission that was refused");
        }
    }

    /// [`Hub::submit`] of `body`, which is already in the store under its name if `in_store`
    /// (a direct upload).
    async fn submit_from(
        self: &Arc<Self>,
        contributor: u64,
        key: PublicKey,
        body: Bytes,
        claim: Claim,
        in_store: bool,
    ) -> Result<Receipt, ApiError> {
        let result = if self.spec().trust.is_some() {
            self.submit_sealed(contributor, key, body, claim, in_store).await
        } else {
            self.submit_clear(contributor, body, claim, in_store).await
        };
        if let Err(e) = &result {
            self.record_refusal(contributor, e).await;
        }
        result
    }

    /// Records a refused submission with its reason (every refusal but `busy`).
    async fn record_refusal(&self, contributor: u64, e: &ApiError) {
        let mut live = self.live.lock().await;
        loop {
            if let Err(err) = self.sync(&mut live).await {
                tracing::warn!(error = %err, "could not record a rejection");
                return;
            }
            let Some(event) = live.run.refused(contributor, e, now_ms()) else { return };
            let Event::Refused { round, at_ms, .. } = &event else { return };
            match self.db.insert_rejection(contributor, *round, e.code, &e.message, *at_ms, live.seq).await {
                Ok(Written::At(seq)) => {
                    if let Err(err) = live.run.apply(&event) {
                        tracing::error!(error = %err, "could not apply a refusal");
                    }
                    live.seq = seq;
                    tracing::info!(contributor, code = %e.code.wire_name(), message = %e.message, "submission rejected");
                    return;
                }
                Ok(_) => continue, // Another replica decided meanwhile.
                Err(db) => {
                    tracing::warn!(error = %db, "could not record a rejection");
                    return;
                }
            }
        }
    }

    async fn submit_clear(
        self: &Arc<Self>,
        contributor: u64,
        body: Bytes,
        claim: Claim,
        in_store: bool,
    ) -> Result<Receipt, ApiError> {
        let lengths: Vec<usize> = {
            let live = self.live.lock().await;
            let all = live.run.lengths();
            live.run.carried(contributor).into_iter().map(|i| all[i]).collect()
        };
        // Parse (which verifies the checksum of the whole body) and decode, off the async workers.
        let parsed = tokio::task::spawn_blocking(move || {
            let view = MessageView::parse(&body)?;
            let header = MessageHeader {
                run_id: view.run_id,
                round: view.round,
                codec: view.codec,
                table: view.tensors.iter().map(|t| (t.name.to_owned(), t.shape.clone())).collect(),
            };
            let base = hex::encode(view.base_checkpoint);
            let decoded = check_view(&lengths, &view);
            drop(view);
            Ok::<_, tessera_protocol::WireError>((header, base, decoded, body))
        })
        .await
        .map_err(|e| api(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| api(ErrorCode::MalformedMessage, e.to_string()))?;
        let (header, base_hash, decoded, body) = parsed;
        self.live.lock().await.run.check_message(contributor, &header)?;
        // Only now that names and shapes match the model does a decoding failure mean bad values.
        decoded.map_err(|e| api(ErrorCode::MalformedMessage, e.to_string()))?;
        // The message ends with the BLAKE3 of everything before it (verified by the parse):
        // that names the blob.
        let blob = hex::encode(&body[body.len().saturating_sub(32)..]);
        let submission = Submission {
            contributor,
            base_round: header.round,
            base_hash,
            blob,
            bytes: body.len() as u64,
            inner_loss: claim.inner_loss,
            data: claim.data,
        };
        self.store_and_record(submission, body, in_store).await
    }

    /// A sealed run's submission: the hub checks the envelope's clear header (run, base, sender,
    /// recipient) and stores the ciphertext; only the validator can check the rest.
    async fn submit_sealed(
        self: &Arc<Self>,
        contributor: u64,
        key: PublicKey,
        body: Bytes,
        claim: Claim,
        in_store: bool,
    ) -> Result<Receipt, ApiError> {
        // The envelope must be signed by the contributor it names, and that must be the sender.
        let header = SealedHeader::verified(&body).map_err(|e| api(ErrorCode::MalformedMessage, e.to_string()))?;
        if hex::encode(header.run_id) != self.run_id() {
            return Err(api(
                ErrorCode::WrongRun,
                format!("sealed for run {}, this is {}", hex::encode(header.run_id), self.run_id()),
            ));
        }
        if header.contributor != key {
            return Err(api(
                ErrorCode::Unauthorized,
                "the envelope names another contributor: only its sender may submit it",
            ));
        }
        let recipient = self
            .trust
            .read()
            .map_err(|_| api(ErrorCode::Internal, "trust poisoned"))?
            .validator
            .as_ref()
            .map(|v| v.recipient);
        let Some(recipient) = recipient else {
            return Err(api(ErrorCode::NoValidator, "no attested validator has registered yet; retry shortly"));
        };
        if header.recipient != recipient {
            return Err(api(
                ErrorCode::WrongValidator,
                "sealed to a validator key that is not the current one: fetch GET /v1/validator and seal again",
            ));
        }
        let submission = Submission {
            contributor,
            base_round: header.base_round,
            base_hash: hex::encode(header.base_checkpoint),
            blob: blake3::hash(&body).to_hex().to_string(),
            bytes: body.len() as u64,
            inner_loss: claim.inner_loss,
            data: claim.data,
        };
        self.store_and_record(submission, body, in_store).await
    }

    /// Stores the blob (unless it is there already), then records the submission as its own task: if the client hangs up,
    /// the request's future is dropped, but a half-done state change must never be.
    async fn store_and_record(
        self: &Arc<Self>,
        submission: Submission,
        body: Bytes,
        in_store: bool,
    ) -> Result<Receipt, ApiError> {
        if !in_store {
            // Refused bodies never reach the store: what can be decided before storing is.
            self.admissible(&submission).await?;
            self.store.put(&submission_key(&submission.blob), body.clone()).await.map_err(internal)?;
        }
        let (hub, blob) = (self.clone(), submission.blob.clone());
        let result = tokio::spawn(async move { hub.record(submission, body).await })
            .await
            .map_err(|e| api(ErrorCode::Internal, e.to_string()))?;
        // Refused after its bytes were stored here (the round moved on meanwhile): they go too.
        // A direct upload's bytes are the commit's to drop, whatever refused them.
        if !in_store {
            self.drop_refused(&blob, &result).await;
        }
        result
    }

    /// Whether `s` would be admitted now (run, round, base, staleness, a submission already in
    /// for its round, a copied blob), on the state every replica has committed. Deciding it
    /// writes nothing: [`Hub::record`] decides again once the bytes are stored.
    async fn admissible(&self, s: &Submission) -> Result<(), ApiError> {
        let mut live = self.live.lock().await;
        self.sync(&mut live).await.map_err(internal)?;
        let facts = Facts {
            blob_owner: self.db.blob_owner(&s.blob).await.map_err(internal)?,
            submitted_for_base: self.db.has_submitted(s.contributor, s.base_round).await.map_err(internal)?,
        };
        live.run.admit(s, facts, now_ms()).map(drop)
    }

    async fn record(&self, s: Submission, body: Bytes) -> Result<Receipt, ApiError> {
        let mut live = self.live.lock().await;
        let scored = self.spec().contest.is_some();
        // Decided on the state every replica has committed, and written only if no other
        // replica decided meanwhile (else again, on the newer state).
        let (admission, seq) = loop {
            self.sync(&mut live).await.map_err(internal)?;
            let facts = Facts {
                blob_owner: self.db.blob_owner(&s.blob).await.map_err(internal)?,
                submitted_for_base: self.db.has_submitted(s.contributor, s.base_round).await.map_err(internal)?,
            };
            let admission = live.run.admit(&s, facts, now_ms())?;
            let (accepted, closed) = match admission.events.as_slice() {
                [Event::Accepted(a)] => (a, None),
                [Event::Accepted(a), Event::Closed { closed, .. }] => (a, Some(closed)),
                _ => return Err(api(ErrorCode::Internal, "an admission without its submission")),
            };
            match self.db.accept(accepted, closed, scored, live.seq).await.map_err(internal)? {
                Written::At(seq) => break (admission, seq),
                Written::Stale => continue,
                Written::Duplicate => {
                    return Err(api(
                        ErrorCode::Duplicate,
                        format!("contributor {} already submitted for round {}", s.contributor, s.base_round),
                    ));
                }
            }
        };
        let (accepted, closed) = match admission.events.as_slice() {
            [Event::Accepted(a)] => (a, None),
            [Event::Accepted(a), Event::Closed { closed, .. }] => (a, Some(closed)),
            _ => return Err(api(ErrorCode::Internal, "an admission without its submission")),
        };
        for event in &admission.events {
            live.run.apply(event).map_err(|e| internal(e.into()))?;
        }
        live.seq = seq;
        // Handed over while `live` is held, so the running mean adds in admission order.
        if self.sums_on_arrival(&live) {
            let (pending, lengths) = (live.run.pending().len(), live.run.lengths());
            self.summer.add(accepted.round, pending, accepted.weight as f32, lengths, body).await;
        }
        let r = &admission.receipt;
        tracing::info!(
            contributor = s.contributor,
            round = r.round,
            base_round = r.base_round,
            weight = r.weight,
            bytes = r.bytes,
            accepted = live.run.pending().len(),
            "submission accepted"
        );
        if let Some(closed) = closed {
            if scored {
                tracing::info!(round = r.round, closed_by = %closed.closed_by, "submissions closed; waiting for scores");
            } else {
                // The submission is in either way: should publishing fail, the next tick retries.
                let closed_by = closed.closed_by.clone();
                let sealed = crate::rounds::Sealed::default();
                if let Err(e) = self.finish(&mut live, tessera_round::Judgement::Unscored, &closed_by, sealed).await {
                    tracing::error!(round = r.round, error = %e, "publishing the round failed; retrying at the next tick");
                }
            }
        }
        Ok(admission.receipt)
    }

    /// A contributor's request to upload a submission straight into the store: checked for
    /// what can be checked before the bytes exist (a sane name and size, the run still on, no
    /// submission yet for this round, a blob nobody else submitted), then presigned. A store
    /// that cannot sign answers no parts: the client posts the bytes to the hub.
    pub async fn grant_upload(&self, contributor: u64, request: &UploadRequest) -> Result<UploadGrant, ApiError> {
        let checked = self.check_upload(contributor, request).await;
        if let Err(e) = &checked {
            // Refused before any bytes moved, but refused all the same: recorded as a submission's.
            self.record_refusal(contributor, e).await;
        }
        checked?;
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(&request.sha256, &mut sha256).map_err(|_| api(ErrorCode::BadRequest, "sha256"))?;
        // Nobody's accepted submission is stored under this name (checked above), so whatever
        // is there is an earlier attempt's leftover (a store may keep bytes it refused): the
        // presigned PUT refuses to overwrite, so it goes first.
        let object = submission_key(&request.blob);
        if self.store.size(&object).await.is_ok() {
            self.store.delete(&object).await.map_err(internal)?;
        }
        let checksum = base64::engine::general_purpose::STANDARD.encode(sha256);
        let granted = self
            .store
            .grant_upload(&object, request.bytes, &checksum, UPLOAD_TTL, self.direct_multipart)
            .await
            .map_err(internal)?;
        let expires_ms = now_ms() + UPLOAD_TTL.as_millis() as i64;
        Ok(match granted {
            Some((upload_id, parts)) => UploadGrant { upload_id, parts, expires_ms },
            None => UploadGrant { upload_id: None, parts: Vec::new(), expires_ms },
        })
    }

    /// What a direct upload's request can be refused for before its bytes exist, with the
    /// refusal the submission itself would get.
    async fn check_upload(&self, contributor: u64, request: &UploadRequest) -> Result<(), ApiError> {
        blob_name(&request.blob)?;
        if request.sha256.len() != 64 || hex::decode(&request.sha256).is_err() {
            return Err(api(ErrorCode::BadRequest, "sha256 must be 64 hex digits"));
        }
        let limit = self.max_submission_bytes() as u64;
        if request.bytes == 0 || request.bytes > limit {
            return Err(api(
                ErrorCode::TooLarge,
                format!("a submission of {} bytes: this run takes 1 to {limit}", request.bytes),
            ));
        }
        {
            let live = self.live.lock().await;
            if live.run.finished() {
                return Err(api(ErrorCode::RunFinished, "the run has finished"));
            }
        }
        match self.db.blob_owner(&request.blob).await.map_err(internal)? {
            Some(owner) if owner != contributor => Err(api(
                ErrorCode::Replay,
                format!("these exact bytes were already submitted by contributor {owner}; a submission is new work"),
            )),
            Some(owner) => Err(api(
                ErrorCode::Duplicate,
                format!("these exact bytes are contributor {owner}'s accepted submission"),
            )),
            None => Ok(()),
        }
    }

    /// A direct upload is done: completes a multipart upload, reads the object back, checks it
    /// hashes to its name, and submits it as if it had been posted. Bytes that are not
    /// accepted, and that no accepted submission owns, are deleted.
    pub async fn commit_upload(
        self: &Arc<Self>,
        contributor: u64,
        key: PublicKey,
        blob: &str,
        commit: UploadCommit,
        claim: Claim,
    ) -> Result<Receipt, ApiError> {
        blob_name(blob)?;
        let object = submission_key(blob);
        if let Some(id) = &commit.upload_id {
            self.store.complete_upload(&object, id, commit.etags).await.map_err(|e| {
                api(ErrorCode::BadRequest, format!("the multipart upload of {blob} could not be completed: {e}"))
            })?;
        }
        let result = async {
            // Bounded: a replica holds at most `checking` submissions while checking and recording them.
            let _slot = self.checking.acquire().await.map_err(|e| api(ErrorCode::Internal, e.to_string()))?;
            let size = self.store.size(&object).await.map_err(|_| {
                api(ErrorCode::NotFound, format!("nothing was uploaded as {blob}: PUT it to the granted URL first"))
            })?;
            let limit = self.max_submission_bytes() as u64;
            if size > limit {
                return Err(api(ErrorCode::TooLarge, format!("{size} bytes uploaded; this run takes at most {limit}")));
            }
            let body = self.store.get(&object).await.map_err(internal)?;
            // Named by its BLAKE3: a sealed envelope's of the whole, a message's is its last 32
            // bytes (which its parse checks against the rest).
            let named = if self.spec().trust.is_some() {
                blake3::hash(&body).to_hex().to_string()
            } else {
                hex::encode(&body[body.len().saturating_sub(32)..])
            };
            if named != blob {
                return Err(api(
                    ErrorCode::MalformedMessage,
                    format!("the bytes uploaded as {blob} are named {named}"),
                ));
            }
            self.submit_from(contributor, key, body, claim, true).await
        }
        .await;
        self.drop_refused(blob, &result).await;
        result
    }
}

/// How long a presigned upload URL stays good.
const UPLOAD_TTL: Duration = Duration::from_secs(3600);

/// A blob's name: 64 lowercase hex digits (its BLAKE3).
pub(crate) fn blob_name(blob: &str) -> Result<(), ApiError> {
    if blob.len() == 64 && blob.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(api(ErrorCode::BadRequest, "a submission is named by 64 lowercase hex digits (its BLAKE3)"))
    }
}
