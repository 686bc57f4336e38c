"""Importing SCAN's released checkpoints (``model_best.pth.tar``) as heiindex model folders.

Checkpoints are built here in exactly SCAN's layout: ``torch.save({"epoch", "model", "best_rsum",
"opt", "Eiters"})`` with ``model = [img_enc.state_dict(), txt_enc.state_dict()]`` (SCAN's key
names: ``fc.*``; ``embed.*``, ``rnn.*``) and ``opt`` an ``argparse.Namespace`` carrying every option
SCAN's ``train.py`` defines plus ``vocab_size``. An imported model must score exactly as a model
holding the same weights; every malformed checkpoint must raise ``DataError`` naming the file and
the problem, and write nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

from heiindex.attention import AttentionConfig
from heiindex.checkpoint import load_model
from heiindex.errors import DataError, HeiindexError
from heiindex.model import ScanConfig, ScanModel
from heiindex.scan_import import AGG_FUNCS, import_scan_checkpoint
from heiindex.vocab import SPECIALS, Vocab

VOCAB_SIZE, EMBED, WORD_DIM, IMG_DIM = 20, 16, 8, 32


def scan_opt(**overrides) -> argparse.Namespace:
    """SCAN train.py's options (its defaults, with small sizes) plus ``vocab_size``."""
    opt = dict(
        data_path="./data/",
        data_name="coco_precomp",
        vocab_path="./vocab/",
        margin=0.2,
        num_epochs=30,
        batch_size=128,
        word_dim=WORD_DIM,
        embed_size=EMBED,
        grad_clip=2.0,
        num_layers=1,
        learning_rate=0.0002,
        lr_update=15,
        workers=10,
        log_step=10,
        val_step=500,
        logger_name="./runs/runX/log",
        model_name="./runs/runX/checkpoint",
        resume="",
        max_violation=True,
        img_dim=IMG_DIM,
        no_imgnorm=False,
        no_txtnorm=False,
        raw_feature_norm="clipped_l2norm",
        agg_func="LogSumExp",
        cross_attn="t2i",
        precomp_enc_type="basic",
        bi_gru=True,
        lambda_lse=6.0,
        lambda_softmax=9.0,
        vocab_size=VOCAB_SIZE,
    )
    opt.update(overrides)
    return argparse.Namespace(**opt)


def reference_model(opt: argparse.Namespace, seed: int = 0) -> ScanModel:
    """A heiindex model with the configuration ``opt`` describes, random weights (not zero biases)."""
    torch.manual_seed(seed)
    agg = {"LogSumExp": "lse", "Mean": "mean", "Max": "max", "Sum": "sum"}[opt.agg_func]
    config = ScanConfig(
        vocab_size=opt.vocab_size,
        embed_size=opt.embed_size,
        word_dim=opt.word_dim,
        img_dim=opt.img_dim,
        num_layers=opt.num_layers,
        bi_gru=opt.bi_gru,
        no_imgnorm=opt.no_imgnorm,
        no_txtnorm=getattr(opt, "no_txtnorm", False),
        attention=AttentionConfig(
            cross_attn=opt.cross_attn,
            raw_feature_norm=opt.raw_feature_norm,
            agg=agg,
            lambda_lse=opt.lambda_lse,
            lambda_softmax=opt.lambda_softmax,
        ),
    )
    model = ScanModel(config)
    with torch.no_grad():
        model.img_enc.fc.bias.uniform_(-0.1, 0.1)
    return model.eval()


def scan_checkpoint(model: ScanModel, opt: argparse.Namespace) -> dict:
    """The dict SCAN's train.py saves (``SCAN.state_dict()`` is ``[img_enc, txt_enc]``)."""
    return {
        "epoch": 17,
        "model": [model.img_enc.state_dict(), model.txt_enc.state_dict()],
        "best_rsum": 447.25,
        "opt": opt,
        "Eiters": 12345,
    }


def write_vocab(path: Path, n: int = VOCAB_SIZE) -> Path:
    Vocab(list(SPECIALS) + [f"word{i}" for i in range(n - len(SPECIALS))]).save(path)
    return path


