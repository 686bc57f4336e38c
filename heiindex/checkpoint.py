"""Model folders: weights in safetensors, hyper-parameters and provenance in JSON.

A model folder holds ``config.json`` (format version, ``ScanConfig``, the data manifest
checksum it was trained on, training metrics), ``model.safetensors`` and ``vocab.json`` (SCAN
format). Loading never unpickles anything: safetensors holds tensors only.
What this module must not do: train or score.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save

from .attention_config import ATTENTION_FIELDS
from .errors import DataError, ModelMismatchError, one_line
from .manifests import config_section, read_json_object, write_json
from .model import ScanConfig, ScanModel
from .outputs import atomic_dir
from .settings import require_path
from .store import SplitStore
from .vocab import Vocab

__all__ = [
    "MODEL_FORMAT_VERSION",
    "LoadedModel",
    "check_encodable",
    "load_model",
    "load_weights",
    "model_checksum",
    "read_model_config",
    "save_model",
]

M = TypeVar("M", bound=torch.nn.Module)

MODEL_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.json"
STATE_FILE = "train_state.pt"  # heiindex.train keeps its optimizer state beside the last model
# what a model folder holds: the kind and entries atomic_dir / check_output take
MODEL_OUTPUT = ("a model", (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE, STATE_FILE))


@dataclass
class LoadedModel:
    model: ScanModel
    vocab: Vocab
    path: Path
    info: dict = field(default_factory=dict)

    @property
    def checksum(self) -> str:
        return self.info["weights_sha256"]

    def check_store(self, store: SplitStore) -> None:
        """Refuse a store split this model cannot encode: tokenised with another vocabulary (its
        token ids would name other words), or with region features of another size."""
        if store.manifest["vocab"]["sha256"] != self.vocab.checksum:
            raise ModelMismatchError(
                f"store {store.path} was tokenised with another vocabulary than model {self.path}: ingest the "
                f"precomp split into a new store with the model's vocabulary, {self.path / VOCAB_FILE}, or train a "
                "model on this store"
            )
        check_encodable(self.model, store, f"model {self.path}")


def check_encodable(model: ScanModel, store: SplitStore, name: str = "the model") -> None:
    """``ModelMismatchError`` unless ``model`` can encode ``store``: region features of its
    ``img_dim``, and a vocabulary no larger than its own (a bare model has no vocabulary to
    compare words with; ``LoadedModel.check_store`` compares checksums)."""
    if store.feature_dim != model.config.img_dim:
        raise ModelMismatchError(
            f"store {store.path} has region features of size {store.feature_dim}, {name} takes {model.config.img_dim}"
        )
    words = int(store.manifest["vocab"]["size"])
    if words > model.config.vocab_size:
        raise ModelMismatchError(
            f"store {store.path} was tokenised with a vocabulary of {words} words, "
            f"{name} knows {model.config.vocab_size}"
        )


def model_checksum(model: ScanModel) -> str:
    """SHA-256 of the weights (names, shapes and float32 bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def write_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """``state`` as a safetensors file at ``path``, with the permissions of any other file written
    here (safetensors' own ``save_file`` creates it readable by its owner only, so a model
    shared with other accounts, e.g. Ray workers, could not be read)."""
    path.write_bytes(save({k: v.detach().contiguous().cpu() for k, v in state.items()}))


def save_model(
    model: ScanModel, vocab: Vocab, path: str | Path, extra: dict | None = None, state: dict | None = None
) -> Path:
    """Write a model folder atomically; ``extra`` (JSON) is stored under ``"info"``. ``state``:
    the training state to keep beside the weights (``STATE_FILE``, ``torch.save``), swapped in
    with them, so a folder never holds weights of one epoch and the state of another."""
    path = require_path("path", path)
    if len(vocab) != model.config.vocab_size:
        raise ValueError(f"vocab has {len(vocab)} words, the model {model.config.vocab_size}")
    with atomic_dir(path, *MODEL_OUTPUT) as tmp:
        if state is not None:  # serialised first, then written: a full disk is an OSError (ENOSPC),
            buffer = io.BytesIO()  # where torch.save's own writer raised a RuntimeError (a traceback)
            torch.save(state, buffer)
            (tmp / STATE_FILE).write_bytes(buffer.getbuffer())
        write_weights(model.state_dict(), tmp / WEIGHTS_FILE)
        vocab.save(tmp / VOCAB_FILE)
        info = dict(extra or {})
        info["weights_sha256"] = model_checksum(model)
        info["vocab_sha256"] = vocab.checksum
        write_json(
            tmp / CONFIG_FILE,
            {
                "format_version": MODEL_FORMAT_VERSION,
                "kind": "scan",
                "model": model.config.to_dict(),
                "info": info,
            },
        )
    return path


def read_model_config(path: str | Path) -> tuple[ScanConfig, dict]:
    """The ``ScanConfig`` of a model folder and its whole config.json, without the weights
    (``load_model`` reads them; a resumed run only needs the shape)."""
    cfg_path = Path(path) / CONFIG_FILE
    missing = "no model config here; is this a heiindex model folder?"
    if (Path(path) / "best" / CONFIG_FILE).exists():  # a `train` run folder, given for its model
        missing = f"no model config here: this is a training run; give its best model, {Path(path) / 'best'}"
    raw = read_json_object(cfg_path, missing)
    if raw.get("kind") == "hei-hash":
        raise DataError(
            cfg_path, "is a hash module's config (kind 'hei-hash'), not a matcher's: give the matcher's folder"
        )
    if raw.get("format_version") != MODEL_FORMAT_VERSION or raw.get("kind") != "scan":
        raise DataError(
            cfg_path,
            f"expected format_version {MODEL_FORMAT_VERSION} and kind 'scan', got format_version "
            f"{raw.get('format_version')!r} and kind {raw.get('kind')!r}",
        )
    model = config_section(cfg_path, raw, "model", tuple(ScanConfig.__dataclass_fields__), ("vocab_size",))
    if "attention" in model:
        config_section(cfg_path, raw, "model.attention", ATTENTION_FIELDS)
    try:
        return ScanConfig.from_dict(model), raw
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(cfg_path, f'field "model" is not a valid SCAN config ({exc})') from None


def check_finite_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """``DataError`` naming ``path`` and the first tensor of ``state`` holding NaN or inf: such a
    model scores NaN, which no ranking can use."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DataError(path, f'tensor "{name}" holds NaN or inf values (saved by a run that diverged?)')


def read_vocab(path: Path, config: ScanConfig) -> Vocab:
    """A model folder's vocabulary; ``DataError`` naming it where it does not load or holds another
    number of words than ``config`` says."""
    vocab = Vocab.load(path)
    if len(vocab) != config.vocab_size:
        raise DataError(path, f"{len(vocab)} words, the model config says {config.vocab_size}")
    return vocab


def load_weights(module: M, weights: Path) -> M:
    """``module`` with the safetensors file ``weights`` loaded, in eval mode (a matcher, a hash
    module); ``DataError`` naming the file where it is missing, unreadable, holds NaN or inf, or
    does not fit ``module``'s config."""
    if not weights.exists():
        raise DataError(weights, "weights file missing")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise DataError(weights, f"not a readable safetensors file ({one_line(exc)})") from None
    check_finite_weights(weights, state)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(weights, f"weights do not fit the config ({one_line(exc, limit=600)})") from None
    return module.eval()


def read_weights(weights: Path, config: ScanConfig) -> ScanModel:
    """The matcher of ``config`` with the weights file ``weights`` loaded (``load_weights``)."""
    return load_weights(ScanModel(config), weights)


def load_model(path: str | Path) -> LoadedModel:
    """Read a model folder written by ``save_model`` (or ``heiindex import-scan``)."""
    path = require_path("path", path)  # "" read the current folder, None failed in pathlib
    config, raw = read_model_config(path)
    vocab = read_vocab(path / VOCAB_FILE, config)
    weights = path / WEIGHTS_FILE
    info = raw.get("info", {})
    if not isinstance(info, dict):  # read as one below (a string raised a raw AttributeError)
        raise DataError(path / CONFIG_FILE, f'field "info" must be an object, got {type(info).__name__}')
    model = read_weights(weights, config)
    actual = model_checksum(model)
    if info.get("weights_sha256") not in (None, actual):
        raise DataError(weights, "weights checksum differs from config.json; the folder was modified")
    if info.get("vocab_sha256") not in (None, vocab.checksum):  # a changed vocab.json re-maps every query word
        raise DataError(path / VOCAB_FILE, "vocabulary checksum differs from config.json; the folder was modified")
    info["weights_sha256"] = actual
    return LoadedModel(model, vocab, path, info)
