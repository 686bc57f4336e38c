"""``heiindex``: click commands that turn flags into library calls and results into text.

Nothing here computes anything the library cannot do from Python.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from heiindex.device import PRECISIONS
from heiindex.errors import HeiindexError, HeiindexWarning, counted
from heiindex.settings import require_breadth


def handle_errors(func):
    """Turn a ``HeiindexError``, a rejected setting or a file the system refused into a one-line
    message and exit status 2; a ``HeiindexWarning`` (such as ``LeftoverWarning``) into a
    "Warning: ..." line."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():  # which restores the handler and filters changed here
                warnings.simplefilter("always", HeiindexWarning)  # a line, even under -W error
                warnings.showwarning = _warning_as_line(warnings.showwarning)
                return func(*args, **kwargs)
        except (HeiindexError, ValueError) as exc:  # ValueError: an argument check below the settings
            click.echo(f"Error: {_as_flag(exc)}", err=True)
            sys.exit(2)
        except BrokenPipeError:  # the reader went away (`heiindex bench --json | head`): nothing to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and no second error at exit
            sys.exit(1)
        except OSError as exc:  # a folder where a file was expected, no permission, a full disk, ...
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"Error: {where}{exc.strerror or exc}", err=True)
            sys.exit(2)
        except (MemoryError, RuntimeError) as exc:  # torch's allocators raise RuntimeErrors
            if not _out_of_memory(exc):
                raise
            click.echo(f"Error: out of memory: {_allocation(exc)}", err=True)  # was a traceback
            sys.exit(2)

    return wrapper


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed: Python's ``MemoryError``, torch's CPU allocator
    ("DefaultCPUAllocator: can't allocate memory") or CUDA's ("CUDA out of memory")."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def _allocation(exc: BaseException) -> str:
    """What could not be allocated, as far as ``exc`` says, on one line."""
    from heiindex.errors import one_line, sized

    if m := re.search(r"tried to allocate (\d+) bytes", str(exc)):
        return f"a block of {sized(int(m[1]))} was asked for and the system refused it"
    return one_line(exc) or type(exc).__name__


def _warning_as_line(show):
    """``warnings.showwarning`` printing a ``HeiindexWarning`` as one "Warning: ..." line on
    standard error, and any other warning through ``show``."""

    def shown(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, HeiindexWarning):
            text = _flagged(str(message), getattr(message, "settings", ()))
            click.echo(f"Warning: {text}", err=True)
        else:
            show(message, category, filename, lineno, file, line)

    return shown


def _as_flag(exc: Exception) -> str:
    """The message of ``exc``, with the settings it names (its ``settings``: a ``HeiindexError``'s,
    a ``SettingError``'s setting and ``also``) named by this command's flags (``_flagged``)."""
    return _flagged(str(exc), getattr(exc, "settings", ()))


# The library's names for settings whose flags set a parameter of another name in the command
# (``matcher``: ``--model``, the command's ``model_dir``); used where the command has that flag.
_ALIASES = {
    "matcher": "model_dir",
    "hasher": "hash_dir",
    "store_root": "store",
    "out_root": "out",
    "protocols": "protocol",
    "prototypes": "prototype_split",
    # PrototypeConfig's fields, build's --prototype-* flags
    "k": "prototype_k",
    "preselect": "prototype_preselect",
    "weight": "prototype_weight",
}


def _flags() -> dict[str, str]:
    """This command's flags by the names of the settings they set ({} outside a command), and by
    the library's names for them (``_ALIASES``)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return {}
    flags = {p.name: p.opts[0] for p in ctx.command.params if isinstance(p, click.Option)}
    return flags | {alias: flags[name] for alias, name in _ALIASES.items() if name in flags and alias not in flags}


def _flagged(message: str, names) -> str:
    """``message`` with the settings ``names`` that it names named by this command's flags for
    them, in the two forms the library writes them (``heiindex.errors``): in backquotes anywhere
    ("`nlist` 12 and `nprobe` 3 not used" -> "--nlist 12 and --nprobe 3 not used"), or bare as
    the first word ("epochs must be ..." -> "--epochs must be ..."). Nothing else: an ordinary word
    that is also a setting's name ("the 12 candidates", `vocab.json`) is left as it is, and so is
    a name the command has no flag for."""
    flags = _flags()
    for name in dict.fromkeys(names):
        if name not in flags:  # a setting this command does not take: its name, without the quotes
            message = message.replace(f"`{name}`", name)
            continue
        message = message.replace(f"`{name}`", flags[name])
        if re.match(rf"{re.escape(name)}(?= )", message):
            message = flags[name] + message[len(name) :]
    return message


class PathType(click.Path):
    """A path argument as a ``Path``, refusing what no command can use: an empty value (``Path("")``
    is the current folder, so ``--index "$UNSET"`` searched there) and one that is not valid UTF-8
    (pyarrow and FAISS take UTF-8 paths: such a path ended in a bare codec error)."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            if not value:
                self.fail("is empty: give a path (an empty value is not the current folder)", param, ctx)
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                self.fail(f"{value!r} is not valid UTF-8, which heiindex's files need: rename it", param, ctx)
        return super().convert(value, param, ctx)


PATH = PathType()


def path_option(*names: str, help: str):
    """An optional path flag (``None`` when not given)."""
    return click.option(*names, type=PATH, default=None, help=help)


