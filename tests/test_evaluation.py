"""heiindex.evaluation on hand-made score matrices (exact R@K, medr, meanr), and scoring."""

from __future__ import annotations

import re

import numpy as np
import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
import torch

import heiindex.protocols
from heiindex.attention import score_block
from heiindex.checkpoint import load_model
from heiindex.encode import encode_split
from heiindex.errors import HeiindexError
from heiindex.evaluation import Recall, coco_folds, fold_recalls, i2t_ranks, mean_of_folds, recall, t2i_ranks
from heiindex.model import Ensemble
from heiindex.protocols import evaluate_split
from heiindex.scoring import evaluate_exhaustive, exhaustive_scores
from heiindex.settings import SettingError
from heiindex.store import SplitStore


def _scores_with_ranks(gt: list[int], ranks: list[int], n_imgs: int) -> np.ndarray:
    """(n_caps, n_imgs) scores where caption q's ground truth ``gt[q]`` is the ``ranks[q]``-th best."""
    rng = np.random.default_rng(0)
    out = np.empty((len(gt), n_imgs))
    for q, (g, r) in enumerate(zip(gt, ranks, strict=True)):
        values = np.linspace(1.0, 0.0, n_imgs)  # distinct, best first
        others = [i for i in rng.permutation(n_imgs) if i != g]
        order = others[: r - 1] + [g] + others[r - 1 :]
        out[q, order] = values
    return out


# -- text to image ----------------------------------------------------------------------------


def test_t2i_ranks_and_recall_exact():
    gt = [0, 3, 5, 1, 7, 2, 11, 4]
    want = [1, 2, 5, 6, 10, 11, 3, 12]
    scores = _scores_with_ranks(gt, want, 12)
    ranks = t2i_ranks(scores, np.array(gt))
    np.testing.assert_array_equal(ranks, want)
    r = recall(ranks)
    assert r.r1 == 100 * 1 / 8
    assert r.r5 == 100 * 4 / 8  # ranks 1, 2, 5, 3
    assert r.r10 == 100 * 6 / 8  # and 6, 10
    assert r.medr == 5.0  # median of 1 2 3 5 6 10 11 12 is 5.5, floored as SCAN does
    assert r.meanr == sum(want) / 8 == 6.25
    assert r.rsum == r.r1 + r.r5 + r.r10 == 137.5
    assert r.to_dict() == {"r1": 12.5, "r5": 50.0, "r10": 75.0, "medr": 5.0, "meanr": 6.25, "rsum": 137.5}


def test_t2i_ties_count_against_the_ground_truth():
    scores = np.array([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9], [0.3, 0.3, 0.3]])
    np.testing.assert_array_equal(t2i_ranks(scores, np.array([0, 1, 2])), [2, 2, 3])


def test_t2i_refuses_a_ground_truth_outside_the_images():
    """A ground truth of -1 used to rank the last image's score, silently."""
    scores = np.array([[0.1, 0.9], [0.8, 0.2]])
    for gt in ([-1, 0], [0, 2]):
        with pytest.raises(ValueError, match=r"gt must hold image indices in \[0, 2\)"):
            t2i_ranks(scores, np.array(gt))
    with pytest.raises(ValueError, match=r"gt \(n_caps,\)"):
        t2i_ranks(scores, np.array([0, 1, 1]))


def test_t2i_small_matrix_by_hand():
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # gt 0: rank 1
            [0.3, 0.5, 0.4],  # gt 0: rank 3
            [0.2, 0.7, 0.1],  # gt 1: rank 1
            [0.6, 0.5, 0.4],  # gt 2: rank 3
        ]
    )
    ranks = t2i_ranks(scores, np.array([0, 0, 1, 2]))
    np.testing.assert_array_equal(ranks, [1, 3, 1, 3])
    assert recall(ranks) == Recall(r1=50.0, r5=100.0, r10=100.0, medr=2.0, meanr=2.0)


# -- image to text ----------------------------------------------------------------------------


