#!/usr/bin/env bash
# Issue 26's GPU check: a K = 3 per-layer search on Llama-3-8B-shaped models (random weights, built
# on the machine) within 24 GB of one GPU, inputs in host memory (/dev/shm: the mapped files are
# host memory, not copied again). One call of under 10 minutes; the rows land in $OUT.
#
# Prepare here (once; .gpu/ is ignored by git and carried to the device machine):
#   bash benchmarks/gpu_scale.sh --prepare
# Run there:
#   run(command="bash benchmarks/gpu_scale.sh", carry=[".gpu"], timeout_s=590)
#
# What it should confirm (docs/scale.md, "A 24 GB GPU and an 8B model"): the live model (16.1 GB
# bf16) is the only model on the GPU; the inputs in flight are at most the largest tensor's
# (1 + K) copies twice over (embeddings: 4 x 1.05 GB, plus the next tensor's), so peak GPU memory
# stays near 16.1 + 4.7 GB plus evaluation's batch; the device placement (64 GB of inputs + 16 GB)
# is refused before loading; a candidate moves 64 GB host -> device (about 2-3 s over PCIe Gen5
# from pinned memory, 5-7 s from pageable /dev/shm pages).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .gpu/whl .gpu/tok
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  cp "${MERGESEARCH_HOME:-$HOME/.cache/mergesearch}"/smollm2/SmolLM2-135M-Instruct-v*/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/tok/
  # what the device image lacks of the pinned set (reqs/requirements-lock.txt), for its Python 3.12
  for spec in optuna==5.0.0 alembic==1.20.1 Mako==1.4.3 colorlog==6.12.0 SQLAlchemy==2.1.9; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .gpu/whl "$spec"
  done
  du -sh .gpu
  exit 0
fi
OUT=${OUT:-/tmp/gpu_scale_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 MERGESEARCH_HOME=/tmp/mshome
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
need=70000000000  # 4 models x 16.1 GB, and room to spare
root=/dev/shm/scale
if [ "$(df --output=avail -B1 /dev/shm | tail -1)" -lt "$need" ]; then root=/tmp/scale; fi
echo "models under $root" | tee -a "$OUT/gpu.txt"
python3 benchmarks/bench_scale.py --shape llama3-8b --device cuda --cap-gb 24 --root "$root" \
  --tokenizer .gpu/tok --placements disk,device --trials 4 --examples 32 --out "$OUT/gpu_scale.json" \
  2>&1 | tee "$OUT/gpu_scale.log"
