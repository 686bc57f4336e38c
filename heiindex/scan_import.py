"""Import a checkpoint released by SCAN (``model_best.pth.tar``) as a heiindex model folder.

SCAN's ``train.py`` saves ``torch.save({"epoch", "model", "best_rsum", "opt", "Eiters"})`` where
``model`` is ``[img_enc.state_dict(), txt_enc.state_dict()]`` and ``opt`` is the
``argparse.Namespace`` of its command line (plus ``vocab_size``). The file is read with
``torch.load(weights_only=True)`` allowing only ``argparse.Namespace`` beyond tensors and plain
containers, so a checkpoint can never run code while it is read. Its options are mapped to
``ScanConfig``/``AttentionConfig``, every size is checked against the tensors, and the weights are
written with ``heiindex.checkpoint.save_model`` (atomically: nothing is written on error).

What this module must not do: train, score, or unpickle anything but tensors and the namespace.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .attention import CROSS_ATTN, RAW_FEATURE_NORMS, AttentionConfig
from .checkpoint import save_model
from .errors import DataError
from .model import ScanConfig, ScanModel
from .vocab import Vocab

__all__ = ["AGG_FUNCS", "import_scan_checkpoint", "read_scan_checkpoint"]

# SCAN's --agg_func values -> heiindex's AttentionConfig.agg.
AGG_FUNCS = {"LogSumExp": "lse", "Mean": "mean", "Max": "max", "Sum": "sum"}
_GRU_PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_ENCODERS = ("image encoder", "text encoder")
# Options that decide the score and cannot be read off the tensors: the checkpoint must say.
_REQUIRED_OPTS = ("cross_attn", "agg_func", "raw_feature_norm", "lambda_softmax", "no_imgnorm")


def import_scan_checkpoint(checkpoint: Path, vocab: Path, out: Path) -> Path:
    """Convert SCAN's ``checkpoint`` with its vocabulary JSON ``vocab`` into the model folder ``out``.

    Returns ``out``. Any malformation of either file raises ``DataError`` naming the file and the
    problem, and leaves ``out`` as it was (an existing folder at ``out`` is replaced on success).
    """
    checkpoint, vocab, out = Path(checkpoint), Path(vocab), Path(out)
    model, info = read_scan_checkpoint(checkpoint)
    words = Vocab.load(vocab)
    n_rows = model.config.vocab_size
    if len(words) != n_rows:
        raise DataError(
            vocab,
            f"has {len(words)} words, but the checkpoint {checkpoint} has {n_rows} word embeddings "
            "(rows of embed.weight); use the vocabulary the checkpoint was trained with",
        )
    return save_model(model, words, out, extra=info)


def read_scan_checkpoint(checkpoint: Path) -> tuple[ScanModel, dict]:
    """Read and validate SCAN's ``checkpoint``: ``(model in eval mode, provenance info)``."""
    checkpoint = Path(checkpoint)
    raw = _load(checkpoint)

    def fail(problem: str) -> DataError:
        return DataError(checkpoint, problem)

    if not isinstance(raw, dict):
        raise fail(f"expected a dict with 'model' and 'opt' entries (SCAN's format), got {type(raw).__name__}")
    for key in ("model", "opt"):
        if key not in raw:
            raise fail(f"no '{key}' entry; a SCAN checkpoint has 'model' and 'opt' (entries here: {_names(raw)})")
    states = raw["model"]
    if not isinstance(states, (list, tuple)) or len(states) != 2 or not all(isinstance(s, dict) for s in states):
        raise fail(
            "'model' must be a list of two state dicts [image encoder, text encoder] (SCAN's format), "
            f"got {_describe(states)}"
        )
    img, txt = states
    for i, state in enumerate(states):
        for k, v in state.items():
            if not isinstance(k, str):
                raise fail(f"model[{i}] ({_ENCODERS[i]}) has a non-string key {k!r}")
            if not isinstance(v, Tensor):
                raise fail(f"model[{i}]['{k}'] ({_ENCODERS[i]}) must be a tensor, got {type(v).__name__}")
            if not v.is_floating_point():
                raise fail(f"model[{i}]['{k}'] ({_ENCODERS[i]}) must be floating point, got {v.dtype}")
    opt = raw["opt"]
    if isinstance(opt, argparse.Namespace):
        opt = vars(opt)
    if not isinstance(opt, dict):
        raise fail(f"'opt' must be SCAN's argparse.Namespace of options, got {type(opt).__name__}")

    config = _config(checkpoint, opt, img, txt)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: keep the caller's RNG
        model = ScanModel(config)
    _check_state(checkpoint, model, img, txt)
    state = {f"img_enc.{k}": v for k, v in img.items()}
    state.update({f"txt_enc.{k}": v for k, v in txt.items()})
    for name, t in state.items():
        if not bool(torch.isfinite(t).all()):
            i = 0 if name.startswith("img_enc.") else 1
            raise fail(f"model[{i}]['{name.split('.', 1)[1]}'] ({_ENCODERS[i]}) has NaN or Inf values")
    model.load_state_dict({k: v.detach().to(device="cpu", dtype=torch.float32) for k, v in state.items()})
    model.eval()
    info = {
        "imported_from": str(Path(checkpoint).resolve()),  # a relative path named nothing once moved from
        "scan_epoch": _json_number(raw.get("epoch")),
        "scan_best_rsum": _json_number(raw.get("best_rsum")),
        "scan_opt": {k: opt[k] for k in sorted(k for k in opt if isinstance(k, str)) if _json_scalar(opt[k])},
    }
    return model, info


