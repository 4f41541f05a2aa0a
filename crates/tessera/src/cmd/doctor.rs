//! `tessera doctor`: checks a machine before it joins a run. It gathers facts (the accelerator,
//! its driver and CUDA version, memory, free disk, and with `--hub` the link to the hub and the
//! clock), then judges them against what each phase of the plan needs: which phases this machine
//! can contribute to, and what to fix. The judging is a pure function of the facts, tested
//! without the hardware it describes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use tessera_client::HubClient;
use tessera_model::LlamaConfig;

use crate::args::{gib, load_torch_cuda};
use crate::plan::{DEFAULT_PLAN, PhaseRow, activation_bytes, plan_rows};

/// The libtorch this binary is built against (tch's pin).
const LIBTORCH: &str = "2.11.0";
/// Signed requests more than this far from the hub's clock are refused (tessera-trust's
/// `MAX_SKEW_MS`); doctor warns at a tenth of it.
const SKEW_LIMIT_S: f64 = tessera_trust::identity::MAX_SKEW_MS as f64 / 1000.0;

#[derive(Args)]
pub struct DoctorArgs {
    /// A hub to check the link to (latency, download bandwidth, clock skew) and whether this
    /// machine can hold its run's model at the run's batch and sequence length.
    #[arg(long)]
    pub hub: Option<String>,
    /// The accelerator a contributor would train on: `cpu`, `cuda` or `cuda:N` (default: the
    /// first CUDA device when one is usable, else the CPU).
    #[arg(long)]
    pub device: Option<String>,
    /// Where the contributor keeps its state and data cache (`tessera contribute --state-dir`);
    /// its file system must hold them.
    #[arg(long, default_value = "runs/contributor")]
    pub state_dir: PathBuf,
    /// The data cache the contributor will keep (`tessera contribute --data-cache-gib`).
    #[arg(long, value_name = "GIB", default_value_t = 8.0)]
    pub data_cache_gib: f64,
    /// MiB of the hub's current checkpoint downloaded to measure bandwidth.
    #[arg(long, value_name = "MIB", default_value_t = 16)]
    pub probe_mib: u64,
    /// Print the findings as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The accelerator: what it is and how much memory it has.
#[derive(Debug, Clone, Serialize)]
pub struct Accelerator {
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub name: String,
    /// Memory the model, its optimizer and activations live in (the GPU's, or RAM on the CPU).
    pub memory_bytes: u64,
    /// CUDA only: the driver, the newest CUDA it supports, and libtorch's CUDA runtime.
    pub driver: Option<String>,
    pub driver_cuda: Option<(u32, u32)>,
    pub runtime_cuda: Option<(u32, u32)>,
}

/// What the link to a hub measured.
#[derive(Debug, Clone, Serialize)]
pub struct HubFacts {
    pub url: String,
    /// `Err`: why the hub could not be reached or answered wrongly.
    pub reached: Result<HubRun, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HubRun {
    pub name: String,
    pub phase: u32,
    pub round: u64,
    pub finished: bool,
    /// What a contributor of this run holds wherever it trains (weights, gradients, moments and
    /// activations), beside it on the host, and on disk without the data cache.
    pub model_bytes: u64,
    pub host_need: u64,
    pub disk_need: u64,
    /// Bytes of one round's upload and of the update downloaded.
    pub round_up: u64,
    pub round_down: u64,
    /// Median round trip of a small request, seconds.
    pub latency_s: f64,
    /// Download bandwidth, bytes per second (`None`: nothing to download yet).
    pub download_bps: Option<f64>,
    /// The hub's clock minus ours, seconds (`None`: it sent no Date header).
    pub skew_s: Option<f64>,
}

/// Everything doctor looked at.
#[derive(Debug, Clone, Serialize)]
pub struct Facts {
    pub libtorch: String,
    pub accelerator: Result<Accelerator, String>,
    /// Host memory (RAM), bytes.
    pub host_memory: u64,
    pub cores: usize,
    pub disk_free: Option<u64>,
    pub state_dir: String,
    pub data_cache: u64,
    pub hub: Option<HubFacts>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: &'static str,
    pub level: Level,
    pub detail: String,
    /// What to do about a warning or a failure.
    pub fix: Option<String>,
}

/// A phase this machine was judged against.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseFit {
    pub name: String,
    pub device_need: u64,
    pub host_need: u64,
    pub disk_need: u64,
    pub fits: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub checks: Vec<Check>,
    pub phases: Vec<PhaseFit>,
    /// False when this machine cannot contribute at all (doctor exits non-zero).
    pub can_contribute: bool,
}

/// What a contributor holds on the host besides the accelerator's work: the round's base
/// weights, the trained weights read back, Δ and the error-feedback residual (f32 each), the
/// encoded message (about a byte a parameter in int8) and libtorch itself (1 GiB). A phase-1
/// round on the CPU measured 35.9 B/param against the 33 B/param and 1 GiB this and the
/// optimizer give (`docs/benchmarks.md`).
fn host_bytes(params: u64) -> u64 {
    17 * params + (1 << 30)
}

/// What its state directory holds: the inner trainer (weights and AdamW moments), the base
/// weights and the residual (f32 each), beside the data cache.
fn disk_bytes(params: u64, data_cache: u64) -> u64 {
    20 * params + data_cache
}

/// What a GPU loses to the CUDA context and the allocator's fragmentation before the model.
const GPU_RESERVE: u64 = 1 << 30;

/// Needs of a model whose training holds `model` bytes and `host` bytes beside it: (accelerator,
/// RAM). On the CPU both live in RAM.
fn needs(model: u64, host: u64, on_cpu: bool) -> (u64, u64) {
    if on_cpu { (0, model + host) } else { (model + GPU_RESERVE, host) }
}

/// Whether this machine holds what needs `device`, `host` and `disk` bytes.
fn holds(facts: &Facts, device_memory: u64, (device, host): (u64, u64), disk: u64) -> bool {
    device <= device_memory && host <= facts.host_memory && facts.disk_free.is_none_or(|f| disk <= f)
}

fn check(what: &'static str, level: Level, detail: String, fix: Option<String>) -> Check {
    Check { what, level, detail, fix }
}

/// Judges `facts` against the plan's phases. Pure: every decision doctor makes is here.
pub fn assess(facts: &Facts, rows: &[PhaseRow]) -> Verdict {
    let mut checks = Vec::new();
    checks.push(check("libtorch", Level::Ok, facts.libtorch.clone(), None));
    let (on_cpu, device_memory) = match &facts.accelerator {
        Ok(a) => {
            let cuda = match (a.driver_cuda, a.runtime_cuda) {
                (Some(d), Some(r)) if d < r => {
                    checks.push(check(
                        "driver",
                        Level::Fail,
                        format!(
                            "driver {} supports CUDA up to {}.{}, libtorch needs CUDA {}.{}",
                            a.driver.as_deref().unwrap_or("?"),
                            d.0,
                            d.1,
                            r.0,
                            r.1
                        ),
                        Some(format!("install an NVIDIA driver that supports CUDA {}.{} or newer", r.0, r.1)),
                    ));
                    false
                }
                (d, r) if a.device != "cpu" => {
                    let show = |v: Option<(u32, u32)>| v.map_or("?".into(), |(a, b)| format!("{a}.{b}"));
                    checks.push(check(
                        "driver",
                        Level::Ok,
                        format!(
                            "driver {} (CUDA ≤ {}), libtorch's CUDA runtime {}",
                            a.driver.as_deref().unwrap_or("?"),
                            show(d),
                            show(r)
                        ),
                        None,
                    ));
                    true
                }
                _ => false,
            };
            let level = if a.device == "cpu" { Level::Warn } else { Level::Ok };
            let fix = (a.device == "cpu").then(|| {
                "no usable CUDA GPU: the CPU trains only the smallest models at a useful speed; use the CUDA \
                 bundle on a machine with an NVIDIA GPU"
                    .to_owned()
            });
            checks.push(check(
                "accelerator",
                level,
                format!("{} ({}), {} memory", a.name, a.device, gib(a.memory_bytes)),
                fix,
            ));
            if a.device != "cpu" && !cuda {
                (true, facts.host_memory) // A driver too old: only the CPU is left.
            } else {
                (a.device == "cpu", a.memory_bytes)
            }
        }
        Err(e) => {
            checks.push(check(
                "accelerator",
                Level::Fail,
                e.clone(),
                Some("check the driver (`nvidia-smi`), or run with --device cpu".into()),
            ));
            (true, facts.host_memory)
        }
    };
    checks.push(check("host", Level::Ok, format!("{} cores, {} memory", facts.cores, gib(facts.host_memory)), None));
    let phases: Vec<PhaseFit> = rows
        .iter()
        .map(|r| {
            let need = needs(r.optimizer_bytes + r.activation_bytes, host_bytes(r.params), on_cpu);
            let disk_need = disk_bytes(r.params, facts.data_cache);
            PhaseFit {
                name: r.name.clone(),
                device_need: need.0,
                host_need: need.1,
                disk_need,
                fits: holds(facts, device_memory, need, disk_need),
            }
        })
        .collect();
    match &facts.disk_free {
        Some(free) => {
            let smallest = phases.first().map_or(0, |p| p.disk_need);
            let (level, fix) = if *free < smallest {
                (
                    Level::Fail,
                    Some(format!(
                        "free {} at {}, or point --state-dir elsewhere, or lower --data-cache-gib",
                        gib(smallest - free),
                        facts.state_dir
                    )),
                )
            } else {
                (Level::Ok, None)
            };
            checks.push(check(
                "disk",
                level,
                format!("{} free at {} (the first phase needs {})", gib(*free), facts.state_dir, gib(smallest)),
                fix,
            ));
        }
        None => checks.push(check(
            "disk",
            Level::Warn,
            format!("could not read the free space at {}", facts.state_dir),
            None,
        )),
    }
    let mut hub_ok = true;
    if let Some(h) = &facts.hub {
        hub_ok = judge_hub(h, on_cpu, device_memory, facts, &mut checks);
    }
    let fitting: Vec<&str> = phases.iter().filter(|p| p.fits).map(|p| p.name.as_str()).collect();
    let need = |p: &PhaseFit| {
        if on_cpu {
            format!("{} needs {} of RAM", p.name, gib(p.host_need))
        } else {
            format!("{} needs {} on the accelerator and {} of RAM", p.name, gib(p.device_need), gib(p.host_need))
        }
    };
    checks.push(match fitting.as_slice() {
        // A hub whose run this machine holds is reason enough (a smaller batch, a test run).
        [] if facts.hub.is_some() && hub_ok => check(
            "phases",
            Level::Warn,
            "this machine holds the hub's run, but no phase of the plan at its micro-batch".into(),
            phases.first().map(need),
        ),
        [] => check(
            "phases",
            Level::Fail,
            "this machine holds no phase's model, optimizer and activations".into(),
            phases.first().map(need),
        ),
        some => check("phases", Level::Ok, format!("can contribute to {}", some.join(", ")), None),
    });
    let failed = checks.iter().any(|c| c.level == Level::Fail);
    Verdict { can_contribute: !failed, checks, phases }
}

/// The hub's checks; false when this machine cannot contribute to its run.
fn judge_hub(h: &HubFacts, on_cpu: bool, device_memory: u64, facts: &Facts, checks: &mut Vec<Check>) -> bool {
    let run = match &h.reached {
        Ok(run) => run,
        Err(e) => {
            checks.push(check(
                "hub",
                Level::Fail,
                e.clone(),
                Some("check the URL, your network and firewall, and that the hub is up".into()),
            ));
            return false;
        }
    };
    let state = if run.finished { "finished".to_owned() } else { format!("round {}", run.round) };
    checks.push(check(
        "hub",
        if run.finished { Level::Warn } else { Level::Ok },
        format!("{}: run {} (phase {}, {state})", h.url, run.name, run.phase + 1),
        run.finished.then(|| "this run has finished: there is nothing to train".to_owned()),
    ));
    let latency = run.latency_s * 1e3;
    checks.push(check(
        "latency",
        if latency > 1000.0 { Level::Warn } else { Level::Ok },
        format!("{latency:.0} ms round trip"),
        (latency > 1000.0).then(|| "a slow link: every request waits this long".to_owned()),
    ));
    match run.download_bps {
        Some(bps) => {
            let transfer = (run.round_up + run.round_down) as f64 / bps;
            checks.push(check(
                "bandwidth",
                Level::Ok,
                format!(
                    "{:.1} MB/s down; a round moves {} up and {} down: about {transfer:.0} s at this speed \
                     (uploads are often slower)",
                    bps / 1e6,
                    gib(run.round_up),
                    gib(run.round_down)
                ),
                None,
            ))
        }
        None => checks.push(check("bandwidth", Level::Warn, "nothing to download from the hub yet".into(), None)),
    }
    match run.skew_s {
        Some(s) if s.abs() >= SKEW_LIMIT_S => checks.push(check(
            "clock",
            Level::Fail,
            format!("{s:+.0} s from the hub's clock; the hub refuses requests more than {SKEW_LIMIT_S:.0} s off"),
            Some("synchronise the clock (NTP: `timedatectl set-ntp true`)".into()),
        )),
        Some(s) if s.abs() >= SKEW_LIMIT_S / 10.0 => checks.push(check(
            "clock",
            Level::Warn,
            format!("{s:+.0} s from the hub's clock (refused beyond {SKEW_LIMIT_S:.0} s)"),
            Some("synchronise the clock (NTP: `timedatectl set-ntp true`)".into()),
        )),
        Some(s) => checks.push(check("clock", Level::Ok, format!("{s:+.1} s from the hub's clock"), None)),
        None => checks.push(check("clock", Level::Warn, "the hub sent no Date header".into(), None)),
    }
    let (device, host) = needs(run.model_bytes, run.host_need, on_cpu);
    let disk = run.disk_need + facts.data_cache;
    let fits = holds(facts, device_memory, (device, host), disk);
    checks.push(check(
        "run's model",
        if fits { Level::Ok } else { Level::Fail },
        format!(
            "needs {} on the accelerator, {} of RAM and {} of disk",
            gib(if on_cpu { host } else { device }),
            gib(host),
            gib(disk)
        ),
        (!fits).then(|| "this machine cannot hold the run's model: join a run of an earlier phase".to_owned()),
    ));
    fits
}

pub fn doctor(args: DoctorArgs) -> Result<()> {
    if !args.data_cache_gib.is_finite() || args.data_cache_gib < 0.0 {
        anyhow::bail!("--data-cache-gib must be a size in GiB");
    }
    if args.probe_mib > 4096 {
        anyhow::bail!("--probe-mib is at most 4096 (a bandwidth test, not a download)");
    }
    let rows = plan_rows(DEFAULT_PLAN)?;
    let data_cache = (args.data_cache_gib * (1u64 << 30) as f64) as u64;
    let accelerator = accelerator(args.device.as_deref());
    let hub = args.hub.as_deref().map(|url| HubFacts {
        url: url.to_owned(),
        reached: probe_hub(url, args.probe_mib).map_err(|e| format!("{e:#}")),
    });
    let facts = Facts {
        libtorch: libtorch(),
        accelerator,
        host_memory: meminfo_total().unwrap_or(0),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        disk_free: disk_free(&args.state_dir),
        state_dir: args.state_dir.display().to_string(),
        data_cache,
        hub,
    };
    let verdict = assess(&facts, &rows);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "facts": facts, "verdict": verdict }))?);
    } else {
        print(&verdict);
    }
    if !verdict.can_contribute {
        anyhow::bail!("this machine cannot contribute yet: fix what FAIL says above");
    }
    Ok(())
}

