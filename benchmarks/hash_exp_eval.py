"""Candidate recall@100 of modules saved by ``hash_exp.py --save`` on another split (e.g. test).

python benchmarks/hash_exp_eval.py --split test base256 mq2_256 mq4_256
python benchmarks/hash_exp_eval.py --split test --real base256_e160   # what binarising costs

A name joining modules with "+" (``txtmq_256+txtmq_256_s1``) ranks their codes side by side, an
ensemble: the Hamming distance over the joined codes is the sum of each module's.

``--real`` (single-code modules) adds rankings without the sign: the query side real-valued
against binary codes (asymmetric: tanh of the text output for t2i, of the image output for
i2t), and real-valued tanh outputs on both sides (cosine-like dot products).
"""

from __future__ import annotations

import argparse

import torch
from hash_exp import MODELS, codes, load_module, load_split, recall_from_codes
from torch import Tensor


@torch.no_grad()
def recall_from_similarity(sim: Tensor, cap_img: Tensor, n: int = 100) -> dict:
    """Candidate recall@n of a (captions, images) similarity, higher is closer (ties: the ground
    truth ranks after every item as close as it, the pessimistic order)."""
    nt, ni = sim.shape
    gt = sim[torch.arange(nt), cap_img]
    t2i = float(((sim >= gt[:, None]).sum(1) - 1 < n).float().mean())
    simT = sim.T.contiguous()  # (images, captions)
    own = simT[cap_img, torch.arange(nt)]
    best = torch.full((ni,), 1 << 30, dtype=torch.long)
    for s in range(0, nt, 1000):
        cs = torch.arange(s, min(s + 1000, nt))
        rank = (simT[cap_img[cs]] >= own[cs][:, None]).sum(1) - 1
        best.scatter_reduce_(0, cap_img[cs], rank, reduce="amin")
    return {"t2i": t2i, "i2t": float((best < n).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="test")
    ap.add_argument("--models", type=str, default=str(MODELS))
    ap.add_argument("--real", action="store_true", help="also rank without binarising (single-code modules)")
    ap.add_argument("names", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = load_split(args.split)
    cap_img = split["caption_image"]
    for name in args.names:
        parts = [load_module(part, args.models) for part in name.split("+")]
        if len(parts) > 1 and any(m.e.K != 1 or m.e.Kt != 1 for m in parts):
            raise SystemExit(f"{name}: an ensemble joins single-code modules")
        joined = [codes(m, split) for m in parts]
        r = recall_from_codes(*(torch.cat([c[side] for c in joined], -1) for side in (0, 1)), cap_img)
        print(f"{args.split} {name}: t2i {100 * r['t2i']:.1f} i2t {100 * r['i2t']:.1f}", flush=True)
        if not args.real or len(parts) > 1:
            continue
        model = parts[0]
        if model.e.K != 1 or model.e.Kt != 1:
            raise SystemExit(f"--real ranks single-code modules; {name} has {model.e.K} / {model.e.Kt} codes per item")
        model.eval()
        with torch.no_grad():
            img = torch.tanh(model.image_out(split)[:, 0])
            n = len(split["lengths"])
            txt = torch.tanh(
                torch.cat(
                    [model.caption_out(split, torch.arange(s, min(s + 2500, n)))[:, 0] for s in range(0, n, 2500)]
                )
            )
        img_b, txt_b = torch.where(img > 0, 1.0, -1.0), torch.where(txt > 0, 1.0, -1.0)
        t2i_asym = recall_from_similarity(txt @ img_b.T, cap_img)["t2i"]
        i2t_asym = recall_from_similarity(txt_b @ img.T, cap_img)["i2t"]
        real = recall_from_similarity(txt @ img.T, cap_img)
        print(f"  asymmetric (real query, binary items): t2i {100 * t2i_asym:.1f} i2t {100 * i2t_asym:.1f}")
        print(f"  real-valued both sides:               t2i {100 * real['t2i']:.1f} i2t {100 * real['i2t']:.1f}")


if __name__ == "__main__":
    main()
