"""Prototype image codes: database images described by the captions of another split.

Caption codes generalise to new captions far better than image codes to new images (on coco-sim,
new captions of training images find them 98% of the time by Hamming top-100, new images are
found 94-95% of the time; ``benchmarks/RESULTS.md``, the hash study). At build time the database
images are known, and the frozen matcher can score them against the captions of another split
(the training split). Each image's code then takes a share of the caption side's outputs for the
captions the matcher ranks highest for it:

    code = sign(weight * u(h_img) + (1 - weight) * u(mean over its top k captions of tanh(h_txt)))

``h_img`` / ``h_txt`` are the hash layers' pre-sign outputs and ``u`` scales a vector to unit
norm. The matcher scores only each image's ``preselect`` Hamming-nearest captions (by the
image's own code), so a build costs ``images x preselect`` matcher pairs, not ``images x
captions``. Nothing is trained: the hash module and the matcher stay as they are, and the
caption codes are unchanged. A new image hashed at query time (``Index.search_regions``) gets
its plain code: there are no captions scored for it.

Memory: the describing split's captions are held as int32 token ids padded to their longest,
packed codes and tanh outputs (``4 * bits`` bytes a caption: 1 KB at 256 bits); their word
features are encoded a block at a time, never held whole. Images are described ``block`` at a
time; each such block is one more encoding pass over the captions.

What this module must not do: write files (``heiindex.index_write`` does), or train.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .attention import score_pairs
from .checkpoint import LoadedModel
from .encode import encode_caption_block, iter_caption_blocks
from .errors import HeiindexError, UnusedSettingWarning
from .hamming import hamming_candidates, make_binary_index
from .hash_folder import LoadedHash
from .hashing import pack_codes
from .progress import progress_bar
from .settings import SettingError, require, settle
from .store import SplitStore

__all__ = [
    "CaptionBank",
    "PendingImages",
    "PrototypeConfig",
    "caption_bank",
    "check_describing_split",
    "describe_images",
    "unit",
]


@dataclass(frozen=True)
class PrototypeConfig:
    """``split``: the store split whose captions describe the images (never the split indexed);
    ``k``: captions averaged per image; ``weight``: the share of the image's own output;
    ``preselect``: Hamming-nearest captions the matcher scores per image. The defaults were
    chosen on coco-sim dev by ``benchmarks/hash_exp_proto.py``: with every training caption
    scored, t2i candidate recall@100 is 96.0-96.1% for k 10 to 50 at weight 0.7 (95.8-96.1% for
    k 10 to 100 and weight 0.65 to 0.75 with softmax weights), against 95.2% with plain codes;
    these defaults, 300 preselected, give 95.7% (i2t 98.7%, plain 99.0%)."""

    split: str = "train"
    k: int = 10
    weight: float = 0.7
    preselect: int = 300

    def __post_init__(self) -> None:
        if not isinstance(self.split, str) or not self.split:
            raise HeiindexError(f"prototypes: split must name a store split, got {self.split!r}")
        # stored as Python numbers (a numpy one reached the manifest's JSON, failing the build at its end)
        settle(self, "k", at_least=1, integer=True)
        settle(self, "preselect", at_least=1, integer=True)
        if self.preselect < self.k:
            raise SettingError(
                "k",
                f"k {self.k} exceeds `preselect` ({self.preselect}): "
                "the top k captions are chosen among the preselected ones",
                also=("preselect",),
            )
        settle(self, "weight", at_least=0.0)
        if not self.weight < 1.0:
            raise SettingError(
                "weight",
                f"weight must be below 1 (1 keeps each image's own code: build without prototypes), got {self.weight}",
            )

    def to_dict(self) -> dict:
        return asdict(self)


class CaptionBank:
    """The describing split's captions, hashed: their token ids in order of length (so that an
    encoded block is padded to about its own captions' length), packed codes and tanh outputs."""

    def __init__(self, config: PrototypeConfig, store: SplitStore, tokens, lengths, codes, outputs, block: int) -> None:
        self.config, self.store, self.block = config, store, block
        self.tokens, self.lengths = tokens, lengths
        self.codes, self.outputs = codes, outputs
        self.index = make_binary_index(codes, "flat")  # the Hamming preselection

    def __len__(self) -> int:
        return len(self.lengths)

    def manifest_entry(self) -> dict:
        """What an index's manifest records of its image codes' prototypes (the split as the
        store names it)."""
        entry = {**self.config.to_dict(), "store_checksum": self.store.checksum, "captions": len(self)}
        return {**entry, "split": self.store.manifest["split"]}


