"""CLI commands of stage 1: `smlstm extract` and `smlstm cache-info`. No Prefect here.

Choices (layer, weights, ...) are plain strings checked by ExtractConfig, so a bad value gives
the same one-line `error: ...` (exit 2) as every other input problem, and nothing is written.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from features.config import ExtractConfig
from features.errors import InputError

_DEFAULTS = {name: info.default for name, info in ExtractConfig.model_fields.items()}


def _fail(err: InputError) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(2)


def extract(
    dataset: str = typer.Option(..., help="Karpathy-split JSON file."),
    images: str = typer.Option(..., help="Image root directory (the JSON's paths are under it)."),
    out: str = typer.Option(..., help="Cache directory (local path or fsspec URL)."),
    weights: str = typer.Option(_DEFAULTS["weights"], help="imagenet | random."),
    weights_file: str | None = typer.Option(None, help="VGG-19 state dict (.pth) to load."),
    seed: int = typer.Option(_DEFAULTS["seed"], help="Seed of the random weights."),
    image_size: int = typer.Option(_DEFAULTS["image_size"], help="Input side in pixels (x32)."),
    layer: str = typer.Option(_DEFAULTS["layer"], help="pool5 | conv5_4."),
    global_mode: str = typer.Option(
        _DEFAULTS["global_mode"], help="same_pass | separate_224 | off."
    ),
    shard_size: int = typer.Option(_DEFAULTS["shard_size"], help="Images per Zarr shard."),
    batch_size: int = typer.Option(_DEFAULTS["batch_size"], help="Images per forward pass."),
    workers: int = typer.Option(_DEFAULTS["workers"], help="Image-decoding processes."),
    max_pixels: int = typer.Option(_DEFAULTS["max_pixels"], help="Refuse larger images."),
    device: str = typer.Option(_DEFAULTS["device"], help="auto | cpu | cuda."),
    overwrite: bool = typer.Option(False, help="Replace a cache made with other settings."),
) -> None:
    """Extract frozen VGG-19 features into a resumable Zarr cache (rerun to resume)."""
    fields: dict[str, Any] = dict(locals())  # exactly the parameters: the config's fields
    from features.extract import run_extraction  # torch loads only when the command runs

    try:
        config = ExtractConfig.from_dict(fields, source="smlstm extract")
        summary = run_extraction(config, progress=lambda line: typer.echo(line))
    except InputError as err:
        raise _fail(err) from None
    typer.echo(summary.cache)


def cache_info(
    path: str = typer.Argument(..., help="Cache directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Print a finished cache's attributes, image/caption counts per split and failures."""
    from features.cache import FeatureCache

    try:
        cache = FeatureCache.open(path)
    except InputError as err:
        raise _fail(err) from None
    splits = sorted(set(cache.manifest["split"]))
    counts = {
        split: {
            "images": int((cache.manifest["split"] == split).sum()),
            "captions": int((cache.captions["split"] == split).sum()),
        }
        for split in splits
    }
    failures = cache.failures["kind"].value_counts().to_dict()
    info = {
        "path": cache.path,
        "num_images": cache.num_images,
        "good_images": len(cache.manifest),
        "failed_images": len(cache.failures),
        "grid": list(cache.grid),
        "instances": [cache.num_images, cache.num_instances, cache.instance_dim],
        "global_dim": cache.global_dim,
        "shard_size": cache.shard_size,
        "num_shards": cache.num_shards,
        "weights": cache.weights,
        "config_hash": cache.identity["config_hash"],
        "dataset": cache.identity["dataset"],
        "splits": counts,
        "failures_by_kind": {str(k): int(v) for k, v in failures.items()},
        "config": cache.config,
        "versions": cache.attrs.get("versions", {}),
    }
    if as_json:
        json.dump(info, sys.stdout, indent=2, default=str)
        typer.echo()
        return
    for key in ("path", "num_images", "good_images", "failed_images", "grid", "instances"):
        typer.echo(f"{key:14s} {info[key]}")
    typer.echo(f"{'global_dim':14s} {info['global_dim']}")
    typer.echo(f"{'shards':14s} {cache.num_shards} x {cache.shard_size} images")
    w = cache.weights
    typer.echo(f"{'weights':14s} {w.get('name')} seed={w.get('seed')} sha256={w.get('sha256')}")
    typer.echo(f"{'config_hash':14s} {info['config_hash']}")
    for split, count in counts.items():
        typer.echo(f"split {split:8s} {count['images']} images, {count['captions']} captions")
    for key in ("image_size", "layer", "global_mode"):
        typer.echo(f"{key:14s} {cache.config.get(key)}")
    typer.echo(f"{'versions':14s} {info['versions']}")
    if len(cache.failures):
        typer.echo(f"failures by kind: {info['failures_by_kind']}")
        for record in cache.failures.head(20).itertuples():
            typer.echo(f"  row {record.row} {record.kind}: {record.message}")
        if len(cache.failures) > 20:
            typer.echo(f"  ... and {len(cache.failures) - 20} more (failures.parquet)")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `smlstm` app."""
    app.command("extract")(extract)
    app.command("cache-info")(cache_info)
