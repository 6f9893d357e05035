"""Stage 3: score a checkpoint's test gallery, write the score matrix and the Parquet reports.

    result = evaluate(EvalConfig(checkpoint=..., cache=..., out="reports"))

Everything is checked before any work or any write (`prepare_evaluation`): the config, the
checkpoint (weights-only load), the cache, that the checkpoint was trained on THIS cache (same
backbone weights sha256 and config hash, else CacheMismatch), the protocol against the
gallery, and that the reports directory can be written. Then, under `<out>`:

    scores/run_id=<id>.zarr                  float32 (N_images, N_captions) + gallery attrs
    figures/run_id=<id>/*.png                attention figures of a few sample queries
    ranks/run_id=<id>/part-0.parquet         per-query ranks and top-10 (RANKS_SCHEMA)
    history/run_id=<id>/part-0.parquet       the training history of the checkpoint's run
    metrics/run_id=<id>/part-0.parquet       R@K, medr, meanr, rsum (METRICS_SCHEMA)

Each file appears atomically (written under a hidden temp name, then renamed or linked), and
metrics are written last: a run listed in the metrics table has all its files, and a killed
evaluation leaves only hidden temp files that every reader skips. Two evaluations never share
a run id, so they can run at the same time into the same directory.

`ensemble` averages the score matrices of several models over the same gallery (the paper's
sm-LSTM*) and reports the average as a run of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import zarr
from pydantic import ConfigDict, Field, field_validator

from features.backbone import pick_device
from features.cache import FeatureCache
from features.config import StageConfig, check_writable
from features.errors import CacheMismatch, CheckpointError, ConfigError, InputError
from smlstm import metrics as retrieval
from smlstm.checkpoint import load_checkpoint, model_from_checkpoint
from smlstm.figures import attention_figure, load_photo
from smlstm.model import SMLSTM
from smlstm.reports import (
    RunMeta,
    config_hash,
    fsync_dir,
    metrics_frame,
    new_run_id,
    print_metrics,
    ranks_frame,
    read_table,
    summary_page,
    write_table,
)
from smlstm.scoring import DEFAULT_BLOCK_BUDGET_MB, EvalGallery, encode_gallery, score_codes
from smlstm.text import Vocabulary

__all__ = [
    "EvalConfig",
    "EvalResult",
    "PreparedEvaluation",
    "ensemble",
    "evaluate",
    "evaluation_complete",
    "load_scores",
    "prepare_evaluation",
    "report",
    "run_dir_of",
]

SCORES_FORMAT = "smlstm-scores/1"
COCO_FOLDS = 5
PROGRESS_EVERY_S = 10.0
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # the rule of smlstm.reports


# ---------------------------------------------------------------------------------------------
# config


class EvalConfig(StageConfig):
    """Everything stage 3 needs. `out` is the reports directory (shared by many runs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source_name: ClassVar[str] = "evaluate config"

    checkpoint: str = Field(description="a checkpoint file (e.g. <run>/checkpoints/best.pt)")
    cache: str = Field(description="the feature cache the checkpoint was trained on")
    out: str = Field(description="reports directory")
    split: str = "test"
    protocol: Literal["1k", "5k", "coco-1k"] = "1k"
    captions_per_image: int = Field(5, ge=1, description="first K captions of each image")
    block_budget_mb: float = Field(DEFAULT_BLOCK_BUDGET_MB, gt=0,
                                   description="memory of one (image x caption) scoring block")
    device: str = "auto"
    figures: int = Field(3, ge=0, le=100, description="attention figures of sample queries")
    encode_batch: int = Field(128, ge=1, description="images / captions per encoder call")
    run_id: str | None = Field(None, description="default: a new timestamped id")

    @field_validator("checkpoint", "cache", "out", "split")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty value")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", value):
            raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
        return value

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str | None) -> str | None:
        if value is not None and not _RUN_ID_RE.match(value):
            raise ValueError(f"expected letters, digits, '.', '_' or '-', got {value!r}")
        return value



def _as_config(config: EvalConfig | dict[str, Any]) -> EvalConfig:
    return config if isinstance(config, EvalConfig) else EvalConfig.from_dict(dict(config))


# ---------------------------------------------------------------------------------------------
# checks at the door


