"""heiindex.bench.run_bench: documented keys, exact agreement with exhaustive evaluation and
with Hamming ranking, candidate recall, sweeps and the COCO 1K fold average."""

from __future__ import annotations

import re

import numpy as np
import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
import torch

import heiindex.bench as bench
import heiindex.evaluation
from heiindex.bench import run_bench, versus_exhaustive
from heiindex.checkpoint import load_model
from heiindex.encode import encode_split
from heiindex.errors import HeiindexError, HeiindexWarning
from heiindex.evaluation import i2t_ranks, recall, t2i_ranks
from heiindex.index import Index
from heiindex.index_manifest import searched_type
from heiindex.scoring import evaluate_exhaustive
from heiindex.settings import SettingError
from heiindex.store import SplitStore

METRICS = {"r1", "r5", "r10", "medr", "meanr", "rsum"}
FOUND = {"candidate_slots", "candidates_found"}


@pytest.fixture(scope="module")
def index(pipe):
    return Index.open(pipe.index_dir)


@pytest.fixture(scope="module")
def full_run(index):
    return run_bench(index, topk=24, sweep=[24, 5, 1, 5])


@pytest.fixture(scope="module")
def top5_run(index):
    return run_bench(index, topk=5)


@pytest.fixture(scope="module")
def exhaustive(pipe):
    m = load_model(pipe.model_dir)
    return evaluate_exhaustive(m.model, encode_split(m.model, SplitStore.open(pipe.root, "test")))


def _metrics(d: dict) -> dict:
    return {k: d[k] for k in METRICS}


def test_documented_keys(full_run, pipe):
    keys = {
        "split",
        "index",
        "bits",
        "index_type",
        "search_breadth",
        "prototypes",
        "warmup_seconds",
        "threads",
        "device",
        "dtype",
        "full",
        "t2i",
        "i2t",
    }
    assert set(full_run) == keys and full_run["prototypes"] is None and full_run["warmup_seconds"] > 0
    assert full_run["device"] == "cpu" and full_run["dtype"] == "float32"
    assert full_run["split"] == "test" and full_run["bits"] == pf.BITS and full_run["index_type"] == "flat"
    assert full_run["index"] == str(pipe.index_dir)
    for direction in ("t2i", "i2t"):
        d = full_run[direction]
        assert d is full_run["full"][direction]
        assert set(d) == {"exhaustive", "hei", "hamming", "candidate_recall", "speedup", "versus_exhaustive", *FOUND}
        assert d["candidate_slots"] == d["candidates_found"] == full_run["full"]["candidates"]  # flat: every slot
        for method in ("exhaustive", "hei", "hamming"):
            assert set(d[method]) == METRICS | {"seconds"}
            m = d[method]
            assert m["rsum"] == pytest.approx(m["r1"] + m["r5"] + m["r10"], abs=1e-9)  # rounded at 1e-10
            assert 0 <= m["r1"] <= m["r5"] <= m["r10"] <= 100
            assert m["seconds"] >= 0
        assert 0 <= d["candidate_recall"] <= 1
        assert d["speedup"] == pytest.approx(d["exhaustive"]["seconds"] / max(d["hei"]["seconds"], 1e-9))
    f = full_run["full"]
    assert (f["images"], f["captions"], f["candidates"]) == (24, 120, 24)


def test_versus_exhaustive_counts_what_hei_lost_and_gained():
    """HEI's ranks against exhaustive's, 1-based (inf: the ground truth is not a candidate), for
    five queries: 1 vs 1 (kept), inf vs 3 (lost at 5 and 10), 1 vs 2 (gained at 1), 7 vs 12
    (gained at 10), 6 vs 4 (lost at 5)."""
    got = versus_exhaustive(np.array([1, np.inf, 1, 7, 6]), np.array([1, 3, 2, 12, 4]))
    assert got == {"lost": {"r1": 0.0, "r5": 40.0, "r10": 20.0}, "gained": {"r1": 20.0, "r5": 0.0, "r10": 20.0}}


def test_hei_recall_is_exhaustives_minus_lost_plus_gained(top5_run, full_run):
    """With 5 candidates HEI loses some queries exhaustive finds and gains others; with every
    image a candidate (24: t2i) it loses and gains none."""
    for res in (top5_run, full_run):
        for direction in ("t2i", "i2t"):
            d = res[direction]
            v = d["versus_exhaustive"]
            for k in ("r1", "r5", "r10"):
                assert d["hei"][k] == pytest.approx(d["exhaustive"][k] - v["lost"][k] + v["gained"][k], abs=1e-9)
    every = full_run["t2i"]["versus_exhaustive"]
    assert every == {
        "lost": dict.fromkeys(("r1", "r5", "r10"), 0.0),
        "gained": dict.fromkeys(("r1", "r5", "r10"), 0.0),
    }
    assert sum(top5_run["t2i"]["versus_exhaustive"]["lost"].values()) > 0  # the case is not empty


