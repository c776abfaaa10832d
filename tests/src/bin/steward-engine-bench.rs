//! Our node agent's OpenAI-compatible API against llama.cpp's own tools, on the same model and
//! thread count, in one run, printing ratios.
//!
//! 1. `llama-bench -p 512 -n 128`: the engine-only bounds, pp512 and tg128.
//! 2. For each slot count (1, 4, 8), `llama-server -np N` and `steward-node-agent serve
//!    --slots N`, both up at once and driven alternately by the same streaming requests
//!    (`steward_tests::openai_load`): with one slot, a ~512-token prompt with `max_tokens: 1`
//!    (prompt t/s = `usage.prompt_tokens` ÷ TTFT) and a short prompt with `max_tokens: 128`
//!    (single-stream decode t/s), alternating request by request, with a one-repetition
//!    `llama-bench` before each pair; then C concurrent clients (C=1 on 1 slot, C=2 and 4 on
//!    4 slots, C=8 on 8 slots), each sending requests back to back, in halves ordered A B B A:
//!    aggregate generation t/s, TTFT and TPOT p50/p99.
//!
//! Every prompt starts with its own number, so no server can answer from a prompt cache, and
//! both servers get the very same prompts (their `usage.prompt_tokens` are compared). The
//! prompt-processing requests also set `cache_prompt: false`: the numbers still share the BOS
//! token and leading digits, and a server reusing those would decode 506–511 tokens, not the
//! 512 that pp512 decodes (both servers must report `cached_tokens: 0` for them).
//!
//! ```text
//! scripts/bench-engine.sh [--markdown FILE] [--requests N] …
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use steward_tests::openai_load::{
    self, Api, LlamaBench, Phase, Request, Sample, Server, Target, median, prompt,
};

#[derive(Parser, Debug)]
#[command(about = "Our node agent's OpenAI API against llama-bench and llama-server")]
struct Args {
    /// The GGUF model both sides load.
    #[arg(long)]
    model: PathBuf,
    /// Threads for generation and for prompt processing, on both sides.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long)]
    llama_bench: PathBuf,
    #[arg(long)]
    llama_server: PathBuf,
    /// `steward-node-agent`; without it only llama.cpp is measured.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Context per slot (llama-server gets `-c CTX×slots`).
    #[arg(long, default_value_t = 1024)]
    ctx: usize,
    /// Concurrent clients to measure; each runs on 1 slot (C=1), 4 (C≤4) or the next power
    /// of two (C>4).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    clients: Vec<usize>,
    /// Requests per load phase, split between its clients (at least 2 each).
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Generated tokens per request (`max_tokens`, with `ignore_eos`).
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Words in each load-phase prompt (about one token each).
    #[arg(long, default_value_t = 128)]
    prompt_words: usize,
    /// Prompt tokens for the prompt-processing measurement and llama-bench's `-p`.
    #[arg(long, default_value_t = 512)]
    pp_tokens: usize,
    /// Repetitions of the single-stream prompt and decode measurements (median taken).
    #[arg(long, default_value_t = 9)]
    reps: usize,
    /// The endpoint the load uses.
    #[arg(long, value_enum, default_value_t = ApiArg::Completions)]
    api: ApiArg,
    /// Also write the table as Markdown to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Where the servers' logs go.
    #[arg(long, default_value = "target/engine-bench")]
    log_dir: PathBuf,
    /// Seconds a server may take to answer its health check with 200.
    #[arg(long, default_value_t = 60)]
    health_timeout: u64,
    /// An extra argument for llama-server (repeatable), e.g. `--llama-server-arg=-fa=on`.
    #[arg(long, allow_hyphen_values = true)]
    llama_server_arg: Vec<String>,
    /// An extra argument for `steward-node-agent serve` (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    agent_arg: Vec<String>,
    /// Exit non-zero when a target is missed.
    #[arg(long)]
    strict: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ApiArg {
    Completions,
    Chat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Llama,
    Ours,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Llama => "llama-server",
            Side::Ours => "steward-node-agent",
        }
    }
}

