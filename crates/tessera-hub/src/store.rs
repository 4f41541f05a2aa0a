//! Blobs (checkpoints, updates, submissions, outer-optimizer state) in an object store: a local
//! directory by default, any S3-compatible service given `s3://bucket[/prefix]` (credentials,
//! region and endpoint from the usual `AWS_*` environment variables).

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::signer::{HeaderName, HeaderValue, Method, SignedUrlOptions, Signer};
use object_store::{ClientConfigKey, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tessera_protocol::api::UploadPart;

use crate::HubError;

/// Where a checkpoint lives: named by its BLAKE3 (hex), so rewriting it is harmless.
pub fn checkpoint_key(hash: &str) -> String {
    format!("checkpoints/{hash}.safetensors")
}

/// The compressed update published into `round`.
pub fn update_key(round: u64) -> String {
    format!("updates/{round:08}.tpg")
}

/// The outer momentum and broadcast residual going into `round`.
pub fn outer_key(round: u64) -> String {
    format!("outer/{round:08}.safetensors")
}

/// A submission's bytes, named by their BLAKE3 (hex).
pub fn submission_key(hash: &str) -> String {
    format!("submissions/{hash}.tpg")
}

/// Objects larger than this go up in parts (S3 refuses a single PUT above 5 GiB; a `phase2`
/// checkpoint is 7 GiB), each of [`PART_BYTES`], at most [`PARTS_IN_FLIGHT`] at a time.
pub const MULTIPART_ABOVE: usize = 256 << 20;
pub const PART_BYTES: usize = 64 << 20;
const PARTS_IN_FLIGHT: usize = 4;
/// A read from the object store that brings nothing for this long fails (and is retried).
const STALLED_READ: &str = "5min";

#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// An S3 store (and the prefix inside its bucket) signs URLs, so clients move bytes to and
    /// from the bucket themselves; none for a directory, or when turned off.
    direct: Option<Direct>,
}

#[derive(Clone)]
struct Direct {
    s3: Arc<AmazonS3>,
    prefix: String,
}

