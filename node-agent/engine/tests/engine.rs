//! The engine against real llama.cpp, on tiny random-weights models.

mod common;

use std::time::Instant;

use common::{collect, load_tiny};
use steward_engine::request::{
    ChatMessage, Event, FinishReason, GenerationRequest, Prompt, RequestError, SamplingParams,
};
use steward_engine::tiny_model::TinyModel;
use steward_engine::{ChatTemplateSource, ModelHandle};

fn text(prompt: &str, max_tokens: u32) -> GenerationRequest {
    GenerationRequest {
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        ..GenerationRequest::new(Prompt::Text(prompt.into()))
    }
}

async fn first_event(model: &ModelHandle, request: GenerationRequest) -> Event {
    model.submit(request).recv().await.expect("an event")
}

#[tokio::test]
async fn a_request_generates_max_tokens_and_reports_usage() {
    let l = load_tiny(TinyModel::default(), 2, 512);
    let out = collect(l.model.submit(text("hello world", 24))).await;
    assert_eq!(out.reason, FinishReason::Length);
    assert_eq!(out.usage.completion_tokens, 24);
    assert!(out.usage.prompt_tokens >= 3, "{:?}", out.usage);
    assert!(!out.text.is_empty());
    let stats = l.model.stats();
    assert_eq!(stats.requests_completed, 1);
    assert_eq!(stats.generated_tokens, 24);
    assert_eq!(stats.prompt_tokens, u64::from(out.usage.prompt_tokens));
    assert!(stats.ttft_p50_seconds > 0.0 && stats.tpot_p50_seconds > 0.0);
}

