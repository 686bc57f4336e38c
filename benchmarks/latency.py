"""Latency of one text query against 5,000 images, N = 100: encoding + Hamming + re-rank.

By default at COCO-5K size on synthetic data: 5,000 images x 36 random unit-length regions at
d = 1024, a SCAN matcher and a 256-bit hash module with random weights (the work per query does
not depend on the weights), FAISS IndexBinaryFlat over the image codes, and real COCO 5K
captions as the queries. With ``--index DIR`` it times ``Index.search`` on a built index
instead (e.g. ``data/coco-sim/index/test``: 1,000 images, d = 256), and ``Index.search_image``
(image to text) for as many of its images. Both run the same pipeline (``heiindex.search``). Each query is timed alone after a warm-up; the output gives p50 / p90 /
p99 and the median of each stage. ``--batch B`` also times the same queries searched B at a time
(``Index.search_many``'s path: each batch encoded, hashed and re-ranked together; with ``--index``
the images too, by ``search_images``) and reports the time per query, after one warm-up batch.

    python benchmarks/latency.py [--images 5000] [--d 1024] [--queries 200] [--batch 100] [--device cpu|cuda]
    python benchmarks/latency.py --index data/coco-sim/index/test [--batch 100]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from provenance import REPO, checkout  # benchmarks/ is on sys.path when a script here runs

from heiindex.attention import region_gram
from heiindex.hamming import TorchBinaryIndex, hamming_candidates, make_binary_index
from heiindex.hashing import HashConfig, HashModule
from heiindex.model import ScanConfig, ScanModel
from heiindex.search import check_queries, encode_queries, encode_text, images_for_text
from heiindex.vocab import Vocab

CAPTIONS = REPO / "data" / "coco-captions" / "testall_caps.txt"
VOCAB = REPO / "data" / "coco-captions" / "coco_precomp_vocab.json"


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {f"p{p}_ms": round(float(np.percentile(a, p)), 2) for p in (50, 90, 99)} | {
        "mean_ms": round(float(a.mean()), 2),
        "min_ms": round(float(a.min()), 2),
        "max_ms": round(float(a.max()), 2),
    }


def synthetic(args, queries: list[str]) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    vocab = Vocab.load(VOCAB)
    model = ScanModel(ScanConfig(vocab_size=len(vocab), embed_size=args.d)).to(device).eval()
    # mean pooling, as RESULTS' figures were measured (the default pools words by a learned query:
    # one softmax over at most 52 words more per query)
    hasher = HashModule(HashConfig(bits=args.bits, embed_size=args.d, pooling="mean")).to(device).eval()
    g = torch.Generator().manual_seed(0)
    regions = torch.randn(args.images, 36, args.d, generator=g)
    regions = (regions / regions.norm(dim=-1, keepdim=True)).to(device)
    gram = region_gram(regions)
    codes = hasher.image_codes(regions)
    index = TorchBinaryIndex(codes, device) if device.type == "cuda" else make_binary_index(codes)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    stages: dict[str, list[float]] = {"total": [], "encode": [], "hamming": [], "hamming_and_rerank": []}
    warm = queries[: args.warmup]  # fewer queries than --warmup: each is a warm-up once, then timed
    for i, text in enumerate(warm + queries):
        sync()
        t0 = time.perf_counter()
        q = encode_text(model, vocab, text)
        sync()
        t1 = time.perf_counter()
        images_for_text(model, hasher, index, regions, gram, q, args.k, args.candidates)
        sync()
        t2 = time.perf_counter()
        if i >= len(warm):
            stages["total"].append((t2 - t0) * 1e3)
            stages["encode"].append((t1 - t0) * 1e3)
            stages["hamming_and_rerank"].append((t2 - t1) * 1e3)
            code = hasher.caption_codes(q.words, q.lengths)
            t3 = time.perf_counter()
            hamming_candidates(index, code, args.candidates)
            stages["hamming"].append((time.perf_counter() - t3) * 1e3)
    result = {
        "setup": f"synthetic: {args.images} images x 36 regions, d = {args.d}, {args.bits}-bit codes, random weights",
        "latency": percentiles(stages["total"]),
        "stage_p50_ms": {k: round(float(np.median(v)), 2) for k, v in stages.items() if k != "total"},
    }
    if args.batch:

        def search_batch(texts: list[str]) -> None:
            q = encode_queries(model, check_queries(vocab, texts))
            images_for_text(model, hasher, index, regions, gram, q, args.k, args.candidates)
            sync()

        result["batched"] = batched(args, queries, search_batch)
    return result


def batched(args, queries: list[str], search_batch) -> dict:
    """Milliseconds per query when ``queries`` are searched ``args.batch`` at a time (one warm-up
    batch first), in each of 3 passes."""
    search_batch(queries[: args.batch])
    passes = []
    for _ in range(3):
        t0 = time.perf_counter()
        for s in range(0, len(queries), args.batch):
            search_batch(queries[s : s + args.batch])
        passes.append((time.perf_counter() - t0) * 1e3 / len(queries))
    return {"batch": args.batch, "ms_per_query_passes": [round(p, 3) for p in passes]}


def built_index(args, queries: list[str]) -> dict:
    """``Index.search`` for each text query, and ``Index.search_image`` for as many stored images
    (spread over the index), one at a time after the warm-up; with ``--batch``, both batched too."""
    from heiindex.index import Index

    index = Index.open(args.index, device=args.device)
    step = max(1, index.n_images // len(queries))
    image_ids = [int(i) for i in index.image_ids[::step][: len(queries)]]

    def one_at_a_time(search, items) -> dict:
        ms = []
        warm = items[: args.warmup]
        for i, item in enumerate(warm + items):
            t0 = time.perf_counter()
            search(item)
            if i >= len(warm):
                ms.append((time.perf_counter() - t0) * 1e3)
        return percentiles(ms)

    result = {
        "setup": f"Index.search ({len(queries)} texts) and Index.search_image ({len(image_ids)} images) on "
        f"{args.index}: {index.n_images} images, d = {index.manifest['embed_size']}",
        "latency": one_at_a_time(lambda text: index.search(text, args.k, args.candidates), queries),
        "image_latency": one_at_a_time(lambda i: index.search_image(i, args.k, args.candidates), image_ids),
    }
    if args.batch:
        result["batched"] = batched(
            args, queries, lambda texts: list(index.search_many(texts, args.k, args.candidates, batch=args.batch))
        )
        result["image_batched"] = batched(
            args, image_ids, lambda ids: list(index.search_images(ids, args.k, args.candidates, batch=args.batch))
        )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--bits", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument(
        "--batch", type=int, default=0, help="also time the queries searched this many at a time (0: do not)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--index", help="time Index.search and Index.search_image on this built index instead of synthetic data"
    )
    ap.add_argument("--json", dest="json_file")
    args = ap.parse_args()
    if args.batch < 0:
        ap.error("--batch must be 0 (off) or a positive batch size")
    lines = CAPTIONS.read_text().splitlines()
    queries = lines[:: max(1, len(lines) // args.queries)][: args.queries]  # spread over the 5K images
    with torch.no_grad():
        result = built_index(args, queries) if args.index else synthetic(args, queries)
    result |= {
        "queries": len(queries),
        "candidates": args.candidates,
        "k": args.k,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        "checkout": checkout(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_file:
        Path(args.json_file).write_text(text + "\n")


if __name__ == "__main__":
    main()
