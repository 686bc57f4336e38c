"""heiindex.shards: sharded builds, and queries over them that match the unsharded index."""

from __future__ import annotations

import errno
import json
import pickle
import re

import numpy as np
import pipeline_fixtures as pf
import pytest
import torch
from cli_helpers import as_json, build, clean_error, json_lines, ok, run

from heiindex.bench import _merge_candidates, run_sharded_bench
from heiindex.builds import open_index
from heiindex.errors import DataError, HeiindexError
from heiindex.hamming import hamming_candidates
from heiindex.index import Index
from heiindex.index_manifest import read_sharded_manifest, sharded_manifest
from heiindex.packed import PackedWords
from heiindex.shards import ShardedIndex, build_shards, shard_bounds, write_shards
from heiindex.store import SplitStore

QUERIES = ["a dog on the grass", "a man riding a motorcycle", "a red bus on the street", "two cats"]
SHARDS = 3  # 24 images -> 8 per shard, 40 captions per shard


@pytest.fixture(scope="module")
def index(pipe):
    return Index.open(pipe.index_dir)


@pytest.fixture(scope="module")
def sharded(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "test"
    return build_shards(pipe.root, "test", pipe.model_dir, pipe.hash_dir, out, SHARDS, index_type="flat")


def test_a_sharded_index_says_what_it_is_and_refuses_pickling_by_name(sharded):
    index = sharded  # as build_shards opens it
    bits = index.shards[0].hasher.module.config.bits
    assert repr(index) == (
        f"<ShardedIndex {str(index.path)!r}: split 'test', 24 images, 120 captions in 3 shards, {bits}-bit codes, cpu, float32>"
    )
    with pytest.raises(TypeError, match=r"^an opened ShardedIndex cannot be pickled or copied .*ShardedIndex.open\("):
        pickle.dumps(index)


def test_the_unsharded_bench_points_to_the_sharded_one(sharded):
    from heiindex.bench import run_bench

    with pytest.raises(HeiindexError, match="bench a sharded build with run_sharded_bench"):
        run_bench(sharded)  # an AttributeError on caption_image


def test_layout_and_manifest(sharded, index):
    m = json.loads((sharded.path / "manifest.json").read_text())
    assert m["kind"] == "sharded" and m["split"] == "test" and sharded_manifest(sharded.path) == m
    assert [e["store_rows"] for e in m["shards"]] == [[0, 8], [8, 16], [16, 24]]
    assert (m["n_images"], m["n_captions"]) == (24, 120)
    ids = []
    for e, shard in zip(m["shards"], sharded.shards, strict=True):
        assert (sharded.path / e["path"] / "images.faiss").exists()  # self-contained
        assert (shard.n_images, shard.n_captions) == (8, 40)
        assert set(shard.caption_image_ids) == set(shard.image_ids)  # an image's captions sit with it
        ids.extend(shard.image_ids)
    np.testing.assert_array_equal(ids, index.image_ids)
    assert m["matcher"] == index.manifest["matcher"] and m["hash"] == index.manifest["hash"]


def _pairs(result):
    return [(h.id, round(h.score, 5)) for h in result.results]


@pytest.mark.parametrize("text", QUERIES)
def test_candidates_at_least_the_shard_size_give_the_exhaustive_top_k(sharded, index, text):
    got = sharded.search(text, k=10, candidates=8)  # 8 = every image of a shard
    want = index.search(text, k=10, candidates=24)  # every image: exhaustive
    assert _pairs(got) == _pairs(want)
    assert got.candidates == want.candidates == 24  # 8 from each of 3 shards
    assert [h.rank for h in got.results] == list(range(1, 11))
    assert got.results[0].captions == want.results[0].captions


@pytest.mark.parametrize("text", QUERIES)
def test_fewer_candidates_merge_the_union_and_are_never_worse(sharded, index, text):
    n, k = 4, 4
    got, want = sharded.search(text, k=k, candidates=n), index.search(text, k=k, candidates=n)
    assert (got.candidates, want.candidates) == (3 * n, n)  # flat shards: n each, all re-ranked
    # rank by rank, the merged scores are at least the unsharded ones (superset of candidates)
    for a, b in zip(got.results, want.results, strict=True):
        assert a.score >= b.score - 1e-6
    # the merged top-k are exactly the best-scored of the union of the shards' Hamming top-n
    code = index.hasher.module.caption_codes(*pf.encoded_text(index, text))
    union = set()
    for shard in sharded.shards:
        _, top = hamming_candidates(shard.image_index, code, n)
        union |= set(shard.image_ids[top[0]].tolist())
    exact = {h.id: h.score for h in index.search(text, k=24, candidates=24).results}  # every image scored
    best = sorted(union, key=lambda i: -exact[i])[:k]
    assert [h.id for h in got.results] == best
    assert [h.score for h in got.results] == pytest.approx([exact[i] for i in best], rel=1e-6)


def test_search_many_over_shards_answers_each_query_as_search_does(sharded):
    got = list(sharded.search_many(QUERIES, k=6, candidates=4, batch=3))  # 2 batches, the last one short
    assert [r.query for r in got] == QUERIES
    for res, text in zip(got, QUERIES, strict=True):
        pf.assert_same_answer(res, sharded.search(text, k=6, candidates=4))
    with pytest.raises(HeiindexError, match=r"^1 of 2 queries refused \(nothing was searched\): query 2: the query"):
        sharded.search_many(["a dog", " "], k=3, candidates=4)
    with pytest.raises(HeiindexError, match="^k 13 is larger than the 12 candidates the shards return together$"):
        sharded.search_many(QUERIES, k=13, candidates=4)


def test_search_images_over_shards_answers_each_image_as_search_image_does(sharded, index):
    # images of all three shards; the first batch holds shards 1, 2, 0: their features, gathered
    # shard by shard, must be put back in the batch's order
    ids = [int(i) for i in index.image_ids[[12, 23, 1, 8]]]
    got = list(sharded.search_images(ids, k=6, candidates=12, batch=3))
    assert [r.query for r in got] == ids
    for res, image_id in zip(got, ids, strict=True):
        pf.assert_same_answer(res, sharded.search_image(image_id, k=6, candidates=12))
    with pytest.raises(
        HeiindexError, match=r"^2 of 3 image ids are not in this index \(ids 0..23\); nothing was searched: 500, 600$"
    ):
        sharded.search_images([ids[0], 500, 600], k=3, candidates=4)


def test_image_queries_over_shards_search_with_each_images_stored_code(pipe, tmp_path):
    sharded = build_shards(pipe.root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "s", SHARDS, index_type="flat")
    owner = sharded.shards[1]
    codes = owner.image_codes().copy()
    owner._image_codes[2] = codes[0]  # a stand-in code for the image at row 2 of shard 1
    ids = [int(owner.image_ids[2]), int(sharded.shards[0].image_ids[4])]
    got = list(sharded.search_images(ids, k=40, candidates=40))
    caption_codes = np.concatenate([s.caption_codes() for s in sharded.shards])
    caption_ids = np.concatenate([s.caption_ids for s in sharded.shards])
    for res, code in zip(got, (codes[0], sharded.shards[0].image_codes()[4]), strict=True):
        assert [h.hamming for h in res.results] == pf.hamming_of_hits(caption_ids, caption_codes, code, res)


def test_cli_query_file_on_a_sharded_build(sharded, tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(QUERIES) + "\n")
    got = json_lines(
        run("query", "--file", queries, "--index", sharded.path, "--k", "3", "--candidates", "4", "--json")
    )
    assert got == [res.to_dict() for res in sharded.search_many(QUERIES, k=3, candidates=4)]


@pytest.mark.parametrize("image_id", [0, 9, 23])
def test_search_image_over_shards_matches_exhaustive(pipe, sharded, index, image_id):
    image_id = int(index.image_ids[image_id])
    got = sharded.search_image(image_id, k=10, candidates=40)  # every caption of each shard
    want = index.search_image(image_id, k=10, candidates=120)
    assert _pairs(got) == _pairs(want)
    assert [h.text for h in got.results] == [h.text for h in want.results]


def test_errors(pipe, sharded, tmp_path):
    with pytest.raises(HeiindexError, match=r"^shards must lie in \[1, 24\]"):
        build_shards(pipe.root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "x", 25)
    assert not (tmp_path / "x").exists()  # nothing written half-way
    with pytest.raises(HeiindexError, match=r"^image id 10000 is not in this index \(ids 0..23\)$"):
        sharded.search_image(10_000)
    with pytest.raises(HeiindexError, match="larger than the 24 images"):
        sharded.search("a dog", k=5, candidates=25)
    with pytest.raises(HeiindexError, match="is a sharded build"):
        Index.open(sharded.path)
    assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match=f"shards must be a whole number, got {bad}"):
            shard_bounds(10, bad)
    with pytest.raises(HeiindexError, match=r"^shards must lie in \[1, 10\]"):
        shard_bounds(10, 0)


