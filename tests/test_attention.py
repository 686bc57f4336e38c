"""Parity tests of heiindex.attention against the per-pair SCAN reference (float64).

Every raw_feature_norm x every aggregation x both cross-attention directions, for the
exhaustive block scorer and for both candidate scorers, must match
``tests/scan_reference.py`` to a relative error of 1e-10 elementwise.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import sys
from dataclasses import replace
from pathlib import Path

import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from heiindex import omp_threads
from heiindex.attention import (
    DEFAULT_MAX_ELEMENTS,
    AttentionConfig,
    _word_norms,
    region_gram,
    score_block,
    score_caption_candidates,
    score_image_candidates,
    score_pairs,
)
from heiindex.packed import PackedWords


def _load_reference():
    # Load the reference module by path so the import works whether or not tests/ is a
    # package and whatever pytest import mode is in use.
    name = "scan_reference"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).with_name("scan_reference.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ref = _load_reference()

RTOL = 1e-10
TINY = 1e-300
DTYPE = torch.float64

LENGTHS = (1, 3, 7, 4, 7)  # ragged; padded to L_MAX with large random garbage
L_MAX = 7
N_IMGS = 4
N_REGIONS = 6
DIM = 8
SEED = 20240607

# Published SCAN settings, distinct per direction so a swapped lambda is caught.
LAMBDAS = {"t2i": (6.0, 9.0), "i2t": (5.0, 4.0)}  # (lambda_lse, lambda_softmax)

ALL_CASES = list(itertools.product(ref.CROSS_ATTNS, ref.RAW_FEATURE_NORMS, ref.AGGREGATIONS))
CASE_IDS = [f"{c}-{n}-{a}" for c, n, a in ALL_CASES]


# ----------------------------------------------------------------------------- helpers


def _cfg_kwargs(cross_attn, raw_feature_norm, agg):
    lambda_lse, lambda_softmax = LAMBDAS[cross_attn]
    return dict(
        cross_attn=cross_attn,
        raw_feature_norm=raw_feature_norm,
        agg=agg,
        lambda_lse=lambda_lse,
        lambda_softmax=lambda_softmax,
    )


def _make_cfg(cross_attn, raw_feature_norm, agg):
    return AttentionConfig(**_cfg_kwargs(cross_attn, raw_feature_norm, agg))


def _make_words(gen, lengths, l_max, d, garbage_scale=1e3, normalise=True):
    """Padded captions: real words l2-normalised the SCAN way, padding = large garbage."""
    n = len(lengths)
    real = torch.randn(n, l_max, d, generator=gen, dtype=DTYPE)
    if normalise:
        real = ref.l2norm(real, -1)
    garbage = garbage_scale * torch.randn(n, l_max, d, generator=gen, dtype=DTYPE)
    mask = torch.arange(l_max)[None, :, None] < torch.tensor(lengths)[:, None, None]
    return torch.where(mask, real, garbage)


def _make_regions(gen, n_imgs, n_regions, d, normalise=True):
    regions = torch.randn(n_imgs, n_regions, d, generator=gen, dtype=DTYPE)
    return ref.l2norm(regions, -1) if normalise else regions


@functools.cache
def _data():
    gen = torch.Generator().manual_seed(SEED)
    words = _make_words(gen, LENGTHS, L_MAX, DIM)
    lengths = torch.tensor(LENGTHS, dtype=torch.long)
    regions = _make_regions(gen, N_IMGS, N_REGIONS, DIM)
    return words, lengths, regions


def _all_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Caption and image rows of every pair of ``_data()``, caption-major."""
    return torch.arange(len(LENGTHS)).repeat_interleave(N_IMGS), torch.arange(N_IMGS).repeat(len(LENGTHS))


@functools.cache
def _reference(cross_attn, raw_feature_norm, agg):
    words, lengths, regions = _data()
    out = ref.reference_matrix(words, lengths, regions, **_cfg_kwargs(cross_attn, raw_feature_norm, agg))
    # Guard on the test data itself: the relative check below is elementwise, so no
    # reference score may sit so close to zero that 1e-10 relative becomes meaningless.
    assert out.abs().min() > 1e-4, "test data gives a near-zero reference score"
    return out


def _assert_close(actual, expected, what=""):
    assert isinstance(actual, torch.Tensor), f"{what}: expected a Tensor, got {type(actual)}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    actual = actual.detach().to("cpu", DTYPE)
    assert torch.isfinite(actual).all(), f"{what}: non-finite scores\n{actual}"
    rel = (actual - expected).abs() / expected.abs().clamp_min(TINY)
    worst = rel.max().item()
    if worst > RTOL:
        idx = tuple(int(i) for i in torch.nonzero(rel == rel.max())[0])
        pytest.fail(
            f"{what}: max elementwise relative error {worst:.3e} > {RTOL:.0e} at {idx}: "
            f"got {actual[idx].item()!r}, reference {expected[idx].item()!r}"
        )


def _image_candidate_lists(gen, n_q, n_items):
    """Candidate lists over images for each of n_q captions."""
    perm = torch.stack([torch.randperm(n_items, generator=gen) for _ in range(n_q)])
    rep = torch.randint(0, n_items, (n_q, 2 * n_items + 1), generator=gen)
    rep[:, 1] = rep[:, 0]  # guaranteed repeated index in every row
    rep[0, :] = n_items - 1  # one row made only of the same (last) index
    single = torch.randint(0, n_items, (n_q, 1), generator=gen)
    return {"permutation": perm, "repeats": rep, "single": single}


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("cross_attn,raw_feature_norm,agg", ALL_CASES, ids=CASE_IDS)
def test_score_block_matches_reference(cross_attn, raw_feature_norm, agg):
    words, lengths, regions = _data()
    cfg = _make_cfg(cross_attn, raw_feature_norm, agg)
    out = score_block(cfg, words, lengths, regions)
    _assert_close(out, _reference(cross_attn, raw_feature_norm, agg), "score_block")


@pytest.mark.parametrize("cross_attn,raw_feature_norm,agg", ALL_CASES, ids=CASE_IDS)
def test_score_image_candidates_matches_reference(cross_attn, raw_feature_norm, agg):
    words, lengths, regions = _data()
    cfg = _make_cfg(cross_attn, raw_feature_norm, agg)
    full = _reference(cross_attn, raw_feature_norm, agg)  # (n_caps, n_imgs)
    gen = torch.Generator().manual_seed(SEED + 1)
    for kind, cand in _image_candidate_lists(gen, len(LENGTHS), N_IMGS).items():
        out = score_image_candidates(cfg, words, lengths, regions, cand)
        expected = torch.gather(full, 1, cand)  # expected[q, j] = full[q, cand[q, j]]
        _assert_close(out, expected, f"score_image_candidates[{kind}]")


