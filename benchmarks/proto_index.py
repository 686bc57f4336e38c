"""A copy of a built index whose image codes are ``hash_exp_proto.py``'s prototype codes (research).

``hash_exp_proto.py`` measures candidate recall only. This script writes what a build with
prototype codes would write, so that the product's own ``heiindex bench`` and ``query`` run on it:
it copies the index at ``--index`` to ``--out`` and replaces ``images.faiss`` with a flat index of

    sign(alpha * u(image hash output) + (1 - alpha) * u(mean tanh caption output of its top K))

where the top K are the training captions the matcher scores highest for the image among its
``--preselect`` Hamming-nearest ones (``u`` scales to unit norm). The training captions come from
``hash_exp_cache.py``'s encoded train split (the default model's). The manifest's record of
``images.faiss`` is updated, so ``heiindex verify`` passes, and a ``"research"`` entry says what
was done. Only the coco-sim default model and hash module are supported (the cache's encoding).

    python benchmarks/proto_index.py --index data/coco-sim/index/test --out /tmp/index-proto
    heiindex bench --index /tmp/index-proto --topk 100 --json
"""

from __future__ import annotations

import heiindex  # noqa: F401  # isort: skip  (first: sets OpenMP defaults before torch loads OpenMP)

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from hash_exp import CACHE  # benchmarks/ is on sys.path when this script runs
from hash_exp_proto import caption_outputs, unit

from heiindex.attention import score_pairs
from heiindex.hamming import make_binary_index, save_binary_index
from heiindex.hashing import pack_codes
from heiindex.index import Index
from heiindex.store import file_record


@torch.no_grad()
def prototype_codes(index: Index, train: dict, k: int, alpha: float, preselect: int) -> tuple:
    """Packed (images, bits / 8) codes, and the seconds the work took beside the encoding."""
    t0 = time.perf_counter()
    mod, regions = index.hasher.module.eval(), index.regions.float()
    img = mod.image_hash(mod.pool_images(regions))
    txt = torch.tanh(caption_outputs(mod, train))
    near = (torch.where(img > 0, 1.0, -1.0) @ torch.where(txt > 0, 1.0, -1.0).T).topk(preselect, dim=1).indices
    img_rows = torch.arange(len(img)).repeat_interleave(preselect)
    scores = score_pairs(
        index.model.attention, train["words"], train["lengths"], regions, near.reshape(-1), img_rows, index.gram
    ).view(len(img), preselect)
    top = near.gather(1, scores.topk(k, dim=1).indices)  # (images, k) training caption rows
    mixed = alpha * unit(img) + (1 - alpha) * unit(txt[top].mean(1))
    return pack_codes(mixed > 0), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.7)
    ap.add_argument("--preselect", type=int, default=300)
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; give a new folder")
    index = Index.open(args.index)
    if index.manifest["index"]["images"]["type"] != "flat":
        raise SystemExit("a flat image index only")
    codes, seconds = prototype_codes(index, torch.load(CACHE / "train.pt"), args.k, args.alpha, args.preselect)
    changed = int((codes != index.image_codes()).any(axis=1).sum())
    shutil.copytree(args.index, args.out)
    path = args.out / "images.faiss"
    save_binary_index(make_binary_index(codes, "flat"), path)
    manifest = json.loads((args.out / "manifest.json").read_text())
    manifest["files"]["images.faiss"] = file_record(path)
    manifest["research"] = (
        f"images.faiss: prototype codes (benchmarks/proto_index.py, K {args.k}, alpha {args.alpha}, "
        f"preselect {args.preselect}) of {args.index}"
    )
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"out": str(args.out), "images_changed": changed, "seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()