def test_exhaustive_is_the_exhaustive_evaluation(full_run, exhaustive):
    assert _metrics(full_run["t2i"]["exhaustive"]) == exhaustive.t2i.to_dict()
    assert _metrics(full_run["i2t"]["exhaustive"]) == exhaustive.i2t.to_dict()


def test_with_every_image_a_candidate_hei_equals_exhaustive(full_run):
    t2i = full_run["t2i"]
    assert t2i["candidate_recall"] == 1.0
    assert _metrics(t2i["hei"]) == _metrics(t2i["exhaustive"])


def test_hamming_alone_ranks_by_code_distance(full_run, index):
    dist = pf.hamming_by_hand(index.caption_codes(), index.image_codes())  # (captions, images)
    gt = index.caption_image
    assert _metrics(full_run["t2i"]["hamming"]) == recall(t2i_ranks(-dist, gt)).to_dict()
    assert _metrics(full_run["i2t"]["hamming"]) == recall(i2t_ranks(-dist.T, gt)).to_dict()


def test_few_candidates_bound_recall_by_candidate_recall(top5_run, index):
    for direction in ("t2i", "i2t"):
        d = top5_run[direction]
        # five candidates: a ground truth is ranked within 5 exactly when it is a candidate
        assert d["hei"]["r5"] == d["hei"]["r10"] == pytest.approx(100 * d["candidate_recall"])
        assert d["hei"]["r1"] <= d["hei"]["r5"]
    _, cand = index.image_index.search(index.caption_codes(), 5)
    want = float(np.mean((cand == index.caption_image[:, None]).any(axis=1)))
    assert top5_run["t2i"]["candidate_recall"] == want
    _, ccand = index.caption_index.search(index.image_codes(), 5)
    want = float(np.mean((index.caption_image[ccand] == np.arange(24)[:, None]).any(axis=1)))
    assert top5_run["i2t"]["candidate_recall"] == want


def test_sweep_rows(full_run, top5_run):
    rows = full_run["full"]["sweep"]
    assert [r["candidates"] for r in rows] == [1, 5, 24]  # sorted, each once
    for r in rows:
        assert set(r) == {"candidates", "t2i", "i2t"}
        for direction in ("t2i", "i2t"):
            want = METRICS | {"candidate_recall", "candidates_found", "seconds", "versus_exhaustive"}
            assert set(r[direction]) == want
            assert r[direction]["candidates_found"] == r["candidates"]
    one, five, every = rows
    for direction in ("t2i", "i2t"):
        d = one[direction]  # a single candidate: R@1 = R@5 = R@10 = candidate recall
        assert d["r1"] == d["r5"] == d["r10"] == pytest.approx(100 * d["candidate_recall"])
        assert _metrics(five[direction]) == _metrics(top5_run[direction]["hei"])
        assert five[direction]["candidate_recall"] == top5_run[direction]["candidate_recall"]
    assert _metrics(every["t2i"]) == _metrics(full_run["t2i"]["exhaustive"])
    assert every["t2i"]["candidate_recall"] == 1.0
    assert one["t2i"]["candidate_recall"] <= five["t2i"]["candidate_recall"] <= 1.0


def test_hei_hashes_its_queries_inside_its_timed_stage(index, top5_run, monkeypatch):
    """HEI's seconds include hashing the queries from their encoded features (each direction's
    own), as a new query is hashed: a clock that jumps 100 s (t2i) or 1000 s (i2t) while one
    hashes shows in that direction's seconds. It searches with the stored codes, which are the
    hashed ones."""
    import time

    jump = {"t2i": 0.0, "i2t": 0.0}
    real_captions, real_images = Index.hash_captions, Index.hash_images

    def captions(self, words):
        jump["t2i"] += 100.0
        assert len(words) == index.n_captions  # the protocol's queries, all of them
        return real_captions(self, words)

    def images(self, regions):
        jump["i2t"] += 1000.0
        assert len(regions) == index.n_images
        return real_images(self, regions)

    clock = type("Clock", (), {"perf_counter": staticmethod(lambda: time.perf_counter() + sum(jump.values()))})
    monkeypatch.setattr(Index, "hash_captions", captions)
    monkeypatch.setattr(Index, "hash_images", images)
    monkeypatch.setattr(bench, "time", clock)
    res = run_bench(index, topk=5, exhaustive=False, warmup=False)
    assert jump == {"t2i": 100.0, "i2t": 1000.0}
    assert 100 <= res["t2i"]["hei"]["seconds"] < 1000 and 1000 <= res["i2t"]["hei"]["seconds"] < 1100
    for direction in ("t2i", "i2t"):
        assert _metrics(res[direction]["hei"]) == _metrics(top5_run[direction]["hei"])
        assert res[direction]["candidate_recall"] == top5_run[direction]["candidate_recall"]
        assert "versus_exhaustive" not in res[direction]  # nothing to compare with
    np.testing.assert_array_equal(real_captions(index, index.words), index.caption_codes())
    np.testing.assert_array_equal(real_images(index, index.regions), index.image_codes())