@pytest.mark.parametrize("cross_attn,raw_feature_norm,agg", ALL_CASES, ids=CASE_IDS)
def test_score_caption_candidates_matches_reference(cross_attn, raw_feature_norm, agg):
    words, lengths, regions = _data()
    cfg = _make_cfg(cross_attn, raw_feature_norm, agg)
    full_t = _reference(cross_attn, raw_feature_norm, agg).T  # (n_imgs, n_caps)
    gen = torch.Generator().manual_seed(SEED + 2)
    for kind, cand in _image_candidate_lists(gen, N_IMGS, len(LENGTHS)).items():
        out = score_caption_candidates(cfg, regions, words, lengths, cand)
        expected = torch.gather(full_t, 1, cand)  # expected[q, j] = full[cand[q, j], q]
        _assert_close(out, expected, f"score_caption_candidates[{kind}]")


def test_reference_cases_cover_the_spec():
    assert len(ALL_CASES) == 7 * 4 * 2


# ----------------------------------------------------------------------------- padding

PADDING_CASES = [
    ("t2i", "clipped_l2norm", "lse"),
    ("t2i", "softmax", "mean"),
    ("t2i", "l1norm", "max"),
    ("i2t", "clipped_l2norm", "lse"),
    ("i2t", "l2norm", "sum"),
    ("i2t", "no_norm", "mean"),
]


@pytest.mark.parametrize(
    "cross_attn,raw_feature_norm,agg", PADDING_CASES, ids=[f"{c}-{n}-{a}" for c, n, a in PADDING_CASES]
)
def test_padding_values_and_width_do_not_change_scores(cross_attn, raw_feature_norm, agg):
    words, lengths, regions = _data()
    cfg = _make_cfg(cross_attn, raw_feature_norm, agg)
    base = score_block(cfg, words, lengths, regions).detach().to("cpu", DTYPE)
    expected = _reference(cross_attn, raw_feature_norm, agg)
    _assert_close(base, expected, "base")

    gen = torch.Generator().manual_seed(SEED + 3)
    mask = torch.arange(L_MAX)[None, :, None] < lengths[:, None, None]
    # Same real words, different garbage (other sign/scale), same width.
    other = torch.where(mask, words, -1e4 * torch.randn(words.shape, generator=gen, dtype=DTYPE))
    _assert_close(score_block(cfg, other, lengths, regions), base, "different padding values")
    # Zero padding.
    zeros = torch.where(mask, words, torch.zeros_like(words))
    _assert_close(score_block(cfg, zeros, lengths, regions), base, "zero padding")
    # Wider padding: every caption, including the longest ones, now has garbage after it.
    extra = 1e3 * torch.randn(words.shape[0], 3, DIM, generator=gen, dtype=DTYPE)
    wider = torch.cat([words, extra], dim=1)
    _assert_close(score_block(cfg, wider, lengths, regions), base, "wider padding")
    # NaN padding (0 x NaN is NaN: only masking keeps it out, never a multiplication by a zero weight)
    nan = torch.where(mask, words, torch.full_like(words, float("nan")))
    _assert_close(score_block(cfg, nan, lengths, regions), base, "NaN padding")
    # The candidate scorers see the same padding rules.
    cand_img = torch.arange(N_IMGS).flip(0).repeat(len(LENGTHS), 1)
    cand_cap = torch.arange(len(LENGTHS)).flip(0).repeat(N_IMGS, 1)
    for padded, name in ((wider, "wider padding"), (nan, "NaN padding")):
        _assert_close(
            score_image_candidates(cfg, padded, lengths, regions, cand_img),
            torch.gather(base, 1, cand_img),
            f"score_image_candidates, {name}",
        )
        _assert_close(
            score_caption_candidates(cfg, regions, padded, lengths, cand_cap),
            torch.gather(base.T, 1, cand_cap),
            f"score_caption_candidates, {name}",
        )


# ----------------------------------------------------------------------------- gram


def test_region_gram_is_regions_times_regions_transposed():
    _, _, regions = _data()
    gram = region_gram(regions)
    expected = torch.einsum("nrd,nsd->nrs", regions, regions)
    assert tuple(gram.shape) == (N_IMGS, N_REGIONS, N_REGIONS)
    assert torch.allclose(gram.to(DTYPE), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "cross_attn,raw_feature_norm,agg",
    [
        ("t2i", "clipped_l2norm", "lse"),
        ("i2t", "clipped_l2norm", "lse"),
        ("t2i", "softmax", "max"),
        ("i2t", "l1norm", "mean"),
    ],
    ids=["t2i-clipped_l2norm-lse", "i2t-clipped_l2norm-lse", "t2i-softmax-max", "i2t-l1norm-mean"],
)
def test_passed_gram_gives_same_scores_as_computed(cross_attn, raw_feature_norm, agg):
    words, lengths, regions = _data()
    cfg = _make_cfg(cross_attn, raw_feature_norm, agg)
    gram = region_gram(regions)
    expected = _reference(cross_attn, raw_feature_norm, agg)

    without = score_block(cfg, words, lengths, regions)
    with_gram = score_block(cfg, words, lengths, regions, gram=gram)
    _assert_close(without, expected, "score_block, gram=None")
    _assert_close(with_gram, without.detach().to("cpu", DTYPE), "score_block, gram passed")

    gen = torch.Generator().manual_seed(SEED + 4)
    cand = _image_candidate_lists(gen, len(LENGTHS), N_IMGS)["repeats"]
    _assert_close(
        score_image_candidates(cfg, words, lengths, regions, cand, gram=gram),
        torch.gather(expected, 1, cand),
        "score_image_candidates, gram passed",
    )
    cand = _image_candidate_lists(gen, N_IMGS, len(LENGTHS))["repeats"]
    _assert_close(
        score_caption_candidates(cfg, regions, words, lengths, cand, gram=gram),
        torch.gather(expected.T, 1, cand),
        "score_caption_candidates, gram passed",
    )


