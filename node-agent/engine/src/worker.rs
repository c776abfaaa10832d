//! The inference thread: owns the llama.cpp model and context, takes requests over a
//! channel and runs continuous batching. Each step decodes one batch holding the next token
//! of every generating request plus prompt chunks of newly admitted ones, so a new request
//! joins the running batch instead of waiting for it to finish.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use steward_artifact::gguf::GgufFacts;
use tokio::sync::mpsc;

use crate::config::ModelConfig;
use crate::gpu::layers_to_offload;
use crate::metrics::{ModelMetrics, Outcome};
use crate::model::{ChatTemplateSource, Command, LoadError, ModelInfo, backend};
use crate::request::{
    ChatMessage, Event, FinishReason, GenerationRequest, Prompt, RequestError, Usage,
};
use crate::sampling::Sampler;
use crate::text::{Released, TextStream};

/// llama.cpp's default micro-batch: the most tokens computed in one graph evaluation.
const UBATCH_TOKENS: u32 = 512;

pub(crate) fn run(
    config: ModelConfig,
    facts: GgufFacts,
    metrics: ModelMetrics,
    commands: std_mpsc::Receiver<Command>,
    ready: std_mpsc::Sender<Result<ModelInfo, LoadError>>,
) {
    let started = Instant::now();
    let backend = match backend() {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let threads = config
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    let n_ctx = config.context_per_slot.saturating_mul(config.slots);
    let gpu_layers = layers_to_offload(
        config.gpu_layers,
        backend.supports_gpu_offload(),
        config.free_vram_bytes,
        &facts,
        u64::from(n_ctx),
    );
    let path = config.path.display().to_string();
    let model = match LlamaModel::load_from_file(
        backend,
        &config.path,
        &LlamaModelParams::default().with_n_gpu_layers(gpu_layers),
    ) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(model = %config.name, error = %e, "llama.cpp refused the model");
            let _ = ready.send(Err(LoadError::Model { path }));
            return;
        }
    };
    let n_batch = config.batch_tokens.min(n_ctx);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_batch)
        .with_n_ubatch(UBATCH_TOKENS.min(n_batch))
        .with_n_seq_max(config.slots)
        .with_kv_unified(config.kv_unified)
        .with_n_threads(threads as i32)
        .with_n_threads_batch(threads as i32);
    let ctx = match model.new_context(backend, params) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(LoadError::Context {
                model: config.name.clone(),
                n_ctx,
                reason: e.to_string(),
            }));
            return;
        }
    };
    let (template, template_source) = resolve_chat_template(&model, &facts, &config, &config.name);
    let info = ModelInfo {
        name: config.name.clone(),
        facts,
        slots: config.slots,
        context_per_slot: config.context_per_slot,
        threads,
        gpu_layers,
        chat_template: template_source,
        load_seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        model = %info.name, slots = info.slots, context_per_slot = info.context_per_slot,
        threads, gpu_layers, chat_template = ?info.chat_template,
        seconds = info.load_seconds, "model loaded"
    );
    let mut worker = Worker {
        name: config.name,
        model: &model,
        ctx,
        template,
        batch: LlamaBatch::new(n_batch as usize, 1),
        n_batch: n_batch as usize,
        context_per_slot: config.context_per_slot,
        slots: (0..config.slots).map(|_| None).collect(),
        cached: (0..config.slots).map(|_| Vec::new()).collect(),
        queue: VecDeque::new(),
        metrics,
    };
    if ready.send(Ok(info)).is_err() {
        return;
    }
    worker.serve(&commands);
    // `worker` (the context) drops before `model`.
}

/// Picks the chat template: the configured one, else the GGUF's, else llama.cpp's built-in
/// one for the architecture; checks it renders a conversation.
fn resolve_chat_template(
    model: &LlamaModel,
    facts: &GgufFacts,
    config: &ModelConfig,
    name: &str,
) -> (Result<LlamaChatTemplate, RequestError>, ChatTemplateSource) {
    let unusable = |reason: String| {
        let error = RequestError::ChatTemplate {
            model: name.to_string(),
            reason: reason.clone(),
        };
        (Err(error), ChatTemplateSource::Unavailable(reason))
    };
    let (template, source) = if let Some(configured) = &config.chat_template {
        match LlamaChatTemplate::new(configured) {
            Ok(t) => (t, ChatTemplateSource::Configured(configured.clone())),
            Err(_) => return unusable("the configured template contains a NUL byte".into()),
        }
    } else if let Ok(t) = model.chat_template(None) {
        (t, ChatTemplateSource::Gguf)
    } else if let Some(built_in) = built_in_template(&facts.architecture) {
        match LlamaChatTemplate::new(built_in) {
            Ok(t) => (t, ChatTemplateSource::BuiltIn(built_in)),
            Err(_) => return unusable(format!("bad built-in template name `{built_in}`")),
        }
    } else {
        return (
            Err(RequestError::NoChatTemplate {
                model: name.to_string(),
            }),
            ChatTemplateSource::Unavailable(
                "the GGUF has no tokenizer.chat_template and none is configured".into(),
            ),
        );
    };
    let probe = ["system", "user", "assistant", "user"]
        .map(|role| LlamaChatMessage::new(role.into(), "probe".into()).expect("no NUL"));
    match model.apply_chat_template(&template, &probe, true) {
        Ok(_) => (Ok(template), source),
        Err(e) => unusable(format!(
            "llama.cpp does not support the chat template ({source:?}): {e}"
        )),
    }
}