store_option = path_option("--store", help="Store root (default: coco-sim).")
index_dir_option = path_option("--index", "index_dir", help="Index folder (default: the last built).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
protocol_option = click.option(
    "--protocol",
    type=click.Choice(["auto", "full", "1k"]),
    default="auto",
    show_default=True,
    help="auto: the whole split, plus COCO 1K (the mean of 5 folds of 1,000 images) on a 5,000-image split "
    "(COCO 5K, as testall); full: the whole split; 1k: the folds.",
)
device_option = click.option(
    "--device", default="cpu", show_default=True, help="Where queries and scoring run: cpu, cuda, cuda:1, ..."
)
engine_option = click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process; ray: one Ray actor per shard of a sharded build.",
)
address_option = click.option(
    "--address", default=None, help="Ray cluster address (e.g. auto); default: a local Ray started for this command."
)
threads_option = click.option(
    "--threads",
    type=int,
    default=None,
    help="torch threads per Ray actor (default: as many as this process uses, so that scores are "
    "summed in the same order as in-process and match to the last bit).",
)
codes_option = click.option(
    "--codes",
    type=click.Choice(["faiss", "milvus"]),
    default=None,
    help="Where the hash codes are searched: the index's FAISS files or a Milvus server (--uri).",
)
uri_option = click.option("--uri", default=None, help="Milvus server, e.g. http://127.0.0.1:19530.")
search_nprobe_option = click.option(
    "--nprobe",
    type=int,
    default=None,
    help="IVF lists probed per query, in place of the build's (at most its --nlist): more finds more, more slowly.",
)
ef_search_option = click.option(
    "--ef-search",
    type=int,
    default=None,
    help="HNSW's search breadth, in place of the build's 128: larger finds more of the nearest codes, more slowly.",
)
dtype_option = click.option(
    "--dtype",
    type=click.Choice(PRECISIONS),
    default="float32",
    show_default=True,
    help=(
        "float32 is exact; tf32 / bfloat16 trade ~1e-3 relative score error for speed on GPUs "
        "(bfloat16 features change the scores on a CPU too; tf32 changes nothing there)."
    ),
)


def model_option(help: str = "Matcher folder (default: the coco-sim model)."):
    return path_option("--model", "model_dir", help=help)


def hash_option(help: str = "Hash module folder (default: the coco-sim one)."):
    return path_option("--hash", "hash_dir", help=help)


class IndexTypeChoice(click.Choice):
    """build's --index: the index type. Elsewhere --index is an index folder, so a path given here
    is answered with the option that takes build's folder."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            if isinstance(value, str) and ("/" in value or os.sep in value or Path(value).exists()):
                self.fail(
                    f"{value!r} looks like a path: build's --index is the index type; write to a folder with --out"
                )
            raise


@click.group()
@click.version_option(package_name="heiindex")
def cli() -> None:
    """Fast cross-attention image-text retrieval (HEI hash codes + SCAN re-ranking)."""
    exit_on_sigterm()
    for stream in (sys.stdout, sys.stderr):  # an ASCII-only terminal: "caf\xe9" in a caption, not a codec error
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def exit_on_sigterm() -> None:
    """SIGTERM (`kill`, `docker stop`, a job scheduler's time limit) ends a command as Ctrl-C
    does: the output being written is removed (``heiindex.atomic``), where the signal's default
    left its scratch folder for the next run to clear. Exit status 143, the signal's own. Only
    the command line does this: a library user's process keeps its own handlers."""
    if threading.current_thread() is threading.main_thread():  # signal.signal works there only
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)


def _on_signal(signum, frame) -> None:
    from heiindex.atomic import note_interrupt

    note_interrupt(signum)  # should the exit below be swallowed on the way, nothing is put in place
    if signum == signal.SIGINT:
        signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as before
    sys.exit(128 + signum)


@cli.command()
@click.option("--precomp", "precomp", required=True, type=PATH, help="SCAN precomp folder.")
@click.option(
    "--split",
    required=True,
    type=click.Choice(["train", "dev", "test", "testall"]),
    help="The precomp split to convert: SPLIT_ims.npy and SPLIT_caps.txt (image ids number the images from 0 "
    "in file order; a file with a row per caption, each image repeated, gives each image one id).",
)
@click.option("--out", "out", required=True, type=PATH, help="Store root to write into.")
@click.option(
    "--vocab",
    type=PATH,
    default=None,
    help="SCAN vocab JSON (default: the root's, else built from the captions).",
)
@click.option("--regions", type=int, default=36, show_default=True, help="Expected regions per image.")
@click.option("--feature-dim", type=int, default=2048, show_default=True, help="Expected feature size.")
@click.option(
    "--captions-per-image",
    type=int,
    default=5,
    show_default=True,
    help="Captions per image in SPLIT_caps.txt, each image's in a row (COCO, Flickr30K: 5).",
)
@handle_errors
def ingest(
    precomp: Path, split: str, out: Path, vocab: Path | None, regions: int, feature_dim: int, captions_per_image: int
) -> None:
    """Convert a SCAN precomp split into heiindex's Parquet stores."""
    from heiindex.ingest import ingest as run_ingest

    summary = run_ingest(
        precomp,
        split,
        out,
        vocab=vocab,
        regions=regions,
        feature_dim=feature_dim,
        progress=True,
        captions_per_image=captions_per_image,
    )
    click.echo(summary.line())


