//! `tessera bench arena`: a scored run under attack. A real hub (SQLite and a blob store in a
//! temporary directory, the same code `tessera hub` serves) takes submissions from N in-process
//! contributors, some of them adversaries; an in-process validator scores every round through
//! the hub's scoring job, exactly as `tessera validate` would over HTTP. Each scenario reports
//! the final validation loss, what was rejected and why, the attackers' share of rewards, and
//! whether every honest contributor ranks above every attacker.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use tch::Device;
use tessera_contest::Adversary;
use tessera_contributor::adversary::poison;
use tessera_data::Dataset;
use tessera_hub::{Db, Hub, HubConfig, NewRun, Store};
use tessera_model::{Llama, LlamaConfig};
use tessera_protocol::api::{ContestSpec, InnerSpec, OuterSpec};
use tessera_protocol::{Aggregation, Codec, ErrorFeedback, PseudoGradient, RunSpec, TensorEntry, decode_weights};
use tessera_train::diloco::{read_params, train_workers, write_params};
use tessera_train::run::inner_config;
use tessera_train::{TrainConfig, Trainer};
use tessera_validator::{Candidate, ScoreConfig, Scorer};

use crate::args::{DataArgs, RuntimeArgs, load_dataset, setup_runtime};

#[derive(Args)]
pub struct ArenaArgs {
    /// A preset name or a config.json.
    #[arg(long, default_value = "nano")]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    /// Contributors in every scenario, attackers included.
    #[arg(long, default_value_t = 20)]
    contributors: usize,
    /// How many of the contributors attack (the last ones to register).
    #[arg(long, default_value_t = 5)]
    attackers: usize,
    /// Scenarios, comma-separated: `honest-plain` (plain mean, unscored, no attackers: the
    /// reference), `honest` (scored, robust rule), an adversary kind (scored, robust rule),
    /// `KIND-mean` (plain mean, unscored, under that attack), `mixed` (each attacker a different
    /// kind, rotating every round), or `all`.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    scenarios: Vec<String>,
    /// H: inner AdamW steps per round.
    #[arg(long, default_value_t = 20)]
    inner_steps: u64,
    #[arg(long, default_value_t = 15)]
    rounds: u64,
    /// Sequences per contributor per inner step.
    #[arg(long, default_value_t = 8)]
    batch_size: u32,
    /// Inner peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.7)]
    outer_lr: f32,
    #[arg(long, default_value_t = 0.9)]
    outer_momentum: f32,
    /// Codec of pseudo-gradients and of the published updates.
    #[arg(long, default_value = "int8:64")]
    codec: Codec,
    /// The robust rule of the scored scenarios.
    #[arg(long, default_value_t = Aggregation::DEFAULT)]
    aggregation: Aggregation,
    /// Held-out windows per score, and assigned windows per contributor in the data-fit check.
    #[arg(long, default_value_t = 32)]
    eval_windows: u32,
    #[arg(long, default_value_t = 16)]
    fit_windows: u32,
    /// The step submissions are scored at (the run's `score_step`, in (0, 1]): small scores
    /// what each adds to the round's mean, 1 what it does alone.
    #[arg(long, default_value_t = tessera_protocol::api::DEFAULT_SCORE_STEP)]
    score_step: f64,
    /// Validation windows for the reported loss.
    #[arg(long, default_value_t = 200)]
    val_windows: usize,
    /// Append one JSON line per scenario here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

struct Scenario {
    name: String,
    /// The attack of each attacker in round r: `kinds(r, j)`.
    kind: Option<Adversary>,
    mixed: bool,
    aggregation: Aggregation,
    scored: bool,
}

impl Scenario {
    fn attack(&self, round: u64, j: usize) -> Option<Adversary> {
        if self.mixed {
            let all = Adversary::ALL;
            return Some(all[(j + 5 * round as usize) % all.len()]);
        }
        self.kind
    }
}

#[derive(Debug, serde::Serialize)]
struct Outcome {
    scenario: String,
    aggregation: String,
    scored: bool,
    attackers: usize,
    final_val_loss: f64,
    diverged: bool,
    /// Submissions the attackers sent, and how many of them were rejected, by reason.
    attacker_submissions: u64,
    rejected: BTreeMap<String, u64>,
    honest_rejected: u64,
    attacker_reward_fraction: f64,
    /// Each attack kind's share of all the run's rewards (the kind an attacker used in the
    /// round a reward was paid for; `mixed` rotates kinds every round).
    reward_fraction_by_kind: BTreeMap<String, f64>,
    /// Mean data fit (gain on assigned minus random windows) of honest and attacking
    /// submissions that were scored.
    honest_data_fit: Option<f64>,
    attacker_data_fit: Option<f64>,
    /// Mean score of honest and attacking scored submissions.
    honest_score: Option<f64>,
    attacker_score: Option<f64>,
    honest_above_attackers: bool,
    /// Scored submissions, honest and attacking, and what each side was flagged for (`copy`,
    /// `wrong_data`, `not_positive`, …): an honest flag is a false alarm.
    honest_scored: u64,
    honest_flags: BTreeMap<String, u64>,
    attacker_scored: u64,
    attacker_flags: BTreeMap<String, u64>,
    /// Best attacker rank and worst honest rank on the leaderboard (1 = top).
    best_attacker_rank: Option<u64>,
    worst_honest_rank: u64,
    /// Validator cost: seconds scoring per submission over seconds one contributor trains per
    /// round, and the same in forward-pass windows against training windows (×3 for backward).
    validator_time_fraction: Option<f64>,
    validator_flop_fraction: Option<f64>,
    seconds: f64,
}

fn scenarios(args: &ArenaArgs) -> Result<Vec<Scenario>> {
    let robust = |name: String, kind: Option<Adversary>| Scenario {
        name,
        kind,
        mixed: false,
        aggregation: args.aggregation,
        scored: true,
    };
    let mean = |name: String, kind: Option<Adversary>| Scenario {
        name,
        kind,
        mixed: false,
        aggregation: Aggregation::Mean,
        scored: false,
    };
    let mut names: Vec<String> = args.scenarios.clone();
    if names.iter().any(|n| n == "all") {
        names = ["honest-plain", "honest"].iter().map(|s| s.to_string()).collect();
        names.extend(Adversary::ALL.iter().map(|a| a.name().to_owned()));
        names.extend(["scale-mean", "noise-mean", "mixed"].iter().map(|s| s.to_string()));
    }
    names
        .into_iter()
        .map(|n| {
            Ok(match n.as_str() {
                "honest-plain" => mean(n.clone(), None),
                "honest" => robust(n.clone(), None),
                "mixed" => Scenario { mixed: true, ..robust(n.clone(), None) },
                other => match other.strip_suffix("-mean") {
                    Some(k) => mean(n.clone(), Some(k.parse().map_err(anyhow::Error::msg)?)),
                    None => robust(n.clone(), Some(other.parse().map_err(anyhow::Error::msg)?)),
                },
            })
        })
        .collect()
}

pub fn bench_arena(args: ArenaArgs) -> Result<()> {
    if args.contributors < 2 || args.attackers >= args.contributors || args.rounds == 0 || args.inner_steps == 0 {
        bail!("need at least 2 contributors, fewer attackers than contributors, and positive rounds and inner steps");
    }
    let device = setup_runtime(&args.runtime)?;
    let dataset = load_dataset(&args.data)?;
    let mut model_config = LlamaConfig::from_preset_or_path(&args.model)?;
    model_config.vocab_size = dataset.tokenizer.vocab_size() as i64;
    let list = scenarios(&args)?;
    println!(
        "arena: {} contributors ({} attackers), {} × {} inner steps, batch {}, codec {}, robust rule {}, {} on {}",
        args.contributors,
        args.attackers,
        args.rounds,
        args.inner_steps,
        args.batch_size,
        args.codec,
        args.aggregation,
        args.model,
        dataset.info.name
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut reference: Option<f64> = None;
    println!(
        "{:<14} {:<26} {:>9} {:>8} {:>9} {:>22} {:>10} {:>8}",
        "scenario", "aggregation", "val loss", "vs ref", "atk subs", "rejected", "atk reward", "ranking"
    );
    for sc in &list {
        let out = run_scenario(&args, sc, &dataset, &model_config, device, &runtime)
            .with_context(|| format!("scenario {}", sc.name))?;
        if sc.name == "honest-plain" {
            reference = Some(out.final_val_loss);
        }
        let rejected: Vec<String> = out.rejected.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        println!(
            "{:<14} {:<26} {:>9.4} {:>8} {:>9} {:>22} {:>10} {:>8}",
            out.scenario,
            format!("{}{}", out.aggregation, if out.scored { "+scored" } else { "" }),
            out.final_val_loss,
            reference.map_or("–".into(), |r| format!("{:.4}x", out.final_val_loss / r)),
            out.attacker_submissions,
            if rejected.is_empty() { "–".into() } else { rejected.join(",") },
            if out.scored { format!("{:.2}%", 100.0 * out.attacker_reward_fraction) } else { "–".into() },
            if !out.scored || args.attackers == 0 || sc.kind.is_none() && !sc.mixed {
                "–".to_string()
            } else if out.honest_above_attackers {
                "ok".to_string()
            } else {
                "MIXED".to_string()
            }
        );
        let earning: Vec<String> = out
            .reward_fraction_by_kind
            .iter()
            .filter(|&(_, &f)| f > 0.0)
            .map(|(k, f)| format!("{k} {:.2}%", 100.0 * f))
            .collect();
        if sc.mixed && !earning.is_empty() {
            println!("{:<14} rewards by attack kind: {}", "", earning.join(", "));
        }
        if let Some(path) = &args.json_out {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            writeln!(f, "{}", serde_json::to_string(&out)?)?;
        }
    }
    Ok(())
}

fn run_scenario(
    args: &ArenaArgs,
    sc: &Scenario,
    dataset: &Dataset,
    model_config: &LlamaConfig,
    device: Device,
    rt: &tokio::runtime::Runtime,
) -> Result<Outcome> {
    // Long on purpose: one scenario's rounds read top to bottom (train, attack, submit, score,
    // publish), sharing the counters the report is made of.
    let started = Instant::now();
    let n = args.contributors;
    let attackers = if sc.kind.is_some() || sc.mixed { args.attackers } else { 0 };
    let honest = n - attackers;
    let tmp = tempfile::tempdir()?;
    let model = Llama::new(model_config, Device::Cpu, args.seed)?;
    let spec = arena_spec(args, sc, dataset, &model)?;
    let weights = read_params(&model)?;
    drop(model);
    let hub = rt.block_on(async {
        let db = Db::connect(&format!("sqlite://{}/hub.db", tmp.path().display())).await?;
        let store = Store::open(&tmp.path().join("store").display().to_string())?;
        let key = tessera_trust::Identity::generate()?;
        anyhow::Ok(Hub::open(db, store, Some(NewRun { spec: spec.clone(), weights }), key, HubConfig::default()).await?)
    })?;
    let mut ids = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let name = if i < honest { format!("honest-{i}") } else { format!("attacker-{}", i - honest) };
        let key = tessera_trust::Identity::generate()?.public();
        ids.push(rt.block_on(hub.register(&name, key)).map_err(anyhow::Error::msg)?.contributor_id);
        keys.push(key);
    }
    let info = rt.block_on(hub.info());
    let mut trainers: Vec<Trainer> = ids
        .iter()
        .map(|&id| Trainer::new(inner_config(&info, id), model_config, dataset.clone(), device))
        .collect::<Result<_, _>>()?;
    let lengths: Vec<usize> = spec.tensors.iter().map(|t| t.numel() as usize).collect();
    let mut feedback: Vec<Vec<ErrorFeedback>> = (0..n)
        .map(|_| lengths.iter().map(|&l| ErrorFeedback::new(l).with_decay(spec.feedback_decay)).collect())
        .collect();
    let score_config = ScoreConfig {
        eval_windows: args.eval_windows as usize,
        fit_windows: args.fit_windows as usize,
        step: args.score_step,
    };
    let mut scorer = Scorer::new(inner_config(&info, 0), model_config, dataset.clone(), device, score_config)?;
    let evaluator = Trainer::new(
        TrainConfig { eval_windows: args.val_windows, ..inner_config(&info, 0) },
        model_config,
        dataset.clone(),
        device,
    )?;
    let mut run_id = [0u8; 16];
    hex::decode_to_slice(&info.run_id, &mut run_id)?;

    let mut history: Vec<(Vec<Vec<f32>>, String)> = Vec::new();
    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    let (mut attacker_submissions, mut honest_rejected) = (0u64, 0u64);
    let (mut score_seconds, mut scored_subs, mut train_seconds, mut score_windows) = (0.0, 0u64, 0.0, 0u64);
    let mut diverged = false;
    let h = args.inner_steps;
    let bar = indicatif::ProgressBar::new(args.rounds).with_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] round {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(sc.name.clone());
    let attacker_ids_now: Vec<u64> = ids[honest..].to_vec();
    let (mut fits, mut score_lists): ([Vec<f64>; 2], [Vec<f64>; 2]) = Default::default();
    let (mut flags, mut scored_by_side): ([BTreeMap<String, u64>; 2], [u64; 2]) = Default::default();
    // Reward units paid, by the kind each submission's sender used that round ("honest": none).
    let mut paid_by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mean = |v: &Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    for round in 0..args.rounds {
        let info = rt.block_on(hub.info());
        let theta = decode_weights(
            &rt.block_on(hub.store().get(&tessera_hub::checkpoint_key(&info.checkpoint)))?,
            &spec.tensors,
        )?;
        history.push((theta, info.checkpoint.clone()));
        let kinds: Vec<Option<Adversary>> =
            (0..n).map(|i| if i < honest { None } else { sc.attack(round, i - honest) }).collect();
        // Which base each trains from, and for how many steps.
        let base_of = |i: usize| -> usize {
            match kinds[i] {
                Some(Adversary::Stale) if round >= 2 => round as usize - 2,
                _ => round as usize,
            }
        };
        for (i, t) in trainers.iter_mut().enumerate() {
            t.config.worker = if kinds[i] == Some(Adversary::WrongData) { ids[i] + 1_000_003 } else { ids[i] };
            t.schedule_shift = (base_of(i) as u64 * h) as i64 - t.step() as i64;
        }
        let jobs: Vec<(&[Vec<f32>], u64)> =
            (0..n).map(|i| (history[base_of(i)].0.as_slice(), kinds[i].map_or(h, |k| k.inner_steps(h)))).collect();
        let t0 = Instant::now();
        let trained = train_workers(&mut trainers, &jobs, device);
        train_seconds += t0.elapsed().as_secs_f64() / n as f64;
        let mut deltas = Vec::with_capacity(n);
        let mut losses = Vec::with_capacity(n);
        for (i, t) in trained.into_iter().enumerate() {
            match t {
                Ok((loss, local)) => {
                    let base = &history[base_of(i)].0;
                    deltas.push(
                        base.iter()
                            .zip(&local)
                            .map(|(b, l)| b.iter().zip(l).map(|(b, l)| b - l).collect())
                            .collect::<Vec<Vec<f32>>>(),
                    );
                    losses.push(loss / jobs[i].1.max(1) as f64);
                }
                Err(e) => {
                    tracing::warn!(contributor = i, error = %e, "training failed; the model has diverged");
                    diverged = true;
                    break;
                }
            }
        }
        if diverged {
            break;
        }
        // The attacks: colluders pool their honest work; copiers take honest contributor 0's;
        // the adaptive attacker the last published update as a pseudo-gradient (÷ outer lr).
        let pool: Vec<Vec<Vec<f32>>> = (honest..n).map(|i| deltas[i].clone()).collect();
        let victim = deltas[0].clone();
        let adaptive = kinds.contains(&Some(Adversary::Adaptive));
        let public: Option<Vec<Vec<f32>>> = (round > 0 && adaptive).then(|| {
            let (before, after) = (&history[round as usize - 1].0, &history[round as usize].0);
            before
                .iter()
                .zip(after)
                .map(|(b, a)| b.iter().zip(a).map(|(b, a)| (b - a) / args.outer_lr).collect())
                .collect()
        });
        for i in honest..n {
            if let Some(kind) = kinds[i] {
                let pooled: Vec<&[Vec<f32>]> = pool.iter().map(Vec::as_slice).collect();
                let others: Vec<&[Vec<f32>]> = match kind {
                    Adversary::Alie | Adversary::Ipm => pooled,
                    Adversary::Copy | Adversary::CopyNoise => vec![victim.as_slice()],
                    // Tampered below, from the bytes the victim sent.
                    Adversary::CopySupport => continue,
                    Adversary::Adaptive => public.iter().map(Vec::as_slice).collect(),
                    _ => Vec::new(),
                };
                kind.tamper(&mut deltas[i], &others, n, attackers, args.seed ^ (round << 20) ^ i as u64);
            }
        }
        let mut bodies: Vec<Vec<u8>> = Vec::with_capacity(n);
        for i in 0..n {
            let (base_round, base_hash) = (base_of(i) as u64, &history[base_of(i)].1);
            let mut tensors = Vec::with_capacity(lengths.len());
            for (k, (d, ef)) in deltas[i].iter().zip(&mut feedback[i]).enumerate() {
                let mut encoded = ef.encode(&spec.codec, d)?;
                if kinds[i] == Some(Adversary::Nan) && k == 0 {
                    poison(&spec.codec, &mut encoded);
                }
                tensors.push(TensorEntry {
                    name: spec.tensors[k].name.clone(),
                    shape: spec.tensors[k].shape.clone(),
                    encoded,
                });
            }
            let mut base = [0u8; 32];
            hex::decode_to_slice(base_hash, &mut base)?;
            let message =
                PseudoGradient { codec: spec.codec, run_id, round: base_round, base_checkpoint: base, tensors };
            bodies.push(match kinds[i] {
                // The exact bytes honest contributor 0 sent this round.
                Some(Adversary::Replay) => bodies[0].clone(),
                // Honest contributor 0's message as sent (its support), its values rescaled.
                Some(kind @ Adversary::CopySupport) => {
                    let view = tessera_protocol::MessageView::parse(&bodies[0])?;
                    let sent = tessera_aggregate::decode_view(&lengths, &view)?;
                    let mut delta = sent.clone();
                    kind.tamper(&mut delta, &[sent.as_slice()], n, attackers, args.seed ^ (round << 20) ^ i as u64);
                    let mut message = message;
                    for (t, d) in message.tensors.iter_mut().zip(&delta) {
                        t.encoded = spec.codec.encode(d)?;
                    }
                    message.to_bytes()
                }
                _ => message.to_bytes(),
            });
        }
        for i in 0..n {
            if kinds[i] == Some(Adversary::Stale) && round < 2 {
                continue; // Nothing old enough to be stale yet.
            }
            let result = rt.block_on(hub.submit(
                ids[i],
                keys[i],
                Bytes::from(bodies[i].clone()),
                tessera_hub::Claim { inner_loss: Some(losses[i]), data: None },
            ));
            if i >= honest {
                attacker_submissions += 1;
            }
            if let Err(e) = result {
                let code = e.code.wire_name();
                if i < honest {
                    honest_rejected += 1;
                    tracing::warn!(contributor = i, %e, "an honest submission was rejected");
                } else {
                    *rejected.entry(code).or_default() += 1;
                }
            }
        }
        // The deadline (0 ms after the first submission) has passed: close, score, publish.
        rt.block_on(hub.tick())?;
        if sc.scored {
            let job = rt.block_on(hub.scoring_job("validator"))?.context("a scored round did not wait for scores")?;
            let seed = tessera_validator::revealed_seed(&job).map_err(anyhow::Error::msg)?;
            let mut candidates = Vec::with_capacity(job.submissions.len());
            for s in &job.submissions {
                let bytes = rt.block_on(hub.submission_blob(&s.blob)).map_err(anyhow::Error::msg)?;
                candidates.push(Candidate::from_job(s, &bytes, &lengths)?);
            }
            let base = &history[round as usize].0;
            let tessera_validator::RoundScores { scored: scores, held_out_loss, cost, .. } =
                scorer.score(base, &candidates, &seed)?;
            for s in &scores {
                let side = if attacker_ids_now.contains(&s.contributor) { 1 } else { 0 };
                fits[side].extend(s.data_fit);
                score_lists[side].push(s.score);
            }
            for (s, k) in scores.iter().zip(&candidates) {
                tracing::debug!(round, contributor = k.contributor, score = s.score, data_fit = s.data_fit, copy_of = ?s.copy_of, "scored");
            }
            score_seconds += cost.seconds;
            score_windows += cost.windows_forward;
            scored_subs += candidates.len() as u64;
            let report = tessera_validator::report(job.round, &scores, Some(held_out_loss));
            rt.block_on(hub.post_scores("validator", report)).map_err(anyhow::Error::msg)?;
            for row in rt.block_on(hub.round_scores(round))? {
                let side = usize::from(attacker_ids_now.contains(&row.contributor));
                let kind = ids.iter().position(|&id| id == row.contributor).and_then(|i| kinds[i]);
                *paid_by_kind.entry(kind.map_or("honest", |k| k.name()).to_owned()).or_default() += row.reward;
                scored_by_side[side] += 1;
                if let Some(flag) = row.flag {
                    *flags[side].entry(flag).or_default() += 1;
                }
            }
        }
        if rt.block_on(hub.info()).round != round + 1 {
            bail!("round {round} was not published");
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let final_val_loss = if diverged {
        f64::INFINITY
    } else {
        let info = rt.block_on(hub.info());
        let theta = decode_weights(
            &rt.block_on(hub.store().get(&tessera_hub::checkpoint_key(&info.checkpoint)))?,
            &spec.tensors,
        )?;
        if theta.iter().flatten().any(|v| !v.is_finite()) {
            f64::INFINITY
        } else {
            write_params(&evaluator.model, &theta)?;
            let v = evaluator.evaluate()?.val_loss;
            if v.is_finite() { v } else { f64::INFINITY }
        }
    };
    let board = rt.block_on(hub.leaderboard())?;
    let attacker_ids: Vec<u64> = ids[honest..].to_vec();
    // The never-rated are listed apart; here they share the place after every rated one.
    let unrated_rank = board.rows.len() as u64 + 1;
    let everyone = || board.rows.iter().map(|r| (r, r.rank)).chain(board.unrated.iter().map(|r| (r, unrated_rank)));
    let total: u64 = everyone().map(|(r, _)| r.rewards).sum();
    let attacker_rewards: u64 = everyone().filter(|(r, _)| attacker_ids.contains(&r.id)).map(|(r, _)| r.rewards).sum();
    let best_attacker_rank = everyone().filter(|(r, _)| attacker_ids.contains(&r.id)).map(|(_, rank)| rank).min();
    let worst_honest_rank =
        everyone().filter(|(r, _)| !attacker_ids.contains(&r.id)).map(|(_, rank)| rank).max().unwrap_or(0);
    let per_round_train_windows = (h * u64::from(args.batch_size)) as f64 * 3.0;
    Ok(Outcome {
        scenario: sc.name.clone(),
        aggregation: sc.aggregation.to_string(),
        scored: sc.scored,
        attackers,
        final_val_loss,
        diverged: diverged || !final_val_loss.is_finite(),
        attacker_submissions,
        rejected,
        honest_rejected,
        attacker_reward_fraction: if total > 0 { attacker_rewards as f64 / total as f64 } else { 0.0 },
        reward_fraction_by_kind: {
            let paid: u64 = paid_by_kind.values().sum();
            paid_by_kind
                .iter()
                .filter(|(k, _)| k.as_str() != "honest")
                .map(|(k, &v)| (k.clone(), if paid > 0 { v as f64 / paid as f64 } else { 0.0 }))
                .collect()
        },
        honest_data_fit: mean(&fits[0]),
        attacker_data_fit: mean(&fits[1]),
        honest_score: mean(&score_lists[0]),
        attacker_score: mean(&score_lists[1]),
        honest_above_attackers: best_attacker_rank.is_none_or(|b| b > worst_honest_rank),
        honest_scored: scored_by_side[0],
        attacker_scored: scored_by_side[1],
        honest_flags: std::mem::take(&mut flags[0]),
        attacker_flags: std::mem::take(&mut flags[1]),
        best_attacker_rank,
        worst_honest_rank,
        validator_time_fraction: (scored_subs > 0 && train_seconds > 0.0)
            .then(|| score_seconds / scored_subs as f64 / (train_seconds / args.rounds as f64)),
        validator_flop_fraction: (scored_subs > 0)
            .then(|| score_windows as f64 / scored_subs as f64 / per_round_train_windows),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn arena_spec(args: &ArenaArgs, sc: &Scenario, dataset: &Dataset, model: &Llama) -> Result<RunSpec> {
    let total = args.rounds * args.inner_steps;
    let (tensors, data) = crate::spec::model_tables(model, dataset, &args.data, 1)?;
    let spec = RunSpec {
        name: format!("arena {}", sc.name),
        model: serde_json::to_value(&model.config)?,
        tensors,
        data,
        inner: InnerSpec {
            batch_size: args.batch_size,
            seq_len: model.config.max_position_embeddings as u32,
            lr: args.lr,
            min_lr: args.lr / 10.0,
            warmup_steps: (total / 10).clamp(1, 100),
            grad_clip: 1.0,
            weight_decay: 0.1,
        },
        inner_steps: args.inner_steps,
        rounds: args.rounds,
        outer: OuterSpec { lr: args.outer_lr, momentum: args.outer_momentum, nesterov: true },
        codec: args.codec,
        feedback_decay: 1.0,
        broadcast_codec: args.codec,
        // The driver closes each round itself once everyone has submitted.
        quorum: u32::MAX,
        round_deadline_ms: 0,
        max_staleness: 1,
        staleness_decay: 0.5,
        seed: args.seed,
        aggregation: sc.aggregation,
        trust: None,
        phases: Vec::new(),
        fragments: 0,
        until_loss: None,
        economy: None,
        governance: None,
        contest: sc.scored.then(|| ContestSpec {
            eval_windows: args.eval_windows,
            fit_windows: args.fit_windows,
            score_step: args.score_step,
            promote_top: 0,
            promote_at: None,
            ..ContestSpec::default()
        }),
    };
    spec.validate().map_err(anyhow::Error::msg)?;
    Ok(spec)
}
