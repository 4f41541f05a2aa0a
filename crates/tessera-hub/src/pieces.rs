//! Pieces of stored submissions, range-read from the store in the order a rule asks for them
//! ([`tessera_aggregate::shard::reads`]) a few ahead of the arithmetic. A robust rule, in this
//! process or in an aggregation worker, then holds one piece of every submission
//! ([`shard::PIECE_BYTES`] of f32 at most), never every submission whole.
//!
//! Cost for N submissions: one read of each submission's table (a small prefix; the tables are
//! held, N × the number of tensors), then one ranged read per submission per piece per stage
//! (a piece's spans are consecutive tensors, so one range covers them).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use futures::StreamExt as _;
use tessera_aggregate::AggregateError;
use tessera_aggregate::round::Input;
use tessera_aggregate::shard::{self, Piece};
use tessera_protocol::{Codec, Layout, WireError};

use crate::HubError;
use crate::store::{ReadAhead, Store};

/// A message's first bytes read to find its table: enough for a few hundred tensors' names.
const PREFIX: u64 = 64 << 10;

/// Tables read at once when a round's submissions are opened.
const OPENING: usize = 32;

/// A round's stored submissions, their tables read.
pub(crate) struct Submissions {
    keys: Vec<String>,
    /// Each submission's table, or why it cannot be read (the rule then leaves it out).
    layouts: Vec<Result<Layout, String>>,
    inputs: Vec<Input>,
    /// Set when a read failed for the store's sake (unreachable, a full disk), not for the
    /// bytes': what was computed then must not leave a submission out, only be retried.
    transient: Arc<AtomicBool>,
}

/// Whether `e` is the store failing for a while rather than a submission that is not there.
fn is_transient(e: &HubError) -> bool {
    matches!(e, HubError::Store(s) if !matches!(s, object_store::Error::NotFound { .. }))
}

impl Submissions {
    /// Reads the table of every submission (`keys`, with their `inputs`), a few at a time.
    pub async fn open(store: &Store, keys: Vec<String>, inputs: Vec<Input>) -> Submissions {
        // Owned futures: a stream of borrowing ones is not `Send` for every lifetime.
        let transient = Arc::new(AtomicBool::new(false));
        let reads = keys.clone().into_iter().map(|key| {
            let (store, transient) = (store.clone(), transient.clone());
            async move {
                read_layout(&store, &key).await.map_err(|e| {
                    if is_transient(&e) {
                        transient.store(true, Ordering::Relaxed);
                    }
                    format!("{key}: {e}")
                })
            }
        });
        let layouts = futures::stream::iter(reads).buffered(OPENING).collect().await;
        Submissions { keys, layouts, inputs, transient }
    }

    /// Whether a read failed for the store's sake: a result computed since may have left out
    /// a submission that is fine, and must be thrown away and retried.
    pub fn transient_failure(&self) -> bool {
        self.transient.load(Ordering::Relaxed)
    }

    /// Starts reading, `stages` times over, every piece of `pieces` from the submissions
    /// `active` carrying it, in [`shard::reads`] order (`active[k]` names the `k`th).
    pub fn read(self: &Arc<Self>, store: &Store, pieces: Vec<Piece>, active: Vec<usize>, stages: u32) -> PieceReads {
        let pieces = Arc::new(pieces);
        let bytes = Arc::new(AtomicU64::new(0));
        let kept: Arc<Vec<Input>> = Arc::new(active.iter().map(|&k| self.inputs[k].clone()).collect());
        let active = Arc::new(active);
        let order = {
            let pieces = pieces.clone();
            (0..stages).flat_map(move |_| {
                let (pieces, kept, active) = (pieces.clone(), kept.clone(), active.clone());
                (0..pieces.len()).flat_map(move |at| {
                    let ks: Vec<usize> = shard::carriers(&kept, &pieces[at]).map(|k| active[k]).collect();
                    ks.into_iter().map(move |k| (k, at))
                })
            })
        };
        let reads = order.map({
            let (this, store, pieces, bytes) = (self.clone(), store.clone(), pieces.clone(), bytes.clone());
            move |(k, at)| {
                let (this, store, pieces, bytes) = (this.clone(), store.clone(), pieces.clone(), bytes.clone());
                async move {
                    let (codec, places) = this.places(k, &pieces[at])?;
                    let (start, end) = places.iter().fold((u64::MAX, 0), |(a, b), r| (a.min(r.start), b.max(r.end)));
                    let key = &this.keys[k];
                    let read = store.get_range(key, start..end).await.map_err(|e| {
                        if is_transient(&e) {
                            this.transient.store(true, Ordering::Relaxed);
                        }
                        format!("{key}: {e}")
                    })?;
                    bytes.fetch_add(read.len() as u64, Ordering::Relaxed);
                    let places = places.into_iter().map(|r| (r.start - start) as usize..(r.end - start) as usize);
                    Ok(Read { k, at, codec, places: places.collect(), bytes: read })
                }
            }
        });
        let widest = pieces.iter().map(|p| p.len() as u64).max().unwrap_or(1);
        PieceReads { ahead: ReadAhead::start(reads, 4 * widest), pieces, bytes }
    }