def _store_root(store: Path | None) -> Path:
    """The given store root, or the default coco-sim one (generated on first use)."""
    if store is not None:
        return store
    from heiindex.default_data import ensure_coco_sim

    return ensure_coco_sim(progress=True, log=lambda m: click.echo(m, err=True))


@cli.command()
@handle_errors
def prepare() -> None:
    """Generate the default coco-sim data (real captions, SIMULATED image features) if missing."""
    root = _store_root(None)
    click.echo(f"coco-sim stores ready in {root}")


@cli.command()
@store_option
@click.option("--out", type=PATH, required=True, help="Run folder: best/, last/, history.json.")
@click.option("--epochs", type=int, default=8, show_default=True, help="Passes over the training split.")
@click.option(
    "--batch-size",
    type=int,
    default=128,
    show_default=True,
    help="Image-caption pairs per step. Memory grows with its square (every caption is scored against every image).",
)
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Adam learning rate, in (0, 1].")
@click.option("--lr-decay-epochs", type=int, default=5, show_default=True, help="Divide lr by 10 every N epochs.")
@click.option(
    "--embed-size", type=int, default=256, show_default=True, help="Joint embedding size of regions and words."
)
@click.option(
    "--cross-attn",
    type=click.Choice(["t2i", "i2t"]),
    default="t2i",
    show_default=True,
    help="t2i: words attend over regions; i2t: regions over words (SCAN's two directions).",
)
@click.option(
    "--raw-feature-norm",
    default="clipped_l2norm",
    show_default=True,
    help="SCAN's norm of the similarities before the softmax: clipped_l2norm, l2norm, softmax, clipped_l1norm, "
    "l1norm, clipped, no_norm.",
)
@click.option(
    "--agg",
    type=click.Choice(["lse", "mean", "max", "sum"]),
    default="lse",
    show_default=True,
    help="How the per-word (per-region) relevances become the pair score.",
)
@click.option("--lambda-lse", type=float, default=6.0, show_default=True, help="Temperature of --agg lse.")
@click.option("--lambda-softmax", type=float, default=9.0, show_default=True, help="Inverse temperature of attention.")
@click.option("--margin", type=float, default=0.2, show_default=True, help="Margin of the hinge triplet loss.")
@click.option("--max-violation/--sum-violation", default=True, show_default=True, help="Hardest negative, or all.")
@click.option(
    "--warmup-sum-epochs",
    type=int,
    default=1,
    show_default=True,
    help="Epochs summing over all negatives before hardest negatives.",
)
@click.option(
    "--val-images", type=int, default=1000, show_default=True, help="Dev images used for validation (at most)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of initialisation and batch order.")
@click.option("--resume", is_flag=True, help="Continue from OUT/last (where there is none: start, saying so).")
@handle_errors
def train(
    store,
    out,
    epochs,
    batch_size,
    lr,
    lr_decay_epochs,
    embed_size,
    cross_attn,
    raw_feature_norm,
    agg,
    lambda_lse,
    lambda_softmax,
    margin,
    max_violation,
    warmup_sum_epochs,
    val_images,
    seed,
    resume,
) -> None:
    """Train a SCAN matcher (hinge triplet loss, validation on dev, best kept)."""
    from heiindex.attention import AttentionConfig
    from heiindex.model import ScanConfig
    from heiindex.store import SplitStore, store_vocab
    from heiindex.train import TrainConfig, resumable
    from heiindex.train import train as run_train

    root = _store_root(store)
    vocab = store_vocab(root)
    att = AttentionConfig(cross_attn, raw_feature_norm, agg, lambda_lse, lambda_softmax)
    img_dim = SplitStore.open(root, "train").feature_dim
    resuming = resume and resumable(out)
    if resuming:  # the saved model's shape holds; an option given to change it is refused, not ignored
        _check_resumed_shape(out / "last")
    mcfg = (
        None if resuming else ScanConfig(vocab_size=len(vocab), embed_size=embed_size, img_dim=img_dim, attention=att)
    )
    settings = dict(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_decay_epochs=lr_decay_epochs,
        margin=margin,
        max_violation=max_violation,
        warmup_sum_epochs=warmup_sum_epochs,
        seed=seed,
        val_images=val_images,
    )
    if resuming:  # the run's own settings, where the command line gives none (not the defaults)
        tcfg = _resumed_config(out, settings)
    else:
        tcfg = TrainConfig(**settings)
    res = run_train(root, out, mcfg, tcfg, resume=resume, progress=True, log=click.echo)
    click.echo(f"best dev rsum {res.best_rsum:.1f} at epoch {res.best_epoch + 1}; model in {out / 'best'}")


def _check_resumed_shape(last: Path) -> None:
    """Options given on the command line (not left at their defaults) that differ from the model
    ``--resume`` continues: a ``HeiindexError`` naming each."""
    from heiindex.checkpoint import read_model_config

    params = click.get_current_context().params
    saved, _ = read_model_config(last)  # the shape only: the weights are loaded once, by train
    have = {"embed_size": saved.embed_size, **saved.attention.to_dict()}
    diff = [
        f"{p.opts[0]} {params[p.name]} (it has {have[p.name]})" for p in _given(*have) if params[p.name] != have[p.name]
    ]
    if diff:
        raise HeiindexError(f"--resume continues the model in {last}, which cannot change: " + "; ".join(diff))


