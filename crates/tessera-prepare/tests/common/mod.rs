//! Test fixtures: FineWeb-layout parquet written with the `parquet` crate, a byte-level
//! tokenizer, and a small real HTTP server with Range support and an access log.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow_array::{ArrayRef, BinaryArray, Float64Array, RecordBatch, StringArray};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use tessera_data::TessTokenizer;
use tessera_prepare::{Columns, PrepareConfig};

/// A FineWeb-like document: `text`, `id`, `url`, `score`.
pub struct Doc {
    pub text: String,
    pub id: String,
}

/// `n` distinct documents of a few hundred bytes, seeded by `tag`.
pub fn docs(tag: &str, n: usize) -> Vec<Doc> {
    (0..n)
        .map(|i| Doc {
            text: format!("Document {tag}-{i}. ")
                + &format!("The {i}th line of {tag} says {}. ", i * 7919 % 1000).repeat(3 + i % 5),
            id: format!("<urn:uuid:{tag}-{i:06}>"),
        })
        .collect()
}

/// Writes `docs` as parquet in the FineWeb column layout, `row_group` rows per row group.
pub fn write_parquet(path: &Path, docs: &[Doc], row_group: usize) {
    let text: ArrayRef = Arc::new(StringArray::from_iter_values(docs.iter().map(|d| d.text.as_str())));
    let id: ArrayRef = Arc::new(StringArray::from_iter_values(docs.iter().map(|d| d.id.as_str())));
    let url: ArrayRef = Arc::new(StringArray::from_iter_values(docs.iter().map(|d| format!("https://x/{}", d.id))));
    let score: ArrayRef = Arc::new(Float64Array::from_iter_values(docs.iter().map(|_| 3.5)));
    let batch = RecordBatch::try_from_iter([("text", text), ("id", id), ("url", url), ("score", score)]).unwrap();
    write_batch(path, &batch, row_group);
}

/// A parquet file whose `text` column is binary: some rows are not UTF-8.
pub fn write_binary_parquet(path: &Path, rows: &[&[u8]]) {
    let text: ArrayRef = Arc::new(BinaryArray::from_iter_values(rows.iter().copied()));
    let id: ArrayRef = Arc::new(StringArray::from_iter_values((0..rows.len()).map(|i| format!("b{i}"))));
    let batch = RecordBatch::try_from_iter([("text", text), ("id", id)]).unwrap();
    write_batch(path, &batch, 1000);
}

/// A parquet file whose `text` column is annotated as a string, as FineWeb's is, yet holds the
/// raw bytes given (some not UTF-8): written with the low-level writer, which does not check.
pub fn write_mislabelled_parquet(path: &Path, rows: &[&[u8]]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::writer::SerializedFileWriter;
    let schema = parquet::schema::parser::parse_message_type(
        "message doc { REQUIRED BYTE_ARRAY text (UTF8); REQUIRED BYTE_ARRAY id (UTF8); }",
    )
    .unwrap();
    let props = Arc::new(WriterProperties::builder().build());
    let mut w = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), Arc::new(schema), props).unwrap();
    let mut group = w.next_row_group().unwrap();
    let columns: [Vec<ByteArray>; 2] = [
        rows.iter().map(|r| ByteArray::from(r.to_vec())).collect(),
        (0..rows.len()).map(|i| ByteArray::from(format!("s{i}").into_bytes())).collect(),
    ];
    for values in &columns {
        let mut column = group.next_column().unwrap().unwrap();
        column.typed::<ByteArrayType>().write_batch(values, None, None).unwrap();
        column.close().unwrap();
    }
    group.close().unwrap();
    w.close().unwrap();
}

fn write_batch(path: &Path, batch: &RecordBatch, row_group: usize) {
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(row_group))
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// The built-in byte-level tokenizer as a `tokenizer.json` in `dir`.
pub fn byte_tokenizer(dir: &Path) -> PathBuf {
    let path = dir.join("tokenizer.json");
    TessTokenizer::byte_level().save(&path).unwrap();
    path
}