    /// The codec and the byte range in the message of each span of submission `k`'s piece `p`.
    fn places(&self, k: usize, p: &Piece) -> Result<(Codec, Vec<Range<u64>>), String> {
        let layout = self.layouts[k].as_ref().map_err(Clone::clone)?;
        let key = &self.keys[k];
        let places = p
            .spans
            .iter()
            .map(|s| {
                let m = shard::message_index(&self.inputs[k], s.tensor)
                    .ok_or_else(|| format!("{key} does not carry tensor {}", s.tensor))?;
                let (numel, tensor) =
                    layout.tensors.get(m).cloned().ok_or_else(|| format!("{key} has no tensor {m}"))?;
                let within = shard::span_bytes(&layout.codec, numel, s).map_err(|e| format!("{key}: {e}"))?;
                match (tensor.start.checked_add(within.start), tensor.start.checked_add(within.end)) {
                    (Some(a), Some(b)) if b <= tensor.end => Ok(a..b),
                    _ => Err(format!("{key}: tensor {m}'s encoding is shorter than its table says")),
                }
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok((layout.codec, places))
    }
}

/// One piece of one submission, read: its spans' places in `bytes`.
struct Read {
    k: usize,
    at: usize,
    codec: Codec,
    places: Vec<Range<usize>>,
    bytes: Bytes,
}

/// Pieces being read ahead, handed out in order.
pub(crate) struct PieceReads {
    ahead: ReadAhead<Read>,
    pieces: Arc<Vec<Piece>>,
    bytes: Arc<AtomicU64>,
}

impl PieceReads {
    /// Submission `k`'s decoded, checked values of piece `p`, which must be the next in order:
    /// from a blocking thread.
    pub fn next(&self, k: usize, p: &Piece) -> Result<Vec<f32>, AggregateError> {
        let read = self.ahead.blocking_next().map_err(AggregateError::Unreadable)?;
        if read.k != k || self.pieces.get(read.at) != Some(p) {
            return Err(AggregateError::Unreadable(format!(
                "asked for submission {k}'s piece {p:?}, read submission {}'s {:?}",
                read.k,
                self.pieces.get(read.at)
            )));
        }
        let mut out = Vec::with_capacity(p.len());
        for (s, place) in p.spans.iter().zip(&read.places) {
            let bytes = read.bytes.get(place.clone()).ok_or_else(|| {
                AggregateError::Unreadable(format!(
                    "submission {k}: {} bytes read where tensor {} needs {place:?}",
                    read.bytes.len(),
                    s.tensor
                ))
            })?;
            shard::decode_span(&read.codec, bytes, s, &mut out)?;
        }
        Ok(out)
    }

    /// Bytes of submissions read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// A stored message's table, from a prefix read (longer if the table reaches further).
async fn read_layout(store: &Store, key: &str) -> Result<Layout, HubError> {
    let size = store.size(key).await?;
    let mut prefix = PREFIX.min(size);
    loop {
        let bytes = store.get_range(key, 0..prefix).await?;
        match Layout::read(&bytes) {
            Ok(layout) => return Ok(layout),
            Err(WireError::Truncated { offset, needed }) if prefix < size => {
                prefix = (offset as u64).saturating_add(needed as u64).max(2 * prefix).min(size);
            }
            Err(e) => return Err(HubError::Corrupt(format!("{key}: {e}"))),
        }
    }
}
