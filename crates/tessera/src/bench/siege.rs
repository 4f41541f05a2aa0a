//! `tessera bench siege`: the attacks of an outside review, replayed against a real `tessera
//! hub` process on loopback, with the hub's resident memory sampled throughout (from
//! /proc/PID/status) against its memory at rest measured in the same run:
//!
//! 1. bodies just under the submission limit on many connections, unauthenticated;
//! 2. the same from registered keys, validly signed (read within the body budget);
//! 3. thousands of connections that never finish their request head;
//! 4. a flood of requests from one address;
//!
//! while a second loopback address (127.0.0.2) probes `/healthz`: the hub must keep answering
//! it and its memory must stay bounded.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Args)]
pub struct BenchSiegeArgs {
    /// Connections of each body attack.
    #[arg(long, default_value_t = 300)]
    pub connections: usize,
    /// Registered keys posting signed bodies at once.
    #[arg(long, default_value_t = 64)]
    pub keys: usize,
    /// Connections that never finish their request head.
    #[arg(long, default_value_t = 3000)]
    pub slow_heads: usize,
    /// Seconds of the request flood.
    #[arg(long, default_value_t = 5)]
    pub flood_seconds: u64,
    /// The hub's model preset (its submission limit is 4 bytes a parameter).
    #[arg(long, default_value = "nano")]
    pub model: String,
    /// The hub's budget of request bodies held at once, in MiB (`tessera hub --body-memory`).
    #[arg(long, default_value_t = 64)]
    pub body_memory: u64,
    /// Besiege this `tessera` binary's hub instead of this one's (e.g. an older release, for
    /// a before-and-after): it is started with the flags every release knows, and the
    /// signed-body attack is skipped (its signature scheme may differ).
    #[arg(long, value_name = "PATH")]
    pub hub_bin: Option<std::path::PathBuf>,
}