#[tokio::test]
async fn greedy_output_repeats_and_a_seed_makes_sampling_repeat() {
    let l = load_tiny(TinyModel::default(), 2, 512);
    let a = collect(l.model.submit(text("the fleet", 32))).await.text;
    let b = collect(l.model.submit(text("the fleet", 32))).await.text;
    assert_eq!(a, b);
    let sampled = |seed| GenerationRequest {
        sampling: SamplingParams {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        ..text("the fleet", 48)
    };
    let s1 = collect(l.model.submit(sampled(7))).await.text;
    let s2 = collect(l.model.submit(sampled(7))).await.text;
    let s3 = collect(l.model.submit(sampled(8))).await.text;
    assert_eq!(s1, s2, "the same seed gives the same text");
    assert_ne!(s1, s3, "another seed gives another text");
}

#[tokio::test]
async fn a_new_request_joins_the_running_batch_instead_of_waiting() {
    let l = load_tiny(TinyModel::default(), 2, 4096);
    let mut long = l.model.submit(text("a long answer", 3000));
    // Wait until the long request is generating.
    loop {
        if let Event::Text(_) = long.recv().await.unwrap() {
            break;
        }
    }
    let short = collect(l.model.submit(text("a short one", 8))).await;
    assert_eq!(short.usage.completion_tokens, 8);
    // The long request is still running: the short one did not wait for it.
    let mut long_finished = false;
    while let Ok(event) = long.try_recv() {
        long_finished |= matches!(event, Event::Finished { .. });
    }
    assert!(!long_finished, "the short request waited for the long one");
}

#[tokio::test]
async fn with_one_slot_a_second_request_queues_until_the_first_ends() {
    let l = load_tiny(TinyModel::default(), 1, 1024);
    let mut first = l.model.submit(text("first", 200));
    let second = collect(l.model.submit(text("second", 4))).await;
    assert_eq!(second.usage.completion_tokens, 4);
    // The second request could only take the slot after the first had finished, so the
    // first's whole answer is already waiting in its channel.
    let mut first_usage = None;
    while let Ok(event) = first.try_recv() {
        if let Event::Finished { usage, .. } = event {
            first_usage = Some(usage);
        }
    }
    let first_usage = first_usage.expect("the first request finished before the second");
    assert_eq!(first_usage.completion_tokens, 200);
}

#[tokio::test]
async fn cancelling_a_request_frees_its_slot_at_once() {
    let l = load_tiny(TinyModel::default(), 1, 8192);
    let mut endless = l.model.submit(text("go on", 8000));
    loop {
        if let Event::Text(_) = endless.recv().await.unwrap() {
            break;
        }
    }
    drop(endless);
    // The only slot was taken; the next request is served only if the cancel freed it.
    let started = Instant::now();
    let next = collect(l.model.submit(text("next", 4))).await;
    assert_eq!(next.usage.completion_tokens, 4);
    let stats = l.model.stats();
    assert_eq!(stats.requests_cancelled, 1, "{stats:?}");
    assert!(
        stats.generated_tokens < 8000,
        "the cancelled request kept generating: {} tokens in {:?}",
        stats.generated_tokens,
        started.elapsed()
    );
}

#[tokio::test]
async fn a_prompt_that_does_not_fit_the_context_is_refused_with_the_numbers() {
    let l = load_tiny(TinyModel::default(), 2, 64);
    let long_prompt = "steward ".repeat(200);
    match first_event(&l.model, text(&long_prompt, 4)).await {
        Event::Failed(RequestError::PromptTooLong {
            prompt_tokens,
            context: 64,
        }) => {
            assert!(prompt_tokens > 64)
        }
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
    match first_event(&l.model, text("hello", 100)).await {
        Event::Failed(
            e @ RequestError::ContextExceeded {
                max_tokens: 100,
                context: 64,
                ..
            },
        ) => {
            assert!(e.is_client_error());
            assert!(e.to_string().contains("max_tokens 100"), "{e}");
        }
        other => panic!("expected ContextExceeded, got {other:?}"),
    }
    // The engine is unharmed.
    assert_eq!(
        collect(l.model.submit(text("hello", 8)))
            .await
            .usage
            .completion_tokens,
        8
    );
    assert_eq!(l.model.stats().requests_rejected, 2);
}

#[tokio::test]
async fn out_of_range_sampling_parameters_are_refused_by_name() {
    let l = load_tiny(TinyModel::default(), 1, 128);
    let bad = GenerationRequest {
        sampling: SamplingParams {
            top_p: 1.5,
            ..SamplingParams::default()
        },
        ..text("x", 1)
    };
    match first_event(&l.model, bad).await {
        Event::Failed(RequestError::InvalidParameter { name: "top_p", .. }) => {}
        other => panic!("expected InvalidParameter(top_p), got {other:?}"),
    }
}

#[tokio::test]
async fn a_stop_string_ends_the_answer_before_it() {
    let l = load_tiny(TinyModel::default(), 1, 512);
    let full = collect(l.model.submit(text("the model", 40))).await.text;
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "{full:?}");
    let stop: String = chars[8..11].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let stopped = collect(l.model.submit(GenerationRequest {
        stop: vec![stop.clone()],
        ..text("the model", 40)
    }))
    .await;
    assert_eq!(stopped.reason, FinishReason::Stop);
    assert_eq!(stopped.text, expected, "stop {stop:?} in {full:?}");
}

#[tokio::test]
async fn chat_uses_the_template_in_the_gguf() {
    let l = load_tiny(TinyModel::default(), 1, 512);
    assert_eq!(l.model.info().chat_template, ChatTemplateSource::Gguf);
    let chat = GenerationRequest {
        max_tokens: Some(4),
        ..GenerationRequest::new(Prompt::Chat(vec![ChatMessage {
            role: "user".into(),
            content: "hello".into(),
        }]))
    };
    let out = collect(l.model.submit(chat)).await;
    // `<s>`, `<|im_start|>`, "user", "\n", "hello", `<|im_end|>`, "\n", `<|im_start|>`, ...
    assert!(out.usage.prompt_tokens >= 8, "{:?}", out.usage);
}

#[tokio::test]
async fn chat_with_a_model_without_a_template_is_refused_clearly() {
    let spec = TinyModel {
        chat_template: None,
        ..TinyModel::default()
    };
    let l = load_tiny(spec, 1, 256);
    assert!(matches!(
        l.model.info().chat_template,
        ChatTemplateSource::Unavailable(_)
    ));
    let chat = GenerationRequest::new(Prompt::Chat(vec![ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    }]));
    match first_event(&l.model, chat).await {
        Event::Failed(e @ RequestError::NoChatTemplate { .. }) => {
            assert!(e.to_string().contains("no chat template"), "{e}");
        }
        other => panic!("expected NoChatTemplate, got {other:?}"),
    }
    // Completions still work.
    assert_eq!(
        collect(l.model.submit(text("hi", 3)))
            .await
            .usage
            .completion_tokens,
        3
    );
}

