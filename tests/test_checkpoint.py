"""heiindex.checkpoint: model folders in safetensors + JSON, round trips and refusals."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import struct

import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
import torch
from safetensors.torch import load_file, save_file

from heiindex.attention import AttentionConfig
from heiindex.checkpoint import MODEL_FORMAT_VERSION, load_model, model_checksum, save_model
from heiindex.errors import DataError
from heiindex.model import ScanConfig, ScanModel
from heiindex.vocab import SPECIALS, Vocab

VOCAB = Vocab(list(SPECIALS) + ["a", "dog", "on", "the", "grass", "cat", "sits", "red", "car", "."])


def _model(seed: int = 0, **kw) -> ScanModel:
    torch.manual_seed(seed)
    cfg = {
        "vocab_size": len(VOCAB),
        "embed_size": 8,
        "word_dim": 6,
        "img_dim": 10,
        "attention": AttentionConfig(lambda_softmax=4.0),
    }
    cfg.update(kw)
    return ScanModel(ScanConfig(**cfg)).eval()


def _inputs():
    g = torch.Generator().manual_seed(5)
    images = torch.randn(4, 3, 10, generator=g)
    ids = [VOCAB.encode(t).ids for t in ("a dog on the grass", "a red car", "the cat sits on a car")]
    tokens = torch.tensor([i + [0] * (9 - len(i)) for i in ids])
    return images, tokens, torch.tensor([len(i) for i in ids])


@torch.no_grad()
def _scores(model: ScanModel) -> torch.Tensor:
    images, tokens, lengths = _inputs()
    return model.score(model.encode_captions(tokens, lengths), lengths, model.encode_images(images))


@pytest.fixture
def saved(tmp_path):
    model = _model()
    path = save_model(model, VOCAB, tmp_path / "m", extra={"note": "hello", "epoch": 3})
    return model, path


def _edit_config(path, fn) -> None:
    with pf.edited_json(path / "config.json") as cfg:
        fn(cfg)


# -- round trip -------------------------------------------------------------------------------


def test_round_trip_gives_identical_weights_and_scores(saved):
    model, path = saved
    loaded = load_model(path)
    assert loaded.model.config == model.config
    assert not loaded.model.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert torch.equal(_scores(loaded.model), _scores(model))
    assert loaded.vocab == VOCAB
    assert loaded.path == path
    assert loaded.checksum == model_checksum(model)
    assert loaded.info["note"] == "hello" and loaded.info["epoch"] == 3
    assert loaded.info["vocab_sha256"] == VOCAB.checksum


def test_folder_holds_json_and_safetensors_only(saved, tmp_path):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["format_version"] == MODEL_FORMAT_VERSION == 1
    assert cfg["kind"] == "scan"
    assert cfg["model"] == model.config.to_dict()
    assert cfg["info"]["weights_sha256"] == model_checksum(model)
    assert Vocab.load(path / "vocab.json") == VOCAB
    # the weights as readable as the other files (safetensors' save_file made them owner-only)
    assert len({(path / name).stat().st_mode for name in ("config.json", "model.safetensors", "vocab.json")}) == 1

    # safetensors: an 8-byte little-endian header length, a JSON header, raw tensor bytes; no pickle
    raw = (path / "model.safetensors").read_bytes()
    assert raw[:1] != b"\x80" and raw[:2] != b"PK"  # neither a pickle stream nor a torch.save zip
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    assert set(header) == set(model.state_dict())
    assert {v["dtype"] for v in header.values()} == {"F32"}
    assert header["img_enc.fc.weight"]["shape"] == [8, 10]


def test_loading_never_unpickles(saved, monkeypatch):
    model, path = saved

    why = "load_model must not unpickle"
    pf.forbid(monkeypatch, why, (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"))
    loaded = load_model(path)
    assert torch.equal(_scores(loaded.model), _scores(model))


def test_checksum_tracks_every_weight():
    a, b = _model(0), _model(0)
    assert model_checksum(a) == model_checksum(b)
    with torch.no_grad():
        b.txt_enc.rnn.bias_hh_l0_reverse[2] += 1e-6
    assert model_checksum(a) != model_checksum(b)
    assert model_checksum(_model(1)) != model_checksum(a)


def test_save_replaces_an_older_folder(tmp_path):
    path = tmp_path / "m"
    save_model(_model(0), VOCAB, path)
    save_model(_model(1), VOCAB, path)
    assert load_model(path).checksum == model_checksum(_model(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_full_disk_while_saving_the_training_state_is_a_clear_error(tmp_path, monkeypatch):
    """torch.save's own writer raised a RuntimeError ("unexpected pos ...") on a full disk: a
    traceback from train. The state is now written as bytes, so a full disk is an OSError that
    the atomic write names; the folder there is kept."""
    import errno
    from pathlib import Path

    path = tmp_path / "m"
    save_model(_model(0), VOCAB, path, state={"epoch": 1})
    real = Path.write_bytes

    def full(self, data):
        if self.name == "train_state.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(DataError, match="could not be written: no space left on its disk"):
        save_model(_model(1), VOCAB, path, state={"epoch": 2, "weights": torch.zeros(10)})
    assert load_model(path).checksum == model_checksum(_model(0))
    monkeypatch.undo()
    save_model(_model(1), VOCAB, path, state={"epoch": 2, "weights": torch.arange(3.0)})
    got = torch.load(path / "train_state.pt", weights_only=True)
    assert got["epoch"] == 2 and torch.equal(got["weights"], torch.arange(3.0))


def test_save_refuses_a_vocab_of_another_size(tmp_path):
    with pytest.raises(ValueError, match="vocab has 14 words, the model 15"):
        save_model(_model(vocab_size=15), VOCAB, tmp_path / "m")
    assert not (tmp_path / "m").exists()


# -- refusals ---------------------------------------------------------------------------------


def test_tampered_weights_are_refused(saved):
    _, path = saved
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    state["img_enc.fc.weight"][0, 0] += 0.5
    save_file(state, str(weights))
    with pytest.raises(DataError, match="checksum differs from config.json; the folder was modified") as e:
        load_model(path)
    assert e.value.path == weights


def test_corrupt_weights_file_is_a_data_error(saved):
    """A weights file that is not safetensors at all (truncated) must give DataError naming it."""
    _, path = saved
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(DataError) as e:
        load_model(path)
    assert e.value.path == weights


def test_a_changed_vocabulary_file_is_refused(saved):
    """Two words swapped in a model folder's vocab.json loaded silently, and every query with
    either word was encoded as the other."""
    _, path = saved
    pf.swap_words(path / "vocab.json", "dog", "cat")
    with pytest.raises(
        DataError, match="vocab.json: vocabulary checksum differs from config.json; the folder was modified"
    ):
        load_model(path)


def test_weights_holding_nan_are_refused_by_name(saved):
    _, path = saved
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    name = sorted(state)[1]
    state[name][0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(DataError, match=rf'model.safetensors: tensor "{name}" holds NaN or inf values'):
        load_model(path)


def test_weights_of_another_shape_are_refused(saved):
    _, path = saved
    _edit_config(path, lambda c: c["model"].update(embed_size=16))
    with pytest.raises(DataError, match="weights do not fit the config") as e:
        load_model(path)
    assert e.value.path == path / "model.safetensors"
    assert "\n" not in str(e.value)  # torch's message runs over several lines; an error is one


@pytest.mark.parametrize(
    "edit, file, detail",
    [
        (lambda c: c["model"].update(vocab_size=99), "vocab.json", "14 words, the model config says 99"),
        (
            lambda c: c["model"].update(bogus=1),
            "config.json",
            r"field \"model\" holds unknown fields \['bogus'\]; known: ",
        ),
        (
            lambda c: c["model"]["attention"].update(agg="median"),
            "config.json",
            'field "model" is not a valid SCAN config',
        ),
        (lambda c: c["model"].pop("vocab_size"), "config.json", ': field "model.vocab_size" is missing$'),
        # these named ScanConfig.__init__, a dict update or a bare key instead of the field
        (lambda c: c.pop("model"), "config.json", ': field "model" is missing$'),
        (lambda c: c.update(model="x"), "config.json", ": field \"model\" is not an object \\(got 'x'\\)$"),
        (lambda c: c["model"].update(attention="x"), "config.json", ': field "model.attention" is not an object'),
        (
            lambda c: c["model"]["attention"].update(k=1),
            "config.json",
            r"\"model.attention\" holds unknown fields \['k'\]",
        ),
        (
            lambda c: c.update(format_version=2),
            "config.json",
            "expected format_version 1 and kind 'scan', got format_version 2 and kind 'scan'",
        ),
        (lambda c: c.update(kind="vse"), "config.json", "expected format_version 1 and kind 'scan', got .* kind 'vse'"),
        # each reached torch: the GRU's TypeError, the allocator's "can't allocate memory", a
        # billion layers built; and a raw AttributeError for "info"
        (lambda c: c["model"].update(bi_gru="yes"), "config.json", "bi_gru must be true or false, got 'yes'"),
        (lambda c: c["model"].update(embed_size=10**12), "config.json", "embed_size must be .*at most 65536"),
        (lambda c: c["model"].update(num_layers=10**9), "config.json", "num_layers must be .*at most 32"),
        (lambda c: c.update(info="x"), "config.json", 'field "info" must be an object, got str'),
    ],
    ids=[
        "vocab_size",
        "unknown_field",
        "bad_attention",
        "missing_field",
        "no_model",
        "model_not_object",
        "attention_not_object",
        "unknown_attention_field",
        "format_version",
        "kind",
        "bool_field",
        "huge_embed",
        "huge_layers",
        "info",
    ],
)
def test_wrong_config_is_a_data_error(saved, edit, file, detail):
    _, path = saved
    _edit_config(path, edit)
    with pytest.raises(DataError, match=detail) as e:
        load_model(path)
    assert e.value.path == path / file


def test_missing_or_unreadable_files_are_data_errors(saved, tmp_path):
    _, path = saved
    with pytest.raises(DataError, match="no model config here") as e:
        load_model(tmp_path / "nowhere")
    assert e.value.path == tmp_path / "nowhere" / "config.json"

    run = tmp_path / "run"  # a `train` run folder: its models are in best/ and last/
    shutil.copytree(path, run / "best")
    with pytest.raises(
        DataError, match=f"no model config here: this is a training run; give its best model, {run / 'best'}$"
    ):
        load_model(run)
    assert load_model(run / "best").checksum == load_model(path).checksum

    (path / "model.safetensors").unlink()
    with pytest.raises(DataError, match="weights file missing"):
        load_model(path)

    (path / "vocab.json").unlink()
    with pytest.raises(DataError, match="vocab file not found"):
        load_model(path)

    (path / "config.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_model(path)
    (path / "config.json").write_text('"scan"')  # JSON, but not an object
    with pytest.raises(DataError, match="config.json: must hold a JSON object, got str"):
        load_model(path)


# -- a model against a store --------------------------------------------------------------------


def test_check_store_refuses_another_vocabulary_or_feature_size(saved):
    """evaluate and train-hash encoded a store tokenised with another vocabulary (its ids name
    other words) and reported numbers; a feature size mismatch was a matmul RuntimeError."""
    from types import SimpleNamespace

    from heiindex.errors import ModelMismatchError

    loaded = load_model(saved[1])

    def store(sha: str, dim: int):
        return SimpleNamespace(
            path=saved[1].parent / "store" / "test", manifest={"vocab": {"sha256": sha, "size": 5}}, feature_dim=dim
        )

    loaded.check_store(store(VOCAB.checksum, 10))  # fits: no error
    with pytest.raises(
        ModelMismatchError, match=r"store .*test was tokenised with another vocabulary than model .*m: "
    ) as info:
        loaded.check_store(store("0" * 64, 10))
    assert str(info.value).endswith(
        f"with the model's vocabulary, {loaded.path / 'vocab.json'}, or train a model on this store"
    )
    with pytest.raises(ModelMismatchError, match=r"test has region features of size 2048, model .*m takes 10$"):
        loaded.check_store(store(VOCAB.checksum, 2048))


def test_encode_split_checks_the_store_first(saved):
    """A Python caller of encode_split was not stopped: a store of another vocabulary encoded
    silently, one of a larger vocabulary was an IndexError in the embedding."""
    from types import SimpleNamespace

    from heiindex.encode import encode_split
    from heiindex.errors import ModelMismatchError

    loaded = load_model(saved[1])
    n = loaded.model.config.vocab_size

    def store(sha: str, size: int, dim: int):  # no data: any encoding would fail on it
        return SimpleNamespace(path="st/test", manifest={"vocab": {"sha256": sha, "size": size}}, feature_dim=dim)

    with pytest.raises(ModelMismatchError, match="tokenised with another vocabulary than model"):
        encode_split(loaded, store("0" * 64, n, 10))
    for bad, detail in (
        (store("0" * 64, n + 1, 10), f"st/test was tokenised with a vocabulary of {n + 1} words, the model knows {n}$"),
        (store("0" * 64, n, 2048), "st/test has region features of size 2048, the model takes 10$"),
    ):
        with pytest.raises(ModelMismatchError, match=detail):
            encode_split(loaded.model, bad)  # a bare model: no vocabulary to compare, but the sizes


def test_model_checksum_hashes_names_shapes_and_float32_bytes():
    model = _model()
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    assert model_checksum(model) == h.hexdigest()


def test_a_model_folder_without_a_recorded_checksum_still_has_one(tmp_path):
    model = _model()
    save_model(model, VOCAB, tmp_path / "m")
    with pf.edited_json(tmp_path / "m" / "config.json") as cfg:
        del cfg["info"]["weights_sha256"]
    assert load_model(tmp_path / "m").checksum == model_checksum(model)