def test_t2i_ranks_a_block_of_captions_at_a_time_as_all_at_once():
    """Ranked 7 captions at a time (the bench ranks 1,024 at a time, so that no comparison matrix
    is as large as the scores), with ties, as one comparison of the whole matrix gives them; a
    NaN in a later block is still found and counted."""
    from heiindex.evaluation import check_finite

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, (300, 40)).astype(np.float32)  # many ties
    gt = rng.integers(0, 40, 300)
    whole = (scores >= scores[np.arange(300), gt][:, None]).sum(axis=1)
    np.testing.assert_array_equal(t2i_ranks(scores, gt, block=7), whole)
    np.testing.assert_array_equal(t2i_ranks(scores, gt), whole)
    scores[299, 3], scores[150, 0] = np.nan, np.inf
    with pytest.raises(HeiindexError, match=r"^2 of 12000 matcher scores are NaN or infinite"):
        t2i_ranks(scores, gt, block=7)
    with pytest.raises(HeiindexError, match=r"^2 of 12000 matcher scores are NaN or infinite"):
        check_finite(scores.T, block=7)
    check_finite(np.zeros((0, 4)))


def test_i2t_best_rank_of_the_images_captions():
    gt = np.array([0, 0, 1, 1])  # captions 0, 1 of image 0; 2, 3 of image 1
    scores = np.array(
        [
            [0.1, 0.8, 0.9, 0.2],  # image 0: order c2 c1 c3 c0 -> its captions at 4 and 2 -> 2
            [0.7, 0.6, 0.5, 0.95],  # image 1: c3 first -> 1
        ]
    )
    ranks = i2t_ranks(scores, gt)
    np.testing.assert_array_equal(ranks, [2, 1])
    r = recall(ranks)
    assert (r.r1, r.r5, r.r10, r.medr, r.meanr) == (50.0, 100.0, 100.0, 1.0, 1.5)


def test_i2t_ties_count_against_the_ground_truth():
    """A stable sort let the lower caption row win a tie: a constant model got i2t R@1 25 on
    4 images of 2 captions (and the Hamming-alone baseline, full of ties, was flattered)."""
    gt = np.repeat(np.arange(4), 2)
    np.testing.assert_array_equal(i2t_ranks(np.zeros((4, 8)), gt), [7, 7, 7, 7])  # 1 + the 6 others
    scores = np.array([[0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1]] * 4)
    # image 0: its captions 0, 1 and caption 2 tie at the top -> 2; image 1: caption 2 at 0.5, behind 0, 1 -> 3;
    # images 2, 3: their best, 0.1, ties with the other images' 3 captions at 0.1 and is behind the 3 at 0.5 -> 7
    np.testing.assert_array_equal(i2t_ranks(scores, gt), [2, 3, 7, 7])


def test_i2t_refuses_images_without_a_caption():
    """An image with no caption counted as a miss (rank inf), lowering R@K with nothing to find."""
    scores = np.zeros((3, 4))
    with pytest.raises(HeiindexError, match=r"^1 of 3 images have no caption \(image rows 2\)"):
        i2t_ranks(scores, np.array([0, 0, 1, 1]))
    for gt in ([0, 1, 2, 3], [0, 1, 2, -1]):  # past the last image, and before the first
        with pytest.raises(HeiindexError, match="a caption's image row lies outside the 3 images"):
            i2t_ranks(scores, np.array(gt))


def test_i2t_on_a_larger_matrix_matches_a_per_image_count():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((6, 30))
    gt = np.repeat(np.arange(6), 5)
    want = []
    for i in range(6):
        order = list(np.argsort(-scores[i]))
        want.append(min(order.index(j) for j in np.flatnonzero(gt == i)) + 1)
    np.testing.assert_array_equal(i2t_ranks(scores, gt), want)
    np.testing.assert_array_equal(i2t_ranks(scores, gt, block=4), want)  # 6 images in blocks of 4 (COCO 5K: of 1024)


