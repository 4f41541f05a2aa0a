//! `tessera data serve`: a published dataset over HTTP, as contributors fetch it — GET and HEAD
//! of the files under a directory, single byte ranges (`Range: bytes=a-b`, `bytes=a-`), nothing
//! else. For a local run or a test; a real run puts the dataset behind any web server or bucket
//! that answers Range requests.

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The routes: every path is a file under `root`.
pub fn router(root: PathBuf) -> axum::Router {
    axum::Router::new().fallback(file).with_state(root)
}

fn status(code: StatusCode, message: &str) -> Response {
    (code, message.to_owned()).into_response()
}

/// `root/path`, if `path` is plain names (no `..`, no absolute parts).
fn under(root: &Path, path: &str) -> Option<PathBuf> {
    let relative = Path::new(path.trim_start_matches('/'));
    relative.components().all(|c| matches!(c, std::path::Component::Normal(_))).then(|| root.join(relative))
}

async fn file(State(root): State<PathBuf>, request: Request) -> Response {
    let Some(path) = under(&root, request.uri().path()) else {
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