def test_a_full_disk_in_a_shard_names_the_shard_under_out(pipe, tmp_path, monkeypatch):
    """Each shard is written inside the build's scratch folder: a full disk named that scratch."""
    import heiindex.index_write as index_write

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(index_write, "write_caption_features", full)
    out = tmp_path / "s"
    with pytest.raises(DataError) as info:
        write_shards(pipe.root, "test", pipe.model_dir, pipe.hash_dir, out, SHARDS, index_type="flat")
    assert str(info.value).startswith(f"{out / 'shard-000'}: could not be written: no space left on its disk")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", QUERIES[:2])
def test_more_candidates_than_one_shard_holds_cap_each_shard_at_its_size(sharded, index, text):
    """N = 12 over shards of 8 images (40 captions): each shard scores all it holds, so the merge
    is exhaustive attention's top-k (the total, 24 images / 120 captions, bounds N)."""
    want = _pairs(index.search(text, k=10, candidates=24))
    assert _pairs(sharded.search(text, k=10, candidates=12)) == want
    assert [_pairs(r) for r in sharded.search_many([text], k=10, candidates=12)] == [want]
    image_id = int(index.image_ids[5])
    got = sharded.search_image(image_id, k=10, candidates=60)
    assert _pairs(got) == _pairs(index.search_image(image_id, k=10, candidates=120))


def test_write_shards_reads_the_captions_once_and_each_shard_its_own_rows(pipe, tmp_path, monkeypatch):
    calls = {"captions": 0, "rows": []}
    read_captions, read_blocks = SplitStore.captions, SplitStore.iter_image_blocks

    def captions(self):
        calls["captions"] += 1
        return read_captions(self)

    def blocks(self, block_images=256, start=0, stop=None):
        calls["rows"].append((start, stop))
        return read_blocks(self, block_images, start, stop)

    monkeypatch.setattr(SplitStore, "captions", captions)
    monkeypatch.setattr(SplitStore, "iter_image_blocks", blocks)
    m = write_shards(pipe.root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "s", SHARDS, index_type="flat")
    assert calls == {"captions": 1, "rows": [(0, 8), (8, 16), (16, 24)]}
    assert [(e["n_images"], e["n_captions"]) for e in m["shards"]] == [(8, 40)] * 3
    store = SplitStore.open(pipe.root, "test")
    few = read_captions(store).subset(np.arange(120) < 5)
    dev = read_captions(SplitStore.open(pipe.root, "dev"))  # as many captions as test, other ones
    assert len(dev) == len(read_captions(store))
    for wrong in (few, dev):
        with pytest.raises(HeiindexError, match=rf"captions given \({len(wrong)}\) are not all the captions of store"):
            Index.write(pipe.root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "x", captions=wrong)
        assert not (tmp_path / "x").exists()


def test_the_manifest_tells_sharded_from_unsharded(pipe, sharded, tmp_path):
    assert sharded_manifest(pipe.index_dir) is None  # an unsharded index
    assert read_sharded_manifest(sharded.path) == sharded.manifest
    with pytest.raises(DataError, match=r"index-test/manifest.json: the index here is not a sharded build"):
        read_sharded_manifest(pipe.index_dir)
    with pytest.raises(DataError, match=r"nothing: no such folder; give a folder `heiindex build` wrote"):
        sharded_manifest(tmp_path / "nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    for text, detail in (
        ("{", r"bad/manifest.json: not valid JSON"),
        ("[1]", r"bad/manifest.json: must hold a JSON object, got list"),
        ('{"kind": "sharded", "format_version": 9}', r"sharded build of format_version 9, expected 1"),
    ):
        (bad / "manifest.json").write_text(text)
        with pytest.raises(DataError, match=detail):
            sharded_manifest(bad)
        if "sharded" not in text:  # one reader for both kinds: Index.open says the same
            with pytest.raises(DataError, match=detail):
                Index.open(bad)


