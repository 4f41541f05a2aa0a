//! Where documents come from: local files and directories, `s3://bucket/prefix`, any HTTP(S)
//! URL of a file served with Range requests, and `hf://datasets/OWNER/NAME/PATH` (a Hugging Face
//! dataset repository's resolve URL, under `$HF_ENDPOINT` when set). Every source is an
//! `object_store`, so a parquet file is read a row group at a time with ranged reads (only the
//! text and id columns), whatever its size and wherever it is.

use std::sync::Arc;

use arrow_array::{Array, BinaryArray, BinaryViewArray, LargeBinaryArray, RecordBatch};
use arrow_schema::DataType;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use object_store::aws::AmazonS3Builder;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

use crate::PrepareError;

/// Rows per record batch read from parquet, and documents per batch from JSONL.
pub const BATCH_ROWS: usize = 1024;
/// A plain-text file is one document; larger ones are refused (split them first).
pub const TEXT_DOCUMENT_BYTES_MAX: u64 = 1 << 30;
/// One JSONL line may be at most this long.
pub const JSONL_LINE_BYTES_MAX: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Parquet,
    Jsonl,
    Text,
}

impl Kind {
    fn of(name: &str) -> Option<Kind> {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".parquet") {
            Some(Kind::Parquet)
        } else if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
            Some(Kind::Jsonl)
        } else if lower.ends_with(".txt") || lower.ends_with(".md") || lower.ends_with(".text") {
            Some(Kind::Text)
        } else {
            None
        }
    }
}

/// One input file, in whatever store holds it.
#[derive(Clone)]
pub struct Input {
    pub store: Arc<dyn ObjectStore>,
    pub path: ObjPath,
    /// As the user named it (a path or URL): provenance in the manifest, and error messages.
    pub name: String,
    pub size: u64,
    pub kind: Kind,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input").field("name", &self.name).field("size", &self.size).field("kind", &self.kind).finish()
    }
}

/// A document as read: its id (if the source has one) and its text's bytes (`None`: null).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDoc {
    pub id: Option<String>,
    pub text: Option<Vec<u8>>,
}

/// Consecutive documents of one input, starting at row `first_row`.
#[derive(Debug)]
pub struct Batch {
    pub input: usize,
    pub first_row: u64,
    pub docs: Vec<RawDoc>,
}

/// Which columns (parquet) or fields (JSONL) hold the text and the document id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Columns {
    pub text: String,
    pub id: String,
}

fn retry() -> RetryConfig {
    RetryConfig { max_retries: 5, ..RetryConfig::default() }
}

/// Resolves the user's input names into files, in a fixed order (the order names were given;
/// files under one directory or prefix sorted by name).
pub async fn resolve(names: &[String]) -> Result<Vec<Input>, PrepareError> {
    let mut out = Vec::new();
    for name in names {
        let before = out.len();
        if let Some(rest) = name.strip_prefix("s3://") {
            resolve_s3(name, rest, &mut out).await?;
        } else if let Some(rest) = name.strip_prefix("hf://") {
            let url = hf_url(rest).ok_or_else(|| PrepareError::Input {
                input: name.clone(),
                message: "expected hf://datasets/OWNER/NAME/PATH[@REVISION]".into(),
            })?;
            out.push(http_input(name, &url).await?);
        } else if name.starts_with("http://") || name.starts_with("https://") {
            out.push(http_input(name, name).await?);
        } else {
            resolve_local(name, &mut out)?;
        }
        if out.len() == before {
            return Err(PrepareError::Input {
                input: name.clone(),
                message: "no .parquet, .jsonl or .txt files there".into(),
            });
        }
    }
    Ok(out)
}

