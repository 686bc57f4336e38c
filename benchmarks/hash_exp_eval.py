"""Candidate recall@100 of modules saved by ``hash_exp.py --save`` on another split (e.g. test).

python benchmarks/hash_exp_eval.py --split test base256 mq2_256 mq4_256
"""

from __future__ import annotations

import argparse

import torch
from hash_exp import CACHE, Exp, Hasher, codes, load_split, recall_from_codes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="test")
    ap.add_argument("--models", type=str, default=str(CACHE / "models"))
    ap.add_argument("names", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = load_split(args.split)
    for name in args.names:
        ck = torch.load(f"{args.models}/{name}.pt")
        model = Hasher(Exp(**ck["exp"]))
        model.load_state_dict(ck["state"])
        r = recall_from_codes(*codes(model, split), split["caption_image"])
        print(f"{args.split} {name}: t2i {100 * r['t2i']:.1f} i2t {100 * r['i2t']:.1f}", flush=True)


if __name__ == "__main__":
    main()
