"""Stage 1: frozen VGG-19 features of every image into a sharded, resumable Zarr v3 cache.

The work is cut into shards of `shard_size` consecutive rows (row r = image r of the JSON).
A shard is the unit of everything: one process decodes its images, runs the backbone, writes
its region of `instances` / `global` in one write each (exactly one writer per Zarr shard, the
only safe way to write shards concurrently), writes `shards/<k>.parquet` with each row's status,
and only then sets `shard_done[k] = 1`. A run killed at any point therefore loses at most the
shards in flight; the next run with the same cache identity extracts only the missing ones.

    plan = plan_extraction(config)          # validate, create or reopen the store
    for k in plan.todo:
        extract_shard(plan, k)              # or extract_shard(config.to_dict(), k) on a Dask worker
    finalize_extraction(plan)               # manifest, captions, failures, extract_config.json

`run_extraction(config)` does the three steps in one process. The layout is documented in
docs/ARCHITECTURE.md ("Cache layout"); `features.cache.FeatureCache` reads it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import io
import json
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr
from torch.utils.data import DataLoader

from features.backbone import FeatureExtractor, file_sha256, grid_size, load_vgg19, pick_device
from features.cache import SCHEMA_VERSION, STORE_NAME, identity_hash, join
from features.config import ExtractConfig, check_writable
from features.dataset import KarpathyDataset, load_karpathy
from features.errors import CacheError, CacheMismatch, ConfigError
from features.images import ImageFolderDataset, collate_images

__all__ = [
    "ExtractionPlan",
    "ExtractionSummary",
    "ShardResult",
    "extract_shard",
    "extraction_complete",
    "finalize_extraction",
    "plan_extraction",
    "run_extraction",
]

INSTANCE_DIM = 512  # VGG-19 conv5 channels
GLOBAL_DIM = 4096  # fc7

# What a cache may hold besides user files: removed (only these) by overwrite=True.
CACHE_ENTRIES = (
    STORE_NAME,
    "shards",
    "manifest.parquet",
    "captions.parquet",
    "failures.parquet",
    "extract_config.json",
)

SHARD_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("ok", pa.bool_()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("kind", pa.string()),
        ("message", pa.string()),
    ]
)
MANIFEST_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("filename", pa.string()),
        ("relpath", pa.string()),
        ("split", pa.string()),
        ("image_id", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
    ]
)
CAPTIONS_SCHEMA = pa.schema(
    [
        ("caption_id", pa.int64()),
        ("row", pa.int64()),
        ("image_id", pa.int64()),
        ("caption_index", pa.int64()),
        ("split", pa.string()),
        ("raw", pa.string()),
        ("tokens", pa.list_(pa.string())),
    ]
)
FAILURES_SCHEMA = pa.schema(
    [("row", pa.int64()), ("path", pa.string()), ("kind", pa.string()), ("message", pa.string())]
)

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class ExtractionPlan:
    """A validated config with its open store: what is to do. Lives in the coordinating process."""

    config: ExtractConfig
    dataset: KarpathyDataset
    weights: dict[str, Any]  # {"name", "seed", "sha256", "source"}
    identity: dict[str, Any]  # the cache identity (what must match on resume)
    num_images: int
    num_shards: int
    grid: tuple[int, int]
    global_dim: int
    todo: list[int] = field(default_factory=list)  # shards not done yet, ascending

    def shard_rows(self, shard: int) -> range:
        """The rows of one shard (the last shard may be short)."""
        size = self.config.shard_size
        return range(shard * size, min(self.num_images, (shard + 1) * size))

    @property
    def store(self) -> str:
        return join(self.config.out, STORE_NAME)

    @property
    def identity_hash(self) -> str:
        return identity_hash(self.identity)


@dataclass(frozen=True)
class ShardResult:
    """What one extract_shard call did; small, so it travels back from a Dask worker cheaply."""

    shard: int
    start: int
    stop: int
    images: int
    failures: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class ExtractionSummary:
    """What run_extraction did."""

    cache: str
    num_images: int
    num_good: int
    num_failures: int
    num_shards: int
    shards_extracted: list[int]
    seconds: float
    images_per_s: float  # over the shards extracted by this run


# ----------------------------------------------------------------------------------------------
# small helpers: file systems (local or fsspec URL), atomic writes, hashing


def _is_url(path: str) -> bool:
    return "://" in path


def _fs(path: str):
    """(filesystem, path inside it) for a local path or an fsspec URL."""
    import fsspec

    return fsspec.core.url_to_fs(path)


def _exists(path: str) -> bool:
    if not _is_url(path):
        return os.path.exists(path)
    fs, inner = _fs(path)
    return fs.exists(inner)


def _write_bytes_atomic(path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never a half-written one."""
    if _is_url(path):
        fs, inner = _fs(path)
        fs.pipe_file(inner, data)  # an object store PUT is atomic
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A full disk must not keep the half-written temp file (and the space it holds).
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# errnos that mean "the disk (or a quota, or RLIMIT_FSIZE) is full", not a bug: the user frees
# space and reruns, which resumes from the shards already done.
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