/// `datasets/OWNER/NAME/PATH[@REV]` → `{HF_ENDPOINT}/datasets/OWNER/NAME/resolve/REV/PATH`.
pub fn hf_url(rest: &str) -> Option<String> {
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let mut parts = rest.splitn(4, '/');
    let (kind, owner, repo, path) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if kind != "datasets" || owner.is_empty() || repo.is_empty() || path.is_empty() {
        return None;
    }
    let (path, rev) = match path.rsplit_once('@') {
        Some((p, r)) if !r.contains('/') => (p, r),
        _ => (path, "main"),
    };
    Some(format!("{}/datasets/{owner}/{repo}/resolve/{rev}/{path}", endpoint.trim_end_matches('/')))
}

async fn http_input(name: &str, url: &str) -> Result<Input, PrepareError> {
    let err = |message: String| PrepareError::Input { input: name.to_owned(), message };
    let parsed = url::Url::parse(url).map_err(|e| err(e.to_string()))?;
    let (base, file) = url.rsplit_once('/').ok_or_else(|| err("not a file URL".into()))?;
    if file.is_empty() || parsed.host_str().is_none() {
        return Err(err("name a file, not a directory: an HTTP server cannot be listed".into()));
    }
    let options = ClientOptions::new().with_allow_http(true);
    let store = HttpBuilder::new()
        .with_url(base)
        .with_client_options(options)
        .with_retry(retry())
        .build()
        .map_err(|e| err(e.to_string()))?;
    let store: Arc<dyn ObjectStore> = Arc::new(store);
    let path = ObjPath::from_url_path(file).map_err(|e| err(e.to_string()))?;
    let size = store.head(&path).await.map_err(|e| err(e.to_string()))?.size;
    let kind = Kind::of(file.split('?').next().unwrap_or(file)).unwrap_or(Kind::Text);
    Ok(Input { store, path, name: name.to_owned(), size, kind })
}

async fn resolve_s3(name: &str, rest: &str, out: &mut Vec<Input>) -> Result<(), PrepareError> {
    let err = |message: String| PrepareError::Input { input: name.to_owned(), message };
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    let store = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(retry())
        .build()
        .map_err(|e| err(e.to_string()))?;
    let store: Arc<dyn ObjectStore> = Arc::new(store);
    if let Some(kind) = Kind::of(key) {
        let path = ObjPath::from(key);
        let size = store.head(&path).await.map_err(|e| err(e.to_string()))?.size;
        out.push(Input { store, path, name: name.to_owned(), size, kind });
        return Ok(());
    }
    let prefix = (!key.is_empty()).then(|| ObjPath::from(key.trim_end_matches('/')));
    let mut found = Vec::new();
    let mut listing = store.list(prefix.as_ref());
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| err(e.to_string()))?;
        if let Some(kind) = Kind::of(meta.location.as_ref()) {
            found.push((meta.location, meta.size, kind));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, size, kind) in found {
        let name = format!("s3://{bucket}/{path}");
        out.push(Input { store: store.clone(), path, name, size, kind });
    }
    Ok(())
}

fn resolve_local(name: &str, out: &mut Vec<Input>) -> Result<(), PrepareError> {
    let err = |message: String| PrepareError::Input { input: name.to_owned(), message };
    let root = std::path::Path::new(name);
    let meta = std::fs::metadata(root).map_err(|e| err(e.to_string()))?;
    let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new());
    let mut push = |file: &std::path::Path, kind: Kind, size: u64| -> Result<(), PrepareError> {
        let abs = std::fs::canonicalize(file).map_err(|e| err(e.to_string()))?;
        let path = ObjPath::from_absolute_path(&abs).map_err(|e| err(e.to_string()))?;
        out.push(Input { store: store.clone(), path, name: file.display().to_string(), size, kind });
        Ok(())
    };
    if !meta.is_dir() {
        let kind = Kind::of(name).unwrap_or(Kind::Text);
        return push(root, kind, meta.len());
    }
    let mut files = Vec::new();
    walk(root, &mut files).map_err(|e| err(e.to_string()))?;
    files.sort();
    for file in files {
        let file_name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(kind) = Kind::of(&file_name) {
            let size = std::fs::metadata(&file).map_err(|e| err(e.to_string()))?.len();
            push(&file, kind, size)?;
        }
    }
    Ok(())
}

fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(&entry.path(), out)?;
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}

/// Where batches go: a bounded channel, so the reader waits for the tokenizer.
pub type Sink = tokio::sync::mpsc::Sender<Result<Batch, PrepareError>>;

/// Ranged reads of one parquet file from its object store: only the footer and the projected
/// columns' chunks are fetched (object_store retries each request).
struct Ranged {
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    size: u64,
}

fn parquet_io(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl AsyncFileReader for Ranged {
    fn get_bytes(&mut self, range: std::ops::Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        Box::pin(async move { self.store.get_range(&self.path, range).await.map_err(parquet_io) })
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<std::ops::Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        Box::pin(async move { self.store.get_ranges(&self.path, &ranges).await.map_err(parquet_io) })
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        Box::pin(async move {
            let size = self.size;
            let metadata =
                ParquetMetaDataReader::new().with_arrow_reader_options(options).load_and_finish(self, size).await?;
            Ok(Arc::new(metadata))
        })
    }
}

/// Reads input `index` from row `skip` on into `sink`; returns false when the consumer is gone.
pub async fn read_input(
    index: usize,
    input: &Input,
    columns: &Columns,
    skip: u64,
    sink: &Sink,
) -> Result<bool, PrepareError> {
    match input.kind {
        Kind::Parquet => read_parquet(index, input, columns, skip, sink).await,
        Kind::Jsonl => read_jsonl(index, input, columns, skip, sink).await,
        Kind::Text => {
            if skip > 0 {
                return Ok(true);
            }
            if input.size > TEXT_DOCUMENT_BYTES_MAX {
                return Err(input_err(
                    input,
                    format!(
                        "{} bytes is over the {TEXT_DOCUMENT_BYTES_MAX}-byte limit for one text document",
                        input.size
                    ),
                ));
            }
            let bytes = get_all(input).await?;
            let docs = vec![RawDoc { id: Some(input.name.clone()), text: Some(bytes) }];
            Ok(sink.send(Ok(Batch { input: index, first_row: 0, docs })).await.is_ok())
        }
    }
}

fn input_err(input: &Input, message: impl std::fmt::Display) -> PrepareError {
    PrepareError::Input { input: input.name.clone(), message: message.to_string() }
}

async fn get_all(input: &Input) -> Result<Vec<u8>, PrepareError> {
    let got = input.store.get(&input.path).await.map_err(|e| input_err(input, e))?;
    Ok(got.bytes().await.map_err(|e| input_err(input, e))?.to_vec())
}

/// Whether a column can hold text: a string column, or a binary one whose rows are checked for
/// UTF-8 one by one. (A string column's UTF-8 is checked by the parquet decoder, a batch at a
/// time: invalid bytes there mean a corrupt file and fail it, naming it.)
fn is_text(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
    )
}

async fn read_parquet(
    index: usize,
    input: &Input,
    columns: &Columns,
    skip: u64,
    sink: &Sink,
) -> Result<bool, PrepareError> {
    let mut reader = Ranged { store: input.store.clone(), path: input.path.clone(), size: input.size };
    let meta = ArrowReaderMetadata::load_async(&mut reader, ArrowReaderOptions::new())
        .await
        .map_err(|e| input_err(input, format!("not a readable parquet file: {e}")))?;
    let schema = meta.schema().clone();
    let names = || schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ");
    let text_at = schema.index_of(&columns.text).map_err(|_| {
        input_err(
            input,
            format!("no text column {:?} (columns: {}); name it with --text-column", columns.text, names()),
        )
    })?;
    let text_type = schema.field(text_at).data_type();
    if !is_text(text_type) {
        return Err(input_err(input, format!("column {:?} is {text_type}, not text", columns.text)));
    }
    let id_at = schema.index_of(&columns.id).ok();
    let total_rows = meta.metadata().file_metadata().num_rows().max(0) as u64;
    if skip >= total_rows {
        return Ok(true);
    }
    let builder = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, meta);
    let roots = [Some(text_at), id_at].into_iter().flatten();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let mut stream = builder
        .with_projection(mask)
        .with_batch_size(BATCH_ROWS)
        .with_offset(skip as usize)
        .build()
        .map_err(|e| input_err(input, e))?;
    let mut row = skip;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| input_err(input, format!("corrupt or truncated parquet: {e}")))?;
        let docs =
            batch_docs(&batch, &columns.text, id_at.map(|_| columns.id.as_str())).map_err(|e| input_err(input, e))?;
        let n = docs.len() as u64;
        if sink.send(Ok(Batch { input: index, first_row: row, docs })).await.is_err() {
            return Ok(false);
        }
        row += n;
    }
    Ok(true)
}

