//! `tessera data serve`: a published dataset over HTTP, as contributors fetch it — GET and HEAD
//! of the files under a directory, single byte ranges (`Range: bytes=a-b`, `bytes=a-`), nothing
//! else — with an optional access log. For a local run or a test; a real run puts the dataset
//! behind any web server or bucket that answers Range requests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One line of the access log (JSON Lines): what was asked and what was answered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Access {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub method: String,
    pub path: String,
    /// The `Range` header, as sent.
    pub range: Option<String>,
    pub status: u16,
    /// Body bytes answered.
    pub bytes: u64,
}

struct Served {
    root: PathBuf,
    log: Option<Mutex<std::fs::File>>,
}

/// The routes: every path is a file under `root`. With `access_log`, every request is appended
/// to that file as one JSON line ([`Access`]).
pub fn router(root: PathBuf, access_log: Option<&Path>) -> std::io::Result<axum::Router> {
    let log = match access_log {
        Some(path) => Some(Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?)),
        None => None,
    };
    Ok(axum::Router::new().fallback(logged).with_state(Arc::new(Served { root, log })))
}

async fn logged(State(served): State<Arc<Served>>, request: Request) -> Response {
    let (method, path) = (request.method().to_string(), request.uri().path().to_owned());
    let range = request.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let response = file(&served.root, request).await;
    if let Some(log) = &served.log {
        let entry = Access {
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            method,
            path,
            range,
            status: response.status().as_u16(),
            bytes: axum::body::HttpBody::size_hint(response.body()).exact().unwrap_or(0),
        };
        let written = serde_json::to_string(&entry).map_err(std::io::Error::other).and_then(|line| {
            let mut file = log.lock().map_err(|_| std::io::Error::other("access log poisoned"))?;
            file.write_all(format!("{line}\n").as_bytes())
        });
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not write the access log");
        }
    }
    response
}

fn status(code: StatusCode, message: &str) -> Response {
    (code, message.to_owned()).into_response()
}

/// `root/path`, if `path` is plain names (no `..`, no absolute parts).
fn under(root: &Path, path: &str) -> Option<PathBuf> {
    let relative = Path::new(path.trim_start_matches('/'));
    relative.components().all(|c| matches!(c, std::path::Component::Normal(_))).then(|| root.join(relative))
}

async fn file(root: &Path, request: Request) -> Response {
    let Some(path) = under(root, request.uri().path()) else {
        return status(StatusCode::BAD_REQUEST, "bad path");
    };
    let Ok(bytes) = tokio::fs::read(&path).await else {
        return status(StatusCode::NOT_FOUND, "no such file");
    };
    let size = bytes.len() as u64;
    let range = request.headers().get(header::RANGE).and_then(|v| v.to_str().ok());
    let mut response = match range {
        None => (StatusCode::OK, Body::from(bytes)).into_response(),
        Some(spec) => match http_range_header::parse_range_header(spec).and_then(|r| r.validate(size)) {
            Ok(ranges) if ranges.len() == 1 => {
                let (a, b) = (*ranges[0].start(), *ranges[0].end());
                let mut r =
                    (StatusCode::PARTIAL_CONTENT, Body::from(bytes[a as usize..=b as usize].to_vec())).into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{size}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                r
            }
            _ => return status(StatusCode::RANGE_NOT_SATISFIABLE, "one satisfiable byte range, please"),
        },
    };
    response.headers_mut().insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_paths_under_the_root() {
        let root = Path::new("/srv/data");
        assert_eq!(under(root, "/shards/ab.tshard"), Some(root.join("shards/ab.tshard")));
        assert_eq!(under(root, "/../etc/passwd"), None);
        assert_eq!(under(root, "/shards/../../x"), None);
    }
}
