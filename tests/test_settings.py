"""heiindex.settings.require and the configs that use it: a setting out of range is refused by
name when the config is made (NaN learning rates trained NaN models, a batch of one trained
nothing, zero epochs failed after the scoring pass, a negative nlist was a FAISS TypeError)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
from cli_helpers import clean_error, run  # tests/ is on sys.path (pytest rootdir-relative import)

from heiindex.attention import AttentionConfig
from heiindex.errors import HeiindexError
from heiindex.hamming import check_index_options, resolve_index_kind
from heiindex.model import ScanConfig
from heiindex.settings import SettingError, require, require_name, require_path
from heiindex.train import TrainConfig
from heiindex.train_hash import HashTrainConfig


def test_require():
    require("n", 3, at_least=1, integer=True)
    require("x", 0.5, above=0)
    for value, kw, message in (
        (0, {"at_least": 1, "integer": True}, "n must be a whole number, at least 1, got 0"),
        (2.5, {"integer": True}, "n must be a whole number, got 2.5"),
        (True, {"integer": True}, "n must be a whole number, got True"),
        (math.nan, {"above": 0}, "n must be a finite number, greater than 0, got nan"),
        (math.inf, {}, "n must be a finite number, got inf"),
        (0.0, {"above": 0}, "n must be a finite number, greater than 0, got 0.0"),
        ("3", {}, "n must be a finite number, got '3'"),
        (-0.5, {"at_least": 0.25}, "n must be a finite number, at least 0.25, got -0.5"),
        (1.5, {"above": 0, "at_most": 1}, "n must be a finite number, greater than 0, at most 1, got 1.5"),
    ):
        with pytest.raises(ValueError, match=f"^{message}$"):
            require("n", value, **kw)


@pytest.mark.parametrize(
    ("make", "field", "value", "message"),
    [
        (TrainConfig, "epochs", 0, "epochs must be a whole number, at least 1"),
        (TrainConfig, "batch_size", 1, "batch_size must be a whole number, at least 2"),
        (TrainConfig, "lr", math.nan, "lr must be a finite number, greater than 0"),
        (TrainConfig, "lr_decay_epochs", 0, "lr_decay_epochs must be a whole number, at least 1"),
        (TrainConfig, "margin", math.nan, "margin must be a finite number, at least 0"),
        (TrainConfig, "val_images", -3, "val_images must be a whole number, at least 1"),
        (TrainConfig, "threads", 0, "threads must be a whole number, at least 1"),
        (TrainConfig, "seed", -1, "seed must be a whole number, at least 0"),
        (
            TrainConfig,
            "seed",
            2**64,
            "seed must be a whole number, at least 0, at most 18446744073709551615",
        ),  # torch's
        (HashTrainConfig, "seed", 2**64, "at most 18446744073709551615, got 18446744073709551616"),
        (TrainConfig, "max_violation", "no", "max_violation must be true or false, got 'no'"),  # "no" trained with it
        (HashTrainConfig, "epochs", 0, "epochs must be a whole number, at least 1"),
        (HashTrainConfig, "rounds", 0, "rounds must be a whole number, at least 1"),
        (HashTrainConfig, "val_candidates", 0, "val_candidates must be a whole number, at least 1"),
        (HashTrainConfig, "rank_weight", math.nan, "rank_weight must be a finite number, at least 0"),
        (HashTrainConfig, "lr", -1.0, "lr must be a finite number, greater than 0"),
        (
            TrainConfig,
            "lr",
            1e38,
            "lr must be a finite number, greater than 0, at most 1, got 1e",
        ),  # a traceback in Adam
        (HashTrainConfig, "lr", 1e20, "lr must be a finite number, greater than 0, at most 1, got 1e"),
        (
            lambda **kw: ScanConfig(vocab_size=10, **kw),
            "embed_size",
            -4,
            "embed_size must be a whole number, at least 1",
        ),
        (AttentionConfig, "lambda_softmax", math.nan, "lambda_softmax must be a finite number, greater than 0"),
        (AttentionConfig, "lambda_lse", 0.0, "lambda_lse must be a finite number, greater than 0"),
    ],
)
def test_configs_refuse_settings_out_of_range(make, field, value, message):
    with pytest.raises(ValueError, match=message):
        make(**{field: value})


def test_numpy_numbers_in_configs_are_stored_as_python_numbers():
    """A numpy int or float was checked and kept as it was: writing the config at the end of a
    training run failed ("int64 is not JSON serializable"), and a numpy layer size failed in torch."""
    configs = (
        TrainConfig(
            epochs=np.int64(2), lr=np.float32(1e-3), margin=np.float64(0.1), threads=np.int32(1), max_violation=np.True_
        ),
        HashTrainConfig(epochs=np.int64(1), seed=np.int64(0), lr=np.float32(3e-3), rank_weight=np.float16(1)),
        ScanConfig(vocab_size=np.int64(10), embed_size=np.int64(32)),
        AttentionConfig(lambda_softmax=np.float32(9), lambda_lse=np.int64(6)),
    )
    for config in configs:
        json.dumps(config.to_dict())
        for value in config.to_dict().values():
            assert not isinstance(value, np.generic), (config, value)
    assert [(type(v), v) for v in check_index_options("ivf", np.int64(4), np.int32(2))] == [(int, 4), (int, 2)]


def test_lambda_lse_is_free_where_lse_is_not_used_and_grad_clip_0_means_none():
    AttentionConfig(agg="mean", lambda_lse=0.0)
    TrainConfig(grad_clip=0.0)


def test_ivf_settings():
    assert resolve_index_kind("ivf", 100, nlist=4, nprobe=2) == {"type": "ivf", "nlist": 4, "nprobe": 2}
    # As the index searches: a manifest recorded nprobe 50 for an index probing its 10 lists.
    assert resolve_index_kind("ivf", 100, nlist=10, nprobe=50) == {"type": "ivf", "nlist": 10, "nprobe": 10}
    assert resolve_index_kind("ivf", 16) == {"type": "ivf", "nlist": 4, "nprobe": 4}  # default nprobe 8
    with pytest.raises(ValueError, match="nlist must be a whole number, at least 1, got 0"):
        resolve_index_kind("ivf", 100, nlist=0)
    with pytest.raises(ValueError, match="nprobe must be a whole number, at least 1, got -1"):
        resolve_index_kind("auto", 100, nprobe=-1)


def test_index_options_are_checked_before_any_encoding(pipe, tmp_path, monkeypatch):
    """A bad nlist failed only when the FAISS index was made, after the whole split was encoded."""
    import heiindex.index_write
    import heiindex.shards
    from heiindex.index import Index
    from heiindex.shards import write_shards

    cases = (("ivf", 0, "nlist must be a whole number, at least 1, got 0"), ("hnsw", 4, "not `index_type` 'hnsw'$"))
    pf.forbid(monkeypatch, "encoding started", (heiindex.index_write, "ImageWriter"))
    for kind, nlist, message in cases:
        with pytest.raises(ValueError, match=message):
            Index.write(pipe.root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "i", index_type=kind, nlist=nlist)
    pf.forbid(monkeypatch, "a shard was written", (heiindex.shards.Index, "write"))
    for kind, nlist, message in cases:
        with pytest.raises(ValueError, match=message):
            write_shards(
                pipe.root, "test", pipe.model_dir, pipe.hash_dir, tmp_path / "s", 2, index_type=kind, nlist=nlist
            )
    with pytest.raises(SettingError, match="`index_type` must be one of"):
        check_index_options("ivff", None, None)
    # a build capped it at nlist without a word (the manifest recording 5, the index 4); a query refuses it
    with pytest.raises(
        SettingError, match=r"^nprobe 5 exceeds `nlist` 4: a search probes at most the lists there are$"
    ):
        check_index_options("ivf", 4, 5)
    assert check_index_options("ivf", 4, 4) == (4, 4)
    assert list(tmp_path.iterdir()) == []


def test_build_checks_index_options_before_the_default_data(monkeypatch, tmp_path):
    """build --index flat --nlist 7 on a fresh checkout generated coco-sim (minutes) before refusing."""
    import heiindex.default_data

    pf.forbid(monkeypatch, "the data was resolved first", (heiindex.default_data, "ensure_coco_sim"))
    r = run("build", "--split", "test", "--out", tmp_path / "i", "--index", "flat", "--nlist", "7")
    clean_error(r, "Error: --nlist sets up IVF indexes (--index ivf, or auto at scale), not --index 'flat'")


def test_build_refuses_unusable_milvus_options_before_the_default_data(monkeypatch, tmp_path):
    """--shards with --codes milvus was refused only after the data (on a fresh checkout, coco-sim
    generated first); --milvus-index without Milvus codes was ignored."""
    import heiindex.default_data

    pf.forbid(monkeypatch, "the data was resolved first", (heiindex.default_data, "ensure_coco_sim"))
    for args, detail in (
        (
            ("--shards", "2", "--codes", "milvus", "--uri", "http://127.0.0.1:1"),
            "--codes milvus is for an unsharded build",
        ),
        (
            (
                "--milvus-index",
                "BIN_IVF_FLAT",
            ),
            "--milvus-index sets the Milvus index of --codes milvus",
        ),
        (("--shards", "2", "--milvus-index", "BIN_FLAT"), "--milvus-index sets the Milvus index of --codes milvus"),
    ):
        r = run("build", "--split", "test", "--out", tmp_path / "i", *args)
        clean_error(r, detail)


def test_the_cli_names_the_setting(pipe, tmp_path):
    """By its flag: "batch_size must be" named the library's field, not --batch-size (also for the
    settings the configs check themselves: --bits 12 is the HEI issue's k not a multiple of 8)."""
    for args, message in (
        (("train", "--store", pipe.root, "--out", tmp_path / "t", "--lr", "nan"), "--lr must be a finite number"),
        (("train", "--store", pipe.root, "--out", tmp_path / "t", "--batch-size", "1"), "--batch-size must be"),
        (("train", "--store", pipe.root, "--out", tmp_path / "t", "--val-images", "0"), "--val-images must be"),
        (
            ("train", "--store", pipe.root, "--out", tmp_path / "t", "--raw-feature-norm", "bogus"),
            "--raw-feature-norm must be one of",
        ),
        (
            ("train-hash", "--store", pipe.root, "--model", pipe.model_dir, "--out", tmp_path / "h", "--bits", "12"),
            "--bits (the code length k) must be a multiple of 8",
        ),
        (
            ("train-hash", "--store", pipe.root, "--model", pipe.model_dir, "--out", tmp_path / "h", "--epochs", "0"),
            "--epochs must be a whole number, at least 1, got 0",
        ),
        (
            ("build", "--split", "test", "--store", pipe.root, "--model", pipe.model_dir, "--hash", pipe.hash_dir)
            + ("--out", tmp_path / "i", "--index", "ivf", "--nlist", "-3"),
            "--nlist must be a whole number, at least 1, got -3",
        ),
    ):
        r = run(*args)
        clean_error(r, message)
    assert list(tmp_path.iterdir()) == []


