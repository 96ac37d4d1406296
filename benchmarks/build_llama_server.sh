#!/usr/bin/env bash
# Build llama.cpp's own HTTP server (llama-server, with --parallel N slots) from the llama.cpp source that the
# installed llama-cpp-python's sdist vendors, so the server and the in-process engine run the same llama.cpp.
#
#   bash benchmarks/build_llama_server.sh                 # -> .llama-server/bin/llama-server (git-ignored)
#   bash benchmarks/build_llama_server.sh /opt/llama      # -> /opt/llama/bin/llama-server
#   CMAKE_ARGS="-DGGML_CUDA=on" JOBS=14 bash benchmarks/build_llama_server.sh    # a CUDA build
#
# Then point isara at it: params engine.server_binary: .llama-server/bin/llama-server (or put it on PATH).
# Nothing is downloaded but the sdist from PyPI (pip download); the web UI's assets are neither built (npm) nor
# fetched: the server's /v1/completions does not need them. Prints the build's wall time at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=$(realpath -m "${1:-.llama-server}")
jobs=${JOBS:-$(nproc)}
version=${LLAMA_CPP_PYTHON_VERSION:-$(python -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')}
work=${WORK_DIR:-$(mktemp -d)}
start=$SECONDS

if [ ! -d "$work/llama_cpp_python-$version/vendor/llama.cpp" ]; then
  python -m pip download --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$work"
  tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
fi
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
fetched=$((SECONDS - start))

# shellcheck disable=SC2086  # CMAKE_ARGS is a list of flags
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  ${CMAKE_ARGS:-} >"$work/cmake.log"
cmake --build "$work/build" --target llama-server -j "$jobs"
mkdir -p "$prefix/bin"
cp "$work/build/bin/llama-server" "$prefix/bin/llama-server"
"$prefix/bin/llama-server" --version 2>&1 | head -n 2 || true
echo "llama-server (llama-cpp-python $version's llama.cpp): $prefix/bin/llama-server; sdist fetched in ${fetched} s," \
     "built in $((SECONDS - start - fetched)) s with $jobs jobs"