def _resumed_config(out: Path, settings: dict):
    """The training settings of the run in ``out`` (``TrainConfig.of_run``), with those of
    ``settings`` given on the command line; the run's own that differ from the defaults are said
    in a line: a resumed run went on with the defaults (batch 128 where it had trained with 16)
    without a word."""
    from heiindex.train import TrainConfig

    given = {p.name: settings[p.name] for p in _given(*settings)}
    resumed = TrainConfig.of_run(out, **given)
    params = {p.name: p for p in click.get_current_context().command.params}

    def shown(name: str, value) -> str:  # a boolean flag by its on or off form
        p = params[name]
        return (p.opts[0] if value else p.secondary_opts[0]) if isinstance(value, bool) else f"{p.opts[0]} {value}"

    kept = [shown(n, getattr(resumed, n)) for n in settings if n not in given and getattr(resumed, n) != settings[n]]
    if kept:
        click.echo(f"resuming with the run's own {', '.join(kept)} (give an option to change it)")
    return resumed


def _given(*names: str) -> list[click.Parameter]:
    """The current command's parameters among ``names`` given on the command line (not left at
    their defaults), in the command's order."""
    ctx = click.get_current_context()
    return [
        p
        for p in ctx.command.params
        if p.name in names and ctx.get_parameter_source(p.name) is not ParameterSource.DEFAULT
    ]