def test_library_sizes_and_inputs_are_refused_by_name(pipe):
    """Each was a raw torch or Python error ("negative dimension", "range() arg 3 must not be
    zero", "'NoneType' object is not iterable"), or an integer Gram matrix scored silently."""
    import torch

    from heiindex.attention import region_gram, score_pairs
    from heiindex.checkpoint import load_model
    from heiindex.encode import encode_captions, encode_images, encode_split
    from heiindex.index import Index
    from heiindex.scoring import exhaustive_scores
    from heiindex.store import SplitStore

    loaded, store = load_model(pipe.model_dir), SplitStore.open(pipe.root, "test")
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match=f"max_images must be a whole number, at least 1, got {bad!r}"):
            encode_split(loaded, store, max_images=bad)
    ids, regions = encode_images(loaded, store, limit=3)  # a LoadedModel, as encode_split takes
    assert len(ids) == 3 and regions.shape[0] == 3
    enc = encode_split(loaded, store, max_images=4)
    with pytest.raises(ValueError, match="image_block must be a whole number, at least 1, got 0"):
        exhaustive_scores(loaded.model, enc, image_block=0)
    with pytest.raises(ValueError, match="block must be a whole number, at least 1, got 0"):
        encode_captions(loaded.model, enc.captions.tokens, enc.captions.lengths, block=0)
    pairs = torch.zeros(2, dtype=torch.long)
    att, words, lengths = loaded.model.attention, enc.words, enc.lengths
    for bad in (-5, 2.5, True):
        with pytest.raises(ValueError, match="max_elements must be a whole number, at least 1"):
            score_pairs(att, words, lengths, enc.regions, pairs, pairs, max_elements=bad)
    with pytest.raises(ValueError, match="gram must be floating-point"):
        score_pairs(att, words, lengths, enc.regions, pairs, pairs, region_gram(enc.regions).long())
    with pytest.raises(HeiindexError, match="search_many takes a list of queries, got NoneType"):
        Index.open(pipe.index_dir).search_many(None)


