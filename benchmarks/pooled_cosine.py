"""Ceiling of a first stage built on pooled embeddings: real-valued cosine, no hashing.

Encodes a split with the matcher, pools each image's regions and each caption's real words
(mean, attn or max, as the hash module can), and reports text-to-image recall@N of plain
cosine between the pooled vectors. Hash codes of those vectors lose information, so this is
what the pooling leaves for them to work with (a learned projection can still do better).

    python benchmarks/pooled_cosine.py [--split dev] [--n 100]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from heiindex.checkpoint import load_model
from heiindex.default_data import default_model_dir, ensure_coco_sim
from heiindex.encode import encode_split
from heiindex.evaluation import t2i_ranks
from heiindex.hashing import POOLINGS, pool_regions, pool_words
from heiindex.store import SplitStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--store", default=None)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    model = load_model(args.model or default_model_dir()).model
    enc = encode_split(model, SplitStore.open(args.store or ensure_coco_sim(), args.split))
    out = {}
    for pooling in (p for p in POOLINGS if p != "query"):  # query pooling is learned
        img = torch.nn.functional.normalize(pool_regions(enc.regions, pooling), dim=-1)
        cap = torch.nn.functional.normalize(pool_words(enc.words.padded(), enc.lengths, pooling), dim=-1)
        ranks = t2i_ranks((cap @ img.T).numpy(), enc.caption_image)
        out[pooling] = {
            f"t2i_recall@{args.n}": float(np.mean(ranks <= args.n)),
            "t2i_R@10": float(np.mean(ranks <= 10)),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