impl Store {
    pub fn open(spec: &str) -> Result<Store, HubError> {
        let inner: Arc<dyn ObjectStore> = if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(HubError::Config(format!("store {spec:?} names no bucket")));
            }
            // Hardly a limit on a whole request (a 28 GB checkpoint streams for minutes;
            // completing a multipart upload of one can take a minute), but a stalled read
            // fails. Set key by key: the rest of the client's options come from `AWS_*`.
            let client = |key| AmazonS3ConfigKey::Client(key);
            let s3 = Arc::new(
                AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_config(client(ClientConfigKey::Timeout), "1day")
                    .with_config(client(ClientConfigKey::ReadTimeout), STALLED_READ)
                    .build()?,
            );
            let prefix = prefix.trim_matches('/').to_owned();
            let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
                s3.clone()
            } else {
                Arc::new(PrefixStore::new(Arc::clone(&s3), prefix.as_str()))
            };
            return Ok(Store { inner, direct: Some(Direct { s3, prefix }) });
        } else {
            let dir = spec.strip_prefix("file://").unwrap_or(spec);
            std::fs::create_dir_all(dir).map_err(|e| HubError::Config(format!("store directory {dir}: {e}")))?;
            // fsync: an object is on the disk, and its name in its directory, before `put` returns
            // (a submission is acknowledged only once its bytes are durable).
            Arc::new(LocalFileSystem::new_with_prefix(dir)?.with_fsync(true))
        };
        Ok(Store { inner, direct: None })
    }

    /// This store with clients' transfers through the hub even where it could sign URLs (for
    /// a bucket contributors cannot reach).
    pub fn through_hub(mut self) -> Store {
        self.direct = None;
        self
    }

    /// Whether clients move bytes to and from the store themselves, on URLs the hub signs.
    pub fn direct(&self) -> bool {
        self.direct.is_some()
    }

    /// A presigned GET of `key`, good for `ttl`; none where the store cannot sign.
    pub async fn presigned_get(&self, key: &str, ttl: Duration) -> Result<Option<url::Url>, HubError> {
        let Some(d) = &self.direct else { return Ok(None) };
        Ok(Some(d.s3.signed_url(Method::GET, &d.path(key), ttl).await?))
    }

    /// Presigned uploads of `bytes` bytes to `key`, good for `ttl`: one PUT binding the
    /// content's SHA-256 (`sha256`, base64) and refusing to overwrite (`If-None-Match: *`), or,
    /// above `above`, a multipart upload of `part`-byte parts (the `upload_id` and each part's
    /// PUT). None where the store cannot sign: the client sends the bytes to the hub.
    pub async fn grant_upload(
        &self,
        key: &str,
        bytes: u64,
        sha256: &str,
        ttl: Duration,
        (above, part): (u64, u64),
    ) -> Result<Option<(Option<String>, Vec<UploadPart>)>, HubError> {
        let Some(d) = &self.direct else { return Ok(None) };
        let path = d.path(key);
        let header = |name: &'static str, value: &str| -> Result<(HeaderName, HeaderValue), HubError> {
            let value = HeaderValue::from_str(value).map_err(|e| HubError::Config(format!("header {name}: {e}")))?;
            Ok((HeaderName::from_static(name), value))
        };
        let listed = |options: &SignedUrlOptions| -> Vec<(String, String)> {
            let text = |v: &HeaderValue| v.to_str().unwrap_or_default().to_owned();
            options.signed_headers.iter().map(|(k, v)| (k.as_str().to_owned(), text(v))).collect()
        };
        if bytes <= above {
            let mut options = SignedUrlOptions::default();
            for (name, value) in [header("x-amz-checksum-sha256", sha256)?, header("if-none-match", "*")?] {
                options = options.with_signed_header(name, value);
            }
            let url = d.s3.signed_url_opts(Method::PUT, &path, ttl, &options).await?;
            return Ok(Some((None, vec![UploadPart { url: url.into(), headers: listed(&options), offset: 0, bytes }])));
        }
        // S3 takes at most 10,000 parts.
        let part = part.max(bytes.div_ceil(10_000));
        let id = d.s3.create_multipart(&path).await?;
        let mut parts = Vec::new();
        for (k, offset) in (0..bytes).step_by(part.max(1) as usize).enumerate() {
            let options =
                SignedUrlOptions::default().with_query([("partNumber", (k + 1).to_string()), ("uploadId", id.clone())]);
            let url = d.s3.signed_url_opts(Method::PUT, &path, ttl, &options).await?;
            parts.push(UploadPart { url: url.into(), headers: Vec::new(), offset, bytes: part.min(bytes - offset) });
        }
        Ok(Some((Some(id), parts)))
    }

    /// Completes the multipart upload `id` of `key` from its parts' ETags, in order.
    pub async fn complete_upload(&self, key: &str, id: &str, etags: Vec<String>) -> Result<(), HubError> {
        let Some(d) = &self.direct else {
            return Err(HubError::Config("this store takes no direct uploads".into()));
        };
        let parts = etags.into_iter().map(|content_id| PartId { content_id }).collect();
        d.s3.complete_multipart(&d.path(key), &id.to_owned(), parts).await?;
        Ok(())
    }

    pub async fn delete(&self, key: &str) -> Result<(), HubError> {
        Ok(self.inner.delete(&Path::from(key)).await?)
    }

    /// Writes `bytes` at `key`, atomically (readers see the old object or the whole new one):
    /// one PUT, or a multipart upload above [`MULTIPART_ABOVE`] (completed in one step, so
    /// just as atomic).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), HubError> {
        self.put_in_parts(key, bytes, MULTIPART_ABOVE, PART_BYTES).await
    }

    /// [`Store::put`] with the multipart threshold and part size given (S3's parts are at least
    /// 5 MiB, the last excepted). The parts are slices of `bytes`, never copies.
    pub async fn put_in_parts(&self, key: &str, bytes: Bytes, above: usize, part: usize) -> Result<(), HubError> {
        let path = Path::from(key);
        if bytes.len() <= above {
            self.inner.put(&path, PutPayload::from(bytes)).await?;
            return Ok(());
        }
        let mut upload = WriteMultipart::new_with_chunk_size(self.inner.put_multipart(&path).await?, part);
        let mut rest = bytes;
        while !rest.is_empty() {
            if let Err(e) = upload.wait_for_capacity(PARTS_IN_FLIGHT).await {
                upload.abort().await?;
                return Err(e.into());
            }
            upload.put(rest.split_to(part.min(rest.len())));
        }
        upload.finish().await?;
        Ok(())
    }

    /// An object written as a stream, in parts of [`PART_BYTES`] (a few in flight), visible
    /// whole or not at all once [`Writer::finish`] returns: what a checkpoint too large to hold
    /// in memory is written with.
    pub async fn writer(&self, key: &str) -> Result<Writer, HubError> {
        let upload = self.inner.put_multipart(&Path::from(key)).await?;
        Ok(Writer { upload: WriteMultipart::new_with_chunk_size(upload, PART_BYTES) })
    }

    /// Deletes every object under `prefix`.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize, HubError> {
        use futures::TryStreamExt as _;
        let listed: Vec<_> = self.inner.list(Some(&Path::from(prefix))).try_collect().await?;
        for object in &listed {
            self.inner.delete(&object.location).await?;
        }
        Ok(listed.len())
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, HubError> {
        Ok(self.inner.get(&Path::from(key)).await?.bytes().await?)
    }

    pub async fn size(&self, key: &str) -> Result<u64, HubError> {
        Ok(self.inner.head(&Path::from(key)).await?.size)
    }

    /// The object at `key` (or its `range`), to be read as a stream of chunks: a download
    /// never holds the whole object in memory.
    pub async fn stream(&self, key: &str, range: Option<Range<u64>>) -> Result<object_store::GetResult, HubError> {
        let options = GetOptions { range: range.map(GetRange::Bounded), ..Default::default() };
        Ok(self.inner.get_opts(&Path::from(key), options).await?)
    }

    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, HubError> {
        let options = GetOptions { range: Some(GetRange::Bounded(range)), ..Default::default() };
        Ok(self.inner.get_opts(&Path::from(key), options).await?.bytes().await?)
    }
}