def test_recall_figures_print_without_float_noise():
    """--json printed "r5": 73.61999999999999 and "rsum": 197.83999999999997."""
    import json

    ranks = np.array([1.0] * 2144 + [5.0] * 1495 + [10.0] * 470 + [50.0] * 891)  # coco-sim's t2i counts
    d = recall(ranks).to_dict()
    assert json.dumps([d["r1"], d["r5"], d["r10"], d["rsum"]]) == "[42.88, 72.78, 82.18, 197.84]"
    ranks = np.array([1.0] * 101 + [5.0] * 101 + [10.0] * 101 + [50.0] * 697)  # R@K 10.1, 20.2, 30.3
    assert 10.1 + 20.2 + 30.3 != 60.6  # the premise: summing rounded R@K would print 60.599999...
    assert recall(ranks).to_dict()["rsum"] == 60.6


def test_recall_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no ranks"):
        recall(np.array([]))


# -- candidate lists and folds ----------------------------------------------------------------


def test_scores_that_are_not_finite_are_refused():
    """NaN compares false with everything: t2i_ranks gave every caption rank 0 (R@1 100) for a
    NaN score matrix, so a diverged model looked perfect."""
    from heiindex.bench import candidate_ranks

    scores = np.random.default_rng(0).random((6, 3)).astype(np.float32)
    gt = np.array([0, 0, 1, 1, 2, 2])
    for bad in (np.nan, np.inf, -np.inf):
        broken = scores.copy()
        broken[4, 1] = bad
        with pytest.raises(HeiindexError, match=r"^1 of 18 matcher scores are NaN or infinite"):
            t2i_ranks(broken, gt)
        with pytest.raises(HeiindexError, match=r"^1 of 18 matcher scores are NaN or infinite"):
            i2t_ranks(broken.T, gt)
    cand = np.array([[0, 1, -1], [2, 0, -1]])  # re-ranked candidates, one empty slot each (score -inf)
    ranked = np.array([[0.5, 0.2, -np.inf], [0.4, 0.3, -np.inf]], dtype=np.float32)
    assert candidate_ranks("t2i", cand, ranked, gt[:2])[0].tolist() == [1.0, 2.0]  # empty slots: not refused
    ranked[1, 0] = np.nan
    with pytest.raises(HeiindexError, match=r"^1 of 4 matcher scores are NaN or infinite"):
        candidate_ranks("t2i", cand, ranked, gt[:2])


def test_candidate_ranks_count_ties_against_the_ground_truth():
    """HEI's ranks took the first of tied candidates in FAISS's order: two images with the same
    features gave HEI R@1 14 where exhaustive attention, scoring the same pairs, gave 0."""
    from heiindex.bench import candidate_ranks

    cand = np.array([[3, 0, 1, -1], [0, 3, 1, 2]])
    scores = np.array([[0.5, 0.5, 0.2, 9.0], [0.5, 0.5, 0.2, 0.1]], dtype=np.float32)  # 9.0: an empty slot's
    ranks, found = candidate_ranks("t2i", cand, scores, np.array([0, 0]))
    assert ranks.tolist() == [2.0, 2.0] and found == 1.0  # in either order, the tie counts against it
    ranks, found = candidate_ranks("t2i", cand, scores, np.array([2, 1]))
    assert ranks.tolist() == [np.inf, 3.0] and found == 0.5
    # image to text: each image's best caption; its own captions tied with it do not count
    caption_image = np.array([0, 0, 1, 1])
    cand = np.array([[2, 0, 1, 3], [0, 1, 2, 3]])
    scores = np.array([[0.7, 0.7, 0.7, 0.1], [0.9, 0.1, 0.1, 0.1]], dtype=np.float32)
    assert candidate_ranks("i2t", cand, scores, caption_image)[0].tolist() == [2.0, 3.0]


