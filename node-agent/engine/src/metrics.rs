//! Per-model serving metrics: Prometheus series for the agent's `/metrics`, and a snapshot
//! (recent rates and latency percentiles) the agent sends to the control plane.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelOutcomeLabel {
    pub model: String,
    /// `completed`, `cancelled`, `rejected` or `failed`.
    pub outcome: String,
}

fn ttft_buckets() -> impl Iterator<Item = f64> {
    [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0].into_iter()
}

fn tpot_buckets() -> impl Iterator<Item = f64> {
    [0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28].into_iter()
}

/// The metric families of all models, registered once in the agent's registry.
#[derive(Clone)]
pub struct EngineMetrics {
    requests: Family<ModelOutcomeLabel, Counter>,
    prompt_tokens: Family<ModelLabel, Counter>,
    generated_tokens: Family<ModelLabel, Counter>,
    ttft: Family<ModelLabel, Histogram>,
    tpot: Family<ModelLabel, Histogram>,
    queue_depth: Family<ModelLabel, Gauge>,
    busy_slots: Family<ModelLabel, Gauge>,
    slots: Family<ModelLabel, Gauge>,
    generation_rate: Family<ModelLabel, Gauge<f64, AtomicU64>>,
    prompt_rate: Family<ModelLabel, Gauge<f64, AtomicU64>>,
}

impl std::fmt::Debug for EngineMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineMetrics").finish_non_exhaustive()
    }
}

impl EngineMetrics {
    /// Creates the families and registers them (as `steward_inference_*` when the registry
    /// has the `steward` prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            prompt_tokens: Family::default(),
            generated_tokens: Family::default(),
            ttft: Family::new_with_constructor(|| Histogram::new(ttft_buckets())),
            tpot: Family::new_with_constructor(|| Histogram::new(tpot_buckets())),
            queue_depth: Family::default(),
            busy_slots: Family::default(),
            slots: Family::default(),
            generation_rate: Family::default(),
            prompt_rate: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("inference");
        r.register(
            "requests",
            "Generation requests by outcome",
            m.requests.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens processed",
            m.prompt_tokens.clone(),
        );
        r.register(
            "generated_tokens",
            "Tokens generated",
            m.generated_tokens.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "From request arrival to its first generated token",
            m.ttft.clone(),
        );
        r.register(
            "time_per_output_token_seconds",
            "Mean time between generated tokens of one request",
            m.tpot.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting for a free slot",
            m.queue_depth.clone(),
        );
        r.register("busy_slots", "Slots generating now", m.busy_slots.clone());
        r.register("slots", "Slots of the loaded model", m.slots.clone());
        r.register(
            "generation_tokens_per_second",
            "Tokens generated per second over the last 10 seconds",
            m.generation_rate.clone(),
        );
        r.register(
            "prompt_tokens_per_second",
            "Prompt tokens processed per second over the last 10 seconds",
            m.prompt_rate.clone(),
        );
        m
    }

    /// The handles of one model's series.
    pub fn for_model(&self, model: &str, slots: u32) -> ModelMetrics {
        let l = ModelLabel {
            model: model.to_string(),
        };
        let outcome = |o: &str| {
            self.requests
                .get_or_create(&ModelOutcomeLabel {
                    model: model.to_string(),
                    outcome: o.into(),
                })
                .clone()
        };
        let m = ModelMetrics {
            inner: Arc::new(Inner {
                label: l.clone(),
                families: self.clone(),
                completed: outcome("completed"),
                cancelled: outcome("cancelled"),
                rejected: outcome("rejected"),
                failed: outcome("failed"),
                prompt_tokens: self.prompt_tokens.get_or_create(&l).clone(),
                generated_tokens: self.generated_tokens.get_or_create(&l).clone(),
                ttft: self.ttft.get_or_create(&l).clone(),
                tpot: self.tpot.get_or_create(&l).clone(),
                queue_depth: self.queue_depth.get_or_create(&l).clone(),
                busy_slots: self.busy_slots.get_or_create(&l).clone(),
                generation_rate: self.generation_rate.get_or_create(&l).clone(),
                prompt_rate: self.prompt_rate.get_or_create(&l).clone(),
                slots,
                window: Mutex::new(Window::default()),
                started: Instant::now(),
            }),
        };
        self.slots.get_or_create(&l).set(i64::from(slots));
        m
    }

    /// Drops a model's series when it is unloaded.
    fn remove(&self, l: &ModelLabel) {
        for outcome in ["completed", "cancelled", "rejected", "failed"] {
            self.requests.remove(&ModelOutcomeLabel {
                model: l.model.clone(),
                outcome: outcome.into(),
            });
        }
        self.prompt_tokens.remove(l);
        self.generated_tokens.remove(l);
        self.ttft.remove(l);
        self.tpot.remove(l);
        self.queue_depth.remove(l);
        self.busy_slots.remove(l);
        self.slots.remove(l);
        self.generation_rate.remove(l);
        self.prompt_rate.remove(l);
    }
}