@contextlib.contextmanager
def _no_space_is_a_cache_error(out: str, what: str) -> Iterator[None]:
    """Turn running out of space while writing `what` into one CacheError line."""
    try:
        yield
    except OSError as err:
        if err.errno not in _NO_SPACE_ERRNOS:
            raise
        raise CacheError(
            f"{out}: no space left while writing {what}: {err.strerror or err}; "
            "free space and rerun to resume"
        ) from None


def _write_parquet_atomic(path: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    _write_bytes_atomic(path, buffer.getvalue())


def _read_parquet(path: str) -> pa.Table:
    if _is_url(path):
        fs, inner = _fs(path)
        return pq.read_table(inner, filesystem=fs)
    return pq.read_table(path)


def _remove_cache(out: str) -> None:
    """Delete what an earlier extraction wrote under `out` (and nothing else)."""
    for name in CACHE_ENTRIES:
        path = join(out, name)
        if _is_url(path):
            fs, inner = _fs(path)
            if fs.exists(inner):
                fs.rm(inner, recursive=True)
        elif os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _versions() -> dict[str, str]:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {name: version(name) for name in ("torch", "torchvision", "zarr", "numpy", "smlstm")}


# ----------------------------------------------------------------------------------------------
# per-process caches: a Dask worker runs many shard tasks and must load VGG and the JSON once

_LOAD_LOCK = threading.Lock()  # a multi-threaded Dask worker must not load VGG twice at once
_BACKBONES: dict[tuple, tuple[torch.nn.Module, dict[str, Any]]] = {}
_EXTRACTORS: dict[tuple, tuple[FeatureExtractor, dict[str, Any], torch.device]] = {}
_DATASETS: dict[tuple, tuple[KarpathyDataset, str]] = {}


def _load_dataset(path: str) -> tuple[KarpathyDataset, str]:
    """The parsed JSON and its sha256, cached per process while the file is unchanged."""
    info = os.stat(path)
    key = (os.path.abspath(path), info.st_mtime_ns, info.st_size)
    if key not in _DATASETS:
        # Extraction needs no particular split: a test-only set is a valid thing to extract.
        dataset = load_karpathy(path, required_splits=())
        _DATASETS.clear()  # keep one: a worker serves one dataset at a time
        _DATASETS[key] = (dataset, file_sha256(path))
    return _DATASETS[key]


def _load_extractor(config: ExtractConfig) -> tuple[FeatureExtractor, dict[str, Any], torch.device]:
    """The backbone for this config, loaded once per process (keyed by what defines it).

    The VGG itself is shared by the extractors of every layer / global mode (they hold its
    modules, no copy), so switching layers in one process does not load the weights again.
    """
    device = pick_device(config.device)
    weights_key: tuple = (config.weights, config.seed if config.weights == "random" else None)
    if config.weights == "imagenet":  # the file may be replaced between runs of one process
        path = config.weights_file
        info = os.stat(path) if path is not None and os.path.isfile(path) else None
        weights_key += (path, info and (info.st_mtime_ns, info.st_size))
    weights_key += (str(device),)
    with _LOAD_LOCK:
        return _extractor_for(weights_key, config, device)


def _extractor_for(
    weights_key: tuple, config: ExtractConfig, device: torch.device
) -> tuple[FeatureExtractor, dict[str, Any], torch.device]:
    if weights_key not in _BACKBONES:
        vgg, weights = load_vgg19(config.weights, config.weights_file, seed=weights_key[1])
        _BACKBONES.clear()  # one VGG per process: VGG-19 is 550 MB in fp32
        _EXTRACTORS.clear()
        _BACKBONES[weights_key] = (vgg.to(device), weights)
    key = (weights_key, config.layer, config.global_mode)
    if key not in _EXTRACTORS:
        vgg, weights = _BACKBONES[weights_key]
        extractor = FeatureExtractor(vgg, layer=config.layer, global_mode=config.global_mode)
        _EXTRACTORS[key] = (extractor, weights, device)
    return _EXTRACTORS[key]


# ----------------------------------------------------------------------------------------------
# planning


def _as_config(config: ExtractConfig | dict[str, Any]) -> ExtractConfig:
    if isinstance(config, ExtractConfig):
        return config
    return ExtractConfig.from_dict(config)


def _check_inputs(config: ExtractConfig) -> None:
    """Everything that can be checked about the inputs before anything is loaded or written."""
    if not os.path.isdir(config.images):
        what = "is not a directory" if os.path.exists(config.images) else "directory not found"
        raise ConfigError(f"images: {config.images}: {what}")
    if not os.path.isfile(config.dataset):
        raise ConfigError(f"dataset: {config.dataset}: file not found")
    if config.weights_file is not None and not os.path.isfile(config.weights_file):
        raise ConfigError(f"weights_file: {config.weights_file}: file not found")
    if config.weights == "random" and config.weights_file is not None:
        raise ConfigError("weights_file: given with weights 'random'; use weights 'imagenet'")


def _check_writable(out: str) -> None:
    """Local `out` must be creatable and writable before VGG is loaded; URLs are not checked."""
    if not _is_url(out):
        check_writable(out)


def _identity(
    config: ExtractConfig, dataset: KarpathyDataset, dataset_sha256: str, weights: dict
) -> dict[str, Any]:
    """The fields that define a cache's contents; a resume must match them all."""
    return {
        **config.cache_fields(),
        "dataset": {
            "name": dataset.name,
            "sha256": dataset_sha256,
            "num_images": len(dataset.images),
        },
        "weights": {key: weights[key] for key in ("name", "seed", "sha256")},
    }


def _differences(stored: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """'field: cache X, this run Y' for each leaf that differs (nested dicts flattened)."""
    out = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: cache {a!r}, this run {b!r}")
    return out


def _resolve(
    config: ExtractConfig | dict[str, Any],
) -> tuple[ExtractConfig, KarpathyDataset, dict[str, Any], dict[str, Any]]:
    """Validate and load: (config, dataset, weights identity, cache identity). Writes nothing."""
    config = _as_config(config)
    _check_inputs(config)
    dataset, dataset_sha256 = _load_dataset(config.dataset)
    if not dataset.images:
        raise ConfigError(f"dataset: {config.dataset}: no images")
    grid_size(config.image_size, config.layer)  # raises on an impossible size/layer pair
    _, weights, _ = _load_extractor(config)
    return config, dataset, weights, _identity(config, dataset, dataset_sha256, weights)


def _create_arrays(group: zarr.Group, plan: ExtractionPlan) -> None:
    """Preallocate the final shapes (each shard is later written as one region); idempotent."""
    n, size = plan.num_images, plan.config.shard_size
    num_instances = plan.grid[0] * plan.grid[1]
    specs = {
        "instances": ((n, num_instances, INSTANCE_DIM), "float16"),
        "shard_done": ((plan.num_shards,), "uint8"),
    }
    if plan.global_dim:
        specs["global"] = ((n, plan.global_dim), "float16")
    for name, (shape, dtype) in specs.items():
        if name in group:
            continue
        if name == "shard_done":  # one chunk per shard: each writer touches only its own file
            group.create_array(name, shape=shape, dtype=dtype, chunks=(1,), fill_value=0)
            continue
        # chunk = one image (the unit of reading), shard = `shard_size` images (the unit of
        # writing). No compression: zstd saves ~10 % on float16 features and halves write speed.
        group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=(1, *shape[1:]),
            shards=(min(size, n), *shape[1:]),
            compressors=None,
            fill_value=0,
        )


def plan_extraction(config: ExtractConfig | dict[str, Any]) -> ExtractionPlan:
    """Validate the inputs, then create the store or reopen a matching one; list missing shards.

    Nothing is written when the inputs are invalid. An existing cache made with another
    identity (dataset content, image_size, layer, global_mode, shard_size, weights) raises
    CacheMismatch naming the differing fields, unless config.overwrite (then it is replaced).
    """
    config = _as_config(config)
    _check_writable(config.out)
    config, dataset, weights, identity = _resolve(config)
    n = len(dataset.images)
    plan = ExtractionPlan(
        config=config,
        dataset=dataset,
        weights=weights,
        identity=identity,
        num_images=n,
        num_shards=-(-n // config.shard_size),
        grid=grid_size(config.image_size, config.layer),
        global_dim=0 if config.global_mode == "off" else GLOBAL_DIM,
    )

    store_meta = join(plan.store, "zarr.json")
    if _exists(store_meta) and not config.overwrite:
        group = zarr.open_group(plan.store, mode="r+")
        stored = dict(group.attrs).get("identity")
        if stored is None:
            raise CacheError(f"{config.out}: {STORE_NAME} is not an smlstm cache; use overwrite")
        if stored != identity:
            diffs = "; ".join(_differences(stored, identity))
            raise CacheMismatch(
                f"{config.out}: cache was made with other settings ({diffs}); "
                "use overwrite to replace it or another out directory"
            )
    else:
        if config.overwrite:
            _remove_cache(config.out)
        # Attributes go in with the group's own metadata (one write): a store that exists always
        # says what it holds. Arrays follow; a run killed in between recreates them on resume.
        with _no_space_is_a_cache_error(config.out, "the store metadata"):
            group = zarr.create_group(
                plan.store,
                attributes={
                    "schema_version": SCHEMA_VERSION,
                    "num_images": n,
                    "shard_size": config.shard_size,
                    "num_shards": plan.num_shards,
                    "grid": list(plan.grid),
                    "instance_dim": INSTANCE_DIM,
                    "global_dim": plan.global_dim,
                    "config": config.to_dict(),
                    "weights": weights,
                    "dataset": identity["dataset"],
                    "identity": identity,
                    "identity_hash": identity_hash(identity),
                    "versions": _versions(),
                },
            )
    with _no_space_is_a_cache_error(config.out, "the store metadata"):
        _create_arrays(group, plan)
    done = np.asarray(group["shard_done"][:])
    plan.todo = [int(k) for k in np.flatnonzero(done == 0)]
    return plan


def _open_plan(config: ExtractConfig | dict[str, Any]) -> ExtractionPlan:
    """A worker's view of a planned extraction: the store must exist and match. Writes nothing."""
    config, dataset, weights, identity = _resolve(config)
    store = join(config.out, STORE_NAME)
    try:
        group = zarr.open_group(store, mode="r")
    except FileNotFoundError:
        raise CacheError(f"{config.out}: no {STORE_NAME}; run plan_extraction first") from None
    attrs = dict(group.attrs)
    if attrs.get("identity") != identity:
        diffs = "; ".join(_differences(attrs.get("identity") or {}, identity))
        raise CacheMismatch(f"{config.out}: cache was made with other settings ({diffs})")
    done = np.asarray(group["shard_done"][:])
    return ExtractionPlan(
        config=config,
        dataset=dataset,
        weights=weights,
        identity=identity,
        num_images=int(attrs["num_images"]),
        num_shards=int(attrs["num_shards"]),
        grid=tuple(attrs["grid"]),
        global_dim=int(attrs["global_dim"]),
        todo=[int(k) for k in np.flatnonzero(done == 0)],
    )


def extraction_complete(config: ExtractConfig | dict[str, Any]) -> bool:
    """True when `config.out` holds a finished cache with this config's identity.

    False when there is no cache, a shard or a table is missing, or the cache was made with
    other settings (running the stage then resumes, or refuses without overwrite).
    Invalid inputs raise InputError as plan_extraction does. Writes nothing.
    """
    config, _, _, identity = _resolve(config)
    store = join(config.out, STORE_NAME)
    if not _exists(join(store, "zarr.json")):
        return False
    group = zarr.open_group(store, mode="r")
    if dict(group.attrs).get("identity") != identity or "shard_done" not in group:
        return False
    if not np.asarray(group["shard_done"][:]).all():
        return False
    finished = ("manifest.parquet", "captions.parquet", "failures.parquet", "extract_config.json")
    return all(_exists(join(config.out, name)) for name in finished)


# ----------------------------------------------------------------------------------------------
# one shard


def _loader_workers(requested: int, num_images: int) -> int:
    # A daemonic process (a Dask worker, a multiprocessing pool worker) may not start children:
    # decode in the process itself there.
    if multiprocessing.current_process().daemon:
        return 0
    return max(0, min(requested, num_images))


def extract_shard(
    config_or_plan: ExtractionPlan | ExtractConfig | dict[str, Any],
    shard_index: int,
    extractor: FeatureExtractor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ShardResult:
    """Extract one shard: decode, forward, write its rows, its status table, then its done mark.

    config_or_plan: the coordinator's plan, or (on a Dask worker) the config as a dict, which
        reopens the store and checks its identity.
    extractor: a FeatureExtractor to use instead of this process's cached backbone.
    progress: called as progress(images done in this shard, shard size) after each batch.
    Rows of images that fail to decode are zeros; the shard's parquet says why.
    """
    started = time.perf_counter()
    plan = (
        config_or_plan if isinstance(config_or_plan, ExtractionPlan) else _open_plan(config_or_plan)
    )
    config = plan.config
    if not 0 <= shard_index < plan.num_shards:
        raise IndexError(f"shard {shard_index} outside [0, {plan.num_shards})")
    if extractor is None:
        extractor, weights, device = _load_extractor(config)
        if weights["sha256"] != plan.weights["sha256"]:  # the weights file changed under us
            raise CacheMismatch(
                f"{config.out}: weights sha256 {weights['sha256']} differ from the plan's "
                f"{plan.weights['sha256']}"
            )
    else:
        device = next(extractor.parameters()).device

    rows = plan.shard_rows(shard_index)
    items = [
        (row, os.path.join(os.path.abspath(config.images), plan.dataset.images[row].relpath))
        for row in rows
    ]
    workers = _loader_workers(config.workers, len(items))
    loader = DataLoader(
        ImageFolderDataset(items, config.image_size, config.max_pixels),
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,  # keep decoded batches ahead of the forward pass
    )

    n = len(items)
    num_instances = plan.grid[0] * plan.grid[1]
    instances = np.zeros((n, num_instances, INSTANCE_DIM), dtype=np.float16)
    global_ = np.zeros((n, plan.global_dim), dtype=np.float16)
    status: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    done = 0
    for batch in loader:
        # The whole batch goes through the network, failed images (zeros) included: per-image
        # outputs depend on the batch size on some backends, and this keeps a good image's
        # features identical whether or not its batch-mates decode.
        batch_instances, batch_global = extractor(batch["image"])
        local = (batch["row"] - rows.start).numpy()
        ok = batch["ok"].numpy()
        instances[local[ok]] = batch_instances.to(torch.float16).cpu().numpy()[ok]
        if batch_global is not None and plan.global_dim:
            global_[local[ok]] = batch_global.to(torch.float16).cpu().numpy()[ok]
        for name in ("row", "ok", "width", "height"):
            status[name] += batch[name].tolist()
        status["kind"] += batch["kind"]
        status["message"] += batch["message"]
        done += len(local)
        if progress is not None:
            progress(done, n)

    # One write per array covering the whole shard region: a single, complete shard object.
    # Out of space anywhere here: the shard stays not done and a rerun writes it again.
    with _no_space_is_a_cache_error(config.out, f"shard {shard_index}"):
        group = zarr.open_group(plan.store, mode="r+")
        group["instances"][rows.start : rows.stop] = instances
        if plan.global_dim:
            group["global"][rows.start : rows.stop] = global_
        _write_parquet_atomic(
            join(config.out, "shards", f"{shard_index}.parquet"),
            pa.Table.from_pydict(status, schema=SHARD_SCHEMA),
        )
        # Last: the shard counts only once all of it is on disk.
        group["shard_done"][shard_index] = 1
    return ShardResult(
        shard=shard_index,
        start=rows.start,
        stop=rows.stop,
        images=n,
        failures=int(n - sum(status["ok"])),
        seconds=time.perf_counter() - started,
    )


# ----------------------------------------------------------------------------------------------
# finishing


def finalize_extraction(plan: ExtractionPlan | ExtractConfig | dict[str, Any]) -> str | Path:
    """Once every shard is done: write manifest, captions, failures and extract_config.json.

    Each file is written atomically. Raises CacheError if a shard is still missing.
    Returns the cache directory (a Path for a local cache, the URL string otherwise).
    """
    if not isinstance(plan, ExtractionPlan):
        plan = _open_plan(plan)
    config = plan.config
    group = zarr.open_group(plan.store, mode="r+")
    done = np.asarray(group["shard_done"][:])
    if not done.all():
        raise CacheError(
            f"{config.out}: cache incomplete: {int(done.sum())} of {done.size} shards done; "
            "rerun extraction to resume"
        )
    shards = [
        _read_parquet(join(config.out, "shards", f"{k}.parquet")) for k in range(plan.num_shards)
    ]
    status = pa.concat_tables(shards).to_pydict()

    manifest = {name: [] for name in MANIFEST_SCHEMA.names}
    captions = {name: [] for name in CAPTIONS_SCHEMA.names}
    failures = {name: [] for name in FAILURES_SCHEMA.names}
    for row, ok, width, height, kind, message in zip(*status.values(), strict=True):
        image = plan.dataset.images[row]
        if not ok:
            failures["row"].append(row)
            failures["path"].append(os.path.join(os.path.abspath(config.images), image.relpath))
            failures["kind"].append(kind)
            failures["message"].append(message)
            continue
        for name, value in (
            ("row", row),
            ("filename", image.filename),
            ("relpath", image.relpath),
            ("split", image.split),
            ("image_id", image.imgid),
            ("width", width),
            ("height", height),
        ):
            manifest[name].append(value)
        for index, caption in enumerate(image.captions):
            captions["caption_id"].append(caption.sentid)
            captions["row"].append(row)
            captions["image_id"].append(image.imgid)
            captions["caption_index"].append(index)
            captions["split"].append(image.split)
            captions["raw"].append(caption.raw)
            captions["tokens"].append(list(caption.tokens))

    out = config.out
    with _no_space_is_a_cache_error(out, "the cache tables"):
        _write_parquet_atomic(
            join(out, "manifest.parquet"), pa.Table.from_pydict(manifest, schema=MANIFEST_SCHEMA)
        )
        _write_parquet_atomic(
            join(out, "captions.parquet"), pa.Table.from_pydict(captions, schema=CAPTIONS_SCHEMA)
        )
        _write_parquet_atomic(
            join(out, "failures.parquet"), pa.Table.from_pydict(failures, schema=FAILURES_SCHEMA)
        )
        _write_bytes_atomic(
            join(out, "extract_config.json"),
            (json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n").encode(),
        )
        group.attrs.update({"config": config.to_dict()})  # the run that finished it
    return out if _is_url(out) else Path(out)


# ----------------------------------------------------------------------------------------------
# everything in one process


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return (
        f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
        if hours
        else f"{rest // 60:02d}:{rest % 60:02d}"
    )


def run_extraction(
    config: ExtractConfig | dict[str, Any], progress: Progress | None = print
) -> ExtractionSummary:
    """Plan, extract every missing shard in order, finalize. Progress lines go to `progress`."""
    say = progress or (lambda line: None)
    started = time.perf_counter()
    plan = plan_extraction(config)
    config = plan.config
    say(
        f"cache {config.out}: {plan.num_images} images, {plan.num_shards} shards of "
        f"{config.shard_size}; weights {plan.weights['name']} sha256 {plan.weights['sha256'][:12]}"
    )
    todo_images = sum(len(plan.shard_rows(k)) for k in plan.todo)
    if plan.todo:
        say(f"extracting shards {plan.todo} ({todo_images} images)")
    else:
        say("all shards already extracted")

    extracted, images_done, failures, extract_started = [], 0, 0, time.perf_counter()
    for k in plan.todo:
        result = extract_shard(plan, k)
        extracted.append(k)
        images_done += result.images
        failures += result.failures
        elapsed = time.perf_counter() - extract_started
        rate = images_done / elapsed if elapsed > 0 else 0.0
        eta = (todo_images - images_done) / rate if rate > 0 else 0.0
        say(
            f"shard {k + 1}/{plan.num_shards} rows {result.start}-{result.stop - 1}: "
            f"{result.images} images ({result.failures} failed) at {result.images_per_s:.1f}/s; "
            f"total {images_done}/{todo_images} at {rate:.1f} images/s, ETA {_duration(eta)}"
        )
    extract_seconds = time.perf_counter() - extract_started

    cache = finalize_extraction(plan)
    failures_total = len(_read_parquet(join(config.out, "failures.parquet")))
    summary = ExtractionSummary(
        cache=str(cache),
        num_images=plan.num_images,
        num_good=plan.num_images - failures_total,
        num_failures=failures_total,
        num_shards=plan.num_shards,
        shards_extracted=extracted,
        seconds=time.perf_counter() - started,
        images_per_s=images_done / extract_seconds if images_done and extract_seconds > 0 else 0.0,
    )
    say(
        f"done: {summary.num_good} good images, {summary.num_failures} failed, "
        f"{len(extracted)} shards extracted in {_duration(summary.seconds)}"
    )
    return summary
