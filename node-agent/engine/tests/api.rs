//! The node's OpenAI-compatible API over real HTTP, on tiny models, plus the official
//! `openai` Python client and the real gemma 270M model.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Loaded, gemma_path, load_tiny, venv_python};
use futures::StreamExt;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use steward_engine::api::{ApiKeys, ApiState, ModelSet};
use steward_engine::metrics::EngineMetrics;
use steward_engine::tiny_model::TinyModel;
use steward_engine::{ModelConfig, ModelHandle};

const KEY: &str = "sk-test-key";

struct Server {
    addr: SocketAddr,
    model: ModelHandle,
    _loaded: Option<Loaded>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn serve(model: ModelHandle, registry: Registry, loaded: Option<Loaded>) -> Server {
    let models = ModelSet::default();
    models.insert(model.clone());
    let state = ApiState {
        models,
        keys: ApiKeys::new([KEY.to_string(), "sk-second".to_string()]).unwrap(),
        registry: Arc::new(registry),
        loading: Arc::default(),
        draining: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(steward_engine::api::serve(listener, state, async move {
        let _ = rx.await;
    }));
    Server {
        addr,
        model,
        _loaded: loaded,
        _shutdown: tx,
    }
}

async fn tiny_server(slots: u32, ctx: u32) -> Server {
    let mut l = load_tiny(TinyModel::default(), slots, ctx);
    let registry = std::mem::take(&mut l.registry);
    serve(l.model.clone(), registry, Some(l)).await
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(s.url(path))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn assert_openai_error(body: &Value, kind: &str) -> String {
    let e = &body["error"];
    assert_eq!(e["type"], kind, "{body}");
    let message = e["message"].as_str().expect("a message").to_string();
    assert!(!message.is_empty());
    message
}

#[tokio::test]
async fn models_lists_the_loaded_model() {
    let s = tiny_server(1, 256).await;
    let r = client()
        .get(s.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], "tiny");
}

#[tokio::test]
async fn requests_without_a_valid_key_are_refused_in_openai_shape() {
    let s = tiny_server(1, 256).await;
    let none = client().get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let body: Value = none.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let wrong = client()
        .post(s.url("/v1/completions"))
        .bearer_auth("sk-wrong")
        .json(&json!({"model": "tiny", "prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    // Any configured key works.
    let second = client()
        .get(s.url("/v1/models"))
        .bearer_auth("sk-second")
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
}

#[tokio::test]
async fn chat_completion_returns_the_answer_and_usage() {
    let s = tiny_server(2, 512).await;
    let (status, body) = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
               "max_tokens": 12, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 12);
    let u = &body["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + 12)
    );
}

#[tokio::test]
async fn completions_accept_a_prompt_and_stop_strings() {
    let s = tiny_server(1, 512).await;
    let (status, body) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "the fleet", "max_tokens": 8, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["choices"][0]["text"].is_string());
    assert_eq!(body["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn usage_counts_cached_prompt_tokens_and_cache_prompt_false_turns_the_cache_off() {
    let s = tiny_server(1, 512).await;
    let prompt = "the fleet signed the model and the node answered";
    let request = |cache_prompt: Option<bool>| {
        let mut body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 4,
                              "temperature": 0, "ignore_eos": true});
        if let Some(c) = cache_prompt {
            body["cache_prompt"] = json!(c);
        }
        body
    };
    let cached = |body: &serde_json::Value| {
        body["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or_else(|| panic!("no cached_tokens in {body}"))
    };
    let (status, first) = post(&s, "/v1/completions", request(None)).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(cached(&first), 0);
    let prompt_tokens = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let (_, again) = post(&s, "/v1/completions", request(None)).await;
    assert_eq!(cached(&again), prompt_tokens - 1);
    let (_, off) = post(&s, "/v1/completions", request(Some(false))).await;
    assert_eq!(cached(&off), 0);
    assert_eq!(off["choices"][0]["text"], first["choices"][0]["text"]);
}

#[tokio::test]
async fn streaming_chat_sends_chunks_usage_and_done() {
    let s = tiny_server(1, 512).await;
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(
            &json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 10, "temperature": 0, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = r.text().await.unwrap();
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*data.last().unwrap(), "[DONE]", "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!content.is_empty());
    let finish = chunks
        .iter()
        .find(|c| c["choices"][0]["finish_reason"].is_string())
        .unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 10);
}

#[tokio::test]
async fn an_unknown_model_is_404_and_a_bad_body_400_naming_the_problem() {
    let s = tiny_server(1, 256).await;
    let (status, body) = post(
        &s,
        "/v1/completions",
        json!({"model": "nope", "prompt": "x"}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    let (status, body) = post(&s, "/v1/chat/completions", json!({"model": "tiny"})).await;
    assert_eq!(status, 400);
    assert!(
        assert_openai_error(&body, "invalid_request_error").contains("messages"),
        "{body}"
    );
    let (status, body) = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": -2}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "temperature", "{body}");
}

#[tokio::test]
async fn a_field_of_the_wrong_type_is_a_400_that_names_the_field() {
    let s = tiny_server(1, 256).await;
    let chat = |extra: Value| {
        let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    // A sampling parameter (a field of the flattened struct both endpoints share).
    let (status, body) = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"cache_prompt": "no"})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "cache_prompt", "{body}");
    assert!(
        assert_openai_error(&body, "invalid_request_error").contains("`cache_prompt`"),
        "{body}"
    );
    let (status, body) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "x", "stop": ["a", 7]}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "stop", "{body}");
    assert!(
        assert_openai_error(&body, "invalid_request_error")
            .contains("expected a string or an array of strings"),
        "{body}"
    );
    // A field of the endpoint's own request.
    let (status, body) = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": 1, "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "messages[0].role", "{body}");
    // Valid parameters still generate.
    let (status, body) = post(&s, "/v1/chat/completions", chat(json!({"max_tokens": 2}))).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_request_that_does_not_fit_the_context_is_a_400_not_a_crash() {
    let s = tiny_server(1, 64).await;
    let (status, body) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "word ".repeat(300), "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    assert!(assert_openai_error(&body, "invalid_request_error").contains("64 tokens"));
    let (status, _) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "ok", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_client_that_goes_away_mid_stream_frees_its_slot() {
    let s = tiny_server(1, 8192).await;
    let r = client()
        .post(s.url("/v1/completions"))
        .bearer_auth(KEY)
        .json(
            &json!({"model": "tiny", "prompt": "go", "max_tokens": 8000, "ignore_eos": true,
                      "temperature": 0, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.model.stats().requests_cancelled == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no cancel: {:?}",
            s.model.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = s.model.stats();
    assert_eq!(stats.busy_slots, 0, "{stats:?}");
    assert!(stats.generated_tokens < 8000);
}

#[tokio::test]
async fn metrics_show_per_model_counters_and_latencies() {
    let s = tiny_server(1, 256).await;
    post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "x", "max_tokens": 5, "ignore_eos": true}),
    )
    .await;
    let text = client()
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "steward_inference_requests_total{model=\"tiny\",outcome=\"completed\"} 1",
        "steward_inference_generated_tokens_total{model=\"tiny\"} 5",
        "steward_inference_time_to_first_token_seconds_count{model=\"tiny\"} 1",
        "steward_inference_time_per_output_token_seconds_count{model=\"tiny\"} 1",
        "steward_inference_slots{model=\"tiny\"} 1",
        "steward_inference_busy_slots{model=\"tiny\"} 0",
        "steward_inference_queue_depth{model=\"tiny\"} 0",
        "steward_inference_generation_tokens_per_second{model=\"tiny\"}",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
}

async fn run_python(script: &str, base_url: &str) -> String {
    let out = tokio::process::Command::new(venv_python())
        .arg("-c")
        .arg(script)
        .env("BASE_URL", base_url)
        .env("API_KEY", KEY)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const OPENAI_CLIENT_SCRIPT: &str = r#"
import os, openai
client = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["API_KEY"])
models = [m.id for m in client.models.list()]
r = client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "hello"}],
                                   max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
print("chat", r.choices[0].finish_reason, r.usage.completion_tokens, len(r.choices[0].message.content) > 0)
parts, finish, usage = [], None, None
for chunk in client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}):
    if chunk.usage: usage = chunk.usage.completion_tokens
    for c in chunk.choices:
        if c.delta.content: parts.append(c.delta.content)
        if c.finish_reason: finish = c.finish_reason