def scores(model: ScanModel, seed: int = 1) -> torch.Tensor:
    """(captions, images) scores of random raw inputs, with ragged caption lengths."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(5, 7, model.config.img_dim, generator=g)
    tokens = torch.randint(0, model.config.vocab_size, (6, 9), generator=g)
    lengths = torch.tensor([9, 3, 1, 7, 9, 5])
    with torch.no_grad():
        words = model.encode_captions(tokens, lengths)
        return model.score(words, lengths, model.encode_images(images))


@pytest.fixture
def files(tmp_path):
    """``(checkpoint path, vocab path, out path)`` in ``tmp_path``."""
    return tmp_path / "model_best.pth.tar", write_vocab(tmp_path / "coco_precomp_vocab.json"), tmp_path / "imported"


# -- successful imports ---------------------------------------------------------------------


def assert_same_model(imported: ScanModel, reference: ScanModel) -> None:
    assert imported.config == reference.config
    ref_state = reference.state_dict()
    for k, v in imported.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    assert torch.equal(scores(imported), scores(reference))


def test_a_relative_checkpoint_path_is_recorded_whole(files, monkeypatch):
    """``imported_from`` named "model_best.pth.tar", which says nothing once the model moves."""
    ckpt, vocab, out = files
    opt = scan_opt()
    torch.save(scan_checkpoint(reference_model(opt), opt), ckpt)
    monkeypatch.chdir(ckpt.parent)
    import_scan_checkpoint(ckpt.name, vocab, out)
    assert load_model(out).info["imported_from"] == str(ckpt.resolve())


@pytest.mark.parametrize("agg_func", sorted(AGG_FUNCS))
@pytest.mark.parametrize("cross_attn", ["t2i", "i2t"])
@pytest.mark.parametrize("bi_gru", [True, False])
def test_import_scores_like_the_same_weights(files, bi_gru, cross_attn, agg_func):
    ckpt, vocab, out = files
    opt = scan_opt(bi_gru=bi_gru, cross_attn=cross_attn, agg_func=agg_func)
    ref = reference_model(opt)
    torch.save(scan_checkpoint(ref, opt), ckpt)

    assert import_scan_checkpoint(ckpt, vocab, out) == out
    loaded = load_model(out)
    assert loaded.model.config.bi_gru is bi_gru
    assert loaded.model.config.attention.cross_attn == cross_attn
    assert loaded.model.config.attention.agg == AGG_FUNCS[agg_func]
    assert_same_model(loaded.model, ref)
    assert loaded.vocab == Vocab.load(vocab)
    assert loaded.info["imported_from"] == str(ckpt.resolve())
    assert loaded.info["scan_epoch"] == 17
    assert loaded.info["scan_best_rsum"] == 447.25


@pytest.mark.parametrize(
    "overrides",
    [
        dict(raw_feature_norm="softmax", lambda_softmax=4.0),
        dict(raw_feature_norm="l1norm", agg_func="Mean", cross_attn="i2t"),
        dict(raw_feature_norm="no_norm", lambda_lse=2.5, no_imgnorm=True, no_txtnorm=True),
        dict(num_layers=2, bi_gru=True),
        dict(num_layers=2, bi_gru=False, cross_attn="i2t"),
    ],
    ids=["softmax", "l1norm-mean-i2t", "no_norm-nonorm", "2layers-bigru", "2layers-unigru"],
)
def test_import_other_options(files, overrides):
    ckpt, vocab, out = files
    opt = scan_opt(**overrides)
    ref = reference_model(opt, seed=3)
    torch.save(scan_checkpoint(ref, opt), ckpt)
    import_scan_checkpoint(ckpt, vocab, out)
    assert_same_model(load_model(out).model, ref)


def test_legacy_serialisation(files):
    """SCAN's checkpoints were written by PyTorch 0.3/0.4: the pre-zip format must load too."""
    ckpt, vocab, out = files
    opt = scan_opt()
    ref = reference_model(opt)
    torch.save(scan_checkpoint(ref, opt), ckpt, _use_new_zipfile_serialization=False)
    import_scan_checkpoint(ckpt, vocab, out)
    assert_same_model(load_model(out).model, ref)


def test_sizes_inferred_when_opt_lacks_them(files):
    ckpt, vocab, out = files
    opt = scan_opt(bi_gru=True, num_layers=2)
    ref = reference_model(opt)
    for key in (
        "embed_size",
        "img_dim",
        "vocab_size",
        "word_dim",
        "num_layers",
        "bi_gru",
        "no_txtnorm",
        "precomp_enc_type",
    ):
        delattr(opt, key)
    torch.save(scan_checkpoint(ref, opt), ckpt)
    import_scan_checkpoint(ckpt, vocab, out)
    loaded = load_model(out).model
    assert (loaded.config.embed_size, loaded.config.img_dim, loaded.config.word_dim) == (EMBED, IMG_DIM, WORD_DIM)
    assert (loaded.config.num_layers, loaded.config.bi_gru, loaded.config.no_txtnorm) == (2, True, False)
    assert_same_model(loaded, ref)


