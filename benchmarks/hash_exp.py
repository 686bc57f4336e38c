"""Hash function experiments toward candidate recall@100 >= 98% on coco-sim (research script).

Needs the cache of ``benchmarks/hash_exp_cache.py`` (encoded train/dev/test and scored training
batches). Every config trains in this one script with the same loop, records, validation and
best-epoch rule as ``heiindex.train_hash.fit_hash`` (Adam, lr 3e-3, HEI loss + ranking term of
weight 1, best epoch by dev t2i + i2t candidate recall@100), so rows compare fairly.

Models (``Hasher``): image side ``mean`` / ``meanmax`` (concat, 512-d) pooled regions, or
``mq`` = K learned query vectors attending over the 36 regions (softmax of q_k . r), one code
per query through one shared hash layer; caption side likewise over the real words. Head:
``linear`` or ``mlp`` (2 layers). With several codes per item, an image-caption similarity is
the max over code pairs (``agg=max``) or a softmax-weighted mean at temperature ``tau``
(``agg=smax``) while training; binary distance = min Hamming distance over code pairs, which is
what a FAISS search for K*N codes deduplicated to N images returns.

Evaluation: exact Hamming distances in torch; a hit when the ground truth's rank (ties broken
by row id, as FAISS's flat index does) is < N; checked against ``candidate_recall`` (FAISS) on
the committed default module.

    python benchmarks/hash_exp.py --configs base256,mq4_256 [--epochs 80] [--test]

Each trained module's state goes to ``--save`` (default ``CACHE/models``), where
``hash_exp_eval.py``, ``hash_exp_maxsim.py --cascade`` and ``hash_exp_adapt.py`` read it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from heiindex.hashing import scale_scores  # the HEI scale of the matcher's scores, as fit_hash uses it

CACHE = Path(os.environ.get("HASH_EXP_CACHE", "/tmp/hash-exp-cache"))  # benchmarks/hash_exp_cache.py --out
MODELS = CACHE / "models"  # where trained modules are saved and the study scripts read them


@dataclass(frozen=True)
class Exp:
    bits: int = 256
    img: str = "mean"  # mean | meanmax | mq
    txt: str = "mean"  # mean | meanmax | mq
    K: int = 1  # image codes (mq)
    Kt: int = 1  # caption codes (mq)
    head: str = "linear"  # linear | mlp
    hidden: int = 1024
    agg: str = "max"  # max | smax
    tau: float = 0.05
    q_scale: float = 5.0  # initial norm of the query vectors
    mq_mean: bool = False  # one of the K image codes is the plain mean-pooled one
    epochs: int = 80
    lr: float = 3e-3
    rank_weight: float = 1.0
    margin: float = 0.2
    hei: bool = True
    rounds: int = 2  # scored record rounds used
    group: int = 1  # records concatenated per step (bigger batches: ranking over all, HEI per record)
    bank: int = 0  # memory bank of earlier batches' codes as extra ranking negatives (records kept)
    hardest: float = 0.0  # weight of a VSE++ hardest-negative term beside the summed hinge
    rdrop: float = 0.0  # training augmentation: drop each region with this probability (>= 1 kept)
    wdrop: float = 0.0  # training augmentation: drop each real word with this probability (>= 1 kept)
    noise: float = 0.0  # training augmentation: gaussian noise (std, relative to feature norm) on pooled inputs
    wd: float = 0.0  # AdamW weight decay (0: Adam)
    seed: int = 0
    train_images: int = 0  # keep only the records' rows of the first n training images (0: all); data scaling
    kd: float = 0.0  # weight of a listwise distillation term: KL(softmax(scores / kd_ts) || softmax(h / kd_th)), both directions
    kd_ts: float = 0.025  # temperature on the matcher's scores (coco-sim batch scores: std ~0.06, range ~0.5)
    kd_th: float = 0.1  # temperature on the code similarity (range 2: about 4x the scores' range)
    # weight of the loss on mixed images (hash_exp_mix.py: two training images' regions mixed, matcher-scored)
    mix: float = 0.0
    mix_loss: str = "kd"  # kd (listwise, as kd) | mse (similarity to the scaled score, both sides)
    shared: bool = False  # one hash layer for both modalities (the matcher's regions and words share one space)
    note: str = ""


CONFIGS: dict[str, Exp] = {
    "base256": Exp(),
    "base512": Exp(bits=512),
    "base256_r4": Exp(rounds=4),
    "base256_g4": Exp(group=4),
    "base256_s1": Exp(seed=1),  # seed spread of the baseline
    "base256_r4_s1": Exp(rounds=4, seed=1),
    "base256_g4_e320": Exp(group=4, epochs=320),  # group 4 at base256's number of optimizer steps
    "base256_bank4": Exp(bank=4),
    "base256_e160": Exp(epochs=160),  # base256 at base256_r4's number of optimizer steps
    "base256_g4_e320_s1": Exp(group=4, epochs=320, seed=1),
    "g4_e320_wd1e2": Exp(group=4, epochs=320, wd=1e-2),  # combined
    "r4_g4_e160": Exp(rounds=4, group=4, epochs=160),  # combined; base256's number of optimizer steps
    "meanmax256": Exp(img="meanmax", txt="meanmax"),
    "mlp256": Exp(head="mlp"),
    "meanmax_mlp256": Exp(img="meanmax", txt="meanmax", head="mlp"),
    "mq1_256": Exp(img="mq", K=1),
    "mq2_256": Exp(img="mq", K=2),
    "mq4_256": Exp(img="mq", K=4),
    "mq8_256": Exp(img="mq", K=8),
    "mq4_64": Exp(img="mq", K=4, bits=64),
    "mq4_128": Exp(img="mq", K=4, bits=128),
    "mq4s_256": Exp(img="mq", K=4, agg="smax"),
    "mq4m_256": Exp(img="mq", K=4, mq_mean=True),
    "mq4_txtmq_256": Exp(img="mq", K=4, txt="mq", Kt=1),
    "txtmq_256": Exp(txt="mq", Kt=1, rounds=4),  # a learned attention query pools the words; images mean-pooled
    "txtmq_256_s1": Exp(txt="mq", Kt=1, rounds=4, seed=1),
    "mq1_txtmq_256": Exp(img="mq", K=1, txt="mq", Kt=1, rounds=4),  # both sides pooled by a learned query
    "txtmq2_256": Exp(txt="mq", Kt=2, rounds=4),  # 2 codes per caption (query side only; the index keeps one per image)
    "txtmq4_256": Exp(txt="mq", Kt=4, rounds=4),
    "base256_rd3": Exp(rdrop=0.3),
    "base256_rd3_wd2": Exp(rdrop=0.3, wdrop=0.2),
    "base256_rd5_wd3": Exp(rdrop=0.5, wdrop=0.3),
    "base256_noise": Exp(noise=0.5),
    "base256_wd": Exp(wd=0.05),
    "base256_wd1e4": Exp(wd=1e-4),
    "base256_wd1e3": Exp(wd=1e-3),
    "base256_wd1e2": Exp(wd=1e-2),
    "meanmax_rd3_wd2": Exp(img="meanmax", txt="meanmax", rdrop=0.3, wdrop=0.2),
    "mq4_rd3_wd2": Exp(img="mq", K=4, rdrop=0.3, wdrop=0.2),
    "r4_n1000": Exp(rounds=4, train_images=1000),  # data scaling: 1/4 and 1/2 of the training images
    "r4_n2000": Exp(rounds=4, train_images=2000),
    "r4_n2000_s1": Exp(rounds=4, train_images=2000, seed=1),
    "r4_n3000": Exp(rounds=4, train_images=3000),
    "kd1_r4": Exp(rounds=4, kd=1.0),  # listwise distillation of each scored batch, beside HEI + ranking
    "kd1_txtmq": Exp(txt="mq", Kt=1, rounds=4, kd=1.0),
    "mixkd_r4": Exp(rounds=4, mix=1.0),  # function matching on mixed images (hash_exp_mix.py)
    "mixmse_r4": Exp(rounds=4, mix=1.0, mix_loss="mse"),
    "shared_r4": Exp(rounds=4, shared=True),  # one hash layer for both modalities
    "base64": Exp(bits=64),
    "base128": Exp(bits=128),
    "base1024": Exp(bits=1024),
}


# ---------------------------------------------------------------------------------------- data
def load_split(name: str) -> dict:
    d = torch.load(CACHE / f"{name}.pt")
    lens = d["lengths"]
    mask = torch.arange(d["words"].shape[1])[None, :] < lens[:, None]
    d["mask"] = mask
    m = mask[..., None].float()
    d["w_mean"] = (d["words"] * m).sum(1) / m.sum(1)
    d["w_max"] = d["words"].masked_fill(~mask[..., None], float("-inf")).amax(1)
    d["r_mean"] = d["regions"].mean(1)
    d["r_max"] = d["regions"].amax(1)
    return d


def load_module(name: str, models: Path = MODELS) -> Hasher:
    """A module saved by ``--save`` (``models/name.pt``), in eval mode."""
    ck = torch.load(Path(models) / f"{name}.pt")
    model = Hasher(Exp(**ck["exp"]))
    model.load_state_dict(ck["state"])
    return model.eval()


def load_mixes(rounds: int) -> list[dict]:
    """hash_exp_mix.py's mixed images, aligned with ``load_records(rounds)``."""
    mixes = []
    for r in range(rounds):
        mixes += torch.load(CACHE / f"mix{r}.pt")
    return mixes


