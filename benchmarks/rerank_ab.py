"""The re-ranking of this checkout against an earlier commit's, alternated in one process.

Loads ``heiindex/attention.py`` as it was at ``--against REV`` (``git show``) beside the current
one (its relative imports resolve to this checkout's other modules), then times both directions'
re-ranking of the bench (every caption against its N Hamming candidates, every image likewise) on
a built flat index (whose candidate slots are never empty), alternating the two versions (and which runs first in a pass): process CPU time, torch on one thread, minimum and
median of ``--passes`` passes each; ``--direction t2i`` (or ``i2t``) times one direction alone. The scores of the two must be equal (else it says how far
apart they are). Ratios from one run, as the benchmarks here report them:

    python benchmarks/rerank_ab.py --index data/coco-sim/index/test --against 8748f0c [--json FILE]
"""

from __future__ import annotations

import heiindex  # noqa: F401  # isort: skip  (first: sets OpenMP defaults before torch loads OpenMP)

import argparse
import dataclasses
import importlib.util
import json
import statistics
import subprocess
import sys
import time

import torch
from provenance import REPO, checkout  # benchmarks/ is on sys.path when a script here runs

from heiindex import attention
from heiindex.hamming import hamming_candidates
from heiindex.index import Index


def _attention_at(rev: str):
    """``heiindex/attention.py`` of commit ``rev`` as the module ``heiindex._ab_attention``."""
    source = subprocess.run(
        ["git", "show", f"{rev}:heiindex/attention.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    spec = importlib.util.spec_from_loader("heiindex._ab_attention", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "heiindex"
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:heiindex/attention.py", "exec"), module.__dict__)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--against", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--passes", type=int, default=6)
    ap.add_argument(
        "--direction", choices=("both", "t2i", "i2t"), default="both", help="the re-ranking to time (default both)"
    )
    ap.add_argument("--json", default=None, help="also write the result to this file")
    a = ap.parse_args()
    torch.set_num_threads(1)
    old = _attention_at(a.against)
    index = Index.open(a.index)
    cfg_new = index.model.attention
    cfg_old = old.AttentionConfig(**dataclasses.asdict(cfg_new))  # each module checks its own class
    _, t2i = hamming_candidates(index.image_index, index.caption_codes(), a.topk)
    _, i2t = hamming_candidates(index.caption_index, index.image_codes(), a.topk)
    t2i, i2t = torch.from_numpy(t2i), torch.from_numpy(i2t)
    w, lengths, regions, gram = index.words, index.words.lengths, index.regions, index.gram

    timed_t2i, timed_i2t = a.direction != "i2t", a.direction != "t2i"
    none = torch.zeros(0)  # the scores of a direction not timed

    def run(module, cfg):
        with torch.no_grad():
            t0 = time.process_time()
            a_ = module.score_image_candidates(cfg, w, lengths, regions, t2i, gram) if timed_t2i else none
            b_ = module.score_caption_candidates(cfg, regions, w, lengths, i2t, gram) if timed_i2t else none
            return time.process_time() - t0, a_, b_

    times: dict[str, list[float]] = {"against": [], "now": []}
    max_diff = 0.0
    for p in range(a.passes):
        # which version runs first alternates pass by pass: a fixed order gave the second one
        # the warmer caches (or the machine's next spell) every time
        first_old = p % 2 == 0
        if first_old:
            s_old, a_old, b_old = run(old, cfg_old)
        s_new, a_new, b_new = run(attention, cfg_new)
        if not first_old:
            s_old, a_old, b_old = run(old, cfg_old)
        times["against"].append(s_old)
        times["now"].append(s_new)
        for x, y in ((a_old, a_new), (b_old, b_new)):  # an untimed direction's are empty
            if x.numel():  # a NaN or inf on either side is a difference (max() would drop a NaN)
                gap = (x - y).abs().max()
                max_diff = max(max_diff, float(gap) if torch.isfinite(gap) else float("inf"))
    rev = subprocess.run(["git", "rev-parse", a.against], cwd=REPO, capture_output=True, text=True, check=True)
    out = {
        "against": a.against,
        "against_commit": rev.stdout.strip(),
        "index": a.index,
        "topk": a.topk,
        "passes": a.passes,
        "direction": a.direction,
        "torch": torch.__version__,
        "pairs": int(t2i.numel() * timed_t2i + i2t.numel() * timed_i2t),
        "cpu_seconds": {
            k: {"min": round(min(v), 3), "median": round(statistics.median(v), 3)} for k, v in times.items()
        },
        "now_over_against_min": round(min(times["now"]) / min(times["against"]), 3),
        "now_over_against_median": round(statistics.median(times["now"]) / statistics.median(times["against"]), 3),
        "scores_equal": max_diff == 0.0,
        "max_score_difference": max_diff,
        "checkout": checkout(),
    }
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