@cli.command("train-hash")
@model_option()
@store_option
@click.option(
    "--out",
    type=PATH,
    required=True,
    help="Hash module folder to write (give it to build --hash).",
)
@click.option("--bits", type=int, default=256, show_default=True, help="Code length k (a multiple of 8, 8 to 1024).")
@click.option(
    "--pooling",
    type=click.Choice(["mean", "max", "attn", "query"]),
    default="query",
    show_default=True,
    help="How region / word embeddings become one vector before hashing (query: words by a learned query, "
    "regions by their mean).",
)
@click.option(
    "--epochs",
    type=int,
    default=80,
    show_default=True,
    help="Passes over the scored batches; the best dev epoch is kept (coco-sim: query pooling's best was 64, "
    "mean pooling's 120 of 160).",
)
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Adam learning rate, in (0, 1].")
@click.option(
    "--rank-weight",
    type=float,
    default=1.0,
    show_default=True,
    help="Weight of the code ranking term beside the HEI loss (0: the paper's loss alone).",
)
@click.option("--rounds", type=int, default=4, show_default=True, help="Passes of freshly batched matcher scores.")
@click.option(
    "--val-candidates",
    type=int,
    default=None,
    help="N of the dev candidate recall@N that picks the best epoch.  [default: 100, or a tenth of the dev "
    "images where it has no more than 100]",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of initialisation and batch order.")
@handle_errors
def train_hash_cmd(model_dir, store, out, bits, pooling, epochs, lr, rank_weight, rounds, val_candidates, seed) -> None:
    """Train the HEI hash layers next to a frozen matcher."""
    from heiindex.checkpoint import load_model
    from heiindex.default_data import default_model_dir
    from heiindex.hashing import HashConfig
    from heiindex.train_hash import HashTrainConfig, train_hash

    matcher = load_model(model_dir or default_model_dir())
    hcfg = HashConfig(bits=bits, pooling=pooling)  # embed_size: the matcher's
    tcfg = HashTrainConfig(
        epochs=epochs, lr=lr, rank_weight=rank_weight, rounds=rounds, val_candidates=val_candidates, seed=seed
    )
    res = train_hash(matcher, _store_root(store), out, hcfg, tcfg, progress=True, log=click.echo)
    rec = res["dev_candidate_recall"]
    click.echo(
        f"best epoch {res['best_epoch']}: dev candidate recall@{rec['n']} t2i {100 * rec['t2i']:.1f}% "
        f"i2t {100 * rec['i2t']:.1f}%; hash module in {out}"
    )


@cli.command("import-scan")
@click.argument("checkpoint", type=PATH)
@click.option("--vocab", type=PATH, required=True, help="SCAN vocab JSON of that model.")
@click.option("--out", type=PATH, required=True, help="heiindex model folder to write.")
@handle_errors
def import_scan(checkpoint: Path, vocab: Path, out: Path) -> None:
    """Convert SCAN's model_best.pth.tar into a heiindex model folder (no arbitrary unpickling)."""
    from heiindex.scan_import import import_scan_checkpoint

    path = import_scan_checkpoint(checkpoint, vocab, out)
    click.echo(f"imported {checkpoint} -> {path}")


@cli.command()
@click.option(
    "--model",
    "model_dirs",
    multiple=True,
    type=PATH,
    help="Matcher folder (default: the coco-sim model). Given twice or more: an ensemble, the mean of their scores "
    "(SCAN's t2i + i2t ensembles).",
)
@store_option
@click.option("--split", default="test", show_default=True, help="The store split to score exhaustively.")
@protocol_option
@json_option
@handle_errors
def evaluate(model_dirs, store, split, protocol, as_json) -> None:
    """Exhaustive R@K of a matcher (or an ensemble) on a split (every caption against every image)."""
    from heiindex.checkpoint import load_model
    from heiindex.default_data import default_model_dir
    from heiindex.protocols import evaluate_split
    from heiindex.store import SplitStore

    from .render import console, echo_json, items_counted, recall_table

    matchers = [load_model(m) for m in model_dirs or (default_model_dir(),)]
    st = SplitStore.open(_store_root(store), split)
    out = evaluate_split(matchers, st, protocol, progress=True)  # checks the store against each first
    if as_json:
        echo_json(out)
        return
    what = "exhaustive" if len(matchers) == 1 else f"exhaustive, the mean of {len(matchers)} matchers"
    for name in ("full", "5k", "1k"):
        if name in out:
            res, label = out[name], _protocol_label(name, out[name], split)
            console.print(
                recall_table(
                    f"{label}: {what} ({items_counted(res['images'], res['captions'])})",
                    [("text-to-image", res["t2i"]), ("image-to-text", res["i2t"])],
                )
            )
            click.echo(f"{label} rsum {res['rsum']:.1f}")
    click.echo(f"{out['seconds']:.1f} s of scoring")


@cli.command()
@click.option("--split", default="test", show_default=True, help="The store split to index (its images and captions).")
@store_option
@model_option()
@hash_option()
@click.option("--out", type=PATH, default=None, help="Index folder (default: data/coco-sim/index/SPLIT).")
@click.option(
    "--index",
    "index_type",
    type=IndexTypeChoice(["auto", "flat", "ivf", "hnsw"]),
    default="auto",
    show_default=True,
    help="auto: exact flat search up to 2M codes, IVF (4096 lists, nprobe 64) above.",
)
@click.option("--nlist", type=int, default=None, help="IVF lists (default sqrt(n); 4096 for auto).")
@click.option("--nprobe", type=int, default=None, help="IVF lists probed per query (default 8; 64 for auto).")
@click.option("--device", default="cpu", show_default=True, help="Where encoding and hashing run: cpu, cuda, ...")
@click.option(
    "--shards",
    type=int,
    default=None,
    help="Write S self-contained shards (contiguous image ranges) and a top manifest.",
)
@click.option(
    "--prototypes",
    "prototype_split",
    default=None,
    metavar="SPLIT",
    help="Give each image a code made partly of the codes of SPLIT's captions (such as train) that the "
    "matcher ranks highest for it: better Hamming candidates for new images (README, 'Prototype image codes').",
)
@click.option("--prototype-k", type=int, default=None, help="With --prototypes: captions averaged per image [10].")
@click.option(
    "--prototype-weight", type=float, default=None, help="With --prototypes: the share of the image's own code [0.7]."
)
@click.option(
    "--prototype-preselect",
    type=int,
    default=None,
    help="With --prototypes: Hamming-nearest captions the matcher scores per image [300].",
)
@codes_option
@uri_option
@click.option(
    "--milvus-index",
    type=click.Choice(["BIN_FLAT", "BIN_IVF_FLAT"]),
    default="BIN_FLAT",
    show_default=True,
    help="With --codes milvus: the index type of the server's collections.",
)
@handle_errors
def build(
    split,
    store,
    model_dir,
    hash_dir,
    out,
    index_type,
    nlist,
    nprobe,
    device,
    shards,
    prototype_split,
    prototype_k,
    prototype_weight,
    prototype_preselect,
    codes,
    uri,
    milvus_index,
) -> None:
    """Encode a split, hash it and write FAISS binary indexes plus re-ranking features."""
    from heiindex import default_data as dd
    from heiindex.builds import build_index

    from .render import items_counted

    if (shards is not None or codes != "milvus") and _given("milvus_index"):  # it would be ignored
        raise click.UsageError("--milvus-index sets the Milvus index of --codes milvus (an unsharded build)")
    prototypes = None
    tuning = {"k": prototype_k, "weight": prototype_weight, "preselect": prototype_preselect}
    if prototype_split is None and (given := _given("prototype_k", "prototype_weight", "prototype_preselect")):
        raise click.UsageError(f"{given[0].opts[0]} tunes the codes of --prototypes SPLIT; give --prototypes too")
    if prototype_split is not None:
        from heiindex.prototypes import PrototypeConfig

        prototypes = PrototypeConfig(split=prototype_split, **{f: v for f, v in tuning.items() if v is not None})
    out, m = build_index(
        split,
        store,
        model_dir,
        hash_dir,
        out,
        shards,
        codes=codes or "faiss",
        uri=uri,
        milvus_index=milvus_index if codes == "milvus" else None,  # its default otherwise: refused as unused
        prototypes=prototypes,
        index_type=index_type,
        nlist=nlist,
        nprobe=nprobe,
        device=device,
        progress=True,
        log=lambda message: click.echo(message, err=True),
    )
    if shards is not None:
        sizes = ", ".join(f"{e['n_images']:,}" for e in m["shards"])
        what = f"{items_counted(m['n_images'], m['n_captions'])} in {counted(len(m['shards']), 'shard')} ({sizes} image"
        what += ")" if all(e["n_images"] == 1 for e in m["shards"]) else "s)"
    else:
        what = f"{items_counted(m['n_images'], m['n_captions'])}, {m['hash']['bits']}-bit codes, "
        what += _index_kinds(m["index"])
    what += _prototype_label(m)
    if m.get("codes", {}).get("store") == "milvus":  # the FAISS files are written too
        what += f", codes also in Milvus at {m['codes']['uri']} (queries search there)"
    note = ""
    if store is None and out.resolve() != dd.default_index_dir(split).resolve():  # named by --out: say what changed
        note = " (query and bench without --index now use it)"
    click.echo(f"built {split}: {what} -> {out}{note}")


def _index_kinds(spec: dict) -> str:
    """'flat index', or for auto what it chose ("auto: flat index", per modality where they differ)."""
    from heiindex.index_manifest import searched_type

    return f"{spec['type']} index" if spec["type"] != "auto" else f"auto: {searched_type(spec)} index"


def _index_path(index_dir: Path | None) -> Path:
    """``--index``, or the index the last ``build`` wrote."""
    from heiindex import default_data as dd

    return index_dir or dd.last_built_index()


def _check_engine_options(engine: str, *local: str) -> None:
    """Options that would be silently unused: ``--address`` and ``--threads`` without
    ``--engine ray``, and with it the in-process ones named in ``local`` (parameter names)."""
    given = _given("address", "threads") if engine != "ray" else []
    if given:
        raise click.UsageError(f"{given[0].opts[0]} is for --engine ray (the shards' Ray actors)")
    given = _given(*local) if engine == "ray" else []
    if given:
        flags = ", ".join(p.opts[0] for p in given)
        raise click.UsageError(
            f"{flags}: not used with --engine ray (each actor opens its shard as built: on the CPU, in float32, "
            "searching its FAISS files as the build set them up)"
        )


def _ray_index(
    index_dir: Path | None,
    address: str | None,
    threads: int,
    detached: bool = False,
    model_dir: Path | None = None,
    hash_dir: Path | None = None,
):
    from heiindex.ray_engine import RayShardedIndex

    return RayShardedIndex(
        _index_path(index_dir),
        address=address,
        threads=threads,
        detached=detached,
        model_dir=model_dir,
        hash_dir=hash_dir,
    )


def _open_index(
    index_dir: Path | None,
    model_dir: Path | None,
    hash_dir: Path | None,
    device="cpu",
    dtype="float32",
    codes=None,
    uri=None,
    nprobe=None,
    ef_search=None,
):
    from heiindex.index_manifest import sharded_manifest

    path = _index_path(index_dir)
    sharded_manifest(path)  # a missing index is told before torch and FAISS are imported
    from heiindex.builds import open_index

    return open_index(path, model_dir, hash_dir, device, dtype, codes, uri, nprobe, ef_search)


@cli.command()
@click.argument("text", required=False)
@click.option(
    "--image",
    "image_ids",
    type=int,
    multiple=True,
    help="Image id: find captions for it instead (repeat for several: searched in batches, printed as --file).",
)
@click.option(
    "--file",
    "queries_file",
    type=click.File("rb"),
    default=None,
    help="Text queries, one per line ('-': standard input), searched in batches; with --json, one JSON object a line.",
)
@index_dir_option
@model_option("Matcher (must be the index's).")
@hash_option("Hash module (must be the index's).")
@click.option(
    "--candidates",
    type=int,
    default=None,
    help="N: Hamming candidates to re-rank.  [default: 100 (or --k where larger), or every item where fewer]",
)
@click.option(
    "--k", type=int, default=None, help="Results to show.  [default: 10, or what the candidates hold where fewer]"
)
@device_option
@dtype_option
@engine_option
@address_option
@threads_option
@codes_option
@uri_option
@search_nprobe_option
@ef_search_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON: one indented object for one query; one object a line (JSON Lines) for --file or several --image.",
)
@handle_errors
def query(
    text,
    image_ids,
    queries_file,
    index_dir,
    model_dir,
    hash_dir,
    candidates,
    k,
    device,
    dtype,
    engine,
    address,
    threads,
    codes,
    uri,
    nprobe,
    ef_search,
    as_json,
) -> None:
    """Text-to-image search for TEXT, image-to-text search with --image ID (repeatable), or
    text-to-image search for every line of --file."""
    from .render import found_depth, print_json_result, print_result, warn_found

    if sum((text is not None, bool(image_ids), queries_file is not None)) != 1:
        raise click.UsageError("give a TEXT query, --image ID or --file FILE (one of them)")
    where = None  # names a refused query: by its file's line where they come from --file
    if queries_file is not None:
        name = getattr(queries_file, "name", None)
        name = "standard input" if not isinstance(name, str) or name == "<stdin>" else name
        from heiindex.search import query_file_lines

        lines = query_file_lines(queries_file.read(), name)
        where = lambda i: f"{name} line {i + 1}"  # noqa: E731
    _check_engine_options(engine, "device", "dtype", "codes", "uri", "nprobe", "ef_search")
    require_breadth(nprobe, ef_search)  # before the index is looked for, as Index.open checks them
    if engine == "ray":
        if not image_ids:
            from heiindex.ray_engine import check_texts

            check_texts(_index_path(index_dir), lines if queries_file is not None else [text], where, model_dir)
        index = _ray_index(index_dir, address, threads, model_dir=model_dir, hash_dir=hash_dir)
    else:
        index = _open_index(index_dir, model_dir, hash_dir, device, dtype, codes, uri, nprobe, ef_search)
    image_query = bool(image_ids)
    candidates, k = index.query_counts(candidates, k, image_query=image_query)
    from heiindex.search import per_shard_depth, pooled_candidates

    # a sharded build: each shard's top N (capped at its size), all re-ranked
    sizes = index.shard_sizes(image_query)
    depth, expected = f"Hamming top-{candidates}", pooled_candidates(candidates, sizes)
    if index.sharded:
        depth += per_shard_depth(candidates, sizes, "captions" if image_query else "images")
    if queries_file is not None:
        results = index.search_many(lines, k, candidates, where=where)
        _print_many(results, len(lines), depth, expected, k, as_json, False)
        return
    if len(image_ids) > 1:
        results = index.search_images(list(image_ids), k, candidates)
        _print_many(results, len(image_ids), depth, expected, k, as_json, True)
        return
    res = index.search_image(image_ids[0], k, candidates) if image_ids else index.search(text, k, candidates)
    if as_json:
        print_json_result(res, k)
        if len(res.results) >= k:  # else print_json_result's warning has said the search came back short
            warn_found(depth, [res.candidates], expected)
        return
    print_result(res, image_query, k)
    click.echo(
        f"{res.seconds * 1000:.1f} ms ({found_depth(depth, [res.candidates], expected)}, re-ranked by the matcher)"
    )