/// The hub under siege, and its memory as sampled.
struct Target {
    child: Child,
    url: String,
    addr: std::net::SocketAddr,
    /// Largest VmRSS seen since the last reset, in KiB.
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Target {
    fn start(dir: &Path, args: &BenchSiegeArgs) -> Result<Target> {
        let addr_file = dir.join("addr");
        let db = format!("sqlite://{}/hub.db", dir.display());
        let mut command = match &args.hub_bin {
            Some(bin) => Command::new(bin),
            None => Command::new(std::env::current_exe()?),
        };
        command
            .args(["hub", "--database", &db, "--store"])
            .arg(dir.join("store"))
            .arg("--key")
            .arg(dir.join("hub-key.pem"))
            .args(["--model", &args.model, "--rounds", "1000", "--listen", "127.0.0.1:0", "--addr-file"])
            .arg(&addr_file);
        if args.hub_bin.is_none() {
            command.args(["--body-memory", &args.body_memory.to_string()]);
        }
        let child = command
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting `tessera hub`")?;
        let started = Instant::now();
        while !addr_file.exists() {
            if started.elapsed() > Duration::from_secs(120) {
                bail!("the hub did not start within 120 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let addr: std::net::SocketAddr = std::fs::read_to_string(&addr_file)?.trim().parse()?;
        let (peak, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let pid = child.id();
        {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(kib) = rss_kib(pid) {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        Ok(Target { child, url: format!("http://{addr}"), addr, peak, stop })
    }

    fn rss_mib(&self) -> f64 {
        rss_kib(self.child.id()).unwrap_or(0) as f64 / 1024.0
    }

    fn reset_peak(&self) {
        self.peak.store(rss_kib(self.child.id()).unwrap_or(0), Ordering::Relaxed);
    }

    fn peak_mib(&self) -> f64 {
        self.peak.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `/healthz` from 127.0.0.2 every 100 ms until `stop`: (answered, failed, slowest ms).
async fn probe(addr: std::net::SocketAddr, stop: Arc<AtomicBool>) -> (u64, u64, f64) {
    let (mut ok, mut failed, mut slowest) = (0, 0, 0f64);
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let answered = tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = connect_from("127.0.0.2", addr).await.ok()?;
            status(&mut s, b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await
        })
        .await;
        match answered {
            Ok(Some(200)) => ok += 1,
            _ => failed += 1,
        }
        slowest = slowest.max(t.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (ok, failed, slowest)
}

async fn connect_from(source: &str, to: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().map_err(std::io::Error::other)?)?;
    socket.connect(to).await
}

/// Sends `request`, reads the status of the answer (None: closed or unreadable first).
async fn status(s: &mut TcpStream, request: &[u8]) -> Option<u16> {
    s.write_all(request).await.ok()?;
    read_status(s).await
}

async fn read_status(s: &mut TcpStream) -> Option<u16> {
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.split(' ').nth(1)?.parse().ok()
}

/// Sends a head declaring `length` bytes, then the body in 64 KiB pieces until all but its last
/// piece is sent or the hub stops reading; waits `hold` (so every connection's body is in
/// flight at once, as a patient attacker's would be), then sends the rest. Returns (status,
/// body bytes sent).
async fn post_body(addr: std::net::SocketAddr, head: String, length: usize, hold: Duration) -> (Option<u16>, usize) {
    let Ok(mut s) = TcpStream::connect(addr).await else { return (None, 0) };
    if s.write_all(head.as_bytes()).await.is_err() {
        return (None, 0);
    }
    let chunk = vec![0x5au8; 64 << 10];
    let mut sent = 0;
    let (mut reader, mut writer) = s.split();
    let send = async {
        let last = length.saturating_sub(chunk.len());
        let mut held = false;
        while sent < length {
            if sent >= last && !held {
                held = true;
                tokio::time::sleep(hold).await;
            }
            let n = chunk.len().min(length - sent).min(if sent < last { last - sent } else { usize::MAX });
            if writer.write_all(&chunk[..n]).await.is_err() {
                break;
            }
            sent += n;
        }
    };
    let mut buf = [0u8; 512];
    let answer = async {
        let n = reader.read(&mut buf).await.ok()?;
        std::str::from_utf8(&buf[..n]).ok()?.split(' ').nth(1)?.parse::<u16>().ok()
    };
    // The answer may come before the body is sent (the hub refuses on the head alone).
    let (status, ()) = tokio::join!(answer, send);
    (status, sent)
}

fn tally(statuses: &[Option<u16>]) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for s in statuses {
        *counts.entry(s.map_or("none".to_owned(), |c| c.to_string())).or_insert(0) += 1;
    }
    counts.iter().map(|(k, v)| format!("{v}×{k}")).collect::<Vec<_>>().join(" ")
}

struct Row {
    attack: String,
    outcome: String,
    peak: f64,
    after: f64,
    probes: (u64, u64, f64),
}

pub fn bench_siege(args: BenchSiegeArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let target = Target::start(dir.path(), &args)?;
    let hub = tessera_client::HubClient::new(&target.url)?.with_patience(Duration::ZERO);
    // Read as JSON, not through the client: another release may speak another protocol.
    let run: tessera_protocol::api::RunInfo = reqwest::blocking::get(format!("{}/v1/run", target.url))?.json()?;
    let limit = 4 * run.spec.max_params() as usize;
    let signed = args.hub_bin.is_none();
    // Registered keys, before any attack.
    let mut keys = Vec::new();
    for i in 0..if signed { args.keys } else { 0 } {
        let key = Arc::new(tessera_trust::Identity::generate()?);
        let client = hub.clone().signed_by(key);
        client.register(&format!("siege-{i}"))?;
        keys.push(client);
    }
    std::thread::sleep(Duration::from_secs(1));
    let rest = target.rss_mib();
    let budget = if signed { format!("body budget {} MiB", args.body_memory) } else { "no body budget".into() };
    println!(
        "tessera hub {}({} preset, {} parameters, submission limit {:.1} MiB, {budget}), at rest {rest:.0} MiB",
        args.hub_bin.as_ref().map_or(String::new(), |b| format!("{} ", b.display())),
        args.model,
        run.spec.max_params(),
        limit as f64 / (1 << 20) as f64,
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let addr = target.addr;
    let mut rows = Vec::new();
    let mut phase = |name: String, attack: &mut dyn FnMut() -> Result<String>| -> Result<()> {
        target.reset_peak();
        let stop = Arc::new(AtomicBool::new(false));
        let prober = rt.spawn(probe(addr, stop.clone()));
        let outcome = attack()?;
        stop.store(true, Ordering::Relaxed);
        let probes = rt.block_on(prober)?;
        let peak = target.peak_mib();
        std::thread::sleep(Duration::from_secs(3));
        rows.push(Row { attack: name, outcome, peak, after: target.rss_mib(), probes });
        Ok(())
    };

    // 1. Unauthenticated bodies just under the limit.
    phase(format!("{} unsigned bodies of {:.1} MiB", args.connections, limit as f64 / (1 << 20) as f64), &mut || {
        let t = Instant::now();
        let results: Vec<(Option<u16>, usize)> = rt.block_on(async {
            let tasks: Vec<_> = (0..args.connections)
                .map(|_| {
                    let head = format!("POST /v1/submissions HTTP/1.1\r\nhost: x\r\ncontent-length: {limit}\r\n\r\n");
                    tokio::spawn(post_body(addr, head, limit, Duration::from_secs(3)))
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap_or((None, 0)));
            }
            out
        });
        let sent: usize = results.iter().map(|r| r.1).sum();
        let statuses: Vec<_> = results.iter().map(|r| r.0).collect();
        Ok(format!(
            "{} in {:.1} s; {:.0} MiB of {:.0} MiB sent before the hub stopped reading",
            tally(&statuses),
            t.elapsed().as_secs_f64(),
            sent as f64 / (1 << 20) as f64,
            (limit * args.connections) as f64 / (1 << 20) as f64
        ))
    })?;

    // 2. Registered keys, validly signed bodies (not a pseudo-gradient: refused once read).
    if signed {
        phase(
            format!("{} signed bodies of {:.1} MiB, one per key", args.keys, limit as f64 / (1 << 20) as f64),
            &mut || {
                let body = Arc::new(vec![0x5au8; limit - 1]);
                let t = Instant::now();
                let mut requests = Vec::new();
                for k in &keys {
                    let headers = k.signature("POST", "/v1/submissions", &body, tessera_hub::hub::now_ms())?;
                    requests.push(headers);
                }
                let http = reqwest::Client::new();
                let statuses: Vec<Option<u16>> = rt.block_on(async {
                    let tasks: Vec<_> = requests
                        .into_iter()
                        .map(|headers| {
                            let (http, body, url) = (http.clone(), body.clone(), target.url.clone());
                            tokio::spawn(async move {
                                let mut r = http.post(format!("{url}/v1/submissions"));
                                for (k, v) in headers {
                                    r = r.header(k, v);
                                }
                                r.body(body.to_vec()).send().await.ok().map(|r| r.status().as_u16())
                            })
                        })
                        .collect();
                    let mut out = Vec::new();
                    for t in tasks {
                        out.push(t.await.unwrap_or(None));
                    }
                    out
                });
                Ok(format!("{} in {:.1} s", tally(&statuses), t.elapsed().as_secs_f64()))
            },
        )?;
    }

    // 3. Heads that never end.
    phase(format!("{} connections that never finish their head", args.slow_heads), &mut || {
        rt.block_on(async {
            let mut held = Vec::new();
            for _ in 0..args.slow_heads {
                if let Ok(mut s) = TcpStream::connect(addr).await {
                    let _ = s.write_all(b"POST /v1/submissions HTTP/1.1\r\nhost: x\r\n").await;
                    held.push(s);
                }
            }
            let opened = held.len();
            let open_after = |held: &mut Vec<TcpStream>| {
                let mut open = 0;
                for s in held.iter_mut() {
                    let mut b = [0u8; 1];
                    match s.try_read(&mut b) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
                        _ => {}
                    }
                }
                open
            };
            tokio::time::sleep(Duration::from_secs(1)).await;
            let at_1s = open_after(&mut held);
            tokio::time::sleep(Duration::from_secs(11)).await;
            let at_12s = open_after(&mut held);
            Ok(format!("{opened} opened; still open after 1 s: {at_1s}, after 12 s: {at_12s}"))
        })
    })?;

    // 4. A flood of requests from one address over keep-alive connections.
    phase(format!("{} s flood of GET /v1/status from one address", args.flood_seconds), &mut || {
        let until = Instant::now() + Duration::from_secs(args.flood_seconds);
        let counts: Vec<(u64, u64, u64)> = rt.block_on(async {
            let tasks: Vec<_> = (0..32)
                .map(|_| {
                    tokio::spawn(async move {
                        let (mut ok, mut limited, mut other) = (0, 0, 0);
                        let Ok(mut s) = TcpStream::connect(addr).await else { return (0, 0, 1) };
                        while Instant::now() < until {
                            let request = b"GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\n";
                            if s.write_all(request).await.is_err() {
                                other += 1;
                                break;
                            }
                            // Read one whole answer (headers and a content-length body).
                            let mut buf = Vec::new();
                            let mut chunk = [0u8; 16 << 10];
                            let code = loop {
                                let Ok(n) = s.read(&mut chunk).await else { break None };
                                if n == 0 {
                                    break None;
                                }
                                buf.extend_from_slice(&chunk[..n]);
                                let text = String::from_utf8_lossy(&buf);
                                if let Some(end) = text.find("\r\n\r\n") {
                                    let len = text[..end]
                                        .lines()
                                        .find_map(|l| {
                                            l.to_ascii_lowercase()
                                                .strip_prefix("content-length:")
                                                .map(|v| v.trim().to_owned())
                                        })
                                        .and_then(|v| v.parse::<usize>().ok())
                                        .unwrap_or(0);
                                    if buf.len() >= end + 4 + len {
                                        break text.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok());
                                    }
                                }
                            };
                            match code {
                                Some(200) => ok += 1,
                                Some(429) => limited += 1,
                                _ => {
                                    other += 1;
                                    break;
                                }
                            }
                        }
                        (ok, limited, other)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap_or((0, 0, 1)));
            }
            out
        });
        let (ok, limited, other) = counts.iter().fold((0, 0, 0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
        let secs = args.flood_seconds as f64;
        Ok(format!(
            "{:.0} requests/s answered: {ok}×200 {limited}×429, {other} connections ended",
            (ok + limited) as f64 / secs
        ))
    })?;

    println!();
    println!("{:<46} {:>10} {:>10} {:>11}  outcome", "attack", "peak MiB", "after MiB", "healthz");
    for r in &rows {
        let (ok, failed, slowest) = r.probes;
        println!(
            "{:<46} {:>10.0} {:>10.0} {:>5}/{:<5}  {} (healthz slowest {slowest:.0} ms)",
            r.attack,
            r.peak,
            r.after,
            ok,
            ok + failed,
            r.outcome
        );
    }
    let worst = rows.iter().map(|r| r.peak).fold(rest, f64::max);
    println!("\npeak / at rest: {:.2}× ({worst:.0} MiB / {rest:.0} MiB)", worst / rest);
    Ok(())
}
