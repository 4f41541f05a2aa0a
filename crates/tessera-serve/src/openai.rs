//! The OpenAI wire format: request parsing that names the offending parameter, and the response,
//! chunk and error shapes the official clients expect.
//!
//! Parsing is tolerant of fields that do not change what is generated (`user`, `metadata`,
//! `stream_options`…): they are ignored, as OpenAI's own API ignores fields it does not use. Every
//! field Tessera does use is checked, and a bad one is a 400 naming it. A field that would change
//! the output and that Tessera does not implement (`response_format`, tools, `best_of`…) is
//! refused with a 400 naming it, never silently ignored.

use serde_json::{Map, Value, json};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_owned()),
            code: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError { status: 400, message: message.into(), kind: "invalid_request_error", param: None, code: None }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 401,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    pub fn model_not_found(model: &str) -> ApiError {
        ApiError {
            status: 404,
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn rate_limited(limit: u32) -> ApiError {
        ApiError {
            status: 429,
            message: format!("Rate limit reached: this key may make {limit} requests per minute. Try again shortly."),
            kind: "requests",
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError {
            status: 413,
            message: format!("The request body is larger than {limit} bytes."),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        }
    }

    pub fn server(message: impl Into<String>) -> ApiError {
        ApiError { status: 500, message: message.into(), kind: "server_error", param: None, code: None }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// One chat message after parsing.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What both endpoints ask for, after checking.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub model: String,
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: f64,
    pub stream: bool,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    /// vLLM's extension: generate past the end-of-text token, to exactly `max_tokens`.
    pub ignore_eos: bool,
    /// OpenAI's penalties on tokens already generated: each logit is lowered by
    /// `count × frequency_penalty + (count > 0) × presence_penalty`.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Added to the logits of these token ids before sampling (−100 bans a token, 100 forces it).
    pub logit_bias: Vec<(u32, f32)>,
    /// Each generated token's log probability and this many alternatives (completions:
    /// `logprobs` 0–5; chat: `logprobs: true` with `top_logprobs` 0–20).
    pub logprobs: Option<usize>,
}

/// The most tokens `logit_bias` may name (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

fn logit_bias(m: &Map<String, Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad = |why: String| ApiError::invalid("logit_bias", why);
    let Some(v) = present(m, "logit_bias") else { return Ok(Vec::new()) };
    let Value::Object(o) = v else {
        return Err(bad("'logit_bias' must be an object of token ids to numbers from -100 to 100.".into()));
    };
    if o.len() > MAX_LOGIT_BIAS {
        return Err(bad(format!("'logit_bias' may name at most {MAX_LOGIT_BIAS} tokens.")));
    }
    let mut out = Vec::with_capacity(o.len());
    for (k, v) in o {
        let id: u32 = k.parse().map_err(|_| bad(format!("{k:?} in 'logit_bias' is not a token id.")))?;
        match v.as_f64() {
            Some(b) if b.is_finite() && (-100.0..=100.0).contains(&b) => out.push((id, b as f32)),
            _ => return Err(bad(format!("{v} for token {id} in 'logit_bias' is not a number from -100 to 100."))),
        }
    }
    out.sort_by_key(|(id, _)| *id);
    Ok(out)
}

/// A parsed `/v1/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// One prompt, or a batch of them (each answered with `n` choices, in order).
    pub prompts: Vec<String>,
    pub echo: bool,
    /// Choices per prompt.
    pub n: usize,
    pub generation: Generation,
}

/// A parsed `/v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub n: usize,
    pub generation: Generation,
}

/// The most choices one request may ask for: `n` × prompts (each one is a generation).
pub const MAX_CHOICES: usize = 16;

fn choices(m: &Map<String, Value>) -> Result<usize, ApiError> {
    match present(m, "n") {
        None => Ok(1),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_CHOICES as u64).contains(&n) => Ok(n as usize),
            _ => Err(ApiError::invalid(
                "n",
                format!("{v} is not valid for 'n': it must be an integer from 1 to {MAX_CHOICES}."),
            )),
        },
    }
}