def test_coco_folds():
    assert coco_folds(5000) == [(0, 1000), (1000, 2000), (2000, 3000), (3000, 4000), (4000, 5000)]
    assert coco_folds(24, fold_size=8) == [(0, 8), (8, 16), (16, 24)]
    with pytest.raises(HeiindexError, match="needs whole folds of 1000 images; this split has 1500"):
        coco_folds(1500)


# -- exhaustive scoring of an encoded split ---------------------------------------------------


@pytest.fixture(scope="module")
def enc_test(tmp_path_factory):
    p = pf.get_pipeline(tmp_path_factory)
    m = load_model(p.model_dir)
    return m, encode_split(m.model, SplitStore.open(p.root, "test"))


def test_exhaustive_scores_blocks_equal_one_block(enc_test):
    m, enc = enc_test
    whole = score_block(m.model.attention, enc.words, enc.lengths, enc.regions).numpy()
    np.testing.assert_allclose(exhaustive_scores(m.model, enc, image_block=5), whole, rtol=0, atol=1e-6)
    assert whole.shape == (120, 24)


def test_evaluate_exhaustive_ranks_the_score_matrix(enc_test):
    m, enc = enc_test
    res = evaluate_exhaustive(m.model, enc)
    assert res.t2i == recall(t2i_ranks(res.scores, enc.caption_image))
    assert res.i2t == recall(i2t_ranks(res.scores.T, enc.caption_image))
    assert res.rsum == res.t2i.rsum + res.i2t.rsum
    np.testing.assert_array_equal(enc.caption_image, np.repeat(np.arange(24), 5))
    assert res.seconds > 0
    assert torch.equal(enc.gram, enc.regions @ enc.regions.transpose(1, 2))


def test_infinite_ranks_become_none_in_plain_json():
    import json

    d = recall(np.array([1.0, np.inf, 3.0])).to_dict()
    assert d["medr"] == 3.0 and d["meanr"] is None
    assert d["r1"] == pytest.approx(100 / 3) and d["rsum"] == pytest.approx(100 / 3 + 2 * 200 / 3)
    json.loads(json.dumps(d, allow_nan=False))


# -- a stored split under COCO's protocols, by one matcher or an ensemble (heiindex.protocols) ---


def test_i2t_ranks_name_a_ground_truth_of_the_wrong_length():
    """It raised numpy's IndexError about broadcasting; t2i_ranks already named the shapes."""
    with pytest.raises(
        ValueError, match=r"scores must be \(n_imgs, n_caps\) and gt \(n_caps,\), got \(2, 3\) and \(2,\)"
    ):
        i2t_ranks(np.zeros((2, 3)), np.array([0, 1]))


def test_fold_recalls_rank_each_fold_alone():
    """COCO 1K: each fold's images against its own captions only, a slice of the same matrix."""
    rng = np.random.default_rng(3)
    gt = np.repeat(np.arange(8), 2)  # 8 images, 2 captions each; folds of 4 images
    scores = rng.normal(size=(16, 8))
    folds = [(0, 4), (4, 8)]
    got = fold_recalls(scores, gt, folds)
    want = [
        (
            recall(t2i_ranks(scores[2 * a : 2 * b, a:b], gt[2 * a : 2 * b] - a)),
            recall(i2t_ranks(scores[2 * a : 2 * b, a:b].T, gt[2 * a : 2 * b] - a)),
        )
        for a, b in folds
    ]
    assert got == want
    # a fold ranks fewer items than the whole split: no better than rank 1, no worse than its size
    assert all(1 <= t2i.medr <= 4 for t2i, _ in got) and got[0][0] != recall(t2i_ranks(scores, gt))


def test_mean_of_folds_averages_figures_keeps_shared_counts_and_infinite_ranks():
    folds = [
        {"images": 1000, "captions": 5000, "t2i": {**Recall(10.0, 20.0, 30.0, 1.0, 2.0).to_dict()}},
        {"images": 1000, "captions": 4999, "t2i": {**Recall(20.0, 30.0, 40.0, 2.0, float("inf")).to_dict()}},
    ]
    mean = mean_of_folds(folds)
    assert mean == {
        "images": 1000,
        "captions": 4999.5,  # the folds' mean where they differ
        "t2i": {"r1": 15.0, "r5": 25.0, "r10": 35.0, "medr": 1.5, "meanr": None, "rsum": 75.0},
    }
    assert type(mean["images"]) is int  # 1000 in the JSON, not 1000.0 (== alone cannot tell)
    with pytest.raises(ValueError, match="no fold results"):
        mean_of_folds([])


