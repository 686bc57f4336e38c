"""Exact, batched SCAN cross-attention scores.

What this module is for: the SCAN pair score (Lee et al., ECCV 2018) of captions against
images, computed for a block of captions x a block of images (exhaustive evaluation) or for
each query against its own candidate list (re-ranking), without ever materialising the
attended context vectors. Word l's context is ``c_l = sum_r p_lr v_r`` (attention weights
``p_lr`` over region features ``v_r``), so it relies on two identities:

* ``w_l . c_l = sum_r p_lr (w_l . v_r) = sum_r p_lr s_lr``: the numerator of the relevance is a
  weighted sum of the raw similarities already computed;
* ``|c_l|^2 = sum_r sum_r' p_lr p_lr' (v_r . v_r') = p_l^T G p_l`` with ``G = V V^T``: the
  context norm needs only the R x R Gram matrix of the image's regions (or the L x L Gram
  matrix of the caption's words for image-to-text attention).

So a pair costs one L x R block of a matrix product plus O(L R^2) work, instead of L context
vectors of size d. Padding words (beyond ``lengths``) are ignored exactly as SCAN ignores them
(SCAN slices each caption to its real words).

What it must not do: hold model weights, encode features, or pick candidates. Inputs are
already-encoded word features ``(n_caps, L, d)`` (padded, or ``PackedWords``) and region
features ``(n_imgs, R, d)``.
"""

from __future__ import annotations

import functools
import threading
from bisect import bisect_right
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor

from . import omp_threads
from .attention_config import AGGREGATIONS, CROSS_ATTN, RAW_FEATURE_NORMS, AttentionConfig
from .packed import PackedWords, integer_tensor, word_mask
from .settings import require

__all__ = [
    "AGGREGATIONS",
    "CROSS_ATTN",
    "RAW_FEATURE_NORMS",
    "AttentionConfig",
    "region_gram",
    "score_block",
    "score_caption_candidates",
    "score_image_candidates",
    "score_pairs",
]

_EPS = 1e-8
# Squared norms are clamped at _TINY before a sqrt, whose gradient at an exact 0 is inf (and
# inf x 0 is NaN); far below any real one, above float32's smallest normal.
_TINY = 1e-30
# Elements of one L x R similarity block batch; ~6 live tensors of this size at peak.
DEFAULT_MAX_ELEMENTS = 500_000  # CPU: small blocks stay in cache: fastest on 2 cores of 250K..8M
# GPU re-ranking: gathered features per chunk of pairs. An H200 re-ranked 2.5M COCO-5K t2i pairs
# (d = 1024) in 1.21 s with 1 GiB chunks, 0.89 s with 8 GiB (benchmarks/RESULTS.md, GPU).
GPU_GATHER_BYTES = 8 << 30
# Pair sets up to this size (one query's candidates, N <= 512) are scored as one chunk padded to
# their longest caption rather than one chunk per caption-length bucket.
ONE_CHUNK_PAIRS = 512


@dataclass(frozen=True)
class _Policy:
    """How work is cut, per device kind.

    max_elements: default size of one similarity block. min_run: an image with at least this
    many pairs in a chunk gets its own matrix product, fewer and its regions are gathered into a
    batched product, ``short_batch`` pairs at a time. gather_bytes: most bytes of gathered
    features one chunk of pairs may hold. exact_run: in a large pair set, a caption length with
    at least this many pairs per image is a length bucket of its own (``_pair_buckets``).
    """

    max_elements: int
    min_run: float
    short_batch: int
    gather_bytes: float
    exact_run: float = float("inf")


_POLICIES = {
    # CPU: per-image products read each image's regions once; words are gathered per group.
    # A common caption length is its own bucket where its pairs average 32 per image, so that
    # its image runs stay long: coco-sim test's t2i re-ranking (lengths 11-15 at 44-101 pairs per
    # image) took 5-10% less single-threaded CPU time on the best of ten passes (the medians
    # are as noisy as that: RESULTS.md, "CPU threads"). Its i2t pairs (about 20 per image and
    # length) keep the coarse buckets: split, they measured no faster.
    "cpu": _Policy(DEFAULT_MAX_ELEMENTS, 4, 64, float("inf"), 32),
    # GPU: kernel launches, not bytes, are the cost: big blocks, and every chunk of pairs is one
    # gathered batched product (a few GB/s of gather is nothing next to HBM bandwidth). Its
    # gather_bytes is the most a chunk gathers; _policy lowers it to an eighth of a small card.
    # Coarse length buckets only: more buckets would be more chunks, and so more launches.
    "cuda": _Policy(1 << 27, float("inf"), 1 << 62, float(GPU_GATHER_BYTES), float("inf")),
}


def _max_elements(given: int | None, policy: _Policy) -> int:
    """A block size given to a scorer (a whole number >= 1), or the device policy's default."""
    return policy.max_elements if given is None else require("max_elements", given, at_least=1, integer=True)


