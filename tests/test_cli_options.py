"""What the CLI passes on to the library, and refusals and defaults a user would not notice going
wrong: each command's library call is replaced by a spy, so these run in well under a second."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
from cli_helpers import as_json, bench_side, clean_error, ok, recall_row, run

from heiindex.search import default_counts


class _Opened(Exception):
    """Raised by a spy once it has recorded its call: nothing further needs to run."""


def _spy_open(got: dict):
    """An ``open(path, model_dir, hash_dir, **kw)`` (Index's or ShardedIndex's) that records
    ``kw`` in ``got`` and raises _Opened."""

    def fake_open(path, model_dir=None, hash_dir=None, **kw):
        got.update(kw)
        raise _Opened

    return fake_open


def _spy_ray(monkeypatch, got: dict):
    """``RayShardedIndex`` replaced by a recorder of what it was given."""
    import heiindex.ray_engine

    def fake(path, address=None, threads=None, detached=False, model_dir=None, hash_dir=None):
        got.update(path=path, address=address, threads=threads, detached=detached, models=(model_dir, hash_dir))
        return SimpleNamespace(
            path=path,
            sharded=True,
            infos=[{"pid": 11, "n_images": 12}],
            actor_name=lambda i: f"actor-{i}",
            search=lambda text, k, candidates: SimpleNamespace(
                to_dict=lambda: {"query": text}, results=[None] * k, candidates=candidates
            ),
            query_counts=lambda candidates, k, image_query: default_counts(candidates, k, [12]),
            shard_sizes=lambda image_query: [12],
        )

    monkeypatch.setattr(heiindex.ray_engine, "RayShardedIndex", fake)


def test_query_and_bench_on_ray_pass_address_and_threads_to_the_actors(pipe, monkeypatch):
    """`--engine ray --address ... --threads N` would otherwise start a local Ray, or actors with
    another thread count (scores summed in another order), and say nothing."""
    import heiindex.bench

    got: dict = {}
    _spy_ray(monkeypatch, got)
    ray = ("--engine", "ray", "--address", "10.0.0.1:6379", "--threads", "3", "--index", pipe.index_dir)
    assert as_json(run("query", "a dog", *ray, "--json")) == {"query": "a dog"}
    assert (got["address"], got["threads"], got["detached"]) == ("10.0.0.1:6379", 3, False)
    got.clear()
    monkeypatch.setattr(heiindex.bench, "run_sharded_bench", lambda index, topk, warmup: {"topk": topk, "w": warmup})
    assert as_json(run("bench", "--topk", "7", *ray, "--json")) == {"topk": 7, "w": True}
    assert as_json(run("bench", "--topk", "7", "--no-warmup", *ray, "--json")) == {"topk": 7, "w": False}
    assert (got["address"], got["threads"], got["detached"]) == ("10.0.0.1:6379", 3, False)
    assert got["models"] == (None, None)
    # moved models: the folders go to the actors
    for command in (("query", "a dog"), ("bench", "--topk", "7")):
        got.clear()
        ok(run(*command, *ray, "--model", "/m", "--hash", "/h", "--json"))
        assert got["models"] == (Path("/m"), Path("/h"))


def test_serve_starts_detached_actors_on_the_running_cluster_and_stop_names_it(pipe, monkeypatch):
    """`heiindex serve` serves on the cluster `ray start --head` runs (address auto) with actors
    that outlive the command; otherwise the actors die with it and later queries find none."""
    import heiindex.ray_engine

    got: dict = {}
    _spy_ray(monkeypatch, got)
    r = ok(run("serve", "--index", pipe.index_dir, "--model", "/m", "--hash", "/h"))
    assert (got["address"], got["detached"], got["models"]) == ("auto", True, (Path("/m"), Path("/h")))
    assert "shard 0: actor actor-0 (pid 11, 12 images)" in r.output
    assert f"on Ray at auto; stop with: heiindex serve --stop --index {pipe.index_dir} --address auto" in r.output
    stopped: dict = {}
    monkeypatch.setattr(heiindex.ray_engine, "stop_served", lambda path, address: stopped.update(address=address) or 2)
    r = ok(run("serve", "--stop", "--index", pipe.index_dir, "--address", "10.0.0.1:6379"))
    assert stopped == {"address": "10.0.0.1:6379"} and "stopped 2 shard actors" in r.output
    monkeypatch.setattr(heiindex.ray_engine, "stop_served", lambda path, address: 1)
    assert "stopped 1 shard actor\n" in ok(run("serve", "--stop", "--index", pipe.index_dir)).output  # "1 shard actors"
    clean_error(run("serve", "--stop", "--index", pipe.index_dir, "--model", "/m"), "--model: not used with --stop")
    clean_error(run("serve", "--stop", "--index", pipe.index_dir, "--threads", "1"), "--threads: not used with --stop")


@pytest.mark.parametrize(
    "command, args, detail",
    [
        ("query", ["a dog", "--uri", "http://127.0.0.1:1"], "--uri: not used with --engine ray"),
        ("bench", ["--dtype", "bfloat16"], "--dtype: not used with --engine ray"),
        ("bench", ["--codes", "faiss"], "in float32, searching its FAISS files as the build set them up)"),
        ("bench", ["--sweep", "5"], "--sweep runs on an unsharded build, in this process"),
        ("bench", ["--repeats", "2"], "--repeats runs on an unsharded build"),
        ("bench", ["--repeats", "0"], "--repeats must be a whole number"),  # its range before the build's kind
    ],
)
def test_in_process_options_are_refused_with_ray(pipe, monkeypatch, command, args, detail):
    """Each Ray actor opens its shard on the CPU in float32 with FAISS codes: a --uri or --dtype
    given with --engine ray was accepted and did nothing."""
    import heiindex.ray_engine

    pf.forbid(monkeypatch, "Ray started", (heiindex.ray_engine, "RayShardedIndex"))
    r = run(command, *args, "--engine", "ray", "--index", pipe.index_dir)
    clean_error(r, detail)


def test_ray_queries_are_checked_before_ray_starts(pipe, tmp_path, monkeypatch):
    """A refused query file cost a Ray start first (13 s, against 4 s in process)."""
    import heiindex.ray_engine

    pf.forbid(monkeypatch, "Ray started", (heiindex.ray_engine, "RayShardedIndex"))
    queries = tmp_path / "q.txt"
    queries.write_text("a dog\nxyzzyq qwplk\n")
    r = run("query", "--file", queries, "--engine", "ray", "--index", pipe.index_dir)
    clean_error(r, f"{queries} line 2: no word of the query is in the model's vocabulary: xyzzyq, qwplk")
    r = run("query", "xyzzyq", "--engine", "ray", "--index", pipe.index_dir)
    clean_error(r, "no word of the query is in the model's vocabulary: xyzzyq")


def test_query_opens_the_index_in_float32_and_with_the_codes_asked_for(pipe, monkeypatch):
    """float32 is the exact default (tf32 would shift scores by ~1e-3 on a GPU, unseen on a CPU);
    --codes milvus --uri must reach the index, or the FAISS files answer instead of the server."""
    import heiindex.index

    got: dict = {}

    monkeypatch.setattr(heiindex.index.Index, "open", _spy_open(got))
    assert isinstance(run("query", "a dog", "--index", pipe.index_dir).exception, _Opened)
    assert (got["dtype"], got["device"], got["codes"], got["uri"]) == ("float32", "cpu", None, None)
    got.clear()
    r = run("query", "a dog", "--index", pipe.index_dir, "--codes", "milvus", "--uri", "http://127.0.0.1:1")
    assert isinstance(r.exception, _Opened)
    assert (got["codes"], got["uri"]) == ("milvus", "http://127.0.0.1:1")
    got.clear()
    assert isinstance(run("bench", "--index", pipe.index_dir).exception, _Opened)
    assert got["dtype"] == "float32"


def _spy_bench(monkeypatch, got: dict, res: dict):
    import heiindex.bench

    def fake(index, topk, sweep, protocol, repeats, warmup, plot=None):
        got.update(topk=topk, sweep=sweep, protocol=protocol, repeats=repeats, warmup=warmup)
        if plot is not None:  # drawn by run_bench, which records its path
            got["plot"] = plot
        return {"warmup_seconds": None, **res, **({"plot": str(plot)} if plot is not None else {})}

    monkeypatch.setattr(heiindex.bench, "run_bench", fake)


def test_bench_runs_the_auto_protocol_by_default(pipe, monkeypatch):
    """auto adds the COCO 1K folds on a 5,000-image split; a default of full would drop them."""
    got: dict = {}
    _spy_bench(monkeypatch, got, {"split": "test"})
    ok(run("bench", "--index", pipe.index_dir, "--json"))
    want = {"topk": None, "sweep": None, "protocol": "auto", "repeats": 1, "warmup": True}
    assert got == want  # None: run_bench's 100 at most
    got.clear()
    ok(run("bench", "--index", pipe.index_dir, "--repeats", "3", "--no-warmup", "--json"))
    assert (got["repeats"], got["warmup"]) == (3, False)


def test_bench_repeats_below_one_is_refused_by_its_flag(pipe):
    clean_error(run("bench", "--index", pipe.index_dir, "--repeats", "0"), "--repeats must be a whole number")


def test_bench_sweep_plot_goes_in_the_index_folder_by_default(pipe, monkeypatch):
    """Without --plot the sweep's PNG is the index's bench_sweep.png (as --plot's help says), not
    a file in whatever folder the command ran from."""
    from heiindex.index import Index

    got: dict = {}
    _spy_bench(monkeypatch, got, {"split": "test", "full": {"sweep": [{"candidates": 5}]}})
    d = as_json(run("bench", "--index", pipe.index_dir, "--sweep", "5", "--json"))
    want = Index.open(pipe.index_dir).path / "bench_sweep.png"
    assert got["plot"] == want and d["plot"] == str(want)
    got.clear()
    ok(run("bench", "--index", pipe.index_dir, "--json"))
    assert "plot" not in got  # no sweep: nothing to draw


_ROW = {"r1": 1.0, "r5": 2.0, "r10": 3.0, "meanr": 2.0, "seconds": 0.5}  # recall_row's fields but rsum


def _side(rsum):
    return bench_side(**_ROW, rsum=rsum)


def test_bench_on_a_5k_split_prints_the_5k_and_the_1k_tables(pipe, monkeypatch):
    """On testall the whole split is reported as "5k" (there is no "full"): its tables must be
    printed beside the 1K folds', not silently left out."""
    proto = {"images": 24, "captions": 120, "candidates": 5, "t2i": _side(6.0), "i2t": _side(7.0)}
    res = {"split": "testall", "5k": proto, "1k": {**proto, "folds": 5}, "t2i": proto["t2i"], "i2t": proto["i2t"]}
    _spy_bench(monkeypatch, {}, res)
    text = ok(run("bench", "--index", pipe.index_dir, "--topk", "5")).output
    assert "COCO 5K: text-to-image" in text and "COCO 1K (mean of 5 folds): text-to-image" in text


def _spy_evaluate(monkeypatch, protocols=("full",), folds=2):
    """evaluate_split replaced: text-to-image R@1 11.0, image-to-text 44.0 in each of ``protocols``
    (COCO 1K the mean of ``folds`` folds)."""
    import heiindex.protocols

    def figures(images):
        t2i, i2t = {**recall_row(**_ROW, rsum=33.0), "r1": 11.0}, {**recall_row(**_ROW, rsum=132.0), "r1": 44.0}
        return {"images": images, "captions": 5 * images, "t2i": t2i, "i2t": i2t, "rsum": 165.0}

    def evaluate_split(models, store, protocols_given, progress=False):
        out = {"split": store.split, "images": 24, "captions": 120, "models": len(models)}
        out.update({name: figures(12 if name == "1k" else 24) for name in protocols})
        if "1k" in out:
            out["1k"]["folds"] = folds
        main = out.get("5k") or out.get("full") or out["1k"]
        return {**out, "t2i": main["t2i"], "i2t": main["i2t"], "rsum": main["rsum"], "seconds": 0.25}

    monkeypatch.setattr(heiindex.protocols, "evaluate_split", evaluate_split)


def test_evaluate_tables_each_direction_in_its_row_and_defaults_to_the_test_split(pipe, monkeypatch):
    """The text-to-image row must show text-to-image recalls (not image-to-text's); with no
    --split the test split is evaluated, as --help says."""
    _spy_evaluate(monkeypatch)
    text = ok(run("evaluate", "--model", pipe.model_dir, "--store", pipe.root)).output
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "-to-" in line and "│" in line}
    assert "11.0" in rows["text-to-image"] and "44.0" in rows["image-to-text"]
    assert "test (all images): exhaustive (24 images, 120 captions)" in text
    assert as_json(run("evaluate", "--model", pipe.model_dir, "--store", pipe.root, "--json"))["split"] == "test"