fn print(v: &Verdict) {
    println!("tessera doctor: is this machine ready to contribute?");
    for c in &v.checks {
        let mark = match c.level {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        println!("  {mark} {:<12} {}", c.what, c.detail);
        if let Some(fix) = &c.fix {
            println!("       {:<12} → {fix}", "");
        }
    }
    println!("\n  {:<20} {:>12} {:>10} {:>10}  fits?", "phase", "accelerator", "RAM", "disk");
    for p in &v.phases {
        println!(
            "  {:<20} {:>12} {:>10} {:>10}  {}",
            p.name.chars().take(20).collect::<String>(),
            if p.device_need == 0 { "–".into() } else { gib(p.device_need) },
            gib(p.host_need),
            gib(p.disk_need),
            if p.fits { "yes" } else { "no" }
        );
    }
    println!(
        "\n{}",
        if v.can_contribute {
            "ready: `tessera contribute --hub URL` joins a run (see docs/contributing.md)"
        } else {
            "not ready"
        }
    );
}

fn libtorch() -> String {
    let mut s = format!("libtorch {LIBTORCH}");
    if tch::utils::has_mkldnn() {
        s.push_str(", oneDNN");
    }
    if tch::utils::has_openmp() {
        s.push_str(", OpenMP");
    }
    s
}

/// The accelerator `device` names (default: the first usable CUDA device, else the CPU).
fn accelerator(device: Option<&str>) -> Result<Accelerator, String> {
    let cpu = || Accelerator {
        device: "cpu".into(),
        name: cpu_name().unwrap_or_else(|| "CPU".into()),
        memory_bytes: meminfo_total().unwrap_or(0),
        driver: None,
        driver_cuda: None,
        runtime_cuda: None,
    };
    let index = match device {
        Some("cpu") => return Ok(cpu()),
        None | Some("cuda") => 0,
        Some(other) => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => i,
            _ => return Err(format!("unknown device {other:?}: use cpu, cuda or cuda:N")),
        },
    };
    let smi = nvidia_smi();
    let loaded = load_torch_cuda();
    let count = if loaded.is_ok() { tch::Cuda::device_count() } else { 0 };
    if (index as i64) >= count || !tch::Cuda::is_available() {
        if device.is_none() {
            return Ok(cpu());
        }
        let why = match (&loaded, &smi) {
            (Err(e), _) => format!("{e:#}"),
            (Ok(()), None) => "no NVIDIA driver (`nvidia-smi` is missing or fails)".into(),
            (Ok(()), Some(_)) => format!("CUDA device {index} requested but libtorch sees {count}"),
        };
        return Err(why);
    }
    let runtime = tch::utils::version_cudart();
    let (name, memory_bytes, driver, driver_cuda) = match &smi {
        Some(s) => {
            let gpu = s.gpus.get(index).cloned().unwrap_or_default();
            (gpu.0, gpu.1, Some(s.driver.clone()), s.cuda)
        }
        None => (format!("CUDA device {index}"), 0, None, None),
    };
    Ok(Accelerator {
        device: format!("cuda:{index}"),
        name,
        memory_bytes,
        driver,
        driver_cuda,
        runtime_cuda: (runtime > 0).then_some(((runtime / 1000) as u32, ((runtime % 1000) / 10) as u32)),
    })
}

