"""Exhaustive evaluation of a matcher on an encoded split (both retrieval directions).

What this module must not do: encode or pick candidates; it only turns encoded features into
score matrices and ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .attention import score_block
from .checkpoint import LoadedModel
from .encode import EncodedSplit
from .errors import HeiindexError
from .evaluation import Recall, i2t_ranks, recall, t2i_ranks
from .model import ScanModel
from .settings import require

__all__ = ["ExhaustiveResult", "exhaustive_scores", "evaluate_exhaustive"]


@dataclass
class ExhaustiveResult:
    t2i: Recall
    i2t: Recall
    seconds: float
    scores: np.ndarray  # (n_caps, n_imgs)

    @property
    def rsum(self) -> float:
        return self.t2i.rsum + self.i2t.rsum


@torch.no_grad()
def exhaustive_scores(model: ScanModel | LoadedModel, enc: EncodedSplit, image_block: int = 1024) -> np.ndarray:
    """All (n_caps, n_imgs) scores, computed in image blocks. ``model``: the matcher that encoded
    ``enc`` (a ``ScanModel``, or the ``LoadedModel`` ``encode_split`` takes)."""
    model = _scan_model(model, enc)
    image_block = require("image_block", image_block, at_least=1, integer=True)
    n_imgs = enc.regions.shape[0]
    out = np.empty((enc.words.shape[0], n_imgs), dtype=np.float32)
    for s in range(0, n_imgs, image_block):
        e = min(n_imgs, s + image_block)
        block = score_block(model.attention, enc.words, enc.lengths, enc.regions[s:e], enc.gram[s:e])
        out[:, s:e] = block.float().cpu().numpy()
    return out


def _scan_model(model, enc: EncodedSplit) -> ScanModel:
    """The ``ScanModel`` of ``model`` (itself, or a ``LoadedModel``'s), refused where it cannot
    have encoded ``enc`` (another embedding size): its attention settings would score them."""
    model = model.model if isinstance(model, LoadedModel) else model
    if not isinstance(model, ScanModel):
        raise HeiindexError(f"model must be a ScanModel or a LoadedModel (load_model), got {type(model).__name__}")
    if enc.regions.shape[-1] != model.config.embed_size:
        raise HeiindexError(
            f"the split was encoded with embedding size {enc.regions.shape[-1]}, this model's is "
            f"{model.config.embed_size}: score it with the model that encoded it"
        )
    return model


def evaluate_exhaustive(model: ScanModel | LoadedModel, enc: EncodedSplit) -> ExhaustiveResult:
    t0 = time.perf_counter()
    scores = exhaustive_scores(model, enc)
    seconds = time.perf_counter() - t0
    gt = enc.caption_image
    return ExhaustiveResult(recall(t2i_ranks(scores, gt)), recall(i2t_ranks(scores.T, gt)), seconds, scores)
