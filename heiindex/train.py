"""Training the SCAN matcher (``heiindex train``).

Hinge triplet loss with margin, both directions, hardest negative in the batch ("max
violation", VSE++) or the sum over negatives; pairs of the same image are never negatives.
By default the first epoch sums over all negatives: from a random start every pair scores
about the same and hardest-negative training stalls (seen on coco-sim: dev R@1 at chance after
an epoch of `heiindex train --warmup-sum-epochs 0`), while the summed loss moves at once; hardest negatives take over from epoch 2.
Adam with a step decay, gradient clipping, validation R@K on ``dev`` after each epoch, the
best model kept, the last state kept for ``--resume``. Deterministic given the seed.

Memory stays bounded: an epoch walks the training store's row groups in a shuffled order, a
few at a time (``buffer_row_groups``), and batches the captions of the images in that buffer.
What this module must not do: build indexes or answer queries.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from .atomic import LockHeld, atomic_file, clear_leftovers, exclusive, set_aside
from .checkpoint import CONFIG_FILE, MODEL_OUTPUT, STATE_FILE, load_model, read_model_config, save_model
from .encode import check_split, encode_split
from .errors import DataError, HeiindexError, HeiindexWarning, counted
from .model import ScanConfig, ScanModel
from .outputs import check_output
from .progress import progress_bar
from .scoring import evaluate_exhaustive
from .settings import require_config, require_flag, require_path, settle, settle_flag
from .store import SplitStore, rows_of, sorted_ids, store_vocab
from .vocab import Vocab

__all__ = ["TrainConfig", "contrastive_loss", "iter_training_batches", "train"]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-4
    lr_decay_epochs: int = 5  # lr /= 10 every this many epochs
    grad_clip: float = 2.0
    margin: float = 0.2
    max_violation: bool = True
    warmup_sum_epochs: int = 1  # epochs that sum over all negatives before hardest-negative training
    seed: int = 0
    val_images: int = 1000
    buffer_row_groups: int = 8
    threads: int | None = None

    def __post_init__(self) -> None:
        require_loop_settings(self)
        for name in ("lr_decay_epochs", "val_images"):
            settle(self, name, at_least=1, integer=True)
        settle(self, "warmup_sum_epochs", at_least=0, integer=True)
        settle(self, "grad_clip", at_least=0)  # 0: no clipping
        settle(self, "margin", at_least=0)
        settle_flag(self, "max_violation")  # "no" is truthy: it trained with hardest negatives
        if self.threads is not None:
            settle(self, "threads", at_least=1, integer=True)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of_run(cls, out: str | Path, **overrides) -> TrainConfig:
        """The settings the run in ``out`` trained with (recorded in ``out/last``), for what a
        resumed run should go on with; settings it did not record take the defaults; those in
        ``overrides`` replace the run's (``TrainConfig.of_run(out, batch_size=16)``: the run's own
        settings, but batches of 16)."""
        path = Path(out) / "last"
        if not (path / CONFIG_FILE).exists():
            raise DataError(Path(out), "no training run here (no last/ model that `heiindex train` saved)")
        _, raw = read_model_config(path)
        info = raw.get("info")
        saved = info.get("train", {}) if isinstance(info, dict) else {}
        if not isinstance(saved, dict):
            raise DataError(path / "config.json", f'field "info.train" must be an object, got {type(saved).__name__}')
        known = {f.name for f in fields(cls)} - {"threads"}  # threads: this machine's, not the run's
        try:
            run = cls(**{name: value for name, value in saved.items() if name in known})
        except ValueError as exc:  # a setting out of range: named, with the file
            raise DataError(path / "config.json", f"info.train: {exc}") from None
        return replace(run, **overrides)  # an unknown name: a TypeError; out of range: a SettingError


def _resumed_config(run: TrainConfig, given: TrainConfig | None, log) -> TrainConfig:
    """The settings a resumed run goes on with: ``given``, or the run's own (``run``, its
    ``TrainConfig.of_run``) where None; where ``given`` differs from the run's in anything but
    ``epochs`` (raised to go on) and ``threads`` (this machine's), each difference is said through
    ``log``: a config made with the defaults (batch 128) silently replaced a run's batch 8."""
    if given is None:
        return run
    changed = [
        f"{f.name} {getattr(given, f.name)} (it trained with {getattr(run, f.name)})"
        for f in fields(TrainConfig)
        if f.name not in ("epochs", "threads") and getattr(given, f.name) != getattr(run, f.name)
    ]
    if changed:
        log(f"resuming with settings other than the run's: {', '.join(changed)}")
    return given


def require_loop_settings(config) -> None:
    """The settings every training loop here shares (``TrainConfig``, ``HashTrainConfig``):
    epochs and buffered row groups >= 1, batches of >= 2 captions (a caption needs a negative),
    a seed in [0, 2**64 - 1] (torch takes no larger one, and failed after the data was read), a
    learning rate in (0, 1]."""
    for name in ("epochs", "buffer_row_groups"):
        settle(config, name, at_least=1, integer=True)
    settle(config, "batch_size", at_least=2, integer=True)
    settle(config, "seed", at_least=0, at_most=2**64 - 1, integer=True)  # torch's seed is 64 bits
    # Adam's step is about lr per weight: above 1 it is no learning rate (1e38 overflowed inside
    # torch's Adam with a traceback; 1e20 trained hash codes to chance without a word)
    settle(config, "lr", above=0, at_most=1)


def contrastive_loss(scores: torch.Tensor, image_ids: torch.Tensor, margin: float, max_violation: bool) -> torch.Tensor:
    """Hinge triplet loss of a batch; ``scores[i, j]`` is caption i vs the image of caption j.

    The positive of caption i is column i; columns holding the same image are not negatives.
    """
    pos = scores.diag()
    same = image_ids[:, None] == image_ids[None, :]
    cost_caption = (margin + scores - pos[None, :]).clamp(min=0).masked_fill(same, 0)  # image j vs caption i
    cost_image = (margin + scores - pos[:, None]).clamp(min=0).masked_fill(same, 0)  # caption i vs image j
    if max_violation:
        return cost_caption.max(dim=0).values.sum() + cost_image.max(dim=1).values.sum()
    return cost_caption.sum() + cost_image.sum()


@dataclass
class TrainResult:
    best_rsum: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    out: Path | None = None


def iter_training_batches(store: SplitStore, caps, batch_size: int, rng: np.random.Generator, buffer_groups: int):
    """Shuffled batches of at most ``batch_size`` captions with their images, drawn from buffers of
    ``buffer_groups`` row groups at a time: ``(image features (B, R, D), tokens (B, L), lengths
    (B,), image ids (B,), caption rows (B,) into ``caps``)``; every caption once per pass (a
    caption left over alone after a buffer's full batches joins the last of them, since a batch
    needs two; a buffer of one caption is skipped)."""
    groups = rng.permutation(store.n_row_groups)
    for g0 in range(0, len(groups), buffer_groups):
        parts = [store.read_row_group(int(g)) for g in groups[g0 : g0 + buffer_groups]]
        ids = np.concatenate([p[0] for p in parts])
        feats = np.concatenate([p[1] for p in parts])
        by_id = sorted_ids(ids)  # a buffer's rows by image id
        in_buf = np.flatnonzero(np.isin(caps.image_ids, ids))
        rng.shuffle(in_buf)
        starts = list(range(0, len(in_buf), batch_size))
        if len(starts) > 1 and len(in_buf) % batch_size == 1:
            starts.pop()  # the lone last caption joins the batch before it
        for s, e in zip(starts, [*starts[1:], len(in_buf)], strict=True):
            ci = in_buf[s:e]
            if len(ci) < 2:
                continue
            rows = rows_of(by_id, caps.image_ids[ci])  # each one in the buffer
            yield feats[rows], caps.tokens[ci], caps.lengths[ci], caps.image_ids[ci], ci


def finite_loss(loss: torch.Tensor, epoch: int, step: int, kept: str, what: str = "the loss") -> float:
    """The loss (or ``what`` else) of a training step as a float; ``HeiindexError`` where it is
    NaN or infinite (before the optimizer step: the weights stay finite), naming the epoch and
    batch and what ``kept`` (what earlier epochs wrote). A diverged run otherwise went on with
    NaN weights, and NaN scores rank every ground truth first (``evaluation.check_finite`` now
    refuses them)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise HeiindexError(
            f"training diverged: {what} is {value} at epoch {epoch + 1}, batch {step + 1}; {kept} "
            "(a lower `lr` may help)",
            settings=("lr",),
        )
    return value


def resumable(out: str | Path) -> bool:
    """Whether ``out`` holds a run that ``train(resume=True)`` continues: a model in ``last/`` (its
    training state is read, and refused by name if missing or damaged, by ``read_state``). A
    ``last/`` or ``best/`` that a run killed between two renames left moved aside (where the
    one-step exchange is refused; ``heiindex.atomic``) is put back first, or, left by another
    host's or container's run, refused by name (resuming without it would start over)."""
    for folder in ("best", "last"):
        clear_leftovers(Path(out) / folder)
        aside = set_aside(Path(out) / folder)
        if aside and not (Path(out) / folder).exists():  # another host's or container's run: maybe alive
            raise DataError(
                aside[0],
                f"holds {folder}/ as a run killed while replacing it left it (another host or container: "
                f"not put back here); if that run is gone, rename it to {Path(out) / folder} and resume",
            )
    return (Path(out) / "last" / CONFIG_FILE).is_file()


def _check_enough_images(n_train: int, n_split_val: int, val_images: int, train_split: str, val_split: str) -> None:
    """At least 2 training images (a caption's negatives are the batch's other images: with one,
    every epoch trained on a loss of 0) and 2 validation images, of the ``n_split_val`` the
    validation split has and at most ``val_images`` of them (R@K over one image is 100, so every
    epoch scored rsum 600 and the first stayed the best). Where the split itself is too small,
    ``val_images`` is no way out (it only caps the images used), so the message offers it only where
    it is too small as well (both are then named, not one after the other)."""
    if n_train < 2:
        raise HeiindexError(
            f"the {train_split} split has {counted(n_train, 'image')}: a caption needs another image as its "
            "negative; give a larger train split"
        )
    n_val = min(n_split_val, val_images)
    if n_val < 2:
        why = (
            f"validating on {counted(n_val, 'image')} of the {val_split} split scores every epoch R@K 100: too few "
            "to choose the best epoch; "
        )
        if n_split_val >= 2:
            raise HeiindexError(why + "give a `val_images` of at least 2", settings=("val_images",))
        if val_images >= 2:
            raise HeiindexError(why + f"give a larger {val_split} split")
        raise HeiindexError(
            why + f"give a larger {val_split} split, and a `val_images` of at least 2", settings=("val_images",)
        )


def warn_validating_on_training(tr: SplitStore, va: SplitStore) -> None:
    """A ``HeiindexWarning`` where the validation split is the training split (by folder): the
    best epoch is then the one that fits its own training data best, which the library took
    without a word (prototypes refuse a split describing itself; here it can be meant, on tiny data)."""
    if tr.path.resolve() == va.path.resolve():
        warnings.warn(
            HeiindexWarning(
                f"validating on the split trained on, {tr.path}: the best epoch is the one that fits its own "
                "training data best; give another `val_split` (such as dev) to choose by unseen data",
                settings=("val_split",),
            ),
            stacklevel=3,
        )


def _warn_of_other_dev_images(out: Path, run: TrainConfig, config: TrainConfig, n_dev: int) -> None:
    """A ``HeiindexWarning`` where a resumed run (its settings ``run``) validates on another
    number of dev images than it did (``val_images``): its best dev rsum so far was measured on
    the others, and an epoch measured on a few images (rsum 580 on 5 against 334 on 60) replaced
    a better ``best/``."""
    before, now = min(run.val_images, n_dev), min(config.val_images, n_dev)
    if before != now:
        warnings.warn(
            HeiindexWarning(
                f"the run in {out} chose its best epoch on {before} dev images and now validates on {now} "
                f"(`val_images`): the best dev rsum so far compares other data",
                settings=("val_images",),
            ),
            stacklevel=4,
        )


def _refuse_a_run_without_last(out: Path) -> None:
    """``resume`` where ``out/last`` holds no model: fine for a folder without a run (training
    starts at the first epoch; an empty ``last/`` too), refused where the run's other files are
    there, which training from the first epoch would replace (a ``best/`` of a better model among
    them)."""
    # best/ alone is a run killed in its first epoch between saving best/ and last/: nothing to lose
    held = [name for name in ("last", "history.json") if _holds_something(out / name)]
    if held:
        raise DataError(
            out / "last",
            f"holds no model to resume ({CONFIG_FILE} is missing), but {out} holds a run "
            f"({', '.join(held)}): training from the first epoch would replace it; put its last/ back, or "
            "train without `resume` to start again",
            settings=("resume",),
        )


def _holds_something(path: Path) -> bool:
    """A file, or a folder with anything in it (an empty folder has nothing to lose)."""
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


_STATE_FIELDS = ("epoch", "optimizer", "best_rsum", "best_epoch", "torch_rng")


def _check_resumed_data(out: Path, loaded, vocab: Vocab, store_root: Path, data_info: dict) -> None:
    """A resumed run's store: refused where its vocabulary is not the run's (a same-sized one was
    taken, and replaced the run's vocab.json); a ``HeiindexWarning`` where its train or dev split
    is not the one the run trained on (its dev rsum then compares other data)."""
    if loaded.vocab.checksum != vocab.checksum:
        raise DataError(
            store_root / "vocab.json",
            f"is another vocabulary than the run's ({out / 'last' / 'vocab.json'}): this run cannot go on with "
            "this store; resume it with the store it trained on",
        )
    had = loaded.info.get("data", {})
    changed = [name for name in ("train", "dev") if name in had and had[name] != data_info[name]]
    if changed:
        warnings.warn(
            HeiindexWarning(
                f"the {' and '.join(changed)} split{'s' if len(changed) > 1 else ''} of {store_root} "
                f"differ{'' if len(changed) > 1 else 's'} from what the run in {out} trained on "
                f"({had.get('store', 'its store')}): its best dev rsum so far compares other data"
            ),
            stacklevel=4,
        )


def _check_best(best: Path, best_epoch: int, best_rsum: float) -> None:
    """``best/`` must be the model that ``last/``'s state names as the run's best: a run started
    in this folder without resuming replaces ``best/`` at its first epoch and ``last/`` only after
    it, so one stopped between the two left another run's best; resuming then claimed the old
    best and never replaced it."""
    if best_epoch < 0:
        return
    recorded = f"the run's best that last/ records (epoch {best_epoch + 1}, dev rsum {best_rsum:.2f})"
    again = "train without resuming to start again"
    if not best.exists():
        raise DataError(best, f"is missing, so {recorded} is lost; {again}")
    try:
        info = read_model_config(best)[1].get("info")
    except DataError as exc:
        raise DataError(best, f"cannot be read as {recorded} ({exc}); {again}") from None
    info = info if isinstance(info, dict) else {}
    dev = info.get("dev") if isinstance(info.get("dev"), dict) else {}
    epoch, rsum = info.get("epoch"), dev.get("rsum")
    epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None
    rsum = rsum if isinstance(rsum, (int, float)) and not isinstance(rsum, bool) else None
    if epoch != best_epoch + 1 or rsum != best_rsum:
        if epoch is not None and rsum is not None:
            held = f"holds epoch {epoch} (dev rsum {rsum:.2f})"
        elif epoch is not None:
            held = f"holds epoch {epoch} but no dev rsum"
        elif rsum is not None:
            held = f"holds dev rsum {rsum:.2f} but no epoch"
        else:
            held = "holds no epoch or dev rsum"
        raise DataError(
            best,
            f"{held}, not {recorded}: a run started here without resuming saved it and stopped before "
            f"its first last/; {again}",
        )


def read_state(last: Path) -> dict:
    """The training state kept in ``last/`` (``STATE_FILE``); ``DataError`` naming it where it is
    missing, unreadable or incomplete, since resuming without it would start again from the first
    epoch and replace ``best/``."""
    path = Path(last) / STATE_FILE
    again = "train without `resume` to start again (best/ and last/ are then replaced)"
    if not path.is_file():
        raise DataError(path, f"missing, so this run cannot be resumed; {again}", settings=("resume",))
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises EOFError, RuntimeError, UnpicklingError, ... on a damaged file
        raise DataError(path, f"cannot be read ({type(exc).__name__}: {exc}); {again}", settings=("resume",)) from None
    missing = [f for f in _STATE_FIELDS if not isinstance(state, dict) or f not in state]
    if missing:
        raise DataError(path, f"lacks {', '.join(missing)}; {again}", settings=("resume",))
    return state


_LOCK_FILE = ".train.lock"  # in a run folder while a train writes it


@contextmanager
def _run_lock(out: Path):
    """Hold ``out`` (made here where it is new) for this process: two trains writing one run
    folder at once each reported its own best while ``best/`` held the other's model. An
    exclusive ``flock`` on ``out/.train.lock``, which the system releases if the process dies
    (a file left by a SIGKILL is taken by the next run). The folders this run made (``out``,
    and any missing parents) are removed again where nothing was saved in them (refused, or
    failed in its first epoch). Where ``fcntl`` is missing (Windows) no lock is taken."""
    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first: removed in this order
    out.mkdir(parents=True, exist_ok=True)
    try:
        with ExitStack() as held:
            try:
                held.enter_context(exclusive(out / _LOCK_FILE))  # held for the whole run
            except LockHeld:
                raise DataError(
                    out,
                    "another train is writing this run folder now (it holds .train.lock): wait for it, or train "
                    "into another run folder",
                ) from None
            yield
    finally:
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def train(
    store_root: str | Path,
    out: str | Path,
    model_config: ScanConfig | None = None,
    config: TrainConfig | None = None,
    train_split: str = "train",
    val_split: str = "dev",
    resume: bool = False,
    progress: bool = False,
    log=print,
) -> TrainResult:
    """Train on ``store_root/train_split``, validate on ``val_split``; write ``out/best``, ``out/last``.
    ``model_config`` None: ``ScanConfig``'s defaults with the store's vocabulary size and region
    feature size. ``resume``: go on from ``out/last`` where it holds a run (``resumable``).
    ``config`` None: the settings that run trained with where it resumes one
    (``TrainConfig.of_run``), else the defaults."""
    store_root, out = require_path("store_root", store_root), require_path("out", out)
    resume = require_flag("resume", resume)  # "no" is truthy: it resumed the run
    if model_config is not None:
        require_config("model_config", model_config, ScanConfig)
    if config is not None:
        require_config("config", config, TrainConfig)
    # refused now, not after the first epoch: a run folder holds best/, last/, history.json (and
    # the hidden leftovers of their swaps); a file or any other folder is not written into
    run_files = ("best", "last", "history.json", ".best.*", ".last.*", ".history.json.*", _LOCK_FILE)
    check_output(out, "a training run", run_files, whole=False)  # written inside, never swapped whole
    for folder in (out / "best", out / "last"):
        check_output(folder, *MODEL_OUTPUT)
    with _run_lock(out):  # one train at a time in a run folder
        return _train(store_root, out, model_config, config, train_split, val_split, resume, progress, log)


@dataclass
class _RunState:
    """Where a run stands: the model and optimizer, the first epoch still to train, the rows of
    history so far, and the best dev rsum and its epoch (-1 before any)."""

    model: ScanModel
    opt: torch.optim.Optimizer
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_rsum: float = -1.0
    best_epoch: int = -1


def _train(
    store_root: Path,
    out: Path,
    model_config: ScanConfig | None,
    config: TrainConfig | None,
    train_split: str,
    val_split: str,
    resume: bool,
    progress: bool,
    log,
) -> TrainResult:
    """``train`` in a run folder this process holds (``_run_lock``)."""
    resuming = resume and resumable(out)
    if resume and not resuming:
        _refuse_a_run_without_last(out)
    run = TrainConfig.of_run(out) if resuming else None  # the resumed run's own settings, read once
    if resuming:
        config = _resumed_config(run, config, log)
    elif config is None:
        config = TrainConfig()
    if config.threads:
        torch.set_num_threads(config.threads)
    vocab = store_vocab(store_root)
    tr = SplitStore.open(store_root, train_split)
    va = SplitStore.open(store_root, val_split)
    warn_validating_on_training(tr, va)
    for s in (tr, va):
        if s.manifest["vocab"]["sha256"] != vocab.checksum:
            raise DataError(s.path / "manifest.json", "split was encoded with another vocabulary than vocab.json")
    if resuming:
        _warn_of_other_dev_images(out, run, config, va.n_images)
    caps = tr.captions()
    tr.check_ids(caps)  # distinct ids, and every caption's image in the split: batches pair them by id
    data_info = {"train": tr.checksum, "dev": va.checksum, "store": str(store_root)}

    torch.manual_seed(config.seed)
    if resuming:
        at = _resume_from_last(out, model_config, config, vocab, store_root, data_info, log)
    else:
        at = _start_run(out, model_config, config, vocab, tr, resume, log)
    model = at.model
    if model.config.vocab_size != len(vocab):
        raise DataError(store_root / "vocab.json", f"{len(vocab)} words, the model expects {model.config.vocab_size}")
    if model.config.img_dim != tr.feature_dim:
        raise DataError(
            tr.path / "manifest.json",
            f"features have size {tr.feature_dim}, the model expects img_dim {model.config.img_dim}",
        )
    # the dev split, read and checked once (not after the first epoch, nor again each epoch)
    _, val_captions = check_split(model, va, config.val_images)
    _check_enough_images(tr.n_images, va.n_images, config.val_images, train_split, val_split)
    # out/ is made by _run_lock, and removed again where no epoch was saved in it
    kept = f"{out / 'best'} and {out / 'last'} hold the epochs before it, if any"  # said where a loss is not finite
    for epoch in range(at.start_epoch, config.epochs):
        lr = config.lr * (0.1 ** (epoch // config.lr_decay_epochs))
        for g in at.opt.param_groups:
            g["lr"] = lr
        loss, pairs, train_seconds = _train_epoch(at, tr, caps, config, epoch, kept, progress)
        model.eval()
        res = evaluate_exhaustive(model, encode_split(model, va, config.val_images, captions=val_captions))
        rsum = res.rsum
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "loss": loss,
            "train_seconds": train_seconds,
            "pairs_per_second": pairs / max(train_seconds, 1e-9),
            "dev_t2i": res.t2i.to_dict(),
            "dev_i2t": res.i2t.to_dict(),
            "dev_rsum": rsum,
        }
        at.history.append(row)
        log(
            f"epoch {epoch + 1}: loss {row['loss']:.3f}, dev t2i R@1 {res.t2i.r1:.1f} R@5 {res.t2i.r5:.1f} "
            f"R@10 {res.t2i.r10:.1f} | i2t R@1 {res.i2t.r1:.1f} R@5 {res.i2t.r5:.1f} R@10 {res.i2t.r10:.1f} "
            f"| rsum {rsum:.1f} ({train_seconds:.0f} s)"
        )
        info = {
            "data": data_info,
            "train": config.to_dict(),
            "epoch": epoch + 1,
            "dev": {
                "t2i": res.t2i.to_dict(),
                "i2t": res.i2t.to_dict(),
                "rsum": rsum,
                "images": min(config.val_images, va.n_images),
            },
        }
        _save_epoch(out, at, vocab, epoch, rsum, info)
    return TrainResult(at.best_rsum, at.best_epoch, at.history, out)


def _resume_from_last(
    out: Path, model_config: ScanConfig | None, config: TrainConfig, vocab: Vocab, store_root: Path, data_info, log
) -> _RunState:
    """The run of ``out/last``, its optimizer and torch RNG restored, after checking that it was
    trained on this data and with ``model_config`` (where given), and that ``out/best`` is the
    epoch its state names."""
    loaded = load_model(out / "last")
    model = loaded.model
    if model_config is not None and model_config != model.config:
        changes = "; ".join(model_config.changes_from(model.config, "it has"))
        raise DataError(out / "last", f"cannot resume: its model config differs from the one given: {changes}")
    state = read_state(out / "last")
    start_epoch = int(state["epoch"]) + 1
    if "history" in state:
        history = json.loads(state["history"])
    else:  # a run saved before the state kept its history: the epochs up to the state's
        saved = json.loads((out / "history.json").read_text()) if (out / "history.json").exists() else []
        history = [row for row in saved if row["epoch"] <= start_epoch]
    best_rsum, best_epoch = float(state["best_rsum"]), int(state["best_epoch"])
    _check_resumed_data(out, loaded, vocab, store_root, data_info)
    _check_best(out / "best", best_epoch, best_rsum)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    log(f"resuming after epoch {start_epoch} (best rsum {best_rsum:.2f} at epoch {best_epoch + 1})")
    if start_epoch >= config.epochs:
        done = f"{start_epoch} epoch{'s' if start_epoch != 1 else ''}"
        log(f"nothing left to train: the run has done {done} of the {config.epochs} asked for (ask for more to go on)")
    return _RunState(model, opt, start_epoch, history, best_rsum, best_epoch)


def _start_run(
    out: Path, model_config: ScanConfig | None, config: TrainConfig, vocab: Vocab, tr: SplitStore, resume: bool, log
) -> _RunState:
    """A new model (``model_config``, by default the store's vocabulary and feature size) and
    optimizer; said where ``resume`` found nothing to resume, warned where ``out`` holds a run
    that this one replaces."""
    if resume:
        log(f"nothing to resume in {out / 'last'}: training from the first epoch")
    elif (out / "last" / CONFIG_FILE).is_file():
        warnings.warn(
            HeiindexWarning(
                f"{out} holds a run, which this one replaces as it saves its first epoch (`resume` goes on "
                "with it instead)",
                settings=("resume",),
            ),
            stacklevel=4,
        )
    # by default the store's vocabulary and feature size (ScanConfig's img_dim is SCAN's 2048)
    model = ScanModel(model_config or ScanConfig(vocab_size=len(vocab), img_dim=tr.feature_dim))
    return _RunState(model, torch.optim.Adam(model.parameters(), lr=config.lr))


def _train_epoch(
    at: _RunState, tr: SplitStore, caps, config: TrainConfig, epoch: int, kept: str, progress: bool
) -> tuple[float, int, float]:
    """One epoch over ``tr``'s captions (``caps``): ``(mean loss, pairs scored, seconds)``. A
    loss or gradient norm that is not finite stops the run, saying what ``kept`` holds."""
    model, opt = at.model, at.opt
    model.train()
    rng = np.random.default_rng([config.seed, epoch])
    n_batches = -(-tr.n_captions // config.batch_size)
    bar = progress_bar(n_batches, f"epoch {epoch + 1}/{config.epochs}", progress)
    t0, pairs, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
    for feats, tok, lens, img_ids, _ in iter_training_batches(
        tr, caps, config.batch_size, rng, config.buffer_row_groups
    ):
        lens_t = torch.from_numpy(lens)
        regions = model.encode_images(torch.from_numpy(feats))
        words = model.encode_captions(torch.from_numpy(tok), lens_t)
        scores = model.score(words, lens_t, regions)
        hardest = config.max_violation and epoch >= config.warmup_sum_epochs
        loss = contrastive_loss(scores, torch.from_numpy(img_ids), config.margin, hardest)
        value = finite_loss(loss, epoch, steps, kept)
        opt.zero_grad()
        loss.backward()
        # the gradients' norm (clipped to grad_clip where set): a finite loss can still give inf
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
        finite_loss(norm, epoch, steps, kept, "the gradient norm")
        opt.step()
        pairs += len(lens) ** 2
        loss_sum += value
        steps += 1
        bar.set_postfix(loss=f"{value:.3f}", pairs_s=f"{pairs / (time.perf_counter() - t0):.0f}")
        bar.update(1)
    bar.close()
    return loss_sum / max(1, steps), pairs, time.perf_counter() - t0


def _save_epoch(out: Path, at: _RunState, vocab: Vocab, epoch: int, rsum: float, info: dict) -> None:
    """``out/best`` where ``rsum`` beats the best so far, then ``out/last`` with the state to
    resume from (the history included) in the same swap: a run killed between any two steps
    resumes from a consistent last/, and redoing an epoch that already reached best/ gives the
    same model again. ``history.json`` is a copy to read; the state's is the one resumed."""
    if rsum > at.best_rsum:
        at.best_rsum, at.best_epoch = rsum, epoch
        save_model(at.model, vocab, out / "best", info)
    state = {
        "epoch": epoch,
        "optimizer": at.opt.state_dict(),
        "best_rsum": at.best_rsum,
        "best_epoch": at.best_epoch,
        "torch_rng": torch.get_rng_state(),
        "history": json.dumps(at.history),
    }
    save_model(at.model, vocab, out / "last", info, state=state)
    with atomic_file(out / "history.json") as tmp:
        tmp.write_text(json.dumps(at.history, indent=2) + "\n")