def _records_graph(*tensors: Tensor) -> bool:
    """Whether autograd records operations on ``tensors`` here: then no product may write into
    a given ``out=`` tensor."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _mm_into(out: Tensor, a: Tensor, b: Tensor, into: bool) -> None:
    """``out[...] = a @ b``: written straight into ``out`` where ``into`` (the dtypes agree and
    autograd records nothing: ``out=`` has no autograd), else computed and copied (cast) there."""
    if into:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _policy(device: torch.device) -> _Policy:
    if device.type == "cuda":
        return _cuda_policy(device.index if device.index is not None else torch.cuda.current_device())
    return _POLICIES.get(device.type, _POLICIES["cpu"])


@functools.cache
def _cuda_policy(index: int) -> _Policy:
    total = torch.cuda.get_device_properties(index).total_memory
    base = _POLICIES["cuda"]
    return replace(base, gather_bytes=gpu_gather_bytes(total, base.gather_bytes))


def gpu_gather_bytes(total_memory: int, most: float = GPU_GATHER_BYTES) -> float:
    """Bytes of gathered pair features one re-ranking chunk may hold on a GPU with ``total_memory``."""
    return float(min(most, total_memory // 8))


def region_gram(regions: Tensor) -> Tensor:
    """Gram matrices of each image's regions: ``(n_imgs, R, d) -> (n_imgs, R, R)``."""
    _check_rank("regions", regions, 3)
    return torch.bmm(regions, regions.transpose(1, 2))


# ---------------------------------------------------------------------------------------------
# The two cores. Each takes raw similarities in the layout that lets the Gram product be one
# batched matrix multiply without copies, and returns the aggregated pair scores.
# ---------------------------------------------------------------------------------------------


def _t2i_core(
    cfg: AttentionConfig, sims: Tensor, word_mask: Tensor, word_norm: Tensor, gram: Tensor | Callable[[Tensor], Tensor]
) -> Tensor:
    """Words attend over regions.

    sims: (B, C, L, R) raw word.region similarities, zero at padded words (the l1/l2 norms over
    words rely on it); the softmax axis (regions) is last, so the costly reductions run over
    contiguous memory. word_mask, word_norm: broadcastable to (B, C, L). gram: (B, R, R), or a
    function mapping the attention probabilities (B, C, L, R) to their product with each image's
    Gram matrix (the pair scorer, whose pairs share Gram matrices by image runs). Returns (B, C).
    """
    b, c, length, r = sims.shape
    logits = _scaled_raw_norm(cfg, sims, word_mask.unsqueeze(-1), dim=2)  # norm over words
    prob = torch.softmax(logits, dim=-1)  # over regions
    del logits
    dot = _rowdot(prob, sims)  # (B, C, L) = w_l . c_l
    if callable(gram):
        quad = gram(prob)
    else:
        quad = torch.bmm(prob.reshape(b, c * length, r), gram).view(b, c, length, r)  # P G (G symmetric)
    ctx_sq = _rowdot(quad, prob)  # (B, C, L) = |c_l|^2
    del quad, prob
    rel = dot / (word_norm * ctx_sq.clamp_min(_TINY).sqrt()).clamp_min(_EPS)
    return _aggregate(cfg, rel, word_mask.expand_as(rel))


def _i2t_core(cfg: AttentionConfig, sims: Tensor, word_mask: Tensor, region_norm: Tensor, word_gram: Tensor) -> Tensor:
    """Regions attend over (real) words.

    sims: (C, B, R, L) raw word.region similarities, zero at padded words; the softmax axis
    (words) is last. word_mask: (C, L) bool. region_norm: broadcastable to (C, B, R).
    word_gram: (C, L, L), zero in padded rows and columns. Returns (C, B).
    """
    c, b, r, length = sims.shape
    # The norm runs over the query axis, here the regions (dim 2); every region is real.
    logits = _scaled_raw_norm(cfg, sims, None, dim=2)
    logits = logits.masked_fill_(~word_mask.view(c, 1, 1, length), float("-inf"))
    prob = torch.softmax(logits, dim=-1)  # over words
    del logits
    dot = _rowdot(prob, sims)  # (C, B, R) = v_r . c_r
    quad = torch.bmm(prob.reshape(c, b * r, length), word_gram).view(c, b, r, length)
    ctx_sq = _rowdot(quad, prob)  # (C, B, R)
    del quad, prob
    rel = dot / (region_norm * ctx_sq.clamp_min(_TINY).sqrt()).clamp_min(_EPS)
    return _aggregate(cfg, rel, None)


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """Dot products along the last axis (one kernel; ~1.7x faster than (x * y).sum(-1) on CPU)."""
    return torch.einsum("...r,...r->...", x, y)