def load_records(rounds: int, train_images: int = 0) -> list[dict]:
    recs = []
    for r in range(rounds):
        recs += torch.load(CACHE / f"round{r}.pt")
    if train_images:  # each record keeps only its rows (and score rows / columns) of the first n images
        kept = []
        for rec in recs:
            keep = rec["imgs"] < train_images
            if int(keep.sum()) >= 2:
                kept.append(
                    {"caps": rec["caps"][keep], "imgs": rec["imgs"][keep], "scores": rec["scores"][keep][:, keep]}
                )
        recs = kept
    return recs


# --------------------------------------------------------------------------------------- model
class Side(nn.Module):
    """One modality: features -> (n, K, bits) pre-sign outputs."""

    def __init__(self, kind: str, K: int, bits: int, head: str, hidden: int, q_scale: float, with_mean: bool, d=256):
        super().__init__()
        self.kind, self.K, self.with_mean = kind, K, with_mean
        din = 2 * d if kind == "meanmax" else d
        if kind == "mq":
            nq = K - 1 if with_mean else K
            q = torch.randn(nq, d)
            self.queries = nn.Parameter(q / q.norm(dim=1, keepdim=True) * q_scale)
        if head == "linear":
            self.head = nn.Linear(din, bits)
        else:
            self.head = nn.Sequential(nn.Linear(din, hidden), nn.GELU(), nn.Linear(hidden, bits))

    def forward(self, mean: Tensor, mx: Tensor, items: Tensor | None, mask: Tensor | None) -> Tensor:
        if self.kind == "mean":
            x = mean[:, None]
        elif self.kind == "meanmax":
            x = torch.cat([mean, mx], dim=-1)[:, None]
        else:  # mq: softmax over items of q_k . item
            logits = torch.einsum("nmd,kd->nkm", items, self.queries)
            if mask is not None:
                logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
            x = torch.einsum("nkm,nmd->nkd", torch.softmax(logits, dim=-1), items)
            if self.with_mean:
                x = torch.cat([mean[:, None], x], dim=1)
        return self.head(x)


