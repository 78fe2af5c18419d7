#!/usr/bin/env bash
# Builds the llama.cpp peer of `scripts/bench.py --peer llamacpp` natively (-DGGML_NATIVE=ON:
# AVX-512, VNNI and, on CPUs that have it, AMX), once, outside the project's environment:
#   llama-cpp-python into $TARGET (bench.py --llamacpp-path), llama-bench and
#   llama-batched-bench into $SOURCE/build/bin (llama-bench's pp / tg in the same tables).
#
#   bash scripts/build_llamacpp.sh [TARGET=/tmp/llamacpp] [SOURCE=/tmp/llsrc]
#
# One patch: GCC 12 drops the stores that fill ggml's AMX tile configuration before ldtilecfg
# (it does not see the instruction read them), and the first AMX product then dies with SIGILL.
# An empty asm with a memory clobber keeps them (BENCHMARKS.md, "AMX tiles"). It changes nothing
# where the build has no AMX. About 20 minutes on 2 cores.
set -euo pipefail
TARGET=${1:-/tmp/llamacpp}
SOURCE=${2:-/tmp/llsrc}
VERSION=0.3.36  # llama-cpp-python; it vendors llama.cpp (ggml 0.25.3)
mkdir -p "$SOURCE"
if [ ! -d "$SOURCE/llama_cpp_python-$VERSION" ]; then
  python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SOURCE"
  tar xzf "$SOURCE/llama_cpp_python-$VERSION.tar.gz" -C "$SOURCE"
fi
PACKAGE="$SOURCE/llama_cpp_python-$VERSION"
MMQ="$PACKAGE/vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp"
if ! grep -q 'asm volatile("" : : "r"(&tc) : "memory")' "$MMQ"; then
  python3 - "$MMQ" <<'EOF'
import sys
path = sys.argv[1]
text = open(path).read()
call = "    _tile_loadconfig(&tc);"
if text.count(call) != 1:
    sys.exit(f"build_llamacpp.sh: {path}: expected one '{call.strip()}' to patch")
open(path, "w").write(text.replace(call, '    asm volatile("" : : "r"(&tc) : "memory");\n' + call))
EOF
fi
# the Python binding (bench_llamacpp.py's timing jobs), from the patched source folder
CMAKE_ARGS="-DGGML_NATIVE=on -DLLAVA_BUILD=off" CMAKE_BUILD_PARALLEL_LEVEL=2 \
  python3 -m pip install --no-deps --target "$TARGET" "$PACKAGE"
python3 -m pip install --no-deps --target "$TARGET" diskcache  # its one missing import
cmake -S "$PACKAGE/vendor/llama.cpp" -B "$SOURCE/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
cmake --build "$SOURCE/build" --target llama-bench llama-batched-bench -j2
echo "llama.cpp peer: --llamacpp-path $TARGET; LD_LIBRARY_PATH=$SOURCE/build/bin $SOURCE/build/bin/llama-bench"
