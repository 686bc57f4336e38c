"""Exact, batched SCAN cross-attention scores.

What this module is for: the SCAN pair score (Lee et al., ECCV 2018) of captions against
images, computed for a block of captions x a block of images (exhaustive evaluation) or for
each query against its own candidate list (re-ranking), without ever materialising the
attended context vectors. It relies on two identities (see ``shared/notes/method.md``):

* ``w_l . c_l = sum_r p_lr s_lr``: the numerator of the relevance is a weighted sum of the raw
  similarities already computed;
* ``|c_l|^2 = p_l^T G p_l`` with ``G = V V^T``: the context norm needs only the R x R Gram
  matrix of the image's regions (or the L x L Gram matrix of the caption's words for
  image-to-text attention).

So a pair costs one L x R block of a matrix product plus O(L R^2) work, instead of L context
vectors of size d. Padding words (beyond ``lengths``) are ignored exactly as SCAN ignores them
(SCAN slices each caption to its real words).

What it must not do: hold model weights, encode features, or pick candidates. Inputs are
already-encoded word features ``(n_caps, L, d)`` and region features ``(n_imgs, R, d)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

__all__ = [
    "AGGREGATIONS",
    "RAW_FEATURE_NORMS",
    "AttentionConfig",
    "region_gram",
    "score_block",
    "score_caption_candidates",
    "score_image_candidates",
]

RAW_FEATURE_NORMS = (
    "clipped_l2norm",
    "l2norm",
    "softmax",
    "clipped_l1norm",
    "l1norm",
    "clipped",
    "no_norm",
)
AGGREGATIONS = ("lse", "mean", "max", "sum")
CROSS_ATTN = ("t2i", "i2t")
_EPS = 1e-8
# Elements of one L x R similarity block batch; ~6 live tensors of this size at peak.
# Gathers use index_select, which copies rows ~2x faster than advanced indexing on CPU.
DEFAULT_MAX_ELEMENTS = 500_000  # small blocks stay in cache: fastest on 2 cores of 250K..8M


@dataclass(frozen=True)
class AttentionConfig:
    """One SCAN cross-attention scoring function.

    ``cross_attn``: ``"t2i"`` (words attend over regions, aggregate over words) or ``"i2t"``
    (regions attend over words, aggregate over regions). This is a property of the model, not
    of the retrieval direction: either can rank images for a caption or captions for an image.
    """

    cross_attn: str = "t2i"
    raw_feature_norm: str = "clipped_l2norm"
    agg: str = "lse"
    lambda_lse: float = 6.0
    lambda_softmax: float = 9.0

    def __post_init__(self) -> None:
        if self.cross_attn not in CROSS_ATTN:
            raise ValueError(f"cross_attn must be one of {CROSS_ATTN}, got {self.cross_attn!r}")
        if self.raw_feature_norm not in RAW_FEATURE_NORMS:
            raise ValueError(f"raw_feature_norm must be one of {RAW_FEATURE_NORMS}, got {self.raw_feature_norm!r}")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"agg must be one of {AGGREGATIONS}, got {self.agg!r}")
        if self.lambda_softmax <= 0 or (self.agg == "lse" and self.lambda_lse <= 0):
            raise ValueError("lambda_softmax and lambda_lse must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


def region_gram(regions: Tensor) -> Tensor:
    """Gram matrices of each image's regions: ``(n_imgs, R, d) -> (n_imgs, R, R)``."""
    _check_rank("regions", regions, 3)
    return torch.bmm(regions, regions.transpose(1, 2))


# ---------------------------------------------------------------------------------------------
# The two cores. Each takes raw similarities in the layout that lets the Gram product be one
# batched matrix multiply without copies, and returns the aggregated pair scores.
# ---------------------------------------------------------------------------------------------


def _t2i_core(cfg: AttentionConfig, sims: Tensor, word_mask: Tensor, word_norm: Tensor, gram: Tensor) -> Tensor:
    """Words attend over regions.

    sims: (B, C, L, R) raw word.region similarities, zero at padded words; the softmax axis
    (regions) is last, so the costly reductions run over contiguous memory.
    word_mask, word_norm: broadcastable to (B, C, L). gram: (B, R, R). Returns (B, C).
    """
    b, c, length, r = sims.shape
    attn = _raw_norm(cfg.raw_feature_norm, sims, word_mask.unsqueeze(-1), dim=2)  # over words
    prob = torch.softmax(attn * cfg.lambda_softmax, dim=-1)  # over regions
    del attn
    dot = (prob * sims).sum(dim=-1)  # (B, C, L) = w_l . c_l
    quad = torch.bmm(prob.reshape(b, c * length, r), gram).view(b, c, length, r)  # P G (G symmetric)
    ctx_sq = (quad * prob).sum(dim=-1)  # (B, C, L) = |c_l|^2
    del quad, prob
    rel = dot / (word_norm * ctx_sq.clamp_min(0).sqrt()).clamp_min(_EPS)
    return _aggregate(cfg, rel, word_mask.expand_as(rel))


