//! Copies a prepared dataset (`manifest.json`, `tokenizer.json`, `shards/`) to where
//! contributors fetch it: a directory (which any HTTP server with Range support can serve) or
//! `s3://bucket/prefix`. Every file is checked against the manifest before it leaves; shards
//! already there at their full length are skipped, so an interrupted publish is simply run again;
//! the manifest goes last, so a reader never sees a manifest whose shards are missing.

use std::path::Path;
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tessera_data::manifest::{self, Manifest};

use crate::{PrepareError, io_err};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishReport {
    pub id: String,
    pub uploaded: usize,
    pub skipped: usize,
    pub bytes: u64,
}

fn destination(dest: &str) -> Result<Arc<dyn ObjectStore>, PrepareError> {
    let err = |e: String| PrepareError::Input { input: dest.to_owned(), message: e };
    if let Some(rest) = dest.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let s3 = AmazonS3Builder::from_env().with_bucket_name(bucket).build().map_err(|e| err(e.to_string()))?;
        let prefix = prefix.trim_end_matches('/');
        return Ok(if prefix.is_empty() { Arc::new(s3) } else { Arc::new(PrefixStore::new(s3, prefix)) });
    }
    std::fs::create_dir_all(dest).map_err(|e| err(e.to_string()))?;
    Ok(Arc::new(LocalFileSystem::new_with_prefix(dest).map_err(|e| err(e.to_string()))?))
}

/// Publishes the dataset prepared in `dir` to `dest`.
pub fn publish(dir: &Path, dest: &str) -> Result<PublishReport, PrepareError> {
    let (m, id) = Manifest::read(dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PrepareError::Invalid(e.to_string()))?;
    runtime.block_on(async {
        let store = destination(dest)?;
        let mut report = PublishReport { id: id.clone(), ..PublishReport::default() };
        let put = async |key: &str, bytes: Vec<u8>| -> Result<(), PrepareError> {
            store
                .put(&ObjPath::from(key), PutPayload::from(bytes))
                .await
                .map(drop)
                .map_err(|e| PrepareError::Input { input: format!("{dest}/{key}"), message: e.to_string() })
        };
        for entry in &m.shards {
            let key = manifest::shard_path(&entry.hash);
            if store.head(&ObjPath::from(key.as_str())).await.is_ok_and(|meta| meta.size == entry.bytes) {
                report.skipped += 1;
                continue;
            }
            let path = dir.join(&key);
            let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
            if manifest::hash_hex(&bytes) != entry.hash {
                return Err(io_err(&path, "the shard's bytes do not match the manifest: prepare again"));
            }
            report.bytes += bytes.len() as u64;
            put(&key, bytes).await?;
            report.uploaded += 1;
        }
        let tokenizer = dir.join(manifest::TOKENIZER_FILE);
        let bytes = std::fs::read(&tokenizer).map_err(|e| io_err(&tokenizer, e))?;
        if manifest::hash_hex(&bytes) != m.tokenizer.hash {
            return Err(io_err(&tokenizer, "not the tokenizer the manifest names"));
        }
        put(manifest::TOKENIZER_FILE, bytes).await?;
        let bytes = std::fs::read(dir.join(manifest::MANIFEST_FILE)).map_err(|e| io_err(dir, e))?;
        put(manifest::MANIFEST_FILE, bytes).await?;
        Ok(report)
    })
}
