//! Uploading a directory to a Hugging Face model repository through the Hub's HTTP API, as
//! `huggingface_hub`'s `upload_folder` does: create the repository (an existing one is kept),
//! ask which files go through LFS (`preupload`), upload those through the Git LFS batch API
//! (basic transfer), then one commit (`application/x-ndjson`) that adds the small files inline
//! and names the LFS ones by SHA-256. The endpoint is `HF_ENDPOINT` (default
//! `https://huggingface.co`), so tests and mirrors point it elsewhere.
//!
//! Cost: each file is read once to hash it (streamed) and once to upload it: an LFS file is
//! streamed from disk, a small (regular) one is held in memory while the commit is built.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A model repository on a Hugging Face Hub.
pub struct Repo {
    pub endpoint: String,
    /// `namespace/name`.
    pub id: String,
    pub token: Option<String>,
}

struct File {
    path: String,
    local: std::path::PathBuf,
    size: u64,
    sha256: String,
    /// The first 512 bytes, which the Hub looks at to choose LFS or not.
    sample: Vec<u8>,
}

impl Repo {
    fn request(
        &self,
        client: &reqwest::blocking::Client,
        method: reqwest::Method,
        url: &str,
    ) -> reqwest::blocking::RequestBuilder {
        let r = client.request(method, url);
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Uploads every file under `dir` (its relative paths as the paths in the repository) as one
    /// commit on `main`; returns the commit's URL or id as the Hub answers it.
    pub fn upload_dir(&self, dir: &Path, summary: &str) -> Result<String> {
        let (namespace, name) =
            self.id.split_once('/').with_context(|| format!("repository {:?} is not NAMESPACE/NAME", self.id))?;
        // A whole upload may take long (GiBs of weights); a Hub that does not answer at all does not.
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .timeout(Duration::from_secs(3600))
            .build()?;
        let base = self.endpoint.trim_end_matches('/');
        let files = read_files(dir)?;

        let r = self
            .request(&client, reqwest::Method::POST, &format!("{base}/api/repos/create"))
            .json(&json!({"name": name, "organization": namespace, "type": "model", "private": false}))
            .send()
            .context("create the repository")?;
        if !(r.status().is_success() || r.status() == reqwest::StatusCode::CONFLICT) {
            bail!("creating {}: {} {}", self.id, r.status(), r.text().unwrap_or_default());
        }

        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let ask: Vec<Value> = files
            .iter()
            .map(|f| json!({"path": f.path, "size": f.size, "sample": b64(&f.sample), "sha": f.sha256}))
            .collect();
        let r = self
            .request(&client, reqwest::Method::POST, &format!("{base}/api/models/{}/preupload/main", self.id))
            .json(&json!({"files": ask}))
            .send()
            .context("preupload")?;
        let modes: Value = checked(r, "preupload")?.json().context("preupload: the answer is not JSON")?;
        let lfs = |path: &str| {
            modes["files"].as_array().into_iter().flatten().any(|m| m["path"] == path && m["uploadMode"] == "lfs")
        };

        let large: Vec<&File> = files.iter().filter(|f| lfs(&f.path)).collect();
        if !large.is_empty() {
            let objects: Vec<Value> = large.iter().map(|f| json!({"oid": f.sha256, "size": f.size})).collect();
            let r = self
                .request(&client, reqwest::Method::POST, &format!("{base}/{}.git/info/lfs/objects/batch", self.id))
                .header("Accept", "application/vnd.git-lfs+json")
                .header("Content-Type", "application/vnd.git-lfs+json")
                .json(
                    &json!({"operation": "upload", "transfers": ["basic"], "objects": objects, "hash_algo": "sha256"}),
                )
                .send()
                .context("the LFS batch request")?;
            let batch: Value = checked(r, "LFS batch")?.json().context("LFS batch: the answer is not JSON")?;
            for f in &large {
                let Some(o) = batch["objects"].as_array().into_iter().flatten().find(|o| o["oid"] == f.sha256.as_str())
                else {
                    bail!("LFS batch: no answer for {}", f.path);
                };
                if let Some(e) = o.get("error") {
                    bail!("LFS batch refused {}: {e}", f.path);
                }
                let Some(upload) = o["actions"].get("upload") else { continue }; // Already stored.
                let href = upload["href"].as_str().with_context(|| format!("LFS: no upload URL for {}", f.path))?;
                let file = std::fs::File::open(&f.local).with_context(|| format!("open {}", f.local.display()))?;
                let mut put = client.put(href).body(reqwest::blocking::Body::sized(file, f.size));
                for (k, v) in upload["header"].as_object().into_iter().flatten() {
                    put = put.header(k.as_str(), v.as_str().unwrap_or_default());
                }
                checked(put.send().with_context(|| format!("upload {}", f.path))?, &f.path)?;
                if let Some(verify) = o["actions"].get("verify").and_then(|v| v["href"].as_str()) {
                    let r = self
                        .request(&client, reqwest::Method::POST, verify)
                        .json(&json!({"oid": f.sha256, "size": f.size}))
                        .send()?;
                    checked(r, "LFS verify")?;
                }
                eprintln!("  uploaded {} ({} bytes, LFS)", f.path, f.size);
            }
        }

        let mut body =
            serde_json::to_string(&json!({"key": "header", "value": {"summary": summary, "description": ""}}))?;
        for f in &files {
            let line = if lfs(&f.path) {
                json!({"key": "lfsFile", "value": {"path": f.path, "algo": "sha256", "oid": f.sha256, "size": f.size}})
            } else {
                let bytes = std::fs::read(&f.local).with_context(|| format!("read {}", f.local.display()))?;
                let content = b64(&bytes);
                json!({"key": "file", "value": {"path": f.path, "content": content, "encoding": "base64"}})
            };
            body.push('\n');
            body.push_str(&serde_json::to_string(&line)?);
        }
        let r = self
            .request(&client, reqwest::Method::POST, &format!("{base}/api/models/{}/commit/main", self.id))
            .header("Content-Type", "application/x-ndjson")
            .body(body)
            .send()
            .context("the commit")?;
        let commit: Value = checked(r, "commit")?.json().context("commit: the answer is not JSON")?;
        Ok(commit["commitUrl"].as_str().or(commit["commitOid"].as_str()).unwrap_or("committed").to_owned())
    }
}

fn checked(r: reqwest::blocking::Response, what: &str) -> Result<reqwest::blocking::Response> {
    if r.status().is_success() {
        return Ok(r);
    }
    bail!("{what}: the Hub answered {} {}", r.status(), r.text().unwrap_or_default())
}

/// Every file under `dir`, by its path relative to it (`/`-separated), in name order.
fn read_files(dir: &Path) -> Result<Vec<File>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(dir)?.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>();
            let mut file = std::fs::File::open(&path).with_context(|| format!("read {}", path.display()))?;
            let mut hasher = Sha256::new();
            let (mut sample, mut size, mut buf) = (Vec::new(), 0u64, vec![0u8; 1 << 20]);
            loop {
                let n = std::io::Read::read(&mut file, &mut buf).with_context(|| format!("read {}", path.display()))?;
                if n == 0 {
                    break;
                }
                if sample.len() < 512 {
                    sample.extend_from_slice(&buf[..n.min(512 - sample.len())]);
                }
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            out.push(File { path: rel.join("/"), local: path, size, sha256: hex::encode(hasher.finalize()), sample });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}