def test_sharded_bench_candidate_recall_is_that_of_each_shards_own_candidates(sharded):
    """Below a shard's size (N = 3 of 8 images, 40 captions): the bench's candidate recall is the
    union of each shard's own top-N, recomputed here from every shard hashing the queries itself
    (the bench uses the stored codes). What this checks is the merge and the ground-truth count;
    each shard's top-N search is the one the other tests here check against exhaustive scores."""
    res = run_sharded_bench(sharded, 3)
    words = PackedWords.cat([s.words for s in sharded.shards])
    regions, gram = torch.cat([s.regions for s in sharded.shards]), torch.cat([s.gram for s in sharded.shards])
    image_ids = np.concatenate([s.image_ids for s in sharded.shards])
    caption_image_ids = np.concatenate([s.caption_image_ids for s in sharded.shards])
    t2i, i2t = np.zeros(len(caption_image_ids), bool), np.zeros(len(image_ids), bool)
    for s in sharded.shards:
        found = s.candidates_for_captions(words, words.lengths, 3)  # codes=None: hashed here
        t2i |= (s.image_ids[found.ids] == caption_image_ids[:, None]).any(axis=1)
        found = s.candidates_for_images(regions, gram, 3)
        i2t |= (s.caption_image_ids[found.ids] == image_ids[:, None]).any(axis=1)
    assert 0 < t2i.mean() < 1 and 0 < i2t.mean() < 1
    assert res["t2i"]["candidate_recall"] == pytest.approx(t2i.mean(), abs=1e-12)
    assert res["i2t"]["candidate_recall"] == pytest.approx(i2t.mean(), abs=1e-12)


def test_cli_build_and_query_sharded(pipe, sharded, index, tmp_path, monkeypatch):
    from heiindex import ray_engine

    out = tmp_path / "cli-shards"
    r = ok(build(pipe, out, "--shards", "2"))
    assert f"built test: 24 images, 120 captions in 2 shards (12, 12 images) -> {out}" in r.output
    r = ok(build(pipe, tmp_path / "one-shard", "--shards", "1"))  # it said "in 1 shards"
    assert f"built test: 24 images, 120 captions in 1 shard (24 images) -> {tmp_path / 'one-shard'}" in r.output
    r = ok(build(pipe, tmp_path / "one-image-shards", "--shards", "24"))  # each shard's size read "1 images"
    sizes = ", ".join(["1"] * 24)
    assert f"in 24 shards ({sizes} image) -> {tmp_path / 'one-image-shards'}" in r.output
    r = ok(run("query", "a dog", "--index", out, "--candidates", "12"))  # its footer said "Hamming top-12"
    assert "ms (Hamming top-12 from each shard, re-ranked by the matcher)" in r.output
    got = as_json(run("query", "a dog", "--index", out, "--candidates", "12", "--json"))
    want = index.search("a dog", k=10, candidates=24).to_dict()
    assert [(h["id"], round(h["score"], 5)) for h in got["results"]] == [
        (h["id"], round(h["score"], 5)) for h in want["results"]
    ]
    d = as_json(run("bench", "--index", out, "--topk", "12", "--json"))
    assert _no_seconds(d) == _no_seconds(run_sharded_bench(ShardedIndex.open(out), 12))
    assert d["shards"] == 2 and d["engine"] == "ShardedIndex"
    assert set(d["t2i"]) == {"hei", "hamming", "candidate_recall", "candidate_slots", "candidates_found"}
    assert d["t2i"]["candidate_slots"] == d["t2i"]["candidates_found"] == 24  # 12 from each shard
    with monkeypatch.context() as m:  # refused before any shard is read, or any Ray actor started
        pf.forbid(m, "shards read before --sweep was refused", (ShardedIndex, "open"))
        pf.forbid(m, "Ray started before --sweep was refused", (ray_engine, "RayShardedIndex"))
        for engine in ("local", "ray"):
            r = run("bench", "--index", out, "--topk", "12", "--sweep", "5,10", "--engine", engine)
            clean_error(r, "--sweep runs on an unsharded build, in this process")
            r = run("bench", "--index", out, "--topk", "12", "--protocol", "1k", "--engine", engine)  # was ignored
            clean_error(r, "--protocol 1k runs on an unsharded build")
        r = run("query", "a dog", "--index", out, "--uri", "http://127.0.0.1:1")  # was ignored
        clean_error(r, "is a sharded build: its shards keep their codes in FAISS files")
    # the tables (they failed on the Hamming row, which has no seconds of its own here)
    text = ok(run("bench", "--index", out, "--topk", "12")).output
    assert "test (2 shards, ShardedIndex): text-to-image (24 images, 120 captions, N = 12 from each shard)" in text
    # the merged candidates: 12 from each of the 2 shards (it read @12, beside 24 re-ranked)
    assert "image-to-text" in text and text.count("candidate recall@24: ") == 2 and "candidate recall@12" not in text
    assert text.count("(Hamming: the merged candidates ranked by distance, searched in HEI's time)") == 2
    hamming_rows = [line for line in text.splitlines() if "hamming" in line]
    assert len(hamming_rows) == 2 and all(line.rstrip(" │|").endswith("-") for line in hamming_rows), hamming_rows
    r = run("bench", "--index", out, "--topk", "121")
    clean_error(r, "--topk 121 must lie in [1, 120] for this index (its images or captions)")
    # an N above a shard's size says so: it read as 13 candidates from each of two 12-image shards
    r = ok(run("query", "a dog", "--index", out, "--candidates", "13"))
    assert "(Hamming top-13 from each shard, at most its size (12 images), re-ranked by the matcher)" in r.output
    d = as_json(run("bench", "--index", out, "--topk", "13", "--json"))
    assert (d["shard_images"], d["shard_captions"]) == ([12, 12], [60, 60])
    # how the shards searched, as an unsharded bench gives it of its one index
    assert (d["bits"], d["index_type"], d["device"], d["dtype"]) == (32, ["flat"] * 2, ["cpu"] * 2, ["float32"] * 2)
    assert len(d["threads"]) == 2 and all(t >= 1 for t in d["threads"])
    text = ok(run("bench", "--index", out, "--topk", "13")).output
    assert "text-to-image (24 images, 120 captions, N = 13 from each shard, at most its size (12 images))" in text
    assert "image-to-text (24 images, 120 captions, N = 13 from each shard)" in text