impl Direct {
    /// `key`'s path in the bucket (the store's own prefix included: URLs are signed on the
    /// bucket, not through the prefix).
    fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() { Path::from(key) } else { Path::from(format!("{}/{key}", self.prefix)) }
    }
}

/// An object being written ([`Store::writer`]).
pub struct Writer {
    upload: WriteMultipart,
}

impl Writer {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), HubError> {
        self.upload.wait_for_capacity(PARTS_IN_FLIGHT).await?;
        self.upload.write(bytes);
        Ok(())
    }

    /// Completes the object. Dropping a writer unfinished leaves nothing visible.
    pub async fn finish(self) -> Result<(), HubError> {
        self.upload.finish().await?;
        Ok(())
    }

    /// Gives the upload up, its parts deleted.
    pub async fn abort(self) -> Result<(), HubError> {
        self.upload.abort().await?;
        Ok(())
    }
}

/// Reads kept ahead of a consumer on a blocking thread: at most [`AHEAD`] reads, and about
/// [`AHEAD_BYTES`], half in flight and half done and waiting, so reading goes on while the
/// consumer works (an object store answers each read after a round trip). Taken in order with
/// [`ReadAhead::blocking_next`]; dropping it stops the reads.
pub(crate) struct ReadAhead<T> {
    rx: std::sync::Mutex<tokio::sync::mpsc::Receiver<Result<T, String>>>,
    task: tokio::task::JoinHandle<()>,
}

/// At most this many reads ahead, and at most this many bytes.
const AHEAD: u64 = 16;
const AHEAD_BYTES: u64 = 1 << 30;

impl<T: Send + 'static> ReadAhead<T> {
    /// Starts `reads` in order, each about `bytes` large, on the current runtime.
    pub fn start<F>(reads: impl Iterator<Item = F> + Send + 'static, bytes: u64) -> ReadAhead<T>
    where
        F: std::future::Future<Output = Result<T, String>> + Send + 'static,
    {
        use futures::StreamExt as _;
        let half = (AHEAD_BYTES / bytes.max(1)).clamp(1, AHEAD).div_ceil(2) as usize;
        let (tx, rx) = tokio::sync::mpsc::channel(half);
        let task = tokio::spawn(async move {
            let mut done = std::pin::pin!(futures::stream::iter(reads).buffered(half));
            while let Some(read) = done.next().await {
                if tx.send(read).await.is_err() {
                    break;
                }
            }
        });
        ReadAhead { rx: std::sync::Mutex::new(rx), task }
    }

    /// The next read's result, waiting for it: from a blocking thread only.
    pub fn blocking_next(&self) -> Result<T, String> {
        let mut rx = self.rx.lock().map_err(|_| "the read-ahead was poisoned".to_owned())?;
        rx.blocking_recv().ok_or_else(|| "the reads stopped".to_owned())?
    }
}

impl<T> Drop for ReadAhead<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}
