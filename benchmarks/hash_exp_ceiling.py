"""How close can any cheap first stage come to the matcher? Two bounds (research script).

The HEI issue asks for t2i candidate recall@100 >= 98% on coco-sim test, where the matcher itself
keeps the ground truth in its own top 100 for 98.1% of the captions. This script asks how much
of the matcher's ranking a first stage of a given form can carry, without binarising:

1. Oracle: the best rank-r approximation (SVD) of the split's own (captions, images) matcher
   score matrix, each caption's row centred. It uses the split's captions, so it is a bound on
   capacity (how many real dimensions a bilinear score needs), not a method.
2. Database-specific regression: each database image gets a weight vector, fitted by ridge
   regression so that a feature vector of a TRAINING caption predicts the matcher's score of that
   caption against the image (the (images, 20,000 training captions) matrix that
   ``hash_exp_proto.py`` caches). The split's captions only measure. Caption features: the
   committed hash module's codes (sign) and pre-sign outputs (tanh), the matcher's word
   embeddings mean-pooled (wmean) and max-pooled (wmax), and 2,048 random Fourier features of
   wmean (rff). Each image's weights are real-valued and as long as the features, so this is an
   asymmetric, real-valued first stage: more than a binary code can hold.

Recall counts ties optimistically (only a strictly higher score ranks ahead of the ground truth).

    python benchmarks/hash_exp_ceiling.py --split dev
"""

from __future__ import annotations

import argparse
import time

import torch
from hash_exp import CACHE, load_split
from hash_exp_proto import caption_outputs, train_caption_scores

from heiindex.checkpoint import load_model
from heiindex.default_data import default_hash_dir, default_model_dir
from heiindex.hash_folder import load_hash


@torch.no_grad()
def split_scores(split: str, db: dict) -> torch.Tensor:
    """The split's exhaustive (captions, images) matcher scores, cached as ``CACHE/full-{split}.pt``."""
    path = CACHE / f"full-{split}.pt"
    if path.exists():
        return torch.load(path)
    matcher = load_model(default_model_dir()).model.eval()
    t0, out = time.perf_counter(), []
    for s in range(0, db["words"].shape[0], 1000):
        lens = db["lengths"][s : s + 1000]
        out.append(matcher.score(db["words"][s : s + 1000, : int(lens.max())], lens, db["regions"]))
    scores = torch.cat(out).contiguous()
    torch.save(scores, path)
    print(f"scored {scores.shape[0]} captions x {scores.shape[1]} images in {time.perf_counter() - t0:.0f} s")
    return scores


def recall(scores: torch.Tensor, caption_image: torch.Tensor, n: int = 100) -> float:
    """Percent of captions (rows) whose ground-truth image is in their top n (ties optimistic)."""
    gt = scores[torch.arange(scores.shape[0]), caption_image]
    return 100 * float(((scores > gt[:, None]).sum(1) < n).float().mean())


WORD_FEATURES = {"wmean": "wmean", "wmean+wmax": "wmean+wmax", "rff": "rff(wmean)"}  # name -> printed label


def word_features(tr: dict, db: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, split) caption features from the matcher's word embeddings: their mean
    ("wmean"), mean and max ("wmean+wmax"), or 2,048 random Fourier features of the mean ("rff",
    seed 0)."""
    if name == "wmean":
        return tr["w_mean"], db["w_mean"]
    if name == "wmean+wmax":
        return torch.cat([tr["w_mean"], tr["w_max"]], 1), torch.cat([db["w_mean"], db["w_max"]], 1)
    if name == "rff":
        gen = torch.Generator().manual_seed(0)
        d = tr["w_mean"].shape[1]
        proj = torch.randn(d, 2048, generator=gen) * (8 / d**0.5)
        phase = torch.rand(2048, generator=gen) * 2 * torch.pi
        return torch.cos(tr["w_mean"] @ proj + phase), torch.cos(db["w_mean"] @ proj + phase)
    raise SystemExit(f"unknown features {name!r} (one of {', '.join(WORD_FEATURES)})")


def sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1.0, -1.0)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--ranks", default="16,32,64,128,256")
    ap.add_argument("--ridge", default="0.1,1,10", help="ridge penalties tried for each feature set")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tr, db = load_split("train"), load_split(args.split)
    ci = db["caption_image"]
    full = split_scores(args.split, db)
    print(f"{args.split}: the matcher's own t2i recall@100: {recall(full, ci):.1f}")
    u, sv, vh = torch.linalg.svd(full - full.mean(1, keepdim=True), full_matrices=False)
    for r in (int(v) for v in args.ranks.split(",")):
        print(f"{args.split}: oracle rank {r}: {recall((u[:, :r] * sv[:r]) @ vh[:r], ci):.1f}")

    mod = load_hash(default_hash_dir()).module.eval()
    img = mod.image_hash(mod.pool_images(db["regions"]))
    h_tr, h_db = caption_outputs(mod, tr), caption_outputs(mod, db)
    print(f"{args.split}: the module's codes (Hamming): {recall(sign(h_db) @ sign(img).T, ci):.1f}")
    feats = {
        "sign": (sign(h_tr), sign(h_db)),
        "tanh": (torch.tanh(h_tr), torch.tanh(h_db)),
        **{label: word_features(tr, db, name) for name, label in WORD_FEATURES.items()},
    }
    target = train_caption_scores(args.split, db, tr).T  # (training captions, images)
    target = target - target.mean(1, keepdim=True)
    for name, (x_tr, x_db) in feats.items():
        mu = x_tr.mean(0)
        x_tr, x_db = x_tr - mu, x_db - mu
        gram, rhs = x_tr.T @ x_tr, x_tr.T @ target
        row = []
        for lam in (float(v) for v in args.ridge.split(",")):
            w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0]), rhs)  # (features, images)
            row.append(f"ridge {lam:g}: {recall(x_db @ w, ci):.1f}")
        print(f"{args.split}: regression on {name} ({x_tr.shape[1]} features): " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