class Hasher(nn.Module):
    def __init__(self, e: Exp):
        super().__init__()
        self.e = e
        self.img = Side(e.img, e.K, e.bits, e.head, e.hidden, e.q_scale, e.mq_mean)
        self.txt = Side(e.txt, e.Kt, e.bits, e.head, e.hidden, e.q_scale, False)
        if e.shared:
            self.txt.head = self.img.head

    def image_out(self, split: dict, idx: Tensor | None = None) -> Tensor:
        sel = (lambda t: t) if idx is None else (lambda t: t[idx])
        items = sel(split["regions"]) if self.e.img == "mq" else None
        return self.img(sel(split["r_mean"]), sel(split["r_max"]), items, split.get("rmask"))

    def caption_out(self, split: dict, idx: Tensor | None = None) -> Tensor:
        sel = (lambda t: t) if idx is None else (lambda t: t[idx])
        if self.e.txt == "mq":
            mask = sel(split["mask"])
            L = int(mask.sum(1).max())
            return self.txt(sel(split["w_mean"]), sel(split["w_max"]), sel(split["words"])[:, :L], mask[:, :L])
        return self.txt(sel(split["w_mean"]), sel(split["w_max"]), None, None)


def similarity(ic: Tensor, tc: Tensor, agg: str, tau: float) -> Tensor:
    """(ni, K, b) x (nt, Kt, b) relaxed codes -> (ni, nt) code similarity in [-1, 1]."""
    b = ic.shape[-1]
    if ic.shape[1] == 1 and tc.shape[1] == 1:
        return ic[:, 0] @ tc[:, 0].T / b
    h = torch.einsum("ikb,jlb->ijkl", ic, tc).flatten(2) / b
    if agg == "max":
        return h.amax(-1)
    return (torch.softmax(h / tau, dim=-1) * h).sum(-1)