def test_the_warm_up_runs_each_timed_stage_once_on_a_few_queries_before_any_timed_pass(index, top5_run, monkeypatch):
    """A small untimed pass of each stage comes first (its results dropped, its seconds reported
    and not counted in any stage's): the first captions searched in the stored image index and the
    first images in the stored caption index, at the bench's depth, enough of them that their
    pairs take the length-bucketed path the timed passes take (above ONE_CHUNK_PAIRS, where the
    split has them), and an exhaustive block of WARMUP_QUERIES images and captions; then the timed
    passes, whose figures it does not change. ``warmup=False`` skips it."""
    import time

    import heiindex.attention as attention

    calls = []
    real = bench.rerank_direction, bench.exhaustive_scores, bench._hei, attention._bucket_chunks
    jump = [0.0]

    def rerank(direction, index_, sub, img_codes, cap_codes, n, use_stored):
        calls.append((direction, len(sub.regions), len(sub.lengths), len(img_codes), len(cap_codes), n, use_stored))
        jump[0] += 1000.0 if not any(c == "timed" for c in calls) else 0.0  # the warm-up's "time"
        return real[0](direction, index_, sub, img_codes, cap_codes, n, use_stored)

    def exhaustive(model, sub):
        calls.append(("exhaustive", len(sub.regions), len(sub.lengths)))
        return real[1](model, sub)

    def hei(*args):
        calls.append("timed")
        return real[2](*args)

    def bucket_chunks(*args):
        calls.append("bucketed")
        return real[3](*args)

    clock = type("Clock", (), {"perf_counter": staticmethod(lambda: time.perf_counter() + jump[0])})
    monkeypatch.setattr(bench, "WARMUP_QUERIES", 7)
    for name, fn in (("rerank_direction", rerank), ("exhaustive_scores", exhaustive), ("_hei", hei), ("time", clock)):
        monkeypatch.setattr(bench, name, fn)
    monkeypatch.setattr(attention, "_bucket_chunks", bucket_chunks)
    res = run_bench(index, topk=5)
    n_img, n_cap = index.n_images, index.n_captions  # 24 images, 120 captions
    queries = attention.ONE_CHUNK_PAIRS // 5 + 1  # 103 captions x 5 pairs: over one chunk
    first_timed = calls.index("timed")
    assert calls[:4] == [
        ("t2i", n_img, queries, n_img, queries, 5, True),  # the captions search every image
        "bucketed",  # the length-bucketed path of score_pairs
        ("i2t", n_img, n_cap, n_img, n_cap, 5, True),  # every image (fewer than 103) searches every caption
        ("exhaustive", 7, 7),
    ]
    assert set(calls[4:first_timed]) <= {"bucketed"}  # exhaustive scoring buckets its captions too
    assert 2000 <= res["warmup_seconds"] < 2100  # both warm-up re-rankings, and no timed stage's
    calls.clear()
    cold = run_bench(index, topk=5, warmup=False)
    assert calls[0] == "timed" and cold["warmup_seconds"] is None
    for direction in ("t2i", "i2t"):
        assert res[direction]["hei"]["seconds"] < 1000 and res[direction]["exhaustive"]["seconds"] < 1000
        for stage in ("exhaustive", "hei", "hamming"):
            assert _metrics(res[direction][stage]) == _metrics(cold[direction][stage])
            assert _metrics(res[direction][stage]) == _metrics(top5_run[direction][stage])
        assert res[direction]["candidate_recall"] == cold[direction]["candidate_recall"]
    calls.clear()
    run_bench(index, topk=20, exhaustive=False)
    assert calls[:3] == [
        ("t2i", n_img, 26, n_img, 26, 20, True),  # 7 captions' pairs would fit one chunk: 512 // 20 + 1 = 26
        "bucketed",
        ("i2t", n_img, n_cap, n_img, n_cap, 20, True),
    ]
    assert calls[3] != ("exhaustive", 7, 7)  # no exhaustive block where none is timed


def test_the_warm_up_of_a_1k_only_bench_searches_flat_indexes_as_its_folds(index, monkeypatch):
    """With only COCO 1K folds benched, the timed passes search flat indexes of the folds' codes,
    never the stored ones: nor does the warm-up (a Milvus server would be called for nothing)."""
    used = []
    real = bench.rerank_direction

    def rerank(direction, index_, sub, img_codes, cap_codes, n, use_stored):
        used.append(use_stored)
        return real(direction, index_, sub, img_codes, cap_codes, n, use_stored)

    monkeypatch.setattr(heiindex.evaluation, "coco_folds", lambda n: [(0, 12), (12, 24)])
    monkeypatch.setattr(bench, "rerank_direction", rerank)
    run_bench(index, topk=5, protocols="1k", exhaustive=False)
    assert used and not any(used)