def test_evaluate_tables_coco_5k_and_1k_and_names_an_ensemble(pipe, monkeypatch):
    _spy_evaluate(monkeypatch, ("5k", "1k"))
    args = ("evaluate", "--model", pipe.model_dir, "--model", pipe.other_model_dir, "--store", pipe.root)
    text = ok(run(*args)).output
    assert "COCO 5K: exhaustive, the mean of 2 matchers (24 images, 120 captions)" in text
    assert "COCO 1K (mean of 2 folds): exhaustive, the mean of 2 matchers (12 images, 60 captions)" in text
    assert "COCO 5K rsum 165.0" in text and "COCO 1K (mean of 2 folds) rsum 165.0" in text


def test_evaluate_titles_one_fold_as_the_bench_does(pipe, monkeypatch):
    """A 1,000-image split under --protocol 1k was "the mean of 1 folds"."""
    _spy_evaluate(monkeypatch, ("1k",), folds=1)
    text = ok(run("evaluate", "--model", pipe.model_dir, "--store", pipe.root, "--protocol", "1k")).output
    assert "COCO 1K (one fold): exhaustive (12 images, 60 captions)" in text and "folds" not in text


def _spy_build(monkeypatch, got: dict):
    """Index.write and write_shards replaced by recorders; any device accepted."""
    import heiindex.builds
    import heiindex.index

    def fake_write(root, split, matcher, hasher, out, **kw):
        got.update(kw, split=split)
        spec = {"type": "flat", "images": {"type": "flat"}, "captions": {"type": "flat"}}
        return {"n_images": 2, "n_captions": 10, "hash": {"bits": 8}, "index": spec}

    def fake_shards(root, split, matcher, hasher, out, shards, **kw):
        got.update(kw, split=split, shards=shards)
        return {"n_images": 2, "n_captions": 10, "shards": [{"n_images": 1}, {"n_images": 1}]}

    monkeypatch.setattr(heiindex.builds, "resolve_device", lambda device: device)  # build_index's check
    monkeypatch.setattr(heiindex.index.Index, "write", staticmethod(fake_write))
    monkeypatch.setattr(heiindex.builds, "write_shards", fake_shards)