def hei_loss(h: Tensor, target: Tensor, positive: Tensor, scored: Tensor) -> Tensor:
    matched = ((h[positive] - 1) ** 2).mean()
    viol = scored & ~positive & (h > target)
    return matched + (((h - target)[viol] ** 2).mean() if bool(viol.any()) else h.sum() * 0)


def kd_loss(h: Tensor, scores: Tensor, ts: float, th: float) -> Tensor:
    """Listwise distillation of one scored batch (images, captions): for each caption the matcher's
    softmax over the batch's images is the target of the codes' softmax, and the same per image."""
    kl = torch.nn.functional.kl_div
    t2i = kl(
        torch.log_softmax(h / th, 0).T, torch.log_softmax(scores / ts, 0).T, log_target=True, reduction="batchmean"
    )
    i2t = kl(torch.log_softmax(h / th, 1), torch.log_softmax(scores / ts, 1), log_target=True, reduction="batchmean")
    return t2i + i2t


def rank_loss(h: Tensor, h_pos_i: Tensor, h_pos_t: Tensor, positive: Tensor, margin: float, hardest: float):
    """Summed hinge (as code_ranking_loss), scaled to a 128-row batch; h_pos_i (ni,) is row i's matched
    similarity (image i vs its own caption), h_pos_t (nt,) caption j vs its own image."""
    cost_txt = (margin + h - h_pos_i[:, None]).clamp(min=0).masked_fill(positive, 0)
    cost_img = (margin + h - h_pos_t[None, :]).clamp(min=0).masked_fill(positive, 0)
    n = h.shape[0]
    loss = (cost_txt.sum() + cost_img.sum()) / n * (128 / n)
    if hardest:
        loss = loss + hardest * (cost_txt.amax(1).mean() + cost_img.amax(0).mean())
    return loss


# ---------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def codes(model: Hasher, split: dict) -> tuple[Tensor, Tensor]:
    model.eval()
    ic = torch.sign(model.image_out(split))
    tc = torch.cat(
        [
            torch.sign(model.caption_out(split, torch.arange(s, min(s + 2500, len(split["lengths"])))))
            for s in range(0, len(split["lengths"]), 2500)
        ]
    )
    ic[ic == 0] = -1  # sign(0): a zero output packs as bit 0, i.e. -1
    tc[tc == 0] = -1
    return ic, tc


@torch.no_grad()
def recall_from_codes(ic: Tensor, tc: Tensor, cap_img: Tensor, n: int = 100) -> dict:
    b = ic.shape[-1]
    ni, nt = ic.shape[0], tc.shape[0]
    dot = torch.einsum("ikb,jlb->jikl", ic, tc).flatten(2).amax(-1)  # (captions, images)
    dist = ((b - dot) / 2).round()
    # t2i: rank of the ground-truth image per caption, ties by row id
    gt = dist[torch.arange(nt), cap_img]
    idx = torch.arange(ni)[None, :]
    rank = (dist < gt[:, None]).sum(1) + ((dist == gt[:, None]) & (idx < cap_img[:, None])).sum(1)
    t2i = float((rank < min(n, ni)).float().mean())
    # i2t: best rank among each image's captions
    dT = dist.T.contiguous()  # (images, captions)
    best = torch.full((ni,), 1 << 30, dtype=torch.long)
    cidx = torch.arange(nt)
    own = dT[cap_img, cidx]  # (captions,) distance caption c <-> its image
    for s in range(0, nt, 500):
        cs = cidx[s : s + 500]
        rows = dT[cap_img[cs]]  # (500, nt)
        g = own[cs][:, None]
        r = (rows < g).sum(1) + ((rows == g) & (cidx[None, :] < cs[:, None])).sum(1)
        best.scatter_reduce_(0, cap_img[cs], r, reduce="amin")
    i2t = float((best < min(n, nt)).float().mean())
    return {"t2i": t2i, "i2t": i2t}