def test_evaluate_split_of_one_matcher_is_evaluate_exhaustive(pipe, enc_test):
    m, enc = enc_test
    want = evaluate_exhaustive(m.model, enc)
    got = evaluate_split(m, SplitStore.open(pipe.root, "test"))
    assert (got["split"], got["images"], got["captions"], got["models"]) == ("test", 24, 120, 1)
    assert got["full"]["t2i"] == got["t2i"] == want.t2i.to_dict()
    assert got["full"]["i2t"] == got["i2t"] == want.i2t.to_dict()
    assert got["rsum"] == round(want.rsum, 10) and got["seconds"] > 0
    assert set(got) == {"split", "images", "captions", "models", "full", "t2i", "i2t", "rsum", "seconds"}

    with pytest.raises(
        SettingError, match=re.escape("store must be an opened split, SplitStore.open(store_root, split)")
    ):
        evaluate_split(m, str(pipe.root))  # a path failed on "'str' object has no attribute 'n_images'"


def test_an_ensemble_ranks_the_mean_of_its_members_scores(pipe, monkeypatch):
    """SCAN's ensembles average two matchers' scores; Ensemble.score_raw did, but nothing
    evaluated one (evaluate_exhaustive refused an Ensemble)."""
    store = SplitStore.open(pipe.root, "test")
    a, b = load_model(pipe.model_dir), load_model(pipe.other_model_dir)
    mean = (exhaustive_scores(a, encode_split(a, store)) + exhaustive_scores(b, encode_split(b, store))) / 2
    gt = encode_split(a, store).caption_image
    reads = []
    read = SplitStore.captions
    monkeypatch.setattr(SplitStore, "captions", lambda self, *a, **k: reads.append(1) or read(self, *a, **k))
    got = evaluate_split([a, b], store)
    assert len(reads) == 1  # the members share the store's captions: read once, not once each
    assert got["models"] == 2
    assert got["t2i"] == recall(t2i_ranks(mean, gt)).to_dict()
    assert got["i2t"] == recall(i2t_ranks(mean.T, gt)).to_dict()
    assert got["t2i"] != evaluate_split(a, store)["t2i"]  # both members count
    assert evaluate_split(Ensemble([a.model, b.model]), store)["t2i"] == got["t2i"]


def test_a_5000_image_split_is_evaluated_as_coco_5k_and_1k_as_the_bench_does(pipe, monkeypatch):
    """Exhaustive COCO 1K needed a built index and a hash module (bench); evaluate gives it from
    the same score matrix, with the bench's exhaustive figures (here the 24-image split made
    COCO-5K-sized, folds of 12)."""
    import heiindex.bench as bench
    import heiindex.evaluation
    from heiindex.index import Index

    monkeypatch.setattr(heiindex.evaluation, "COCO_5K_IMAGES", 24)  # bench and evaluate share protocol_plan
    monkeypatch.setattr(heiindex.evaluation, "coco_folds", lambda n: [(0, 12), (12, 24)])
    store = SplitStore.open(pipe.root, "test")
    got = evaluate_split(load_model(pipe.model_dir), store)
    ran = bench.run_bench(Index.open(pipe.index_dir), topk=5, warmup=False)
    assert set(got) >= {"5k", "1k"} and "full" not in got and got["1k"]["folds"] == 2
    assert (got["1k"]["images"], got["1k"]["captions"]) == (12, 60)
    for name in ("5k", "1k"):
        for direction in ("t2i", "i2t"):
            want = {k: ran[name][direction]["exhaustive"][k] for k in ("r1", "r5", "r10", "medr", "meanr", "rsum")}
            assert got[name][direction] == want
    assert got["t2i"] == got["5k"]["t2i"]
    assert set(evaluate_split(load_model(pipe.model_dir), store, "1k")) >= {"1k"}
    assert "5k" not in evaluate_split(load_model(pipe.model_dir), store, "1k")


