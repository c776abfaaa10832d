#!/usr/bin/env bash
# The demo: a control plane (embedded SQLite) and one local node agent on this machine,
# enrolled with a single-use token over mTLS, then the fleet as the admin CLI shows it.
# Ctrl-C stops both. Set STEWARD_DEMO_EXIT=1 to stop right after showing the fleet.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/setup.sh
ensure_toolchain

log "building steward-control-plane, steward-node-agent and steward"
cargo build --locked --workspace --bins
bin=target/debug
demo=.steward-demo
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

log "starting a node agent (data in $demo/agent)"
"$bin/steward-node-agent" --control-plane "$STEWARD_ENDPOINT" --data-dir "$demo/agent" \
  --token "$enroll" --name demo-node 2>"$demo/agent.log" &
pids+=($!)
for _ in $(seq 1 100); do
  "$bin/steward" nodes list 2>/dev/null | grep -q 'Ready' && break
  sleep 0.3
done

echo
"$bin/steward" nodes list
echo
"$bin/steward" nodes show demo-node
cat <<TXT

The fleet is running. In another shell:
  export STEWARD_TOKEN=$STEWARD_TOKEN
  export STEWARD_ENDPOINT=$STEWARD_ENDPOINT STEWARD_CA_FILE=$PWD/$STEWARD_CA_FILE
  $bin/steward nodes list          # also: nodes show|cordon|drain|uncordon, token create|list|revoke
  curl -s http://127.0.0.1:9464/metrics | grep ^steward_
Logs: $demo/control-plane.log, $demo/agent.log
TXT
if [ "${STEWARD_DEMO_EXIT:-0}" = 1 ] || [ "${CI:-}" = true ]; then exit 0; fi
echo "Ctrl-C stops the demo."
wait
