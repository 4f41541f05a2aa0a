//! The API on a real socket, with a real (small, random) model: concurrent requests are
//! decoded together and each gets exactly what it would alone; keys, limits and billing hold.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};
use tessera_data::TessTokenizer;
use tessera_model::{Llama, LlamaConfig, SamplingParams, generate, preset};
use tessera_serve::{AppState, Engine, Store};

struct Server {
    url: String,
    state: Arc<AppState>,
    key: String,
    store: Store,
    engine: Engine,
    model: Llama,
    tokenizer: TessTokenizer,
    _dir: tempfile::TempDir,
}

fn config() -> LlamaConfig {
    config_with(64)
}

fn config_with(context: i64) -> LlamaConfig {
    let tokenizer = TessTokenizer::byte_level();
    LlamaConfig {
        vocab_size: tokenizer.vocab_size() as i64,
        max_position_embeddings: context,
        ..preset("tiny").unwrap()
    }
}

async fn start(slots: usize, rpm: u32, body_limit: usize) -> Server {
    start_with(config(), slots, rpm, body_limit).await
}

async fn start_with(config: LlamaConfig, slots: usize, rpm: u32, body_limit: usize) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("serve.sqlite")).await.unwrap();
    let (key, _) = store.create_key("tester", rpm).await.unwrap();
    let tokenizer = TessTokenizer::byte_level();
    let engine = Engine::start(Llama::new(&config, tch::Device::Cpu, 7).unwrap(), slots, tokenizer.eos_id()).unwrap();
    let context = config.max_position_embeddings as usize;
    let state =
        Arc::new(AppState::new(engine.clone(), tokenizer.clone(), "tiny".into(), context, store.clone(), body_limit));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let limits = tessera_edge::Limits { refusal: tessera_serve::edge_refusal, ..tessera_edge::Limits::default() };
    tokio::spawn(tessera_edge::serve(listener, tessera_serve::router(state.clone()), limits, std::future::pending()));
    Server {
        url,
        state,
        key,
        store,
        engine,
        model: Llama::new(&config, tch::Device::Cpu, 7).unwrap(),
        tokenizer,
        _dir: dir,
    }
}