# ----------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("cross_attn", ["t2i", "i2t"])
def test_unnormalised_inputs_match_reference(cross_attn):
    """The reference divides by the actual vector norms in the cosine; inputs that are not
    unit-length must still give the reference score (no hidden |w| = |v| = 1 assumption)."""
    gen = torch.Generator().manual_seed(SEED + 5)
    words = 3.0 * _make_words(gen, LENGTHS, L_MAX, DIM, normalise=False)
    regions = 0.5 * _make_regions(gen, N_IMGS, N_REGIONS, DIM, normalise=False)
    lengths = torch.tensor(LENGTHS, dtype=torch.long)
    for raw_feature_norm, agg in [("clipped_l2norm", "lse"), ("softmax", "mean")]:
        kwargs = _cfg_kwargs(cross_attn, raw_feature_norm, agg)
        expected = ref.reference_matrix(words, lengths, regions, **kwargs)
        out = score_block(AttentionConfig(**kwargs), words, lengths, regions)
        _assert_close(out, expected, f"unnormalised {raw_feature_norm}/{agg}")


def test_invalid_inputs_raise_value_error():
    words, lengths, regions = _data()
    cfg = _make_cfg("t2i", "clipped_l2norm", "lse")
    cand_img = torch.zeros(len(LENGTHS), 2, dtype=torch.long)
    cand_cap = torch.zeros(N_IMGS, 2, dtype=torch.long)
    words_2d = words[0]
    regions_2d = regions[0]
    regions_bad_d = torch.randn(N_IMGS, N_REGIONS, DIM + 1, dtype=DTYPE)

    bad_calls = {
        "score_block words 2-D": lambda: score_block(cfg, words_2d, lengths[:1], regions),
        "score_block regions 2-D": lambda: score_block(cfg, words, lengths, regions_2d),
        "score_block words 4-D": lambda: score_block(cfg, words[None], lengths, regions),
        "score_block mismatched d": lambda: score_block(cfg, words, lengths, regions_bad_d),
        "score_image_candidates words 2-D": lambda: score_image_candidates(
            cfg, words_2d, lengths[:1], regions, cand_img[:1]
        ),
        "score_image_candidates regions 2-D": lambda: score_image_candidates(cfg, words, lengths, regions_2d, cand_img),
        "score_image_candidates mismatched d": lambda: score_image_candidates(
            cfg, words, lengths, regions_bad_d, cand_img
        ),
        "score_image_candidates candidates 1-D": lambda: score_image_candidates(
            cfg, words, lengths, regions, cand_img[:, 0]
        ),
        "score_caption_candidates words 2-D": lambda: score_caption_candidates(
            cfg, regions, words_2d, lengths[:1], cand_cap
        ),
        "score_caption_candidates regions 2-D": lambda: score_caption_candidates(
            cfg, regions_2d, words, lengths, cand_cap[:1]
        ),
        "score_caption_candidates mismatched d": lambda: score_caption_candidates(
            cfg, regions_bad_d, words, lengths, cand_cap
        ),
        "score_caption_candidates candidates 1-D": lambda: score_caption_candidates(
            cfg, regions, words, lengths, cand_cap[:, 0]
        ),
        "region_gram regions 2-D": lambda: region_gram(regions_2d),
        "score_pairs index out of range": lambda: score_pairs(
            cfg, words, lengths, regions, torch.tensor([0]), torch.tensor([N_IMGS])
        ),
        "score_pairs negative index": lambda: score_pairs(
            cfg, words, lengths, regions, torch.tensor([-1]), torch.tensor([0])
        ),
        "score_pairs unequal index lengths": lambda: score_pairs(
            cfg, words, lengths, regions, torch.tensor([0, 1]), torch.tensor([0])
        ),
        "score_pairs 2-D index": lambda: score_pairs(
            cfg, words, lengths, regions, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)
        ),
    }
    not_raised = []
    for name, call in bad_calls.items():
        try:
            call()
        except ValueError:
            continue
        except Exception as exc:  # report a wrong exception type, not just "not raised"
            not_raised.append(f"{name}: raised {type(exc).__name__}: {exc}")
        else:
            not_raised.append(f"{name}: no exception")
    assert not not_raised, "expected ValueError:\n" + "\n".join(not_raised)


def test_caption_lengths_must_lie_between_one_and_the_padded_width():
    """An empty caption has nothing to attend with; one longer than its padding would read past it."""
    words, regions = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    for lengths in ([0, 2], [2, 4]):
        with pytest.raises(ValueError, match=r"^lengths must lie in \[1, 3\]$"):
            score_block(AttentionConfig(), words, torch.tensor(lengths), regions)


def test_indices_and_lengths_must_be_integers_not_floats_or_bools():
    """A float index of 1.9 or a length of 2.7 used to be cut down to 1 and 2 without a word, and
    bools read as 0 / 1."""
    words, lengths, regions = _data()
    cfg = _make_cfg("t2i", "clipped_l2norm", "lse")
    two = torch.tensor([0, 1])
    calls = {
        "caption_index": lambda: score_pairs(cfg, words, lengths, regions, two.double(), two),
        "image_index": lambda: score_pairs(cfg, words, lengths, regions, two, torch.tensor([True, False])),
        "candidates": lambda: score_image_candidates(cfg, words, lengths, regions, torch.ones(len(LENGTHS), 2)),
        "lengths": lambda: score_block(cfg, words, lengths.double() - 0.3, regions),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"^{name} must hold whole numbers \\(an integer dtype\\), got torch"):
            call()
    packed = PackedWords.from_padded(words, lengths)
    with pytest.raises(ValueError, match="lengths must hold whole numbers"):
        score_block(cfg, packed, lengths.double(), regions)
    with pytest.raises(ValueError, match="lengths must hold whole numbers"):
        PackedWords.from_padded(words, lengths.double())
    with pytest.raises(ValueError, match="cfg must be an AttentionConfig, got NoneType"):
        score_pairs(None, words, lengths, regions, two, two)
    with pytest.raises(ValueError, match=r"gram must be a torch.Tensor \(region_gram\(regions\)\), got ndarray"):
        score_block(cfg, words, lengths, regions, region_gram(regions).numpy())
    with pytest.raises(ValueError, match="regions must hold at least one region per image"):
        score_block(cfg, words, lengths, regions[:, :0])
    with pytest.raises(ValueError, match="regions must be floating-point features, got torch.int64"):
        score_block(cfg, words.long(), lengths, regions.long())  # (words and regions share one dtype)
    # integer dtypes of any width are taken
    want = score_pairs(cfg, words, lengths, regions, two, two)
    torch.testing.assert_close(score_pairs(cfg, words, lengths.int(), regions, two.int(), two.short()), want)


