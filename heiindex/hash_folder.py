"""Hash module folders: what ``heiindex train-hash`` writes and ``build`` / ``query`` load.

A folder holds ``config.json`` (kind "hei-hash", the ``HashConfig``, and ``info``: what it was
trained on, the matcher it was trained next to, its weights' checksum) and ``hash.safetensors``.
What this module must not do: train (``heiindex.train_hash``) or hash anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import LoadedModel, load_weights, write_weights
from .errors import DataError, HeiindexError, ModelMismatchError
from .hashing import HashConfig, HashModule
from .manifests import config_section, read_json_object, write_json
from .outputs import atomic_dir
from .settings import require_path

__all__ = [
    "HASH_FORMAT_VERSION",
    "HASH_OUTPUT",
    "HASH_WEIGHTS",
    "LoadedHash",
    "check_trained_next_to",
    "hash_checksum",
    "hash_config",
    "load_hash",
    "read_hash_weights",
    "save_hash",
    "write_hash",
]

HASH_FORMAT_VERSION = 1
HASH_WEIGHTS = "hash.safetensors"
HASH_OUTPUT = ("a hash module", (HASH_WEIGHTS, "config.json"))  # kind and entries (atomic_dir)


@dataclass
class LoadedHash:
    module: HashModule
    info: dict
    path: Path


def hash_checksum(module: HashModule) -> str:
    """SHA-256 of a hash module's weights (names and float32 bytes, in name order): what an index
    records of the module it was built with, and a hash folder of its own weights."""
    sha = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        sha.update(name.encode())
        sha.update(t.detach().float().cpu().numpy().tobytes())
    return sha.hexdigest()


def save_hash(module: HashModule, path: Path, info: dict) -> None:
    """Write a hash folder atomically; ``info`` (JSON) is stored with its weights' checksum."""
    path = require_path("path", path)
    with atomic_dir(path, *HASH_OUTPUT) as tmp:
        write_hash(module, tmp, info)


def write_hash(module: HashModule, folder: Path, info: dict) -> None:
    """A hash folder's files, written into ``folder``: the scratch folder of an ``atomic_dir`` of
    ``HASH_OUTPUT`` that the caller holds (``save_hash``, or ``train_hash`` for the whole run)."""
    info = {**info, "weights_sha256": hash_checksum(module)}
    write_weights(module.state_dict(), folder / HASH_WEIGHTS)
    write_json(
        folder / "config.json",
        {"format_version": HASH_FORMAT_VERSION, "kind": "hei-hash", "hash": module.config.to_dict(), "info": info},
    )


def check_trained_next_to(info: dict, path: str | Path, matcher: LoadedModel) -> None:
    """``ModelMismatchError`` unless the hash module at ``path`` (its recorded ``info``) was trained
    next to ``matcher``, saying the two ways out."""
    trained = info.get("matcher_sha256")
    if trained != matcher.checksum:
        raise ModelMismatchError(
            f"hash module {path} was trained next to matcher {(trained or '?')[:12]}, not {matcher.checksum[:12]} "
            f"({matcher.path}): give the matcher it was trained next to, or train a hash module next to this "
            f"one (`heiindex train-hash --model {matcher.path} --store STORE --out DIR`, STORE the store it "
            "trained on) and give that"
        )


def hash_config(raw: dict, cfg_path: Path) -> HashConfig:
    """The ``HashConfig`` of a hash folder's parsed config.json; ``DataError`` naming it."""
    fields = tuple(HashConfig.__dataclass_fields__)
    section = config_section(cfg_path, raw, "hash", fields, ("embed_size",))  # None: train_hash fills it in
    try:
        return HashConfig(**section)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(cfg_path, f'field "hash" is not a valid hash config ({exc})') from None


def read_hash_weights(weights: Path, config: HashConfig) -> HashModule:
    """The hash module of ``config`` with ``weights`` loaded (``checkpoint.load_weights``: in eval
    mode; ``DataError`` naming the file where it is missing, unreadable, holds NaN or inf, or does
    not fit)."""
    return load_weights(HashModule(config), weights)


def load_hash(path: str | Path, matcher: LoadedModel | None = None) -> LoadedHash:
    """Load a hash folder; with ``matcher`` (a ``LoadedModel``), refuse one trained next to another matcher."""
    path = require_path("path", path)  # "" read the current folder, None failed in pathlib
    if matcher is not None and not isinstance(matcher, LoadedModel):  # a path failed on its .checksum
        raise HeiindexError(
            f"matcher must be a LoadedModel (heiindex.checkpoint.load_model(folder)), got {type(matcher).__name__}"
        )
    cfg_path = path / "config.json"
    raw = read_json_object(cfg_path, "no hash module config here")
    if raw.get("kind") == "scan":
        raise DataError(
            cfg_path, "is a matcher's config (kind 'scan'), not a hash module's: give the hash module's folder"
        )
    if raw.get("kind") != "hei-hash" or raw.get("format_version") != HASH_FORMAT_VERSION:
        raise DataError(cfg_path, f"expected kind 'hei-hash' and format_version {HASH_FORMAT_VERSION}")
    weights = path / HASH_WEIGHTS
    module = read_hash_weights(weights, hash_config(raw, cfg_path))
    info = raw.get("info", {})
    if not isinstance(info, dict):  # read as one below (a list raised a raw AttributeError)
        raise DataError(cfg_path, f'field "info" must be an object, got {type(info).__name__}')
    if info.get("weights_sha256") not in (None, hash_checksum(module)):  # none: written before it was recorded
        raise DataError(weights, "weights checksum differs from config.json; the folder was modified")
    if matcher is not None:
        check_trained_next_to(info, path, matcher)
    return LoadedHash(module, info, path)