pub fn config(inputs: Vec<String>, out: &Path, tokenizer: &Path, shard_tokens: u64) -> PrepareConfig {
    PrepareConfig {
        inputs,
        out: out.to_owned(),
        tokenizer: tokenizer.to_owned(),
        eos_token: None,
        columns: Columns { text: "text".into(), id: "id".into() },
        shard_tokens,
        validation_per_mille: 100,
        name: "test".into(),
        refuse_invalid_utf8: false,
        threads: 2,
        restart: false,
    }
}

/// A static file server over `root` with single-range GETs, HEAD, and a log of
/// `METHOD PATH RANGE` lines. Paths listed in `fail` answer 503 from their `n`th request on.
#[derive(Clone)]
pub struct Server {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    pub fail_after: Arc<Mutex<Option<(String, usize)>>>,
    /// The next `n` GETs of a path send only its first `bytes` bytes, then drop the connection.
    pub cut: Arc<Mutex<Option<(String, usize, usize)>>>,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

#[derive(Clone)]
struct Served {
    root: PathBuf,
    server: Server,
}

/// Starts a server on a background thread; it lives as long as the test process.
pub fn serve(root: &Path) -> Server {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let server = Server {
        addr: listener.local_addr().unwrap(),
        log: Arc::default(),
        fail_after: Arc::default(),
        cut: Arc::default(),
    };
    let state = Served { root: root.to_owned(), server: server.clone() };
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = axum::Router::new().fallback(handle).with_state(state);
            axum::serve(listener, app).await.unwrap();
        });
    });
    server
}

async fn handle(State(s): State<Served>, req: Request) -> Response {
    let path = req.uri().path().trim_start_matches('/').to_owned();
    let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let line = format!("{} /{} {}", req.method(), path, range.clone().unwrap_or_default());
    let count = {
        let mut log = s.server.log.lock().unwrap();
        log.push(line);
        log.iter().filter(|l| l.split(' ').nth(1) == Some(&format!("/{path}"))).count()
    };
    if let Some((fail, n)) = s.server.fail_after.lock().unwrap().clone()
        && fail == path
        && count >= n
    {
        return status(StatusCode::SERVICE_UNAVAILABLE);
    }
    if path.contains("..") {
        return status(StatusCode::BAD_REQUEST);
    }
    let Ok(bytes) = std::fs::read(s.root.join(&path)) else { return status(StatusCode::NOT_FOUND) };
    let len = bytes.len() as u64;
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let (code, body) = match range {
        None => (StatusCode::OK, bytes),
        Some(r) => match http_range_header::parse_range_header(&r).and_then(|p| p.validate(len)) {
            Ok(ranges) if ranges.len() == 1 => {
                let (a, b) = (*ranges[0].start(), *ranges[0].end());
                headers.insert(header::CONTENT_RANGE, format!("bytes {a}-{b}/{len}").parse().unwrap());
                (StatusCode::PARTIAL_CONTENT, bytes[a as usize..=b as usize].to_vec())
            }
            _ => return status(StatusCode::RANGE_NOT_SATISFIABLE),
        },
    };
    headers.insert(header::CONTENT_LENGTH, body.len().into());
    let cut = {
        let mut cut = s.server.cut.lock().unwrap();
        match cut.as_mut() {
            Some((p, bytes, n)) if *p == path && *n > 0 => {
                *n -= 1;
                Some(*bytes)
            }
            _ => None,
        }
    };
    let body = match cut {
        Some(keep) if keep < body.len() => {
            let head = bytes::Bytes::from(body[..keep].to_vec());
            use futures::StreamExt;
            // The bytes go out; a moment later the connection breaks.
            let broken = futures::stream::once(async {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                Err::<bytes::Bytes, _>(std::io::Error::other("connection cut by the test server"))
            });
            Body::from_stream(futures::stream::iter([Ok(head)]).chain(broken))
        }
        _ => Body::from(body),
    };
    let mut response = Response::new(body);
    *response.status_mut() = code;
    *response.headers_mut() = headers;
    response
}

fn status(code: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = code;
    r
}