/// What one side measured through its API.
#[derive(Default)]
struct Measured {
    pp: Vec<Sample>,
    tg: Vec<Sample>,
    phases: BTreeMap<usize, Phase>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One thread for the load generator: the servers get the machine's cores.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::select! {
            result = Box::pin(run(args)) => result,
            signal = shutdown_signal() => Err(anyhow!("interrupted by {signal}; servers stopped")),
        }
    })
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

/// Extra arguments as a suffix for a command line.
fn extra(args: &[String]) -> String {
    args.iter().map(|a| format!(" {a}")).collect()
}

fn slots_for(clients: usize) -> usize {
    if clients <= 1 {
        1
    } else {
        clients.next_power_of_two().max(4)
    }
}

struct Bench {
    args: Args,
    api: Api,
    http: reqwest::Client,
    api_key: String,
    /// Words giving a prompt of `pp_tokens` tokens, found on the first server.
    pp_words: Option<usize>,
    notes: Vec<String>,
    /// llama-bench runs (one repetition each) interleaved with our single-stream
    /// measurements, so that both sides see the same machine: on a shared VM speed drifts
    /// by several percent over minutes.
    interleaved: Vec<LlamaBench>,
}

async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.model.is_file(),
        "model {} not found (scripts/bench-engine.sh fetches it)",
        args.model.display()
    );
    openai_load::require_binary(&args.llama_bench, "llama-bench")?;
    openai_load::require_binary(&args.llama_server, "llama-server")?;
    if let Some(agent) = &args.agent {
        openai_load::require_binary(agent, "steward-node-agent")?;
    }
    ensure!(
        !args.clients.is_empty() && !args.clients.contains(&0),
        "--clients needs positive counts"
    );
    ensure!(
        args.reps > 0 && args.max_tokens > 1,
        "--reps ≥ 1, --max-tokens ≥ 2"
    );
    std::fs::create_dir_all(&args.log_dir)
        .with_context(|| format!("creating {}", args.log_dir.display()))?;

    eprintln!(
        "llama-bench -p {} -n {} -t {} …",
        args.pp_tokens, args.max_tokens, args.threads
    );
    let bench = openai_load::llama_bench(
        &args.llama_bench,
        &args.model,
        args.threads,
        args.pp_tokens,
        args.max_tokens as usize,
        5,
    )
    .await?;
    eprintln!(
        "  pp{} {:.1} t/s, tg{} {:.1} t/s",
        args.pp_tokens, bench.pp.0, args.max_tokens, bench.tg.0
    );

    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::from([(1, Vec::new())]);
    for &c in &args.clients {
        let group = groups.entry(slots_for(c)).or_default();
        if !group.contains(&c) {
            group.push(c);
        }
    }
    let sides: Vec<Side> = if args.agent.is_some() {
        vec![Side::Llama, Side::Ours]
    } else {
        vec![Side::Llama]
    };

    let mut state = Bench {
        api: match args.api {
            ApiArg::Completions => Api::Completions,
            ApiArg::Chat => Api::Chat,
        },
        // A fresh connection per request: llama-server (cpp-httplib) closes kept-alive
        // connections on its own schedule, which a pooled client sees as a failed request.
        // Loopback connects cost both sides the same few microseconds.
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()?,
        api_key: format!("bench-{:016x}", rand::random::<u64>()),
        pp_words: None,
        notes: Vec::new(),
        interleaved: Vec::new(),
        args,
    };
    let mut measured: BTreeMap<Side, Measured> = BTreeMap::new();
    for (&slots, clients) in &groups {
        Box::pin(state.measure_group(&sides, slots, clients, &mut measured)).await?;
    }

    let table = state.table(&bench, &measured);
    let header = state.header(&bench);
    println!("{header}");
    println!("{}", table.plain());
    for note in &state.notes {
        println!("note: {note}");
    }
    if let Some(path) = &state.args.markdown {
        let mut md = "## steward-engine-bench\n\n".to_owned();
        for line in header.lines() {
            let _ = writeln!(md, "- {line}");
        }
        md.push('\n');
        md.push_str(&table.markdown());
        for note in &state.notes {
            let _ = write!(md, "\n- {note}");
        }
        md.push('\n');
        std::fs::write(path, md).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    let missed = table.missed();
    if missed > 0 {
        eprintln!("{missed} target(s) missed");
        ensure!(!state.args.strict, "{missed} target(s) missed");
    }
    Ok(())
}