#[tokio::test]
async fn a_file_that_is_not_a_valid_gguf_is_refused_before_llama_cpp_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    let mut bytes = TinyModel::default().to_bytes();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&path, bytes).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = steward_engine::metrics::EngineMetrics::register(&mut registry);
    let err =
        ModelHandle::load(steward_engine::ModelConfig::new("broken", &path), &metrics).unwrap_err();
    assert!(
        matches!(err, steward_engine::LoadError::Preparse { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn unloading_returns_the_memory_of_the_model_and_its_context() {
    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }
    async fn load_use_unload() -> u64 {
        // 8 slots × 8192 tokens: a KV cache of about 67 MB for the tiny model.
        let l = load_tiny(TinyModel::default(), 8, 8192);
        collect(l.model.submit(text("warm up", 4))).await;
        let loaded = rss_bytes();
        l.model.unload();
        loaded
    }
    // The first cycles set up the allocator's arenas; with transparent huge pages they keep
    // a few 2 MiB pages resident, a plateau that later cycles do not raise.
    let mut loaded = 0;
    for _ in 0..3 {
        loaded = load_use_unload().await;
    }
    let baseline = rss_bytes();
    assert!(
        loaded > baseline + (40 << 20),
        "loaded {loaded}, after unload {baseline}"
    );
    for _ in 0..10 {
        load_use_unload().await;
    }
    let after = rss_bytes();
    // Leaking even the 3 MB model file once per cycle would add 30 MB.
    assert!(
        after < baseline + (16 << 20),
        "memory grew over 10 load/unload cycles: {baseline} -> {after} bytes"
    );
}

#[tokio::test]
async fn requests_to_an_unloaded_model_fail_as_unloading() {
    let l = load_tiny(TinyModel::default(), 1, 128);
    let model = l.model.clone();
    l.model.unload();
    match first_event(&model, text("x", 1)).await {
        Event::Failed(RequestError::Unloading(name)) => assert_eq!(name, "tiny"),
        other => panic!("expected Unloading, got {other:?}"),
    }
}

#[tokio::test]
async fn a_prompt_that_shares_a_prefix_with_the_last_one_reuses_its_cache() {
    let l = load_tiny(TinyModel::default(), 1, 1024);
    let prompt = "the fleet signed the model and the node answered the question ".repeat(4);
    let first = collect(l.model.submit(text(&prompt, 16))).await;
    let processed_once = l.model.stats().prompt_tokens;
    assert_eq!(processed_once, u64::from(first.usage.prompt_tokens));
    let again = collect(l.model.submit(text(&prompt, 16))).await;
    assert_eq!(
        again.text, first.text,
        "reusing the cache must not change the answer"
    );
    assert_eq!(again.usage.prompt_tokens, first.usage.prompt_tokens);
    assert_eq!(
        l.model.stats().prompt_tokens - processed_once,
        1,
        "only the last prompt token is decoded again"
    );
    assert_eq!(first.usage.cached_tokens, 0);
    assert_eq!(again.usage.cached_tokens, again.usage.prompt_tokens - 1);
    // A different prompt in the same slot starts over and still answers as a fresh slot would.
    let other = collect(l.model.submit(text("hello world", 8))).await;
    let fresh = load_tiny(TinyModel::default(), 1, 1024);
    assert_eq!(
        other.text,
        collect(fresh.model.submit(text("hello world", 8)))
            .await
            .text
    );
}

#[tokio::test]
async fn a_request_that_turns_the_prompt_cache_off_decodes_its_whole_prompt() {
    let l = load_tiny(TinyModel::default(), 1, 1024);
    let prompt = "the fleet signed the model and the node answered the question ".repeat(4);
    let first = collect(l.model.submit(text(&prompt, 16))).await;
    let before = l.model.stats().prompt_tokens;
    let uncached = collect(l.model.submit(GenerationRequest {
        cache_prompt: false,
        ..text(&prompt, 16)
    }))
    .await;
    assert_eq!(uncached.usage.cached_tokens, 0);
    assert_eq!(
        l.model.stats().prompt_tokens - before,
        u64::from(uncached.usage.prompt_tokens),
        "every prompt token is decoded again"
    );
    assert_eq!(uncached.text, first.text);
    // The slot's cache holds this prompt again, for the next request that allows it.
    let cached = collect(l.model.submit(text(&prompt, 16))).await;
    assert_eq!(cached.usage.cached_tokens, cached.usage.prompt_tokens - 1);
}

#[tokio::test]
async fn a_unified_kv_cache_gives_the_same_answers() {
    let split = load_tiny(TinyModel::default(), 2, 256);
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_tiny(dir.path(), &TinyModel::default());
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = steward_engine::metrics::EngineMetrics::register(&mut registry);
    let config = steward_engine::ModelConfig {
        slots: 2,
        context_per_slot: 256,
        kv_unified: true,
        threads: Some(2),
        ..steward_engine::ModelConfig::new("unified", path)
    };
    let unified = ModelHandle::load(config, &metrics).unwrap();
    let a = collect(split.model.submit(text("the node", 24))).await.text;
    let b = collect(unified.submit(text("the node", 24))).await.text;
    assert_eq!(a, b);
}