def _i2t_core(cfg: AttentionConfig, sims: Tensor, word_mask: Tensor, region_norm: Tensor, word_gram: Tensor) -> Tensor:
    """Regions attend over (real) words.

    sims: (C, B, R, L) raw word.region similarities, zero at padded words; the softmax axis
    (words) is last. word_mask: (C, L) bool. region_norm: broadcastable to (C, B, R).
    word_gram: (C, L, L). Returns (C, B).
    """
    c, b, r, length = sims.shape
    # The norm runs over the query axis, here the regions (dim 2); every region is real.
    attn = _raw_norm(cfg.raw_feature_norm, sims, None, dim=2)
    logits = (attn * cfg.lambda_softmax).masked_fill(~word_mask.view(c, 1, 1, length), float("-inf"))
    del attn
    prob = torch.softmax(logits, dim=-1)  # over words
    del logits
    dot = (prob * sims).sum(dim=-1)  # (C, B, R) = v_r . c_r
    quad = torch.bmm(prob.reshape(c, b * r, length), word_gram).view(c, b, r, length)
    ctx_sq = (quad * prob).sum(dim=-1)  # (C, B, R)
    del quad, prob
    rel = dot / (region_norm * ctx_sq.clamp_min(0).sqrt()).clamp_min(_EPS)
    return _aggregate(cfg, rel, None)