impl Bench {
    async fn start(&self, side: Side, slots: usize) -> anyhow::Result<(Server, Target)> {
        let args = &self.args;
        let port = openai_load::free_port()?;
        let model = args.model.display().to_string();
        let (program, argv, health, key): (&Path, Vec<String>, &str, Option<String>) = match side {
            Side::Llama => {
                let mut argv: Vec<String> = [
                    "-m",
                    &model,
                    "-t",
                    &args.threads.to_string(),
                    "-tb",
                    &args.threads.to_string(),
                    "-np",
                    &slots.to_string(),
                    "-c",
                    &(args.ctx * slots).to_string(),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--cont-batching",
                    "--no-kv-unified",
                    "--no-ui",
                ]
                .map(str::to_owned)
                .into();
                if matches!(self.api, Api::Chat) {
                    // The GGUF has no template; our agent falls back to llama.cpp's built-in
                    // "gemma". With Jinja (the default) llama-server would take "gemma" as
                    // template text; --no-jinja makes it the same built-in.
                    argv.extend(["--no-jinja", "--chat-template", "gemma"].map(str::to_owned));
                }
                argv.extend(args.llama_server_arg.iter().cloned());
                (&args.llama_server, argv, "/health", None)
            }
            Side::Ours => {
                let mut argv: Vec<String> = [
                    "serve",
                    "--model",
                    &model,
                    "--threads",
                    &args.threads.to_string(),
                    "--slots",
                    &slots.to_string(),
                    "--ctx",
                    &args.ctx.to_string(),
                    "--api-listen",
                    &format!("127.0.0.1:{port}"),
                    "--api-key",
                    &self.api_key,
                ]
                .map(str::to_owned)
                .into();
                argv.extend(args.agent_arg.iter().cloned());
                let agent = args.agent.as_deref().context("no --agent")?;
                (agent, argv, "/healthz", Some(self.api_key.clone()))
            }
        };
        let log = args.log_dir.join(format!(
            "{}-{}slot{}.log",
            side.label(),
            slots,
            if slots == 1 { "" } else { "s" }
        ));
        eprintln!(
            "{} with {slots} slot(s): {} {}",
            side.label(),
            program.display(),
            argv.join(" ").replace(&self.api_key, "KEY")
        );
        let mut server = Server::spawn(side.label(), program, &argv, port, &log)?;
        let within = Duration::from_secs(args.health_timeout);
        let started = Instant::now();
        server.wait_healthy(&self.http, health, within).await?;
        // Healthy may come before the model is listed: wait for it within the same limit.
        let model_id = loop {
            let listed =
                Target::discover_model(&self.http, &server.base_url, key.as_deref()).await?;
            if let Some(id) = listed {
                break id;
            }
            ensure!(
                started.elapsed() < within,
                "{} is healthy but lists no model in GET /v1/models after {within:?}; \
                 the end of {}:\n{}",
                side.label(),
                server.log.display(),
                server.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!(
            "  ready after {:.1?}; model id {model_id:?}",
            started.elapsed()
        );
        let target = Target {
            base_url: server.base_url.clone(),
            api_key: key,
            model: model_id,
            api: self.api,
        };
        Ok((server, target))
    }

    /// Measures one slot count with every side's server up at once, alternating between
    /// them request by request (single stream) and in ABBA halves (load phases), so that
    /// both sides see the same machine: on a shared VM speed drifts by several percent over
    /// minutes, more than the differences being measured.
    async fn measure_group(
        &mut self,
        sides: &[Side],
        slots: usize,
        clients: &[usize],
        measured: &mut BTreeMap<Side, Measured>,
    ) -> anyhow::Result<()> {
        let mut servers = Vec::new();
        for &side in sides {
            let (server, target) = self.start(side, slots).await?;
            servers.push((side, server, target));
        }
        let result = self
            .measure_running(&servers, slots, clients, measured)
            .await;
        for (_, server, _) in servers {
            server.stop().await?;
        }
        result
    }

    async fn measure_running(
        &mut self,
        servers: &[(Side, Server, Target)],
        slots: usize,
        clients: &[usize],
        measured: &mut BTreeMap<Side, Measured>,
    ) -> anyhow::Result<()> {
        let http = self.http.clone();
        for (side, _, target) in servers {
            // Warm-up, not measured.
            let warm_up = Request {
                prompt: prompt(999_999, 16),
                max_tokens: 16,
                cache_prompt: true,
            };
            openai_load::stream_one(&http, target, &warm_up)
                .await
                .with_context(|| format!("{}: warm-up request", side.label()))?;
        }
        // Even repetitions go in the listed order, odd ones reversed (ABBA over two reps).
        let ordered = |rep: usize| -> Vec<&(Side, Server, Target)> {
            if rep.is_multiple_of(2) {
                servers.iter().collect()
            } else {
                servers.iter().rev().collect()
            }
        };

        if slots == 1 {
            let words = self.pp_words(&servers[0].2).await?;
            for rep in 0..self.args.reps {
                if servers.iter().any(|(side, _, _)| *side == Side::Ours) {
                    let a = &self.args;
                    let b = openai_load::llama_bench(
                        &a.llama_bench,
                        &a.model,
                        a.threads,
                        a.pp_tokens,
                        a.max_tokens as usize,
                        1,
                    )
                    .await?;
                    self.interleaved.push(b);
                }
                for (side, _, target) in ordered(rep) {
                    // Without the prompt cache, so each server decodes all of the prompt's
                    // tokens, as pp512 does (a cached BOS and leading digits would leave an
                    // uneven batch, which ggml's kernels compute less efficiently).
                    let request = Request {
                        prompt: prompt(1_000 + rep, words),
                        max_tokens: 1,
                        cache_prompt: false,
                    };
                    let sample = openai_load::stream_one(&http, target, &request).await?;
                    measured.entry(*side).or_default().pp.push(sample);
                }
                for (side, _, target) in ordered(rep + 1) {
                    let request = Request {
                        prompt: prompt(2_000 + rep, 8),
                        max_tokens: self.args.max_tokens,
                        cache_prompt: true,
                    };
                    let sample = openai_load::stream_one(&http, target, &request).await?;
                    measured.entry(*side).or_default().tg.push(sample);
                }
            }
            for (side, _, _) in servers {
                let m = &measured[side];
                eprintln!(
                    "  {}: prompt {:.1} t/s ({} tokens), decode {:.1} t/s",
                    side.label(),
                    median(m.pp.iter().map(Sample::prompt_tps)).unwrap_or(0.0),
                    m.pp[0].prompt_tokens,
                    median(m.tg.iter().filter_map(Sample::decode_tps)).unwrap_or(0.0),
                );
            }
        }
        for &c in clients {
            // Two halves per side, A B B A: a drift over the phase weighs on both alike.
            let per_half = self.args.requests.div_ceil(c).max(2).div_ceil(2);
            let (words, max_tokens) = (self.args.prompt_words, self.args.max_tokens);
            let mut halves: BTreeMap<Side, Phase> = BTreeMap::new();
            for half in 0..2 {
                for (side, _, target) in ordered(half) {
                    let phase =
                        openai_load::run_phase(&http, target, c, per_half, |client, i| Request {
                            prompt: prompt(
                                c * 10_000 + client * 1_000 + half * per_half + i,
                                words,
                            ),
                            max_tokens,
                            cache_prompt: true,
                        })
                        .await
                        .with_context(|| format!("{}: {c} clients", side.label()))?;
                    match halves.remove(side) {
                        Some(first) => halves.insert(*side, first.merge(phase)),
                        None => halves.insert(*side, phase),
                    };
                }
            }
            for (side, phase) in halves {
                let (ttft, tpot) = (phase.ttft(), phase.tpot());
                eprintln!(
                    "  {}: {c} client(s) × {}: {:.1} t/s aggregate, TTFT p50 {:.0?} p99 {:.0?}, \
                     TPOT p50 {:.1?} p99 {:.1?}",
                    side.label(),
                    2 * per_half,
                    phase.aggregate_tps(),
                    ttft.p50,
                    ttft.p99,
                    tpot.p50,
                    tpot.p99
                );
                measured.entry(side).or_default().phases.insert(c, phase);
            }
        }
        Ok(())
    }

    /// Finds (once, on the first server) how many words make a `pp_tokens`-token prompt.
    async fn pp_words(&mut self, target: &Target) -> anyhow::Result<usize> {
        if let Some(words) = self.pp_words {
            return Ok(words);
        }
        let want = self.args.pp_tokens;
        let mut words = want;
        // Probes have their own ids, so no measured prompt finds one in a prompt cache.
        for probe_id in 0..4 {
            let probe = Request {
                prompt: prompt(probe_id, words),
                max_tokens: 1,
                cache_prompt: true,
            };
            let got = openai_load::stream_one(&self.http, target, &probe).await?;
            let got = usize::try_from(got.prompt_tokens)?;
            if got == want {
                self.pp_words = Some(words);
                return Ok(words);
            }
            let next = (words + want).checked_sub(got).filter(|&w| w > 0);
            words = next.ok_or_else(|| {
                anyhow!("a prompt of {want} tokens cannot be made ({words} words → {got} tokens)")
            })?;
        }
        bail!("no prompt of exactly {want} tokens found (last tried {words} words)")
    }

    fn header(&self, bench: &LlamaBench) -> String {
        let args = &self.args;
        let s = &bench.settings;
        let mut server_args: Vec<String> = match self.api {
            Api::Chat => ["--no-jinja", "--chat-template", "gemma"]
                .map(str::to_owned)
                .into(),
            Api::Completions => Vec::new(),
        };
        server_args.extend(args.llama_server_arg.iter().cloned());
        let per_phase: Vec<String> = args
            .clients
            .iter()
            .map(|&c| {
                format!(
                    "C={c}: {} slot(s), {}×{}",
                    slots_for(c),
                    c,
                    2 * args.requests.div_ceil(c).max(2).div_ceil(2)
                )
            })
            .collect();
        format!(
            "model {} · {} threads · ctx {}/slot · {} with {} prompt words, max_tokens {}, \
             temperature 0, ignore_eos\n\
             load phases (clients × requests each): {}\n\
             llama.cpp {} (flash_attn {}, n_batch {}, n_ubatch {}, KV {}/{})\n\
             llama-server -t {t} -tb {t} -np N -c {}·N --cont-batching --no-kv-unified{}; \
             agent serve --threads {t} --slots N --ctx {}{}\n\
             ratio = ours ÷ llama.cpp (throughput: higher is better; latency: lower is better)\n",
            args.model.display(),
            args.threads,
            args.ctx,
            self.api.path(),
            args.prompt_words,
            args.max_tokens,
            per_phase.join(", "),
            s["build_commit"].as_str().unwrap_or("?"),
            match s["flash_attn"].as_i64() {
                Some(-1) => "auto",
                Some(0) => "off",
                Some(_) => "on",
                None => "?",
            },
            s["n_batch"],
            s["n_ubatch"],
            s["type_k"].as_str().unwrap_or("?"),
            s["type_v"].as_str().unwrap_or("?"),
            args.ctx,
            extra(&server_args),
            args.ctx,
            extra(&args.agent_arg),
            t = args.threads,
        )
    }

    fn table(&mut self, bench: &LlamaBench, measured: &BTreeMap<Side, Measured>) -> Table {
        let ours = measured.get(&Side::Ours);
        let llama = measured.get(&Side::Llama);
        self.check_prompts(ours, llama);
        let mut t = Table::default();
        let pp = |m: Option<&Measured>| m.and_then(|m| median(m.pp.iter().map(Sample::prompt_tps)));
        let tg = |m: Option<&Measured>| {
            m.and_then(|m| median(m.tg.iter().filter_map(Sample::decode_tps)))
        };
        let agg = |m: Option<&Measured>, c: usize| {
            m.and_then(|m| m.phases.get(&c)).map(Phase::aggregate_tps)
        };
        let pp_n = self.args.pp_tokens;
        let tg_n = self.args.max_tokens;

        // Prefer llama-bench runs interleaved with ours (medians); else the one run at start.
        let (bench_pp, bench_tg, bench_label) = if self.interleaved.is_empty() {
            (bench.pp.0, bench.tg.0, "")
        } else {
            (
                median(self.interleaved.iter().map(|b| b.pp.0)).unwrap_or(bench.pp.0),
                median(self.interleaved.iter().map(|b| b.tg.0)).unwrap_or(bench.tg.0),
                " (interleaved, medians)",
            )
        };
        t.row(
            &format!(
                "prompt t/s, {pp_n} tokens: API (usage ÷ TTFT) vs llama-bench pp{pp_n}{bench_label}"
            ),
            pp(ours),
            Some(bench_pp),
            Unit::Tps,
            Some(Check::Ratio(0.95)),
        );
        t.row(
            &format!(
                "decode t/s, 1 stream, {tg_n} tokens: API vs llama-bench tg{tg_n}{bench_label}"
            ),
            tg(ours),
            Some(bench_tg),
            Unit::Tps,
            Some(Check::Ratio(0.97)),
        );
        t.row(
            &format!("prompt t/s, {pp_n} tokens: API vs llama-server API"),
            pp(ours),
            pp(llama),
            Unit::Tps,
            None,
        );
        let server_pp = llama.and_then(|m| {
            median(
                m.pp.iter()
                    .filter_map(|s| s.timings.as_ref()?["prompt_per_second"].as_f64()),
            )
        });
        t.row(
            "  (llama-server's own timings.prompt_per_second)",
            None,
            server_pp,
            Unit::Tps,
            None,
        );
        t.row(
            "decode t/s, 1 stream: API vs llama-server API",
            tg(ours),
            tg(llama),
            Unit::Tps,
            None,
        );
        for &c in &self.args.clients {
            let target = (c >= 4).then_some(Check::Ratio(1.0));
            t.row(
                &format!(
                    "aggregate tg t/s, {c} client(s), {} slot(s): vs llama-server -np {}",
                    slots_for(c),
                    slots_for(c)
                ),
                agg(ours, c),
                agg(llama, c),
                Unit::Tps,
                target,
            );
            if c >= 4 {
                let scaling = |m| Some(agg(m, c)? / agg(m, 1)?);
                t.row(
                    &format!("scaling: aggregate at {c} clients ÷ own aggregate at 1 client"),
                    scaling(ours),
                    scaling(llama),
                    Unit::Times,
                    Some(Check::Ours(1.5)),
                );
            }
        }
        let latency = |m: Option<&Measured>, c: usize, ttft: bool, p99: bool| {
            let phase = m?.phases.get(&c)?;
            let p = if ttft { phase.ttft() } else { phase.tpot() };
            Some(if p99 { p.p99 } else { p.p50 }.as_secs_f64() * 1e3)
        };
        for (ttft, what) in [(true, "TTFT"), (false, "TPOT")] {
            for &c in &self.args.clients {
                let n = llama
                    .and_then(|m| m.phases.get(&c))
                    .map_or(0, |p| p.samples.len());
                for (p99, pname) in [(false, "p50"), (true, "p99")] {
                    t.row(
                        &format!("{what} {pname} ms, {c} client(s) (n={n})"),
                        latency(ours, c, ttft, p99),
                        latency(llama, c, ttft, p99),
                        Unit::Ms,
                        None,
                    );
                }
            }
        }
        t
    }

    /// Notes when the two sides were not given the same number of prompt tokens.
    fn check_prompts(&mut self, ours: Option<&Measured>, llama: Option<&Measured>) {
        let (Some(ours), Some(llama)) = (ours, llama) else {
            return;
        };
        let tokens = |s: &[Sample]| s.iter().map(|s| s.prompt_tokens).collect::<Vec<_>>();
        let mut pairs = vec![
            ("prompt".to_owned(), tokens(&ours.pp), tokens(&llama.pp)),
            ("decode".to_owned(), tokens(&ours.tg), tokens(&llama.tg)),
        ];
        for (c, phase) in &ours.phases {
            if let Some(theirs) = llama.phases.get(c) {
                pairs.push((
                    format!("{c}-client"),
                    phase.prompt_tokens(),
                    theirs.prompt_tokens(),
                ));
            }
        }
        for (side, m) in [("ours", ours), ("llama-server", llama)] {
            let cached: u64 = m.pp.iter().map(|s| s.cached_tokens).sum();
            if cached > 0 {
                self.notes.push(format!(
                    "UNFAIR: {side} took {cached} prompt tokens from its cache in the \
                     prompt-processing requests, which asked for none"
                ));
            }
        }
        let mut all_equal = true;
        for (what, a, b) in pairs {
            if a != b {
                all_equal = false;
                let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
                self.notes.push(format!(
                    "UNFAIR: {what} requests had different prompt token counts \
                     (ours mean {:.1}, llama-server mean {:.1})",
                    mean(&a),
                    mean(&b)
                ));
            }
        }
        if all_equal {
            let mean = llama
                .phases
                .values()
                .flat_map(|p| p.prompt_tokens())
                .sum::<u64>() as f64
                / llama
                    .phases
                    .values()
                    .map(|p| p.samples.len())
                    .sum::<usize>()
                    .max(1) as f64;
            self.notes.push(format!(
                "usage.prompt_tokens identical on both sides for every request \
                 (load phases: mean {mean:.1} prompt tokens)"
            ));
        }
    }
}

#[derive(Clone, Copy)]
enum Unit {
    Tps,
    Ms,
    Times,
}

impl Unit {
    fn show(self, value: Option<f64>) -> String {
        match (self, value) {
            (_, None) => "-".to_owned(),
            (Unit::Tps, Some(v)) => format!("{v:.1}"),
            (Unit::Ms, Some(v)) => format!("{v:.1}"),
            (Unit::Times, Some(v)) => format!("{v:.2}×"),
        }
    }
}

/// A target: on the ratio ours ÷ llama.cpp, or on our own value.
#[derive(Clone, Copy)]
enum Check {
    Ratio(f64),
    Ours(f64),
}

struct Row {
    name: String,
    ours: String,
    llama: String,
    ratio: String,
    target: String,
    result: String,
}

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
    missed: usize,
}

impl Table {
    const HEADINGS: [&str; 6] = [
        "measurement",
        "ours",
        "llama.cpp",
        "ratio",
        "target",
        "result",
    ];