/// What `nvidia-smi` says: the driver, the newest CUDA it supports, and each GPU's name and
/// memory.
struct Smi {
    driver: String,
    cuda: Option<(u32, u32)>,
    gpus: Vec<(String, u64)>,
}

fn nvidia_smi() -> Option<Smi> {
    let (driver, gpus) = gpus()?;
    let banner = std::process::Command::new("nvidia-smi").output().ok()?;
    Some(Smi { driver, cuda: parse_cuda_banner(&String::from_utf8_lossy(&banner.stdout)), gpus })
}

/// The driver version and each GPU's name and memory (bytes), from `nvidia-smi`; `None` where
/// it is missing or fails.
pub fn gpus() -> Option<(String, Vec<(String, u64)>)> {
    let query = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8(query.stdout).ok()?;
    let mut driver = String::new();
    let mut gpus = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if let [name, mib, d] = f.as_slice() {
            gpus.push(((*name).to_owned(), mib.parse::<u64>().unwrap_or(0) << 20));
            driver = (*d).to_owned();
        }
    }
    Some((driver, gpus))
}

/// The "CUDA Version: 13.0" of `nvidia-smi`'s banner.
fn parse_cuda_banner(text: &str) -> Option<(u32, u32)> {
    let rest = &text[text.find("CUDA Version:")? + "CUDA Version:".len()..];
    let v = rest.split_whitespace().next()?;
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn cpu_name() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_owned())
}