# ------------------------------------------------------------------------------------- training
def _keep_mask(shape, valid: Tensor, p: float) -> Tensor:
    """Random keep mask within ``valid`` (n, m), each kept with prob 1-p, at least one per row."""
    keep = (torch.rand(shape) >= p) & valid
    empty = ~keep.any(1)
    if bool(empty.any()):  # keep one random valid item
        r = torch.rand(shape).masked_fill(~valid, -1).argmax(1)
        keep[empty, r[empty]] = True
    return keep


def _pool_masked(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1), x.masked_fill(~mask[..., None], float("-inf")).amax(1)


def augmented_batch(e: Exp, tr: dict, imgs: Tensor, caps: Tensor) -> tuple[dict, dict]:
    """Per-batch inputs (regions / words re-pooled under random dropout, noise on pooled vectors)."""
    reg = tr["regions"][imgs]
    rmask = (
        _keep_mask(reg.shape[:2], torch.ones(reg.shape[:2], dtype=torch.bool), e.rdrop)
        if e.rdrop
        else torch.ones(reg.shape[:2], dtype=torch.bool)
    )
    r_mean, r_max = _pool_masked(reg, rmask)
    wm = tr["mask"][caps]
    L = int(wm.sum(1).max())
    wm = wm[:, :L]
    words = tr["words"][caps, :L]
    if e.wdrop:
        wm = _keep_mask(wm.shape, wm, e.wdrop)
    w_mean, w_max = _pool_masked(words, wm)
    if e.noise:
        r_mean = r_mean + e.noise * r_mean.norm(dim=1, keepdim=True) / 16 * torch.randn_like(r_mean)
        w_mean = w_mean + e.noise * w_mean.norm(dim=1, keepdim=True) / 16 * torch.randn_like(w_mean)
    img = {
        "regions": reg.masked_fill(~rmask[..., None], 0) if e.rdrop else reg,
        "r_mean": r_mean,
        "r_max": r_max,
        "rmask": rmask,
    }
    txt = {"words": words, "mask": wm, "w_mean": w_mean, "w_max": w_max}
    return img, txt


def mixed_regions(regions: Tensor, imgs: Tensor, partner: Tensor, mask: Tensor) -> Tensor:
    """(n, 36, d) regions of mixed images (``hash_exp_mix.py``): slot j from ``imgs`` where
    ``mask[:, j]``, else from ``partner``."""
    return torch.where(mask[..., None], regions[imgs], regions[partner])


def mix_term(e: Exp, model: Hasher, tr: dict, rec: dict, mix: dict, tc: Tensor, positive: Tensor) -> Tensor:
    """Loss of the codes of one record's mixed images against its captions' codes ``tc``, the
    matcher's scores of those pairs as the target, scaled by the real batch's min and matched mean."""
    reg = mixed_regions(tr["regions"], rec["imgs"], mix["partner"], mix["mask"])
    ic = torch.tanh(model.image_out({"regions": reg, "r_mean": reg.mean(1), "r_max": reg.amax(1)}))
    h = similarity(ic, tc, e.agg, e.tau)
    if e.mix_loss == "kd":
        return kd_loss(h, mix["scores"], e.kd_ts, e.kd_th)
    if e.mix_loss != "mse":
        raise ValueError(f"mix_loss must be 'kd' or 'mse', got {e.mix_loss!r}")
    lo, hi = rec["scores"].min(), rec["scores"][positive].mean()
    target = (2 * (mix["scores"] - lo) / (hi - lo).clamp_min(1e-6) - 1).clamp(-1, 1)
    return ((h - target) ** 2).mean()  # mse