async fn post(s: &Server, path: &str, body: &Value, key: &str) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{}{path}", s.url)).bearer_auth(key).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_decoding_steps_and_match_generation_alone() {
    let s = start(8, 10_000, 1 << 20).await;
    let prompts = ["Once upon", "The hub", "A", "Twelve tokens of text", "xyz", "Hello, world", "DiLoCo", "q"];
    let mut tasks = Vec::new();
    for p in prompts {
        let body = json!({"model": "tiny", "prompt": p, "max_tokens": 24, "temperature": 0});
        let (url, key) = (s.url.clone(), s.key.clone());
        tasks.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("{url}/v1/completions"))
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let out = r.json::<Value>().await.unwrap();
            assert_eq!(status, 200, "{out}");
            out
        }));
    }
    let mut billed = 0;
    for (p, t) in prompts.iter().zip(tasks) {
        let out = t.await.unwrap();
        // Greedy decoding alone, with the plain KV cache, gives the same tokens.
        let ids = s.tokenizer.encode(p).unwrap();
        let params = SamplingParams {
            max_new_tokens: 24,
            temperature: 0.0,
            stop_token: Some(s.tokenizer.eos_id()),
            ..Default::default()
        };
        let alone: Vec<u32> = generate(&s.model, &ids, &params, |_| {})
            .unwrap()
            .into_iter()
            .filter(|&t| t != s.tokenizer.eos_id())
            .collect();
        let text = s.tokenizer.decode(&alone).unwrap();
        assert_eq!(out["choices"][0]["text"].as_str().unwrap(), text, "prompt {p:?}");
        let usage = &out["usage"];
        assert_eq!(usage["prompt_tokens"].as_u64().unwrap() as usize, ids.len());
        assert_eq!(usage["completion_tokens"].as_u64().unwrap() as usize, alone.len());
        billed += ids.len() + alone.len();
    }
    // Prometheus sees the same tokens (at least: other tests in this process count too).
    let metrics = reqwest::get(format!("{}/metrics", s.url)).await.unwrap().text().await.unwrap();
    let completion: f64 = metrics
        .lines()
        .find(|l| l.starts_with("tessera_serve_tokens_total{kind=\"completion\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(
        completion >= (billed - prompts.iter().map(|p| s.tokenizer.encode(p).unwrap().len()).sum::<usize>()) as f64
    );
    assert!(
        metrics.contains("tessera_serve_request_seconds_bucket") && metrics.contains("status=\"200\""),
        "{metrics}"
    );
    let stats = s.engine.stats();
    assert!(stats.widest_step.load(Ordering::Relaxed) > 1, "requests were decoded one at a time");
    assert!(stats.steps.load(Ordering::Relaxed) < stats.step_tokens.load(Ordering::Relaxed));
    let (_, usage) = s.store.close_epoch().await.unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].requests, 8);
    assert_eq!((usage[0].prompt_tokens + usage[0].completion_tokens) as usize, billed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_have_openai_shape_and_cost_nothing() {
    let s = start(2, 1000, 2000).await;
    let ok = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let cases = [
        (
            "/v1/chat/completions",
            json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
            404,
            Some("model_not_found"),
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x".repeat(100), "max_tokens": 1}),
            400,
            Some("context_length_exceeded"),
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "max_tokens": 64}),
            400,
            Some("context_length_exceeded"),
        ),
        ("/v1/completions", json!({"model": "tiny", "prompt": "x", "temperature": -1}), 400, None),
        ("/v1/completions", json!({"model": "tiny", "prompt": "y".repeat(3000)}), 413, Some("request_too_large")),
    ];
    for (path, body, status, code) in cases {
        let (got, err) = post(&s, path, &body, &s.key).await;
        assert_eq!(got, status, "{body}: {err}");
        assert_eq!(err["error"]["code"].as_str(), code, "{err}");
        assert!(err["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, err) = post(&s, "/v1/chat/completions", &ok, "tsk_wrong").await;
    assert_eq!((status, err["error"]["code"].as_str()), (401, Some("invalid_api_key")));
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.url))
        .bearer_auth(&s.key)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "invalid_request_error");
    // Nothing above was billed.
    assert_eq!(s.store.usage(0).await.unwrap(), vec![]);
    // A key allowed 2 requests a minute gets 2, then 429 (refused requests count too).
    let (limited, _) = s.store.create_key("limited", 2).await.unwrap();
    for _ in 0..2 {
        assert_eq!(post(&s, "/v1/chat/completions", &ok, &limited).await.0, 200);
    }
    let (status, err) = post(&s, "/v1/chat/completions", &ok, &limited).await;
    assert_eq!((status, err["error"]["code"].as_str()), (429, Some("rate_limit_exceeded")));
    let usage = s.store.usage(0).await.unwrap();
    assert_eq!((usage.len(), usage[0].account.as_str(), usage[0].requests), (1, "limited", 2));
}

/// `ignore_eos` (vLLM's extension) generates exactly `max_tokens`; streaming ends with usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_eos_generates_exactly_max_tokens_and_streams_end_with_usage() {
    let s = start(2, 1000, 1 << 20).await;
    for seed in 0..4 {
        let body = json!({"model": "tiny", "prompt": "a", "max_tokens": 40, "seed": seed, "ignore_eos": true});
        let (status, out) = post(&s, "/v1/completions", &body, &s.key).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["usage"]["completion_tokens"], 40);
        assert_eq!(out["choices"][0]["finish_reason"], "length");
    }
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": true, "ignore_eos": true});
    let text = stream_text(&s, "/v1/chat/completions", &body).await;
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() <= 5);
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
}