fn meminfo_total() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line["MemTotal:".len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib << 10)
}

/// Free bytes on the file system that holds `dir` (or its nearest existing ancestor).
fn disk_free(dir: &Path) -> Option<u64> {
    let mut at = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    while !at.exists() {
        at = at.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    }
    let path = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stat` is writable memory of the right size.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Reaches the hub: its run (signature checked), the round trip of small requests, the skew of
/// its clock, and the download bandwidth of up to `probe_mib` MiB of its checkpoint.
fn probe_hub(url: &str, probe_mib: u64) -> Result<HubRun> {
    let client = HubClient::with_timeout(url, Duration::from_secs(30))?.with_patience(Duration::ZERO);
    let info = client.run()?;
    let mut rtts = Vec::new();
    let mut skew_s = None;
    for _ in 0..5 {
        let sent = SystemTime::now();
        let began = Instant::now();
        let r = client.get("/healthz").send()?;
        let rtt = began.elapsed();
        rtts.push(rtt.as_secs_f64());
        if let Some(date) = r.headers().get(reqwest::header::DATE).and_then(|d| d.to_str().ok())
            && let Ok(theirs) = httpdate::parse_http_date(date)
        {
            // Their second is stamped mid-flight; the Date header has whole seconds.
            let ours = sent + rtt / 2;
            skew_s = Some(match theirs.duration_since(ours) {
                Ok(ahead) => ahead.as_secs_f64(),
                Err(behind) => -behind.duration().as_secs_f64(),
            });
        }
    }
    rtts.sort_by(f64::total_cmp);
    let latency_s = rtts[rtts.len() / 2];
    let download_bps = if probe_mib == 0 {
        None
    } else {
        let began = Instant::now();
        let (_, body) = client.checkpoint_range(&info.checkpoint, &format!("bytes=0-{}", (probe_mib << 20) - 1))?;
        let took = began.elapsed().as_secs_f64() - latency_s / 2.0;
        (!body.is_empty()).then(|| body.len() as f64 / took.max(1e-6))
    };
    let spec = &info.spec;
    let config = LlamaConfig::from_json(spec.model.clone()).map_err(|e| anyhow::anyhow!("the run's model: {e}"))?;
    let params = config.num_params();
    let optimizer = tessera_model::TrainingMemory::f32(&config).total();
    let activations = activation_bytes(&config, spec.inner.seq_len as i64, spec.inner.batch_size as i64);
    let round_up = spec.tensors.iter().map(|t| spec.codec.encoded_len(t.numel())).sum();
    let round_down = spec.tensors.iter().map(|t| spec.broadcast_codec.encoded_len(t.numel())).sum();
    Ok(HubRun {
        name: spec.name.clone(),
        phase: info.phase,
        round: info.round,
        finished: info.finished,
        model_bytes: optimizer + activations,
        host_need: host_bytes(params),
        disk_need: disk_bytes(params, 0),
        round_up,
        round_down,
        latency_s,
        download_bps,
        skew_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn facts(accelerator: Result<Accelerator, String>, host: u64, disk: u64) -> Facts {
        Facts {
            libtorch: "libtorch 2.11.0".into(),
            accelerator,
            host_memory: host,
            cores: 8,
            disk_free: Some(disk),
            state_dir: "runs/contributor".into(),
            data_cache: 8 * GIB,
            hub: None,
        }
    }

    fn gpu(memory: u64, driver_cuda: (u32, u32)) -> Result<Accelerator, String> {
        Ok(Accelerator {
            device: "cuda:0".into(),
            name: "NVIDIA GeForce RTX 4090".into(),
            memory_bytes: memory,
            driver: Some("580.65".into()),
            driver_cuda: Some(driver_cuda),
            runtime_cuda: Some((13, 0)),
        })
    }

    fn hub(run: Result<HubRun, String>) -> Option<HubFacts> {
        Some(HubFacts { url: "http://hub".into(), reached: run })
    }

    fn run(skew: f64, model_bytes: u64) -> HubRun {
        HubRun {
            name: "phase1".into(),
            phase: 0,
            round: 3,
            finished: false,
            model_bytes,
            host_need: 8 * GIB,
            disk_need: 10 * GIB,
            round_up: 500 << 20,
            round_down: 500 << 20,
            latency_s: 0.05,
            download_bps: Some(50e6),
            skew_s: Some(skew),
        }
    }

    fn names(v: &Verdict) -> Vec<&str> {
        v.phases.iter().filter(|p| p.fits).map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn a_24_gib_gpu_holds_phase_one_and_no_more() {
        let rows = plan_rows(DEFAULT_PLAN).unwrap();
        let v = assess(&facts(gpu(24 * GIB, (13, 0)), 64 * GIB, 500 * GIB), &rows);
        assert!(v.can_contribute, "{v:#?}");
        assert_eq!(names(&v), ["phase 1: prototype"]);
        let v = assess(&facts(gpu(141 * GIB, (13, 0)), 64 * GIB, 500 * GIB), &rows);
        assert_eq!(names(&v), ["phase 1: prototype", "phase 2"], "an H200 beside 64 GiB of RAM: {v:#?}");
    }

    #[test]
    fn what_cannot_work_fails_with_a_fix() {
        let rows = plan_rows(DEFAULT_PLAN).unwrap();
        let failing = |f: &Facts, what: &str| {
            let v = assess(f, &rows);
            assert!(!v.can_contribute, "{what}: {v:#?}");
            let c = v.checks.iter().find(|c| c.what == what).unwrap();
            assert_eq!(c.level, Level::Fail, "{what}: {c:?}");
            assert!(c.fix.is_some(), "{what}: a failure says what to do");
        };
        // A driver older than libtorch's CUDA: the GPU is unusable and RAM alone holds nothing.
        failing(&facts(gpu(24 * GIB, (12, 4)), 8 * GIB, 500 * GIB), "driver");
        failing(&facts(gpu(8 * GIB, (13, 0)), 64 * GIB, 500 * GIB), "phases");
        failing(&facts(gpu(24 * GIB, (13, 0)), 64 * GIB, GIB), "disk");
        failing(&facts(Err("no NVIDIA driver".into()), 8 * GIB, 500 * GIB), "accelerator");
        let mut f = facts(gpu(24 * GIB, (13, 0)), 64 * GIB, 500 * GIB);
        f.hub = hub(Err("connection refused".into()));
        failing(&f, "hub");
        f.hub = hub(Ok(run(400.0, 10 * GIB)));
        failing(&f, "clock");
        f.hub = hub(Ok(run(0.2, 40 * GIB)));
        failing(&f, "run's model");
        f.hub = hub(Ok(run(-45.0, 10 * GIB)));
        let v = assess(&f, &rows);
        assert!(v.can_contribute, "a skew within the limit only warns: {v:#?}");
        assert_eq!(v.checks.iter().find(|c| c.what == "clock").unwrap().level, Level::Warn);
    }

    #[test]
    fn a_hub_run_this_machine_holds_is_enough() {
        let rows = plan_rows(DEFAULT_PLAN).unwrap();
        let mut f = facts(gpu(8 * GIB, (13, 0)), 64 * GIB, 500 * GIB);
        f.hub = hub(Ok(run(0.0, 4 * GIB)));
        let v = assess(&f, &rows);
        assert!(v.can_contribute, "{v:#?}");
        assert!(names(&v).is_empty());
        assert_eq!(v.checks.iter().find(|c| c.what == "phases").unwrap().level, Level::Warn);
    }

    #[test]
    fn a_cpu_holds_everything_in_ram() {
        let rows = plan_rows(DEFAULT_PLAN).unwrap();
        let cpu = Ok(Accelerator {
            device: "cpu".into(),
            name: "CPU".into(),
            memory_bytes: 64 * GIB,
            driver: None,
            driver_cuda: None,
            runtime_cuda: None,
        });
        let v = assess(&facts(cpu.clone(), 64 * GIB, 500 * GIB), &rows);
        assert!(v.can_contribute, "{v:#?}");
        assert_eq!(v.phases[0].device_need, 0);
        let host = rows[0].optimizer_bytes + rows[0].activation_bytes + 17 * rows[0].params + GIB;
        assert_eq!(v.phases[0].host_need, host);
        assert_eq!(v.checks.iter().find(|c| c.what == "accelerator").unwrap().level, Level::Warn);
        let v = assess(&facts(cpu, 16 * GIB, 500 * GIB), &rows);
        assert!(!v.can_contribute, "16 GiB of RAM holds no phase: {v:#?}");
    }

    #[test]
    fn the_cuda_version_is_read_from_the_banner() {
        let banner = "| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: 13.0     |";
        assert_eq!(parse_cuda_banner(banner), Some((13, 0)));
        assert_eq!(parse_cuda_banner("no driver"), None);
        assert_eq!(parse_cuda_banner("CUDA Version: x.y"), None);
    }
}