def test_build_passes_its_options_to_the_writer(pipe, tmp_path, monkeypatch):
    """--device, --nlist / --nprobe and --milvus-index must reach the index writer (sharded or
    not); the default split is test."""
    got: dict = {}
    _spy_build(monkeypatch, got)
    common = ("--store", pipe.root, "--model", pipe.model_dir, "--hash", pipe.hash_dir, "--out", tmp_path / "i")
    ok(run("build", *common, "--device", "cuda:1", "--index", "ivf", "--nlist", "6", "--nprobe", "2"))
    assert (got["split"], got["device"], got["index_type"], got["nlist"], got["nprobe"]) == (
        "test",
        "cuda:1",
        "ivf",
        6,
        2,
    )
    got.clear()
    ok(run("build", *common, "--device", "cuda:1", "--shards", "2"))
    assert (got["device"], got["shards"]) == ("cuda:1", 2)
    got.clear()
    milvus = ("--codes", "milvus", "--uri", "http://127.0.0.1:1", "--milvus-index", "BIN_IVF_FLAT")
    ok(run("build", *common, *milvus))
    assert (got["codes"], got["uri"], got["milvus_index"]) == ("milvus", "http://127.0.0.1:1", "BIN_IVF_FLAT")


def test_build_refuses_milvus_codes_or_a_milvus_index_that_would_go_unused(pipe, tmp_path, monkeypatch):
    """A sharded build keeps its codes in FAISS files: --codes milvus with --shards, or a
    --milvus-index without --codes milvus, was written as FAISS files without a word."""
    import heiindex.builds
    import heiindex.index

    pf.forbid(monkeypatch, "written", (heiindex.index.Index, "write"))
    pf.forbid(monkeypatch, "written", (heiindex.builds, "write_shards"))
    common = ("--store", pipe.root, "--model", pipe.model_dir, "--hash", pipe.hash_dir, "--out", tmp_path / "i")
    r = run("build", *common, "--shards", "2", "--codes", "milvus", "--uri", "http://127.0.0.1:1")
    clean_error(r, "--codes milvus is for an unsharded build")
    r = run("build", *common, "--codes", "milvus")  # named by the flags, not the library's arguments
    clean_error(r, "Error: --codes must be 'faiss', or 'milvus' with a server URI (--uri), got 'milvus'")
    for extra in ((), ("--shards", "2")):
        r = run("build", *common, "--milvus-index", "BIN_IVF_FLAT", *extra)
        clean_error(r, "--milvus-index sets the Milvus index of --codes milvus")
    assert not (tmp_path / "i").exists()