/// llama.cpp's built-in template for architectures whose GGUFs are often published without
/// `tokenizer.chat_template` but whose chat format is unambiguous.
fn built_in_template(architecture: &str) -> Option<&'static str> {
    match architecture {
        "gemma" | "gemma2" | "gemma3" | "gemma3n" => Some("gemma"),
        _ => None,
    }
}

/// A validated request waiting for a slot.
struct Pending {
    tokens: Vec<LlamaToken>,
    request: Box<GenerationRequest>,
    max_tokens: u32,
    events: mpsc::UnboundedSender<Event>,
    arrived: Instant,
}

/// A request in a slot.
struct Active {
    seq: i32,
    prompt: Vec<LlamaToken>,
    /// Prompt tokens whose KV was kept from the slot's previous request.
    cached_tokens: u32,
    prefilled: usize,
    /// Next position in the sequence.
    pos: i32,
    /// The last sampled token, to be decoded in the next step.
    next: Option<LlamaToken>,
    /// Generated tokens already decoded into the KV cache.
    fed: Vec<LlamaToken>,
    generated: u32,
    max_tokens: u32,
    ignore_eos: bool,
    sampler: Sampler,
    text: TextStream,
    events: mpsc::UnboundedSender<Event>,
    arrived: Instant,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    /// Where this request's logits are in the batch being decoded.
    logits_at: Option<i32>,
}

struct Worker<'m> {
    name: String,
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    /// The chat template, or why chat requests are refused.
    template: Result<LlamaChatTemplate, RequestError>,
    batch: LlamaBatch<'static>,
    n_batch: usize,
    context_per_slot: u32,
    slots: Vec<Option<Active>>,
    /// Per idle slot, the tokens whose KV is still in its sequence (the last request's
    /// prompt and output), so a request sharing that prefix (a conversation's next turn, a
    /// repeated system prompt) skips recomputing it.
    cached: Vec<Vec<LlamaToken>>,
    queue: VecDeque<Pending>,
    metrics: ModelMetrics,
}

enum Step {
    Continue,
    Shutdown,
}

