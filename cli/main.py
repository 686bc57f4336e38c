"""``heiindex``: click commands that turn flags into library calls and results into text.

Nothing here computes anything the library cannot do from Python.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from heiindex.errors import HeiindexError


def handle_errors(func):
    """Turn a ``HeiindexError`` into a one-line message and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except HeiindexError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group()
@click.version_option(package_name="heiindex")
def cli() -> None:
    """Fast cross-attention image-text retrieval (HEI hash codes + SCAN re-ranking)."""


@cli.command()
@click.option("--precomp", "precomp", required=True, type=click.Path(path_type=Path), help="SCAN precomp folder.")
@click.option("--split", required=True, type=click.Choice(["train", "dev", "test", "testall"]))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Store root to write into.")
@click.option("--vocab", type=click.Path(path_type=Path), default=None, help="SCAN vocab JSON (default: the root's, else built from the captions).")
@click.option("--regions", type=int, default=36, show_default=True, help="Expected regions per image.")
@click.option("--feature-dim", type=int, default=2048, show_default=True, help="Expected feature size.")
@handle_errors
def ingest(precomp: Path, split: str, out: Path, vocab: Path | None, regions: int, feature_dim: int) -> None:
    """Convert a SCAN precomp split into heiindex's Parquet stores."""
    from heiindex.ingest import ingest as run_ingest

    summary = run_ingest(precomp, split, out, vocab=vocab, regions=regions, feature_dim=feature_dim, progress=True)
    click.echo(summary.line())


if __name__ == "__main__":
    cli()