def test_weights_on_another_dtype_and_epoch_missing(files):
    """float64 weights are converted; absent epoch/best_rsum are recorded as null."""
    ckpt, vocab, out = files
    opt = scan_opt()
    ref = reference_model(opt)
    raw = scan_checkpoint(ref, opt)
    raw["model"] = [collections.OrderedDict((k, v.double()) for k, v in s.items()) for s in raw["model"]]
    del raw["epoch"], raw["best_rsum"]
    torch.save(raw, ckpt)
    import_scan_checkpoint(ckpt, vocab, out)
    loaded = load_model(out)
    assert_same_model(loaded.model, ref)
    assert loaded.info["scan_epoch"] is None and loaded.info["scan_best_rsum"] is None
    assert json.loads((out / "config.json").read_text())["info"]["scan_opt"]["agg_func"] == "LogSumExp"


def test_import_replaces_an_existing_folder_and_keeps_the_rng(files):
    ckpt, vocab, out = files
    opt = scan_opt()
    torch.save(scan_checkpoint(reference_model(opt), opt), ckpt)
    import_scan_checkpoint(ckpt, vocab, out)
    opt2 = scan_opt(agg_func="Max")
    ref2 = reference_model(opt2, seed=9)
    torch.save(scan_checkpoint(ref2, opt2), ckpt)
    state = torch.get_rng_state()
    import_scan_checkpoint(ckpt, vocab, out)
    assert torch.equal(torch.get_rng_state(), state)
    assert_same_model(load_model(out).model, ref2)


# -- refusals -------------------------------------------------------------------------------

UNPICKLED: list[str] = []


def _record(tag: str) -> str:
    """Would run while unpickling a hostile object; it must never be called."""
    UNPICKLED.append(tag)
    return tag


class Hostile:
    def __reduce__(self):
        return (_record, ("hostile object was unpickled",))


class FromABlockedModule:
    """Unpickled, it would call os.getcwd (harmless here): torch blocks the os module outright, and
    says so in another form ("unsupported GLOBAL posix.getcwd whose module posix is blocked")."""

    def __reduce__(self):
        return (os.getcwd, ())


class CustomStateDict(collections.OrderedDict):
    """A state-dict container that is not a plain OrderedDict: not allowed."""


def _mutate_state(index: int, fn):
    def apply(raw: dict) -> dict:
        fn(raw["model"][index])
        return raw

    return apply


def _set_opt(**kw):
    def apply(raw: dict) -> dict:
        for k, v in kw.items():
            setattr(raw["opt"], k, v)
        return raw

    return apply


def _del_opt(key):
    def apply(raw: dict) -> dict:
        delattr(raw["opt"], key)
        return raw

    return apply


def _nan(state):
    state["embed.weight"][3, 2] = float("nan")


