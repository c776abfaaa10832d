//! The node's OpenAI-compatible HTTP API: `GET /v1/models`, `POST /v1/chat/completions`,
//! `POST /v1/completions` (streaming as server-sent events ending in `data: [DONE]`, or
//! whole), authenticated by API key; plus `/metrics` and `/healthz` without a key.

mod error;
mod openai;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;

pub use error::ApiError;
pub use openai::UsageBody;

use crate::model::ModelHandle;
use crate::request::{Event, FinishReason, Generation, GenerationRequest, Prompt, Usage};

/// The models this node serves, by name. Cheap to clone; loading and unloading elsewhere
/// is seen by the API at once.
#[derive(Clone, Debug, Default)]
pub struct ModelSet {
    inner: Arc<RwLock<BTreeMap<String, ModelHandle>>>,
}

impl ModelSet {
    pub fn insert(&self, model: ModelHandle) -> Option<ModelHandle> {
        self.inner
            .write()
            .expect("model set poisoned")
            .insert(model.name().to_string(), model)
    }

    pub fn remove(&self, name: &str) -> Option<ModelHandle> {
        self.inner.write().expect("model set poisoned").remove(name)
    }

    pub fn get(&self, name: &str) -> Option<ModelHandle> {
        self.inner
            .read()
            .expect("model set poisoned")
            .get(name)
            .cloned()
    }

    pub fn all(&self) -> Vec<ModelHandle> {
        self.inner
            .read()
            .expect("model set poisoned")
            .values()
            .cloned()
            .collect()
    }
}

/// API keys accepted as `Authorization: Bearer <key>`.
#[derive(Clone)]
pub struct ApiKeys(Arc<Vec<Vec<u8>>>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

impl ApiKeys {
    /// Refuses an empty list: the API never runs unauthenticated.
    pub fn new(keys: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let keys: Vec<Vec<u8>> = keys
            .into_iter()
            .map(|k| k.trim().as_bytes().to_vec())
            .filter(|k| !k.is_empty())
            .collect();
        if keys.is_empty() {
            return Err("at least one API key is required".into());
        }
        Ok(Self(Arc::new(keys)))
    }

    fn accepts(&self, presented: &[u8]) -> bool {
        // Compare digests in constant time with every key, so timing tells nothing about the
        // keys, not even their length.
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        let presented = sha2::Sha256::digest(presented);
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |ok, k| {
                ok | sha2::Sha256::digest(k)[..].ct_eq(&presented[..])
            })
            .into()
    }
}

#[derive(Clone, Debug)]
pub struct ApiState {
    pub models: ModelSet,
    pub keys: ApiKeys,
    pub registry: Arc<Registry>,
    /// Models still loading; `/healthz` answers 503 until none is.
    pub loading: Arc<AtomicUsize>,
    /// Set while the node drains: new generations are refused (503) so clients go
    /// elsewhere, and `/healthz` answers 503; requests already running finish.
    pub draining: Arc<AtomicBool>,
}

pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(v1)
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_telling_closed(listener, state, shutdown, ()).await
}

/// [`serve`], dropping `closed` once the listener is closed (see
/// [`steward_proto::http::serve_telling_closed`]).
pub async fn serve_telling_closed(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    closed: impl Send + 'static,
) -> std::io::Result<()> {
    // With a deadline for every request head and TCP_NODELAY (streamed tokens are small
    // writes that Nagle would hold back).
    steward_proto::http::serve_telling_closed(
        listener,
        router(state),
        steward_proto::http::HEAD_TIMEOUT,
        shutdown,
        closed,
    )
    .await
}

