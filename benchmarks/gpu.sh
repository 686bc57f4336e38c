#!/usr/bin/env bash
# The GPU benchmarks in one call on the lent GPU machine (H100/H200, Python 3.12, torch with
# CUDA; no network there).
#
# Here, once (downloads the two wheels the GPU image lacks, faiss-cpu and nltk, into .whl/,
# which git ignores):
#     bash benchmarks/gpu.sh --fetch-wheels
# Then through the device tool, from the repo root:
#     run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540)
# It writes scale_float32.json, scale_bfloat16.json, latency.json and gpu.txt to $OUT (the
# device tool's output folder), or to benchmarks/gpu-out/ when OUT is unset.
#
# scale.py on the GPU scores every caption exhaustively (no extrapolation) but still times the
# reference loop on a subset (it is launch-bound: 25,000 captions x 40 shards of kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl faiss-cpu==1.15.1 nltk==3.10.4
    exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/gpu-out}"
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c 'import torch; print("torch", torch.__version__)'; } | tee "$out/gpu.txt"
python3 benchmarks/scale.py --device cuda --exhaustive-queries 25000 --reference-queries 100 --json "$out/scale_float32.json"
python3 benchmarks/scale.py --device cuda --dtype bfloat16 --stages exhaustive,hei --exhaustive-queries 25000 \
    --json "$out/scale_bfloat16.json"
python3 benchmarks/latency.py --device cuda --json "$out/latency.json"
