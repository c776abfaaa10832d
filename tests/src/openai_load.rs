//! A load generator for OpenAI-compatible inference servers, and the process handling around
//! it, for `steward-engine-bench`: our node agent's API and llama.cpp's `llama-server` driven
//! with the same requests, plus a runner for `llama-bench`.
//!
//! Every request streams (`stream: true`, `stream_options.include_usage`), decodes greedily
//! (`temperature: 0`) and ignores end-of-sequence (`ignore_eos`), so each one produces exactly
//! `max_tokens` tokens on either server. Per request it records:
//!
//! - TTFT: from sending the request to the first chunk carrying generated text;
//! - TPOT: (last token's arrival − first token's arrival) ÷ (completion tokens − 1);
//! - `usage.prompt_tokens` and `usage.completion_tokens` (required: counts come from the
//!   server, not from counting chunks, which may carry more than one token), and
//!   `usage.prompt_tokens_details.cached_tokens` where the server reports it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

/// Which OpenAI endpoint the load uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/completions` with a plain prompt: both servers do identical work.
    Completions,
    /// `POST /v1/chat/completions` with one user message: the chat template is applied.
    Chat,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::Completions => "/v1/completions",
            Api::Chat => "/v1/chat/completions",
        }
    }
}

/// A server under load.
#[derive(Clone, Debug)]
pub struct Target {
    /// `http://127.0.0.1:PORT`
    pub base_url: String,
    pub api_key: Option<String>,
    /// The `model` field sent (the first id `GET /v1/models` lists).
    pub model: String,
    pub api: Api,
}

impl Target {
    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// Asks `GET /v1/models` for the first model id; `None` while the list is empty.
    pub async fn discover_model(
        client: &reqwest::Client,
        base_url: &str,
        api_key: Option<&str>,
    ) -> anyhow::Result<Option<String>> {
        let url = format!("{base_url}/v1/models");
        let mut request = client.get(&url);
        if let Some(key) = api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.with_context(|| format!("GET {url}"))?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        ensure!(status.is_success(), "GET {url}: {status}: {body}");
        let models: Value =
            serde_json::from_str(&body).with_context(|| format!("GET {url}: not JSON: {body}"))?;
        let data = models["data"]
            .as_array()
            .with_context(|| format!("GET {url}: no `data` list in {body}"))?;
        match data.first() {
            None => Ok(None),
            Some(model) => model["id"]
                .as_str()
                .map(|id| Some(id.to_owned()))
                .with_context(|| format!("GET {url}: no data[0].id in {body}")),
        }
    }
}

/// One request to send.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: String,
    pub max_tokens: u32,
    /// Sent as llama.cpp's `cache_prompt`: `false` makes the server decode the whole prompt
    /// instead of reusing the KV of a prefix it has cached.
    pub cache_prompt: bool,
}