# name -> (raw checkpoint dict -> object to torch.save, substrings the message must hold)
BAD_CHECKPOINTS = {
    "hostile_object": (
        lambda raw: {**raw, "Eiters": Hostile()},
        ["contains objects other than tensors and argparse.Namespace", "_record"],
    ),
    "blocked_module": (  # the message quoted torch's advice to load with weights_only=False
        lambda raw: {**raw, "Eiters": FromABlockedModule()},
        ["contains objects other than tensors and argparse.Namespace (it needs posix.getcwd); refusing to unpickle"],
    ),
    "custom_ordereddict": (
        lambda raw: {**raw, "model": [CustomStateDict(raw["model"][0]), raw["model"][1]]},
        ["contains objects other than tensors and argparse.Namespace", "CustomStateDict"],
    ),
    "path_in_opt": (
        _set_opt(data_path=pathlib.Path("/data")),
        ["contains objects other than tensors and argparse.Namespace", "Path"],
    ),
    "numpy_scalar": (
        lambda raw: {**raw, "best_rsum": np.float64(447.25)},
        ["contains objects other than tensors and argparse.Namespace"],
    ),
    "not_a_dict": (lambda raw: raw["model"], ["expected a dict with 'model' and 'opt' entries", "list"]),
    "no_model": (lambda raw: {k: v for k, v in raw.items() if k != "model"}, ["no 'model' entry"]),
    "no_opt": (lambda raw: {k: v for k, v in raw.items() if k != "opt"}, ["no 'opt' entry"]),
    "model_one_dict": (lambda raw: {**raw, "model": raw["model"][1]}, ["'model' must be a list of two state dicts"]),
    "model_three": (
        lambda raw: {**raw, "model": raw["model"] + [{}]},
        ["'model' must be a list of two state dicts", "list of 3"],
    ),
    "model_tensor_entry": (
        lambda raw: {**raw, "model": [raw["model"][0], torch.zeros(2)]},
        ["'model' must be a list of two state dicts", "Tensor"],
    ),
    "opt_not_namespace": (lambda raw: {**raw, "opt": "--bi_gru"}, ["'opt' must be SCAN's argparse.Namespace"]),
    "value_not_tensor": (
        _mutate_state(0, lambda s: s.__setitem__("fc.bias", [0.0] * EMBED)),
        ["model[0]['fc.bias']", "must be a tensor", "list"],
    ),
    "integer_tensor": (
        _mutate_state(1, lambda s: s.__setitem__("embed.weight", torch.zeros(VOCAB_SIZE, WORD_DIM, dtype=torch.long))),
        ["model[1]['embed.weight']", "floating point", "torch.int64"],
    ),
    "missing_fc_bias": (_mutate_state(0, lambda s: s.pop("fc.bias")), ["missing state-dict keys", "fc.bias"]),
    "missing_embed": (_mutate_state(1, lambda s: s.pop("embed.weight")), ["missing state-dict keys", "embed.weight"]),
    "missing_reverse": (
        _mutate_state(1, lambda s: s.pop("rnn.weight_hh_l0_reverse")),
        ["missing state-dict keys in model[1] (text encoder)", "rnn.weight_hh_l0_reverse"],
    ),
    "unexpected_key": (
        _mutate_state(0, lambda s: s.__setitem__("fc2.weight", torch.zeros(3, 3))),
        ["unexpected state-dict keys in model[0] (image encoder)", "fc2.weight"],
    ),
    "unexpected_layer_gap": (
        _mutate_state(1, lambda s: s.__setitem__("rnn.weight_ih_l2", torch.zeros(48, 16))),
        ["unexpected state-dict keys in model[1]", "rnn.weight_ih_l2"],
    ),
    "wrong_shape_bias": (
        _mutate_state(0, lambda s: s.__setitem__("fc.bias", torch.zeros(17))),
        ["model[0]['fc.bias']", "shape (17,)", "expected (16,)"],
    ),
    "wrong_shape_gru": (
        _mutate_state(1, lambda s: s.__setitem__("rnn.weight_hh_l0", torch.zeros(48, 12))),
        ["model[1]['rnn.weight_hh_l0']", "(48, 12)", "expected (48, 16)"],
    ),
    "fc_weight_rank": (
        _mutate_state(0, lambda s: s.__setitem__("fc.weight", torch.zeros(EMBED * IMG_DIM))),
        ["model[0]['fc.weight']", "non-empty matrix", "(512,)"],
    ),
    "nan_weight": (_mutate_state(1, _nan), ["model[1]['embed.weight']", "NaN or Inf"]),
    "opt_embed_size": (_set_opt(embed_size=24), ["opt.embed_size is 24", "fc.weight", "(16, 32)", "(24, 32)"]),
    "opt_img_dim": (_set_opt(img_dim=2048), ["opt.img_dim is 2048", "fc.weight", "(16, 32)", "(16, 2048)"]),
    "opt_vocab_size": (
        _set_opt(vocab_size=11352),
        ["opt.vocab_size is 11352", "embed.weight", "(20, 8)", "(11352, 8)"],
    ),
    "opt_word_dim": (_set_opt(word_dim=300), ["opt.word_dim is 300", "embed.weight", "(20, 8)", "(20, 300)"]),
    "opt_num_layers": (_set_opt(num_layers=2), ["opt.num_layers is 2", "1 layer(s)"]),
    "opt_bi_gru": (_set_opt(bi_gru=False), ["opt.bi_gru is False", "reverse-direction"]),
    "opt_bad_size_type": (_set_opt(embed_size="16"), ["opt.embed_size must be a positive integer"]),
    "backbone": (_set_opt(precomp_enc_type="backbone"), ["opt.precomp_enc_type is 'backbone'", "'basic'"]),
    "weight_norm": (_set_opt(precomp_enc_type="weight_norm"), ["opt.precomp_enc_type is 'weight_norm'"]),
    "weight_norm_keys": (
        _mutate_state(0, lambda s: s.update({"fc.weight_g": torch.ones(()), "fc.weight_v": s.pop("fc.weight")})),
        ["weight-normalised", "fc.weight_g"],
    ),
    "agg_func": (_set_opt(agg_func="Median"), ["opt.agg_func is 'Median'", "LogSumExp"]),
    "agg_func_lowercase": (_set_opt(agg_func="lse"), ["opt.agg_func is 'lse'"]),
    "cross_attn": (_set_opt(cross_attn="both"), ["opt.cross_attn is 'both'", "t2i"]),
    "raw_feature_norm": (_set_opt(raw_feature_norm="l3norm"), ["opt.raw_feature_norm is 'l3norm'", "clipped_l2norm"]),
    "lambda_softmax": (_set_opt(lambda_softmax=-1.0), ["opt.lambda_softmax must be a positive number"]),
    "lambda_lse_str": (_set_opt(lambda_lse="6"), ["opt.lambda_lse must be a positive number"]),
    "no_imgnorm_str": (_set_opt(no_imgnorm="False"), ["opt.no_imgnorm must be True or False"]),
    "opt_lacks_cross_attn": (_del_opt("cross_attn"), ["'opt' lacks cross_attn"]),
    "opt_lacks_lambda_lse": (_del_opt("lambda_lse"), ["'opt' lacks lambda_lse"]),
}


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_malformed_checkpoint(files, case):
    ckpt, vocab, out = files
    make, expected = BAD_CHECKPOINTS[case]
    opt = scan_opt()
    torch.save(make(scan_checkpoint(reference_model(opt), opt)), ckpt)
    UNPICKLED.clear()
    with pytest.raises(DataError) as info:
        import_scan_checkpoint(ckpt, vocab, out)
    err = info.value
    assert isinstance(err, HeiindexError)
    assert err.path == ckpt and str(ckpt) in str(err)
    for text in expected:
        assert text in str(err), (text, str(err))
    assert "weights_only" not in str(err)  # never torch's advice to unpickle anyway
    assert UNPICKLED == []
    assert_nothing_written(out)