/// `logit_bias` moves the logits before sampling: +100 forces a token at every step, −100 bans
/// the token greedy decoding would have chosen; the penalties are taken; an id past the
/// vocabulary and an unsupported parameter are refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_and_penalties_change_what_is_sampled() {
    let s = start(2, 1000, 1 << 20).await;
    let greedy = |extra: Value| {
        let mut body = json!({"model": "tiny", "prompt": "ab", "max_tokens": 6, "temperature": 0, "ignore_eos": true});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let (status, plain) = post(&s, "/v1/completions", &greedy(json!({})), &s.key).await;
    assert_eq!(status, 200, "{plain}");
    let plain = plain["choices"][0]["text"].as_str().unwrap().to_owned();
    let first = s.tokenizer.encode(&plain).unwrap()[0];
    let forced = s.tokenizer.encode("z").unwrap()[0];
    let (_, out) = post(&s, "/v1/completions", &greedy(json!({"logit_bias": {forced.to_string(): 100}})), &s.key).await;
    assert_eq!(out["choices"][0]["text"], "zzzzzz", "{out}");
    let (_, out) = post(&s, "/v1/completions", &greedy(json!({"logit_bias": {first.to_string(): -100}})), &s.key).await;
    let banned = out["choices"][0]["text"].as_str().unwrap();
    assert!(!banned.is_empty() && s.tokenizer.encode(banned).unwrap()[0] != first, "{banned:?} vs {plain:?}");
    let (status, out) =
        post(&s, "/v1/completions", &greedy(json!({"presence_penalty": 1.5, "frequency_penalty": 2})), &s.key).await;
    assert_eq!((status, out["usage"]["completion_tokens"].as_u64()), (200, Some(6)), "{out}");
    let (status, out) = post(&s, "/v1/completions", &greedy(json!({"logit_bias": {"99999": 5}})), &s.key).await;
    assert_eq!((status, out["error"]["param"].as_str()), (400, Some("logit_bias")), "{out}");
    let (status, out) =
        post(&s, "/v1/completions", &greedy(json!({"response_format": {"type": "json_object"}})), &s.key).await;
    assert_eq!((status, out["error"]["code"].as_str()), (400, Some("unsupported_parameter")), "{out}");
}

