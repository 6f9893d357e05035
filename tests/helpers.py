"""Helpers shared by the test modules (pytest puts tests/ on sys.path: `from helpers import ...`)."""

from __future__ import annotations

from pathlib import Path

from features.config import ExtractConfig


def tiny_extract_config(data: Path, out: Path, **overrides) -> ExtractConfig:
    """A fast stage-1 config over a make_shapes folder: random VGG-19 at 64 px (a 2x2 grid),
    shards and batches of 4 images, decoding in the process itself, on the CPU."""
    fields = dict(
        dataset=str(data / "dataset.json"),
        images=str(data),
        out=str(out),
        weights="random",
        seed=0,
        image_size=64,
        shard_size=4,
        batch_size=4,
        workers=0,
        device="cpu",
    )
    return ExtractConfig(**{**fields, **overrides})