def test_a_default_sharded_build_becomes_the_last_built(pipe, tmp_path, monkeypatch):
    """`heiindex build --shards 2` on the default data must be what a later `heiindex query`
    (no --index) searches, as an unsharded build is."""
    import heiindex.default_data

    marked: list = []
    _spy_build(monkeypatch, {})
    monkeypatch.setattr(heiindex.default_data, "ensure_coco_sim", lambda **kw: pipe.root)
    monkeypatch.setattr(heiindex.default_data, "mark_last_built", marked.append)
    out = tmp_path / "i"
    for extra in ((), ("--shards", "2")):
        r = ok(run("build", "--model", pipe.model_dir, "--hash", pipe.hash_dir, "--out", out, *extra))
        # a build elsewhere changed what a plain query searches, and the build line did not say so
        assert r.output.rstrip().endswith(f"-> {out} (query and bench without --index now use it)")
    assert marked == [out, out]
    monkeypatch.setattr(heiindex.default_data, "default_index_dir", lambda split: out)
    r = ok(run("build", "--model", pipe.model_dir, "--hash", pipe.hash_dir))  # the default place: nothing to add
    assert r.output.rstrip().endswith(f"-> {out}")


def test_auto_names_each_modalitys_index_where_they_differ():
    """auto may choose flat for the images and IVF for the captions; the build line named one."""
    from heiindex_cli.main import _index_kinds

    spec = {"type": "auto", "images": {"type": "flat"}, "captions": {"type": "ivf"}}
    assert _index_kinds(spec) == "auto: flat (images), ivf (captions) index"
    assert _index_kinds({**spec, "captions": {"type": "flat"}}) == "auto: flat index"