def _assert_medians(d: dict, passes: int) -> None:
    """One direction of a --repeats bench: each stage's seconds the median of its ``passes``
    passes, the speed-up the medians' ratio."""
    for stage in ("exhaustive", "hei"):
        each = d[stage]["seconds_each"]
        assert len(each) == passes and d[stage]["seconds"] == float(np.median(each)), stage
    assert d["speedup"] == d["exhaustive"]["seconds"] / d["hei"]["seconds"]


def test_repeats_over_1k_folds_report_the_median_of_the_passes_summed_over_folds(index, monkeypatch):
    monkeypatch.setattr(heiindex.evaluation, "coco_folds", lambda n: [(0, 12), (12, 24)])
    res = run_bench(index, topk=5, protocols="1k", repeats=3)
    for direction in ("t2i", "i2t"):
        _assert_medians(res["1k"][direction], 3)


def test_repeats_time_both_stages_again_and_report_the_medians(index, top5_run):
    """--repeats R: HEI and exhaustive are timed R times, alternately; seconds are the medians,
    seconds_each every pass, the speed-up the medians' ratio; the figures are one pass's."""
    res = run_bench(index, topk=5, repeats=3)
    for direction in ("t2i", "i2t"):
        d = res[direction]
        _assert_medians(d, 3)
        for stage in ("exhaustive", "hei"):
            assert _metrics(d[stage]) == _metrics(top5_run[direction][stage])
        assert "seconds_each" not in top5_run[direction]["hei"]  # one pass: the documented keys only
    assert res["i2t"]["exhaustive"]["seconds_each"] == res["t2i"]["exhaustive"]["seconds_each"]  # one matrix, both
    for bad in (0, 1.5, True):
        with pytest.raises(HeiindexError, match="repeats must be a whole number"):
            run_bench(index, topk=5, repeats=bad)


def test_bad_depths_are_refused_by_name_before_any_pass(index, monkeypatch):
    """A float sweep value failed after the whole bench (exhaustive scoring included), named
    "candidates"; a string, a number or an array as the sweep were raw TypeErrors and ValueErrors."""
    import heiindex.bench

    pf.forbid(monkeypatch, "a pass ran", (heiindex.bench, "_hei"))
    for kwargs, message in (
        ({"topk": 5, "sweep": [2, 4.5]}, "sweep must be a whole number, got 4.5"),
        ({"topk": 5.0}, "topk must be a whole number, got 5.0"),
        ({"topk": "5"}, "topk must be a whole number, got '5'"),
        ({"sweep": 5}, "sweep must be a list of whole numbers (the N values), got 5"),
        ({"sweep": "5,10"}, "sweep must be a list of whole numbers (the N values), got '5,10'"),
    ):
        with pytest.raises(SettingError, match=re.escape(message)):
            run_bench(index, **kwargs)
    monkeypatch.undo()
    got = run_bench(index, topk=np.int64(5), sweep=np.array([2, 4]), exhaustive=False)
    assert got["full"]["candidates"] == 5 and [r["candidates"] for r in got["full"]["sweep"]] == [2, 4]


def test_the_sweep_plot_is_drawn_by_run_bench_and_checked_before_any_pass(index, tmp_path, monkeypatch):
    """A Python user got no plot (the CLI drew it from the main protocol's sweep); a bad path is
    refused before the bench runs."""
    import heiindex.bench

    with monkeypatch.context() as m:
        pf.forbid(m, "a pass ran", (heiindex.bench, "_hei"))
        for kwargs, message in (
            ({"plot": tmp_path / "p.png"}, "plot draws the `sweep` table; give `sweep` too"),
            ({"sweep": [2], "plot": tmp_path / "p.txt"}, "the plot is a PNG; give a path ending in .png"),
            ({"sweep": [2], "plot": tmp_path / "gone" / "p.png"}, "no folder"),
        ):
            with pytest.raises(HeiindexError, match=re.escape(message)):
                run_bench(index, topk=5, exhaustive=False, **kwargs)
    res = run_bench(index, topk=5, sweep=np.array([2, 4]), exhaustive=False, plot=tmp_path / "p.png")
    assert res["plot"] == str(tmp_path / "p.png") and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert heiindex.evaluation.main_protocol(res) is res["full"]
    assert "plot" not in run_bench(index, topk=5, sweep=[2], exhaustive=False)