def _no_seconds(res: dict) -> dict:
    res = json.loads(json.dumps(res))
    res["warmup_seconds"] = None
    for direction in ("t2i", "i2t"):
        for method in ("hei", "hamming"):
            res[direction][method]["seconds"] = None
    return res


def test_sharded_bench_with_every_item_a_candidate_is_exhaustive(pipe, sharded):
    """With N at least a shard's size every shard scores all its items: HEI's R@K over the
    merged shards are exhaustive attention's (from the unsharded bench)."""
    from heiindex.bench import run_bench

    full = run_bench(Index.open(pipe.index_dir), topk=24)
    res = run_sharded_bench(sharded, topk=8)  # 8 images, 40 captions per shard
    assert res["t2i"]["candidate_recall"] == 1.0
    for key in ("r1", "r5", "r10", "medr", "meanr"):
        assert res["t2i"]["hei"][key] == pytest.approx(full["t2i"]["exhaustive"][key])
    res = run_sharded_bench(sharded, topk=40)
    assert res["i2t"]["candidate_recall"] == 1.0
    for key in ("r1", "r5", "r10", "medr", "meanr"):
        assert res["i2t"]["hei"][key] == pytest.approx(full["i2t"]["exhaustive"][key])
    with pytest.raises(HeiindexError, match=r"^topk 0 must lie in \[1, 120\]"):
        run_sharded_bench(sharded, topk=0)
    with pytest.raises(HeiindexError, match=r"^topk must be a whole number, got 2\.5"):
        run_sharded_bench(sharded, topk=2.5)
    assert run_sharded_bench(sharded)["candidates"] == 100  # the default: 100, within the 120 captions


def test_sharded_bench_hashes_no_stored_item(sharded, monkeypatch):
    """The sharded bench's queries are the shards' stored items: every shard searches with the
    codes each shard's FAISS files hold, read when opened, instead of hashing any query again."""
    from heiindex.hashing import HashModule

    calls = {"caption_codes": [], "image_codes": []}  # items hashed per call
    for name in calls:
        real = getattr(HashModule, name)

        def counted(self, items, *args, _real=real, _name=name, **kwargs):
            calls[_name].append(len(items))
            return _real(self, items, *args, **kwargs)

        monkeypatch.setattr(HashModule, name, counted)
    fresh = ShardedIndex.open(sharded.path)
    run_sharded_bench(fresh, topk=5)
    run_sharded_bench(fresh, topk=6)
    assert calls == {"caption_codes": [], "image_codes": []}


def test_the_sharded_bench_warms_up_on_a_few_queries_first(sharded, monkeypatch):
    """As the unsharded bench: an untimed pass of the first queries of each direction (enough
    that each shard's pairs take the timed passes' scoring path), then the timed passes, whose
    figures it does not change; ``warmup=False`` skips it."""
    from heiindex.bench import warmup_queries

    calls = []
    for name in ("bench_captions", "bench_images"):
        real = getattr(ShardedIndex, name)

        def spy(self, n, queries=None, _real=real, _name=name):
            got = _real(self, n, queries)
            calls.append((_name, n, queries, len(got[0].ids)))  # the queries the first shard answered
            return got

        monkeypatch.setattr(ShardedIndex, name, spy)
    res = run_sharded_bench(sharded, topk=5)  # 3 shards of 8 images, 40 captions: 120 captions, 24 images
    want = warmup_queries(5)  # 103
    assert calls == [
        ("bench_captions", 5, want, want),
        ("bench_images", 5, want, 24),  # every image: fewer than asked
        ("bench_captions", 5, None, 120),
        ("bench_images", 5, None, 24),
    ]
    assert res["warmup_seconds"] > 0
    calls.clear()
    cold = run_sharded_bench(sharded, topk=5, warmup=False)
    assert [c[2] for c in calls] == [None, None] and cold["warmup_seconds"] is None
    assert _no_seconds(res) == _no_seconds(cold)


def test_build_index_writes_either_kind_and_checks_every_setting_first(pipe, tmp_path, monkeypatch):
    """What `heiindex build` does, for a Python user: a sharded or a single build, every refusal
    before anything is written (and before the default data could be generated)."""
    import heiindex.builds
    import heiindex.default_data
    from heiindex.builds import build_index

    models = (pipe.model_dir, pipe.hash_dir)
    out, manifest = build_index("test", pipe.root, *models, tmp_path / "two", 2, index_type="flat")
    assert out == tmp_path / "two" and len(manifest["shards"]) == 2
    assert isinstance(open_index(out), ShardedIndex)
    with monkeypatch.context() as m:
        pf.forbid(m, "written", (Index, "write"), (heiindex.builds, "write_shards"))
        pf.forbid(m, "generated", (heiindex.default_data, "ensure_coco_sim"))
        for kwargs, message in (
            (
                {"store_root": pipe.root},
                "needs `out`, an index folder: without it the index would replace the default data's",
            ),
            ({"shards": 2, "codes": "milvus", "uri": "http://127.0.0.1:1"}, "`codes` milvus is for an unsharded build"),
            ({"index_type": "ivf", "nlist": 0}, "nlist"),
            ({"device": "tpu"}, "device"),
            (  # was refused by upload_codes, after the whole encoding
                {"codes": "milvus", "uri": "http://127.0.0.1:1", "milvus_index": "HNSW"},
                "milvus_index must be one of ('BIN_FLAT', 'BIN_IVF_FLAT'), got 'HNSW'",
            ),
            (  # was accepted and ignored: the codes went to FAISS files (the CLI refused it)
                {"milvus_index": "BIN_IVF_FLAT"},
                "milvus_index 'BIN_IVF_FLAT' sets the index type of `codes` milvus; the codes go to FAISS files",
            ),
            ({"shards": 2, "milvus_index": "BIN_FLAT"}, "sets the index type of `codes` milvus"),
        ):
            with pytest.raises(HeiindexError, match=re.escape(message)):
                build_index("test", matcher=pipe.model_dir, hasher=pipe.hash_dir, **kwargs)