def test_a_setting_error_is_a_heiindex_error_and_a_value_error():
    """One except HeiindexError catches every refusal; code that caught ValueError still does."""
    from heiindex.device import check_precision, resolve_device

    for refuse in (lambda: require("epochs", 0, at_least=1, integer=True), lambda: resolve_device("tpu")):
        with pytest.raises(SettingError) as err:
            refuse()
        assert isinstance(err.value, HeiindexError) and isinstance(err.value, ValueError)
    with pytest.raises(SettingError) as err:
        check_precision("float16")
    assert err.value.setting == "dtype"


def test_refusals_pickle_as_made():
    """A Ray actor's refusal crosses to the driver by pickle: SettingError and DataError came back
    as "Failed to deserialize exception" (their __init__ takes two arguments)."""
    import pickle

    from heiindex.errors import DataError

    for err in (
        SettingError("k", "k must be at least 1"),
        SettingError("k", "k 5 exceeds preselect (4)", also=("preselect",)),
        DataError("/x/manifest.json", 'field "n" is missing'),
    ):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and vars(back) == vars(err)


def test_paths_split_names_and_falsy_values_given_are_refused_by_name(pipe, tmp_path):
    """None as a folder reached pathlib as a bare TypeError ("expected str, bytes or os.PathLike
    object"), and None as a split as "unsupported operand type(s) for /". "" and other falsy
    values given for a model folder or the codes' source were taken as their defaults."""
    from heiindex.builds import build_index, open_index
    from heiindex.checkpoint import load_model
    from heiindex.hash_folder import load_hash
    from heiindex.index import Index
    from heiindex.ingest import ingest
    from heiindex.plot import check_plot_path
    from heiindex.shards import ShardedIndex, write_shards
    from heiindex.simulate import simulate_images, write_coco_sim_precomp
    from heiindex.store import SplitStore
    from heiindex.train_hash import train_hash
    from heiindex.verify import verify

    models = (pipe.model_dir, pipe.hash_dir)
    for call, name in (
        (lambda: load_model(""), "path"),  # "" read the current folder
        (lambda: load_hash(None), "path"),
        (lambda: Index.open(pipe.index_dir, matcher=""), "matcher"),  # "" was the recorded matcher
        (lambda: Index.open(pipe.index_dir, hasher=3), "hasher"),
        (lambda: Index.write(pipe.root, "test", "", pipe.hash_dir, tmp_path / "x"), "matcher"),
        (lambda: Index.open(None), "path"),
        (lambda: verify(None), "path"),
        (lambda: Index.write(pipe.root, "test", *models, None), "out"),
        (lambda: Index.write(None, "test", *models, tmp_path / "x"), "store_root"),
        (lambda: ingest(None, "test", tmp_path / "s"), "precomp_dir"),
        (lambda: ingest(tmp_path, "test", ""), "out_root"),
        (lambda: ShardedIndex.open(None), "path"),
        (lambda: open_index(""), "path"),
        (lambda: SplitStore.open(None, "test"), "root"),
        (lambda: check_plot_path(3), "plot"),
        (lambda: simulate_images(["a dog"] * 5, None), "out_path"),
        (lambda: write_coco_sim_precomp(None, tmp_path / "p"), "captions_dir"),
        (lambda: train_hash(pipe.model_dir, pipe.root, None), "out"),  # after the splits were opened
        (lambda: write_shards(pipe.root, "test", *models, None, 2), "out"),
        (lambda: build_index("test", "", *models, tmp_path / "x"), "store_root"),  # "": the current folder
        (lambda: build_index("test", pipe.root, *models, ""), "out"),
    ):
        with pytest.raises(SettingError, match=f"^{name} must be a path \\(str or pathlib.Path\\), got "):
            call()
    with pytest.raises(SettingError, match="^split must be a non-empty string, got None"):
        Index.write(pipe.root, None, *models, tmp_path / "x")
    with pytest.raises(SettingError, match="^split must be a non-empty string, got None"):
        ingest(tmp_path, None, tmp_path / "s")  # it failed joining None to the root
    with pytest.raises(HeiindexError, match=r"^matcher must be a LoadedModel \(heiindex.checkpoint.load_model"):
        load_hash(pipe.hash_dir, matcher=str(pipe.model_dir))  # it failed on the str's .checksum
    with pytest.raises(SettingError, match="^codes must be 'faiss' or 'milvus', got ''"):
        Index.open(pipe.index_dir, codes="")  # taken as "as built"
    with pytest.raises(SettingError, match="^matcher must be a path"):
        build_index("test", pipe.root, "", pipe.hash_dir, tmp_path / "x")  # "" built with the default model
    for name in ("../store/test", "a/b", ".", "..", "/abs/test", "./"):  # "../store/test": another root's
        with pytest.raises(SettingError, match=r"^split must name one folder of the store root, got "):
            SplitStore.open(pipe.root, name)
    assert SplitStore.open(pipe.root, "./test/").path == SplitStore.open(pipe.root, "test").path  # the same folder
    assert require_name("split", "./train/") == "train"  # ingest took "./train" for another split than train
    with pytest.raises(SettingError, match="^split must be a non-empty string, got None"):
        build_index(None, pipe.root, *models, tmp_path / "x")  # it failed joining None to the index folder
    assert list(tmp_path.iterdir()) == []