def test_evaluate_split_refuses_what_it_cannot_rank_before_scoring(pipe, monkeypatch):
    from dataclasses import replace

    from heiindex.errors import ModelMismatchError
    from heiindex.vocab import Vocab

    store = SplitStore.open(pipe.root, "test")
    pf.forbid(monkeypatch, "scored", (heiindex.protocols, "exhaustive_scores"))
    # an ensemble's second member of another vocabulary: refused before the first is scored (it
    # was refused after, minutes of scoring at COCO 5K)
    other = replace(load_model(pipe.other_model_dir), vocab=Vocab.build(["a b c"] * 4))
    with pytest.raises(ModelMismatchError, match="tokenised with another vocabulary than model"):
        evaluate_split([load_model(pipe.model_dir), other], store)
    with pytest.raises(
        SettingError, match=r"^COCO 1K \(`protocols` 1k\) needs whole folds of 1000 images; this split has 24"
    ):
        evaluate_split(load_model(pipe.model_dir), store, "1k")
    with pytest.raises(SettingError, match='protocols must be "auto", "full" or "1k", got \'5k\''):
        evaluate_split(load_model(pipe.model_dir), store, "5k")
    with pytest.raises(SettingError, match="models must name at least one matcher"):
        evaluate_split([], store)
    with pytest.raises(SettingError, match="models must be matchers .* got str"):
        evaluate_split([str(pipe.model_dir)], store)


def test_i2t_ranks_an_image_whose_captions_all_score_below_zero():
    """Each image's best caption score started at 0, not -inf: an image whose own captions all
    scored below 0 was ranked by 0 (image 1 here came out first, not second)."""
    scores = np.array([[-0.5, -0.1, -0.3], [-0.2, -0.9, -0.4]])  # (images, captions)
    assert i2t_ranks(scores, np.array([0, 0, 1])).tolist() == [1, 2]


def test_protocol_plan_of_each_protocol():
    """Which protocols a split is ranked under: "full" alone on a COCO-5K-sized split is COCO 5K
    with no folds, "1k" the folds alone, "auto" both there and the whole split elsewhere."""
    from heiindex.evaluation import protocol_plan

    folds = [(0, 1000), (1000, 2000), (2000, 3000), (3000, 4000), (4000, 5000)]
    assert protocol_plan(5000, "full") == ("5k", [])
    assert protocol_plan(24, "full") == ("full", [])
    assert protocol_plan(24, "auto") == ("full", [])
    assert protocol_plan(5000, "1k") == (None, folds)
    assert protocol_plan(5000, "auto") == ("5k", folds)


def test_an_ensembles_seconds_are_its_members_summed(pipe, monkeypatch):
    """Only the last member's scoring time was reported (seconds = ... for +=), unnoticed: the
    tests asserted seconds > 0."""
    from types import SimpleNamespace

    store = SplitStore.open(pipe.root, "test")
    a, b = load_model(pipe.model_dir), load_model(pipe.other_model_dir)
    clock = iter([0.0, 1.0, 10.0, 12.0])  # member a scored in 1 s, member b in 2 s
    monkeypatch.setattr(heiindex.protocols, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert evaluate_split([a, b], store)["seconds"] == 3.0


def test_check_finite_finds_a_nan_in_the_last_row_of_a_block():
    from heiindex.evaluation import check_finite

    scores = np.zeros((14, 3))
    scores[6, 2] = np.nan  # the last row of the first block of 7
    with pytest.raises(HeiindexError, match=r"^1 of 42 matcher scores are NaN or infinite"):
        check_finite(scores, block=7)