/// The most tokens one request may ask for; the context usually binds first.
pub const MAX_TOKENS_LIMIT: u64 = 1 << 20;

fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("We could not parse the JSON body of your request ({e}). Send a JSON object."))
    })?;
    match value {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad_request("The request body must be a JSON object.")),
    }
}

fn present<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    m.get(key).filter(|v| !v.is_null())
}

fn number(
    m: &Map<String, Value>,
    key: &str,
    default: f64,
    range: std::ops::RangeInclusive<f64>,
) -> Result<f64, ApiError> {
    match present(m, key) {
        None => Ok(default),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && range.contains(&x) => Ok(x),
            _ => Err(ApiError::invalid(
                key,
                format!("{v} is not valid for '{key}': it must be a number from {} to {}.", range.start(), range.end()),
            )),
        },
    }
}

fn boolean(m: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match present(m, key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::invalid(key, format!("{v} is not valid for '{key}': it must be a boolean."))),
    }
}

/// Parameters that would change the output and that Tessera does not implement, each with the
/// values that ask for nothing (OpenAI's defaults): any other value is refused, naming it.
const UNSUPPORTED: &[&str] = &[
    "response_format",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "best_of",
    "suffix",
    "prediction",
    "audio",
    "modalities",
];

/// Whether `v` asks for nothing: null, false, 0, an empty object or array, `{"type":"text"}`
/// (the default response format), `"none"` / `"auto"` with no tools, or `best_of` 1.
fn asks_nothing(key: &str, v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Bool(true) => false,
        Value::Number(n) => n.as_f64() == Some(0.0) || (key == "best_of" && n.as_f64() == Some(1.0)),
        Value::String(s) => {
            s.is_empty() || (matches!(key, "tool_choice" | "function_call") && (s == "none" || s == "auto"))
        }
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => {
            o.is_empty() || (key == "response_format" && o.get("type").and_then(Value::as_str) == Some("text"))
        }
    }
}

/// Refuses the first parameter of [`UNSUPPORTED`] the request sets to something.
fn refuse_unsupported(m: &Map<String, Value>) -> Result<(), ApiError> {
    match UNSUPPORTED.iter().find(|k| m.get(**k).is_some_and(|v| !asks_nothing(k, v))) {
        Some(k) => Err(ApiError::invalid(
            k,
            format!("'{k}' is not supported by this server yet; leave it out (it would change what is generated)."),
        )
        .with_code("unsupported_parameter")),
        None => Ok(()),
    }
}

fn generation(m: &Map<String, Value>, max_tokens_keys: &[&str]) -> Result<Generation, ApiError> {
    refuse_unsupported(m)?;
    let model = match present(m, "model") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err(ApiError::invalid("model", "'model' must be a non-empty string.")),
        None => return Err(ApiError::invalid("model", "You must provide a model parameter.")),
    };
    let mut max_tokens = None;
    for &key in max_tokens_keys {
        if let Some(v) = present(m, key) {
            match v.as_u64() {
                Some(n) if (1..=MAX_TOKENS_LIMIT).contains(&n) => max_tokens = Some(n as usize),
                _ => {
                    return Err(ApiError::invalid(
                        key,
                        format!("{v} is not valid for '{key}': it must be an integer from 1 to {MAX_TOKENS_LIMIT}."),
                    ));
                }
            }
        }
    }
    let stop = match present(m, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("stop", "'stop' must be a string or an array of up to 4 strings."))?,
        Some(_) => return Err(ApiError::invalid("stop", "'stop' must be a string or an array of up to 4 strings.")),
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "Stop sequences must not be empty."));
    }
    let seed = match present(m, "seed") {
        None => None,
        Some(v) => match (v.as_u64(), v.as_i64()) {
            (Some(s), _) => Some(s),
            (None, Some(s)) => Some(s as u64),
            _ => return Err(ApiError::invalid("seed", format!("{v} is not valid for 'seed': it must be an integer."))),
        },
    };
    Ok(Generation {
        model,
        max_tokens,
        temperature: number(m, "temperature", 1.0, 0.0..=2.0)?,
        top_p: {
            let p = number(m, "top_p", 1.0, 0.0..=1.0)?;
            if p == 0.0 {
                return Err(ApiError::invalid("top_p", "0 is not valid for 'top_p': it must be above 0."));
            }
            p
        },
        stream: boolean(m, "stream")?,
        stop,
        seed,
        ignore_eos: boolean(m, "ignore_eos")?,
        presence_penalty: number(m, "presence_penalty", 0.0, -2.0..=2.0)? as f32,
        frequency_penalty: number(m, "frequency_penalty", 0.0, -2.0..=2.0)? as f32,
        logit_bias: logit_bias(m)?,
        logprobs: None,
    })
}