def test_queries_from_standard_input_are_named_so_and_one_is_one_query(pipe):
    """An error in a --file - query names "standard input line N"; one query's footer says
    "1 query", not "1 queries"."""
    args = ("query", "--file", "-", "--index", pipe.index_dir, "--k", "2", "--candidates", "5")
    r = run(*args, input="a dog\n\ntwo cats\n")
    clean_error(r, "standard input line 2: the query is empty")
    assert "1 query in " in ok(run(*args, input="a dog\n")).output
    assert "1 query in " in ok(run(*args, input="a dog\n\n")).output  # a blank last line is no query


def test_ingest_passes_its_options_and_takes_testall(tmp_path, monkeypatch):
    """--vocab, --regions and --feature-dim reach the ingest (defaults 36 and 2048, SCAN's), and
    the 5,000-image testall split is one a user can ingest."""
    import heiindex.ingest

    got: list = []

    def fake(precomp, split, out, **kw):
        got.append({"split": split, **kw})
        return SimpleNamespace(line=lambda: "ingested")

    monkeypatch.setattr(heiindex.ingest, "ingest", fake)
    base = ("ingest", "--precomp", tmp_path / "p", "--out", tmp_path / "o")
    ok(run(*base, "--split", "testall", "--vocab", tmp_path / "v.json", "--regions", "6", "--feature-dim", "8"))
    ok(run(*base, "--split", "test"))
    assert [(g["split"], g["vocab"], g["regions"], g["feature_dim"]) for g in got] == [
        ("testall", tmp_path / "v.json", 6, 8),
        ("test", None, 36, 2048),
    ]