def test_open_index_opens_either_kind_and_the_last_build_by_default(pipe, sharded, monkeypatch):
    """What `heiindex query` / `bench` open, for a Python user: Index.open(sharded) is refused
    ("open it with ShardedIndex"), and Index.open(None) was the only way to ask for the last build."""
    import heiindex.default_data

    assert isinstance(open_index(pipe.index_dir), Index)
    got = open_index(sharded.path, nprobe=None)
    assert isinstance(got, ShardedIndex) and got.n_images == sharded.n_images
    with pytest.raises(HeiindexError, match="is a sharded build: its shards keep their codes in FAISS files"):
        open_index(sharded.path, codes="milvus", uri="http://127.0.0.1:1")
    with pytest.raises(HeiindexError, match="^codes must be 'faiss' or 'milvus', got 'bogus'"):
        open_index(sharded.path, codes="bogus")  # accepted, where Index.open refuses it
    with pytest.raises(HeiindexError, match="^path must be a path"):
        open_index("")  # "" opened the current folder
    monkeypatch.setattr(heiindex.default_data, "last_built_index", lambda: sharded.path)
    assert isinstance(open_index(), ShardedIndex)


def test_a_batch_of_text_queries_is_hashed_once_for_every_shard(sharded, monkeypatch):
    """The shards share one hash module: each of the 3 hashed the same batch again."""
    from heiindex.hashing import HashModule

    calls = []
    real = HashModule.caption_codes

    def counted(self, words, lengths, *args):
        calls.append(len(lengths))
        return real(self, words, lengths, *args)

    monkeypatch.setattr(HashModule, "caption_codes", counted)
    got = list(sharded.search_many(QUERIES, k=3, candidates=5, batch=3))
    assert calls == [3, 1] and len(got) == len(QUERIES)  # two batches, each hashed once


def test_first_counts_takes_the_first_items_from_the_first_parts():
    from heiindex.shards import first_counts

    assert first_counts([12, 12], 7) == [7, 0]
    assert first_counts([12, 12], 12) == [12, 0]
    assert first_counts([12, 12], 13) == [12, 1]
    assert first_counts([5, 0, 4], 8) == [5, 0, 3]
    assert first_counts([12, 12], 103) == [12, 12]
    assert first_counts([12, 12], None) == [12, 12]
    assert first_counts([12, 12], 0) == [0, 0]


@pytest.mark.parametrize("queries", [7, 70])
def test_the_sharded_warm_up_answers_its_queries_as_the_full_pass_does(sharded, monkeypatch, queries):
    """The warm-up's first queries come from the first shards only (7 captions: 7 of shard 0's
    40; 70: all of shard 0's and 30 of shard 1's, none of shard 2's), and every shard answers
    them as it answers the same queries in the full pass. The full pass copies no shard's words
    into one tensor of the split's (it did: twice the caption features' memory)."""

    def no_copy(parts):
        raise AssertionError("the shards' words were concatenated")

    monkeypatch.setattr(PackedWords, "cat", no_copy)
    full = {name: getattr(sharded, name)(5) for name in ("bench_captions", "bench_images")}
    for name, n_items in (("bench_captions", 120), ("bench_images", 24)):  # every query, per shard
        assert [len(f.ids) for f in full[name]] == [n_items] * 3
    selected = []
    real = PackedWords.select

    def spy(self, rows):
        got = real(self, rows)
        selected.append((len(rows), got is self))
        return got

    monkeypatch.setattr(PackedWords, "select", spy)
    for name, n_items in (("bench_captions", 120), ("bench_images", 24)):
        want = min(queries, n_items)
        got = getattr(sharded, name)(5, queries)
        for g, f in zip(got, full[name], strict=True):
            assert len(g.ids) == want
            np.testing.assert_array_equal(g.ids, f.ids[:want])
            np.testing.assert_allclose(g.scores, f.scores[:want], rtol=0, atol=1e-6)
            np.testing.assert_array_equal(g.hamming, f.hamming[:want])
    # a whole shard's words are its own (select gives them back uncopied); a part is copied
    assert selected == ([(7, False)] if queries == 7 else [(40, True), (30, False)])


def test_ray_texts_are_checked_in_this_process_where_the_vocabulary_can_be_read(pipe, sharded, tmp_path):
    """heiindex.ray_engine.check_texts refuses what the actors would refuse, before Ray starts;
    with the recorded matcher gone and no model_dir it checks nothing (the actors will)."""
    import shutil

    from heiindex.ray_engine import check_texts

    with pytest.raises(
        HeiindexError, match=r"q\.txt line 2: no word of the query is in the model's vocabulary: xyzzyq"
    ):
        check_texts(sharded.path, ["a dog", "xyzzyq"], lambda i: f"q.txt line {i + 1}")
    check_texts(sharded.path, ["a dog"])
    moved = tmp_path / "moved"
    shutil.copytree(sharded.path, moved / "test")
    manifest_path = moved / "test" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["matcher"]["path"] = str(tmp_path / "gone")
    manifest_path.write_text(json.dumps(manifest))
    check_texts(moved / "test", ["xyzzyq"])  # nothing to check against here
    with pytest.raises(HeiindexError, match="no word of the query is in the model's vocabulary: xyzzyq"):
        check_texts(moved / "test", ["xyzzyq"], model_dir=pipe.model_dir)


def test_an_unsharded_index_is_refused_before_ray_is_needed(pipe, monkeypatch):
    """Where Ray is not installed (so outside test_ray.py, which skips then), an unsharded index
    is still refused as such: the manifest is read before Ray is imported."""
    import heiindex.ray_engine as engine

    def no_ray():
        raise HeiindexError("the Ray engine needs Ray: pip install 'heiindex[ray]'")

    monkeypatch.setattr(engine, "_ray", no_ray)
    with pytest.raises(DataError, match="the index here is not a sharded build"):
        engine.RayShardedIndex(pipe.index_dir)
    # stopping looks for the path's actors whatever the folder holds now: an unsharded index
    # built over a served sharded one left its actors running, out of reach of --stop
    with pytest.raises(HeiindexError, match="the Ray engine needs Ray"):
        engine.stop_served(pipe.index_dir, None)


