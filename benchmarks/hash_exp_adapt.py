"""Database adaptation of a hash module's image side (research check for benchmarks/hash_exp.py).

At build time the database images are known, so the frozen matcher can score TRAINING captions
against them: ``--rounds`` passes over the split's images in 128-image batches, each against 128
random training captions. The image side of a module saved by ``hash_exp.py --save`` is then
fine-tuned on those batches by listwise distillation (``hash_exp.kd_loss``: the matcher's
softmax over the batch's images per caption, and over captions per image, as the target of the
codes'), the caption side frozen. The split's own captions are never used in training; they
only measure candidate recall@100 after each epoch (run on dev to choose, test once).

    python benchmarks/hash_exp_adapt.py --split dev --module txtmq_256 --rounds 40 --epochs 6
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from hash_exp import MODELS, codes, kd_loss, load_module, load_split, recall_from_codes

from heiindex.checkpoint import load_model
from heiindex.default_data import default_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--module", default="txtmq_256")
    ap.add_argument("--models", type=Path, default=MODELS, help="where hash_exp.py --save put it")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tr, db = load_split("train"), load_split(args.split)
    base = load_module(args.module, args.models)
    if base.e.K != 1 or base.e.Kt != 1:
        raise SystemExit("single-code modules only")
    r = recall_from_codes(*codes(base, db), db["caption_image"])
    print(f"{args.split} {args.module} before: t2i {100 * r['t2i']:.1f} i2t {100 * r['i2t']:.1f}", flush=True)
    matcher = load_model(default_model_dir()).model.eval()
    gen = torch.Generator().manual_seed(0)
    n_img, n_cap = db["regions"].shape[0], tr["words"].shape[0]
    batches, t0 = [], time.perf_counter()
    with torch.no_grad():
        for _ in range(args.rounds):
            perm = torch.randperm(n_img, generator=gen)
            for s in range(0, n_img, 128):
                imgs, caps = perm[s : s + 128], torch.randint(0, n_cap, (128,), generator=gen)
                width = int(tr["lengths"][caps].max())
                scores = matcher.score(tr["words"][caps, :width], tr["lengths"][caps], db["regions"][imgs])
                batches.append((imgs, caps, scores.T.contiguous()))  # (images, captions)
        txt = torch.cat(
            [
                torch.tanh(base.caption_out(tr, torch.arange(s, min(s + 2500, n_cap))))[:, 0]
                for s in range(0, n_cap, 2500)
            ]
        )
    print(
        f"scored {len(batches)} batches of training captions x {args.split} images in {time.perf_counter() - t0:.0f} s"
    )
    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.img.parameters(), lr=args.lr)
    for epoch in range(args.epochs):
        model.train()
        for i in torch.randperm(len(batches), generator=gen):
            imgs, caps, scores = batches[int(i)]
            img = torch.tanh(model.image_out(db, imgs))[:, 0]
            loss = kd_loss(img @ txt[caps].T / img.shape[1], scores, base.e.kd_ts, base.e.kd_th)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        r = recall_from_codes(*codes(model, db), db["caption_image"])
        print(f"{args.split} epoch {epoch + 1}: t2i {100 * r['t2i']:.1f} i2t {100 * r['i2t']:.1f}", flush=True)


if __name__ == "__main__":
    main()