def test_train_defaults_are_the_library_defaults():
    """The CLI writes its defaults out: they must stay TrainConfig's and AttentionConfig's (and
    ScanConfig's embed size), which the README's figures were trained with."""
    from heiindex_cli.main import cli

    from heiindex.attention import AttentionConfig
    from heiindex.model import ScanConfig
    from heiindex.train import TrainConfig

    params = {p.name: p.default for p in cli.commands["train"].params}
    lib, att = TrainConfig(), AttentionConfig()
    for name in ("epochs", "batch_size", "lr", "lr_decay_epochs", "margin", "max_violation", "warmup_sum_epochs"):
        assert params[name] == getattr(lib, name), name
    assert (params["seed"], params["val_images"]) == (lib.seed, lib.val_images)
    for name in ("cross_attn", "raw_feature_norm", "agg", "lambda_lse", "lambda_softmax"):
        assert params[name] == getattr(att, name), name
    assert params["embed_size"] == ScanConfig(vocab_size=1).embed_size


def test_train_passes_every_option_on(pipe, tmp_path, monkeypatch):
    """Each option given to `heiindex train` must reach the model or loop configuration."""
    import heiindex.train as tr

    got: dict = {}

    def fake_train(root, out, mcfg, tcfg, **kw):
        got.update(mcfg=mcfg, tcfg=tcfg)
        return SimpleNamespace(best_rsum=0.0, best_epoch=0)

    monkeypatch.setattr(tr, "train", fake_train)
    ok(
        run(
            *("train", "--store", pipe.root, "--out", tmp_path / "r", "--epochs", "3", "--batch-size", "16"),
            *("--lr", "0.01", "--embed-size", "12", "--cross-attn", "i2t", "--agg", "mean"),
            *("--lambda-lse", "4.0", "--lambda-softmax", "5.0", "--margin", "0.3", "--sum-violation"),
            *("--val-images", "20", "--seed", "7", "--lr-decay-epochs", "3", "--warmup-sum-epochs", "0"),
        )
    )
    t, m = got["tcfg"], got["mcfg"]
    assert (t.lr_decay_epochs, t.warmup_sum_epochs) == (3, 0)
    assert (t.epochs, t.batch_size, t.lr, t.margin, t.max_violation, t.val_images, t.seed) == (
        3,
        16,
        0.01,
        0.3,
        False,
        20,
        7,
    )
    a = m.attention
    assert (m.embed_size, a.cross_attn, a.agg, a.lambda_lse, a.lambda_softmax) == (12, "i2t", "mean", 4.0, 5.0)


def test_train_hash_passes_every_option_on(pipe, tmp_path, monkeypatch):
    """--pooling, --lr, --rank-weight and --seed must reach the hash training."""
    import heiindex.train_hash

    got: dict = {}

    def fake(matcher, root, out, hcfg, tcfg, **kw):
        got.update(hcfg=hcfg, tcfg=tcfg)
        return {"best_epoch": 1, "dev_candidate_recall": {"n": 5, "t2i": 0.5, "i2t": 0.25}}

    monkeypatch.setattr(heiindex.train_hash, "train_hash", fake)
    args = ("--pooling", "mean", "--lr", "0.01", "--rank-weight", "0.5", "--seed", "9", "--bits", "16")
    r = ok(run("train-hash", "--model", pipe.model_dir, "--store", pipe.root, "--out", tmp_path / "h", *args))
    h, t = got["hcfg"], got["tcfg"]
    assert (h.bits, h.pooling, t.lr, t.rank_weight, t.seed) == (16, "mean", 0.01, 0.5, 9)
    assert "dev candidate recall@5 t2i 50.0% i2t 25.0%" in r.output


