//! The current round's mean, summed as its submissions arrive, so closing a mean-rule round
//! decodes nothing: one task owns the running sum and takes, in order, the submissions handed
//! to it while the run's state was locked (so in admission order, the order the round is
//! aggregated in) and, at close, the request for the finished sum.
//!
//! Cost: the running sum (4P bytes) and at most [`QUEUED`] submissions waiting to be added;
//! one decode pass per submission, on a blocking thread, off the run's lock. A hub restarted
//! mid-round has no sum for it and reads the round's blobs at close instead (one at a time),
//! which gives the same bits: arrival order is admission order.

use bytes::Bytes;
use tessera_aggregate::round::RunningMean;
use tessera_protocol::MessageView;
use tokio::sync::{mpsc, oneshot};

/// Submissions waiting to be summed; past this, handing one over waits (bounded memory).
const QUEUED: usize = 2;

enum Job {
    Add { round: u64, pending: usize, weight: f32, lengths: Vec<usize>, body: Bytes },
    Take { round: u64, count: usize, reply: oneshot::Sender<Option<RunningMean>> },
}

/// The handle to the summing task.
pub(crate) struct Summer {
    tx: mpsc::Sender<Job>,
}

/// The sum of a round's first `mean.count()` submissions.
struct Running {
    round: u64,
    mean: RunningMean,
}

impl Summer {
    /// Starts the task (on the current runtime); it ends when the hub is dropped.
    pub fn start() -> Summer {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUED);
        tokio::spawn(async move {
            let mut running: Option<Running> = None;
            while let Some(job) = rx.recv().await {
                match job {
                    Job::Add { round, pending, weight, lengths, body } => {
                        running = add(running.take(), round, pending, weight, lengths, body).await;
                    }
                    Job::Take { round, count, reply } => {
                        let sum = running.take().filter(|r| r.round == round && r.mean.count() == count);
                        let _ = reply.send(sum.map(|r| r.mean));
                    }
                }
            }
        });
        Summer { tx }
    }

    /// Adds the round's `pending`-th accepted submission (counting from 1) with `weight`.
    pub async fn add(&self, round: u64, pending: usize, weight: f32, lengths: Vec<usize>, body: Bytes) {
        if self.tx.send(Job::Add { round, pending, weight, lengths, body }).await.is_err() {
            tracing::warn!(round, "the summing task has stopped; the round will be read back at close");
        }
    }

    /// The sum of `round`'s first `count` submissions, if it holds exactly those; it is given
    /// up either way.
    pub async fn take(&self, round: u64, count: usize) -> Option<RunningMean> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Job::Take { round, count, reply }).await.ok()?;
        answer.await.ok().flatten()
    }
}

/// `running` with one more submission: the round's first starts a new sum; one that does not
/// follow the sum held (a restart mid-round) leaves none, and so does a failed add.
async fn add(
    running: Option<Running>,
    round: u64,
    pending: usize,
    weight: f32,
    lengths: Vec<usize>,
    body: Bytes,
) -> Option<Running> {
    let mut running = match running {
        Some(r) if r.round == round && r.mean.count() + 1 == pending => r,
        _ if pending == 1 => Running { round, mean: RunningMean::new(&lengths) },
        _ => return None,
    };
    let summed = tokio::task::spawn_blocking(move || {
        let added = MessageView::parse(&body).map_err(Into::into).and_then(|view| running.mean.add(weight, &view));
        added.map(|()| running)
    })
    .await;
    match summed {
        Ok(Ok(running)) => Some(running),
        Ok(Err(e)) => {
            tracing::warn!(round, error = %e, "a submission could not be summed on arrival; the round will be read back at close");
            None
        }
        Err(e) => {
            tracing::warn!(round, error = %e, "the summing task failed; the round will be read back at close");
            None
        }
    }
}