print("stream", finish, usage, "".join(parts) == r.choices[0].message.content)
try:
    client.chat.completions.create(model="absent", messages=[{"role": "user", "content": "x"}])
except openai.NotFoundError as e:
    print("missing", e.status_code)
"#;

#[tokio::test]
async fn the_official_openai_client_chats_and_streams() {
    let s = tiny_server(2, 512).await;
    let out = run_python(OPENAI_CLIENT_SCRIPT, &s.url("/v1")).await;
    assert_eq!(
        out,
        "chat length 6 True\nstream length 6 True\nmissing 404\n"
    );
}

#[tokio::test]
async fn gemma_names_paris_as_the_capital_of_france() {
    let mut registry = Registry::with_prefix("steward");
    let metrics = EngineMetrics::register(&mut registry);
    let config = ModelConfig {
        slots: 2,
        context_per_slot: 1024,
        threads: Some(2),
        ..ModelConfig::new("gemma3-270m", gemma_path())
    };
    let model = tokio::task::spawn_blocking(move || ModelHandle::load(config, &metrics))
        .await
        .unwrap()
        .unwrap();
    let s = serve(model, registry, None).await;
    // The PyPI gemma 3 270M is the pretrained (base) model: it completes text rather than
    // following chat turns, so it is asked the way a base model is.
    let (status, body) = post(
        &s,
        "/v1/completions",
        json!({"model": "gemma3-270m", "temperature": 0, "max_tokens": 16, "stop": ["\n"],
               "prompt": "Question: What is the capital of France?\nAnswer:"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answer = body["choices"][0]["text"].as_str().unwrap();
    assert!(answer.contains("Paris"), "gemma answered {answer:?}");
}
