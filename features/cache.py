"""`FeatureCache`: the reader of a finished feature cache (the stage 1 -> stage 2 contract).

The layout is described in docs/ARCHITECTURE.md ("Cache layout") and written by
`features.extract`. Opening checks that the cache is complete; the Zarr arrays themselves are
opened lazily, once per process, so a FeatureCache can be handed to DataLoader workers (it
pickles without its array handles and each worker opens its own).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pandas as pd
import zarr

from features.errors import CacheError, CacheMismatch

__all__ = ["SCHEMA_VERSION", "FeatureCache", "identity_hash", "join"]

SCHEMA_VERSION = 1
STORE_NAME = "features.zarr"
TABLES = ("manifest", "captions", "failures")


def join(root: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and fsspec URLs alike."""
    return "/".join([root.rstrip("/"), *parts])


def identity_hash(fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the cache-identity fields."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class FeatureCache:
    """A complete feature cache: per-image instance maps + global vectors, manifest, captions."""

    def __init__(self, path: str, attrs: dict[str, Any], tables: dict[str, pd.DataFrame]):
        self.path = path
        self.attrs = attrs
        self.num_images: int = int(attrs["num_images"])
        self.grid: tuple[int, int] = tuple(attrs["grid"])  # type: ignore[assignment]
        self.num_instances: int = self.grid[0] * self.grid[1]
        self.instance_dim: int = int(attrs["instance_dim"])
        self.global_dim: int = int(attrs["global_dim"])
        self.shard_size: int = int(attrs["shard_size"])
        self.num_shards: int = int(attrs["num_shards"])
        self.config: dict[str, Any] = attrs["config"]
        self.weights: dict[str, Any] = attrs["weights"]
        self.identity: dict[str, Any] = {
            "weights": {k: self.weights.get(k) for k in ("name", "seed", "sha256")},
            "config_hash": attrs["identity_hash"],
            "cache_fields": attrs["identity"],
            "dataset": attrs["identity"].get("dataset"),
            "schema_version": attrs["schema_version"],
        }
        self.manifest: pd.DataFrame = tables["manifest"]
        self.captions: pd.DataFrame = tables["captions"]
        self.failures: pd.DataFrame = tables["failures"]
        self._instances: zarr.Array | None = None
        self._global: zarr.Array | None = None

    # ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Any) -> FeatureCache:
        """Open a finished cache; CacheError (one line) if it is missing, incomplete or unreadable."""
        path = str(path)
        store = join(path, STORE_NAME)
        try:
            group = zarr.open_group(store, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, OSError):
            raise CacheError(f"{path}: no feature cache here (no {STORE_NAME} store)") from None
        attrs = dict(group.attrs)
        if attrs.get("schema_version") != SCHEMA_VERSION or "identity_hash" not in attrs:
            raise CacheError(
                f"{path}: not a finished smlstm cache (schema_version "
                f"{attrs.get('schema_version')!r}, expected {SCHEMA_VERSION})"
            )
        try:
            done = np.asarray(group["shard_done"][:])
        except KeyError:
            raise CacheError(f"{path}: store has no shard_done array; rerun extraction") from None
        if not done.all():
            raise CacheError(
                f"{path}: cache incomplete: {int(done.sum())} of {done.size} shards done; "
                "rerun extraction to resume"
            )
        tables = {}
        for name in TABLES:
            table_path = join(path, f"{name}.parquet")
            try:
                tables[name] = pd.read_parquet(table_path)
            except (FileNotFoundError, OSError):
                raise CacheError(
                    f"{path}: {name}.parquet missing: extraction was not finalized; "
                    "rerun extraction to finish it"
                ) from None
        return cls(path, attrs, tables)

    # ------------------------------------------------------------------------------------------
    # lazy arrays: opened on first use in each process (DataLoader workers included)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_instances"] = None  # zarr handles are not shared across processes
        state["_global"] = None
        return state

    def instances_array(self) -> zarr.Array:
        """The (N, I, C) float16 instance array, opened lazily in this process."""
        if self._instances is None:
            self._instances = zarr.open_array(join(self.path, STORE_NAME, "instances"), mode="r")
        return self._instances

    def global_array(self) -> zarr.Array | None:
        """The (N, G) float16 global array, or None when extracted with global_mode "off"."""
        if self.global_dim == 0:
            return None
        if self._global is None:
            self._global = zarr.open_array(join(self.path, STORE_NAME, "global"), mode="r")
        return self._global

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop) as float16 arrays (n, I, C) and (n, G); failed rows are zeros.

        Contiguous, shard-aligned blocks read fastest (whole shards, sequential I/O).
        """
        if not 0 <= start <= stop <= self.num_images:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.num_images})")
        instances = np.asarray(self.instances_array()[start:stop])
        global_array = self.global_array()
        if global_array is None:
            global_ = np.zeros((stop - start, 0), dtype=np.float16)
        else:
            global_ = np.asarray(global_array[start:stop])
        return instances, global_

    def rows(self, split: str) -> np.ndarray:
        """Sorted rows of the good images of one split ("train", "val", "test")."""
        rows = self.manifest.loc[self.manifest["split"] == split, "row"].to_numpy(dtype=np.int64)
        return np.sort(rows)

    def check_weights(
        self, expected_sha256: str | None = None, expected_name: str | None = None
    ) -> None:
        """Raise CacheMismatch when the cache was made with other backbone weights."""
        if expected_sha256 is not None and expected_sha256 != self.weights.get("sha256"):
            raise CacheMismatch(
                f"{self.path}: cache weights sha256 {self.weights.get('sha256')} differ from "
                f"the expected {expected_sha256}"
            )
        if expected_name is not None and expected_name != self.weights.get("name"):
            raise CacheMismatch(
                f"{self.path}: cache weights {self.weights.get('name')!r} differ from "
                f"the expected {expected_name!r}"
            )

    def __repr__(self) -> str:
        return (
            f"FeatureCache({self.path!r}, images={self.num_images}, good={len(self.manifest)}, "
            f"grid={self.grid}, weights={self.weights.get('name')})"
        )
