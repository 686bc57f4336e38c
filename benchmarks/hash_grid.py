"""Code length k x pooling grid for the HEI hash module, on coco-sim (or any store root).

Scores the training batches with the frozen matcher once, then trains one hash module per
(k, pooling) and reports dev candidate recall@N in both directions (the validation measure
`heiindex train-hash` keeps the best epoch by). Image side of coco-sim is simulated.

    python benchmarks/hash_grid.py --bits 32,64,128,256 --pooling mean,attn,max
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from heiindex.checkpoint import load_model
from heiindex.default_data import default_model_dir, ensure_coco_sim
from heiindex.encode import encode_split
from heiindex.hashing import HashConfig
from heiindex.store import SplitStore
from heiindex.train_hash import HashTrainConfig, collect_batches, fit_hash


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--bits", default="32,64,128,256")
    ap.add_argument("--pooling", default="mean,attn,max")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="passes of scored batches (2: the RESULTS table; train-hash's default is 4)",
    )
    ap.add_argument(
        "--rank-weight", default="1.0", help="comma-separated weights of the ranking term (0: HEI loss only)"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    matcher = load_model(args.model or default_model_dir())
    root = args.store or ensure_coco_sim()
    poolings = tuple(args.pooling.split(","))
    cfg = HashTrainConfig(epochs=args.epochs, val_candidates=args.candidates, rounds=args.rounds)
    weights = [float(w) for w in args.rank_weight.split(",")]
    t0 = time.perf_counter()
    records = collect_batches(matcher.model, SplitStore.open(root, "train"), cfg, poolings)
    val = encode_split(matcher.model, SplitStore.open(root, "dev"))
    print(f"scored {len(records)} training batches in {time.perf_counter() - t0:.0f} s")
    rows = []
    print(
        f"| k | pooling | rank weight | dev t2i recall@{args.candidates} | dev i2t recall@{args.candidates} | best epoch |"
    )
    print("|---|---|---|---|---|---|")
    for bits in (int(b) for b in args.bits.split(",")):
        for pooling in poolings:
            for w in weights:
                hcfg = HashConfig(bits=bits, embed_size=matcher.model.config.embed_size, pooling=pooling)
                _, res = fit_hash(records, val, hcfg, replace(cfg, rank_weight=w), log=lambda m: None)
                rec = res["dev_candidate_recall"]
                rows.append(
                    {"bits": bits, "pooling": pooling, "rank_weight": w, **rec, "best_epoch": res["best_epoch"]}
                )
                print(
                    f"| {bits} | {pooling} | {w:g} | {100 * rec['t2i']:.1f}% | {100 * rec['i2t']:.1f}% "
                    f"| {res['best_epoch']} |",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
