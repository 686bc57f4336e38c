"""How much padding the pair scorer's chunks carry on the bench's re-ranking pairs, and how many
chunks and image groups it cuts them into: ``heiindex.attention._pair_chunks`` replayed (no
scoring), with the CPU policy's ``exact_run`` and with the others given.

    python benchmarks/pair_padding.py --index data/coco-sim/index/test --exact-run inf,32,8

Prints one JSON line per direction and ``exact_run``: the pairs' real words, the word positions
their chunks hold (each chunk padded to its longest caption), the padding as a fraction of the
real words, the chunks, and the image groups with their own matrix product (``_Runs``).
"""

from __future__ import annotations

import heiindex  # noqa: F401  # isort: skip  (first: sets OpenMP defaults before torch loads OpenMP)

import argparse
import dataclasses
import json

import torch

from heiindex import attention
from heiindex.hamming import hamming_candidates
from heiindex.index import Index


def replay(index: Index, caption_index: torch.Tensor, image_index: torch.Tensor, exact_run: float) -> dict:
    """The chunking ``score_pairs`` gives these pairs on a CPU with ``exact_run``, counted."""
    policy = dataclasses.replace(attention._POLICIES["cpu"], exact_run=exact_run)
    words, regions = index.words, index.regions
    pair_len = index.words.lengths.index_select(0, caption_index)
    r = regions.shape[1]
    pair_bytes = (r + words.shape[1]) * regions.shape[2] * regions.element_size()
    chunks = attention._pair_chunks(pair_len, image_index, regions.shape[0], r, policy.max_elements, pair_bytes, policy)
    positions = sum(len(c) * int(pair_len.index_select(0, c).max()) for c in chunks)
    groups = sum(
        sum(img is not None for _, img, _ in attention._Runs(image_index.index_select(0, c), policy).groups)
        for c in chunks
    )
    real = int(pair_len.sum())
    return {
        "exact_run": str(exact_run),  # "inf" rather than JSON's missing Infinity
        "pairs": len(pair_len),
        "real_words": real,
        "word_positions": positions,
        "padding": round(positions / real - 1, 4),
        "chunks": len(chunks),
        "image_groups": groups,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--exact-run", default="inf,32", help="comma-separated exact_run values (inf: coarse buckets)")
    a = ap.parse_args()
    index = Index.open(a.index)
    _, t2i = hamming_candidates(index.image_index, index.caption_codes(), a.topk)
    _, i2t = hamming_candidates(index.caption_index, index.image_codes(), a.topk)
    t2i, i2t = torch.from_numpy(t2i), torch.from_numpy(i2t)
    pairs = {
        "t2i": (torch.arange(t2i.shape[0]).repeat_interleave(t2i.shape[1]), t2i.reshape(-1)),
        "i2t": (i2t.reshape(-1), torch.arange(i2t.shape[0]).repeat_interleave(i2t.shape[1])),
    }
    for direction, (caps, imgs) in pairs.items():
        for value in a.exact_run.split(","):
            print(json.dumps({"direction": direction, **replay(index, caps.long(), imgs.long(), float(value))}))


if __name__ == "__main__":
    main()
