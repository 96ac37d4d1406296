#!/usr/bin/env bash
# Install isara (README quick start):  bash install.sh          the pipeline
#                                       bash install.sh test     the pipeline and its tests
#
# Why a script and not a bare `pip install -e .`: llama-cpp-python ships only a source package on PyPI, so pip
# compiles llama.cpp (about 4 of the 5 minutes on 2 cores) and plain pip prints nothing for those minutes. This
# runs pip verbosely, keeps the full log in .install.log, and shows only one line per package and the
# compiler's own step counter ([12/140] ggml.c). pip caches the built wheel: the next install takes seconds.
# llama.cpp is built without its multimodal (llava/mtmd) library, which isara never loads; CMAKE_ARGS set by
# you (e.g. -DGGML_CUDA=on for a GPU build) replaces that default.
set -uo pipefail
cd "$(dirname "$0")"
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
log=.install.log
echo "isara: installing .${extras} (6-12 minutes on 2 cores, most of it compiling llama.cpp; full log: $log)"
start=$SECONDS
python -m pip install -v -e ".${extras}" 2>&1 | tee "$log" \
  | grep --line-buffered -E '^Collecting |^Building wheel|^Successfully installed|^\s*\[[0-9]+/[0-9]+\] ' \
  | sed -u -E 's/^\s*(\[[0-9]+\/[0-9]+\]).*[ \/]([^ \/]+)\s*$/  llama.cpp \1 \2/'
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  tail -n 40 "$log"
  echo "isara: install failed (pip exit $status); the full log is $log" >&2
  exit "$status"
fi
echo "isara: installed in $((SECONDS - start)) s"