def test_a_small_pair_set_is_one_chunk_and_larger_ones_keep_their_budgets(monkeypatch):
    """One query's candidates (at most ONE_CHUNK_PAIRS pairs within the element budget) are one
    chunk padded to the longest caption; more pairs, or a smaller budget, are cut by length bucket
    with every chunk within max_elements (the parity tests check the scores of both)."""
    import heiindex.attention as attention

    words, lengths, regions = _data()
    cfg = _make_cfg("t2i", "clipped_l2norm", "lse")
    chunks = []
    real = attention._score_pair_chunk

    def counted(cfg, words, lengths, regions, gram, ci, ii, length, *rest):
        chunks.append((len(ci), length))
        return real(cfg, words, lengths, regions, gram, ci, ii, length, *rest)

    monkeypatch.setattr(attention, "_score_pair_chunk", counted)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # chunks in this thread, in order
    caps, imgs = _all_pairs()
    score_pairs(cfg, words, lengths, regions, caps, imgs)
    assert chunks == [(len(caps), max(LENGTHS))]
    chunks.clear()
    score_pairs(cfg, words, lengths, regions, caps, imgs, max_elements=200)
    assert len(chunks) > 1 and all(n * length * N_REGIONS <= 200 or n == 1 for n, length in chunks)
    chunks.clear()
    many = attention.ONE_CHUNK_PAIRS + 1
    score_pairs(cfg, words, lengths, regions, torch.arange(many) % len(LENGTHS), torch.arange(many) % N_IMGS)
    assert len(chunks) == len(set(_length_bucket_of(LENGTHS))) and sum(n for n, _ in chunks) == many