fn batch_docs(batch: &RecordBatch, text: &str, id: Option<&str>) -> Result<Vec<RawDoc>, String> {
    let column = batch.column_by_name(text).ok_or("the text column is missing from a batch")?;
    use arrow_array::cast::AsArray;
    let texts: Vec<Option<Vec<u8>>> = if let Some(a) = column.as_string_opt::<i32>() {
        a.iter().map(|v| v.map(|s| s.as_bytes().to_vec())).collect()
    } else if let Some(a) = column.as_string_opt::<i64>() {
        a.iter().map(|v| v.map(|s| s.as_bytes().to_vec())).collect()
    } else if let Some(a) = column.as_string_view_opt() {
        a.iter().map(|v| v.map(|s| s.as_bytes().to_vec())).collect()
    } else if let Some(a) = column.as_any().downcast_ref::<BinaryArray>() {
        a.iter().map(|v| v.map(<[u8]>::to_vec)).collect()
    } else if let Some(a) = column.as_any().downcast_ref::<LargeBinaryArray>() {
        a.iter().map(|v| v.map(<[u8]>::to_vec)).collect()
    } else if let Some(a) = column.as_any().downcast_ref::<BinaryViewArray>() {
        a.iter().map(|v| v.map(<[u8]>::to_vec)).collect()
    } else {
        return Err(format!("text column has type {}", column.data_type()));
    };
    let ids: Vec<Option<String>> = match id.and_then(|name| batch.column_by_name(name)) {
        Some(c) => {
            let strings = arrow_cast_to_strings(c.as_ref())?;
            strings.into_iter().collect()
        }
        None => vec![None; texts.len()],
    };
    Ok(texts.into_iter().zip(ids).map(|(text, id)| RawDoc { id, text }).collect())
}

/// An id column's values as strings (string columns as they are, numbers in decimal).
fn arrow_cast_to_strings(column: &dyn Array) -> Result<Vec<Option<String>>, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type, UInt64Type};
    let out = match column.data_type() {
        DataType::Utf8 => column.as_string::<i32>().iter().map(|v| v.map(str::to_owned)).collect(),
        DataType::LargeUtf8 => column.as_string::<i64>().iter().map(|v| v.map(str::to_owned)).collect(),
        DataType::Utf8View => column.as_string_view().iter().map(|v| v.map(str::to_owned)).collect(),
        DataType::Int64 => column.as_primitive::<Int64Type>().iter().map(|v| v.map(|x| x.to_string())).collect(),
        DataType::Int32 => column.as_primitive::<Int32Type>().iter().map(|v| v.map(|x| x.to_string())).collect(),
        DataType::UInt64 => column.as_primitive::<UInt64Type>().iter().map(|v| v.map(|x| x.to_string())).collect(),
        other => return Err(format!("id column has type {other}; use a string or integer column")),
    };
    Ok(out)
}