def _scaled_raw_norm(cfg: AttentionConfig, sims: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    """``lambda_softmax`` times SCAN's ``raw_feature_norm`` of ``sims`` along the query axis ``dim``.

    ``mask`` marks real entries; padded entries of ``sims`` must be zero, which is all the l1 and
    l2 norms need (zero adds nothing to either sum), so only the softmax norm applies the mask.
    Returns a new tensor, never a view of ``sims``."""
    norm, scale = cfg.raw_feature_norm, cfg.lambda_softmax
    if norm in ("clipped_l2norm", "clipped_l1norm", "clipped"):
        x = torch.nn.functional.leaky_relu(sims, 0.1)
    else:
        x = sims
    if norm in ("clipped_l2norm", "l2norm"):
        # A padded word's column (i2t: the norm runs over the regions) sums to exactly 0, where
        # sqrt's gradient is inf and inf x 0 is NaN: training i2t diverged at its first batch.
        # Clamped at _TINY, the sum has no gradient there; any real column's is far above it.
        return x * (scale / ((x * x).sum(dim=dim, keepdim=True).clamp_min(_TINY).sqrt() + _EPS))
    if norm in ("clipped_l1norm", "l1norm"):
        return x * (scale / (x.abs().sum(dim=dim, keepdim=True) + _EPS))
    if norm == "softmax":
        logits = x if mask is None else x.masked_fill(~mask, float("-inf"))
        return torch.softmax(logits, dim=dim) * scale
    return x * scale if norm in ("clipped", "no_norm") else _unreachable(norm)


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


def score_block(
    cfg: AttentionConfig,
    words: Tensor | PackedWords,
    lengths: Tensor,
    regions: Tensor,
    gram: Tensor | None = None,
    max_elements: int | None = None,
) -> Tensor:
    """Scores of every caption against every image.

    words: (n_caps, L, d), padded beyond ``lengths``, or the same captions as ``PackedWords``;
    lengths: (n_caps,) real word counts >= 1; regions: (n_imgs, R, d); gram: optional
    ``region_gram(regions)`` (n_imgs, R, R).
    Returns (n_caps, n_imgs). Captions are taken in order of length, in chunks padded only to
    their own longest caption (COCO captions average ~13 tokens but run to 40 or more), and
    no intermediate holds more than about ``max_elements`` pair-word-region entries (default:
    the device's, see ``_POLICIES``); with exactly two CPU threads two chunks are scored at once
    (``_for_each``), so twice that at the peak, as in ``score_pairs``.
    """
    _check_cfg(cfg)
    lengths = _check_words(words, lengths)
    _check_regions(regions, words)
    max_elements = _max_elements(max_elements, _policy(regions.device))
    n_caps = words.shape[0]
    n_imgs, r, _ = regions.shape
    acc = _acc_dtype(words.dtype)
    out = torch.empty((n_caps, n_imgs), dtype=acc, device=words.device)
    if cfg.cross_attn == "t2i":
        if gram is None:
            gram = region_gram(regions)
        _check_gram(gram, regions)
        gram = gram.to(acc)
    else:
        region_norm = regions.to(acc).norm(dim=-1)
    order = torch.argsort(lengths, stable=True)
    # Captions outer, images inner: a chunk of captions stays in cache while the regions stream
    # past it (the other order re-reads every caption's words once per image block). A chunk
    # holds up to 128 captions of one length bucket, so few captions are padded little too.
    buckets = _length_bucket(lengths.index_select(0, order)).tolist()

    def run(rows: Tensor) -> None:
        length = int(lengths[rows[-1]])  # the chunk's longest caption
        w, m = _gather_words(words, lengths, rows, length)
        # Zero the padding once per chunk: every image block then gets exact zeros there.
        w.masked_fill_(~m.unsqueeze(-1), 0.0)
        c = w.shape[0]
        img_step = max(1, max_elements // max(1, c * r * length))
        w_flat = w.view(c * length, -1)
        w_t = w.transpose(1, 2)
        if cfg.cross_attn == "t2i":
            wn = w.to(acc).norm(dim=-1).unsqueeze(0)
        else:
            wg = torch.bmm(w, w_t).to(acc)
        for i0 in range(0, n_imgs, img_step):
            reg = regions[i0 : i0 + img_step]
            b = reg.shape[0]
            if cfg.cross_attn == "t2i":
                sims = (w_flat @ reg.reshape(b * r, -1).T).to(acc).view(c, length, b, r).permute(2, 0, 1, 3)
                block = _t2i_core(cfg, sims, m.unsqueeze(0), wn, gram[i0 : i0 + b]).T
            else:
                sims = torch.matmul(reg.reshape(b * r, -1), w_t).to(acc).view(c, b, r, length)
                block = _i2t_core(cfg, sims, m, region_norm[i0 : i0 + b].unsqueeze(0), wg)
            out[rows, i0 : i0 + b] = block

    # At most 128 captions a chunk, fewer where one image's block of them would pass max_elements.
    chunks = [order[c0:c1] for c0, c1 in _bucket_chunks(buckets, lambda b: max(1, min(128, max_elements // (b * r))))]
    _run_chunks(run, chunks, _scoring_graph(words, regions, gram))
    return out


def score_pairs(
    cfg: AttentionConfig,
    words: Tensor | PackedWords,
    lengths: Tensor,
    regions: Tensor,
    caption_index: Tensor,
    image_index: Tensor,
    gram: Tensor | None = None,
    max_elements: int | None = None,
) -> Tensor:
    """Scores of arbitrary (caption, image) pairs.

    words: (n_caps, L, d) padded beyond ``lengths``, or ``PackedWords``; regions: (n_imgs, R, d); caption_index,
    image_index: (P,) rows of each pair. Returns (P,) with
    ``out[p] == score_block(...)[caption_index[p], image_index[p]]``.

    The cost per pair stays close to that of ``score_block``: pairs are grouped by caption
    length (each common length on its own, rarer ones in coarser buckets: ``_pair_buckets``; so
    no chunk is padded to the longest caption of the whole set) and then by image,
    so that one image's regions are read once for all of its pairs in a chunk and only the
    (smaller) words are gathered per pair. Images with few pairs in a chunk have their regions
    gathered instead, which is cheaper than many tiny products (on a GPU, every pair's: see
    ``_POLICIES``). A set of at most ``ONE_CHUNK_PAIRS`` pairs that fits one chunk's budget (such
    as one query's 100 candidates) is one chunk padded to its longest caption: there, per-chunk
    overhead costs more than padding.
    """
    _check_cfg(cfg)
    lengths = _check_words(words, lengths)
    _check_regions(regions, words)
    caption_index = _check_index(caption_index, words.shape[0], "caption_index", "captions")
    image_index = _check_index(image_index, regions.shape[0], "image_index", "images")
    if caption_index.shape != image_index.shape:
        raise ValueError(
            f"caption_index and image_index must have the same length, got {len(caption_index)} and {len(image_index)}"
        )
    n_pairs, r = caption_index.shape[0], regions.shape[1]
    out = torch.empty((n_pairs,), dtype=_acc_dtype(words.dtype), device=words.device)
    if n_pairs == 0:
        return out
    if gram is not None:
        _check_gram(gram, regions)
    policy = _policy(regions.device)
    max_elements = _max_elements(max_elements, policy)
    pair_len = lengths.index_select(0, caption_index)
    pair_bytes = (r + words.shape[1]) * regions.shape[2] * regions.element_size()
    chunks = _pair_chunks(pair_len, image_index, regions.shape[0], r, max_elements, pair_bytes, policy)

    graph = _scoring_graph(words, regions, gram)
    if graph and not isinstance(words, PackedWords):
        # Padding is masked after the products, where gradients have already met it (0 x NaN is
        # NaN): where autograd records, padded words are zeroed first, as score_block does.
        words = words.masked_fill(~word_mask(lengths, words.shape[1]).unsqueeze(-1), 0.0)
    # Word norms (t2i) once per caption, not once per pair: a caption has N candidates.
    norms, slot = _word_norms(words, lengths, caption_index) if cfg.cross_attn == "t2i" else (None, None)

    scratch = None if graph else _Scratch(regions)  # reused buffers only where autograd records nothing

    def run(sel: Tensor) -> None:
        ci, ii = caption_index.index_select(0, sel), image_index.index_select(0, sel)
        length = int(pair_len.index_select(0, sel).max())
        wn = None if norms is None else norms.index_select(0, slot.index_select(0, sel))[:, :length]
        out[sel] = _score_pair_chunk(cfg, words, lengths, regions, gram, ci, ii, length, wn, scratch)

    _run_chunks(run, chunks, graph)
    return out


def _pair_chunks(
    pair_len: Tensor,
    image_index: Tensor,
    n_images: int,
    r: int,
    max_elements: int,
    pair_bytes: int,
    policy: _Policy,
) -> list[Tensor]:
    """How ``score_pairs`` cuts its pairs: a list of index tensors into them, each chunk sorted by
    image (``benchmarks/pair_padding.py`` replays it to count the padding). ``pair_len``: each
    pair's caption length; ``r``: regions per image; ``pair_bytes``: one pair's gathered features."""
    n_pairs = len(pair_len)
    max_pairs = max(1, int(min(float(n_pairs), policy.gather_bytes // pair_bytes)))
    if n_pairs <= min(max_pairs, ONE_CHUNK_PAIRS) and n_pairs * int(pair_len.max()) * r <= max_elements:
        # Few pairs (one query's candidates): one chunk padded to the longest caption. Each chunk
        # costs a few dozen small kernels, more than the padding saves here.
        # Batches of queries keep one chunk per length bucket, where padding would cost more.
        return [torch.argsort(image_index, stable=True)]
    bucket = _pair_buckets(pair_len, n_images, policy.exact_run)
    order = torch.argsort(bucket * n_images + image_index, stable=True)
    bucket_sorted = bucket.index_select(0, order).tolist()
    # A chunk: pairs of one length bucket, small enough for max_elements and gather_bytes.
    step = lambda b: max(1, min(max_pairs, max_elements // (b * r)))  # noqa: E731
    return [order[p0:p1] for p0, p1 in _bucket_chunks(bucket_sorted, step)]


def _word_tensor(words: Tensor | PackedWords) -> Tensor:
    return words.flat if isinstance(words, PackedWords) else words


def _scoring_graph(words: Tensor | PackedWords, regions: Tensor, gram: Tensor | None = None) -> bool:
    """Whether autograd records a scoring of these features."""
    return _records_graph(_word_tensor(words), regions, *([] if gram is None else [gram]))


def _run_chunks(fn: Callable[[Tensor], None], chunks: list[Tensor], graph: bool) -> None:
    """``_for_each``, except where autograd records the scoring (``graph``): then one chunk after
    another in this thread. Chunks write into one output tensor, and autograd's bookkeeping of a
    tensor written in place from two threads at once is not thread-safe: two workers gave wrong
    gradients, silently, in 1 to 11 of 20 runs of a 6,000-pair set
    (``benchmarks/autograd_workers.py``)."""
    if graph:
        for sel in chunks:
            fn(sel)
    else:
        _for_each(fn, chunks)


def _for_each(fn: Callable[[Tensor], None], chunks: list[Tensor]) -> None:
    """Run ``fn`` on every chunk: on torch's own threads, one chunk after another, except with
    exactly two CPU threads, where two single-threaded workers take a chunk each
    (``_pool_map``), where a thread's torch count can be set for that thread alone
    (``omp_threads``). Chunks write disjoint outputs.

    Measured on coco-sim test (``benchmarks/threads.py``; RESULTS.md, "CPU threads"): with two
    threads on the 2-core machine, two workers were ~10% faster than one chunk at a time (ahead
    in each of three alternated pairs). On a 16-core machine one chunk at a time on 16 threads
    was fastest (HEI 2.2 + 0.7 s), ahead of two workers of 8 threads (2.6 + 1.2 s) and of one
    single-threaded worker per thread (4.7 + 2.6 s, which the library used to do); with 4
    threads, one chunk at a time too. Exhaustive scoring (``score_block``) with two workers took
    18.7 s against 20.4 s on torch's two threads (means of three alternated passes:
    ``benchmarks/threads.py`` with ``exhaustive,exhaustive-serial``; RESULTS.md, "CPU threads")."""
    if (
        torch.get_num_threads() != 2
        or len(chunks) <= 1
        or chunks[0].device.type != "cpu"
        or omp_threads.thread_local_setter() is None
    ):
        for sel in chunks:
            fn(sel)
        return
    _pool_map(fn, chunks, workers=2, threads_each=1)


def _pool_map(fn: Callable[[Tensor], None], chunks: list[Tensor], workers: int, threads_each: int) -> None:
    """Run ``fn`` on every chunk on ``workers`` threads, each running torch on ``threads_each``
    threads (``benchmarks/threads.py`` compares other counts through it). Workers set their count
    for themselves alone (``omp_threads.set_worker_threads``): ``torch.set_num_threads`` would also
    change the default of every thread whose first torch call falls while they run. Workers run
    under the caller's grad and inference modes (both are per thread: an output made under
    ``torch.inference_mode`` cannot be written outside it)."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(sel: Tensor) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            fn(sel)

    with ThreadPoolExecutor(
        max_workers=workers, initializer=omp_threads.set_worker_threads, initargs=(threads_each,)
    ) as pool:
        for result in pool.map(run, chunks):
            del result


def _score_pair_chunk(
    cfg: AttentionConfig,
    words: Tensor | PackedWords,
    lengths: Tensor,
    regions: Tensor,
    gram: Tensor | None,
    ci: Tensor,
    ii: Tensor,
    length: int,
    word_norm: Tensor | None,
    scratch: _Scratch | None,
) -> Tensor:
    """Scores of one chunk of pairs (caption rows ``ci``, image rows ``ii`` sorted) whose
    captions have at most ``length`` words; ``word_norm`` (P, length) for t2i attention.

    On CPU, words are gathered one group of pairs at a time (``_Runs``), not for the whole
    chunk: at d = 1024 a chunk's words would be tens of MB, and a fresh allocation that size costs
    more in page faults than the copy itself (glibc serves blocks over 32 MB with a new mapping).
    (The GPU policy makes each chunk one group, bounded by ``gather_bytes``.)"""
    n, r = len(ci), regions.shape[1]
    runs = _Runs(ii, _policy(regions.device))
    m = word_mask(lengths.index_select(0, ci), length)
    acc = _acc_dtype(regions.dtype)
    sims = regions.new_empty((n, length, r), dtype=acc)
    t2i = cfg.cross_attn == "t2i"
    wg = None if t2i else regions.new_empty((n, length, length), dtype=acc)
    packed = isinstance(words, PackedWords)
    word_rows = words.gather_index(ci, length) if packed else None  # once for the chunk's groups
    # An image group's words and similarities are slices of 2-D views made once per chunk: a
    # chunk has dozens of groups, and each tensor view costs a dispatch.
    d = regions.shape[2]
    rows_1d = word_rows.view(-1) if packed else None
    sims_2d, regions_t = sims.view(n * length, r), regions.transpose(1, 2)
    # Without autograd (``scratch`` given), gathered words go into one reused buffer and products
    # straight into sims.
    reuse = scratch is not None
    into = reuse and acc == regions.dtype
    for sel, img, _ in runs.groups:
        if img is not None:
            span = slice(sel.start * length, sel.stop * length)
            buf = scratch.rows(span.stop - span.start, d) if reuse else None
            if packed:
                w2 = words.take(rows_1d[span], out=buf)
            else:
                w2 = _gather_words_only(words, ci[sel], length, buf).reshape(-1, d)
            _mm_into(sims_2d[span], w2, regions_t[img], into)
            w = w2.view(-1, length, d)
        else:
            w = words.take(word_rows[sel]) if packed else _gather_words_only(words, ci[sel], length)
            sims[sel] = torch.bmm(w, regions.index_select(0, ii.index_select(0, sel)).transpose(1, 2)).to(acc)
        if not t2i:
            wg[sel] = torch.bmm(w, w.transpose(1, 2)).to(acc)
    # Padding contributes nothing. Padded words may hold anything, so their similarities are
    # zeroed; packed words come back as the exact zero row, whose similarities are zero already.
    if not packed:
        sims.masked_fill_(~m.unsqueeze(-1), 0.0)
    # Per-image inputs only for this chunk's images: a query must not touch the whole set.
    if t2i:
        g = region_gram(regions.index_select(0, runs.images)) if gram is None else gram.index_select(0, runs.images)
        quad = partial(runs.product_nd, per_image=g.to(acc))
        return _t2i_core(cfg, sims.unsqueeze(1), m.unsqueeze(1), word_norm.unsqueeze(1), quad).view(n)
    pad = ~m
    if not packed:
        wg.masked_fill_(pad.unsqueeze(2) | pad.unsqueeze(1), 0.0)
    chunk_regions = regions.index_select(0, runs.images)
    rn = chunk_regions.to(acc).norm(dim=-1).index_select(0, runs.inverse).unsqueeze(1)  # (P, 1, R)
    return _i2t_core(cfg, sims.transpose(1, 2).unsqueeze(1), m, rn, wg).view(n)


def score_image_candidates(
    cfg: AttentionConfig,
    words: Tensor | PackedWords,
    lengths: Tensor,
    regions: Tensor,
    candidates: Tensor,
    gram: Tensor | None = None,
    max_elements: int | None = None,
) -> Tensor:
    """Each caption against its own candidate images (text-to-image re-ranking).

    words: (n_q, L, d); lengths: (n_q,); regions: (n_imgs, R, d); candidates: (n_q, N) image
    indices. Returns (n_q, N) with ``out[q, j] == score_block(...)[q, candidates[q, j]]``.
    """
    _check_words_rank(words)
    candidates = _check_candidates(candidates, words.shape[0], regions.shape[0], "images")
    n_q, n_cand = candidates.shape
    caption_index = torch.arange(n_q, device=candidates.device).repeat_interleave(n_cand)
    scores = score_pairs(cfg, words, lengths, regions, caption_index, candidates.reshape(-1), gram, max_elements)
    return scores.view(n_q, n_cand)


def score_caption_candidates(
    cfg: AttentionConfig,
    regions: Tensor,
    words: Tensor | PackedWords,
    lengths: Tensor,
    candidates: Tensor,
    gram: Tensor | None = None,
    max_elements: int | None = None,
) -> Tensor:
    """Each image against its own candidate captions (image-to-text re-ranking).

    regions: (n_q, R, d); words: (n_caps, L, d); lengths: (n_caps,); candidates: (n_q, N)
    caption indices. Returns (n_q, N) with ``out[q, j] == score_block(...)[candidates[q, j], q]``.
    """
    _check_rank("regions", regions, 3)
    candidates = _check_candidates(candidates, regions.shape[0], words.shape[0], "captions")
    n_q, n_cand = candidates.shape
    image_index = torch.arange(n_q, device=candidates.device).repeat_interleave(n_cand)
    scores = score_pairs(cfg, words, lengths, regions, candidates.reshape(-1), image_index, gram, max_elements)
    return scores.view(n_q, n_cand)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of everything after the similarity products: features may be stored in 16 bits
    (half the memory traffic, fast matrix units), the softmax, norms and sums stay in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _bucket_chunks(buckets: list[int], step: Callable[[int], int]) -> list[tuple[int, int]]:
    """Cut a sorted list of length buckets into ``(start, stop)`` chunks of one bucket each, of at
    most ``step(bucket)`` items."""
    chunks, start = [], 0
    while start < len(buckets):
        stop = min(len(buckets), start + step(buckets[start]))
        if buckets[stop - 1] != buckets[start]:
            stop = bisect_right(buckets, buckets[start], start, stop)
        chunks.append((start, stop))
        start = stop
    return chunks


def _length_bucket(lengths: Tensor) -> Tensor:
    """Group key for caption lengths: exact up to 7 words, then steps of about a quarter of the
    length, so that a chunk padded to its longest caption wastes at most ~25% (and usually far
    less: a chunk is padded to its own longest caption, not to the bucket's bound)."""
    step = (lengths // 4).clamp_min(1)
    return torch.div(lengths + step - 1, step, rounding_mode="floor") * step


def _pair_buckets(pair_len: Tensor, n_images: int, exact_run: float) -> Tensor:
    """Length bucket of each pair of a large set: ``_length_bucket``, except that a caption length
    with at least ``exact_run`` pairs per image is a bucket of its own.

    The pair scorer's chunks are sorted by image within a bucket, so a chunk mixes the bucket's
    lengths and is padded to its longest: on coco-sim test's text-to-image bench (lengths 9 to 40,
    most 11 to 15) the coarse buckets padded 6.5% more words than the captions hold
    (``benchmarks/pair_padding.py``). A common length on its own wastes nothing and still gives
    each image a long run of pairs; rare lengths share the coarse buckets, where a bucket of their
    own would leave images a pair or two each.
    (The block scorer sorts its captions by length, so its chunks of 128 span a length or two.)"""
    coarse = _length_bucket(pair_len)
    if exact_run == float("inf"):
        return coarse
    common = torch.bincount(pair_len) >= exact_run * n_images  # by length; no sort of the pairs
    return torch.where(common.index_select(0, pair_len), pair_len, coarse)


def _gather_words_only(words: Tensor | PackedWords, rows: Tensor, length: int, out: Tensor | None = None) -> Tensor:
    """Words of ``rows`` cut to ``length`` positions (padding as stored: see ``_gather_words``);
    for padded words with ``out`` (a contiguous ``(len(rows) * length, d)`` tensor), written there
    and returned 2-D as ``out`` (the pair scorer takes packed words into its buffer itself, from
    row numbers computed once per chunk: ``PackedWords.take``)."""
    if isinstance(words, PackedWords):
        return words.gather(rows, length)
    if out is None:
        return words[:, :length].index_select(0, rows)
    torch.index_select(words[:, :length], 0, rows, out=out.view(len(rows), length, -1))
    return out


def _word_norms(words: Tensor | PackedWords, lengths: Tensor, caption_index: Tensor) -> tuple[Tensor, Tensor]:
    """Norms of the words of every caption in ``caption_index``, each computed once.

    Returns ``(norms (U, L), slot (P,))``: pair ``p``'s caption has norms ``norms[slot[p]]``.
    Only the captions that occur are touched (a single query costs its candidates, not the set).
    Packed words' norms are taken from their real words alone, zero beyond each caption's end
    (the zero row's norm): text-to-image re-ranking's queries average 13 words on coco-sim
    test and are padded to 40."""
    if len(caption_index) > 1 and bool((caption_index[1:] >= caption_index[:-1]).all()):
        # in order already, as a batch of text queries' pairs are: no sort (0.06 s of 500,000 pairs)
        uniq, slot = torch.unique_consecutive(caption_index, return_inverse=True)
    else:
        uniq, slot = torch.unique(caption_index, return_inverse=True)
    lens = lengths.index_select(0, uniq)
    length = int(lens.max())
    acc = _acc_dtype(words.dtype)
    if isinstance(words, PackedWords):
        norms = torch.zeros((len(uniq), length), dtype=acc, device=words.device)
        real = word_mask(lens, length)
        rows = words.gather_index(uniq, length)[real]  # every real word, caption by caption, in order
        step = max(1, (1 << 22) // words.shape[2])  # ~16 MB of gathered words at a time
        flat = torch.empty((len(rows),), dtype=acc, device=words.device)
        for s in range(0, len(rows), step):
            flat[s : s + step] = words.take(rows[s : s + step]).to(acc).norm(dim=-1)
        norms[real] = flat  # a boolean mask fills row by row, the order rows were taken in
        return norms, slot
    norms = torch.empty((len(uniq), length), dtype=acc, device=words.device)
    step = max(1, (1 << 22) // (length * words.shape[2]))  # ~16 MB of gathered words at a time
    for s in range(0, len(uniq), step):
        norms[s : s + step] = _gather_words_only(words, uniq[s : s + step], length).to(acc).norm(dim=-1)
    return norms, slot


def _gather_words(words: Tensor, lengths: Tensor, rows: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Words of ``rows`` cut to ``length`` positions, and the mask of real words.

    Whatever sits in the padding is left there: the block scorer zeroes it once per chunk of
    captions (reused against every image); the pair scorer, which uses each gathered caption
    once, masks the similarities and word Gram matrices instead (L x R and L x L entries per
    caption rather than L x d)."""
    w = _gather_words_only(words, rows, length)
    m = word_mask(lengths.index_select(0, rows), length)
    return w, m


class _Scratch:
    """One gather buffer per thread, reused by every image group of one scoring call: it stays
    in cache, where a fresh tensor per group need not. Single-threaded re-ranking of coco-sim test
    took 1-3% less CPU time with it, on the medians of four alternated runs
    (``benchmarks/rerank_ab.py``; RESULTS.md, "CPU threads"), with as many page faults."""

    def __init__(self, like: Tensor) -> None:
        self._like = like
        self._local = threading.local()

    def rows(self, n: int, d: int) -> Tensor:
        """A contiguous ``(n, d)`` tensor of ``like``'s dtype and device (contents undefined)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.shape[1] != d or buf.shape[0] < n:  # grows, never shrinks
            buf = self._local.buf = self._like.new_empty((n, d))
        return buf[:n]


class _Runs:
    """Pairs sorted by image, split into groups that share one matrix product each.

    A run of at least ``policy.min_run`` pairs of one image is a group (a slice of the pairs);
    the pairs of shorter runs are batched, ``policy.short_batch`` at a time, into groups (index tensors)
    whose image data is gathered per pair."""

    def __init__(self, image_rows: Tensor, policy: _Policy) -> None:
        # images: the chunk's distinct images in order; inverse: each pair's position in it.
        self.images, self.inverse, counts = torch.unique_consecutive(
            image_rows, return_inverse=True, return_counts=True
        )
        self.groups: list[tuple[slice | Tensor, int | None, int]] = []  # (pairs, image, its position)
        long_run = counts >= policy.min_run
        pos = torch.nonzero(long_run).squeeze(1)  # only the long runs are walked in Python
        starts = torch.cumsum(counts, 0) - counts
        for p, a, cnt, image in zip(
            pos.tolist(), starts[pos].tolist(), counts[pos].tolist(), self.images[pos].tolist(), strict=True
        ):
            self.groups.append((slice(a, a + cnt), image, p))
        # the pairs of short runs, in order, as index tensors (the GPU policy: every pair)
        short = torch.nonzero(torch.repeat_interleave(~long_run, counts)).squeeze(1)
        for s in range(0, len(short), policy.short_batch):
            self.groups.append((short[s : s + policy.short_batch], None, -1))

    def product_nd(self, x: Tensor, per_image: Tensor) -> Tensor:
        """``out[p] = x[p] @ per_image[inverse[p]]`` for x (P, ..., k) and per_image (len(images), k, m),
        one matrix of ``per_image`` per distinct image of the chunk."""
        n, k, m = x.shape[0], x.shape[-1], per_image.shape[-1]
        flat = x.reshape(n, -1, k)
        out = x.new_empty((n, flat.shape[1], m))
        into = not _records_graph(x, per_image)
        rows = flat.shape[1]
        flat_2d, out_2d = flat.reshape(n * rows, k), out.view(n * rows, m)  # views once, sliced per group
        for sel, img, pos in self.groups:
            if img is not None:
                span = slice(sel.start * rows, sel.stop * rows)
                _mm_into(out_2d[span], flat_2d[span], per_image[pos], into)
            else:
                per_pair = per_image.index_select(0, self.inverse.index_select(0, sel))
                out[sel] = torch.bmm(flat.index_select(0, sel), per_pair).to(out.dtype)
        return out.view(*x.shape[:-1], m)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_cfg(cfg: AttentionConfig) -> None:
    if not isinstance(cfg, AttentionConfig):
        raise ValueError(f"cfg must be an AttentionConfig, got {type(cfg).__name__}")


def _check_rank(name: str, x: Tensor, rank: int) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")


def _check_words(words: Tensor, lengths: Tensor) -> Tensor:
    """Validate words and lengths; returns lengths as a long tensor on the words' device.

    Padding is never trusted: what is computed from it is masked (see ``_gather_words``), so
    garbage there cannot reach a score and the caller's tensor is never copied whole."""
    if isinstance(words, PackedWords):  # checked when packed; the same object costs no device sync
        return words.own_lengths(lengths)
    _check_words_rank(words)
    lengths = integer_tensor("lengths", lengths, words.device)
    if lengths.shape != (words.shape[0],):
        raise ValueError(f"lengths must have shape ({words.shape[0]},), got {tuple(lengths.shape)}")
    if words.shape[0] and (int(lengths.min()) < 1 or int(lengths.max()) > words.shape[1]):
        raise ValueError(f"lengths must lie in [1, {words.shape[1]}]")
    return lengths.long()


def _check_words_rank(words: Tensor | PackedWords) -> None:
    if not isinstance(words, PackedWords):
        _check_rank("words", words, 3)


def _check_index(index: Tensor, n_items: int, name: str, what: str) -> Tensor:
    index = integer_tensor(name, index)
    if index.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_items):
        raise ValueError(f"{name} must lie in [0, {n_items}) ({what})")
    return index


def _check_regions(regions: Tensor, words: Tensor) -> None:
    _check_rank("regions", regions, 3)
    if not regions.is_floating_point():
        raise ValueError(f"regions must be floating-point features, got {regions.dtype}")
    if regions.shape[1] == 0:
        raise ValueError(f"regions must hold at least one region per image, got shape {tuple(regions.shape)}")
    if regions.shape[-1] != words.shape[-1]:
        raise ValueError(f"feature size differs: words have d={words.shape[-1]}, regions d={regions.shape[-1]}")
    if regions.dtype != words.dtype:
        raise ValueError(f"dtype differs: words {words.dtype}, regions {regions.dtype}")


def _check_gram(gram: Tensor, regions: Tensor) -> None:
    n, r, _ = regions.shape
    if not isinstance(gram, Tensor):
        raise ValueError(f"gram must be a torch.Tensor (region_gram(regions)), got {type(gram).__name__}")
    if tuple(gram.shape) != (n, r, r):
        raise ValueError(f"gram must have shape {(n, r, r)}, got {tuple(gram.shape)}")
    if not gram.is_floating_point():
        raise ValueError(f"gram must be floating-point (region_gram(regions)), got {gram.dtype}")


def _check_candidates(candidates: Tensor, n_q: int, n_items: int, what: str) -> Tensor:
    candidates = integer_tensor("candidates", candidates)
    if candidates.dim() != 2 or candidates.shape[0] != n_q:
        raise ValueError(f"candidates must have shape ({n_q}, N), got {tuple(candidates.shape)}")
    if candidates.numel() and (int(candidates.min()) < 0 or int(candidates.max()) >= n_items):
        raise ValueError(f"candidate indices must lie in [0, {n_items}) ({what})")
    return candidates