async fn authenticate(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        None => ApiError::unauthorized("missing API key: send it as `Authorization: Bearer <key>`")
            .into_response(),
        Some(key) if !state.keys.accepts(key.as_bytes()) => {
            ApiError::unauthorized("the API key is not valid for this node").into_response()
        }
        Some(_) => next.run(request).await,
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn list_models(State(state): State<ApiState>) -> impl IntoResponse {
    let created = unix_now();
    axum::Json(openai::ModelList {
        object: "list",
        data: state
            .models
            .all()
            .into_iter()
            .map(|m| openai::ModelEntry {
                id: m.name().to_string(),
                object: "model",
                created,
                owned_by: "steward",
            })
            .collect(),
    })
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// 200 once no model is loading, else 503; lists the models being served.
async fn healthz(State(state): State<ApiState>) -> impl IntoResponse {
    let models: Vec<String> = state
        .models
        .all()
        .iter()
        .map(|m| m.name().to_string())
        .collect();
    let loading = state.loading.load(Ordering::Relaxed);
    let draining = state.draining.load(Ordering::Relaxed);
    let (status, text) = if draining {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if loading > 0 {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    } else {
        (StatusCode::OK, "ok")
    };
    let body = json!({ "status": text, "models": models });
    (status, axum::Json(body))
}

/// Parses a request body; a field of the wrong type is named in the message and in `param`.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let mut json = serde_json::Deserializer::from_slice(body);
    let error = match serde_path_to_error::deserialize(&mut json) {
        Ok(request) => {
            return json
                .end()
                .map(|()| request)
                .map_err(|e| ApiError::invalid_request(format!("invalid request body: {e}")));
        }
        Err(e) => e,
    };
    // serde loses the path inside a `#[serde(flatten)]` struct (the sampling parameters
    // every endpoint shares); parsed on their own, they say which field was wrong.
    let field = Some(error.path().to_string())
        .filter(|path| path != ".")
        .or_else(|| common_params_error(body));
    let inner = error.into_inner();
    Err(match field {
        Some(field) => {
            ApiError::invalid_request(format!("invalid request body: `{field}`: {inner}"))
                .with_param(field)
        }
        None => ApiError::invalid_request(format!("invalid request body: {inner}")),
    })
}

/// The path of the sampling parameter that does not parse, if one does not.
fn common_params_error(body: &Bytes) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    serde_path_to_error::deserialize::<_, openai::CommonParams>(value)
        .err()
        .map(|e| e.path().to_string())
        .filter(|path| path != ".")
}

/// Which endpoint a generation answers, for the shape of its responses.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

/// The 503 a draining node answers new generations with.
fn refuse_if_draining(state: &ApiState) -> Result<(), ApiError> {
    if state.draining.load(Ordering::Relaxed) {
        return Err(ApiError::unavailable(
            "this node is draining and takes no new requests; send it to another node",
        ));
    }
    Ok(())
}

async fn chat_completions(State(state): State<ApiState>, body: Bytes) -> Response {
    let result = async {
        refuse_if_draining(&state)?;
        let req: openai::ChatCompletionRequest = parse(&body)?;
        let prompt = Prompt::Chat(req.messages()?);
        let generation = req.params.to_request(prompt)?;
        start(&state, &req.model, generation, &req.params, Kind::Chat).await
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(state): State<ApiState>, body: Bytes) -> Response {
    let result = async {
        refuse_if_draining(&state)?;
        let req: openai::CompletionRequest = parse(&body)?;
        let prompt = Prompt::Text(req.prompt()?);
        let generation = req.params.to_request(prompt)?;
        start(
            &state,
            &req.model,
            generation,
            &req.params,
            Kind::Completion,
        )
        .await
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

/// Submits the request and waits until the engine accepts or refuses it, so that a bad
/// request gets its 4xx before any streaming starts.
async fn start(
    state: &ApiState,
    model_name: &str,
    request: GenerationRequest,
    params: &openai::CommonParams,
    kind: Kind,
) -> Result<Response, ApiError> {
    let model = state
        .models
        .get(model_name)
        .ok_or_else(|| ApiError::model_not_found(model_name))?;
    let mut generation = model.submit(request);
    match generation.recv().await {
        Some(Event::Accepted { .. }) => {}
        Some(Event::Failed(e)) => return Err(e.into()),
        Some(other) => {
            return Err(ApiError::unavailable(format!(
                "unexpected engine event {other:?}"
            )));
        }
        None => {
            return Err(ApiError::unavailable(format!(
                "model `{model_name}` is unloading"
            )));
        }
    }
    let meta = Meta {
        id: format!(
            "{}-{}",
            match kind {
                Kind::Chat => "chatcmpl",
                Kind::Completion => "cmpl",
            },
            uuid::Uuid::new_v4().simple()
        ),
        created: unix_now(),
        model: model_name.to_string(),
        kind,
    };
    if params.stream {
        Ok(stream_response(meta, generation, params.include_usage()).into_response())
    } else {
        whole_response(meta, generation).await
    }
}

struct Meta {
    id: String,
    created: i64,
    model: String,
    kind: Kind,
}

async fn whole_response(meta: Meta, mut generation: Generation) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match generation.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Finished { reason, usage }) => {
                let usage = UsageBody::from(usage);
                let body = match meta.kind {
                    Kind::Chat => json!({
                        "id": meta.id, "object": "chat.completion", "created": meta.created,
                        "model": meta.model,
                        "choices": [{
                            "index": 0,
                            "message": { "role": "assistant", "content": text },
                            "logprobs": null,
                            "finish_reason": reason.as_str(),
                        }],
                        "usage": usage,
                    }),
                    Kind::Completion => json!({
                        "id": meta.id, "object": "text_completion", "created": meta.created,
                        "model": meta.model,
                        "choices": [{
                            "index": 0, "text": text, "logprobs": null,
                            "finish_reason": reason.as_str(),
                        }],
                        "usage": usage,
                    }),
                };
                return Ok(axum::Json(body).into_response());
            }
            Some(Event::Failed(e)) => return Err(e.into()),
            Some(Event::Accepted { .. }) => {}
            None => return Err(ApiError::unavailable("the model stopped while generating")),
        }
    }
}