impl Worker<'_> {
    fn serve(&mut self, commands: &std_mpsc::Receiver<Command>) {
        loop {
            if self.is_idle() {
                match commands.recv() {
                    Ok(c) => {
                        if let Step::Shutdown = self.handle(c) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            let mut shutdown = false;
            while let Ok(c) = commands.try_recv() {
                if let Step::Shutdown = self.handle(c) {
                    shutdown = true;
                    break;
                }
            }
            if shutdown {
                break;
            }
            self.drop_cancelled();
            self.admit();
            self.metrics.set_load(self.queue.len(), self.busy());
            if self.busy() > 0 {
                self.step();
            }
        }
        self.fail_all(RequestError::Unloading(self.name.clone()));
    }

    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.busy() == 0
    }

    fn busy(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    fn handle(&mut self, command: Command) -> Step {
        match command {
            Command::Shutdown => Step::Shutdown,
            Command::Generate {
                request,
                events,
                arrived,
            } => {
                match self.validate(&request) {
                    Ok((tokens, max_tokens)) => {
                        let accepted = Event::Accepted {
                            prompt_tokens: tokens.len() as u32,
                        };
                        if events.send(accepted).is_ok() {
                            self.queue.push_back(Pending {
                                tokens,
                                request,
                                max_tokens,
                                events,
                                arrived,
                            });
                        } else {
                            self.metrics.request_finished(Outcome::Cancelled);
                        }
                    }
                    Err(e) => {
                        self.metrics.request_finished(Outcome::Rejected);
                        let _ = events.send(Event::Failed(e));
                    }
                }
                Step::Continue
            }
        }
    }

    /// Renders and tokenizes the prompt and checks that the request fits a slot's context.
    fn validate(
        &self,
        request: &GenerationRequest,
    ) -> Result<(Vec<LlamaToken>, u32), RequestError> {
        request.sampling.validate()?;
        let text = match &request.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(messages) => self.render_chat(messages)?,
        };
        if text.is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        let tokens = self.model.vocab().tokenize(text.as_bytes(), true, true);
        let prompt_tokens = tokens.len() as u32;
        let context = self.context_per_slot;
        if prompt_tokens >= context {
            return Err(RequestError::PromptTooLong {
                prompt_tokens,
                context,
            });
        }
        let room = context - prompt_tokens;
        let max_tokens = match request.max_tokens {
            Some(0) => {
                return Err(RequestError::InvalidParameter {
                    name: "max_tokens",
                    why: "must be at least 1",
                });
            }
            Some(m) if m > room => {
                return Err(RequestError::ContextExceeded {
                    prompt_tokens,
                    max_tokens: m,
                    context,
                });
            }
            Some(m) => m,
            None => room,
        };
        Ok((tokens, max_tokens))
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, RequestError> {
        let template = self.template.as_ref().map_err(Clone::clone)?;
        if messages.is_empty() {
            return Err(RequestError::InvalidParameter {
                name: "messages",
                why: "must hold at least one message",
            });
        }
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| RequestError::InvalidParameter {
                name: "messages",
                why: "must not contain NUL characters",
            })?;
        self.model
            .apply_chat_template(template, &chat, true)
            .map_err(|e| RequestError::ChatTemplate {
                model: self.name.clone(),
                reason: e.to_string(),
            })
    }

    fn drop_cancelled(&mut self) {
        let mut cancelled = 0;
        self.queue.retain(|p| {
            let open = !p.events.is_closed();
            cancelled += u32::from(!open);
            open
        });
        for seq in 0..self.slots.len() {
            if self.slots[seq]
                .as_ref()
                .is_some_and(|a| a.events.is_closed())
            {
                self.free(seq);
                cancelled += 1;
            }
        }
        if cancelled > 0 {
            // Gauges first, so whoever sees the cancellation counted also sees the slot free.
            self.metrics.set_load(self.queue.len(), self.busy());
        }
        for _ in 0..cancelled {
            self.metrics.request_finished(Outcome::Cancelled);
        }
    }

    /// Moves queued requests into free slots, each into the slot whose cached tokens share
    /// the longest prefix with its prompt.
    fn admit(&mut self) {
        let n_vocab = self.model.n_vocab();
        while let Some(front) = self.queue.front() {
            let best = (0..self.slots.len())
                .filter(|&s| self.slots[s].is_none())
                .map(|s| {
                    (
                        s,
                        common_prefix(&self.cached[s], &front.tokens),
                        self.cached[s].is_empty(),
                    )
                })
                .max_by_key(|&(_, common, empty)| (common, empty));
            let Some((seq, common, _)) = best else {
                break;
            };
            let p = self.queue.pop_front().expect("front exists");
            // The last prompt token is always decoded again: its logits give the first token.
            let keep = if p.request.cache_prompt {
                common.min(p.tokens.len() - 1)
            } else {
                0
            };
            let reused = self.reuse_prefix(seq, keep);
            let mut sampler = Sampler::new(&p.request.sampling, n_vocab);
            sampler.accept_prompt(&p.tokens);
            self.slots[seq] = Some(Active {
                seq: seq as i32,
                prompt: p.tokens,
                cached_tokens: reused as u32,
                prefilled: reused,
                pos: reused as i32,
                next: None,
                fed: Vec::new(),
                generated: 0,
                max_tokens: p.max_tokens,
                ignore_eos: p.request.ignore_eos,
                sampler,
                text: TextStream::new(p.request.stop.clone()),
                events: p.events,
                arrived: p.arrived,
                first_token_at: None,
                last_token_at: None,
                logits_at: None,
            });
        }
    }

    /// Keeps the first `n` cached positions of sequence `seq` and drops the rest; returns how
    /// many were kept (0 when the cache cannot keep a prefix, e.g. a sliding-window cache
    /// that has already evicted its start).
    fn reuse_prefix(&mut self, seq: usize, n: usize) -> usize {
        let id = seq as i32;
        if n == 0 || self.ctx.kv_cache_seq_pos_min(id) > 0 {
            self.clear_sequence(id);
            return 0;
        }
        match self.ctx.kv_cache_seq_rm(id, Some(n as u32), None) {
            Ok(()) => {
                self.cached[seq].truncate(n);
                n
            }
            Err(_) => {
                self.clear_sequence(id);
                0
            }
        }
    }

    /// One decode: the next token of every generating request, then prompt chunks.
    fn step(&mut self) {
        self.batch.clear();
        let mut budget = self.n_batch;
        let mut prompt_tokens = 0u64;
        // Generating requests first: one token each keeps their latency steady.
        for active in self.slots.iter_mut().flatten() {
            active.logits_at = None;
            if let Some(token) = active.next {
                self.batch
                    .add(token, active.pos, &[active.seq], true)
                    .expect("the batch holds a token per slot");
                active.fed.push(token);
                active.logits_at = Some(self.batch.n_tokens() - 1);
                active.pos += 1;
                budget -= 1;
            }
        }
        for active in self.slots.iter_mut().flatten() {
            if active.next.is_some() || active.prefilled == active.prompt.len() || budget == 0 {
                continue;
            }
            let take = (active.prompt.len() - active.prefilled).min(budget);
            let end = active.prefilled + take;
            for i in active.prefilled..end {
                let last = i + 1 == active.prompt.len();
                self.batch
                    .add(active.prompt[i], active.pos, &[active.seq], last)
                    .expect("the batch has room for the budget");
                active.pos += 1;
            }
            if end == active.prompt.len() {
                active.logits_at = Some(self.batch.n_tokens() - 1);
            }
            active.prefilled = end;
            budget -= take;
            prompt_tokens += take as u64;
        }
        if self.batch.n_tokens() == 0 {
            return;
        }
        if let Err(e) = self.ctx.decode(&mut self.batch) {
            tracing::error!(model = %self.name, error = %e, "llama.cpp decode failed");
            self.fail_all(RequestError::Inference(e.to_string()));
            return;
        }
        let now = Instant::now();
        let mut generated = 0u64;
        let mut finished = Vec::new();
        for seq in 0..self.slots.len() {
            let Some(active) = self.slots[seq].as_mut() else {
                continue;
            };
            let Some(idx) = active.logits_at else {
                continue;
            };
            let token = active.sampler.sample(&self.ctx, idx);
            generated += 1;
            active.generated += 1;
            if active.first_token_at.is_none() {
                active.first_token_at = Some(now);
                self.metrics.first_token(now - active.arrived);
            }
            active.last_token_at = Some(now);
            let vocab = self.model.vocab();
            let finish = if vocab.is_eog(token) && !active.ignore_eos {
                Some(FinishReason::Stop)
            } else {
                let piece = vocab.token_to_piece(token, false, None);
                match active.text.push(&piece) {
                    Released::Text(t) => {
                        if !t.is_empty() && active.events.send(Event::Text(t)).is_err() {
                            // The client went away; freed at the next step.
                        }
                        (active.generated >= active.max_tokens).then_some(FinishReason::Length)
                    }
                    Released::Stopped(t) => {
                        if !t.is_empty() {
                            let _ = active.events.send(Event::Text(t));
                        }
                        Some(FinishReason::Stop)
                    }
                }
            };
            match finish {
                Some(reason) => finished.push((seq, reason)),
                None => active.next = Some(token),
            }
        }
        // Count first, so that a caller who sees `Finished` also sees its tokens counted.
        self.metrics.tokens(prompt_tokens, generated);
        for (seq, reason) in finished {
            self.finish(seq, reason);
        }
    }

    fn finish(&mut self, seq: usize, reason: FinishReason) {
        let Some(mut active) = self.slots[seq].take() else {
            return;
        };
        // Text held back as a possible stop-string start is the answer's end after all.
        let rest = active.text.finish();
        if !rest.is_empty() {
            let _ = active.events.send(Event::Text(rest));
        }
        let usage = Usage {
            prompt_tokens: active.prompt.len() as u32,
            completion_tokens: active.generated,
            cached_tokens: active.cached_tokens,
        };
        if let (Some(first), Some(last)) = (active.first_token_at, active.last_token_at)
            && active.generated > 1
        {
            self.metrics
                .time_per_output_token((last - first) / (active.generated - 1));
        }
        self.metrics.request_finished(Outcome::Completed);
        self.metrics.set_load(self.queue.len(), self.busy());
        let _ = active.events.send(Event::Finished { reason, usage });
        // Keep the sequence's KV for a next request with the same prefix.
        let mut history = std::mem::take(&mut active.prompt);
        history.extend_from_slice(&active.fed);
        self.cached[seq] = history;
    }

    fn free(&mut self, seq: usize) {
        if let Some(active) = self.slots[seq].take() {
            self.clear_sequence(active.seq);
        }
    }

    fn clear_sequence(&mut self, seq: i32) {
        self.cached[seq as usize].clear();
        if let Err(e) = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None) {
            tracing::error!(model = %self.name, seq, error = %e, "could not clear a KV sequence");
        }
    }

    fn fail_all(&mut self, error: RequestError) {
        for seq in 0..self.slots.len() {
            if let Some(active) = self.slots[seq].take() {
                let _ = active.events.send(Event::Failed(error.clone()));
                self.metrics.request_finished(Outcome::Failed);
                self.clear_sequence(active.seq);
            }
        }
        if matches!(error, RequestError::Unloading(_)) {
            for p in self.queue.drain(..) {
                let _ = p.events.send(Event::Failed(error.clone()));
                self.metrics.request_finished(Outcome::Failed);
            }
        }
        self.metrics.set_load(self.queue.len(), 0);
    }
}

/// Length of the longest common prefix.
fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