class _TwoShards:
    """A bench engine of two shards with uneven captions: shard 0 holds images 10 (captions 0-2)
    and 11 (caption 3), shard 1 image 12 (caption 4). Its candidates are made up: each caption's
    own image and each image's own caption come first, from the shard holding it."""

    manifest, path, sharded = {"split": "test"}, "two-shards", True

    def bench_metas(self):
        how = {
            "bits": 16,
            "index_type": "flat",
            "search_breadth": {},
            "threads": 1,
            "device": "cpu",
            "dtype": "float32",
        }
        return [
            {"image_ids": np.array([10, 11]), "caption_image_ids": np.array([10, 10, 10, 11]), **how},
            {"image_ids": np.array([12]), "caption_image_ids": np.array([12]), **how},
        ]

    def bench_captions(self, n):  # 5 caption queries, one candidate per shard (local rows)
        own = (np.array([[0], [0], [0], [1], [0]]), np.array([[1.0], [1.0], [1.0], [1.0], [-1.0]]), np.zeros((5, 1)))
        other = (np.zeros((5, 1), int), np.array([[-1.0], [-1.0], [-1.0], [-1.0], [1.0]]), np.zeros((5, 1)))
        return [own, other]

    def bench_images(self, n):  # 3 image queries; image 12's caption is row 0 of shard 1, global row 4
        own = (np.array([[0], [3], [0]]), np.array([[1.0], [1.0], [-1.0]]), np.zeros((3, 1)))
        other = (np.array([[0], [0], [0]]), np.array([[-1.0], [-1.0], [1.0]]), np.zeros((3, 1)))
        return [own, other]


def test_sharded_bench_offsets_rows_by_each_shards_own_counts_and_times_each_direction(monkeypatch):
    """Shard 1's caption rows start after shard 0's 4 captions (not 2 images x 5), and each
    direction is timed by its own clock readings."""
    import heiindex.bench as bench_module

    monkeypatch.setattr(bench_module, "time", pf.fake_clock(0, 1, 10, 13))
    with pytest.raises(HeiindexError, match="^warmup must be true or false, got 'no'"):
        run_sharded_bench(_TwoShards(), topk=1, warmup="no")  # "no" ran the warm-up
    out = run_sharded_bench(_TwoShards(), topk=1, warmup=False)  # the fake clock's readings are the timed passes'
    for direction in ("t2i", "i2t"):
        assert out[direction]["candidate_recall"] == 1.0 and out[direction]["hei"]["r1"] == 100.0, direction
    assert (out["t2i"]["hei"]["seconds"], out["i2t"]["hei"]["seconds"]) == (1, 3)


def test_equal_scores_merge_as_one_index_orders_them():
    """Ties: the smaller Hamming distance first, then the earlier shard; before, the earlier shard
    first whatever the distances, so a sharded and an unsharded build cut a tie differently (a
    review found 3005 and 758, equal to the last bit, swapped)."""
    from heiindex.index import Hit, Hits
    from heiindex.shards import merge_hits

    first = Hits([Hit(1, 10, 0.9, 40), Hit(2, 11, 0.5, 7), Hit(3, 12, 0.5, 7)], candidates=5)
    second = Hits([Hit(1, 20, 0.5, 3), Hit(2, 21, 0.5, 7), Hit(3, 22, 0.1, 1)], candidates=4)
    merged = merge_hits([first, second], 6)
    assert [h.id for h in merged] == [10, 20, 11, 12, 21, 22]
    assert [h.rank for h in merged] == list(range(1, 7))
    assert [h.id for h in merge_hits([first, second], 3)] == [10, 20, 11]
    assert merged.candidates == 9  # the shards' candidates, summed (as many were re-ranked)
    # an actor that an older heiindex's `serve` started sends plain lists: no count, not a crash
    old = merge_hits([first, list(second)], 6)
    assert [h.id for h in old] == [10, 20, 11, 12, 21, 22] and old.candidates is None


def test_hits_keep_their_candidate_count_through_pickling():
    """Ray sends each shard's hits to the driver pickled: a count lost on the way would read as 0."""
    import pickle

    from heiindex.index import Hit, Hits

    hits = Hits([Hit(1, 10, 0.9, 40, text="a dog")], candidates=37)
    back = pickle.loads(pickle.dumps(hits))
    assert isinstance(back, Hits) and back == hits and back.candidates == 37
    assert repr(back) == "Hits([Hit(rank=1, id=10, score=0.9, hamming=40, captions=None, text='a dog')], candidates=37)"


def test_merged_candidates_keep_empty_slots_empty():
    """An IVF or HNSW shard may return fewer than N (-1): shifted by the shard's offset it would
    become the previous shard's last item and could count as a hit."""
    empty = np.zeros((1, 2))
    rows, _, _ = _merge_candidates(
        [(np.array([[0, -1]]), empty, empty), (np.array([[1, -1]]), empty, empty)], [0, 2, 4]
    )
    assert rows.tolist() == [[0, -1, 3, -1]]


def test_each_shard_manifest_records_its_store_rows(sharded):
    got = [
        json.loads((sharded.path / e["path"] / "manifest.json").read_text())["store_rows"]
        for e in sharded.manifest["shards"]
    ]
    assert got == [[0, 8], [8, 16], [16, 24]]


def test_one_shard_names_k_against_what_the_shards_return(pipe, tmp_path):
    # A build of one shard is still a sharded build: its k message is the shards', as with more.
    one = build_shards(pipe.root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "one", 1, index_type="flat")
    with pytest.raises(HeiindexError, match="^k 6 is larger than the 5 candidates the shards return together$"):
        one.search("a dog", k=6, candidates=5)


def test_nlist_is_checked_for_every_shard_before_the_first_is_encoded(pipe, tmp_path, monkeypatch):
    """24 images in 5 shards: one of them holds 4 images, the others 5. ``--nlist 5`` fits all but
    that one, which was found only after the shards before it had been encoded and hashed."""
    from heiindex import shards

    (a, b), *_ = [(a, b) for a, b in shards.shard_bounds(24, 5) if b - a == 4]
    assert a > 0  # a shard that the old check reached only after others
    pf.forbid(monkeypatch, "a shard was encoded before --nlist was checked for all of them", (shards.Index, "write"))
    with pytest.raises(
        HeiindexError, match=rf"^nlist 5 exceeds the 4 images to index in its shard \(image rows {a} to {b - 1};"
    ):
        shards.write_shards(
            pipe.root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "s", 5, index_type="ivf", nlist=5
        )
    assert not (tmp_path / "s").exists()


