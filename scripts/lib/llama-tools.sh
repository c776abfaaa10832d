# llama.cpp's own `llama-bench` and `llama-server`, the reference scripts/bench-engine.sh
# measures our engine against. Source it after scripts/lib/setup.sh (it uses `log`,
# `apt_install` and `ensure_python_tools`); run from the repository root.
#
# The source is the llama.cpp that the PyPI sdist of llama-cpp-python vendors (PyPI is a
# registry every machine of this project reaches; GitHub is not). Only the two tools are built,
# in Release, for this machine's CPU (llama.cpp's default GGML_NATIVE=ON, as our engine's build
# does through `-C target-cpu=native`), without HTTPS, downloads or the web UI. The binaries
# are cached under target/llama-tools/bin/, so a second call returns at once.

# Pinned: its vendored llama.cpp (ggml 0.25.3, llama.cpp 0c1e57098) is close to the one
# llama-cpp-sys-2 0.1.161 builds into our engine (ggml 0.26.0).
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}

# Exports LLAMA_BENCH, LLAMA_SERVER and LLAMA_BATCHED_BENCH (absolute paths). The last one is
# for reading llama.cpp's own multi-stream scaling on a machine (docs/BENCHMARKS.md).
ensure_llama_tools() {
  local root=target/llama-tools
  local bin=$root/bin/$LLAMA_CPP_PYTHON_VERSION-noamx
  export LLAMA_BENCH=$PWD/$bin/llama-bench
  export LLAMA_SERVER=$PWD/$bin/llama-server
  export LLAMA_BATCHED_BENCH=$PWD/$bin/llama-batched-bench
  if [ -x "$LLAMA_BENCH" ] && [ -x "$LLAMA_SERVER" ] && [ -x "$LLAMA_BATCHED_BENCH" ]; then
    return 0
  fi

  if ! command -v cmake >/dev/null 2>&1; then
    log "installing cmake (to build llama.cpp's reference tools)"
    apt_install cmake
  fi
  if ! command -v c++ >/dev/null 2>&1; then
    log "installing a C++ compiler (to build llama.cpp's reference tools)"
    apt_install build-essential
  fi
  ensure_python_tools

  local name=llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION
  local src=$root/src/$name
  if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
    log "fetching llama.cpp (vendored in the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist) from PyPI"
    mkdir -p "$root/src"
    if [ ! -f "$root/src/$name.tar.gz" ]; then
      .venv/bin/pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$root/src"
    fi
    rm -rf "$src"
    tar -xzf "$root/src/$name.tar.gz" -C "$root/src"
  fi

  local build=$root/build/$LLAMA_CPP_PYTHON_VERSION
  log "building llama-bench, llama-server and llama-batched-bench (Release, GGML_NATIVE; several minutes on 2 cores)"
  # LLAMA_CURL is gone from this llama.cpp (HTTPS is LLAMA_OPENSSL now); LLAMA_BUILD_NUMBER and
  # LLAMA_BUILD_COMMIT keep its build-info from reading this repository's git history (the
  # unpacked sdist is not a git checkout, but it lies inside ours).
  # No AMX kernels (they crash on Sapphire Rapids; see .cargo/config.toml): the same
  # kernels as our engine's build.
  local no_amx=""
  if [ "$(uname -m)" = x86_64 ]; then no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"; fi
  cmake -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
    -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_NUMBER=0 -DLLAMA_BUILD_COMMIT="llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION" \
    >"$root/cmake-configure.log" 2>&1 ||
    { log "cmake configure failed; see $root/cmake-configure.log"; tail -n 30 "$root/cmake-configure.log" >&2; exit 1; }
  cmake --build "$build" --config Release -j2 --target llama-bench llama-server llama-batched-bench \
    >"$root/cmake-build.log" 2>&1 ||
    { log "llama.cpp build failed; see $root/cmake-build.log"; tail -n 30 "$root/cmake-build.log" >&2; exit 1; }

  mkdir -p "$bin"
  local tool
  for tool in llama-bench llama-server llama-batched-bench; do
    install -m 0755 "$build/bin/$tool" "$bin/$tool.part"
    mv "$bin/$tool.part" "$bin/$tool"
  done
}
