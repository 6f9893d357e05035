"""`ExtractConfig`: the stage-1 (feature extraction) config, validated at the door.

Two kinds of fields:
- cache fields define what is in the cache (`cache_fields()`, plus the dataset's content hash
  and the weights identity, which `features.extract` computes): a cache made with other values
  is refused (`CacheMismatch`) unless `overwrite`;
- run-time fields (`RUNTIME_FIELDS`) only say how to compute it and may change between a run
  and its resume (more workers, another device, a bigger batch).
Locations (`dataset`, `images`, `out`, `weights_file`) are neither: the cache records the
dataset's content hash and the weights' sha256, so moving files around does not invalidate it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from features.errors import ConfigError

__all__ = [
    "CACHE_FIELDS",
    "RUNTIME_FIELDS",
    "ExtractConfig",
    "StageConfig",
    "check_writable",
    "format_validation_error",
    "read_config_json",
]

# Config fields that change the cache's contents (with the dataset hash and weights identity).
CACHE_FIELDS = ("image_size", "layer", "global_mode", "shard_size")
# Config fields that may differ between a run and its resume.
RUNTIME_FIELDS = ("workers", "batch_size", "device", "overwrite")


class StageConfig(BaseModel):
    """Base of every stage's config: unknown fields refused, one-line errors, JSON-ready dump."""

    model_config = ConfigDict(extra="forbid")
    source_name: ClassVar[str] = "config"  # what errors are prefixed with when no source is given

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> Self:
        """Validate a dict; a problem raises ConfigError "<source>: <field>: <what is wrong>"."""
        source = source or cls.source_name
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, source)) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (what is saved beside the stage's outputs)."""
        return self.model_dump(mode="json")


class ExtractConfig(StageConfig):
    """Everything stage 1 needs; saved in the cache as `extract_config.json` and in its attrs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source_name: ClassVar[str] = "extract config"

    dataset: str = Field(description="Karpathy-split JSON file")
    images: str = Field(description="image root directory; relpaths of the JSON are joined to it")
    out: str = Field(description="cache directory (a local path or an fsspec URL, e.g. s3://b/x)")
    weights: Literal["imagenet", "random"] = "imagenet"
    weights_file: str | None = Field(default=None, description="a VGG-19 state dict (.pth)")
    seed: int = Field(default=0, description="seed of the random weights")
    image_size: int = Field(default=448, ge=32, le=1024, description="square input side, pixels")
    layer: Literal["pool5", "conv5_4"] = "pool5"
    global_mode: Literal["same_pass", "separate_224", "off"] = "same_pass"
    shard_size: int = Field(default=256, ge=1, le=4096, description="images per Zarr shard")
    batch_size: int = Field(default=16, ge=1, le=4096)
    workers: int = Field(default=2, ge=0, le=64, description="DataLoader decoding processes")
    max_pixels: int = Field(
        default=50_000_000, ge=1, description="refuse larger images (decompression bombs)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    overwrite: bool = False

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        # VGG halves the resolution five times: other sizes would drop border pixels.
        if value % 32:
            raise ValueError(f"must be a multiple of 32, got {value}")
        return value

    @field_validator("dataset", "images", "out")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty path")
        return value

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | Path) -> ExtractConfig:
        """Read a config saved as JSON (e.g. a cache's extract_config.json)."""
        return cls.from_dict(read_config_json(path), source=str(path))

    def cache_fields(self) -> dict[str, Any]:
        """The config fields that define the cache's contents (see CACHE_FIELDS)."""
        return {name: getattr(self, name) for name in CACHE_FIELDS}

    def runtime_fields(self) -> dict[str, Any]:
        """The fields that may differ between a run and its resume."""
        return {name: getattr(self, name) for name in RUNTIME_FIELDS}


def format_validation_error(err: ValidationError, source: str) -> str:
    """The first problem of a pydantic ValidationError as one line: "<source>: <field>: <msg>"."""
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "config"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "missing required field"
    elif "input" in first and first["type"] not in ("value_error",):
        message = f"{message}, got {first['input']!r}"
    message = message.removeprefix("Value error, ")
    extra = f" (and {len(err.errors()) - 1} more problems)" if len(err.errors()) > 1 else ""
    return f"{source}: {field}: {message}{extra}"


def read_config_json(path: str | Path) -> dict[str, Any]:
    """A stage config saved as a JSON object; ConfigError (one line) when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read config: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def check_writable(out: str | Path) -> None:
    """Refuse an output directory that cannot be created or written (read-only mount, a file
    in the way, no permission) before any work: ConfigError naming `out` and the culprit."""
    probe = Path(out).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"out: {out}: cannot create it, {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"out: {out}: {probe} is not writable")