# ---------------------------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------------------------


def _load(checkpoint: Path) -> object:
    if not checkpoint.exists():
        raise DataError(checkpoint, "checkpoint file not found")
    if checkpoint.is_dir():
        raise DataError(checkpoint, "is a folder; expected SCAN's checkpoint file (e.g. model_best.pth.tar)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # A plain pickle of another protocol makes torch warn before it fails; the error says it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        # "Unsupported global: GLOBAL x.Y was not an allowed global ...", or, where a module is
        # blocked, "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
        found = re.search(r"unsupported global:? (?:GLOBAL )?(\S+)", msg, re.I)
        if found:
            what = f" (it needs {found.group(1)})"
            raise DataError(
                checkpoint,
                "contains objects other than tensors and argparse.Namespace"
                f"{what}; refusing to unpickle it, as that could run arbitrary code",
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|$)", msg, re.S)
        # never torch's own advice (to load with weights_only=False, which could run code)
        said = [p.strip() for p in msg.split("\n\n") if p.strip() and "weights_only" not in p]
        detail_text = _short(detail.group(1) if detail else said[0] if said else "torch refused to read it safely")
        raise DataError(checkpoint, f"not a PyTorch checkpoint file that can be read safely ({detail_text})") from None
    except OSError as exc:
        raise DataError(checkpoint, f"cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, ... for non-torch files
        raise DataError(
            checkpoint, f"not a PyTorch checkpoint file ({type(exc).__name__}: {_short(str(exc))})"
        ) from None


# ---------------------------------------------------------------------------------------------
# Options -> config
# ---------------------------------------------------------------------------------------------


def _config(checkpoint: Path, opt: dict, img: dict, txt: dict) -> ScanConfig:
    def fail(problem: str) -> DataError:
        return DataError(checkpoint, problem)

    missing_opts = [k for k in _REQUIRED_OPTS if k not in opt]
    if opt.get("agg_func") == "LogSumExp" and "lambda_lse" not in opt:
        missing_opts.append("lambda_lse")
    if missing_opts:
        raise fail(f"'opt' lacks {', '.join(missing_opts)} (SCAN's options that define the score)")

    enc_type = opt.get("precomp_enc_type", "basic")
    if enc_type != "basic":
        raise fail(
            f"opt.precomp_enc_type is {enc_type!r}: only SCAN's 'basic' image encoder (one linear layer, "
            "fc.weight/fc.bias) is supported"
        )
    if "fc.weight_g" in img or "fc.weight_v" in img:
        raise fail(
            "the image encoder is weight-normalised (fc.weight_g/fc.weight_v, SCAN's 'weight_norm' "
            "precomp_enc_type); only the 'basic' encoder is supported"
        )

    cross_attn = opt["cross_attn"]
    if cross_attn not in CROSS_ATTN:
        raise fail(f"opt.cross_attn is {cross_attn!r}, expected one of {list(CROSS_ATTN)}")
    agg_func = opt["agg_func"]
    if agg_func not in AGG_FUNCS:
        raise fail(f"opt.agg_func is {agg_func!r}, expected one of {list(AGG_FUNCS)}")
    norm = opt["raw_feature_norm"]
    if norm not in RAW_FEATURE_NORMS:
        raise fail(f"opt.raw_feature_norm is {norm!r}, expected one of {list(RAW_FEATURE_NORMS)}")
    lambda_softmax = _positive(checkpoint, opt, "lambda_softmax")
    # lambda_lse only matters for LogSumExp; other aggregations keep heiindex's default for it.
    lambda_lse = _positive(checkpoint, opt, "lambda_lse") if agg_func == "LogSumExp" else AttentionConfig.lambda_lse
    no_imgnorm = _flag(checkpoint, opt, "no_imgnorm", None)
    no_txtnorm = _flag(checkpoint, opt, "no_txtnorm", False)

    # The keys every SCAN basic/GRU checkpoint has; sizes are read off them.
    absent = [(0, k) for k in ("fc.weight", "fc.bias") if k not in img]
    absent += [(1, k) for k in ("embed.weight", *(f"rnn.{p}_l0" for p in _GRU_PARAMS)) if k not in txt]
    if absent:
        raise fail("missing state-dict keys: " + ", ".join(f"model[{i}]['{k}'] ({_ENCODERS[i]})" for i, k in absent))
    fc, embed = img["fc.weight"], txt["embed.weight"]
    for i, key, t in ((0, "fc.weight", fc), (1, "embed.weight", embed)):
        if t.dim() != 2 or 0 in t.shape:
            raise fail(f"model[{i}]['{key}'] ({_ENCODERS[i]}) must be a non-empty matrix, got shape {_shape(t)}")

    # Sizes from the tensors, cross-checked with opt where it states them.
    embed_size, img_dim = fc.shape
    vocab_size, word_dim = embed.shape
    layers = 0
    while f"rnn.weight_ih_l{layers}" in txt:
        layers += 1
    bi_gru = any(k.startswith("rnn.") and k.endswith("_reverse") for k in txt)
    sizes = {
        "embed_size": (embed_size, 0, "fc.weight", lambda v: (v, img_dim)),
        "img_dim": (img_dim, 0, "fc.weight", lambda v: (embed_size, v)),
        "vocab_size": (vocab_size, 1, "embed.weight", lambda v: (v, word_dim)),
        "word_dim": (word_dim, 1, "embed.weight", lambda v: (vocab_size, v)),
    }
    for name, (actual, i, key, expected_shape) in sizes.items():
        if name not in opt:
            continue
        stated = opt[name]
        if not _is_int(stated) or stated < 1:
            raise fail(f"opt.{name} must be a positive integer, got {stated!r}")
        if stated != actual:
            t = img[key] if i == 0 else txt[key]
            raise fail(
                f"opt.{name} is {stated}, but model[{i}]['{key}'] ({_ENCODERS[i]}) has shape {_shape(t)} "
                f"(opt implies {tuple(expected_shape(stated))})"
            )
    if "num_layers" in opt:
        stated = opt["num_layers"]
        if not _is_int(stated) or stated < 1:
            raise fail(f"opt.num_layers must be a positive integer, got {stated!r}")
        if stated != layers:
            raise fail(
                f"opt.num_layers is {stated}, but the text encoder (model[1]) has GRU weights for {layers} "
                f"layer(s) (rnn.weight_ih_l0 .. rnn.weight_ih_l{layers - 1})"
            )
    if "bi_gru" in opt:
        stated = _flag(checkpoint, opt, "bi_gru", None)
        if stated != bi_gru:
            have = "has" if bi_gru else "has no"
            raise fail(
                f"opt.bi_gru is {stated}, but the text encoder (model[1]) {have} reverse-direction GRU weights "
                "(rnn.*_reverse)"
            )

    try:
        attention = AttentionConfig(
            cross_attn=cross_attn,
            raw_feature_norm=norm,
            agg=AGG_FUNCS[agg_func],
            lambda_lse=lambda_lse,
            lambda_softmax=lambda_softmax,
        )
    except ValueError as exc:
        raise fail(f"unsupported attention options in 'opt' ({exc})") from None
    return ScanConfig(
        vocab_size=vocab_size,
        embed_size=embed_size,
        word_dim=word_dim,
        img_dim=img_dim,
        num_layers=layers,
        bi_gru=bi_gru,
        no_imgnorm=no_imgnorm,
        no_txtnorm=no_txtnorm,
        attention=attention,
    )


def _check_state(checkpoint: Path, ref: ScanModel, img: dict, txt: dict) -> None:
    """Every key the encoders of ``ref`` have, nothing else, each with the right shape."""
    problems: list[str] = []
    for i, (state, enc) in enumerate(((img, ref.img_enc), (txt, ref.txt_enc))):
        expected = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing:
            problems.append(f"missing state-dict keys in model[{i}] ({_ENCODERS[i]}): {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected state-dict keys in model[{i}] ({_ENCODERS[i]}): {', '.join(unexpected)}")
        for k, shape in expected.items():
            if k in state and tuple(state[k].shape) != shape:
                problems.append(f"model[{i}]['{k}'] ({_ENCODERS[i]}) has shape {_shape(state[k])}, expected {shape}")
    if problems:
        raise DataError(checkpoint, "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(checkpoint: Path, opt: dict, name: str) -> float:
    v = opt[name]
    if not _is_number(v) or v <= 0:
        raise DataError(checkpoint, f"opt.{name} must be a positive number, got {v!r}")
    return float(v)


def _flag(checkpoint: Path, opt: dict, name: str, default: bool | None) -> bool:
    v = opt.get(name, default)
    if isinstance(v, int) and v in (0, 1):  # bool, or 0/1 from an old pickle
        return bool(v)
    raise DataError(checkpoint, f"opt.{name} must be True or False, got {v!r}")


def _json_number(v: object) -> int | float | None:
    if isinstance(v, Tensor) and v.numel() == 1:
        v = v.item()
    if _is_number(v):
        return v
    return None


def _json_scalar(v: object) -> bool:
    return v is None or isinstance(v, (str, bool)) or _is_number(v)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _names(d: dict) -> str:
    return ", ".join(repr(k) for k in list(d)[:10]) or "none"


def _describe(x: object) -> str:
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__} of {len(x)}: [{', '.join(type(v).__name__ for v in x[:5])}]"
    return type(x).__name__


def _short(msg: str, limit: int = 200) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