def test_a_shard_whose_images_have_few_captions_is_refused_before_any_is_encoded(pipe, tmp_path, monkeypatch):
    """A store may hold images that no caption describes: a shard can then have fewer captions
    than --nlist while it has enough images. That was found after every shard was encoded, by a
    FAISS-level ValueError that named no shard."""
    from heiindex import shards

    root = pf.copy_store(pipe, tmp_path)
    ids = SplitStore.open(root, "test").image_id_column()
    (a, b), *_ = [(a, b) for a, b in shards.shard_bounds(24, 4) if a > 0]  # a shard after the first: 6 images
    keep = ids[a]  # its first image keeps 2 of its captions; the rest of its captions describe image ids[0]

    def move(image_ids):
        inside = np.isin(image_ids, ids[a:b])
        inside[np.flatnonzero(image_ids == keep)[:2]] = False
        image_ids[inside] = ids[0]

    pf.edit_column(root / "test" / "captions.parquet", "image_id", move)

    pf.forbid(monkeypatch, "a shard was encoded before --nlist was checked for all of them", (shards.Index, "write"))
    with pytest.raises(
        HeiindexError, match=rf"^nlist 5 exceeds the 2 captions to index in its shard \(image rows {a} to {b - 1};"
    ):
        shards.write_shards(root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "s", 4, index_type="ivf", nlist=5)
    monkeypatch.undo()
    with pytest.raises(
        HeiindexError, match=rf"^nlist 5 exceeds the 2 captions to index in its shard \(image rows {a} to {b - 1};"
    ):
        Index.write(
            root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "one", index_type="ivf", nlist=5, image_rows=(a, b)
        )


def test_a_shard_with_no_captions_is_named_as_such_without_an_nlist():
    """With no --nlist given, the message said '--nlist 1 exceeds the 0 captions'."""
    from heiindex.index_write import check_lists_filled

    with pytest.raises(
        HeiindexError,
        match=r"^no captions to index in its shard \(image rows 6 to 11\): an IVF index needs some \(`index_type` flat, or fewer shards\)$",
    ):
        check_lists_filled("ivf", None, None, {"images": 6, "captions": 0}, (6, 12))
    with pytest.raises(HeiindexError, match=r"^nlist 2 exceeds the 1 captions to index in its shard"):
        check_lists_filled("ivf", 2, None, {"images": 6, "captions": 1}, (6, 12))


def test_an_index_written_over_a_shard_is_refused(pipe, sharded, tmp_path):
    """A plain build over shard-001 was accepted, the sharded build then served every image of the
    split twice over (202 and 321 twice in a top 6), and verify passed it."""
    import shutil

    from heiindex.verify import verify

    build_dir = tmp_path / "s"
    shutil.copytree(sharded.path, build_dir)
    with pytest.raises(DataError, match=f"is shard shard-001 of the sharded build {build_dir}: build that again"):
        Index.write(pipe.root, "test", pipe.model_dir, pipe.hash_dir, build_dir / "shard-001")
    r = build(pipe, build_dir / "shard-001")
    clean_error(r, "is shard shard-001 of the sharded build")
    # a sharded build there too: it replaced the shard, and verify passed the nested build
    with pytest.raises(DataError, match=f"is shard shard-001 of the sharded build {build_dir}: build that again"):
        write_shards(pipe.root, "test", pipe.model_dir, pipe.hash_dir, build_dir / "shard-001", 2)
    clean_error(build(pipe, build_dir / "shard-001", "--shards", "2"), "is shard shard-001 of the sharded build")
    assert ShardedIndex.open(build_dir).search("a dog", 3, 4).results  # as it was
    # as an older heiindex, or a copy by hand, would have left it
    shutil.rmtree(build_dir / "shard-001")
    shutil.copytree(pipe.index_dir, build_dir / "shard-001")
    mpath = build_dir / "shard-001" / "manifest.json"
    message = f"is not the shard {build_dir / 'manifest.json'} records (store_rows [8, 16], n_images 8, n_captions 40; "
    with pytest.raises(DataError, match=re.escape(f"{mpath}: {message}it holds store_rows None, n_images 24")):
        ShardedIndex.open(build_dir)
    checks = [c for c in verify(build_dir) if c.status != "ok"]
    assert [(c.path, c.status) for c in checks] == [(mpath, "invalid")] and checks[0].detail.startswith(message)


def test_search_breadth_is_set_on_every_shard_and_an_unused_one_said_once(pipe, tmp_path):
    """--nprobe / --ef-search at query time reach each shard's indexes; a value above one shard's
    lists is refused before any is set; given to flat shards, one warning, not one a shard."""
    from heiindex.errors import UnusedSettingWarning

    out = tmp_path / "s"
    ok(build(pipe, out, "--shards", "2", "--index", "ivf", "--nlist", "3", "--nprobe", "1"))
    index = ShardedIndex.open(out, nprobe=3)
    assert index.search_breadth() == [{"images": {"nlist": 3, "nprobe": 3}, "captions": {"nlist": 3, "nprobe": 3}}] * 2
    d = as_json(run("bench", "--index", out, "--topk", "12", "--nprobe", "3", "--json"))
    assert d["search_breadth"] == index.search_breadth()
    assert d["t2i"]["candidates_found"] == 24  # every list of both shards probed: 12 from each
    with pytest.raises(HeiindexError, match=r"^nprobe 4 exceeds the 3 lists of the index of the images of .*shard-000"):
        index.set_search_breadth(nprobe=4)
    assert index.search_breadth()[1]["images"]["nprobe"] == 3  # nothing set by the refused call
    ok(build(pipe, tmp_path / "f", "--shards", "2", "--index", "flat"))
    with pytest.warns(UnusedSettingWarning, match=r"^`nprobe` 2 not used: the index searches exactly \(flat\)") as seen:
        ShardedIndex.open(tmp_path / "f").set_search_breadth(nprobe=2)
    assert len(seen) == 1 and seen[0].filename == __file__
    with pytest.warns(UnusedSettingWarning, match=r"^`nprobe` 2 not used") as seen:
        ShardedIndex.open(tmp_path / "f", nprobe=2)  # pointed at heiindex/shards.py
    with pytest.warns(UnusedSettingWarning, match=r"^`nprobe` 2 not used") as more:
        Index.open(tmp_path / "f" / "shard-000", nprobe=2)  # and heiindex/index.py
    with pytest.warns(UnusedSettingWarning, match=r"^`nprobe` 2 not used") as more2:
        Index.open(tmp_path / "f" / "shard-000").set_search_breadth(nprobe=2)
    with pytest.warns(UnusedSettingWarning, match=r"^`nprobe` 2 not used") as more3:
        open_index(tmp_path / "f", nprobe=2)  # the README's entry point: it pointed at heiindex/builds.py
    assert [w.filename for w in (*seen, *more, *more2, *more3)] == [__file__] * 4


