"""Plain, per-pair reference implementation of SCAN's cross-attention score.

Written straight from the formula, mirroring SCAN's original ``func_attention`` /
``xattn_score_t2i`` / ``xattn_score_i2t`` (Lee et al., 2018), one (caption, image) pair at a
time, in float64. It is deliberately slow and literal: it materialises the attended context
vectors and computes cosines from them, so it shares no algebraic shortcut (Gram matrices,
masking) with the fast implementation in ``heiindex.attention`` that it is used to check.

Only the test suite uses this module.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-8

RAW_FEATURE_NORMS = (
    "softmax",
    "l2norm",
    "clipped_l2norm",
    "l1norm",
    "clipped_l1norm",
    "clipped",
    "no_norm",
)
AGGREGATIONS = ("lse", "mean", "max", "sum")
CROSS_ATTNS = ("t2i", "i2t")


def l2norm(X: torch.Tensor, dim: int, eps: float = EPS) -> torch.Tensor:
    """SCAN's l2norm: X / (sqrt(sum X^2 over dim) + eps)."""
    norm = torch.pow(X, 2).sum(dim=dim, keepdim=True).sqrt() + eps
    return X / norm


def l1norm(X: torch.Tensor, dim: int, eps: float = EPS) -> torch.Tensor:
    """SCAN's l1norm: X / (sum |X| over dim + eps)."""
    norm = torch.abs(X).sum(dim=dim, keepdim=True) + eps
    return X / norm


def cosine(x1: torch.Tensor, x2: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """SCAN's cosine_similarity along the last dim: sum(x1*x2) / max(|x1|*|x2|, eps)."""
    w12 = torch.sum(x1 * x2, dim=-1)
    w1 = torch.sqrt(torch.sum(x1 * x1, dim=-1))
    w2 = torch.sqrt(torch.sum(x2 * x2, dim=-1))
    return w12 / (w1 * w2).clamp(min=eps)


def _leaky_relu(X: torch.Tensor) -> torch.Tensor:
    """SCAN's nn.LeakyReLU(0.1)."""
    return torch.nn.functional.leaky_relu(X, negative_slope=0.1)


def func_attention(query: torch.Tensor, context: torch.Tensor, raw_feature_norm: str, smooth: float) -> torch.Tensor:
    """One pair of SCAN's func_attention.

    query (Lq, d), context (Ls, d) -> weighted context (Lq, d).
    """
    if query.dim() != 2 or context.dim() != 2:
        raise ValueError("func_attention expects 2-D query and context")
    # (Ls, Lq): one row per context item, one column per query item.
    attn = context @ query.T
    # Raw feature normalisation along the QUERY axis (dim 1), per context row.
    if raw_feature_norm == "softmax":
        attn = torch.softmax(attn, dim=1)
    elif raw_feature_norm == "l2norm":
        attn = l2norm(attn, 1)
    elif raw_feature_norm == "clipped_l2norm":
        attn = l2norm(_leaky_relu(attn), 1)
    elif raw_feature_norm == "l1norm":
        attn = l1norm(attn, 1)
    elif raw_feature_norm == "clipped_l1norm":
        attn = l1norm(_leaky_relu(attn), 1)
    elif raw_feature_norm == "clipped":
        attn = _leaky_relu(attn)
    elif raw_feature_norm == "no_norm":
        pass
    else:
        raise ValueError(f"unknown raw_feature_norm: {raw_feature_norm!r}")
    # (Lq, Ls): softmax over the CONTEXT axis of the smoothed attention.
    attn = attn.T
    attn = torch.softmax(attn * smooth, dim=1)
    # (Lq, Ls) @ (Ls, d) -> (Lq, d)
    return attn @ context


def aggregate(r: torch.Tensor, agg: str, lambda_lse: float) -> float:
    """Aggregate a 1-D vector of relevances the way SCAN does."""
    if agg == "lse":
        # SCAN: row_sim.mul_(lambda_lse).exp_().sum().log() / lambda_lse (no max-shift).
        return float(torch.log(torch.exp(r * lambda_lse).sum()) / lambda_lse)
    if agg == "mean":
        return float(r.mean())
    if agg == "max":
        return float(r.max())
    if agg == "sum":
        return float(r.sum())
    raise ValueError(f"unknown agg: {agg!r}")


def reference_score(
    words: torch.Tensor,
    regions: torch.Tensor,
    cross_attn: str,
    raw_feature_norm: str,
    agg: str,
    lambda_lse: float,
    lambda_softmax: float,
) -> float:
    """SCAN score of one caption (already sliced to its real words, (L_real, d)) against one
    image ((R, d))."""
    words = torch.as_tensor(words, dtype=torch.float64)
    regions = torch.as_tensor(regions, dtype=torch.float64)
    if words.dim() != 2 or regions.dim() != 2 or words.shape[1] != regions.shape[1]:
        raise ValueError("expected words (L, d) and regions (R, d) with the same d")
    if words.shape[0] < 1 or regions.shape[0] < 1:
        raise ValueError("need at least one word and one region")
    if cross_attn == "t2i":
        # words attend over regions; one relevance per word.
        ctx = func_attention(words, regions, raw_feature_norm, lambda_softmax)
        r = cosine(words, ctx)
    elif cross_attn == "i2t":
        # regions attend over the (real) words; one relevance per region.
        ctx = func_attention(regions, words, raw_feature_norm, lambda_softmax)
        r = cosine(regions, ctx)
    else:
        raise ValueError(f"unknown cross_attn: {cross_attn!r}")
    out = aggregate(r, agg, lambda_lse)
    if not math.isfinite(out):
        raise FloatingPointError(f"non-finite reference score {out}")
    return out


def reference_matrix(
    words: torch.Tensor,
    lengths,
    regions: torch.Tensor,
    *,
    cross_attn: str,
    raw_feature_norm: str,
    agg: str,
    lambda_lse: float,
    lambda_softmax: float,
) -> torch.Tensor:
    """(n_caps, n_imgs) float64 matrix of reference scores, one pair at a time.

    words (n_caps, L_max, d) padded, lengths (n_caps,) real word counts, regions
    (n_imgs, R, d). Padding beyond each caption's length is never read.
    """
    words = torch.as_tensor(words, dtype=torch.float64)
    regions = torch.as_tensor(regions, dtype=torch.float64)
    lengths = [int(n) for n in torch.as_tensor(lengths).tolist()]
    n_caps, n_imgs = words.shape[0], regions.shape[0]
    if len(lengths) != n_caps:
        raise ValueError("one length per caption")
    out = torch.empty(n_caps, n_imgs, dtype=torch.float64)
    for i in range(n_caps):
        cap = words[i, : lengths[i]]
        for j in range(n_imgs):
            out[i, j] = reference_score(
                cap,
                regions[j],
                cross_attn=cross_attn,
                raw_feature_norm=raw_feature_norm,
                agg=agg,
                lambda_lse=lambda_lse,
                lambda_softmax=lambda_softmax,
            )
    return out
