"""Hamming search at scale: IndexBinaryFlat vs IndexBinaryIVF vs IndexBinaryHNSW.

Random codes (the worst case for IVF and HNSW: no cluster structure), n codes of k bits,
1,000 queries, top-100. For each index: build seconds, search seconds, and recall@100 against
the flat (exact) result. torch is imported first in the same process, as in heiindex, so the
OpenMP clash of two runtimes would show here (heiindex sets OMP_WAIT_POLICY=PASSIVE on import).

    python benchmarks/hamming.py --codes 1000000 --bits 64,128 [--nlist 1024,4096] [--nprobe 8,32]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from heiindex.hamming import make_binary_index  # imports heiindex first: OMP_WAIT_POLICY is set here


def recall_at(ids: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(a[a >= 0]) & set(b)) for a, b in zip(ids, truth, strict=True)]
    return float(np.sum(hits) / truth.size)


def main() -> None:
    import faiss
    import torch  # noqa: F401  (imported on purpose: the OpenMP clash only shows with both runtimes loaded)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=1_000_000)
    ap.add_argument("--bits", default="64,128")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--nlist", default="1024,4096")
    ap.add_argument("--nprobe", default="8,32")
    ap.add_argument("--hnsw-m", type=int, default=16)
    ap.add_argument("--no-hnsw", action="store_true", help="skip HNSW (its build is the slowest part)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        xb = rng.integers(0, 256, (args.codes, bits // 8), dtype=np.uint8)
        xq = rng.integers(0, 256, (args.queries, bits // 8), dtype=np.uint8)
        t0 = time.perf_counter()
        flat = make_binary_index(xb, "flat")
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, truth = flat.search(xq, args.topk)
        search = time.perf_counter() - t0
        rows.append({"bits": bits, "index": "flat", "build_s": build, "search_s": search, "recall": 1.0})
        print(json.dumps(rows[-1]), flush=True)
        for nlist in (int(x) for x in args.nlist.split(",")):
            t0 = time.perf_counter()
            ivf = make_binary_index(xb, "ivf", nlist=nlist)
            build = time.perf_counter() - t0
            for nprobe in (int(x) for x in args.nprobe.split(",")):
                ivf.nprobe = nprobe
                t0 = time.perf_counter()
                _, ids = ivf.search(xq, args.topk)
                search = time.perf_counter() - t0
                rows.append(
                    {
                        "bits": bits,
                        "index": f"ivf nlist={nlist} nprobe={nprobe}",
                        "build_s": build,
                        "search_s": search,
                        "recall": recall_at(ids, truth),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        if not args.no_hnsw:
            t0 = time.perf_counter()
            hnsw = make_binary_index(xb, "hnsw", hnsw_m=args.hnsw_m)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, ids = hnsw.search(xq, args.topk)
            search = time.perf_counter() - t0
            rows.append(
                {
                    "bits": bits,
                    "index": f"hnsw M={args.hnsw_m}",
                    "build_s": build,
                    "search_s": search,
                    "recall": recall_at(ids, truth),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(f"faiss {faiss.__version__}, {args.codes} codes, {args.queries} queries, top-{args.topk}")
    print("| bits | index | build s | search s | recall@100 vs flat |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bits']} | {r['index']} | {r['build_s']:.1f} | {r['search_s']:.2f} | {r['recall']:.3f} |")


if __name__ == "__main__":
    main()
