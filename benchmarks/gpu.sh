#!/usr/bin/env bash
# The GPU checks and benchmarks in one call on the lent GPU machine (H100/H200, Python 3.12,
# torch with CUDA; no network there).
#
# Here, once (downloads the two wheels the GPU image lacks, faiss-cpu and nltk, into .whl/,
# which git ignores):
#     bash benchmarks/gpu.sh --fetch-wheels
# Then through the device tool, from the repo root:
#     run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540)
#
# Steps, most important first; each has its own time cap and the whole run stops starting new
# steps after GPU_BUDGET_S seconds (default 470), so what finished always comes back:
#   1. the CUDA tests (`pytest -k cuda`: float64 parity of every scorer on the GPU, the torch
#      Hamming search against FAISS, Index / CLI answers on the GPU against the CPU's, prototype
#      image codes built on the GPU against the CPU's), and
#      tests/test_omp_threads.py (per-thread torch thread counts in the CUDA build);
#   2. coco-sim test split (simulated image features; generated here, byte-identical to the
#      CPU one): `build --device cuda`, `query --device cuda`, `bench --device cuda` (and again
#      with --no-warmup, in gpu.log only), and
#      benchmarks/profile_rerank.py (first HEI pass against later ones, and where a warm one's
#      time goes; in gpu.log only);
#   3. benchmarks/scale.py (COCO-5K size, random features) in float32: every caption scored
#      exhaustively (no extrapolation; the reference loop is still timed on 100 captions);
#   4. benchmarks/latency.py on the GPU (synthetic COCO-5K size, and the coco-sim index: text and
#      image queries, one at a time and in batches of 100);
#   5. bench and scale.py in bfloat16; HEI with the old 1 GiB re-ranking chunks (scale-gather);
#   6. the same bench on this machine's CPU (baseline), and benchmarks/threads.py there (how
#      re-ranking's chunks use the CPU's threads; in gpu.log only).
# Output in $OUT (the device tool's folder; benchmarks/gpu-out/ when OUT is unset): gpu.log
# (every step's output and its wall seconds) and one JSON per bench or benchmark (8 files at
# most come back). GPU_STEPS=tests,bench-cuda,... runs only the steps named; SCALE_STAGES
# narrows scale-float32 (e.g. to hei).
#
# A dry run of the script's plumbing on a machine without a GPU (small sizes, CPU only):
#     GPU_DRY_RUN=1 PYTHON=.venv/bin/python bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl faiss-cpu==1.15.1 nltk==3.10.4
    exit
fi
out="${OUT:-benchmarks/gpu-out}"
mkdir -p "$out"
log="$out/gpu.log"
budget="${GPU_BUDGET_S:-470}"
start=$SECONDS

export PY="${PYTHON:-python3}" PYTHONUNBUFFERED=1 sim=/tmp/coco-sim-test
if [ -n "${GPU_DRY_RUN:-}" ]; then
    dev=cpu scale_size=(--images 200 --d 64) lat_size=(--images 200 --d 64 --queries 20) cpu_threads=2
    prof_args=(--repeats 1 --exhaustive 0 --threads 1)
else
    dev=cuda scale_size=() lat_size=() cpu_threads="$(nproc),4,2" prof_args=()
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheel install failed" >>"$log"; exit 1; }
    ln -sfn "$PWD/cli" /tmp/site/heiindex_cli # the CLI package, as pyproject.toml maps it
    export PYTHONPATH="/tmp/site:$PWD"
fi
hx() { "$PY" -c 'from heiindex_cli.main import cli; cli(prog_name="heiindex")' "$@"; }