def test_check_bench_settings_refuses_what_no_index_allows():
    """check_bench_settings, which the command line calls before it opens an index (its order is
    tested in test_cli_options) and run_bench before any pass; a sharded build's bench has no
    sweep, repeats or 1K folds."""
    from heiindex.bench_settings import check_bench_settings, refuse_for_sharded

    assert check_bench_settings([50, 10, 50], None, 3, "full") == ([10, 50], None, 3)
    refuse_for_sharded([], 1, "full")  # what a sharded build's bench can do
    for check, kwargs, message in (
        (refuse_for_sharded, {"sweep": [10], "repeats": 1, "protocols": "auto"}, "sweep runs on an unsharded build"),
        (refuse_for_sharded, {"sweep": [], "repeats": 2, "protocols": "auto"}, "repeats runs on an unsharded build"),
        (refuse_for_sharded, {"sweep": [], "repeats": 1, "protocols": "1k"}, "protocols 1k runs on an unsharded build"),
        (check_bench_settings, {"repeats": 0}, "repeats must be a whole number"),
        (check_bench_settings, {"protocols": "2k"}, "protocols must be"),
        (check_bench_settings, {"sweep": [2.5]}, "sweep"),
    ):
        with pytest.raises(HeiindexError, match=re.escape(message)):
            check(**kwargs)


def test_a_plot_that_cannot_be_written_keeps_the_benchs_figures(index, tmp_path, monkeypatch):
    """A full disk at the end of a sweep threw the whole bench away with 'Error: No space left on
    device', naming no file (a review's find): the figures now come back, the plot named in a warning."""
    import errno

    import matplotlib.figure
    from cli_helpers import run

    def full(self, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    plot = tmp_path / "p.png"
    with pytest.warns(HeiindexWarning, match=re.escape(f"the sweep plot {plot} could not be written (No space left")):
        res = run_bench(index, topk=5, sweep=[2, 4], exhaustive=False, plot=plot)
    assert "plot" not in res and [row["candidates"] for row in res["full"]["sweep"]] == [2, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no half-written PNG, no scratch
    r = run("bench", "--index", index.path, "--topk", "5", "--sweep", "2,4", "--plot", plot)
    assert r.exit_code == 0 and "Warning: the sweep plot" in r.output and "recall versus N" in r.output


def test_the_sweep_plot_is_not_written_into_a_build_that_replaced_the_one_benched(pipe, tmp_path):
    """A rebuild that landed while a bench ran got the old build's sweep plot in its folder (a
    review's find): the plot is left out, with a warning, and the figures still come back."""
    import json
    import shutil

    from heiindex.plot import SWEEP_PLOT

    folder = tmp_path / "idx"
    shutil.copytree(pipe.index_dir, folder)
    opened = Index.open(folder)
    plot = folder / SWEEP_PLOT  # where the command line draws it
    res = run_bench(opened, topk=5, sweep=[2, 4], exhaustive=False, plot=plot)  # the build opened: written
    assert res["plot"] == str(plot) and plot.read_bytes()[:4] == b"\x89PNG"
    plot.unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "created_by": "another build"}))
    with pytest.warns(
        HeiindexWarning,
        match=re.escape(f"the sweep plot {plot} was not written: {folder} no longer holds the build benched"),
    ):
        res = run_bench(opened, topk=5, sweep=[2, 4], exhaustive=False, plot=plot)
    assert "plot" not in res and not plot.exists() and [r["candidates"] for r in res["full"]["sweep"]] == [2, 4]
    elsewhere = tmp_path / "p.png"  # a plot outside the folder is the user's to write
    assert run_bench(opened, topk=5, sweep=[2], exhaustive=False, plot=elsewhere)["plot"] == str(elsewhere)


def test_without_exhaustive_there_is_no_speedup(index):
    res = run_bench(index, topk=5, exhaustive=False)
    for direction in ("t2i", "i2t"):
        assert set(res[direction]) == {"hei", "hamming", "candidate_recall", *FOUND}


def test_1k_protocol_averages_folds(index, monkeypatch):
    """COCO 1K is the mean over folds; with folds of 12 images, the mean of two 12-image runs."""
    monkeypatch.setattr(heiindex.evaluation, "coco_folds", lambda n: [(0, 12), (12, 24)])
    res = run_bench(index, topk=5, protocols="1k")
    assert "full" not in res and res["1k"]["folds"] == 2
    a = bench._protocol(index, np.arange(0, 12), 5, [], use_stored=False)
    b = bench._protocol(index, np.arange(12, 24), 5, [], use_stored=False)
    for direction in ("t2i", "i2t"):
        for method in ("exhaustive", "hei", "hamming"):
            for k in METRICS:
                va, vb = a[direction][method][k], b[direction][method][k]
                if va is None or vb is None:  # an infinite rank in a fold: undefined for the mean too
                    assert res["1k"][direction][method][k] is None, (direction, method, k)
                    continue
                want = (va + vb) / 2
                assert res["1k"][direction][method][k] == pytest.approx(want, abs=1e-9), (direction, method, k)
        assert res["1k"][direction]["candidate_recall"] == pytest.approx(
            (a[direction]["candidate_recall"] + b[direction]["candidate_recall"]) / 2
        )
    assert res["1k"]["images"] == 12 and res["1k"]["captions"] == 60
    assert res["t2i"] is res["1k"]["t2i"]
    assert res["1k"]["index_type"] == "flat"  # the folds' own indexes, whatever the stored one's type
    for direction in ("t2i", "i2t"):  # the speed-up of the summed seconds, not the mean of the folds' ratios
        d = res["1k"][direction]
        assert d["speedup"] == d["exhaustive"]["seconds"] / d["hei"]["seconds"]


