"""Training the HEI hash module next to a frozen matcher (``heiindex train-hash``).

``rounds`` passes over the training split (row-group buffers) record, for each batch, the frozen
matcher's score matrix and which images and captions it holds; each image's and caption's
features are kept once (pooled, or for the learned query pooling the caption's words, in a
memory-mapped temporary file). The hash layers then train for many epochs on those records,
which costs little beside the matcher's scoring. The loss is HEI's plus, by default, a hinge
ranking term on the code similarities (``rank_weight``): on coco-sim dev, 128 bits, it raised
candidate recall@100 from 79.7% to 92.2% (t2i) and from 85.7% to 96.4% (i2t)
(``benchmarks/hash_grid.py``, table in ``benchmarks/RESULTS.md``). Validation: candidate
recall@N on ``dev`` (the fraction of queries whose ground truth is among the N nearest codes),
both directions; the best module is kept.
What this module must not do: change the matcher.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .checkpoint import LoadedModel, load_model
from .encode import (
    EncodedSplit,
    check_split,
    encode_caption_block,
    encode_captions_packed,
    encode_images,
    iter_caption_blocks,
)
from .errors import HeiindexError, counted, sized
from .hamming import hamming_candidates, make_binary_index
from .hash_folder import HASH_OUTPUT, write_hash
from .hashing import HashConfig, HashModule, code_ranking_loss, hash_loss, pool_regions, pool_words, scale_scores
from .outputs import atomic_dir
from .packed import PackedWords
from .progress import progress_bar
from .settings import SettingError, require, require_config, require_path, settle
from .store import SplitStore, rows_of, sorted_ids
from .train import finite_loss, iter_training_batches, require_loop_settings, warn_validating_on_training

__all__ = [
    "HashRecords",
    "HashTrainConfig",
    "PooledSplit",
    "candidate_recall",
    "collect_batches",
    "fit_hash",
    "train_hash",
]

DEFAULT_VAL_CANDIDATES = 100  # N of the dev candidate recall@N that picks the best epoch (the N)
_CAPTION_BLOCK = 1024  # captions encoded (and pooled) at a time


@dataclass(frozen=True)
class HashTrainConfig:
    epochs: int = 80  # coco-sim, query pooling: best dev epoch 64 (mean pooling's: 120 of 160; benchmarks/RESULTS.md)
    batch_size: int = 128
    lr: float = 3e-3
    rank_weight: float = 1.0  # weight of code_ranking_loss beside the HEI loss (0: the paper's loss alone)
    rounds: int = 4  # passes over the training captions with fresh batches, each scored by the matcher
    val_candidates: int | None = None  # None: DEFAULT_VAL_CANDIDATES, or fewer on a small dev split (resolved)
    seed: int = 0
    buffer_row_groups: int = 8

    def __post_init__(self) -> None:
        require_loop_settings(self)
        settle(self, "rounds", at_least=1, integer=True)
        if self.val_candidates is not None:
            settle(self, "val_candidates", at_least=1, integer=True)
        settle(self, "rank_weight", at_least=0)

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self, n_val_images: int, split: str = "dev", log=None) -> HashTrainConfig:
        """This config with ``val_candidates`` a number, for a validation split of ``n_val_images``:
        as given; or, where None, DEFAULT_VAL_CANDIDATES, or a tenth of the images where the split
        has no more than that (recall@N over N or more images is 100% t2i: it would choose
        nothing), said through ``log``. A number, given or so chosen, that is not below
        ``n_val_images`` is refused (``HeiindexError``): a split of one image cannot choose."""
        n_val_images = require("n_val_images", n_val_images, at_least=1, integer=True)
        n = self.val_candidates
        if n is not None and n >= n_val_images:  # every image a candidate: t2i recall 100%, selecting nothing
            raise SettingError(  # the CLI names it --val-candidates
                "val_candidates",
                f"val_candidates {n} must be below the {counted(n_val_images, 'image')} of the "
                f"{split} split it validates on (at {n_val_images:,} every image is a candidate)",
            )
        if n is None and DEFAULT_VAL_CANDIDATES < n_val_images:
            n = DEFAULT_VAL_CANDIDATES
        elif n is None:
            n = max(1, n_val_images // 10)
            if n >= n_val_images:  # one image
                raise HeiindexError(
                    f"the {split} split has {counted(n_val_images, 'image')}: too few to choose the best epoch by "
                    f"candidate recall (every image would be a candidate); give a larger {split} split"
                )
            if log is not None:
                log(
                    f"validating by candidate recall@{n}: a tenth of the {n_val_images:,} images of the {split} "
                    f"split (the default, {DEFAULT_VAL_CANDIDATES}, needs more; a number given replaces it)"
                )
        return replace(self, val_candidates=n)


@torch.no_grad()
def candidate_recall(module: HashModule, split: PooledSplit | EncodedSplit, n: int) -> dict[str, float]:
    """Fraction of queries whose ground truth is among the ``n`` nearest codes, per direction.
    ``split``: pooled for ``module`` (``PooledSplit``), or encoded (pooled here)."""
    if isinstance(split, EncodedSplit):
        split = PooledSplit.of(split, module.config.pooling)
    img_codes, cap_codes = split.codes(module)
    n = min(n, len(img_codes))
    _, ids = hamming_candidates(make_binary_index(img_codes), cap_codes, n)
    t2i = float(np.mean((ids == split.caption_image[:, None]).any(axis=1)))
    _, cids = hamming_candidates(make_binary_index(cap_codes), img_codes, min(n, len(cap_codes)))
    hit = split.caption_image[cids] == np.arange(len(img_codes))[:, None]
    i2t = float(np.mean(hit.any(axis=1)))
    return {"t2i": t2i, "i2t": i2t, "n": n}


@dataclass
class HashRecords:
    """Training batches scored by the frozen matcher, and the features the hash layers train on.

    ``batches``: one dict per batch, ``{"ids": image ids (B,), "scores": (images B, captions B),
    "images": rows of ``images`` (B,), "captions": caption rows (B,)}``. Features are kept once per
    image and caption, not once per batch and round: ``images[pooling]`` (n_images, d) pooled
    regions; ``captions[pooling]`` (n_captions, d) pooled words for the parameter-free poolings;
    ``words``, for the learned ``query`` pooling, every caption's encoded words, packed. What
    grows with the split (the pooled features, the words, the batches' score matrices) lies in
    memory-mapped temporary files (``TMPDIR``, which should be on disk, not tmpfs), which the
    operating system pages in and out as training reads them: for real COCO's 566K training
    captions (13.3 tokens each on average) at d = 1024, about 31 GB of words, 2.3 GB of pooled
    captions (mean pooling) and 1.2 GB of scores (4 rounds of batches of 128; 4.6 GB at batches
    of 512), by arithmetic, not measured. In memory: each batch's three rows of ids (B x 24 bytes).
    """

    batches: list[dict]
    images: dict[str, torch.Tensor]
    captions: dict[str, torch.Tensor]
    words: PackedWords | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def features(self, batch: dict, module: HashModule) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled (image (B, d), caption (B, d)) inputs of ``batch`` for ``module``'s pooling; a
        learned pooling runs here, so that its gradient reaches the module."""
        pooling = module.config.pooling
        if pooling not in self.images:
            raise ValueError(f"these records were collected for poolings {sorted(self.images)}, not {pooling!r}")
        img = self.images[pooling][batch["images"]]
        if pooling != "query":
            return img, self.captions[pooling][batch["captions"]]
        rows = torch.from_numpy(batch["captions"])
        lengths = self.words.lengths[rows]
        return img, module.pool_captions(self.words.gather(rows, int(lengths.max())), lengths)


def _scratch(shape: tuple[int, ...], what: str) -> torch.Tensor:
    """A zeroed float32 tensor of ``shape`` over an unlinked temporary file, mapped: what grows
    with a split stays out of memory (the operating system pages it in and out). Its space is
    reserved first: a full disk is an error here, naming ``what``, not a crash (SIGBUS) later."""
    nbytes = int(np.prod(shape)) * 4
    if nbytes == 0:  # nothing to map (mmap refuses an empty file)
        return torch.zeros(shape)
    file = tempfile.TemporaryFile(prefix="heiindex-hash-")
    try:
        if hasattr(os, "posix_fallocate"):  # Linux; elsewhere (macOS, Windows) the file grows as written
            os.posix_fallocate(file.fileno(), 0, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # else a file system that cannot reserve: as is
            file.close()
            raise HeiindexError(
                f"cannot reserve {sized(nbytes)} for {what} in {tempfile.gettempdir()} ({exc.strerror}): "
                "set TMPDIR to a disk with that much free space"
            ) from None
    with file:  # the mapping keeps its own descriptor
        return torch.from_numpy(np.memmap(file, np.float32, "w+", shape=shape))


def _word_file(lengths: np.ndarray, d: int, what: str = "the training captions' words") -> PackedWords:
    """Zeroed packed words for captions of ``lengths`` over a mapped temporary file (``_scratch``)."""
    rows = _scratch((int(lengths.sum()) + 1, d), what)
    return PackedWords._wrap(rows, torch.from_numpy(np.asarray(lengths, dtype=np.int64)))


@dataclass
class PooledSplit:
    """What candidate recall reads of a split for one hash pooling, made once, not once per
    epoch: every image's pooled regions (each pooling of regions is parameter-free: a 36th of
    the regions' memory at 36 regions an image), and every caption's pooled words or, for the
    learned ``query`` pooling, its words, packed (pooled by the module at each call; in a mapped
    temporary file where ``encode`` made them). ``caption_image``: each caption's image row."""

    pooling: str
    images: torch.Tensor
    caption_image: np.ndarray
    captions: torch.Tensor | None = None
    words: PackedWords | None = None

    @classmethod
    def of(cls, enc: EncodedSplit, pooling: str) -> PooledSplit:
        """From an encoded split (``heiindex.encode.encode_split``); the same figures as ``encode``."""
        images = pool_regions(enc.regions, pooling)
        if pooling == "query":
            return cls(pooling, images, enc.caption_image, words=enc.words)
        captions = torch.empty((len(enc.words), images.shape[1]))
        lengths = enc.words.own_lengths(enc.lengths)
        for s in range(0, len(captions), _CAPTION_BLOCK):  # encode's blocks: the same padded tensors
            rows = torch.arange(s, min(s + _CAPTION_BLOCK, len(captions)))
            lens = lengths[rows]
            captions[rows] = pool_words(enc.words.gather(rows, int(lens.max())), lens, pooling)
        return cls(pooling, images, enc.caption_image, captions=captions)

    @classmethod
    @torch.no_grad()
    def encode(
        cls, model, store: SplitStore, captions, pooling: str, progress: bool = False, block_images: int = 256
    ) -> PooledSplit:
        """Encode ``store`` with ``model`` and pool it, a block at a time: the split's regions are
        never all in memory. ``captions``: the store's, as ``heiindex.encode.check_split``
        returned them (checked: each caption's image is in the split)."""
        d = model.config.embed_size
        pool = partial(pool_regions, pooling=pooling)
        ids, images = encode_images(model, store, block_images, progress, pool=pool)
        caption_image = rows_of(sorted_ids(ids), captions.image_ids)
        if (caption_image < 0).any():  # check_split refuses this: a caller's own captions
            raise ValueError(f"captions of images not in the {store.split} split")
        if pooling == "query":
            rows = _scratch((int(captions.lengths.sum()) + 1, d), f"the {store.split} captions' words")
            words = encode_captions_packed(model, captions.tokens, captions.lengths, _CAPTION_BLOCK, rows)
            return cls(pooling, images, caption_image, words=words)
        pooled = torch.empty((len(captions), d))
        for s, w, lens in iter_caption_blocks(model, captions.tokens, captions.lengths, _CAPTION_BLOCK):
            pooled[s : s + len(w)] = pool_words(w, lens, pooling).cpu()
        return cls(pooling, images, caption_image, captions=pooled)

    @torch.no_grad()
    def codes(self, module: HashModule) -> tuple[np.ndarray, np.ndarray]:
        """Packed (image codes, caption codes) of this split under ``module``."""
        if module.config.pooling != self.pooling:
            raise ValueError(
                f"this split was pooled for {self.pooling!r}, the module pools by {module.config.pooling!r}"
            )
        if self.words is not None:
            return module.codes(self.images, "image"), module.caption_codes(self.words, self.words.lengths)
        return module.codes(self.images, "image"), module.codes(self.captions, "text")


def collect_batches(
    model,
    store: SplitStore,
    config: HashTrainConfig,
    poolings: tuple[str, ...] = (HashConfig.pooling,),
    progress: bool = False,
) -> HashRecords:
    """Score ``config.rounds`` passes of freshly shuffled training batches with the frozen matcher,
    and keep each image's and caption's features the first time a batch holds it."""
    caps = store.captions()
    store.check_ids(caps)  # distinct ids, and every caption's image in the split: batches pair them by id
    image_ids = np.unique(caps.image_ids)
    d = model.config.embed_size
    images = {p: _scratch((len(image_ids), d), "the training images' pooled features") for p in poolings}
    captions = {p: _scratch((len(caps), d), "the training captions' pooled features") for p in poolings if p != "query"}
    words = _word_file(caps.lengths, d) if "query" in poolings else None
    # a round's batches hold each caption once, at most batch_size + 1 of them (iter_training_batches)
    scores = _scratch((config.rounds * (config.batch_size + 1) * len(caps),), "the training batches' scores")
    used = 0
    image_seen, caption_seen = np.zeros(len(image_ids), bool), np.zeros(len(caps), bool)
    batches = []
    total = config.rounds * -(-store.n_captions // config.batch_size)
    bar = progress_bar(total, "score training batches", progress)
    dev = next(model.parameters()).device  # encoded and scored there; what is kept, on the CPU
    with torch.no_grad():
        for r in range(config.rounds):
            rng = np.random.default_rng([config.seed, 1000 + r])
            for feats, tok, lens, img_ids, cap_rows in iter_training_batches(
                store, caps, config.batch_size, rng, config.buffer_row_groups
            ):
                regions = model.encode_images(torch.from_numpy(feats).to(dev))
                encoded, lens_d = encode_caption_block(model, tok, lens)
                b = len(img_ids)
                batch_scores = scores[used : used + b * b].view(b, b)
                batch_scores.copy_(model.score(encoded, lens_d, regions).T)
                used += b * b
                regions, encoded, lens_t = regions.cpu(), encoded.cpu(), torch.from_numpy(lens)
                img_rows = np.searchsorted(image_ids, img_ids)
                batches.append(
                    {
                        "ids": torch.from_numpy(img_ids),
                        "scores": batch_scores,
                        "images": img_rows,
                        "captions": cap_rows,
                    }
                )
                new_img = np.flatnonzero(~image_seen[img_rows])  # an image repeats within a batch: same rows
                new_cap = np.flatnonzero(~caption_seen[cap_rows])
                for p in poolings:
                    images[p][img_rows[new_img]] = pool_regions(regions[new_img], p)
                    if p != "query":
                        captions[p][cap_rows[new_cap]] = pool_words(encoded[new_cap], lens_t[new_cap], p)
                if words is not None and len(new_cap):  # caption c's words: rows offsets[c] onwards
                    sel = PackedWords.from_padded(encoded[new_cap], lens_t[new_cap])
                    starts = words.offsets[torch.from_numpy(cap_rows[new_cap])]
                    within = torch.arange(len(sel.flat)) - torch.repeat_interleave(sel.offsets[:-1], sel.lengths)
                    words.flat[torch.repeat_interleave(starts, sel.lengths) + within] = sel.flat  # (a view)
                image_seen[img_rows], caption_seen[cap_rows] = True, True
                bar.update(1)
    bar.close()
    return HashRecords(batches, images, captions, words)


def fit_hash(
    records: HashRecords,
    val_enc: PooledSplit | EncodedSplit,
    hash_config: HashConfig,
    config: HashTrainConfig,
    progress: bool = False,
    log=print,
) -> tuple[HashModule, dict]:
    """Train hash layers on collected batches; return the best module on ``val_enc`` and its record.
    ``config.val_candidates`` None: resolved for ``val_enc``'s images (``HashTrainConfig.resolved``)."""
    if not isinstance(val_enc, (PooledSplit, EncodedSplit)):  # None crashed in candidate_recall, after an epoch
        raise HeiindexError(
            f"val_enc must be the validation split (a PooledSplit or an EncodedSplit), got {type(val_enc).__name__}: "
            "its candidate recall picks the best epoch"
        )
    if isinstance(val_enc, EncodedSplit):  # pooled once, not once per epoch
        val_enc = PooledSplit.of(val_enc, hash_config.pooling)
    if config.val_candidates is None:
        config = config.resolved(len(val_enc.images), log=log)
    torch.manual_seed(config.seed)
    module = HashModule(hash_config)
    opt = torch.optim.Adam(module.parameters(), lr=config.lr)
    best, history = None, []
    gen = np.random.default_rng(config.seed)
    for epoch in range(config.epochs):
        module.train()
        total_loss = 0.0
        for step, i in enumerate(gen.permutation(len(records))):
            batch = records.batches[i]
            img_pool, cap_pool = records.features(batch, module)
            ids, scores = batch["ids"], batch["scores"]
            positive = ids[:, None] == ids[None, :]  # (images, captions) of this batch
            target = scale_scores(scores, positive)
            img_codes, txt_codes = module.relaxed(img_pool, "image"), module.relaxed(cap_pool, "text")
            loss = hash_loss(img_codes, txt_codes, target, positive)
            if config.rank_weight:
                loss = loss + config.rank_weight * code_ranking_loss(img_codes, txt_codes, positive)
            total_loss += finite_loss(loss, epoch, step, "no hash module was written")
            opt.zero_grad()
            loss.backward()
            opt.step()
        module.eval()
        rec = candidate_recall(module, val_enc, config.val_candidates)
        score = rec["t2i"] + rec["i2t"]
        history.append({"epoch": epoch + 1, "loss": total_loss / len(records), "dev_candidate_recall": rec})
        if best is None or score > best[0]:
            best = (score, epoch + 1, {k: v.clone() for k, v in module.state_dict().items()}, rec)
        if progress or epoch + 1 == config.epochs or (epoch + 1) % 10 == 0:
            log(
                f"hash epoch {epoch + 1}: loss {total_loss / len(records):.4f}, dev candidate recall@{rec['n']} "
                f"t2i {100 * rec['t2i']:.1f}% i2t {100 * rec['i2t']:.1f}%"
            )
    module.load_state_dict(best[2])
    return module, {"best_epoch": best[1], "dev_candidate_recall": best[3], "history": history}


def train_hash(
    matcher: LoadedModel | str | Path,
    store_root: str | Path,
    out: str | Path,
    hash_config: HashConfig | None = None,
    config: HashTrainConfig | None = None,
    train_split: str = "train",
    val_split: str = "dev",
    progress: bool = False,
    log=print,
) -> dict:
    """Train hash layers on ``train_split`` next to the frozen ``matcher`` (loaded where given as
    a folder); keep the best on ``val_split``. ``hash_config`` / ``config`` None: the defaults."""
    store_root, out = require_path("store_root", store_root), require_path("out", out)  # before any work
    if not isinstance(matcher, LoadedModel):  # a folder failed on its .model
        matcher = load_model(require_path("matcher", matcher))
    hash_config = require_config("hash_config", HashConfig() if hash_config is None else hash_config, HashConfig)
    config = require_config("config", HashTrainConfig() if config is None else config, HashTrainConfig)
    model = matcher.model.eval()
    if hash_config.embed_size is None:  # the matcher's: the hash layers read its embeddings
        hash_config = replace(hash_config, embed_size=model.config.embed_size)
    if hash_config.embed_size != model.config.embed_size:
        raise SettingError(
            "embed_size",
            f"hash embed_size {hash_config.embed_size} != matcher embed_size {model.config.embed_size}: "
            "leave embed_size unset (None) to take the matcher's",
        )
    tr = SplitStore.open(store_root, train_split)
    va = SplitStore.open(store_root, val_split)
    warn_validating_on_training(tr, va)
    matcher.check_store(tr)  # the dev split's by check_split below
    if tr.n_images < 2:  # every pair of a batch a positive: no negative to train on (train refuses it too)
        raise HeiindexError(
            f"the {train_split} split has {counted(tr.n_images, 'image')}: the hash loss needs unmatched pairs; "
            "give a larger train split"
        )
    # The output is checked and held (its lock) before the work, for the whole run: two runs of
    # one --out both trained and said they wrote it, and the one that finished first was lost.
    with atomic_dir(out, *HASH_OUTPUT) as tmp:
        _, val_captions = check_split(matcher, va)  # its recall picks the best epoch: checked before the work
        config = config.resolved(va.n_images, val_split, log)  # what the module's info records
        records = collect_batches(model, tr, config, (hash_config.pooling,), progress)
        if not records.batches:  # buffers of one caption each are skipped: there was nothing to score
            raise HeiindexError(
                f"the {train_split} split gave no batch of 2 or more captions to train on; give a larger train split"
            )
        val = PooledSplit.encode(model, va, val_captions, hash_config.pooling, progress)
        module, result = fit_hash(records, val, hash_config, config, progress, log)
        info = {
            "matcher_sha256": matcher.checksum,
            "matcher_path": str(matcher.path),
            "train": config.to_dict(),
            "best_epoch": result["best_epoch"],
            "dev_candidate_recall": result["dev_candidate_recall"],
            "data": {"train": tr.checksum, "dev": va.checksum},  # by role: trained on, validated on
            "splits": {"train": train_split, "dev": val_split},  # and by name
        }
        write_hash(module, tmp, info)
    return result