def _print_many(results, n: int, depth: str, expected: int, k: int, as_json: bool, image_query: bool) -> None:
    """Results of several queries (all checked before the first came), each printed as its batch
    ends: a table each, or one JSON object a line. ``depth``: how the search depth reads;
    ``expected``: the candidates each query should find (``render.found_depth``)."""
    from heiindex.progress import progress_bar

    from .render import found_depth, print_json_result, print_result, warn_found

    t0, searched, found = time.perf_counter(), 0.0, []
    for res in progress_bar(n, "search", True, unit="query", iterable=results):
        searched += res.seconds  # the search alone, not the printing
        found.append(res.candidates)
        if as_json:
            print_json_result(res, k, line=True)
        else:
            print_result(res, image_query, k)
    if as_json:
        warn_found(depth, found, expected)
    else:
        click.echo(
            f"{n} quer{'y' if n == 1 else 'ies'} in {time.perf_counter() - t0:.2f} s with printing; the search {searched * 1000 / n:.1f} ms "
            f"a query ({found_depth(depth, found, expected)}, re-ranked by the matcher, in batches)"
        )


@cli.command()
@click.option(
    "--topk",
    type=int,
    default=None,
    help="N: Hamming candidates re-ranked.  [default: 100, or the largest the index allows where smaller]",
)
@index_dir_option
@click.option(
    "--sweep", default=None, help="Comma-separated N values for a recall-versus-N table, e.g. 10,20,50,100,200."
)
@click.option(
    "--plot",
    type=PATH,
    default=None,
    help="PNG for the sweep (default: bench_sweep.png in the index folder, replaced by a later build there).",
)
@protocol_option
@click.option(
    "--repeats",
    type=int,
    default=1,
    show_default=True,
    help="Time HEI and exhaustive scoring R times, alternately, and report the medians (a noisy machine).",
)
@click.option(
    "--warmup/--no-warmup",
    default=True,
    show_default=True,
    help="Run a small untimed pass of each stage first, so that no timed pass pays the process's "
    "one-off costs (on a GPU, loading kernels).",
)
@model_option("Matcher (must be the index's; for an index whose recorded folder has moved).")
@hash_option("Hash module (must be the index's).")
@device_option
@dtype_option
@engine_option
@address_option
@threads_option
@codes_option
@uri_option
@search_nprobe_option
@ef_search_option
@json_option
@handle_errors
def bench(
    topk,
    index_dir,
    sweep,
    plot,
    protocol,
    repeats,
    warmup,
    model_dir,
    hash_dir,
    device,
    dtype,
    engine,
    address,
    threads,
    codes,
    uri,
    nprobe,
    ef_search,
    as_json,
) -> None:
    """Exhaustive attention vs HEI vs Hamming alone, both directions, with timings.

    On a sharded build: HEI and Hamming alone over the merged shards (in this process, or with
    --engine ray one batch per shard actor, all shards at once); no exhaustive pass."""
    from heiindex.bench_settings import check_bench_settings, refuse_for_sharded
    from heiindex.index_manifest import sharded_manifest

    from .render import bench_tables, console, echo_json

    sweep_list = _sweep_values(sweep) if sweep is not None else None  # --sweep '' is refused, not ignored
    check_bench_settings(sweep_list, plot, repeats, protocol)  # before the index is read and the bench runs
    _check_engine_options(engine, "device", "dtype", "codes", "uri", "nprobe", "ef_search")
    require_breadth(nprobe, ef_search)  # before the index is looked for, as Index.open checks them
    sharded = engine == "ray" or sharded_manifest(_index_path(index_dir)) is not None
    if sharded:
        refuse_for_sharded(sweep_list, repeats, protocol)  # before shards are read
    if sweep_list:  # it draws the default plot, whose path needs the index: matplotlib now
        from heiindex.plot import require_matplotlib

        require_matplotlib()
    if engine == "ray":
        index = _ray_index(index_dir, address, threads, model_dir=model_dir, hash_dir=hash_dir)
    else:
        index = _open_index(index_dir, model_dir, hash_dir, device, dtype, codes, uri, nprobe, ef_search)
    from heiindex.bench import run_bench
    from heiindex.index import Index

    if not isinstance(index, Index):  # a sharded build, in process or on Ray
        from heiindex.bench import run_sharded_bench

        res = run_sharded_bench(index, topk, warmup=warmup)
        if as_json:
            echo_json(res)
            return
        _say_warmup(res)
        label = f"{res['split']} ({counted(res['shards'], 'shard')}, {res['engine']})" + _prototype_label(res)
        for t in bench_tables(label, res):
            console.print(t)
        return
    from heiindex.plot import SWEEP_PLOT, check_plot_path

    default_plot = index.path / SWEEP_PLOT
    if sweep_list and plot is None:  # before the bench runs, as an explicit --plot is
        check_plot_path(default_plot, "the default sweep plot (give --plot PATH for another)")
    res = run_bench(
        index,
        topk,
        sweep_list,
        protocol,
        repeats=repeats,
        warmup=warmup,
        plot=(plot or default_plot) if sweep_list else None,
    )
    if as_json:
        echo_json(res)
        return
    _say_warmup(res)
    for name in ("full", "5k", "1k"):
        if name in res:
            label = _protocol_label(name, res[name], res["split"])
            for t in bench_tables(label + _prototype_label(res), res[name]):
                console.print(t)
    if "plot" in res:
        click.echo(f"sweep plot: {res['plot']}")


