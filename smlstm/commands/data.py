"""CLI commands of this area. Keep logic in the library; here only argument parsing."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from features.dataset import SPLITS, load_karpathy
from features.errors import InputError
from features.shapes import make_shapes


def _fail(err: InputError) -> typer.Exit:
    """User mistakes print one line on stderr and exit 2, without a traceback."""
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(2)


def make_shapes_command(
    out: Path = typer.Option(..., "--out", help="Output directory (images/ and dataset.json)."),
    images: int = typer.Option(..., "--images", help="Number of images (>= 3)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same bytes."),
    size: int = typer.Option(128, "--size", help="Image side in pixels (>= 32)."),
    workers: int | None = typer.Option(
        None, "--workers", help="Processes (default: 1 for small sets, one per core for large)."
    ),
) -> None:
    """Generate the synthetic shapes benchmark (JPEGs + Karpathy-format dataset.json)."""
    start = time.perf_counter()
    try:
        json_path = make_shapes(out, images=images, seed=seed, size=size, workers=workers)
    except InputError as err:
        raise _fail(err) from None
    seconds = time.perf_counter() - start
    typer.echo(f"{images} images in {seconds:.2f} s ({images / seconds:.0f} images/s)")
    typer.echo(str(json_path))


def check_dataset_command(
    json_path: Path = typer.Argument(..., help="A Karpathy-split JSON file."),
    keep_restval: bool = typer.Option(
        False, "--keep-restval", help="Report restval separately instead of as train."
    ),
) -> None:
    """Load and validate a Karpathy-split JSON; print images and captions per split."""
    try:
        dataset = load_karpathy(json_path, restval_as_train=not keep_restval)
    except InputError as err:
        raise _fail(err) from None
    typer.echo(f"{dataset.path}: dataset {dataset.name!r}, {len(dataset.images)} images")
    counts = dataset.split_counts()
    for split in (s for s in SPLITS if s in counts):
        n_images, n_captions = counts[split]
        typer.echo(f"  {split:8s} {n_images:8d} images {n_captions:9d} captions")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `smlstm` app."""
    app.command("make-shapes")(make_shapes_command)
    app.command("check-dataset")(check_dataset_command)