/// One model's metrics, cheap to clone; the inference thread records into it.
#[derive(Clone, Debug)]
pub struct ModelMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    label: ModelLabel,
    families: EngineMetrics,
    completed: Counter,
    cancelled: Counter,
    rejected: Counter,
    failed: Counter,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    ttft: Histogram,
    tpot: Histogram,
    queue_depth: Gauge,
    busy_slots: Gauge,
    generation_rate: Gauge<f64, AtomicU64>,
    prompt_rate: Gauge<f64, AtomicU64>,
    slots: u32,
    window: Mutex<Window>,
    started: Instant,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelMetrics")
            .field("model", &self.label.model)
            .finish()
    }
}

/// How a request ended, for the `requests` counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Cancelled,
    Rejected,
    Failed,
}

/// Recent samples for rates and percentiles.
#[derive(Default)]
struct Window {
    /// (second since start, prompt tokens, generated tokens) per second with activity.
    seconds: VecDeque<(u64, u64, u64)>,
    ttft: VecDeque<f64>,
    tpot: VecDeque<f64>,
}

const RATE_WINDOW_SECS: u64 = 10;
const LATENCY_SAMPLES: usize = 1024;

impl Window {
    fn add_tokens(&mut self, now_s: u64, prompt: u64, generated: u64) {
        match self.seconds.back_mut() {
            Some(last) if last.0 == now_s => {
                last.1 += prompt;
                last.2 += generated;
            }
            _ => self.seconds.push_back((now_s, prompt, generated)),
        }
        self.trim(now_s);
    }

    fn trim(&mut self, now_s: u64) {
        while self
            .seconds
            .front()
            .is_some_and(|f| f.0 + RATE_WINDOW_SECS <= now_s)
        {
            self.seconds.pop_front();
        }
    }

    fn rates(&mut self, now_s: u64) -> (f64, f64) {
        self.trim(now_s);
        let (p, g) = self
            .seconds
            .iter()
            .fold((0, 0), |(p, g), s| (p + s.1, g + s.2));
        let span = RATE_WINDOW_SECS as f64;
        (p as f64 / span, g as f64 / span)
    }
}

fn push_sample(q: &mut VecDeque<f64>, v: f64) {
    if q.len() == LATENCY_SAMPLES {
        q.pop_front();
    }
    q.push_back(v);
}

