//! A published checkpoint whose blob was lost is rebuilt from the one before it and the update
//! published between them (θ_{r+1} = θ_r + decode(update_{r+1}), exactly: the invariant every
//! contributor following updates relies on), checked against its name and stored again.
//!
//! Cost: one checkpoint, one update and the rebuilt checkpoint in memory (12P bytes), per lost
//! checkpoint walked back; nothing when the blob is there.

use bytes::Bytes;
use tessera_protocol::{MessageView, decode_weights, encode_weights, weights_hash};
use tessera_round::Run;

use crate::HubError;
use crate::db::Db;
use crate::store::{Store, checkpoint_key, update_key};

/// The checkpoint named `hash`, rebuilt and stored again if its blob is gone.
pub(crate) async fn checkpoint(db: &Db, store: &Store, run: &Run, hash: &str) -> Result<Bytes, HubError> {
    let missing = match store.get(&checkpoint_key(hash)).await {
        Ok(bytes) => return Ok(bytes),
        Err(e) => e,
    };
    // The lost checkpoints back to one that is there, newest first.
    let rounds = db.rounds().await?;
    if rounds.iter().any(|r| r.result_checkpoint.as_deref() == Some(hash)) {
        tracing::error!(checkpoint = hash, error = %missing, "a published checkpoint is unreadable; rebuilding it");
    }
    let mut lost = vec![hash.to_owned()];
    let base = loop {
        let want = lost.last().cloned().unwrap_or_default();
        let Some(row) = rounds.iter().find(|r| r.result_checkpoint.as_deref() == Some(want.as_str())) else {
            return Err(HubError::Corrupt(format!(
                "checkpoint {want} is lost and no published round produced it (the run's first checkpoint cannot be rebuilt)"
            )));
        };
        if run.phase_at(row.round + 1) != run.phase_at(row.round) {
            return Err(HubError::Corrupt(format!(
                "checkpoint {want} is lost and began a new phase (grown, not updated): it cannot be rebuilt from the update"
            )));
        }
        match store.get(&checkpoint_key(&row.base_checkpoint)).await {
            Ok(bytes) => break (row.round, bytes),
            Err(_) => lost.push(row.base_checkpoint.clone()),
        }
    };
    let (mut round, mut bytes) = base;
    for want in lost.iter().rev() {
        let spec = run.spec().at_phase(run.phase_at(round));
        let theta = decode_weights(&bytes, &spec.tensors)?;
        let update = store.get(&update_key(round + 1)).await?;
        let next = MessageView::parse(&update)
            .and_then(|u| u.apply_to(&theta))
            .map_err(|e| HubError::Corrupt(format!("update into round {}: {e}", round + 1)))?;
        let rebuilt = encode_weights(&spec.tensors, &next)?;
        let got = hex::encode(weights_hash(&rebuilt));
        if &got != want {
            return Err(HubError::Corrupt(format!(
                "checkpoint {want} rebuilt from round {round}'s and its update hashes to {got}: not recoverable"
            )));
        }
        bytes = Bytes::from(rebuilt);
        store.put(&checkpoint_key(want), bytes.clone()).await?;
        tracing::warn!(checkpoint = %want, round = round + 1, "a lost checkpoint was rebuilt from its base and update");
        round += 1;
    }
    Ok(bytes)
}
