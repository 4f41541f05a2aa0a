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
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};

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
            Arc::new(LocalFileSystem::new_with_prefix(dir)?)
        };
        Ok(Store { inner })
    }

    /// Writes `bytes` at `key`, atomically (readers see the old object or the whole new one).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), HubError> {
        self.inner.put(&Path::from(key), PutPayload::from(bytes)).await?;
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