def run_dir_of(checkpoint: str | os.PathLike) -> Path:
    """The training run directory of a checkpoint (`<run>/checkpoints/x.pt` -> `<run>`)."""
    path = Path(checkpoint)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _plain(value: Any) -> Any:
    """JSON round trip (tuples -> lists), the form identities are stored in."""
    return json.loads(json.dumps(value))


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The dotted path of the first field where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
            if found:
                return found
        return None
    return None if a == b else (prefix or "value")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:16] + "..."


def check_cache_identity(ckpt: dict[str, Any], cache: FeatureCache, source: str) -> None:
    """CacheMismatch unless the checkpoint was trained on a cache with this cache's identity
    (backbone weights sha256, extraction config hash, dataset)."""
    recorded = ckpt.get("cache_identity")
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{source}: cache_identity: missing; cannot check the cache")
    actual = _plain(cache.identity)
    where = _first_difference(recorded, actual)
    if where is not None:
        def get(d: Any) -> Any:
            for part in where.split("."):
                d = d.get(part) if isinstance(d, dict) else None
            return d

        raise CacheMismatch(
            f"{source}: cache_identity.{where}: the checkpoint was trained on a cache with "
            f"{_short(get(recorded))}, but {cache.path} has {_short(get(actual))}"
        )



def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the checkpoint's identity in reports)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _eval_identity(config: EvalConfig, checkpoint_sha256: str, cache: FeatureCache) -> dict:
    """What makes two evaluations the same: its hash is the metrics' config_hash."""
    return {
        "checkpoint_sha256": checkpoint_sha256,
        "cache_id": cache.identity["config_hash"],
        "split": config.split,
        "protocol": config.protocol,
        "captions_per_image": config.captions_per_image,
    }


def _run_paths(out: Path, run_id: str) -> dict[str, Path]:
    return {
        "scores": out / "scores" / f"run_id={run_id}.zarr",
        "figures": out / "figures" / f"run_id={run_id}",
        "ranks": out / "ranks" / f"run_id={run_id}" / "part-0.parquet",
        "history": out / "history" / f"run_id={run_id}" / "part-0.parquet",
        "metrics": out / "metrics" / f"run_id={run_id}" / "part-0.parquet",
    }


def _check_new_run(out: Path, run_id: str) -> None:
    taken = [name for name, path in _run_paths(out, run_id).items() if path.exists()]
    if taken:
        raise ConfigError(f"run_id: {run_id!r} already has {taken[0]} in {out}; pick another")


@dataclass
class PreparedEvaluation:
    """The checked inputs of one evaluation; nothing has been written yet."""

    config: EvalConfig
    checkpoint: dict[str, Any]
    checkpoint_sha256: str
    model: SMLSTM
    vocab: Vocabulary
    cache: FeatureCache
    gallery: EvalGallery
    device: torch.device
    run_id: str
    identity: dict[str, Any]


def prepare_evaluation(config: EvalConfig | dict[str, Any]) -> PreparedEvaluation:
    """Validate everything an evaluation needs; InputError (one line) on any problem, and no
    file is written."""
    config = _as_config(config)
    out = Path(config.out)
    check_writable(out)
    device = pick_device(config.device)
    ckpt = load_checkpoint(config.checkpoint)
    cache = FeatureCache.open(config.cache)
    check_cache_identity(ckpt, cache, config.checkpoint)
    model, vocab = model_from_checkpoint(ckpt, device, source=config.checkpoint)
    gallery = EvalGallery.from_cache(cache, config.split, config.captions_per_image)
    if config.protocol == "coco-1k":
        retrieval.fold_slices(gallery.owner, gallery.num_images, COCO_FOLDS)  # ConfigError
    run_id = config.run_id or new_run_id()
    _check_new_run(out, run_id)
    sha = file_sha256(config.checkpoint)
    return PreparedEvaluation(config, ckpt, sha, model, vocab, cache, gallery, device, run_id,
                              _eval_identity(config, sha, cache))


# ---------------------------------------------------------------------------------------------
# score files