def test_a_common_caption_length_is_a_bucket_of_its_own(monkeypatch):
    """In a large pair set, a length with at least exact_run pairs per image gets chunks padded
    to itself, where the coarse buckets padded it to 14 (13 and 14 words share a bucket); rarer lengths keep
    the coarse buckets. The scores are the block scorer's either way. coco-sim test's text-to-image
    bench padded 6.5% more words than its captions hold before (attention._pair_buckets)."""
    import heiindex.attention as attention

    lens = (13, 14, 9, 13, 11)  # coarse buckets: 15, 15, 10, 15, 12
    gen = torch.Generator().manual_seed(SEED)
    words = _make_words(gen, lens, 15, DIM)
    lengths = torch.tensor(lens)
    regions = _make_regions(gen, 2, N_REGIONS, DIM)
    n_pairs = attention.ONE_CHUNK_PAIRS + 88  # past the one-chunk path
    caps = torch.tensor([0, 3, 0, 3, 1, 2, 4, 0]).repeat(n_pairs // 8)  # 13 words: 5/8; 14: 1/8
    imgs = torch.arange(len(caps)) % 2

    pair_len = lengths[caps]
    assert attention._length_bucket(pair_len).unique().tolist() == [10, 12, 15]
    exact = attention._pair_buckets(pair_len, 2, exact_run=100)  # 187.5 pairs of 13 words an image, 37.5 of 14
    assert dict(zip(pair_len.tolist(), exact.tolist(), strict=False)) == {13: 13, 14: 15, 9: 10, 11: 12}
    assert torch.equal(attention._pair_buckets(pair_len, 2, float("inf")), attention._length_bucket(pair_len))
    assert attention._POLICIES["cuda"].exact_run == float("inf")  # more buckets, more launches

    chunks = []
    real = attention._score_pair_chunk

    def counted(cfg, words, lengths, regions, gram, ci, ii, length, *rest):
        chunks.append((sorted(set(lengths[ci].tolist())), length))
        return real(cfg, words, lengths, regions, gram, ci, ii, length, *rest)

    monkeypatch.setattr(attention, "_score_pair_chunk", counted)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # chunks in this thread, in order
    cfg = _make_cfg("t2i", "clipped_l2norm", "lse")
    want = score_block(cfg, words, lengths, regions)[caps, imgs]
    for exact_run, padded_13 in ((float("inf"), 14), (100, 13)):
        monkeypatch.setitem(attention._POLICIES, "cpu", replace(attention._POLICIES["cpu"], exact_run=exact_run))
        chunks.clear()
        torch.testing.assert_close(score_pairs(cfg, words, lengths, regions, caps, imgs), want, rtol=RTOL, atol=0)
        assert {length for held, length in chunks if 13 in held} == {padded_13}
        assert all(held == [13] for held, length in chunks if length == 13)


def _spy_chunks(monkeypatch, *names: str) -> list[tuple[bool, int]]:
    """Where the chunks of scoring run, from now on: (in the main thread?, its torch thread
    count) per call of the functions ``names`` of heiindex.attention (by default the pair
    scorer's chunk; the block scorer's chunks each call the cores)."""
    import threading

    import heiindex.attention as attention

    ran_in = []

    def spy(real):
        def spied(*args):
            ran_in.append((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
            return real(*args)

        return spied

    for name in names or ("_score_pair_chunk",):
        monkeypatch.setattr(attention, name, spy(getattr(attention, name)))
    return ran_in


def _chunked_scorers(lengths, caps, imgs) -> dict:
    """Both scorers as ``score(cfg, words, regions)`` over ``_data``'s shapes (the pairs ``caps``,
    ``imgs``; small blocks, so several chunks), with the functions each chunk calls (the pair
    scorer's chunk; the block scorer's chunks each call the cores), for ``_spy_chunks``."""
    return {
        "pairs": (
            ("_score_pair_chunk",),
            lambda cfg, w, r: score_pairs(cfg, w, lengths, r, caps, imgs, max_elements=200),
        ),
        "block": (("_t2i_core", "_i2t_core"), lambda cfg, w, r: score_block(cfg, w, lengths, r, max_elements=200)),
    }


@pytest.mark.parametrize(
    "threads, setter",
    [pytest.param(2, True, marks=pf.needs_thread_local_setter), (3, True), (2, False)],
)
def test_chunks_run_on_two_single_threaded_workers_only_with_exactly_two_threads(monkeypatch, threads, setter):
    """With two torch threads, re-ranking chunks run on two pool workers of one thread each (the
    scores equal the one-thread scores to the bit, since each chunk is summed alone); with any
    other count, or where no per-thread torch count is found (``setter`` False: omp_threads), they
    run in the caller's thread, on its threads. (What the pool leaves for threads started later:
    test_pool_workers_keep_the_callers_modes_and_thread_count.)"""
    if not setter:
        monkeypatch.setattr(omp_threads, "thread_local_setter", lambda: None)
    workers = threads == 2 and setter
    words, lengths, regions = _data()
    caps, imgs = _all_pairs()
    for name, (spied, score) in _chunked_scorers(lengths, caps, imgs).items():
        with pytest.MonkeyPatch.context() as mp:
            ran_in = _spy_chunks(mp, *spied)
            for cross_attn in ("t2i", "i2t"):
                cfg = _make_cfg(cross_attn, "clipped_l2norm", "lse")
                want = score(cfg, words, regions)  # one thread (conftest)
                assert set(ran_in) == {(True, 1)} and len(ran_in) > 2, name
                ran_in.clear()
                with pf.torch_threads(threads):
                    got = score(cfg, words, regions)
                if workers:  # each chunk summed by one thread, as with one thread
                    assert torch.equal(got, want), name
                else:  # torch's threads may split a sum differently
                    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
                assert set(ran_in) == ({(False, 1)} if workers else {(True, threads)}), name
                ran_in.clear()


@pf.needs_thread_local_setter
@pytest.mark.parametrize("trainable", ["words", "regions"])
@pytest.mark.parametrize("cross_attn", ["t2i", "i2t"])
def test_chunks_run_in_this_thread_while_autograd_records(cross_attn, trainable):
    """With two torch threads but features that need gradients (either side alone), both scorers
    run their chunks one after another in the caller's thread: autograd's bookkeeping of the one
    output tensor that two workers wrote gave wrong gradients in 5 of 20 runs of a 6,000-pair
    set. The gradients equal the one-thread ones."""
    words, lengths, regions = _data()
    caps, imgs = _all_pairs()
    cfg = _make_cfg(cross_attn, "clipped_l2norm", "lse")

    def grads(score):
        leaf = (words if trainable == "words" else regions).clone().requires_grad_(True)
        w, r = (leaf, regions) if trainable == "words" else (words, leaf)
        out = score(cfg, w, r)
        (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward()
        return out.detach(), leaf.grad

    for name, (spied, score) in _chunked_scorers(lengths, caps, imgs).items():
        want = grads(score)
        with pytest.MonkeyPatch.context() as mp:
            ran_in = _spy_chunks(mp, *spied)
            with pf.torch_threads(2):
                got = grads(score)
        assert set(ran_in) == {(True, 2)} and len(ran_in) > 2, name
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cross_attn", ["t2i", "i2t"])
def test_score_pairs_gradients_equal_score_blocks_when_pairs_share_an_image(cross_attn):
    """Pairs of one image take the per-image product, written with out=, which autograd refuses
    ("functions with out=... arguments don't support automatic differentiation"); pairs spread
    over images took another path and worked."""
    words, lengths, regions = _data()
    cfg = _make_cfg(cross_attn, "clipped_l2norm", "lse")
    caps = torch.arange(len(LENGTHS)).repeat(4)  # 20 pairs, every one with image 0
    imgs = torch.zeros_like(caps)
    leaf = words.clone().requires_grad_(True)
    score_pairs(cfg, leaf, lengths, regions, caps, imgs).sum().backward()
    want = words.clone().requires_grad_(True)
    score_block(cfg, want, lengths, regions)[caps, imgs].sum().backward()
    torch.testing.assert_close(leaf.grad, want.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cross_attn", ["t2i", "i2t"])
def test_score_pairs_gradients_ignore_nan_padding(cross_attn):
    """The pair scorer masked padded words after their products, so the scores were right but
    the gradients met the padding (0 x NaN is NaN): every gradient of a pair with a NaN-padded
    caption, its image's too, was NaN. Now as with zero padding, and zero at padded positions."""
    words, lengths, regions = _data()
    cfg = _make_cfg(cross_attn, "clipped_l2norm", "lse")
    mask = torch.arange(L_MAX)[None, :, None] < lengths[:, None, None]
    caps = torch.arange(len(LENGTHS)).repeat(3)
    imgs = torch.arange(len(caps)) % N_IMGS

    def grads(padding: float):
        w = torch.where(mask, words, torch.full_like(words, padding)).requires_grad_(True)
        v = regions.clone().requires_grad_(True)
        score_pairs(cfg, w, lengths, v, caps, imgs).sum().backward()
        return w.grad, v.grad

    (wn, vn), (wz, vz) = grads(float("nan")), grads(0.0)
    torch.testing.assert_close(wn, wz, rtol=0, atol=0)
    torch.testing.assert_close(vn, vz, rtol=0, atol=0)
    assert not wn.isnan().any() and bool((wn[~mask.expand_as(wn)] == 0).all())


def test_score_block_keeps_blocks_within_max_elements_below_a_full_chunk(monkeypatch):
    """Caption chunks were 128 whatever max_elements said, so one chunk against one image could
    hold 128 x L x R entries: 92,160 for max_elements 1,000 in a reviewer's run."""
    import heiindex.attention as attention

    words, lengths, regions = _data()
    words, lengths = words.repeat(4, 1, 1), lengths.repeat(4)  # 8 captions of 7 words: one bucket
    seen = []
    real = attention._t2i_core

    def spied(cfg, sims, *args):
        seen.append(sims.numel())
        return real(cfg, sims, *args)

    monkeypatch.setattr(attention, "_t2i_core", spied)
    cfg = _make_cfg("t2i", "clipped_l2norm", "lse")
    most = int(lengths.max()) * regions.shape[1] * 2  # room for two captions of the longest length
    got = score_block(cfg, words, lengths, regions, max_elements=most)
    assert seen and max(seen) <= most
    _assert_close(got, score_block(cfg, words, lengths, regions), "small blocks")


@pf.needs_thread_local_setter
def test_pool_workers_keep_the_callers_modes_and_thread_count(monkeypatch):
    """With two torch threads (the pool): a call under torch.inference_mode works (its output
    is an inference tensor that only inference mode may write), no_grad reaches the workers,
    and threads started while the workers run, or afterwards, still get two torch threads, not
    the workers' one (torch.set_num_threads in a worker gave them one)."""
    import threading

    import heiindex.attention as attention

    started_during = []
    first = threading.Lock()  # the two workers: only the first to get here records
    real = attention._score_pair_chunk

    def spied(*args):
        if threading.current_thread() is not threading.main_thread() and first.acquire(blocking=False):
            started_during.extend([torch.get_num_threads(), pf.in_thread(torch.get_num_threads)])  # its own: one
        return real(*args)

    monkeypatch.setattr(attention, "_score_pair_chunk", spied)
    words, lengths, regions = _data()
    caps, imgs = _all_pairs()
    cfg = _make_cfg("t2i", "clipped_l2norm", "lse")
    want = score_pairs(cfg, words, lengths, regions, caps, imgs, max_elements=200)
    with pf.torch_threads(2):
        with torch.inference_mode():
            got = score_pairs(cfg, words, lengths, regions, caps, imgs, max_elements=200)
        assert got.is_inference() and torch.equal(got, want)
        with torch.no_grad():
            got = score_pairs(cfg, words.clone().requires_grad_(True), lengths, regions, caps, imgs, max_elements=200)
        assert not got.requires_grad and torch.equal(got, want)
        graded = score_pairs(cfg, words.clone().requires_grad_(True), lengths, regions, caps, imgs, max_elements=200)
        assert graded.requires_grad  # outside no_grad, in this thread (test_chunks_run_in_this_thread_while_...)
        assert pf.in_thread(torch.get_num_threads) == 2 and torch.get_num_threads() == 2
        assert started_during == [1, 2]


def _length_bucket_of(lengths) -> list[int]:
    from heiindex.attention import _length_bucket

    return _length_bucket(torch.tensor(lengths)).tolist()


# ----------------------------------------------------------------------------- pairs

# A set large enough for the pair scorer's grouping to matter: many captions of many lengths
# (several length buckets), images with long runs of pairs (one matrix product each) and
# images with one or two pairs (gathered regions), and chunks cut inside a bucket.
PAIR_LENGTHS = (1, 2, 3, 5, 8, 9, 12, 13, 17, 3, 8, 12, 2, 17, 5, 9, 13, 1, 12, 8)
PAIR_L_MAX = 19
PAIR_IMGS = 5
PAIR_CASES = [
    ("t2i", "clipped_l2norm", "lse"),
    ("t2i", "softmax", "max"),
    ("t2i", "clipped", "mean"),
    ("i2t", "clipped_l2norm", "lse"),
    ("i2t", "l1norm", "sum"),
    ("i2t", "softmax", "mean"),
]


@functools.cache
def _pair_data():
    gen = torch.Generator().manual_seed(SEED + 7)
    words = _make_words(gen, PAIR_LENGTHS, PAIR_L_MAX, DIM)
    regions = _make_regions(gen, PAIR_IMGS, N_REGIONS, DIM)
    lengths = torch.tensor(PAIR_LENGTHS, dtype=torch.long)
    # Image 0 paired with every caption twice (long runs), image 1 with every caption once,
    # images 2-4 with a few captions each (runs shorter than the gather threshold).
    caps = [*range(len(PAIR_LENGTHS))] * 3 + [0, 5, 8, 19, 4]
    imgs = [0] * len(PAIR_LENGTHS) * 2 + [1] * len(PAIR_LENGTHS) + [2, 3, 3, 4, 2]
    perm = torch.randperm(len(caps), generator=gen)
    return words, lengths, regions, torch.tensor(caps)[perm], torch.tensor(imgs)[perm]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("max_elements", [DEFAULT_MAX_ELEMENTS, 200], ids=["one-chunk", "small-chunks"])
@pytest.mark.parametrize("cross_attn,raw_feature_norm,agg", PAIR_CASES, ids=[f"{c}-{n}-{a}" for c, n, a in PAIR_CASES])
def test_score_pairs_matches_reference(cross_attn, raw_feature_norm, agg, max_elements, packed):
    words, lengths, regions, caps, imgs = _pair_data()
    full = ref.reference_matrix(words, lengths, regions, **_cfg_kwargs(cross_attn, raw_feature_norm, agg))
    if packed:
        words = PackedWords.from_padded(words, lengths)
    cfg = AttentionConfig(**_cfg_kwargs(cross_attn, raw_feature_norm, agg))
    out = score_pairs(cfg, words, lengths, regions, caps, imgs, max_elements=max_elements)
    _assert_close(out, full[caps, imgs], "score_pairs")
    gram = region_gram(regions)
    out = score_pairs(cfg, words, lengths, regions, caps, imgs, gram=gram, max_elements=max_elements)
    _assert_close(out, full[caps, imgs], "score_pairs, gram passed")
    # The block scorer sorts captions by length into chunks: check it on this set too.
    _assert_close(score_block(cfg, words, lengths, regions, max_elements=max_elements), full, "score_block")
    cand = imgs[: len(PAIR_LENGTHS) * 3].view(len(PAIR_LENGTHS), 3)
    _assert_close(
        score_image_candidates(cfg, words, lengths, regions, cand, max_elements=max_elements),
        torch.gather(full, 1, cand),
        "score_image_candidates",
    )
    cand = caps[: PAIR_IMGS * 6].view(PAIR_IMGS, 6)
    _assert_close(
        score_caption_candidates(cfg, regions, words, lengths, cand, max_elements=max_elements),
        torch.gather(full.T, 1, cand),
        "score_caption_candidates",
    )


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_word_norms_once_per_caption_in_any_pair_order(packed):
    """t2i word norms, once per caption of the pairs: each real word's norm, bit for bit, and
    zero beyond a packed caption's end (padded words' norms there are never read). Pairs in
    caption order (a batch of text queries) take the path without a sort."""
    words, lengths, _, caps, _ = _pair_data()
    given = PackedWords.from_padded(words, lengths) if packed else words
    for caption_index in (caps, torch.sort(caps).values, torch.tensor([5]), torch.tensor([9, 9, 2])):
        norms, slot = _word_norms(given, lengths, caption_index)
        uniq = torch.unique(caption_index)
        assert torch.equal(uniq[slot], caption_index)
        assert norms.shape == (len(uniq), int(lengths[uniq].max()))
        for u, c in enumerate(uniq.tolist()):
            n = int(lengths[c])
            assert torch.equal(norms[u, :n], words[c, :n].norm(dim=-1))
            if packed:
                assert bool((norms[u, n:] == 0).all())


def test_packed_padding_is_the_exact_zero_row_for_every_way_of_making_packed_words():
    """The pair scorer leaves packed words' padding unmasked: gathered padding must be the exact
    zero row (its similarities are then exactly zero), however the words were packed. The rows
    padding points at are the last, zero row; ``take(gather_index)`` equals ``gather``."""
    words, lengths, _, _, _ = _pair_data()  # padded with large random garbage
    packed = PackedWords.from_padded(words, lengths)
    made = {
        "from_padded": packed,
        "constructor": PackedWords(packed.flat.clone(), lengths),
        "select": packed.select(torch.arange(len(lengths))),
        "cat": PackedWords.cat([packed.select(torch.tensor([0])), packed.select(torch.arange(1, len(lengths)))]),
        "to": packed.to(torch.float32),
    }
    rows = torch.tensor([3, 0, 19, 3])
    for how, p in made.items():
        index = p.gather_index(rows, PAIR_L_MAX)
        pad = torch.arange(PAIR_L_MAX)[None, :] >= p.lengths[rows][:, None]
        assert pad.any() and bool((index[pad] == p.flat.shape[0]).all()), how  # the row after the words
        got = p.take(index)
        assert torch.equal(got, p.gather(rows, PAIR_L_MAX)), how
        buf = torch.full((index.numel(), DIM), float("nan"), dtype=p.flat.dtype)
        into = p.take(index, out=buf)
        assert into.data_ptr() == buf.data_ptr() and torch.equal(into, got), how
        assert bool((got[pad] == 0).all()) and not bool(torch.signbit(got[pad]).any()), how


def test_packed_words_round_trip_and_errors():
    words, lengths, _, _, _ = _pair_data()
    packed = PackedWords.from_padded(words, lengths)
    assert tuple(packed.shape) == (len(PAIR_LENGTHS), max(PAIR_LENGTHS), DIM)
    assert packed.flat.shape == (sum(PAIR_LENGTHS), DIM)
    mask = torch.arange(PAIR_L_MAX)[None, :, None] < lengths[:, None, None]
    zero_padded = torch.where(mask, words, torch.zeros_like(words))[:, : max(PAIR_LENGTHS)]
    assert torch.equal(packed.padded(), zero_padded)
    rows = torch.tensor([3, 0, 3])
    assert torch.equal(packed.gather(rows, 4), zero_padded[rows, :4])  # longer captions are cut
    some = packed.select(torch.tensor([7, 0, 7, 19]))  # any order, repeats allowed
    assert some.lengths.tolist() == [PAIR_LENGTHS[i] for i in (7, 0, 7, 19)]
    assert torch.equal(some.padded(), zero_padded[[7, 0, 7, 19], : max(PAIR_LENGTHS[i] for i in (7, 0, 7, 19))])
    assert len(packed.select(torch.tensor([], dtype=torch.long))) == 0
    grad = words.clone().requires_grad_(True)  # packing words that need gradients keeps them
    packed_grad = PackedWords.from_padded(grad, lengths)
    assert torch.equal(packed_grad.flat, packed.flat)
    packed_grad.flat.sum().backward()
    assert torch.equal(grad.grad, mask.expand_as(words).float())
    both = PackedWords.cat([some, packed])
    assert both.lengths.tolist() == some.lengths.tolist() + list(PAIR_LENGTHS)
    assert torch.equal(both.flat, torch.cat([some.flat, packed.flat]))
    with pytest.raises(ValueError, match="sum to"):
        PackedWords(packed.flat[:-1], lengths)
    with pytest.raises(ValueError, match="at least one word"):
        PackedWords(packed.flat, torch.cat([lengths[:-1], torch.tensor([0])]))
    with pytest.raises(ValueError, match="2-D"):
        PackedWords(words, lengths)
    cfg = _make_cfg("t2i", "clipped_l2norm", "lse")
    _, _, regions, caps, imgs = _pair_data()
    with pytest.raises(ValueError, match="packed words' own lengths"):
        score_pairs(cfg, packed, lengths.flip(0), regions, caps, imgs)
    # The packed words' own lengths object skips the comparison (checked when packed): same scores.
    want = score_pairs(cfg, packed, lengths.clone(), regions, caps, imgs)
    with pytest.MonkeyPatch.context() as mp:
        pf.forbid(mp, "own lengths were compared", (torch, "equal"))
        got = score_pairs(cfg, packed, packed.lengths, regions, caps, imgs)
    assert torch.equal(got, want)


def test_scratch_rows_reuse_one_buffer_per_thread_and_grow_when_needed():
    """The pair scorer's gather buffer: a smaller request is a view of the same storage, a larger
    one replaces it (never shrinks it), and each thread has its own."""
    from heiindex.attention import _Scratch

    scratch = _Scratch(torch.zeros(1, dtype=torch.float64))
    big = scratch.rows(10, 4)
    assert big.shape == (10, 4) and big.dtype == torch.float64 and big.is_contiguous()
    small = scratch.rows(3, 4)
    assert small.shape == (3, 4) and small.data_ptr() == big.data_ptr()
    bigger = scratch.rows(12, 4)
    assert bigger.shape == (12, 4) and scratch.rows(10, 4).data_ptr() == bigger.data_ptr()
    other_d = scratch.rows(2, 5)  # another feature size: a new buffer (bigger's storage is still alive)
    assert other_d.shape == (2, 5) and other_d.data_ptr() != bigger.data_ptr()
    mine = scratch.rows(3, 5)  # alive while the other thread takes its own
    assert pf.in_thread(lambda: scratch.rows(3, 5).data_ptr()) != mine.data_ptr()


class _WordSizedStorages(TorchDispatchMode):
    """The storages of the op results of at least ``numel`` elements seen while active."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.storages = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                self.storages.add(t.untyped_storage().data_ptr())
        return out


def test_packed_words_are_copied_once_and_keep_their_zero_row():
    """from_padded, select, cat and to write the words into the tensor they return, zero row
    included (no second, concatenated copy); ``to`` without a change copies nothing."""
    words, lengths, _, _, _ = _pair_data()
    total = sum(PAIR_LENGTHS)
    packed = PackedWords.from_padded(words, lengths)
    rows = torch.arange(len(PAIR_LENGTHS)).flip(0)
    steps = {
        "from_padded": lambda: PackedWords.from_padded(words, lengths),
        "select": lambda: packed.select(rows),
        "cat": lambda: PackedWords.cat([packed, packed]),
        "to": lambda: packed.to(torch.float32 if packed.dtype == torch.float64 else torch.float64),
    }
    inputs = {t.untyped_storage().data_ptr() for t in (words, packed._flat)}
    for name, step in steps.items():
        with _WordSizedStorages(total * DIM) as seen:
            got = step()
        assert seen.storages - inputs == {got._flat.untyped_storage().data_ptr()}, name  # one new tensor
        n = 2 * total if name == "cat" else total
        assert got._flat.shape == (n + 1, DIM) and not got._flat[-1].any(), name
    assert torch.equal(packed.select(rows).padded(), packed.padded()[rows])
    assert torch.equal(PackedWords.cat([packed, packed]).flat, torch.cat([packed.flat, packed.flat]))
    same = packed.to(packed.dtype)
    assert same.flat.data_ptr() == packed.flat.data_ptr() and torch.equal(same.offsets, packed.offsets)


def test_score_pairs_of_no_pairs_is_empty():
    words, lengths, regions = _data()
    cfg = _make_cfg("t2i", "clipped_l2norm", "lse")
    empty = torch.zeros(0, dtype=torch.long)
    assert tuple(score_pairs(cfg, words, lengths, regions, empty, empty).shape) == (0,)


def test_score_pairs_leaves_inputs_unchanged():
    words, lengths, regions, caps, imgs = _pair_data()
    before = words.clone()
    cfg = _make_cfg("t2i", "clipped_l2norm", "lse")
    score_pairs(cfg, words, lengths, regions, caps, imgs)
    score_block(cfg, words, lengths, regions)
    assert torch.equal(words, before), "the scorers must not write into the caller's padding"


@pytest.mark.parametrize("cross_attn,raw_feature_norm,agg", PAIR_CASES[:1] + PAIR_CASES[3:4], ids=["t2i", "i2t"])
def test_gpu_work_policy_gives_the_same_scores(monkeypatch, cross_attn, raw_feature_norm, agg):
    """The GPU policy (every chunk one gathered batched product, chunks bounded by gathered
    bytes) runs here on CPU tensors: it must give the reference scores too."""
    import heiindex.attention as attention

    words, lengths, regions, caps, imgs = _pair_data()
    full = ref.reference_matrix(words, lengths, regions, **_cfg_kwargs(cross_attn, raw_feature_norm, agg))
    cfg = AttentionConfig(**_cfg_kwargs(cross_attn, raw_feature_norm, agg))
    small = attention._Policy(1 << 27, float("inf"), 1 << 62, float(8 * (N_REGIONS + PAIR_L_MAX) * DIM * 8))
    for policy in (attention._POLICIES["cuda"], small):  # one chunk; chunks of 8 pairs
        monkeypatch.setattr(attention, "_policy", lambda device, p=policy: p)
        _assert_close(score_pairs(cfg, words, lengths, regions, caps, imgs), full[caps, imgs], "score_pairs")
        _assert_close(score_block(cfg, words, lengths, regions), full, "score_block")


# ----------------------------------------------------------------------------- on a CUDA device


@pf.needs_cuda
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cross_attn,raw_feature_norm,agg", PAIR_CASES, ids=[f"{c}-{n}-{a}" for c, n, a in PAIR_CASES])
def test_cuda_float64_scores_match_reference(cross_attn, raw_feature_norm, agg, packed):
    """Every scorer with its inputs on the GPU (the GPU work policy, device-side gathers and
    grouping), in float64: the reference scores to 1e-10, as on CPU."""
    words, lengths, regions, caps, imgs = _pair_data()
    full = ref.reference_matrix(words, lengths, regions, **_cfg_kwargs(cross_attn, raw_feature_norm, agg))
    cfg = AttentionConfig(**_cfg_kwargs(cross_attn, raw_feature_norm, agg))
    dev = torch.device("cuda")
    w, n, r, c, i = (t.to(dev) for t in (words, lengths, regions, caps, imgs))
    if packed:
        w = PackedWords.from_padded(w, n)
    _assert_close(score_pairs(cfg, w, n, r, c, i), full[caps, imgs], "score_pairs on cuda")
    _assert_close(score_block(cfg, w, n, r), full, "score_block on cuda")
    cand = imgs[: len(PAIR_LENGTHS) * 3].view(len(PAIR_LENGTHS), 3)
    _assert_close(
        score_image_candidates(cfg, w, n, r, cand.to(dev)), torch.gather(full, 1, cand), "image candidates on cuda"
    )
    cand = caps[: PAIR_IMGS * 6].view(PAIR_IMGS, 6)
    _assert_close(
        score_caption_candidates(cfg, r, w, n, cand.to(dev)),
        torch.gather(full.T, 1, cand),
        "caption candidates on cuda",
    )


@pf.needs_cuda
@pytest.mark.parametrize("cross_attn", ["t2i", "i2t"])
def test_cuda_float32_scores_match_cpu(cross_attn):
    """float32 on the GPU (TF32 off) against float32 on CPU: within 1e-5 relative."""
    from heiindex.device import set_precision

    with pf.kept_tf32_switches():
        set_precision("float32")
        words, lengths, regions, caps, imgs = _pair_data()
        cfg = _make_cfg(cross_attn, "clipped_l2norm", "lse")
        w, r = words.float(), regions.float()
        cpu = score_pairs(cfg, w, lengths, r, caps, imgs)
        gpu = score_pairs(cfg, w.cuda(), lengths.cuda(), r.cuda(), caps.cuda(), imgs.cuda()).cpu()
        torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            score_block(cfg, w.cuda(), lengths.cuda(), r.cuda()).cpu(),
            score_block(cfg, w, lengths, r),
            rtol=1e-5,
            atol=1e-6,
        )


def test_gpu_gather_budget_is_an_eighth_of_a_small_card_and_capped(monkeypatch):
    import types

    import heiindex.attention as attention

    assert attention.gpu_gather_bytes(16 << 30) == 2 << 30  # a 16 GiB card: 2 GiB of gathered features a chunk
    assert attention.gpu_gather_bytes(141 << 30) == attention.GPU_GATHER_BYTES == 8 << 30  # H200: the cap
    # the CUDA policy takes it from the card's memory (uncached call: no GPU needed)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=16 << 30))
    policy = attention._cuda_policy.__wrapped__(0)
    assert policy.gather_bytes == 2 << 30


def test_runs_group_long_runs_by_image_and_batch_the_short_ones():
    """Pairs sorted by image: runs of >= min_run pairs become one slice each, in order; the pairs
    of shorter runs are batched short_batch at a time, in order; every pair is in one group."""
    import heiindex.attention as attention

    rows = torch.tensor([0, 0, 0, 2, 5, 5, 5, 5, 7, 8, 8, 9])  # runs of 3, 1, 4, 1, 2, 1
    runs = attention._Runs(rows, attention._Policy(1, 3, 2, 1.0))
    assert runs.images.tolist() == [0, 2, 5, 7, 8, 9]
    long_groups = [(g.start, g.stop, img, pos) for g, img, pos in runs.groups if isinstance(g, slice)]
    assert long_groups == [(0, 3, 0, 0), (4, 8, 5, 2)]
    short = [g.tolist() for g, img, pos in runs.groups if not isinstance(g, slice)]
    assert short == [[3, 8], [9, 10], [11]] and all(img is None for g, img, _ in runs.groups[2:])
    gpu = attention._Runs(rows, attention._POLICIES["cuda"])  # no run is long: one group of every pair
    assert [g.tolist() for g, _, _ in gpu.groups] == [list(range(12))]
