"""Where the bench's HEI re-ranking time goes, on one built index: first pass against later ones,
and a profile of one warm pass per direction.

Written for a GPU question: on an H200 (benchmarks/RESULTS.md, "GPU"), coco-sim's text-to-image
HEI pass (500K re-ranked pairs, d = 256) took 0.80 s, about as long as the COCO-5K-size one
(2.5M pairs, d = 1024: 0.88 s) and longer than the exhaustive pass (5M pairs, 0.32 s), while
image-to-text took 0.056 s. A cost that does not grow with the pairs is either paid once per
process (CUDA loads each kernel on its first launch; the bench times the first re-ranking pass
of the process) or paid per chunk or per Python step. This script tells them apart:

    python benchmarks/profile_rerank.py --index data/coco-sim/index/test [--device cuda]

1. The bench's HEI pass (``heiindex.bench._hei``: Hamming top-N of every caption and every image,
   re-ranked), ``--repeats`` times in one process, then the exhaustive pass twice: if the first
   HEI pass is much slower than the later ones, the bench's speed-up is measuring a warm-up.
   (``--exhaustive``, 0 for none).
2. ``torch.profiler`` over one more pass of each direction: the ``--top`` operators by their own
   time (the device's on a GPU, else the CPU's), also per re-ranked pair, how many chunks of
   pairs ran and how many operators were called from Python (not counting those they call), and
   on a GPU how many kernels were launched and how many times the host waited for the device.
   ``--profile-exhaustive`` profiles one exhaustive pass the same way, to compare the two per
   pair (on a CPU with exactly two threads the chunks run on worker threads the profiler does
   not see: pass ``--threads 1``, as in RESULTS.md, "CPU threads").

``--policy cuda --device cpu --threads 1 --repeats 0 --exhaustive 0`` counts, on a CPU, the chunks
and operators of the GPU's way of cutting the pairs (its times there mean nothing).

Prints JSON Lines, and with ``--json`` writes them to a file too.
"""

from __future__ import annotations

import heiindex  # noqa: F401  # isort: skip  (first: sets OpenMP defaults before torch loads OpenMP)

import argparse
import json
import sys
import time
from functools import partial

import numpy as np
import torch
from provenance import checkout  # benchmarks/ is on sys.path when a script here runs
from torch.profiler import ProfilerActivity, profile

from heiindex import attention
from heiindex.bench import _hei, _Sub, rerank_direction
from heiindex.index import Index
from heiindex.scoring import exhaustive_scores


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _passes(index: Index, sub: _Sub, topk: int, repeats: int, device: torch.device) -> list[dict]:
    rows = np.arange(index.n_images), np.arange(len(index.caption_image))
    out = []
    for i in range(repeats):
        _sync(device)
        h = _hei(index, sub, *rows, topk, True)
        out.append({"pass": i + 1, "t2i": round(h["t2i"]["seconds"], 4), "i2t": round(h["i2t"]["seconds"], 4)})
    return out


def _exhaustive(index: Index, sub: _Sub, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    exhaustive_scores(index.model, sub)
    _sync(device)
    return round(time.perf_counter() - t0, 4)


def _profiled(direction: str, index: Index, sub: _Sub, topk: int, device: torch.device, top: int) -> dict:
    codes = index.image_codes(), index.caption_codes()
    call = partial(rerank_direction, direction, index, sub, *codes, topk, True)  # the bench's call, unranked
    pairs = topk * (len(sub.lengths) if direction == "t2i" else len(sub.regions))
    return {"profiled": direction, **_profile(call, device, top, pairs)}


def _profile(call, device: torch.device, top: int, pairs: int) -> dict:
    """``call()`` under ``torch.profiler``: its seconds, chunks, operator calls, and the ``top``
    operators by own time, also per scored pair (``pairs``), to compare passes of different sizes."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    chunks = []
    for_each = attention._for_each
    attention._for_each = lambda fn, sels: (chunks.append(len(sels)), for_each(fn, sels))
    try:
        with profile(activities=activities) as prof:
            _sync(device)
            t0 = time.perf_counter()
            call()
            _sync(device)
            seconds = time.perf_counter() - t0
    finally:
        attention._for_each = for_each
    events = prof.key_averages()
    on_gpu = device.type == "cuda"
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"

    def own(e) -> float:
        return float(getattr(e, key, 0.0))

    ranked = sorted(events, key=own, reverse=True)[:top]
    summary = {
        "seconds_under_profiler": round(seconds, 4),
        "pairs": pairs,
        "us_per_pair": round(seconds / pairs * 1e6, 3),
        "chunks": sum(chunks),
        # Operators called from Python, not those they call in turn.
        "aten_calls": sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None),
        "top": [
            {"name": e.key, "calls": e.count, "own_ms": round(own(e) / 1e3, 3), "us_per_pair": round(own(e) / pairs, 3)}
            for e in ranked
        ],
    }
    if on_gpu:
        calls = {e.key: e.count for e in events}
        summary["kernel_launches"] = sum(n for k, n in calls.items() if "LaunchKernel" in k)
        summary["host_waits"] = sum(n for k, n in calls.items() if "Synchronize" in k)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--exhaustive", type=int, default=2, help="exhaustive passes timed (0: none)")
    ap.add_argument("--top", type=int, default=15, help="operators listed per profile")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (on a CPU with exactly 2, chunks run on two worker threads the profiler does not see)",
    )
    ap.add_argument(
        "--policy",
        choices=["device", "cuda"],
        default="device",
        help="cuda: on a CPU, cut re-ranking into chunks as on a GPU (to count its chunks and operators)",
    )
    ap.add_argument(
        "--profile-exhaustive",
        action="store_true",
        help="also profile one exhaustive pass (every caption against every image), to compare per pair",
    )
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.policy == "cuda" and device.type == "cpu":
        attention._policy = lambda _device: attention._POLICIES["cuda"]  # the GPU's chunking, minus its card check
    index = Index.open(a.index, device=device)
    sub = _Sub(index, np.arange(index.n_images), np.arange(len(index.caption_image)))
    lines = [{"index": a.index, "device": str(device), "policy": a.policy, "torch": torch.__version__}]
    lines[0].update(threads=torch.get_num_threads(), checkout=checkout())
    if device.type == "cpu" and torch.get_num_threads() == 2:
        print(
            "note: with exactly 2 torch threads, scoring runs on two worker threads the profiler does not "
            "see (heiindex.attention._for_each): the profiles below miss most operators; pass --threads 1",
            file=sys.stderr,
        )
    lines += _passes(index, sub, a.topk, a.repeats, device)
    if a.exhaustive:
        lines.append({"exhaustive_seconds": [_exhaustive(index, sub, device) for _ in range(a.exhaustive)]})
    lines += [_profiled(d, index, sub, a.topk, device, a.top) for d in ("t2i", "i2t")]
    if a.profile_exhaustive:
        pairs = len(sub.lengths) * len(sub.regions)
        lines.append(
            {"profiled": "exhaustive", **_profile(partial(exhaustive_scores, index.model, sub), device, a.top, pairs)}
        )
    for line in lines:
        print(json.dumps(line), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