/// An integer parameter from 0 to `max`, if present.
fn count(m: &Map<String, Value>, key: &str, max: u64) -> Result<Option<usize>, ApiError> {
    match present(m, key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(k) if k <= max => Ok(Some(k as usize)),
            _ => Err(ApiError::invalid(
                key,
                format!("{v} is not valid for '{key}': it must be an integer from 0 to {max}."),
            )),
        },
    }
}

pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let m = object(body)?;
    let prompts = match present(&m, "prompt") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => {
            a.iter().map(|p| p.as_str().unwrap_or_default().to_owned()).collect()
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(|t| t.as_u64().is_some()) => {
            return Err(ApiError::invalid("prompt", "Token-id prompts are not supported: send the prompt as text."));
        }
        Some(_) => {
            return Err(ApiError::invalid("prompt", "'prompt' must be a string or a non-empty array of strings."));
        }
        None => return Err(ApiError::invalid("prompt", "You must provide a prompt.")),
    };
    let n = choices(&m)?;
    if prompts.len() * n > MAX_CHOICES {
        return Err(ApiError::invalid(
            "prompt",
            format!("{} prompts × n = {n} asks for more than {MAX_CHOICES} completions at once.", prompts.len()),
        ));
    }
    let mut generation = generation(&m, &["max_tokens"])?;
    // OpenAI's completions endpoint writes 16 tokens unless told otherwise.
    generation.max_tokens.get_or_insert(16);
    generation.logprobs = count(&m, "logprobs", 5)?;
    Ok(CompletionRequest { prompts, echo: boolean(&m, "echo")?, n, generation })
}

pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let m = object(body)?;
    let messages = match present(&m, "messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(ApiError::invalid("messages", "'messages' must not be empty.")),
        Some(_) => return Err(ApiError::invalid("messages", "'messages' must be an array of messages.")),
        None => return Err(ApiError::invalid("messages", "You must provide messages.")),
    };
    let mut parsed = Vec::with_capacity(messages.len());
    for (i, msg) in messages.iter().enumerate() {
        let param = format!("messages.[{i}]");
        let role = match msg.get("role").and_then(Value::as_str) {
            Some(r @ ("system" | "developer" | "user" | "assistant")) => r.to_owned(),
            Some(r) => return Err(ApiError::invalid(&format!("{param}.role"), format!("Unsupported role {r:?}."))),
            None => return Err(ApiError::invalid(&format!("{param}.role"), "Each message needs a 'role'.")),
        };
        let content = match msg.get("content") {
            Some(Value::String(s)) => s.clone(),
            // Content parts: text parts are joined; anything else is refused.
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                &format!("{param}.content"),
                                "Only text content parts are supported.",
                            ));
                        }
                    }
                }
                text
            }
            Some(Value::Null) if role == "assistant" => String::new(),
            _ => return Err(ApiError::invalid(&format!("{param}.content"), "Each message needs string 'content'.")),
        };
        parsed.push(Message { role, content });
    }
    let mut generation = generation(&m, &["max_tokens", "max_completion_tokens"])?;
    let top = count(&m, "top_logprobs", 20)?;
    generation.logprobs = match (boolean(&m, "logprobs")?, top) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ApiError::invalid("top_logprobs", "'top_logprobs' needs 'logprobs' set to true."));
        }
    };
    Ok(ChatRequest { messages: parsed, n: choices(&m)?, generation })
}