def test_topk_defaults_to_the_largest_the_index_allows_below_100(index):
    """`heiindex bench` on a first small index was refused for a --topk 100 never given (the
    default of 100 itself: test_shards, run_sharded_bench on the sharded build)."""
    res = run_bench(index)
    assert res["full"]["candidates"] == 24  # 24 images, 120 captions
    assert res["full"]["t2i"]["candidate_recall"] == 1.0  # every image a candidate (i2t: 24 of 120 captions)
    assert run_bench(index, topk=7)["full"]["candidates"] == 7


@pytest.mark.parametrize("topk", [0, 25])
def test_topk_out_of_range(index, topk):
    with pytest.raises(HeiindexError, match=r"^topk .* must lie in \[1, 24\] for this index"):
        run_bench(index, topk=topk)


@pytest.mark.parametrize("n", [0, 25])
def test_sweep_value_out_of_range(index, n):
    """A sweep value beyond the set is refused by name, as --topk is (it used to be left out of
    the table without a word, and 0 failed deep inside FAISS)."""
    with pytest.raises(HeiindexError, match=rf"^sweep {n} must lie in \[1, 24\] for this index$"):
        run_bench(index, topk=5, sweep=[5, n])


def test_depths_are_checked_against_the_1k_folds(index, monkeypatch):
    monkeypatch.setattr(heiindex.evaluation, "coco_folds", lambda n: [(0, 12), (12, 24)])
    with pytest.raises(ValueError, match=r"^sweep 13 must lie in \[1, 12\] for this index \(a COCO 1K fold"):
        run_bench(index, topk=5, sweep=[13], protocols="1k")
    with pytest.raises(ValueError, match=r"^topk 13 must lie in \[1, 12\]"):
        run_bench(index, topk=13, protocols="1k")
    with pytest.raises(HeiindexError, match='protocols must be "auto", "full" or "1k"'):
        run_bench(index, topk=5, protocols="5k")


def test_1k_protocol_averages_the_sweep_over_folds(index, monkeypatch):
    """--protocol 1k --sweep failed with a KeyError: the folds ran no sweep."""
    monkeypatch.setattr(heiindex.evaluation, "coco_folds", lambda n: [(0, 12), (12, 24)])
    rows = run_bench(index, topk=5, sweep=[3, 12], protocols="1k")["1k"]["sweep"]
    a = bench._protocol(index, np.arange(0, 12), 5, [3, 12], use_stored=False)["sweep"]
    b = bench._protocol(index, np.arange(12, 24), 5, [3, 12], use_stored=False)["sweep"]
    assert [r["candidates"] for r in rows] == [3, 12]
    for row, ra, rb in zip(rows, a, b, strict=True):
        for direction in ("t2i", "i2t"):
            for k in ("r1", "r5", "r10", "rsum", "candidate_recall"):
                assert row[direction][k] == pytest.approx((ra[direction][k] + rb[direction][k]) / 2, abs=1e-9)
    assert rows[1]["t2i"]["candidate_recall"] == 1.0  # 12 candidates of a 12-image fold: every image


def test_1k_protocol_needs_whole_folds(index):
    with pytest.raises(
        ValueError, match=r"COCO 1K \(`protocols` 1k\) needs whole folds of 1000 images; this split has 24"
    ):
        run_bench(index, topk=5, protocols="1k")


def test_bench_of_an_ivf_index_that_returns_fewer_candidates(pipe, tmp_path):
    """An IVF index probing 1 of 6 lists returns fewer than N ids for some queries (FAISS pads
    with -1). ``Index.search`` drops those; the bench must count them as misses, not crash."""
    ivf = Index.build(
        pipe.root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "ivf", index_type="ivf", nlist=6, nprobe=1
    )
    _, ids = ivf.image_index.search(ivf.caption_codes(), 24)
    assert (ids < 0).any()  # the situation under test
    res = run_bench(ivf, topk=24)
    want = float(np.mean((ids == ivf.caption_image[:, None]).any(axis=1)))
    assert res["t2i"]["candidate_recall"] == want
    # R@10 counts 4 of 24 as 100 * 4 / 24 = 16.666666666666668, above 100 * (1/6): one float step
    assert res["t2i"]["hei"]["r10"] <= 100 * want + 1e-9
    # the batched pipeline the bench, Index.candidates_* and the shards share: empty slots are
    # -1 with score -inf, the others the matcher's scores of the ids found
    first = ivf.words.select(torch.arange(40))
    found = ivf.candidates_for_captions(first, first.lengths, 24)
    assert (found.ids < 0).any() and (found.ids >= 0).any()
    assert np.isneginf(found.scores[found.ids < 0]).all() and np.isfinite(found.scores[found.ids >= 0]).all()