/// The `p`-th percentile (0..=1) of `samples` by nearest rank; 0 when there are none.
pub fn percentile(samples: &VecDeque<f64>, p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut v: Vec<f64> = samples.iter().copied().collect();
    v.sort_by(f64::total_cmp);
    let rank = (p * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// A model's serving state at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelStatsSnapshot {
    pub requests_completed: u64,
    pub requests_cancelled: u64,
    pub requests_rejected: u64,
    pub requests_failed: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Over the last 10 seconds.
    pub generation_tokens_per_second: f64,
    pub prompt_tokens_per_second: f64,
    pub ttft_p50_seconds: f64,
    pub ttft_p95_seconds: f64,
    pub tpot_p50_seconds: f64,
    pub tpot_p95_seconds: f64,
    pub queue_depth: u32,
    pub busy_slots: u32,
    pub slots: u32,
}

impl ModelMetrics {
    fn now_s(&self) -> u64 {
        self.inner.started.elapsed().as_secs()
    }

    pub fn request_finished(&self, outcome: Outcome) {
        match outcome {
            Outcome::Completed => self.inner.completed.inc(),
            Outcome::Cancelled => self.inner.cancelled.inc(),
            Outcome::Rejected => self.inner.rejected.inc(),
            Outcome::Failed => self.inner.failed.inc(),
        };
    }

    pub fn tokens(&self, prompt: u64, generated: u64) {
        self.inner.prompt_tokens.inc_by(prompt);
        self.inner.generated_tokens.inc_by(generated);
        let now = self.now_s();
        let mut w = self.inner.window.lock().expect("metrics window poisoned");
        w.add_tokens(now, prompt, generated);
        let (p, g) = w.rates(now);
        self.inner.prompt_rate.set(p);
        self.inner.generation_rate.set(g);
    }

    pub fn first_token(&self, ttft: Duration) {
        self.inner.ttft.observe(ttft.as_secs_f64());
        let mut w = self.inner.window.lock().expect("metrics window poisoned");
        push_sample(&mut w.ttft, ttft.as_secs_f64());
    }

    /// Records a finished request's mean time per output token.
    pub fn time_per_output_token(&self, tpot: Duration) {
        self.inner.tpot.observe(tpot.as_secs_f64());
        let mut w = self.inner.window.lock().expect("metrics window poisoned");
        push_sample(&mut w.tpot, tpot.as_secs_f64());
    }

    pub fn set_load(&self, queue_depth: usize, busy_slots: usize) {
        self.inner.queue_depth.set(queue_depth as i64);
        self.inner.busy_slots.set(busy_slots as i64);
    }

    pub fn snapshot(&self) -> ModelStatsSnapshot {
        let i = &self.inner;
        let now = self.now_s();
        let mut w = i.window.lock().expect("metrics window poisoned");
        let (prompt_rate, gen_rate) = w.rates(now);
        i.prompt_rate.set(prompt_rate);
        i.generation_rate.set(gen_rate);
        ModelStatsSnapshot {
            requests_completed: i.completed.get(),
            requests_cancelled: i.cancelled.get(),
            requests_rejected: i.rejected.get(),
            requests_failed: i.failed.get(),
            prompt_tokens: i.prompt_tokens.get(),
            generated_tokens: i.generated_tokens.get(),
            generation_tokens_per_second: gen_rate,
            prompt_tokens_per_second: prompt_rate,
            ttft_p50_seconds: percentile(&w.ttft, 0.50),
            ttft_p95_seconds: percentile(&w.ttft, 0.95),
            tpot_p50_seconds: percentile(&w.tpot, 0.50),
            tpot_p95_seconds: percentile(&w.tpot, 0.95),
            queue_depth: u32::try_from(i.queue_depth.get()).unwrap_or(0),
            busy_slots: u32::try_from(i.busy_slots.get()).unwrap_or(0),
            slots: i.slots,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.families.remove(&self.label);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let q: VecDeque<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&q, 0.5), 50.0);
        assert_eq!(percentile(&q, 0.95), 95.0);
        assert_eq!(percentile(&VecDeque::new(), 0.5), 0.0);
    }

    #[test]
    fn snapshot_counts_requests_tokens_and_latencies() {
        let mut registry = Registry::default();
        let m = EngineMetrics::register(&mut registry).for_model("m", 4);
        m.tokens(100, 0);
        m.tokens(0, 20);
        m.first_token(Duration::from_millis(30));
        m.time_per_output_token(Duration::from_millis(10));
        m.request_finished(Outcome::Completed);
        m.request_finished(Outcome::Cancelled);
        m.set_load(2, 3);
        let s = m.snapshot();
        assert_eq!((s.prompt_tokens, s.generated_tokens), (100, 20));
        assert_eq!((s.requests_completed, s.requests_cancelled), (1, 1));
        assert_eq!((s.queue_depth, s.busy_slots, s.slots), (2, 3, 4));
        assert!((s.generation_tokens_per_second - 2.0).abs() < 1e-9);
        assert!((s.ttft_p50_seconds - 0.03).abs() < 1e-9);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("inference_generated_tokens_total{model=\"m\"} 20"),
            "{text}"
        );
    }

    #[test]
    fn a_dropped_model_leaves_no_series_behind() {
        let mut registry = Registry::default();
        let families = EngineMetrics::register(&mut registry);
        let m = families.for_model("gone", 1);
        m.tokens(1, 1);
        drop(m);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("gone"), "{text}");
    }
}