def test_resume_checks_only_the_shape_options_given(pipe, tmp_path, monkeypatch):
    """`heiindex train --resume` with no shape option continues the saved model; comparing the
    defaults too refused every run not trained with them ("--embed-size 256 (it has 24)")."""
    import shutil

    import pipeline_fixtures as pf

    import heiindex.train as tr

    out = tmp_path / "r"
    shutil.copytree(pipe.run_dir, out)  # a trained run: last/ with its state
    monkeypatch.setattr(tr, "train", lambda *a, **k: SimpleNamespace(best_rsum=0.0, best_epoch=1))
    ok(run("train", "--store", pipe.root, "--out", out, "--epochs", "2", "--resume"))
    ok(run("train", "--store", pipe.root, "--out", out, "--epochs", "2", "--resume", "--embed-size", pf.EMBED_SIZE))
    r = run("train", "--store", pipe.root, "--out", out, "--epochs", "2", "--resume", "--embed-size", "8")
    clean_error(r, f"--embed-size 8 (it has {pf.EMBED_SIZE})")


def test_a_sharded_build_is_opened_with_the_dtype_asked_for(pipe, monkeypatch):
    """`heiindex query --dtype bfloat16` on a sharded build scored in float32 without a word."""
    import heiindex.builds
    import heiindex.index_manifest

    got: dict = {}

    for module in (heiindex.index_manifest, heiindex.builds):  # the CLI's early check, open_index's
        monkeypatch.setattr(module, "sharded_manifest", lambda path: {"shards": []})
    monkeypatch.setattr(heiindex.shards.ShardedIndex, "open", _spy_open(got))
    r = run("query", "a dog", "--index", pipe.index_dir, "--dtype", "bfloat16", "--device", "cpu")
    assert isinstance(r.exception, _Opened)
    assert got == {"device": "cpu", "dtype": "bfloat16", "nprobe": None, "ef_search": None}


def test_build_index_given_a_folder_points_to_out(tmp_path):
    """--index is a folder for query, bench and serve, but the index type for build: a folder given
    there got only click's list of types."""
    r = run("build", "--index", tmp_path / "idx")
    assert r.exit_code == 2
    assert (
        f"'{tmp_path / 'idx'}' looks like a path: build's --index is the index type; write to a folder with --out"
        in (" ".join(r.output.split()))
    )
    r = run("build", "--index", "flatt")
    assert r.exit_code == 2 and "'flatt' is not one of 'auto', 'flat', 'ivf', 'hnsw'" in r.output
    assert "--out" not in r.output.split("Error:")[1]


def test_every_option_says_what_it_does():
    """Options of train, train-hash, ingest, evaluate, build and serve showed only their default."""
    import click
    from heiindex_cli.main import cli

    bare = [
        (name, p.opts[0])
        for name, cmd in cli.commands.items()
        for p in cmd.params
        if isinstance(p, click.Option) and not p.help
    ]
    assert bare == []


@pytest.mark.parametrize(
    "args",
    [
        ("query", "a dog", "--index", "{p}"),
        ("verify", "{p}"),
        ("build", "--out", "{p}"),
        ("train-hash", "--out", "{p}"),
        ("ingest", "--precomp", "{p}", "--split", "test", "--out", "/tmp/x"),
    ],
)
def test_empty_and_non_utf8_paths_are_refused_by_their_flag(args):
    """An empty --index searched the current folder ("manifest.json: no index here"), and a path
    that is not valid UTF-8 ended in pyarrow's bare "'utf-8' codec can't encode character"."""
    r = run(*(a.replace("{p}", "") for a in args))
    clean_error(r, "is empty: give a path (an empty value is not the current folder)")
    r = run(*(a.replace("{p}", "/tmp/idx\udce9bad") for a in args))
    clean_error(r, "is not valid UTF-8, which heiindex's files need: rename it")


def test_a_recall_one_short_of_the_whole_never_reads_100_percent():
    """bench printed "candidate recall@400: 100.0%" for 0.9998 beside "some ground truth is outside
    the N candidates"."""
    from heiindex_cli.render import percent

    assert [percent(x) for x in (1.0, 0.9998, 0.99996, 0.947, 0.9995, 0.0)] == [
        "100.0%",
        "99.98%",
        "99.996%",
        "94.7%",
        "99.95%",
        "0.0%",
    ]