def test_empty_slots_rank_last_whatever_their_score():
    """FAISS pads missing results with id -1 and distance INT_MAX (IVF) or INT_MIN (HNSW): ranked
    by -distance, an HNSW pad would come first unless empty slots are masked."""
    cand = np.array([[5, -1, -1], [-1, 2, 9]])
    relevant = np.array([[True, False, False], [True, True, False]])  # a pad marked relevant never counts
    for pad in (np.iinfo(np.int32).max, np.iinfo(np.int32).min):
        dist = np.array([[3, pad, pad], [pad, 4, 1]], dtype=np.int64)
        ranks, recall_ = bench._ranks_of_first_hit(cand, -dist.astype(np.float64), relevant)
        assert ranks.tolist() == [1.0, 2.0] and recall_ == 1.0


def test_candidate_metrics_rank_by_score_and_by_hamming_and_never_count_a_pad():
    """The sharded bench's metrics of merged candidate lists, by hand. Captions 0-3 show images
    0, 0, 1, 2; pads are id -1 with an IVF (INT_MAX) or HNSW (INT_MIN) distance."""
    caption_image = np.array([0, 0, 1, 2])
    big, small = np.iinfo(np.int32).max, np.iinfo(np.int32).min
    cand = np.array([[1, 0], [0, -1], [2, 0], [1, 0]])  # t2i: image rows per caption
    scores = np.array([[0.9, 0.5], [0.2, -np.inf], [0.1, 0.3], [0.8, 0.7]])
    dist = np.array([[4, 1], [3, big], [2, 5], [1, 2]])
    got = bench.candidate_metrics("t2i", cand, scores, dist, caption_image, 1.5)
    # ranks by score 2, 1, inf, inf; by Hamming distance 1, 1, inf, inf
    assert (got["hei"]["r1"], got["hei"]["r5"], got["hei"]["seconds"]) == (25.0, 50.0, 1.5)
    assert (got["hamming"]["r1"], got["hamming"]["r5"], got["hamming"]["seconds"]) == (50.0, 50.0, None)
    assert got["candidate_recall"] == 0.5
    cand = np.array([[2, -1], [2, 3], [3, -1]])  # i2t: caption rows per image; a pad would read caption 0
    scores = np.array([[0.5, -np.inf], [0.1, 0.6], [0.2, -np.inf]])
    dist = np.array([[1, small], [2, 3], [4, small]])
    got = bench.candidate_metrics("i2t", cand, scores, dist, caption_image, 0.5)
    # ranks by score inf, 2, 1; by Hamming distance inf, 1, 1
    assert (got["hei"]["r1"], got["hei"]["r5"]) == pytest.approx((100 / 3, 200 / 3))
    assert (got["hamming"]["r1"], got["hamming"]["r5"]) == pytest.approx((200 / 3, 200 / 3))
    assert got["candidate_recall"] == pytest.approx(2 / 3)


def test_folds_are_averaged_but_their_seconds_summed():
    """COCO 1K: R@K, ranks and recall are means over the folds (without float noise: 95.48, not
    95.47999999999999), seconds their sum, a count every fold shares is kept, an infinite rank in
    any fold stays None, sweep rows row by row. (run_bench computes the speed-up again from the
    summed seconds: test_1k_protocol_averages_folds.)"""
    from heiindex.evaluation import mean_of_folds

    fold = [
        {
            "images": 1000,
            "t2i": {
                "hei": {
                    "r1": 40.0,
                    "r10": 95.46,
                    "medr": 2.0,
                    "meanr": None,
                    "seconds": 1.5,
                    "seconds_each": [1.5, 2.0],
                },
                "speedup": 6.0,
            },
            "sweep": [{"n": 10, "t2i": 0.5}, {"n": 20, "t2i": 0.75}],
            "dtype": "float32",
        },
        {
            "images": 1000,
            "t2i": {
                "hei": {
                    "r1": 50.0,
                    "r10": 95.5,
                    "medr": 3.0,
                    "meanr": 4.0,
                    "seconds": 2.25,
                    "seconds_each": [2.5, 2.25],
                },
                "speedup": 8.0,
            },
            "sweep": [{"n": 10, "t2i": 0.25}, {"n": 20, "t2i": 1.0}],
            "dtype": "float32",
        },
    ]
    mean = mean_of_folds(fold)
    assert mean == {
        "images": 1000,
        "t2i": {
            "hei": {"r1": 45.0, "r10": 95.48, "medr": 2.5, "meanr": None, "seconds": 3.75, "seconds_each": [4.0, 4.25]},
            "speedup": 7.0,
        },
        "sweep": [{"n": 10, "t2i": 0.375}, {"n": 20, "t2i": 0.875}],
        "dtype": "float32",
    }
    assert type(mean["images"]) is int  # 1000 in the JSON, not 1000.0 (== alone cannot tell)