    fn row(
        &mut self,
        name: &str,
        ours: Option<f64>,
        llama: Option<f64>,
        unit: Unit,
        check: Option<Check>,
    ) {
        let ratio = ours.zip(llama).map(|(o, l)| o / l);
        let (target, result) = match check {
            None => (String::new(), String::new()),
            Some(check) => {
                let (min, value, label) = match check {
                    Check::Ratio(min) => (min, ratio, format!("ratio ≥ {min:.2}")),
                    Check::Ours(min) => (min, ours, format!("ours ≥ {min:.2}×")),
                };
                let result = match value {
                    None => "n/a".to_owned(),
                    Some(v) if v >= min => "PASS".to_owned(),
                    Some(_) => {
                        self.missed += 1;
                        "FAIL".to_owned()
                    }
                };
                (label, result)
            }
        };
        self.rows.push(Row {
            name: name.to_owned(),
            ours: unit.show(ours),
            llama: unit.show(llama),
            ratio: ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}")),
            target,
            result,
        });
    }

    fn cells(row: &Row) -> [&str; 6] {
        [
            &row.name,
            &row.ours,
            &row.llama,
            &row.ratio,
            &row.target,
            &row.result,
        ]
    }

    fn plain(&self) -> String {
        let mut widths = Self::HEADINGS.map(|h| h.chars().count());
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(Self::cells(row)) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: [&str; 6]| {
            let mut out = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                let pad = " ".repeat(w - cell.chars().count());
                if i == 0 {
                    let _ = write!(out, "{cell}{pad}");
                } else {
                    let _ = write!(out, "  {pad}{cell}");
                }
            }
            out.trim_end().to_owned()
        };
        let mut out = line(Self::HEADINGS);
        out.push('\n');
        out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
        for row in &self.rows {
            out.push('\n');
            out.push_str(&line(Self::cells(row)));
        }
        out
    }

    fn markdown(&self) -> String {
        let mut out = format!(
            "| {} |\n|---|---:|---:|---:|---|---|\n",
            Self::HEADINGS.join(" | ")
        );
        for row in &self.rows {
            let cells = Self::cells(row).map(|c| c.trim().replace('|', "\\|"));
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        out
    }

    fn missed(&self) -> usize {
        self.missed
    }
}