def _say_warmup(res: dict) -> None:
    """The bench's line on its warm-up, before the tables (where it ran)."""
    if res["warmup_seconds"] is not None:
        click.echo(f"before timing: an untimed warm-up pass of each stage, {res['warmup_seconds']:.2f} s")


def _prototype_label(res: dict) -> str:
    """The bench tables' note of an index whose images have prototype codes (else empty)."""
    return f", image codes with {res['prototypes']['split']} prototypes" if res.get("prototypes") else ""


def _sweep_values(text: str) -> list[int]:
    """``--sweep 10,20,50`` -> [10, 20, 50]; anything but whole numbers is refused by name."""
    values = []
    for part in text.split(","):
        try:
            values.append(int(part))
        except ValueError:
            raise HeiindexError(
                f"--sweep {text!r}: {part.strip()!r} is not a whole number (expected N values such as 10,20,50,100)"
            ) from None
    return values


@cli.command()
@index_dir_option
@click.option(
    "--engine", type=click.Choice(["ray"]), default="ray", show_default=True, help="What serves the shards (Ray only)."
)
@click.option("--address", default="auto", show_default=True, help="The running Ray cluster (ray start --head).")
@threads_option
@click.option("--stop", is_flag=True, help="Stop the actors serving this index instead.")
@model_option("Matcher folder for the actors, where the build's has moved (the same path on every node).")
@hash_option("Hash module folder for the actors, where the build's has moved (the same path on every node).")
@handle_errors
def serve(index_dir, engine, address, threads, stop, model_dir, hash_dir) -> None:
    """Serve a sharded build on a Ray cluster: one detached actor per shard, found by name by
    later `heiindex query --engine ray --address ...` calls."""
    if stop:
        from heiindex.ray_engine import stop_served

        if given := _given("model_dir", "hash_dir", "threads"):
            raise click.UsageError(f"{given[0].opts[0]}: not used with --stop")
        n = stop_served(_index_path(index_dir), address)
        click.echo(f"stopped {counted(n, 'shard actor')}")
        return
    index = _ray_index(index_dir, address, threads, detached=True, model_dir=model_dir, hash_dir=hash_dir)
    for i, info in enumerate(index.infos):
        click.echo(f"shard {i}: actor {index.actor_name(i)} (pid {info['pid']}, {counted(info['n_images'], 'image')})")
    click.echo(
        f"serving {index.path} on Ray at {address}; stop with: heiindex serve --stop --index {index.path} "
        f"--address {address}"
    )