def _raw_norm(norm: str, sims: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    """SCAN's ``raw_feature_norm`` along the query axis ``dim``; ``mask`` marks real entries."""
    if norm in ("clipped_l2norm", "clipped_l1norm", "clipped"):
        x = torch.nn.functional.leaky_relu(sims, 0.1)
    else:
        x = sims
    if norm in ("clipped_l2norm", "l2norm"):
        sq = x * x if mask is None else (x * x).masked_fill(~mask, 0.0)
        return x / (sq.sum(dim=dim, keepdim=True).sqrt() + _EPS)
    if norm in ("clipped_l1norm", "l1norm"):
        ab = x.abs() if mask is None else x.abs().masked_fill(~mask, 0.0)
        return x / (ab.sum(dim=dim, keepdim=True) + _EPS)
    if norm == "softmax":
        logits = x if mask is None else x.masked_fill(~mask, float("-inf"))
        return torch.softmax(logits, dim=dim)
    return x if norm in ("clipped", "no_norm") else _unreachable(norm)


def _unreachable(norm: str) -> Tensor:
    raise ValueError(f"unknown raw_feature_norm {norm!r}")


def _aggregate(cfg: AttentionConfig, rel: Tensor, mask: Tensor | None) -> Tensor:
    """Aggregate relevances over the last axis, counting only ``mask`` entries."""
    if cfg.agg == "lse":
        x = rel * cfg.lambda_lse
        if mask is not None:
            x = x.masked_fill(~mask, float("-inf"))
        return torch.logsumexp(x, dim=-1) / cfg.lambda_lse
    if cfg.agg == "max":
        x = rel if mask is None else rel.masked_fill(~mask, float("-inf"))
        return x.amax(dim=-1)
    x = rel if mask is None else rel.masked_fill(~mask, 0.0)
    total = x.sum(dim=-1)
    if cfg.agg == "sum":
        return total
    count = rel.shape[-1] if mask is None else mask.sum(dim=-1).to(rel.dtype)
    return total / count


# ---------------------------------------------------------------------------------------------
# Public shapes
# ---------------------------------------------------------------------------------------------


def _direction_inputs(
    cfg: AttentionConfig, words: Tensor, regions: Tensor, gram: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """What each attention direction needs besides the similarities: t2i the region Gram
    matrices and the word norms, i2t the region norms (its word Gram matrices are per chunk)."""
    if cfg.cross_attn == "t2i":
        if gram is None:
            gram = region_gram(regions)
        _check_gram(gram, regions)
        return gram, words.norm(dim=-1), None
    return gram, None, regions.norm(dim=-1)


def score_block(
    cfg: AttentionConfig,
    words: Tensor,
    lengths: Tensor,
    regions: Tensor,
    gram: Tensor | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """Scores of every caption against every image.

    words: (n_caps, L, d), padded beyond ``lengths``; lengths: (n_caps,) real word counts >= 1;
    regions: (n_imgs, R, d); gram: optional ``region_gram(regions)`` (n_imgs, R, R).
    Returns (n_caps, n_imgs). Work is split into caption chunks so that no intermediate holds
    more than about ``max_elements`` pair-word-region entries.
    """
    words, mask = _prepare_words(words, lengths)
    _check_regions(regions, words)
    n_caps, length, _ = words.shape
    n_imgs, r, _ = regions.shape
    out = words.new_empty((n_caps, n_imgs))
    cap_step = max(1, min(n_caps, 128))
    img_step = max(1, max_elements // max(1, cap_step * r * length))
    gram, word_norm, region_norm = _direction_inputs(cfg, words, regions, gram)
    # Captions outer, images inner: a chunk of captions stays in cache while the regions stream
    # past it (the other order re-reads every caption's words once per image block).
    for c0 in range(0, n_caps, cap_step):
        w = words[c0 : c0 + cap_step]
        c = w.shape[0]
        m = mask[c0 : c0 + cap_step]
        w_flat = w.reshape(c * length, -1)
        w_t = w.transpose(1, 2)
        if cfg.cross_attn == "t2i":
            wn = word_norm[c0 : c0 + c].unsqueeze(0)
        else:
            wg = torch.bmm(w, w_t)
        for i0 in range(0, n_imgs, img_step):
            reg = regions[i0 : i0 + img_step]
            b = reg.shape[0]
            if cfg.cross_attn == "t2i":
                sims = (w_flat @ reg.reshape(b * r, -1).T).view(c, length, b, r).permute(2, 0, 1, 3)
                block = _t2i_core(cfg, sims, m.unsqueeze(0), wn, gram[i0 : i0 + b])
                out[c0 : c0 + c, i0 : i0 + b] = block.T
            else:
                sims = torch.matmul(reg.reshape(b * r, -1), w_t).view(c, b, r, length)
                block = _i2t_core(cfg, sims, m, region_norm[i0 : i0 + b].unsqueeze(0), wg)
                out[c0 : c0 + c, i0 : i0 + b] = block
    return out


def score_image_candidates(
    cfg: AttentionConfig,
    words: Tensor,
    lengths: Tensor,
    regions: Tensor,
    candidates: Tensor,
    gram: Tensor | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """Each caption against its own candidate images (text-to-image re-ranking).

    words: (n_q, L, d); lengths: (n_q,); regions: (n_imgs, R, d); candidates: (n_q, N) image
    indices. Returns (n_q, N) with ``out[q, j] == score_block(...)[q, candidates[q, j]]``.
    """
    words, mask = _prepare_words(words, lengths)
    _check_regions(regions, words)
    candidates = _check_candidates(candidates, words.shape[0], regions.shape[0], "images")
    n_q, length, d = words.shape
    n_cand = candidates.shape[1]
    r = regions.shape[1]
    out = words.new_empty((n_q, n_cand))
    step = max(1, max_elements // max(1, n_cand * r * length))
    gram, _, region_norm = _direction_inputs(cfg, words, regions, gram)
    for q0 in range(0, n_q, step):
        w = words[q0 : q0 + step]
        m = mask[q0 : q0 + step]
        q = w.shape[0]
        idx = candidates[q0 : q0 + q]
        reg = regions.index_select(0, idx.reshape(-1)).view(q, n_cand * r, d)  # gathered candidate regions
        if cfg.cross_attn == "t2i":
            sims = torch.bmm(w, reg.transpose(1, 2)).view(q, length, n_cand, r)
            sims = sims.permute(0, 2, 1, 3).reshape(q * n_cand, 1, length, r)  # pairs, L x R each
            m_pairs = m.repeat_interleave(n_cand, dim=0).unsqueeze(1)  # (q*N, 1, L)
            wn = w.norm(dim=-1).repeat_interleave(n_cand, dim=0).unsqueeze(1)
            g = gram.index_select(0, idx.reshape(-1))
            out[q0 : q0 + q] = _t2i_core(cfg, sims, m_pairs, wn, g).view(q, n_cand)
        else:
            sims = torch.bmm(reg, w.transpose(1, 2)).view(q, n_cand, r, length)
            wg = torch.bmm(w, w.transpose(1, 2))
            rn = region_norm[idx]  # (q, N, R)
            out[q0 : q0 + q] = _i2t_core(cfg, sims, m, rn, wg)
    return out


def score_caption_candidates(
    cfg: AttentionConfig,
    regions: Tensor,
    words: Tensor,
    lengths: Tensor,
    candidates: Tensor,
    gram: Tensor | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """Each image against its own candidate captions (image-to-text re-ranking).

    regions: (n_q, R, d); words: (n_caps, L, d); lengths: (n_caps,); candidates: (n_q, N)
    caption indices. Returns (n_q, N) with ``out[q, j] == score_block(...)[candidates[q, j], q]``.
    """
    words, mask = _prepare_words(words, lengths)
    _check_regions(regions, words)
    candidates = _check_candidates(candidates, regions.shape[0], words.shape[0], "captions")
    n_q, r, d = regions.shape
    length = words.shape[1]
    n_cand = candidates.shape[1]
    out = regions.new_empty((n_q, n_cand))
    step = max(1, max_elements // max(1, n_cand * r * length))
    gram, word_norm, region_norm = _direction_inputs(cfg, words, regions, gram)
    for q0 in range(0, n_q, step):
        reg = regions[q0 : q0 + step]
        q = reg.shape[0]
        idx = candidates[q0 : q0 + q].reshape(-1)
        w = words.index_select(0, idx)  # (q*N, L, d) gathered candidate captions
        m = mask[idx]
        if cfg.cross_attn == "t2i":
            sims = torch.bmm(w.view(q, n_cand * length, d), reg.transpose(1, 2)).view(q, n_cand, length, r)
            wn = word_norm[idx].view(q, n_cand, length)
            out[q0 : q0 + q] = _t2i_core(cfg, sims, m.view(q, n_cand, length), wn, gram[q0 : q0 + q])
        else:
            sims = torch.bmm(reg, w.view(q, n_cand * length, d).transpose(1, 2)).view(q, r, n_cand, length)
            sims = sims.permute(0, 2, 1, 3).reshape(q * n_cand, 1, r, length)  # pairs, R x L each
            wg = torch.bmm(w, w.transpose(1, 2))
            rn = region_norm[q0 : q0 + q].repeat_interleave(n_cand, dim=0).unsqueeze(1)  # (q*N, 1, R)
            out[q0 : q0 + q] = _i2t_core(cfg, sims, m, rn, wg).view(q, n_cand)
    return out


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_rank(name: str, x: Tensor, rank: int) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")


def _prepare_words(words: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Validate, and zero the padding so that garbage there can never reach a score."""
    _check_rank("words", words, 3)
    lengths = torch.as_tensor(lengths, device=words.device)
    if lengths.shape != (words.shape[0],):
        raise ValueError(f"lengths must have shape ({words.shape[0]},), got {tuple(lengths.shape)}")
    if words.shape[0] and (int(lengths.min()) < 1 or int(lengths.max()) > words.shape[1]):
        raise ValueError(f"lengths must lie in [1, {words.shape[1]}]")
    mask = torch.arange(words.shape[1], device=words.device).unsqueeze(0) < lengths.unsqueeze(1)
    if not bool(mask.all()):
        words = words.masked_fill(~mask.unsqueeze(-1), 0.0)
    return words, mask


def _check_regions(regions: Tensor, words: Tensor) -> None:
    _check_rank("regions", regions, 3)
    if regions.shape[-1] != words.shape[-1]:
        raise ValueError(f"feature size differs: words have d={words.shape[-1]}, regions d={regions.shape[-1]}")
    if regions.dtype != words.dtype:
        raise ValueError(f"dtype differs: words {words.dtype}, regions {regions.dtype}")


def _check_gram(gram: Tensor, regions: Tensor) -> None:
    n, r, _ = regions.shape
    if tuple(gram.shape) != (n, r, r):
        raise ValueError(f"gram must have shape {(n, r, r)}, got {tuple(gram.shape)}")


def _check_candidates(candidates: Tensor, n_q: int, n_items: int, what: str) -> Tensor:
    candidates = torch.as_tensor(candidates)
    if candidates.dim() != 2 or candidates.shape[0] != n_q:
        raise ValueError(f"candidates must have shape ({n_q}, N), got {tuple(candidates.shape)}")
    if candidates.numel() and (int(candidates.min()) < 0 or int(candidates.max()) >= n_items):
        raise ValueError(f"candidate indices must lie in [0, {n_items}) ({what})")
    return candidates.long()