/// The text a chat turns into for a base language model: one line-led turn per message, then
/// the assistant's cue. Generation stops where the model starts the user's next turn.
pub fn chat_prompt(messages: &[Message]) -> String {
    let mut prompt = String::new();
    for m in messages {
        let who = match m.role.as_str() {
            "system" | "developer" => "System",
            "assistant" => "Assistant",
            _ => "User",
        };
        prompt.push_str(&format!("{who}: {}\n", m.content));
    }
    prompt.push_str("Assistant:");
    prompt
}

/// Where a chat reply ends unless the request says otherwise.
pub const CHAT_STOP: &str = "\nUser:";

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_parameters_are_named() {
        let cases: &[(&str, Option<&str>)] = &[
            ("{", None),
            ("[1]", None),
            (r#"{"prompt":"x"}"#, Some("model")),
            (r#"{"model":"m","prompt":"x","max_tokens":-1}"#, Some("max_tokens")),
            (r#"{"model":"m","prompt":"x","max_tokens":0}"#, Some("max_tokens")),
            (r#"{"model":"m","prompt":"x","max_tokens":1e30}"#, Some("max_tokens")),
            (r#"{"model":"m","prompt":"x","temperature":3}"#, Some("temperature")),
            (r#"{"model":"m","prompt":"x","temperature":"hot"}"#, Some("temperature")),
            (r#"{"model":"m","prompt":"x","top_p":0}"#, Some("top_p")),
            (r#"{"model":"m","prompt":"x","n":0}"#, Some("n")),
            (r#"{"model":"m","prompt":"x","n":17}"#, Some("n")),
            (r#"{"model":"m","prompt":["a","b","c","d","e"],"n":4}"#, Some("prompt")),
            (r#"{"model":"m","prompt":[1,2,3]}"#, Some("prompt")),
            (r#"{"model":"m","prompt":[]}"#, Some("prompt")),
            (r#"{"model":"m","prompt":"x","stop":["a","b","c","d","e"]}"#, Some("stop")),
            (r#"{"model":"m","prompt":"x","stream":"yes"}"#, Some("stream")),
            (r#"{"model":"m"}"#, Some("prompt")),
            (r#"{"model":"m","prompt":"x","logprobs":6}"#, Some("logprobs")),
            (r#"{"model":"m","prompt":"x","logprobs":true}"#, Some("logprobs")),
            (r#"{"model":"m","prompt":"x","presence_penalty":2.5}"#, Some("presence_penalty")),
            (r#"{"model":"m","prompt":"x","frequency_penalty":"high"}"#, Some("frequency_penalty")),
            (r#"{"model":"m","prompt":"x","logit_bias":{"50256":-101}}"#, Some("logit_bias")),
            (r#"{"model":"m","prompt":"x","logit_bias":{"a":1}}"#, Some("logit_bias")),
            (r#"{"model":"m","prompt":"x","logit_bias":[1]}"#, Some("logit_bias")),
            (r#"{"model":"m","prompt":"x","best_of":3}"#, Some("best_of")),
            (r#"{"model":"m","prompt":"x","suffix":"end"}"#, Some("suffix")),
        ];
        for (body, param) in cases {
            let e = parse_completion(body.as_bytes()).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), *param, "{body}");
        }
        for (body, param) in [
            (r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"top_logprobs":2}"#, "top_logprobs"),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"logprobs":true,"top_logprobs":21}"#,
                "top_logprobs",
            ),
        ] {
            let e = parse_chat(body.as_bytes()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{body}");
        }
        let chat = |b: &str| parse_chat(b.as_bytes()).unwrap().generation.logprobs;
        assert_eq!(
            chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"logprobs":true,"top_logprobs":2}"#),
            Some(2)
        );
        assert_eq!(chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"logprobs":true}"#), Some(0));
        assert_eq!(
            parse_completion(br#"{"model":"m","prompt":"x","logprobs":3}"#).unwrap().generation.logprobs,
            Some(3)
        );
        for (body, param) in [
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_object"}}"#,
                "response_format",
            ),
            (r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]}"#, "tools"),
        ] {
            let e = parse_chat(body.as_bytes()).unwrap_err();
            assert_eq!(
                (e.status, e.param.as_deref(), e.code),
                (400, Some(param), Some("unsupported_parameter")),
                "{body}"
            );
        }
        // OpenAI's defaults ask for nothing and pass: no penalties, no logprobs, the text format.
        let defaults = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"logprobs":false,"presence_penalty":0,"frequency_penalty":0.0,"logit_bias":{},"response_format":{"type":"text"},"tools":[],"tool_choice":"none","user":"u1","stream_options":{"include_usage":true}}"#;
        assert!(parse_chat(defaults).is_ok());
        assert!(parse_completion(br#"{"model":"m","prompt":"x","best_of":1,"logprobs":null}"#).is_ok());
        let g = parse_completion(br#"{"model":"m","prompt":"x","presence_penalty":0.5,"frequency_penalty":-1,"logit_bias":{"7":-100,"3":2.5}}"#)
            .unwrap()
            .generation;
        assert_eq!((g.presence_penalty, g.frequency_penalty, g.logit_bias), (0.5, -1.0, vec![(3, 2.5), (7, -100.0)]));
        let e = parse_chat(br#"{"model":"m","messages":[{"role":"robot","content":"hi"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages.[0].role"));
        assert!(parse_chat(br#"{"model":"m","messages":[]}"#).is_err());
    }

    #[test]
    fn good_requests_parse_with_openai_defaults() {
        let c = parse_completion(br#"{"model":"m","prompt":"Hello","unknown_field":1}"#).unwrap();
        assert_eq!(
            (c.prompts.as_slice(), c.generation.max_tokens, c.generation.temperature),
            (&["Hello".to_string()][..], Some(16), 1.0)
        );
        let batch = parse_completion(br#"{"model":"m","prompt":["a","b"],"n":3}"#).unwrap();
        assert_eq!((batch.prompts.len(), batch.n), (2, 3));
        let chat = parse_chat(
            br#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"}]}],"max_completion_tokens":5,"stream":true,"stop":"\n"}"#,
        )
        .unwrap();
        assert_eq!(chat.generation.max_tokens, Some(5));
        assert!(chat.generation.stream);
        assert_eq!(chat.generation.stop, vec!["\n".to_string()]);
        assert_eq!(chat_prompt(&chat.messages), "System: Be brief.\nUser: Hi\nAssistant:");
    }

    proptest::proptest! {
        /// Whatever the bytes, parsing answers with a request or a 400, never a panic.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            if let Err(e) = parse_completion(&body) { proptest::prop_assert_eq!(e.status, 400); }
            if let Err(e) = parse_chat(&body) { proptest::prop_assert_eq!(e.status, 400); }
        }

        #[test]
        fn arbitrary_json_never_panics(s in "\\{(\"(model|prompt|messages|max_tokens|stop|n|seed|temperature|top_p|stream)\":(null|-?[0-9]{1,30}(\\.[0-9]+)?|\"[a-z]*\"|\\[[^\\]]{0,20}\\]|true|\\{\\}),?){0,6}\\}") {
            let _ = parse_completion(s.as_bytes());
            let _ = parse_chat(s.as_bytes());
        }
    }
}
