"""Exhaustive evaluation of a stored split under COCO's protocols, by one matcher or an ensemble
(what ``heiindex evaluate`` prints).

An ensemble's score of a pair is the mean of its members' scores, each member encoding the split
with its own weights: SCAN's published ensembles average a text-to-image and an image-to-text
model this way. On a split of 5,000 images (COCO's ``testall``) the protocol "auto" reports COCO
5K (the whole split) and COCO 1K (each figure the mean over 5 folds of 1,000 images ranked
against their own captions: slices of the same score matrix, nothing scored twice), as
``heiindex bench`` does for its exhaustive rows.
What this module must not do: hash, search codes or write anything.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from .checkpoint import LoadedModel
from .encode import check_model, check_split, encode_split
from .evaluation import Recall, fold_recalls, i2t_ranks, main_protocol, mean_of_folds, protocol_plan, recall, t2i_ranks
from .model import Ensemble, ScanModel
from .scoring import exhaustive_scores
from .settings import SettingError
from .store import SplitStore

__all__ = ["evaluate_split"]


def evaluate_split(
    models: LoadedModel | ScanModel | Ensemble | Sequence[LoadedModel | ScanModel],
    store: SplitStore,
    protocols: str = "auto",
    progress: bool = False,
) -> dict:
    """R@K, median and mean rank, rsum of every caption against every image of ``store``, in
    both directions, as one JSON-able dict: ``"full"`` (the whole split) or, on a 5,000-image
    split, ``"5k"``; ``"1k"`` (the folds' means, with ``"folds"``) where ``protocols`` is "1k",
    or "auto" on a 5,000-image split; the main one's figures also at the top level (``"t2i"``,
    ``"i2t"``, ``"rsum"``), with ``"seconds"``, the scoring's (not the encoding's), summed over
    the members. ``models``: a matcher (a ``LoadedModel`` is checked against the store), an
    ``Ensemble``, or a list of them, whose scores are averaged."""
    members = _members(models)
    if not isinstance(store, SplitStore):  # a path failed on an attribute ("'str' object has no ...")
        raise SettingError(
            "store",
            f"store must be an opened split, SplitStore.open(store_root, split) (heiindex.store), got "
            f"{type(store).__name__} {store!r}",
        )
    whole, folds = protocol_plan(store.n_images, protocols)  # before any scoring: "1k" needs whole folds
    # every member checked against the store before any is scored (a wrong second member was
    # refused after the first had been encoded and scored); the captions read once for all
    first, captions = check_split(members[0], store)
    bare = [first] + [check_model(model, store) for model in members[1:]]
    total, gt, seconds = None, None, 0.0
    for model in bare:
        enc = encode_split(model, store, progress=progress, captions=captions)
        t0 = time.perf_counter()
        scores = exhaustive_scores(model, enc)
        seconds += time.perf_counter() - t0
        if total is None:
            total, gt = scores, enc.caption_image
        else:
            total += scores  # one matrix beside the sum at a time
        del enc, scores
    if len(members) > 1:
        total /= len(members)
    n_captions = len(gt)
    out: dict = {"split": store.split, "images": store.n_images, "captions": n_captions, "models": len(members)}
    if whole is not None:
        out[whole] = _figures(recall(t2i_ranks(total, gt)), recall(i2t_ranks(total.T, gt)), store.n_images, n_captions)
    if folds:
        per_fold = [
            _figures(t2i, i2t, stop - start, int(np.count_nonzero((gt >= start) & (gt < stop))))
            for (t2i, i2t), (start, stop) in zip(fold_recalls(total, gt, folds), folds, strict=True)
        ]
        out["1k"] = {**mean_of_folds(per_fold), "folds": len(folds)}  # as the bench averages its folds
    main = main_protocol(out)
    out.update(t2i=main["t2i"], i2t=main["i2t"], rsum=main["rsum"], seconds=seconds)
    return out


def _members(models) -> list[LoadedModel | ScanModel]:
    if isinstance(models, Ensemble):
        models = models.members
    elif isinstance(models, (LoadedModel, ScanModel)):
        models = [models]
    members = list(models)
    if not members:
        raise SettingError("models", "models must name at least one matcher")
    for m in members:
        if not isinstance(m, (LoadedModel, ScanModel)):
            raise SettingError(
                "models", f"models must be matchers (load_model's LoadedModel, or ScanModel), got {type(m).__name__}"
            )
    return members


def _figures(t2i: Recall, i2t: Recall, images: int, captions: int | float) -> dict:
    return {
        "images": images,
        "captions": captions,
        "t2i": t2i.to_dict(),
        "i2t": i2t.to_dict(),
        "rsum": round(t2i.rsum + i2t.rsum, 10),
    }