def _protocol_label(name: str, res: dict, split: str) -> str:
    """How bench and evaluate title a protocol's figures: the whole split, COCO 5K, or COCO 1K
    with its number of folds (the figures are their mean)."""
    if name == "full":
        return f"{split} (all images)"
    if name == "5k":
        return "COCO 5K"
    folds = res["folds"]
    return f"COCO 1K (mean of {folds} folds)" if folds > 1 else "COCO 1K (one fold)"


@cli.command()
@click.argument("path", type=PATH)
@json_option
@handle_errors
def verify(path, as_json) -> None:
    """Check a store (root or split) or an index (sharded or not) against the file sizes and
    SHA-256s its manifests record, or a model or hash module folder (or a `train` run's best/ and
    last/) against the checksums its config.json records; exit status 2 where a file changed or is
    missing, or a manifest or config is one the commands reading it would refuse ("invalid")."""
    from heiindex.verify import failures
    from heiindex.verify import verify as run_verify

    from .render import console, echo_json, verify_table

    checks = run_verify(path)
    if as_json:
        echo_json({"path": str(path), "files": [c.to_dict() for c in checks]})
    else:
        console.print(verify_table(path, checks))
    if problem := failures(checks):  # handle_errors prints it and exits with status 2
        raise HeiindexError(problem)


if __name__ == "__main__":
    cli()