/// A streamed response's whole text, once it has ended (200 expected).
async fn stream_text(s: &Server, path: &str, body: &Value) -> String {
    let r =
        reqwest::Client::new().post(format!("{}{path}", s.url)).bearer_auth(&s.key).json(body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// The data events of a streamed response.
async fn events(s: &Server, path: &str, body: &Value) -> Vec<Value> {
    stream_text(s, path, body)
        .await
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// `logprobs` are the model's own log-softmax at each generated token (checked against one
/// full forward pass over prompt and completion), the alternatives are the likeliest tokens,
/// the tokens spell the text, and streaming hands out the same numbers chunk by chunk; with a
/// stop sequence, the stop's tokens carry none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_the_models_and_spell_the_text_whole_and_streamed() {
    let s = start(2, 1000, 1 << 20).await;
    let body =
        json!({"model": "tiny", "prompt": "ab", "max_tokens": 10, "temperature": 0, "ignore_eos": true, "logprobs": 3});
    let (status, out) = post(&s, "/v1/completions", &body, &s.key).await;
    assert_eq!(status, 200, "{out}");
    let c = &out["choices"][0];
    let lp = &c["logprobs"];
    let tokens: Vec<String> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect();
    assert_eq!(tokens.len(), 10);
    let text = c["text"].as_str().unwrap();
    if !text.contains('\u{FFFD}') {
        assert_eq!(tokens.concat(), text);
    }
    let values: Vec<f64> = lp["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    // The same numbers from one forward pass over everything.
    let prompt = s.tokenizer.encode("ab").unwrap();
    // The tokens greedy decoding alone picks (a token's text need not encode back to it: a
    // byte of a character decodes to U+FFFD).
    let params = SamplingParams { max_new_tokens: 10, temperature: 0.0, stop_token: None, ..Default::default() };
    let generated: Vec<u32> = generate(&s.model, &prompt, &params, |_| {}).unwrap();
    assert_eq!(s.tokenizer.decode(&generated).unwrap(), text);
    let all: Vec<i64> = prompt.iter().chain(&generated).map(|&t| i64::from(t)).collect();
    let logits = tch::no_grad(|| s.model.forward(&tch::Tensor::from_slice(&all).view([1, -1]), None).unwrap());
    let log_softmax = logits.get(0).log_softmax(-1, tch::Kind::Float);
    for (j, &t) in generated.iter().enumerate() {
        let want = log_softmax.double_value(&[(prompt.len() + j - 1) as i64, i64::from(t)]);
        assert!((values[j] - want).abs() < 1e-3, "token {j}: {} vs {want}", values[j]);
    }
    for (j, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        // Three alternatives, fewer keys when two decode to the same text (bytes of characters
        // are all U+FFFD): the legacy format is a map from text.
        assert!((1..=3).contains(&top.len()), "{top:?}");
        // Greedy: the chosen token is the likeliest.
        let best = top.values().map(|v| v.as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
        assert!((best - values[j]).abs() < 1e-6);
    }
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    // Streamed: the same numbers, chunk by chunk.
    let mut streamed = Vec::new();
    for e in events(&s, "/v1/completions", &json!({"stream": true, "model": "tiny", "prompt": "ab", "max_tokens": 10, "temperature": 0, "ignore_eos": true, "logprobs": 3})).await {
        if let Some(v) = e["choices"][0]["logprobs"]["token_logprobs"].as_array() {
            streamed.extend(v.iter().map(|x| x.as_f64().unwrap()));
        }
    }
    assert_eq!(streamed, values);
    // Chat: `logprobs: true` with `top_logprobs`, whole and streamed.
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
                      "logprobs": true, "top_logprobs": 2, "stop": "\u{0}"});
    let (status, out) = post(&s, "/v1/chat/completions", &chat, &s.key).await;
    assert_eq!(status, 200, "{out}");
    let content = out["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    assert!(content.iter().all(|e| e["top_logprobs"].as_array().unwrap().len() == 2 && e["bytes"].is_array()));
    let whole: Vec<f64> = content.iter().map(|e| e["logprob"].as_f64().unwrap()).collect();
    let mut chat_stream = chat.clone();
    chat_stream["stream"] = json!(true);
    let mut streamed = Vec::new();
    for e in events(&s, "/v1/chat/completions", &chat_stream).await {
        if let Some(v) = e["choices"][0]["logprobs"]["content"].as_array() {
            streamed.extend(v.iter().map(|x| x["logprob"].as_f64().unwrap()));
        }
    }
    assert_eq!(streamed, whole);
    // A stop sequence: the stop's tokens carry no log probabilities.
    let stop = text.chars().nth(4).unwrap().to_string();
    let body = json!({"model": "tiny", "prompt": "ab", "max_tokens": 10, "temperature": 0, "ignore_eos": true, "logprobs": 0, "stop": stop});
    let (_, out) = post(&s, "/v1/completions", &body, &s.key).await;
    let cut = out["choices"][0]["text"].as_str().unwrap();
    let n = out["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len();
    assert_eq!(n, cut.chars().count(), "{out}");
    assert!(out["choices"][0]["logprobs"]["top_logprobs"][0].as_object().unwrap().is_empty());
    // Echo with logprobs is refused by name; top_logprobs without logprobs too.
    let (status, out) =
        post(&s, "/v1/completions", &json!({"model": "tiny", "prompt": "a", "echo": true, "logprobs": 1}), &s.key)
            .await;
    assert_eq!((status, out["error"]["param"].as_str()), (400, Some("logprobs")), "{out}");
}

/// `n` choices and batched prompts: choice `i` is prompt `i / n` sampled with the request's
/// seed plus `i` — the very text a request of that prompt and seed alone gets; usage counts each
/// prompt once and every choice's tokens; streaming several choices is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_choices_and_prompts_are_each_what_one_request_would_get() {
    let s = start(3, 1000, 1 << 20).await;
    let alone = |prompt: &str, seed: u64| json!({"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": seed, "ignore_eos": true});
    let body = json!({"model": "tiny", "prompt": ["ab", "xyz"], "n": 2, "max_tokens": 12, "temperature": 1.0, "seed": 40, "ignore_eos": true});
    let (status, out) = post(&s, "/v1/completions", &body, &s.key).await;
    assert_eq!(status, 200, "{out}");
    let choices = out["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let prompt = ["ab", "xyz"][i / 2];
        let (_, one) = post(&s, "/v1/completions", &alone(prompt, 40 + i as u64), &s.key).await;
        assert_eq!(c["text"], one["choices"][0]["text"], "choice {i}");
    }
    assert_ne!(choices[0]["text"], choices[1]["text"], "two samples of one prompt differ");
    assert_eq!(out["usage"]["prompt_tokens"], 5, "each prompt counted once: 2 + 3 bytes");
    assert_eq!(out["usage"]["completion_tokens"], 48);
    // Chat takes n as well.
    let chat =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 4, "seed": 1});
    let (status, out) = post(&s, "/v1/chat/completions", &chat, &s.key).await;
    assert_eq!((status, out["choices"].as_array().map(Vec::len)), (200, Some(3)), "{out}");
    // Streamed: each choice's chunks carry its index and spell what the whole request got;
    // one usage chunk, after every choice ended, and one [DONE].
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let raw = stream_text(&s, "/v1/completions", &streamed).await;
    assert_eq!(raw.matches("data: [DONE]").count(), 1, "{raw}");
    let mut texts = vec![String::new(); 4];
    let mut finished = 0;
    let mut usage = Vec::new();
    for e in raw.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).filter(|d| *d != "[DONE]") {
        let e: Value = serde_json::from_str(e).unwrap();
        if !e["usage"].is_null() {
            assert_eq!(finished, 4, "usage comes after every choice ended");
            usage.push(e["usage"].clone());
            continue;
        }
        let c = &e["choices"][0];
        texts[c["index"].as_u64().unwrap() as usize].push_str(c["text"].as_str().unwrap());
        finished += usize::from(!c["finish_reason"].is_null());
    }
    let whole: Vec<String> = choices.iter().map(|c| c["text"].as_str().unwrap().to_owned()).collect();
    assert_eq!(texts, whole);
    assert_eq!(usage.len(), 1);
    assert_eq!((usage[0]["prompt_tokens"].as_u64(), usage[0]["completion_tokens"].as_u64()), (Some(5), Some(48)));
}