def _publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished hidden directory into place; never replaces an existing one."""
    if final.exists():
        raise FileExistsError(f"{final}: already exists; use a new run id")
    os.rename(tmp, final)  # atomic; a concurrent writer of the same name makes it fail
    fsync_dir(final.parent)


def _hidden_tmp(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_scores(path: Path, scores: np.ndarray, attrs: dict[str, Any]) -> Path:
    """Write a float32 score matrix as a Zarr v3 array with `attrs`, atomically (temp dir +
    rename): a reader sees the whole array or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_tmp(path)
    try:
        rows, cols = scores.shape
        array = zarr.create_array(
            store=str(tmp), shape=scores.shape, dtype="float32",
            chunks=(min(rows, 512), min(cols, 2048)), compressors=None, zarr_format=3,
        )
        array[...] = scores.astype(np.float32, copy=False)
        array.attrs.update(_plain(attrs))
        _publish_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_scores(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """A score file written by `evaluate` / `ensemble`: (float32 matrix, attrs).
    InputError (one line) when it is missing or not a score file."""
    path = Path(path)
    try:
        array = zarr.open_array(str(path), mode="r")
    except (FileNotFoundError, ValueError, OSError, zarr.errors.BaseZarrError):
        raise InputError(f"{path}: not a score file (no Zarr array here)") from None
    attrs = dict(array.attrs)
    if attrs.get("format") != SCORES_FORMAT:
        raise InputError(f"{path}: format: expected {SCORES_FORMAT!r}, got {attrs.get('format')!r}")
    return np.asarray(array[...], dtype=np.float32), attrs


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class EvalResult:
    """Where an evaluation (or ensemble) wrote its files, and its headline numbers."""

    run_id: str
    out: Path
    scores_path: Path
    metrics_path: Path
    ranks_path: Path
    history_path: Path | None
    figures: list[Path]
    metrics: pd.DataFrame  # this run's rows of the metrics table
    summary: dict[str, float]  # i2t_r1 .. t2i_meanr, rsum of the "all" / "mean" fold
    num_images: int
    num_captions: int
    seconds: float
    pairs_per_s: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rsum(self) -> float:
        return self.summary["rsum"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (the flow's return value)."""
        return {
            "run_id": self.run_id,
            "out": str(self.out),
            "scores": str(self.scores_path),
            "metrics": str(self.metrics_path),
            "ranks": str(self.ranks_path),
            "history": None if self.history_path is None else str(self.history_path),
            "figures": [str(p) for p in self.figures],
            "num_images": self.num_images,
            "num_captions": self.num_captions,
            "seconds": round(self.seconds, 3),
            "pairs_per_s": self.pairs_per_s,
            **{key: float(value) for key, value in self.summary.items()},
        }


def _summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The headline fold ("all", or "mean" for coco-1k) as flat keys i2t_r1 .. rsum."""
    out = {}
    for row in rows:
        if str(row["fold"]) not in ("all", "mean"):
            continue
        if row["direction"] == "both":
            out["rsum"] = float(row["rsum"])
        else:
            for key in retrieval.METRIC_KEYS:
                out[f"{row['direction']}_{key}"] = float(row[key])
    return out


def _write_reports(
    out: Path, run_id: str, scores: np.ndarray, owner: np.ndarray, image_ids: np.ndarray,
    caption_ids: np.ndarray, protocol: str, meta: RunMeta, history: pd.DataFrame | None,
) -> tuple[list[dict[str, Any]], pd.DataFrame, dict[str, Path | None]]:
    """Ranks, history, then metrics (last: a run in the metrics table is complete)."""
    rows = retrieval.evaluate(scores, owner, protocol, folds=COCO_FOLDS)
    table = metrics_frame(rows, meta)
    ranks = ranks_frame(scores, owner, run_id, image_ids=image_ids, caption_ids=caption_ids)
    paths: dict[str, Path | None] = {"history": None}
    paths["ranks"] = write_table(ranks, out / "ranks", run_id)
    if history is not None:
        paths["history"] = write_table(history, out / "history", run_id)
    paths["metrics"] = write_table(table, out / "metrics", run_id)
    return rows, table, paths


def _read_history(run_dir: Path) -> pd.DataFrame | None:
    """The training run's history.parquet (its own run_id dropped: the eval run id is the
    partition), or None when the run has none."""
    path = run_dir / "history.parquet"
    if not path.is_file():
        return None
    history = pd.read_parquet(path)
    return history.drop(columns=[c for c in ("run_id",) if c in history.columns])


# ---------------------------------------------------------------------------------------------
# figures


def _draw_figures(
    prep: PreparedEvaluation, scores: np.ndarray, final_dir: Path, log: Callable[[str], None]
) -> list[Path]:
    """Attention figures of `figures` sample images (spread over the gallery) with their top-1
    caption, into a hidden directory renamed into place when all are drawn."""
    count = min(prep.config.figures, prep.gallery.num_images)
    if count == 0:
        return []
    gallery, cache, model = prep.gallery, prep.cache, prep.model
    image_root = Path(str(cache.config.get("images", "")))
    relpaths = cache.manifest.set_index("row")["relpath"]
    picks = np.unique(np.linspace(0, gallery.num_images - 1, count).round().astype(int))
    tmp = _hidden_tmp(final_dir)
    tmp.mkdir(parents=True)
    missing = 0
    names = []
    try:
        for i in picks:
            row = int(gallery.rows[i])
            k = int(np.argmax(scores[i]))  # top-1 caption; ties -> lower index, as the ranks
            instances, global_ = cache.read_rows(row, row + 1)
            ids, lengths = prep.vocab.encode_batch([gallery.tokens[k]])
            glob = torch.from_numpy(global_[0]).float().to(prep.device) if global_.shape[1] else None
            explained = model.explain(torch.from_numpy(instances[0]).float().to(prep.device), glob,
                                      ids[0].to(prep.device), int(lengths[0]), grid=cache.grid)
            photo = load_photo(image_root / str(relpaths.loc[row]))
            missing += photo is None
            verdict = "correct" if gallery.owner[k] == i else "wrong image"
            name = f"image{int(gallery.image_ids[i])}_top1.png"
            attention_figure(
                photo, explained, gallery.tokens[k], tmp / name,
                title=f"image {int(gallery.image_ids[i])} -> top-1 caption "
                      f"{int(gallery.caption_ids[k])} ({verdict})",
            )
            names.append(name)
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        _publish_dir(tmp, final_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if missing:
        log(f"figures: {missing} of {len(picks)} photos not found under {image_root}; "
            "drew the attention maps without the photo")
    return [final_dir / name for name in names]


# ---------------------------------------------------------------------------------------------
# evaluate


def evaluate(
    config: EvalConfig | dict[str, Any] | PreparedEvaluation,
    log: Callable[[str], None] = print,
) -> EvalResult:
    """Score the split's gallery with the checkpoint and write the run's files (module doc).

    Accepts a config (validated here) or the result of `prepare_evaluation`.
    """
    started = time.perf_counter()
    prep = config if isinstance(config, PreparedEvaluation) else prepare_evaluation(config)
    config, gallery, cache, run_id = prep.config, prep.gallery, prep.cache, prep.run_id
    out = Path(config.out)
    paths = _run_paths(out, run_id)
    log(f"evaluate {config.checkpoint} on {cache.path} split {config.split!r}: "
        f"{gallery.num_images} images x {gallery.num_captions} captions, protocol "
        f"{config.protocol}, device {prep.device}, run {run_id}")

    encode_start = time.perf_counter()
    images, texts = encode_gallery(prep.model, cache, gallery, prep.vocab, prep.device,
                                   config.encode_batch)
    log(f"encoded {gallery.num_images} images and {gallery.num_captions} captions in "
        f"{time.perf_counter() - encode_start:.1f}s")

    last_log = [time.perf_counter()]

    def progress(p) -> None:
        now = time.perf_counter()
        if p.pairs_done == p.pairs_total or now - last_log[0] >= PROGRESS_EVERY_S:
            last_log[0] = now
            log(str(p))

    log(f"scoring {gallery.num_images * gallery.num_captions:,} pairs "
        f"(block budget {config.block_budget_mb:g} MB)")
    score_start = time.perf_counter()
    scores = score_codes(prep.model, images, texts, config.block_budget_mb, progress)
    score_seconds = time.perf_counter() - score_start
    del images, texts

    attrs = {
        "format": SCORES_FORMAT,
        "run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(),
        "split": config.split,
        "protocol": config.protocol,
        "captions_per_image": config.captions_per_image,
        "image_rows": gallery.rows.tolist(),
        "image_ids": gallery.image_ids.tolist(),
        "caption_ids": gallery.caption_ids.tolist(),
        "owner": gallery.owner.tolist(),
        "checkpoint": str(config.checkpoint),
        "checkpoint_sha256": prep.checkpoint_sha256,
        "cache": str(cache.path),
        "cache_id": cache.identity["config_hash"],
        "cache_identity": cache.identity,
        "dataset": _dataset_name(cache),
        "model_config": prep.checkpoint["model_config"],
        "train_config": prep.checkpoint.get("train_config"),
        "eval_config": config.to_dict(),
        "config_hash": config_hash(prep.identity),
    }
    write_scores(paths["scores"], scores, attrs)
    log(f"wrote {paths['scores']}")
    figures = _draw_figures(prep, scores, paths["figures"], log)
    history = _read_history(run_dir_of(config.checkpoint))
    if history is None:
        log(f"no history.parquet in {run_dir_of(config.checkpoint)}; no history report")

    meta = RunMeta(run_id=run_id, dataset=attrs["dataset"], split=config.split,
                   protocol=config.protocol, checkpoint=str(config.checkpoint),
                   cache_id=attrs["cache_id"], config_hash=attrs["config_hash"])
    rows, table, written = _write_reports(out, run_id, scores, gallery.owner, gallery.image_ids,
                                          gallery.caption_ids, config.protocol, meta, history)
    log(print_metrics(table))
    return EvalResult(
        run_id=run_id, out=out, scores_path=paths["scores"], metrics_path=written["metrics"],
        ranks_path=written["ranks"], history_path=written["history"], figures=figures,
        metrics=table, summary=_summary(rows), num_images=gallery.num_images,
        num_captions=gallery.num_captions, seconds=time.perf_counter() - started,
        pairs_per_s=scores.size / score_seconds if score_seconds > 0 else None,
    )


def _dataset_name(cache: FeatureCache) -> str:
    dataset = cache.identity.get("dataset")
    if isinstance(dataset, dict) and dataset.get("name"):
        return str(dataset["name"])
    return Path(str(cache.path)).name


def evaluation_complete(config: EvalConfig | dict[str, Any]) -> bool:
    """True when `out` already holds a finished report of this checkpoint (same bytes) on this
    cache with the same split, protocol and captions per image. Never raises on missing inputs:
    a stage whose inputs are missing is simply not complete."""
    config = _as_config(config)
    metrics_dir = Path(config.out) / "metrics"
    if not metrics_dir.is_dir() or not Path(config.checkpoint).is_file():
        return False
    try:
        cache = FeatureCache.open(config.cache)
        wanted = config_hash(_eval_identity(config, file_sha256(config.checkpoint), cache))
        table = read_table(metrics_dir)
    except (InputError, OSError):
        return False
    return not table.empty and bool((table["config_hash"] == wanted).any())


# ---------------------------------------------------------------------------------------------
# ensemble


_GALLERY_ATTRS = ("split", "cache_id", "image_rows", "caption_ids", "owner")


def ensemble(
    score_paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    run_id: str | None = None,
    protocol: Literal["1k", "5k", "coco-1k"] | None = None,
    log: Callable[[str], None] = print,
) -> EvalResult:
    """Average the score matrices of several models over the same gallery (sm-LSTM*) and report
    the average as a run: its own scores file, ranks and metrics (no history).

    The files must hold the same gallery (split, cache, image rows, caption ids, owners),
    checked on their attrs; the protocol defaults to the first file's.
    """
    started = time.perf_counter()
    if len(score_paths) < 2:
        raise ConfigError(f"ensemble: expected at least 2 score files, got {len(score_paths)}")
    out = Path(out)
    check_writable(out)
    run_id = run_id or new_run_id()
    if not _RUN_ID_RE.match(run_id):
        raise ConfigError(f"run_id: expected letters, digits, '.', '_' or '-', got {run_id!r}")
    _check_new_run(out, run_id)

    first_matrix, first = load_scores(score_paths[0])
    total = first_matrix.astype(np.float64)
    members = [first]
    for path in score_paths[1:]:
        matrix, attrs = load_scores(path)
        for key in _GALLERY_ATTRS:
            if attrs.get(key) != first.get(key):
                raise ConfigError(
                    f"{path}: {key}: differs from {score_paths[0]}; an ensemble needs the same "
                    "gallery in every score file"
                )
        total += matrix
        members.append(attrs)
    scores = (total / len(score_paths)).astype(np.float32)
    protocol = protocol or first.get("protocol", "1k")
    if protocol not in retrieval.PROTOCOLS:
        raise ConfigError(f"protocol: expected one of {', '.join(retrieval.PROTOCOLS)}, "
                          f"got {protocol!r}")
    owner = np.asarray(first["owner"], dtype=np.int64)
    if protocol == "coco-1k":
        retrieval.fold_slices(owner, scores.shape[0], COCO_FOLDS)

    checkpoints = ";".join(str(m.get("checkpoint")) for m in members)
    identity = {"ensemble_of": sorted(str(m.get("config_hash")) for m in members),
                "protocol": protocol}
    attrs = {
        **{key: first.get(key) for key in (*_GALLERY_ATTRS, "image_ids", "cache", "dataset",
                                           "captions_per_image")},
        "format": SCORES_FORMAT,
        "run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(),
        "protocol": protocol,
        "checkpoint": checkpoints,
        "members": [{"scores": str(p), "run_id": m.get("run_id"),
                     "checkpoint": m.get("checkpoint"), "config_hash": m.get("config_hash")}
                    for p, m in zip(score_paths, members, strict=True)],
        "config_hash": config_hash(identity),
    }
    paths = _run_paths(out, run_id)
    log(f"ensemble of {len(score_paths)} score files ({scores.shape[0]} x {scores.shape[1]}), "
        f"run {run_id}")
    write_scores(paths["scores"], scores, attrs)
    meta = RunMeta(run_id=run_id, dataset=str(first.get("dataset") or "unknown"),
                   split=str(first.get("split")), protocol=protocol, checkpoint=checkpoints,
                   cache_id=first.get("cache_id"), config_hash=attrs["config_hash"])
    image_ids = np.asarray(first.get("image_ids") or np.arange(scores.shape[0]), dtype=np.int64)
    caption_ids = np.asarray(first["caption_ids"], dtype=np.int64)
    rows, table, written = _write_reports(out, run_id, scores, owner, image_ids, caption_ids,
                                          protocol, meta, None)
    log(print_metrics(table))
    return EvalResult(
        run_id=run_id, out=out, scores_path=paths["scores"], metrics_path=written["metrics"],
        ranks_path=written["ranks"], history_path=None, figures=[], metrics=table,
        summary=_summary(rows), num_images=scores.shape[0], num_captions=scores.shape[1],
        seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------
# report


def report(
    reports_dir: str | os.PathLike,
    run_id: str | None = None,
    html: str | os.PathLike | None = None,
) -> tuple[str, Path, Path]:
    """A run's metrics table as text, plus its one-page HTML summary and PNG.

    run_id defaults to the newest run. The page goes to `html` (default
    `<reports_dir>/summary/run_id=<id>.html`), the PNG beside it. Returns (text, html, png).
    """
    reports_dir = Path(reports_dir)
    metrics_dir = reports_dir / "metrics"
    if not metrics_dir.is_dir():
        raise ConfigError(f"{reports_dir}: no metrics/ here; is it a reports directory?")
    table = read_table(metrics_dir)
    if table.empty:
        raise ConfigError(f"{metrics_dir}: holds no finished run")
    if run_id is None:  # the newest run by creation time (custom run ids need not sort)
        run_id = str(table.sort_values("created_at", kind="stable")["run_id"].iloc[-1])
    rows = table[table["run_id"] == run_id]
    if rows.empty:
        raise ConfigError(f"{metrics_dir}: run_id {run_id!r} not found "
                          f"(runs: {', '.join(sorted(table['run_id'].unique())[-5:])})")
    html_path = Path(html) if html else reports_dir / "summary" / f"run_id={run_id}.html"
    png_path = html_path.with_suffix(".png")
    summary_page(rows, html_path, png_path)
    return print_metrics(rows), html_path, png_path