# step NAME CAP_SECONDS COMMAND...: run with a time cap inside what is left of the budget
# (only the steps named in GPU_STEPS, comma-separated, when it is set).
step() {
    local name=$1 cap=$2
    shift 2
    if [ -n "${GPU_STEPS:-}" ] && [[ ",$GPU_STEPS," != *",$name,"* ]]; then
        return
    fi
    local left=$((budget - (SECONDS - start)))
    if [ "$left" -lt 15 ]; then
        echo "=== $name: skipped, budget spent" | tee -a "$log"
        return
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "=== $name (cap $cap s)" >>"$log"
    local t0=$SECONDS rc=0
    timeout "$cap" bash -c '"$@"' _ "$@" >>"$log" 2>&1 || rc=$?
    echo "=== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; "$PY" -c 'import torch; print("torch", torch.__version__)'; } >>"$log" 2>&1

step tests 150 "$PY" -m pytest -q -p no:cacheprovider -rs -k "cuda and not without" \
    tests/test_attention.py tests/test_hamming.py tests/test_index.py tests/test_cli.py tests/test_prototypes.py
# the per-thread torch thread count (heiindex.omp_threads) with the CUDA build's OpenMP and MKL
step omp-threads 30 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_omp_threads.py

gen_test_split() {
    "$PY" - "$sim/precomp" <<'EOF'
import sys
from pathlib import Path
from heiindex.simulate import CAPTIONS_PER_IMAGE, TEST_IMAGES, read_captions, simulate_images
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
lines = read_captions(Path("data/coco-captions/testall_caps.txt"))[: TEST_IMAGES * CAPTIONS_PER_IMAGE]
(out / "test_caps.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
simulate_images(lines, out / "test_ims.npy")
EOF
    hx ingest --precomp "$sim/precomp" --split test --out "$sim/store" --vocab data/coco-captions/coco_precomp_vocab.json
}
bench() { # bench JSON_FILE [options]: the coco-sim test bench at N = 100
    local f=$1
    shift
    hx bench --index "$sim/index" --topk 100 --json "$@" >"$f"
}
export -f hx gen_test_split bench

step coco-sim-test-split 60 gen_test_split
step build 90 hx build --store "$sim/store" --split test --out "$sim/index" --device $dev
step query 30 hx query "a dog on grass" --index "$sim/index" --device $dev --json
step bench-$dev 90 bench "$out/bench_$dev.json" --device $dev
# the same without the bench's warm-up pass: what a cold process's first passes pay (in gpu.log only)
step bench-$dev-cold 90 hx bench --index "$sim/index" --topk 100 --json --device $dev --no-warmup
step profile-rerank 60 "$PY" benchmarks/profile_rerank.py --index "$sim/index" --device $dev "${prof_args[@]}"
step scale-float32 150 "$PY" benchmarks/scale.py --device $dev --stages "${SCALE_STAGES:-reference,exhaustive,hei}" \
    --exhaustive-queries 25000 --reference-queries 100 \
    "${scale_size[@]}" --json "$out/scale_float32.json"
step latency 60 "$PY" benchmarks/latency.py --device $dev --batch 100 "${lat_size[@]}" --json "$out/latency.json"
step latency-index 60 "$PY" benchmarks/latency.py --index "$sim/index" --device $dev --batch 100 --json "$out/latency_index.json"
step bench-$dev-bf16 60 bench "$out/bench_${dev}_bf16.json" --device $dev --dtype bfloat16
step scale-gather 120 "$PY" benchmarks/scale.py --device $dev --stages hei --gpu-gather-gb 1 "${scale_size[@]}"
step scale-bfloat16 90 "$PY" benchmarks/scale.py --device $dev --dtype bfloat16 --stages exhaustive,hei \
    --exhaustive-queries 25000 "${scale_size[@]}" --json "$out/scale_bfloat16.json"
step bench-cpu 120 bench "$out/bench_cpu.json" --device cpu
step threads-cpu 90 "$PY" benchmarks/threads.py --index "$sim/index" --threads "$cpu_threads" \
    --configs library,workers:all,serial,workers:2 --budget 60
echo "total $((SECONDS - start)) s" | tee -a "$log"