@torch.no_grad()
def caption_bank(
    store_root: str | Path,
    config: PrototypeConfig,
    matcher: LoadedModel,
    hasher: LoadedHash,
    block: int = 1024,
    progress: bool = False,
) -> CaptionBank:
    """Encode and hash the captions of ``store_root/config.split``, a block at a time, where the
    matcher and the hash module are."""
    block = require("block", block, at_least=1, integer=True)
    try:
        store = SplitStore.open(store_root, config.split)
        matcher.check_store(store)
    except HeiindexError as exc:  # named as the describing split, not the one indexed
        raise HeiindexError(f"prototypes split {config.split!r}: {exc}", settings=exc.settings) from None
    captions = store.captions()
    if not len(captions):
        raise HeiindexError(f"prototypes split {config.split!r}: {store.path} holds no captions")
    if config.preselect > len(captions):  # each image scores all of them, averages min(k, all)
        capped = [f"`preselect` {config.preselect}"]
        capped += [f"`k` {config.k}"] if config.k > len(captions) else []
        warnings.warn(
            UnusedSettingWarning(
                f"{' and '.join(capped)} exceed{'s' if len(capped) == 1 else ''} the {len(captions)} captions of "
                f"prototypes split {config.split!r}: the matcher scores all of them for each image"
                + (f", and all {len(captions)} are averaged" if config.k > len(captions) else ""),
                settings=("preselect", "k"),
            ),
            stacklevel=2,
        )
    order = np.argsort(captions.lengths, kind="stable")
    # int32 token ids, as the store's: with the codes and tanh outputs, what is kept
    tokens = captions.tokens[order]
    lengths = np.asarray(captions.lengths[order], dtype=np.int64)
    del captions  # texts and ids are not needed
    module, bits = hasher.module, hasher.module.config.bits
    codes = np.empty((len(lengths), bits // 8), np.uint8)
    outputs = torch.empty((len(lengths), bits))
    bar = progress_bar(len(lengths), f"hash {config.split} captions", progress, unit="cap")
    for s, words, lens in iter_caption_blocks(matcher.model, tokens, lengths, block):
        pre = module.text_hash(module.pool_captions(words, lens))
        codes[s : s + len(lens)] = pack_codes(pre > 0)
        outputs[s : s + len(lens)] = torch.tanh(pre).cpu()
        bar.update(len(lens))
    bar.close()
    return CaptionBank(config, store, tokens, lengths, codes, outputs, block)


def check_describing_split(prototypes: PrototypeConfig | CaptionBank, split: str, store: SplitStore | None = None):
    """Refuse to describe a split's images with its own captions: they are what the bench
    measures with, and candidate recall would count them twice. Compared by name, and where
    ``store`` (the split indexed, in the same store root) is given, by folder (a name such as
    ``./test``), before any caption is read."""
    config = prototypes if isinstance(prototypes, PrototypeConfig) else prototypes.config
    same = config.split == split
    if store is not None:
        folder = (
            (store.path.parent / config.split) if isinstance(prototypes, PrototypeConfig) else prototypes.store.path
        )
        same = same or folder.resolve() == store.path.resolve()
    if same:
        raise HeiindexError(
            f"`prototypes` {split}: the captions of {split} would describe its own images, and the bench measures "
            f"with them; describe the images with the captions of a split other than {split}",
            settings=("prototypes",),
        )


def unit(x: Tensor) -> Tensor:
    """``x`` scaled to unit norm along its last axis (the ``u`` of the module's formula)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def describe_images(
    bank: CaptionBank,
    matcher: LoadedModel,
    hasher: LoadedHash,
    regions: Tensor,
    gram: Tensor | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Packed prototype codes ``(n, bits/8)`` of encoded images ``regions`` (n, R, d) (``gram``:
    their Gram matrices, or None), scored where the regions are. One encoding pass over the bank's
    blocks that hold a preselected caption; ``n x preselect`` pairs scored (``progress``: a bar
    over them)."""
    cfg, module, model = bank.config, hasher.module, matcher.model
    n, dev = regions.shape[0], regions.device
    own = module.image_hash(module.pool_images(regions))  # (n, bits), pre-sign
    m = min(cfg.preselect, len(bank))
    _, near = hamming_candidates(bank.index, pack_codes(own > 0), m)  # (n, m) bank rows
    flat = near.reshape(-1)
    image_of = np.repeat(np.arange(n), m)
    order = np.argsort(flat, kind="stable")  # the pairs by caption: each block's pairs are a slice
    by_caption = flat[order]
    scores = np.empty(n * m, np.float32)
    bar = progress_bar(n * m, f"score {n} images x {bank.config.split} captions", progress, unit="pair")
    for s in range(0, len(bank), bank.block):
        a, b = np.searchsorted(by_caption, [s, s + bank.block])
        if a == b:  # no image preselected a caption of this block: not encoded
            continue
        sel = order[a:b]
        words, lens = encode_caption_block(model, bank.tokens[s : s + bank.block], bank.lengths[s : s + bank.block])
        caption_index = torch.from_numpy(flat[sel] - s).to(dev)
        image_index = torch.from_numpy(image_of[sel]).to(dev)
        got = score_pairs(model.attention, words, lens, regions, caption_index, image_index, gram)
        scores[sel] = got.float().cpu().numpy()
        bar.update(len(sel))
    bar.close()
    top = torch.from_numpy(scores.reshape(n, m)).topk(min(cfg.k, m), dim=1).indices.numpy()
    rows = torch.from_numpy(np.take_along_axis(near, top, axis=1))  # (n, k) bank rows
    prototype = bank.outputs[rows].mean(dim=1).to(dev)
    mixed = cfg.weight * unit(own.float()) + (1.0 - cfg.weight) * unit(prototype)
    return pack_codes(mixed > 0)


class PendingImages:
    """Encoded images collected until ``block`` of them (or ``flush``), then described together
    and their codes appended to ``out``: one pass over the bank's captions per ``block`` images,
    at most ``block`` images' regions held."""

    def __init__(
        self,
        bank: CaptionBank,
        matcher: LoadedModel,
        hasher: LoadedHash,
        block: int,
        out: list,
        progress: bool = False,
    ) -> None:
        self.bank, self.matcher, self.hasher, self.block, self.out = bank, matcher, hasher, block, out
        self.progress = progress
        self.regions: list[Tensor] = []
        self.gram: list[Tensor] = []
        self.count = 0

    def add(self, regions: Tensor, gram: Tensor) -> None:
        while len(regions):  # a build block larger than what ``block`` has left is split
            take = self.block - self.count
            self.regions.append(regions[:take])
            self.gram.append(gram[:take])
            self.count += len(self.regions[-1])
            regions, gram = regions[take:], gram[take:]
            if self.count == self.block:
                self.flush()

    def flush(self) -> None:
        if not self.count:
            return
        regions = torch.cat(self.regions) if len(self.regions) > 1 else self.regions[0]
        gram = torch.cat(self.gram) if len(self.gram) > 1 else self.gram[0]
        self.regions, self.gram, self.count = [], [], 0
        self.out.append(describe_images(self.bank, self.matcher, self.hasher, regions, gram, self.progress))
