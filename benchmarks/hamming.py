"""Hamming search at scale: IndexBinaryFlat vs IndexBinaryIVF vs IndexBinaryHNSW.

n codes of k bits, 1,000 queries, top-100. For each index: build seconds, search seconds and
recall@100 against the flat (exact) result. Two kinds of codes:

* ``random``: uniform bits, no structure at all: the worst case for IVF and HNSW;
* ``clustered``: codes scattered around 4,096 random centres, each bit flipped with
  probability 0.15 (queries drawn the same way), a stand-in for trained hash codes, which
  group semantically similar items.

torch is imported and used (a matrix product spins up its OpenMP pool) in the same process
before any search, as in heiindex; ``--omp-check`` also times the first flat search in a child
process that never imports torch, so the cost of the OpenMP clash (if any) is a ratio from one
run. The table at the end is Markdown for ``benchmarks/RESULTS.md``.

    python benchmarks/hamming.py --codes 1000000 --bits 64,128 --structure random,clustered
    python benchmarks/hamming.py --codes 10000000 --bits 64,128 --nlist 4096 --nprobe 16,64 --no-hnsw
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from heiindex.hamming import make_binary_index  # imports heiindex first: OMP_WAIT_POLICY is set here

CENTRES = 4096
FLIP = 0.15


def recall_at(ids: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(a[a >= 0]) & set(b)) for a, b in zip(ids, truth, strict=True)]
    return float(np.sum(hits) / truth.size)


def timed_search(index, xq: np.ndarray, topk: int, truth: np.ndarray) -> dict:
    t0 = time.perf_counter()
    _, ids = index.search(xq, topk)
    return {"search_s": time.perf_counter() - t0, "recall": recall_at(ids, truth)}


def make_codes(rng: np.random.Generator, n: int, bits: int, structure: str, centres=None) -> np.ndarray:
    """n packed codes, in blocks so that 10M codes never need a 10M x bits boolean array."""
    out = np.empty((n, bits // 8), dtype=np.uint8)
    for s in range(0, n, 1_000_000):
        m = min(1_000_000, n - s)
        if structure == "random":
            out[s : s + m] = rng.integers(0, 256, (m, bits // 8), dtype=np.uint8)
        else:
            flips = np.packbits(rng.random((m, bits)) < FLIP, axis=1)
            out[s : s + m] = centres[rng.integers(0, len(centres), m)] ^ flips
    return out


def flat_search_without_torch(bits: int, n: int, queries: int, topk: int) -> float:
    """Seconds of the same flat search in a fresh process that never imports torch."""
    code = f"""
import time, numpy as np, faiss
rng = np.random.default_rng(0)
xb = rng.integers(0, 256, ({n}, {bits // 8}), dtype=np.uint8)
xq = rng.integers(0, 256, ({queries}, {bits // 8}), dtype=np.uint8)
index = faiss.IndexBinaryFlat({bits}); index.add(xb)
t0 = time.perf_counter(); index.search(xq, {topk}); print(time.perf_counter() - t0)
"""
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    import faiss
    import torch

    torch.ones(512, 512) @ torch.ones(512, 512)  # torch's OpenMP threads are now up, as in heiindex

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", default="1000000", help="comma-separated code counts")
    ap.add_argument("--bits", default="64,128")
    ap.add_argument("--structure", default="random,clustered")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--nlist", default="1024,4096")
    ap.add_argument("--nprobe", default="8,32,128")
    ap.add_argument("--hnsw-m", type=int, default=16)
    ap.add_argument("--no-hnsw", action="store_true", help="skip HNSW (its build is the slowest part)")
    ap.add_argument("--omp-check", action="store_true", help="also time flat search in a process without torch")
    args = ap.parse_args()
    rows = []

    def record(**row) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for n in (int(x) for x in args.codes.split(",")):
        for bits in (int(b) for b in args.bits.split(",")):
            for structure in args.structure.split(","):
                rng = np.random.default_rng(0)
                # drawn for both kinds, so each kind's codes come from the stream the recorded runs used
                centres = rng.integers(0, 256, (CENTRES, bits // 8), dtype=np.uint8)
                xb = make_codes(rng, n, bits, structure, centres)
                xq = make_codes(rng, args.queries, bits, structure, centres)
                common = {"codes": n, "bits": bits, "structure": structure}
                t0 = time.perf_counter()
                flat = make_binary_index(xb, "flat")
                build = time.perf_counter() - t0
                t0 = time.perf_counter()
                _, truth = flat.search(xq, args.topk)
                record(**common, index="flat", build_s=build, search_s=time.perf_counter() - t0, recall=1.0)
                for nlist in (int(x) for x in args.nlist.split(",")):
                    t0 = time.perf_counter()
                    ivf = make_binary_index(xb, "ivf", nlist=nlist)
                    build = time.perf_counter() - t0
                    for nprobe in (int(x) for x in args.nprobe.split(",")):
                        ivf.nprobe = nprobe
                        searched = timed_search(ivf, xq, args.topk, truth)
                        record(**common, index=f"ivf nlist={nlist} nprobe={nprobe}", build_s=build, **searched)
                    del ivf
                if not args.no_hnsw:
                    t0 = time.perf_counter()
                    hnsw = make_binary_index(xb, "hnsw", hnsw_m=args.hnsw_m)
                    build = time.perf_counter() - t0
                    searched = timed_search(hnsw, xq, args.topk, truth)
                    record(**common, index=f"hnsw M={args.hnsw_m}", build_s=build, **searched)
                    del hnsw
    if args.omp_check:
        n, bits = int(args.codes.split(",")[0]), int(args.bits.split(",")[0])
        rng = np.random.default_rng(0)
        xb = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
        xq = rng.integers(0, 256, (args.queries, bits // 8), dtype=np.uint8)
        index = faiss.IndexBinaryFlat(bits)
        index.add(xb)
        t0 = time.perf_counter()
        index.search(xq, args.topk)
        with_torch = time.perf_counter() - t0
        without = flat_search_without_torch(bits, n, args.queries, args.topk)
        print(
            json.dumps({"omp_check": f"{n} random {bits}-bit codes", "with_torch_s": with_torch, "without_s": without}),
            flush=True,
        )
    print(f"faiss {faiss.__version__}, {args.queries} queries, top-{args.topk}, torch loaded")
    print(f"| codes | bits | codes kind | index | build s | search s | recall@{args.topk} vs flat |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['codes']:,} | {r['bits']} | {r['structure']} | {r['index']} | {r['build_s']:.1f} "
            f"| {r['search_s']:.2f} | {r['recall']:.3f} |"
        )


if __name__ == "__main__":
    main()