def test_a_split_ingested_again_during_a_sharded_build_is_refused(pipe, tmp_path, monkeypatch):
    """Each shard reads the split again: an ingest between two shards built them from two contents,
    and the build, open and verify passed it (a reviewer's query for image 900 got image 99's
    captions). The build now compares every shard's store data with what it began with."""
    import heiindex.shards

    real, built = heiindex.shards.Index.write, []

    def second_reads_other_data(*args, **kwargs):
        manifest = real(*args, **kwargs)
        built.append(1)
        if len(built) == 2:  # as if the split had been ingested again before this shard read it
            manifest["store"] = {**manifest["store"], "checksum": "1" * 64}
        return manifest

    monkeypatch.setattr(heiindex.shards.Index, "write", second_reads_other_data)
    out = tmp_path / "sharded"
    with pytest.raises(HeiindexError, match=r"test: was replaced while the sharded build read it \(shards shard-001 "):
        write_shards(pipe.root, "test", pipe.model_dir, pipe.hash_dir, out, 2, index_type="flat")
    assert built == [1, 1] and not out.exists() and not list(tmp_path.iterdir())


def test_a_shard_whose_images_have_no_caption_is_built_opened_and_verified(pipe, tmp_path):
    """The store may hold images no caption describes: a shard of only such images has no captions,
    and was written, then refused at open and by verify ("n_captions must be at least 1")."""
    from heiindex import shards
    from heiindex.verify import verify

    root = pf.copy_store(pipe, tmp_path)
    ids = SplitStore.open(root, "test").image_id_column()
    a, b = shards.shard_bounds(24, 4)[1]
    pf.edit_column(
        root / "test" / "captions.parquet", "image_id", lambda i: i.__setitem__(np.isin(i, ids[a:b]), ids[0])
    )
    out = tmp_path / "s"
    manifest = shards.write_shards(root, "test", pipe.model_dir, pipe.hash_dir, out, 4, index_type="flat")
    assert manifest["shards"][1]["n_captions"] == 0
    opened = ShardedIndex.open(out)
    assert opened.n_images == 24 and len(opened.search("a dog", k=3).results) == 3
    assert {c.status for c in verify(out)} == {"ok"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["shards"].pop(0), r'"shards\[0\]\.store_rows" is \[8, 16\], where \[0, 8\] belongs'),
        (lambda m: m["shards"].pop(), r'"n_images" is 24, where its 2 shards hold 16: is a shard entry missing\?'),
        (lambda m: m["shards"][1].pop("store_rows"), r'"shards\[1\]\.store_rows" is None, where \[8, 16\] belongs'),
        (lambda m: m.update(n_captions=100), r'"n_captions" is 100, where its 3 shards hold 120'),
        (lambda m: m.update(n_images="x"), r'"n_images" is missing or not of type int'),
    ],
)
def test_shard_entries_that_do_not_cover_the_build_are_refused(sharded, tmp_path, edit, message):
    """A build whose manifest lost its first shard entry was served as the other two shards'
    images, and verify passed it; its n_images and n_captions were never compared."""
    import shutil

    from heiindex.verify import verify

    copy = tmp_path / "copy"
    shutil.copytree(sharded.path, copy)
    with pf.edited_json(copy / "manifest.json") as m:
        edit(m)
    with pytest.raises(DataError, match=message):
        ShardedIndex.open(copy)
    [bad] = [c for c in verify(copy) if c.status != "ok"]
    assert bad.path == copy / "manifest.json" and bad.status == "invalid" and re.search(message, bad.detail)


def test_a_sharded_manifests_matcher_attention_that_is_no_object_is_invalid(sharded, tmp_path):
    """verify ended in AttributeError ('str' object has no attribute 'get'); the shards' own
    manifests were fine, so ShardedIndex.open read on."""
    import shutil

    from heiindex.verify import verify

    copy = tmp_path / "copy"
    shutil.copytree(sharded.path, copy)
    with pf.edited_json(copy / "manifest.json") as m:
        m["matcher"]["attention"] = "lse"
    message = "field \"matcher.attention\" must be an object, got 'lse'"
    with pytest.raises(DataError, match=re.escape(message)):
        ShardedIndex.open(copy)
    [bad] = [c for c in verify(copy) if c.status != "ok"]
    assert (bad.path, bad.status, bad.detail) == (copy / "manifest.json", "invalid", message)


def test_a_sharded_manifest_without_its_kind_is_named_by_that_field(sharded, tmp_path):
    """Read as one index's, it was refused for a missing "index" field."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sharded.path, copy)
    with pf.edited_json(copy / "manifest.json") as m:
        del m["kind"]
    message = 'field "kind" is None, where a sharded build\'s manifest (it lists "shards") says "sharded"'
    with pytest.raises(DataError, match=re.escape(message)):
        open_index(copy)


def test_verify_names_serve_where_a_sharded_builds_models_have_moved(pipe, tmp_path):
    """A moved matcher of a sharded build needs --model for serve too; one unsharded index's
    row names query and bench only (serve refuses those)."""
    import shutil

    from heiindex.verify import verify

    matcher, hasher = tmp_path / "m", tmp_path / "h"
    shutil.copytree(pipe.model_dir, matcher)
    shutil.copytree(pipe.hash_dir, hasher)
    write_shards(pipe.root, "test", matcher, hasher, tmp_path / "s", 2, index_type="flat")
    shutil.move(matcher, tmp_path / "m2")
    moved = [c for c in verify(tmp_path / "s") if c.status == "moved"]
    assert [c.path for c in moved] == [matcher]  # once for the build, not once per shard
    assert "searching it (query, bench, serve) needs --model naming the folder" in moved[0].detail
