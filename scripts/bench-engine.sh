#!/usr/bin/env bash
# Our node agent's OpenAI-compatible API against llama.cpp's own llama-bench and llama-server,
# on the same model (gemma 3 270M Q4_K_M) and thread count, in one run; prints one table of
# ours / llama.cpp / ratio with PASS/FAIL on the targets. Works on a fresh Debian machine:
# installs what is missing, builds llama.cpp's two tools once (cached under target/llama-tools/)
# and our binaries in release.
#
#   scripts/bench-engine.sh [--markdown FILE] [--requests N] [--clients 1,2,4,8] [--strict] …
#
# Extra arguments go to steward-engine-bench (`--help` lists them). About ten minutes on 2
# cores, after the builds.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/setup.sh
. scripts/lib/llama-tools.sh

ensure_toolchain
ensure_python_tools
ensure_models
ensure_llama_tools

log "building steward-node-agent and steward-engine-bench (release)"
cargo build --release -p steward-node-agent -p steward-tests --bins --locked

log "running the engine benchmark"
target/release/steward-engine-bench \
  --model target/models/gemma3-270m-q4_k_m.gguf \
  --threads 2 \
  --llama-bench "$LLAMA_BENCH" \
  --llama-server "$LLAMA_SERVER" \
  --agent target/release/steward-node-agent \
  "$@"