def test_library_calls_name_an_argument_of_the_wrong_kind(pipe, tmp_path):
    """Each failed on an attribute of what it was given (AttributeError: 'str' object has no
    attribute 'n_images', 'dict' object has no attribute 'threads', ...), far from the call."""
    from heiindex.bench import run_bench, run_sharded_bench
    from heiindex.builds import build_index
    from heiindex.index import Index
    from heiindex.train import train
    from heiindex.train_hash import train_hash
    from heiindex.verify import verify

    index = Index.open(pipe.index_dir)
    for call, message in (
        (lambda: run_bench(str(pipe.index_dir)), "index must be an opened Index (Index.open(path)), got str"),
        (lambda: run_sharded_bench(index), "run_sharded_bench benches a sharded build (ShardedIndex, Ray"),
        (lambda: train(pipe.root, tmp_path / "r", config={"epochs": 1}), "config must be a TrainConfig, got dict"),
        (lambda: train(pipe.root, tmp_path / "r", {"embed_size": 8}), "model_config must be a ScanConfig, got dict"),
        (
            lambda: train_hash(pipe.model_dir, pipe.root, tmp_path / "h", {"bits": 8}),
            "hash_config must be a HashConfig, got dict",
        ),
        (
            lambda: build_index("test", pipe.root, pipe.model_dir, pipe.hash_dir, tmp_path / "x", prototypes="train"),
            "prototypes must be a PrototypeConfig, got str",
        ),
        # flags: "no" is truthy, and ran the exhaustive pass, resumed a run, read the models
        (lambda: run_bench(index, exhaustive="no"), "exhaustive must be true or false, got 'no'"),
        (lambda: train(pipe.root, tmp_path / "r", resume="no"), "resume must be true or false, got 'no'"),
        (lambda: verify(pipe.index_dir, models="yes"), "models must be true or false, got 'yes'"),
    ):
        with pytest.raises(HeiindexError, match="^" + re.escape(message)):
            call()
    assert list(tmp_path.iterdir()) == []


def test_require_path_refuses_what_no_file_can_be_opened_by():
    assert str(require_path("out", "a/b")) == "a/b"
    for bad in ("", None, 3):
        with pytest.raises(SettingError, match="out must be a path"):
            require_path("out", bad)
    with pytest.raises(SettingError, match=r"^out '/tmp/idx\\udce9bad' is not valid UTF-8") as e:
        require_path("out", "/tmp/idx\udce9bad")
    assert e.value.settings == ("out",)


def test_the_documented_warnings_are_exported_by_heiindex_errors():
    """The README names UnusedSettingWarning and VocabularyWarning; heiindex.errors did not export them."""
    import heiindex.errors as errors

    for name in ("UnusedSettingWarning", "VocabularyWarning", "LastBuiltWarning", "LeftoverWarning"):
        assert name in errors.__all__ and issubclass(getattr(errors, name), errors.HeiindexWarning)