def test_a_5000_image_split_is_benched_as_coco_5k_and_1k(index, monkeypatch):
    """--protocol auto on a COCO-5K-sized split (here the 24-image set made that size) runs the
    whole split as "5k" and the 1K folds, reports the 5K figures at the top, and checks --topk
    against a fold's size."""
    monkeypatch.setattr(heiindex.evaluation, "COCO_5K_IMAGES", 24)
    monkeypatch.setattr(heiindex.evaluation, "coco_folds", lambda n: [(0, 12), (12, 24)])
    res = run_bench(index, topk=5)
    assert "full" not in res and res["1k"]["folds"] == 2 and res["5k"]["images"] == 24
    assert res["t2i"] is res["5k"]["t2i"] and res["i2t"] is res["5k"]["i2t"]
    with pytest.raises(
        ValueError, match=r"^topk 13 must lie in \[1, 12\] for this index \(a COCO 1K fold's size; `protocols` full"
    ):
        run_bench(index, topk=13)


def test_hamming_distances_over_several_blocks():
    """Hamming distances of 8-bit codes, computed 2 queries at a time (COCO 5K's 25,000 captions
    are 13 blocks of the default 2,048), and the bench's scores, their negatives."""
    from heiindex.hamming import hamming_distances

    q = np.array([[0], [255], [15], [1], [3]], dtype=np.uint8)
    x = np.array([[0], [255]], dtype=np.uint8)
    want = np.array([[0, 8], [8, 0], [4, 4], [1, 7], [2, 6]], dtype=np.float32)
    got = hamming_distances(q, x, block=2)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(bench._negative_hamming(q, x), -want)
    with pytest.raises(ValueError, match="codes are 16-bit, the index holds 8-bit codes"):
        hamming_distances(q, np.zeros((2, 2), dtype=np.uint8))


def test_candidate_ranks_refuse_an_uncaptioned_image_query():
    """Image 2 has no caption: image-to-text ranks would count it a miss; refused by name."""
    cand = np.array([[0, 1], [2, 0], [1, 2]])
    with pytest.raises(HeiindexError, match=r"1 of 3 images have no caption \(image rows 2\)"):
        bench.candidate_ranks("i2t", cand, np.ones((3, 2)), np.array([0, 0, 1]))


def test_a_build_with_an_uncaptioned_image_is_refused_before_any_pass(pipe, tmp_path, monkeypatch):
    """Such a build serves queries, but i2t recall would count the image a miss: the bench refused
    it only after the text-to-image pass (and the sharded bench after both directions' searches)."""
    from heiindex.bench import run_sharded_bench
    from heiindex.shards import ShardedIndex, build_shards

    root = pf.copy_store(pipe, tmp_path)
    pf.edit_column(root / "test" / "captions.parquet", "image_id", lambda ids: ids.__setitem__(ids == ids[0], ids[-1]))
    Index.write(root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "i")  # a gallery may hold such images
    build_shards(root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "s", 2)
    pf.forbid(monkeypatch, "a pass began", (bench, "_hei"))
    pf.forbid(monkeypatch, "a pass began", (ShardedIndex, "bench_captions"))
    for go in (
        lambda: run_bench(Index.open(tmp_path / "i"), 5),
        lambda: run_sharded_bench(ShardedIndex.open(tmp_path / "s"), 5),
    ):
        with pytest.raises(HeiindexError, match=r"^1 of 24 images have no caption \(image rows 0\)"):
            go()


def test_the_bench_names_the_index_type_searched_not_the_one_asked():
    """An `auto` build said "index_type": "auto" in `bench --json`, not what it searched."""
    auto = {"type": "auto", "nlist": None, "nprobe": None}
    assert searched_type({**auto, "images": {"type": "flat"}, "captions": {"type": "flat"}}) == "flat"
    mixed = {**auto, "images": {"type": "flat"}, "captions": {"type": "ivf"}}
    assert searched_type(mixed) == "flat (images), ivf (captions)"
    assert searched_type({"type": "hnsw", "images": {"type": "hnsw"}, "captions": {"type": "hnsw"}}) == "hnsw"


def test_exhaustive_evaluation_takes_the_loaded_model_encode_split_takes(pipe, exhaustive):
    """encode_split takes load_model's result; evaluate_exhaustive took only its .model (an
    AttributeError), and a model of another embedding size scored the split without a word."""
    m = load_model(pipe.model_dir)
    enc = encode_split(m, SplitStore.open(pipe.root, "test"))
    assert evaluate_exhaustive(m, enc).rsum == exhaustive.rsum
    other = pf.model_config(len(m.vocab), embed_size=pf.EMBED_SIZE * 2)
    from heiindex.model import ScanModel

    with pytest.raises(HeiindexError, match=f"encoded with embedding size {pf.EMBED_SIZE}, this model's is"):
        evaluate_exhaustive(ScanModel(other), enc)
    with pytest.raises(HeiindexError, match="model must be a ScanModel or a LoadedModel"):
        evaluate_exhaustive(str(pipe.model_dir), enc)