/// A caller who hangs up a stream part-way pays for what was generated by then (before, usage
/// was written only when a stream ended, so a hang-up was free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_abandoned_part_way_is_billed() {
    let s = start_with(config_with(2048), 1, 1000, 1 << 20).await;
    let body = json!({"model": "tiny", "prompt": "a", "max_tokens": 2000, "stream": true, "ignore_eos": true});
    let mut r = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.url))
        .bearer_auth(&s.key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut read = 0;
    while read < 3 {
        let chunk = r.chunk().await.unwrap().expect("the stream ended before three chunks");
        read += String::from_utf8_lossy(&chunk).matches("data: ").count();
    }
    drop(r);
    let epoch = s.store.open_epoch().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let usage = loop {
        let usage = s.store.usage(epoch).await.unwrap();
        if !usage.is_empty() || std::time::Instant::now() > deadline {
            break usage;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(usage.len(), 1, "the abandoned stream was not billed");
    assert_eq!(usage[0].requests, 1);
    assert!(usage[0].prompt_tokens >= 1);
    let completion = usage[0].completion_tokens;
    assert!((2..2000).contains(&completion), "billed {completion} completion tokens");
}

/// Switching models (what `--follow-hub` does at each new checkpoint) drops nothing: a stream
/// begun on the old model ends on it and names it; requests after the switch get the new one,
/// under its new id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_of_model_lets_requests_in_flight_finish_on_theirs() {
    let s = start(2, 1000, 1 << 20).await;
    let greedy = |model: &Llama| {
        let params = SamplingParams { max_new_tokens: 40, temperature: 0.0, stop_token: None, ..Default::default() };
        let ids = generate(model, &s.tokenizer.encode("ab").unwrap(), &params, |_| {}).unwrap();
        s.tokenizer.decode(&ids).unwrap()
    };
    let body = |model: &str, stream: bool| json!({"model": model, "prompt": "ab", "max_tokens": 40, "temperature": 0, "ignore_eos": true, "stream": stream});
    let mut r = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.url))
        .bearer_auth(&s.key)
        .json(&body("tiny", true))
        .send()
        .await
        .unwrap();
    let first = r.chunk().await.unwrap().unwrap();
    // Switch while the stream is open.
    let newer = Llama::new(&config(), tch::Device::Cpu, 8).unwrap();
    let engine = Engine::start(Llama::new(&config(), tch::Device::Cpu, 8).unwrap(), 2, s.tokenizer.eos_id()).unwrap();
    s.state.set_served(tessera_serve::Served::new("tiny-r1".into(), [1; 32], engine, 64));
    let mut raw = first.to_vec();
    while let Some(c) = r.chunk().await.unwrap() {
        raw.extend_from_slice(&c);
    }
    let raw = String::from_utf8(raw).unwrap();
    let mut text = String::new();
    for e in raw.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).filter(|d| *d != "[DONE]") {
        let e: Value = serde_json::from_str(e).unwrap();
        if let Some(m) = e["model"].as_str() {
            assert_eq!(m, "tiny", "a chunk of the old model's stream names another");
        }
        text.push_str(e["choices"][0]["text"].as_str().unwrap_or(""));
    }
    assert_eq!(text, greedy(&s.model), "the stream begun before the switch ends on its model");
    let (status, out) = post(&s, "/v1/completions", &body("tiny-r1", false), &s.key).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        (out["model"].as_str(), out["choices"][0]["text"].as_str()),
        (Some("tiny-r1"), Some(greedy(&newer).as_str()))
    );
    let (status, _) = post(&s, "/v1/completions", &body("tiny", false), &s.key).await;
    assert_eq!(status, 404, "the old id is gone");
}
