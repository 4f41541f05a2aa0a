//! Blobs (checkpoints, updates, submissions, outer-optimizer state) in an object store: a local
//! directory by default, any S3-compatible service given `s3://bucket[/prefix]` (credentials,
//! region and endpoint from the usual `AWS_*` environment variables).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

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

#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
}

impl Store {
    pub fn open(spec: &str) -> Result<Store, HubError> {
        let inner: Arc<dyn ObjectStore> = if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(HubError::Config(format!("store {spec:?} names no bucket")));
            }
            let s3 = AmazonS3Builder::from_env().with_bucket_name(bucket).build()?;
            if prefix.trim_matches('/').is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix.trim_matches('/')))
            }
        } else {
            let dir = spec.strip_prefix("file://").unwrap_or(spec);
            std::fs::create_dir_all(dir).map_err(|e| HubError::Config(format!("store directory {dir}: {e}")))?;
            // fsync: an object is on the disk, and its name in its directory, before `put` returns
            // (a submission is acknowledged only once its bytes are durable).
            Arc::new(LocalFileSystem::new_with_prefix(dir)?.with_fsync(true))
        };
        Ok(Store { inner })
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