async fn read_jsonl(
    index: usize,
    input: &Input,
    columns: &Columns,
    skip: u64,
    sink: &Sink,
) -> Result<bool, PrepareError> {
    let got = input.store.get(&input.path).await.map_err(|e| input_err(input, e))?;
    let mut stream = got.into_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut row = 0u64;
    let mut batch = Batch { input: index, first_row: skip, docs: Vec::new() };
    let mut finished = false;
    while !finished {
        match stream.next().await {
            Some(chunk) => pending.extend_from_slice(&chunk.map_err(|e| input_err(input, e))?),
            None => {
                finished = true;
                if !pending.is_empty() && pending.last() != Some(&b'\n') {
                    pending.push(b'\n');
                }
            }
        }
        let mut start = 0;
        while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
            let line = &pending[start..start + nl];
            start += nl + 1;
            let this = row;
            row += 1;
            if this < skip {
                continue;
            }
            batch.docs.push(jsonl_doc(line, columns).map_err(|e| input_err(input, format!("line {}: {e}", this + 1)))?);
            if batch.docs.len() == BATCH_ROWS {
                let next = Batch { input: index, first_row: row, docs: Vec::new() };
                if sink.send(Ok(std::mem::replace(&mut batch, next))).await.is_err() {
                    return Ok(false);
                }
            }
        }
        pending.drain(..start);
        if pending.len() > JSONL_LINE_BYTES_MAX {
            return Err(input_err(input, format!("line {} is over {JSONL_LINE_BYTES_MAX} bytes", row + 1)));
        }
    }
    if !batch.docs.is_empty() {
        return Ok(sink.send(Ok(batch)).await.is_ok());
    }
    Ok(true)
}

/// One JSONL line: an object whose text field is a string (or null), with an optional id.
/// A blank line is an empty document (counted, not an error); a line that is not UTF-8 is a
/// document of invalid text; a line that is not a JSON object is an error.
fn jsonl_doc(line: &[u8], columns: &Columns) -> Result<RawDoc, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(RawDoc { id: None, text: None });
    }
    let Ok(line) = std::str::from_utf8(line) else {
        return Ok(RawDoc { id: None, text: Some(line.to_vec()) });
    };
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    let text = match object.get(&columns.text) {
        Some(serde_json::Value::String(s)) => Some(s.clone().into_bytes()),
        Some(serde_json::Value::Null) => None,
        Some(_) => return Err(format!("field {:?} is not a string", columns.text)),
        None => return Err(format!("no field {:?}; name the text field with --text-column", columns.text)),
    };
    let id = match object.get(&columns.id) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Ok(RawDoc { id, text })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_urls_follow_the_endpoint_and_revision() {
        let url = hf_url("datasets/HuggingFaceFW/fineweb-edu/sample/10BT/000_00000.parquet").unwrap();
        assert!(
            url.ends_with("/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/000_00000.parquet"),
            "{url}"
        );
        let pinned = hf_url("datasets/o/n/a.parquet@abc123").unwrap();
        assert!(pinned.ends_with("/datasets/o/n/resolve/abc123/a.parquet"), "{pinned}");
        assert_eq!(hf_url("models/o/n/a.parquet"), None);
        assert_eq!(hf_url("datasets/o/n"), None);
    }

    #[test]
    fn jsonl_lines_become_documents_or_named_errors() {
        let c = Columns { text: "text".into(), id: "id".into() };
        assert_eq!(
            jsonl_doc(br#"{"text": "hi", "id": 7}"#, &c).unwrap(),
            RawDoc { id: Some("7".into()), text: Some(b"hi".to_vec()) }
        );
        assert_eq!(jsonl_doc(b"  ", &c).unwrap(), RawDoc { id: None, text: None });
        assert_eq!(jsonl_doc(b"\xff\xfe", &c).unwrap().text, Some(vec![0xff, 0xfe]));
        assert!(jsonl_doc(br#"{"txt": "hi"}"#, &c).unwrap_err().contains("--text-column"));
        assert!(jsonl_doc(b"[1]", &c).unwrap_err().contains("object"));
        assert!(jsonl_doc(b"{", &c).unwrap_err().contains("JSON"));
    }
}