/// What one streamed request measured.
#[derive(Clone, Debug)]
pub struct Sample {
    pub prompt_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`: prompt tokens the server took from its
    /// cache rather than decoded (0 when it does not say).
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    /// Send → first chunk with generated text.
    pub ttft: Duration,
    /// First → last token arrival; zero for a single token.
    pub decode: Duration,
    /// Send → end of stream.
    pub total: Duration,
    /// llama-server's `timings` object from the final chunk, when the server sends one.
    pub timings: Option<Value>,
}

impl Sample {
    /// Time per output token after the first; `None` with fewer than two tokens.
    pub fn tpot(&self) -> Option<Duration> {
        let gaps = u32::try_from(self.completion_tokens.checked_sub(1)?).ok()?;
        (gaps > 0).then(|| self.decode / gaps)
    }

    /// Decode tokens per second for this request (tokens after the first ÷ their time).
    pub fn decode_tps(&self) -> Option<f64> {
        let gaps = self.completion_tokens.checked_sub(1)?;
        (gaps > 0 && !self.decode.is_zero()).then(|| gaps as f64 / self.decode.as_secs_f64())
    }

    /// Prompt tokens per second, counting everything before the first token as prompt work.
    pub fn prompt_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.ttft.as_secs_f64()
    }
}

/// Sends one streaming request and measures it.
pub async fn stream_one(
    client: &reqwest::Client,
    target: &Target,
    request: &Request,
) -> anyhow::Result<Sample> {
    let mut body = json!({
        "model": target.model,
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": { "include_usage": true },
        "ignore_eos": true,
        "cache_prompt": request.cache_prompt,
    });
    match target.api {
        Api::Completions => body["prompt"] = json!(request.prompt),
        Api::Chat => body["messages"] = json!([{ "role": "user", "content": request.prompt }]),
    }
    let url = format!("{}{}", target.base_url, target.api.path());
    let sent = Instant::now();
    let mut response = target
        .authorize(client.post(&url))
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        bail!("POST {url}: {status}: {text}");
    }

    let mut events = SseBuffer::default();
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut usage: Option<(u64, u64, u64)> = None;
    let mut timings = None;
    let mut done = false;
    while let Some(chunk) = response
        .chunk()
        .await
        .with_context(|| format!("POST {url}: reading the stream"))?
    {
        let arrived = Instant::now();
        events.push(&chunk);
        while let Some(data) = events.next_data() {
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let event: Value = serde_json::from_str(&data)
                .with_context(|| format!("POST {url}: event is not JSON: {data}"))?;
            if let Some(error) = event.get("error") {
                bail!("POST {url}: error in stream: {error}");
            }
            let choice = &event["choices"][0];
            let text = match target.api {
                Api::Completions => choice["text"].as_str(),
                Api::Chat => choice["delta"]["content"].as_str(),
            };
            if text.is_some_and(|t| !t.is_empty()) {
                first.get_or_insert(arrived);
                last = Some(arrived);
            }
            if let Some(u) = event.get("usage").filter(|u| !u.is_null()) {
                let count = |field: &str| {
                    u[field]
                        .as_u64()
                        .with_context(|| format!("POST {url}: usage without {field}: {u}"))
                };
                let cached = u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0);
                usage = Some((count("prompt_tokens")?, count("completion_tokens")?, cached));
            }
            if let Some(t) = event.get("timings") {
                timings = Some(t.clone());
            }
        }
    }
    let total = sent.elapsed();
    ensure!(done, "POST {url}: the stream ended without `data: [DONE]`");
    let (prompt_tokens, completion_tokens, cached_tokens) = usage.with_context(|| {
        format!(
            "POST {url}: no `usage` in the stream although stream_options.include_usage was set"
        )
    })?;
    let (Some(first), Some(last)) = (first, last) else {
        bail!("POST {url}: the stream carried no generated text ({completion_tokens} tokens)");
    };
    Ok(Sample {
        prompt_tokens,
        cached_tokens,
        completion_tokens,
        ttft: first - sent,
        decode: last - first,
        total,
        timings,
    })
}

/// Splits a byte stream into server-sent events and yields their `data` fields.
#[derive(Default)]
struct SseBuffer {
    buffer: Vec<u8>,
}

impl SseBuffer {
    fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete event's data (its `data:` lines joined), if one has fully arrived.
    fn next_data(&mut self) -> Option<String> {
        loop {
            let (end, separator) = find_event_end(&self.buffer)?;
            let event: Vec<u8> = self.buffer.drain(..end + separator).take(end).collect();
            let event = String::from_utf8_lossy(&event);
            let data: Vec<&str> = event
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                return Some(data.join("\n"));
            }
            // A comment or keep-alive: look at the next event.
        }
    }
}

/// Where the first event ends, and how long its blank-line separator is.
fn find_event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    (0..buffer.len()).find_map(|i| {
        let rest = &buffer[i..];
        if rest.starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else if rest.starts_with(b"\n\n") {
            Some((i, 2))
        } else {
            None
        }
    })
}

/// `clients` clients, each sending `per_client` requests back to back.
#[derive(Clone, Debug)]
pub struct Phase {
    pub clients: usize,
    pub samples: Vec<Sample>,
    /// First send → last stream end.
    pub wall: Duration,
}

impl Phase {
    /// Completion tokens of all requests ÷ the phase's wall time.
    pub fn aggregate_tps(&self) -> f64 {
        let tokens: u64 = self.samples.iter().map(|s| s.completion_tokens).sum();
        tokens as f64 / self.wall.as_secs_f64()
    }

    pub fn ttft(&self) -> Percentiles {
        Percentiles::of(self.samples.iter().map(|s| s.ttft).collect())
    }

    pub fn tpot(&self) -> Percentiles {
        Percentiles::of(self.samples.iter().filter_map(Sample::tpot).collect())
    }

    /// One phase run in two parts (with other work between them): the samples of both, and
    /// the sum of their wall times.
    pub fn merge(mut self, other: Phase) -> Phase {
        self.samples.extend(other.samples);
        self.wall += other.wall;
        self
    }

    pub fn prompt_tokens(&self) -> Vec<u64> {
        self.samples.iter().map(|s| s.prompt_tokens).collect()
    }
}

/// Runs `clients` concurrent clients, client `c` sending `make(c, i)` for `i` in
/// `0..per_client`, each request after the previous one finished. Samples are in
/// (client, request) order whatever order they finished in.
pub async fn run_phase(
    client: &reqwest::Client,
    target: &Target,
    clients: usize,
    per_client: usize,
    make: impl Fn(usize, usize) -> Request,
) -> anyhow::Result<Phase> {
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for c in 0..clients {
        let requests: Vec<Request> = (0..per_client).map(|i| make(c, i)).collect();
        let (client, target) = (client.clone(), target.clone());
        tasks.spawn(async move {
            let mut samples = Vec::with_capacity(requests.len());
            for request in &requests {
                samples.push(stream_one(&client, &target, request).await?);
            }
            anyhow::Ok((c, samples))
        });
    }
    let mut by_client = vec![Vec::new(); clients];
    while let Some(joined) = tasks.join_next().await {
        let (c, samples) = joined.context("a load client panicked")??;
        by_client[c] = samples;
    }
    Ok(Phase {
        clients,
        samples: by_client.into_iter().flatten().collect(),
        wall: started.elapsed(),
    })
}

/// p50 and p99 (nearest rank) of a set of durations.
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    pub p50: Duration,
    pub p99: Duration,
    pub count: usize,
}

impl Percentiles {
    pub fn of(mut values: Vec<Duration>) -> Self {
        values.sort_unstable();
        Self {
            p50: percentile(&values, 50.0),
            p99: percentile(&values, 99.0),
            count: values.len(),
        }
    }
}

/// The nearest-rank percentile of sorted values; zero for none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of some values; `None` for none.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_unstable_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

const WORDS: &[&str] = &[
    "the",
    "river",
    "carried",
    "small",
    "boats",
    "past",
    "old",
    "houses",
    "while",
    "children",
    "watched",
    "from",
    "green",
    "hills",
    "and",
    "farmers",
    "counted",
    "their",
    "sheep",
    "before",
    "evening",
    "light",
    "turned",
    "every",
    "window",
    "gold",
    "people",
    "walked",
    "along",
    "quiet",
    "roads",
    "toward",
    "market",
    "where",
    "bread",
    "fish",
    "fruit",
    "were",
    "sold",
    "under",
    "wide",
    "blue",
    "tents",
    "a",
    "teacher",
    "told",
    "stories",
    "about",
    "distant",
    "mountains",
    "ships",
    "stars",
    "winter",
    "snow",
    "music",
    "played",
    "late",
    "into",
    "night",
    "when",
    "travelers",
    "rested",
    "near",
    "warm",
];

/// A deterministic plain-English prompt of `words` words (about as many tokens for a large
/// vocabulary), starting with `id` (six digits, so that every id tokenizes to the same
/// length) so that no two prompts share a cacheable prefix.
pub fn prompt(id: usize, words: usize) -> String {
    let mut text = format!("{id:06}.");
    for i in 0..words {
        let word = WORDS[(i * 7 + id * 13) % WORDS.len()];
        text.push(' ');
        text.push_str(word);
    }
    text
}

/// A child process killed when dropped (also on error or panic), with its output in a log file.
pub struct Server {
    pub name: String,
    pub base_url: String,
    pub log: PathBuf,
    child: Child,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("pid", &self.child.id())
            .finish()
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Fails clearly when `path` is not an executable file.
pub fn require_binary(path: &Path, what: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{what} not found at {}", path.display()))?;
    ensure!(
        meta.is_file() && meta.permissions().mode() & 0o111 != 0,
        "{what} at {} is not an executable file",
        path.display()
    );
    Ok(())
}

impl Server {
    /// Starts `program args…` listening on `port`, its stdout and stderr going to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        port: u16,
        log: &Path,
    ) -> anyhow::Result<Self> {
        require_binary(program, name)?;
        let out = std::fs::File::create(log)
            .with_context(|| format!("creating log {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Self {
            name: name.to_owned(),
            base_url: format!("http://127.0.0.1:{port}"),
            log: log.to_owned(),
            child,
        })
    }

    /// Polls `GET path` until it answers 200, failing when the process exits or `within`
    /// passes, with the end of its log.
    pub async fn wait_healthy(
        &mut self,
        client: &reqwest::Client,
        path: &str,
        within: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let url = format!("{}{path}", self.base_url);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} before {url} answered 200; the end of {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail(30)
                );
            }
            let answer = client
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if answer.is_ok_and(|r| r.status() == reqwest::StatusCode::OK) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                bail!(
                    "{} did not become healthy ({url} → 200) within {within:?}; the end of {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `lines` lines of the process's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM, then SIGKILL if it has not exited within five seconds.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        self.child.kill().await.context("killing")?;
        Ok(())
    }
}

/// What `llama-bench -p N -n M -o json` reported.
#[derive(Clone, Debug)]
pub struct LlamaBench {
    /// Prompt processing tokens/s (`avg_ts` of the `n_prompt` test) and its stddev.
    pub pp: (f64, f64),
    /// Generation tokens/s (`avg_ts` of the `n_gen` test) and its stddev.
    pub tg: (f64, f64),
    /// The first result object, for its settings (flash_attn, n_batch, build_commit, …).
    pub settings: Value,
}

/// Runs `llama-bench -m model -t threads -p pp -n tg -o json` and parses its two results.
pub async fn llama_bench(
    program: &Path,
    model: &Path,
    threads: usize,
    pp: usize,
    tg: usize,
    reps: usize,
) -> anyhow::Result<LlamaBench> {
    require_binary(program, "llama-bench")?;
    let args = [
        "-r".to_owned(),
        reps.to_string(),
        "-m".to_owned(),
        model.display().to_string(),
        "-t".to_owned(),
        threads.to_string(),
        "-p".to_owned(),
        pp.to_string(),
        "-n".to_owned(),
        tg.to_string(),
        "-o".to_owned(),
        "json".to_owned(),
    ];
    let output = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))?;
    ensure!(
        output.status.success(),
        "{} {} failed with {}:\n{}",
        program.display(),
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    parse_llama_bench(&String::from_utf8_lossy(&output.stdout))
}

/// Parses `llama-bench -o json` output: an array of one object per test.
pub fn parse_llama_bench(json: &str) -> anyhow::Result<LlamaBench> {
    let results: Vec<Value> = serde_json::from_str(json.trim())
        .with_context(|| format!("llama-bench output is not a JSON array: {json}"))?;
    let find = |want_prompt: bool| -> anyhow::Result<(f64, f64)> {
        let r = results
            .iter()
            .find(|r| {
                let prompt = r["n_prompt"].as_u64().unwrap_or(0);
                let gen_ = r["n_gen"].as_u64().unwrap_or(0);
                if want_prompt {
                    prompt > 0 && gen_ == 0
                } else {
                    gen_ > 0 && prompt == 0
                }
            })
            .with_context(|| {
                let which = if want_prompt { "prompt" } else { "generation" };
                format!("llama-bench reported no {which} test: {json}")
            })?;
        let avg = r["avg_ts"]
            .as_f64()
            .context("llama-bench result without avg_ts")?;
        Ok((avg, r["stddev_ts"].as_f64().unwrap_or(0.0)))
    };
    Ok(LlamaBench {
        pp: find(true)?,
        tg: find(false)?,
        settings: results.first().cloned().unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_chunks() {
        let mut sse = SseBuffer::default();
        sse.push(b"data: {\"a\":1}\n\nda");
        assert_eq!(sse.next_data().as_deref(), Some("{\"a\":1}"));
        assert_eq!(sse.next_data(), None);
        sse.push(b"ta: [DONE]\r\n\r\n: keep-alive\n\n");
        assert_eq!(sse.next_data().as_deref(), Some("[DONE]"));
        assert_eq!(sse.next_data(), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let ms = |v: u64| Duration::from_millis(v);
        let values: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&values, 50.0), ms(50));
        assert_eq!(percentile(&values, 99.0), ms(99));
        assert_eq!(percentile(&values[..10], 99.0), ms(10));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn tpot_excludes_the_first_token() {
        let sample = Sample {
            prompt_tokens: 10,
            cached_tokens: 0,
            completion_tokens: 5,
            ttft: Duration::from_millis(100),
            decode: Duration::from_millis(40),
            total: Duration::from_millis(140),
            timings: None,
        };
        assert_eq!(sample.tpot(), Some(Duration::from_millis(10)));
        assert_eq!(sample.decode_tps(), Some(100.0));
    }

    #[test]
    fn parses_llama_bench_json() {
        let json = r#"[{"n_prompt":512,"n_gen":0,"avg_ts":900.5,"stddev_ts":3.0},
                       {"n_prompt":0,"n_gen":128,"avg_ts":80.25,"stddev_ts":0.5}]"#;
        let bench = parse_llama_bench(json).unwrap();
        assert_eq!(bench.pp, (900.5, 3.0));
        assert_eq!(bench.tg, (80.25, 0.5));
    }

    #[test]
    fn prompts_differ_from_the_first_token() {
        assert_ne!(prompt(1, 8), prompt(2, 8));
        assert_eq!(prompt(3, 5).split(' ').count(), 6);
    }
}
