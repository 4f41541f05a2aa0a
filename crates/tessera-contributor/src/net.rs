//! What the contributor does over the network, through its [`HubClient`]: assignments,
//! submissions (and what becomes of them), and the base weights — followed through published
//! updates or downloaded as a checkpoint — cached in the state directory.
//!
//! [`Net`] holds only what a transfer needs and is cheap to clone, so that an overlapped
//! contributor can upload and download on a second thread while it trains.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tessera_client::{ASSIGNMENT_WAIT, ClientError, HubClient};
use tessera_protocol::api::{Assignment, LeaderRow};
use tessera_protocol::{ErrorCode, MessageView, TensorSpec, decode_weights, encode_weights, weights_hash};

use crate::{ContributorError, Outcome, Progress, ProgressFn, Result, state_err, write_atomic};

#[derive(serde::Serialize, serde::Deserialize)]
struct BaseMeta {
    round: u64,
    hash: String,
}

/// The weights of one published round, verified against its hash.
pub(crate) struct Base {
    pub round: u64,
    pub hash: String,
    pub weights: Vec<Vec<f32>>,
}

/// Everything a transfer needs: the hub (signing with this contributor's key, pinning the
/// hub's, through its links) and the state directory (resumable downloads, the cached base).
#[derive(Clone)]
pub(crate) struct Net {
    pub client: HubClient,
    pub state_dir: PathBuf,
    pub progress: Option<ProgressFn>,
}

impl Net {
    /// The client, reporting uploads to the progress display.
    fn uploading(&self) -> HubClient {
        let progress = self.progress.clone().map(|p| -> tessera_client::UploadProgress {
            Arc::new(move |sent, total| p(&Progress::Upload { sent, total }))
        });
        self.client.clone().on_upload(progress)
    }

    /// The contributor's next round; if it already submitted for the current one, the hub holds
    /// the answer (up to 20 s) until that round closes.
    pub fn assignment(&self) -> Result<Assignment> {
        Ok(self.client.assignment(ASSIGNMENT_WAIT)?)
    }

    /// Contributor `id`'s row of the run's leaderboard and how many rows there are.
    pub fn standing(&self, id: u64) -> Result<Option<(LeaderRow, usize)>> {
        let board = self.client.leaderboard()?;
        let total = board.rows.len();
        Ok(board.rows.into_iter().find(|r| r.id == id).map(|r| (r, total)))
    }

    /// Sends one submission. `busy_patience`: how long a scored run's hub may answer 503 `busy`
    /// while it waits for a round's scores (longer than patience alone might cover).
    /// `data`: the data it claims to have trained on (its assignment's).
    /// `tolerant`: every refusal is an outcome, not an error (adversaries are refused by design).
    pub fn upload(
        &self,
        body: Vec<u8>,
        inner_loss: f64,
        data: Option<tessera_protocol::api::DataAssignment>,
        busy_patience: Option<Duration>,
        tolerant: bool,
    ) -> Result<Outcome> {
        let mut client = self.uploading();
        if let Some(p) = busy_patience {
            let patience = client.patience().max(p);
            client = client.with_patience(patience);
        }
        match client.submit(Arc::new(body), Some(inner_loss), data) {
            Ok(r) => Ok(Outcome::Accepted(r)),
            Err(ClientError::Refused { error: e, .. }) if e.code == ErrorCode::Duplicate => {
                Ok(Outcome::AlreadyAccepted)
            }
            Err(ClientError::Refused { error: e, .. })
                if matches!(e.code, ErrorCode::Stale | ErrorCode::RunFinished) || tolerant =>
            {
                tracing::warn!(reason = %e.message, "submission not used");
                Ok(Outcome::NotUsed(e.message))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The bytes of the update the hub published into `round`.
    pub fn fetch_update(&self, round: u64) -> Result<Vec<u8>> {
        Ok(self.client.update(round)?)
    }

    /// Brings `base` to round `round`'s checkpoint `hash` and saves it in the state directory;
    /// returns it with the bytes downloaded. Follows published updates when it can, else
    /// downloads the checkpoint.
    pub fn ensure_base(
        &self,
        base: Option<Base>,
        round: u64,
        hash: &str,
        tensors: &[TensorSpec],
    ) -> Result<(Base, u64)> {
        let base = match base {
            Some(b) if b.hash == hash => return Ok((b, 0)),
            other => other,
        };
        let mut downloaded = 0;
        if let Some(mut base) = base.filter(|b| b.round < round) {
            let followed = (|| -> Result<Base> {
                for r in base.round + 1..=round {
                    let (next, n) = self.apply_update(&base, r, tensors)?;
                    downloaded += n;
                    base = next;
                }
                Ok(base)
            })();
            match followed {
                Ok(b) if b.hash == hash => {
                    self.save_base(&b, tensors)?;
                    return Ok((b, downloaded));
                }
                Ok(b) => tracing::warn!(got = %b.hash, want = hash, "updates did not reproduce the checkpoint"),
                Err(e) => tracing::warn!(error = %e, "could not follow the published updates"),
            }
        }
        let part = self.state_dir.join(format!("{hash}.part"));
        let bytes = self.client.checkpoint(hash, Some(&part))?;
        downloaded += bytes.len() as u64;
        let weights = decode_weights(&bytes, tensors)?;
        let base = Base { round, hash: hash.to_owned(), weights };
        self.save_base(&base, tensors)?;
        Ok((base, downloaded))
    }

    fn apply_update(&self, base: &Base, round: u64, tensors: &[TensorSpec]) -> Result<(Base, u64)> {
        let bytes = self.fetch_update(round)?;
        let view = MessageView::parse(&bytes)?;
        if hex::encode(view.base_checkpoint) != base.hash || view.round != round {
            return Err(ContributorError::Data(format!("update {round} does not start from round {}", base.round)));
        }
        let weights = view.apply_to(&base.weights)?;
        let hash = hex::encode(weights_hash(&encode_weights(tensors, &weights)?));
        Ok((Base { round, hash, weights }, bytes.len() as u64))
    }

    fn save_base(&self, base: &Base, tensors: &[TensorSpec]) -> Result<()> {
        let dir = &self.state_dir;
        write_atomic(&dir.join("base.safetensors"), &encode_weights(tensors, &base.weights)?)?;
        let meta = BaseMeta { round: base.round, hash: base.hash.clone() };
        write_atomic(&dir.join("base.json"), &serde_json::to_vec(&meta).map_err(|e| state_err(dir, e))?)
    }
}

/// The cached base weights, if present and intact.
pub(crate) fn load_base(dir: &Path, table: &[TensorSpec]) -> Option<Base> {
    let meta: BaseMeta = serde_json::from_slice(&std::fs::read(dir.join("base.json")).ok()?).ok()?;
    let bytes = std::fs::read(dir.join("base.safetensors")).ok()?;
    if hex::encode(weights_hash(&bytes)) != meta.hash {
        tracing::warn!("cached base weights do not match their hash; ignoring them");
        return None;
    }
    let weights = decode_weights(&bytes, table).ok()?;
    Some(Base { round: meta.round, hash: meta.hash, weights })
}