fn chunk(meta: &Meta, content: Option<&str>, reason: Option<FinishReason>, first: bool) -> String {
    let reason = reason.map(FinishReason::as_str);
    let v = match meta.kind {
        Kind::Chat => {
            let mut delta = serde_json::Map::new();
            if first {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(c) = content {
                delta.insert("content".into(), json!(c));
            }
            json!({
                "id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                "model": meta.model,
                "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": reason }],
            })
        }
        Kind::Completion => json!({
            "id": meta.id, "object": "text_completion", "created": meta.created,
            "model": meta.model,
            "choices": [{ "index": 0, "text": content.unwrap_or(""), "logprobs": null, "finish_reason": reason }],
        }),
    };
    v.to_string()
}

fn usage_chunk(meta: &Meta, usage: Usage) -> String {
    let object = match meta.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Completion => "text_completion",
    };
    json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "choices": [], "usage": UsageBody::from(usage),
    })
    .to_string()
}

/// The SSE body. Dropping it (the client went away) drops `generation`, which cancels the
/// request in the engine.
fn stream_response(
    meta: Meta,
    generation: Generation,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    struct S {
        meta: Meta,
        generation: Generation,
        include_usage: bool,
        first: bool,
        pending: std::collections::VecDeque<String>,
        done: bool,
    }
    let state = S {
        meta,
        generation,
        include_usage,
        first: true,
        pending: Default::default(),
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.pending.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), s));
            }
            if s.done {
                return None;
            }
            match s.generation.recv().await {
                Some(Event::Text(t)) => {
                    let first = std::mem::replace(&mut s.first, false);
                    s.pending.push_back(chunk(&s.meta, Some(&t), None, first));
                }
                Some(Event::Finished { reason, usage }) => {
                    let first = std::mem::replace(&mut s.first, false);
                    s.pending
                        .push_back(chunk(&s.meta, None, Some(reason), first));
                    if s.include_usage {
                        s.pending.push_back(usage_chunk(&s.meta, usage));
                    }
                    s.pending.push_back("[DONE]".into());
                    s.done = true;
                }
                Some(Event::Failed(e)) => {
                    let e = ApiError::from(e);
                    s.pending
                        .push_back(serde_json::to_string(&e.body()).expect("serialisable"));
                    s.pending.push_back("[DONE]".into());
                    s.done = true;
                }
                Some(Event::Accepted { .. }) => {}
                None => {
                    let e = ApiError::unavailable("the model stopped while generating");
                    s.pending
                        .push_back(serde_json::to_string(&e.body()).expect("serialisable"));
                    s.done = true;
                }
            }
        }
    });
    Sse::new(stream)
}