def _torch_bytes(tmp: Path) -> bytes:
    p = tmp / "ok.pt"
    torch.save({"a": torch.ones(100)}, p)
    return p.read_bytes()


BAD_FILES = {
    "text_file": (lambda tmp: b"this is not a checkpoint\n" * 20, "not a PyTorch checkpoint file"),
    "empty_file": (lambda tmp: b"", "not a PyTorch checkpoint file"),
    "truncated": (lambda tmp: _torch_bytes(tmp)[:300], "not a PyTorch checkpoint file"),
    "plain_pickle": (
        lambda tmp: __import__("pickle").dumps({"model": [], "opt": None}),
        "not a PyTorch checkpoint file",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_not_a_checkpoint(files, case):
    ckpt, vocab, out = files
    make, expected = BAD_FILES[case]
    ckpt.write_bytes(make(ckpt.parent))
    with pytest.raises(DataError) as info:
        import_scan_checkpoint(ckpt, vocab, out)
    assert info.value.path == ckpt and expected in str(info.value)
    assert_nothing_written(out)


def test_missing_checkpoint_and_folder(files):
    ckpt, vocab, out = files
    with pytest.raises(DataError, match="checkpoint file not found"):
        import_scan_checkpoint(ckpt, vocab, out)
    ckpt.mkdir()
    with pytest.raises(DataError, match="is a folder"):
        import_scan_checkpoint(ckpt, vocab, out)
    assert_nothing_written(out)


def test_vocab_size_mismatch(files):
    ckpt, vocab, out = files
    opt = scan_opt()
    torch.save(scan_checkpoint(reference_model(opt), opt), ckpt)
    write_vocab(vocab, VOCAB_SIZE - 1)
    with pytest.raises(DataError) as info:
        import_scan_checkpoint(ckpt, vocab, out)
    msg = str(info.value)
    assert info.value.path == vocab
    assert f"has {VOCAB_SIZE - 1} words" in msg and f"{VOCAB_SIZE} word embeddings" in msg and str(ckpt) in msg
    assert_nothing_written(out)


def test_bad_vocab_file(files):
    ckpt, vocab, out = files
    opt = scan_opt()
    torch.save(scan_checkpoint(reference_model(opt), opt), ckpt)
    vocab.write_text("{not json")
    with pytest.raises(DataError) as info:
        import_scan_checkpoint(ckpt, vocab, out)
    assert info.value.path == vocab
    assert_nothing_written(out)


def test_error_leaves_an_existing_folder_alone(files):
    ckpt, vocab, out = files
    opt = scan_opt()
    ref = reference_model(opt)
    torch.save(scan_checkpoint(ref, opt), ckpt)
    import_scan_checkpoint(ckpt, vocab, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    opt.embed_size = 99
    torch.save(scan_checkpoint(ref, opt), ckpt)
    with pytest.raises(DataError, match="opt.embed_size is 99"):
        import_scan_checkpoint(ckpt, vocab, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