def train(e: Exp, tr: dict, dev: dict, records: list[dict], log=print, mixes: list[dict] | None = None):
    torch.manual_seed(e.seed)
    model = Hasher(e)
    opt = (
        torch.optim.AdamW(model.parameters(), lr=e.lr, weight_decay=e.wd)
        if e.wd
        else torch.optim.Adam(model.parameters(), lr=e.lr)
    )
    augment = bool(e.rdrop or e.wdrop or e.noise)
    gen = np.random.default_rng(e.seed)
    best, hist = None, []
    t0 = time.perf_counter()
    for epoch in range(e.epochs):
        model.train()
        perm = gen.permutation(len(records))
        bank: list[tuple[Tensor, Tensor, Tensor]] = []
        tot = 0.0
        for s in range(0, len(perm), e.group):
            recs = [records[int(i)] for i in perm[s : s + e.group]]
            caps = torch.cat([r["caps"] for r in recs])
            imgs = torch.cat([r["imgs"] for r in recs])
            if augment:
                bi, bt = augmented_batch(e, tr, imgs, caps)
                ic, tc = torch.tanh(model.image_out(bi)), torch.tanh(model.caption_out(bt))
            else:
                ic = torch.tanh(model.image_out(tr, imgs))
                tc = torch.tanh(model.caption_out(tr, caps))
            h = similarity(ic, tc, e.agg, e.tau)
            positive = imgs[:, None] == imgs[None, :]
            loss = h.sum() * 0
            if e.hei:
                n = len(caps)
                target = torch.full((n, n), -1.0)
                scored = torch.zeros((n, n), dtype=torch.bool)
                o = 0
                for r in recs:
                    m = len(r["caps"])
                    target[o : o + m, o : o + m] = scale_scores(r["scores"], positive[o : o + m, o : o + m])
                    scored[o : o + m, o : o + m] = True
                    o += m
                loss = loss + hei_loss(h, target, positive, scored)
            if e.kd:
                o = 0
                for r in recs:
                    m = len(r["caps"])
                    loss = loss + e.kd * kd_loss(h[o : o + m, o : o + m], r["scores"], e.kd_ts, e.kd_th) / len(recs)
                    o += m
            if e.rank_weight:
                hp = h.diag()
                if bank:
                    bi = torch.cat([b[0] for b in bank])
                    bt = torch.cat([b[1] for b in bank])
                    bimg = torch.cat([b[2] for b in bank])
                    h_it = similarity(ic, bt, e.agg, e.tau)  # batch images vs bank captions
                    h_ti = similarity(bi, tc, e.agg, e.tau)  # bank images vs batch captions
                    pos_it = imgs[:, None] == bimg[None, :]
                    pos_ti = bimg[:, None] == imgs[None, :]
                    h_full_i = torch.cat([h, h_it], 1)  # image rows vs all captions
                    pos_full_i = torch.cat([positive, pos_it], 1)
                    pos_full_t = torch.cat([positive, pos_ti], 0)
                    n = h.shape[0]
                    # A bank negative is detached, so its hinge pushes only the anchor side; its positive
                    # term must then pull only the anchor side too (hp with the other side detached), or
                    # every bank term pulls both sides of the matched pair but pushes one, and the codes
                    # collapse to one shared code (seen: dev recall 10 / 2 from epoch 10 on).
                    hp_i = similarity(ic, tc.detach(), e.agg, e.tau).diag()  # gradient to images only
                    hp_t = similarity(ic.detach(), tc, e.agg, e.tau).diag()  # gradient to captions only
                    ct = torch.cat([e.margin + h - hp[:, None], e.margin + h_it - hp_i[:, None]], 1)
                    cim = torch.cat([e.margin + h - hp[None, :], e.margin + h_ti - hp_t[None, :]], 0)
                    ct = ct.clamp(min=0).masked_fill(pos_full_i, 0)
                    cim = cim.clamp(min=0).masked_fill(pos_full_t, 0)
                    rl = (ct.sum() + cim.sum()) / n * (128 / h_full_i.shape[1])
                else:
                    rl = rank_loss(h, hp, hp, positive, e.margin, e.hardest)
                loss = loss + e.rank_weight * rl
            if e.mix:
                i = int(perm[s])
                loss = loss + e.mix * mix_term(e, model, tr, records[i], mixes[i], tc, positive)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach())
            if e.bank:
                bank.append((ic.detach(), tc.detach(), imgs))
                bank = bank[-e.bank :]
        ic_d, tc_d = codes(model, dev)
        rec = recall_from_codes(ic_d, tc_d, dev["caption_image"])
        hist.append({"epoch": epoch + 1, "loss": tot, **rec})
        if best is None or rec["t2i"] + rec["i2t"] > best[0]:
            best = (rec["t2i"] + rec["i2t"], epoch + 1, {k: v.clone() for k, v in model.state_dict().items()}, rec)
        if (epoch + 1) % 10 == 0:
            log(
                f"  epoch {epoch + 1}: t2i {100 * rec['t2i']:.1f} i2t {100 * rec['i2t']:.1f} ({time.perf_counter() - t0:.0f} s)"
            )
    model.load_state_dict(best[2])
    return model, {"best_epoch": best[1], "dev": best[3], "train_s": time.perf_counter() - t0, "history": hist}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="base256")
    ap.add_argument("--epochs", type=int, default=None, help="override every config's epochs")
    ap.add_argument("--test", action="store_true", help="also report the test split for each config")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=CACHE / "results.jsonl")
    ap.add_argument(
        "--save",
        type=Path,
        default=MODELS,
        help="folder for each trained module's state, where hash_exp_eval / _maxsim / _adapt look by default",
    )
    ap.add_argument(
        "--check-faiss", action="store_true", help="check the evaluator against FAISS on the default module"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tr, dev = load_split("train"), load_split("dev")
    test = load_split("test") if args.test else None
    if args.check_faiss:
        check_faiss(dev)
    records_by_rounds: dict[tuple[int, int], list] = {}
    for name in args.configs.split(","):
        e = CONFIGS[name]
        if args.epochs:
            e = replace(e, epochs=args.epochs)
        if (e.rounds, e.train_images) not in records_by_rounds:
            records_by_rounds[e.rounds, e.train_images] = load_records(e.rounds, e.train_images)
        print(f"{name}: {e}", flush=True)
        if e.mix and (e.group != 1 or e.train_images or e.rdrop or e.wdrop or e.noise or e.bank):
            raise SystemExit(f"{name}: mixed images need group 1, all training images and no other augmentation")
        model, res = train(
            e,
            tr,
            dev,
            records_by_rounds[e.rounds, e.train_images],
            log=lambda m: print(m, flush=True),
            mixes=load_mixes(e.rounds) if e.mix else None,
        )
        row = {
            "name": name,
            "exp": e.__dict__,
            "best_epoch": res["best_epoch"],
            "dev": res["dev"],
            "train_s": round(res["train_s"], 1),
            "history": res["history"],
        }
        if test is not None:
            row["test"] = recall_from_codes(*codes(model, test), test["caption_image"])
        args.save.mkdir(parents=True, exist_ok=True)
        torch.save({"exp": e.__dict__, "state": model.state_dict()}, args.save / f"{name}.pt")
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        ts = f" test t2i {100 * row['test']['t2i']:.1f} i2t {100 * row['test']['i2t']:.1f}" if test is not None else ""
        print(
            f"RESULT {name}: dev t2i {100 * res['dev']['t2i']:.1f} i2t {100 * res['dev']['i2t']:.1f} "
            f"best epoch {res['best_epoch']}/{e.epochs} {res['train_s']:.0f} s{ts}",
            flush=True,
        )


def check_faiss(dev: dict) -> None:
    """Evaluator vs heiindex's FAISS candidate_recall on the committed default module."""
    from heiindex.default_data import default_hash_dir
    from heiindex.hash_folder import load_hash

    mod = load_hash(default_hash_dir()).module
    with torch.no_grad():  # the module's own pooling (the default's words: a learned query)
        ic = (mod.image_hash(mod.pool_images(dev["regions"])) > 0).float() * 2 - 1
        tc = (mod.text_hash(mod.pool_captions(dev["words"], dev["lengths"])) > 0).float() * 2 - 1
    mine = recall_from_codes(ic[:, None], tc[:, None], dev["caption_image"])
    from heiindex.hashing import pool_regions
    from heiindex.packed import PackedWords
    from heiindex.train_hash import PooledSplit, candidate_recall

    pooled = PooledSplit(  # what candidate_recall reads: pooled regions, packed words (the learned query pools them)
        mod.config.pooling,
        pool_regions(dev["regions"], mod.config.pooling),
        dev["caption_image"].numpy(),
        words=PackedWords.from_padded(dev["words"], dev["lengths"]),
    )
    ref = candidate_recall(mod, pooled, 100)
    print(f"evaluator check: torch {mine}, faiss {ref}", flush=True)


if __name__ == "__main__":
    main()
