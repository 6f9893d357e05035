"""Stage 2: train sm-LSTM streaming from the feature cache; checkpoints, exact resume, DDP.

    python -m smlstm.train --config run/train_config.json            # one process
    torchrun --standalone --nproc_per_node 2 -m smlstm.train --config run/train_config.json

`train(config)` validates everything at the door (config, cache, resume checkpoint) before it
writes anything, then runs epochs of shard-aligned batches (smlstm.data), validates on the val
split after each epoch (val rsum, the exact evaluation protocol) and keeps two checkpoints:
`latest.pt` (every `checkpoint_every_steps` steps and each epoch) and `best.pt` (best rsum).

Resume (`resume=True`) continues exactly where `latest.pt` stopped: same epoch, same batch
position inside it, same optimizer / scheduler / RNG state, so a killed run resumed gives the
same weights as an uninterrupted one.

DDP (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK): each rank takes a contiguous slice of the
global batch. The ranking loss uses every caption of the batch as a negative for every image,
so the ranks must see each other's captions: the module DDP wraps encodes the local images
and captions, all-gathers the caption codes (with gradient) and scores its images against
all captions; the (B/W, B) blocks are then all-gathered (with gradient) into the full (B, B)
matrix and every rank computes the same loss. See docs/training.md for why this gives the
single-process gradient.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn as nn
from pydantic import ConfigDict, Field, ValidationError, field_validator
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from features.backbone import pick_device
from features.cache import FeatureCache
from features.config import (
    StageConfig,
    check_writable,
    format_validation_error,
    read_config_json,
)
from features.errors import CacheMismatch, CheckpointError, ConfigError, InputError
from smlstm.checkpoint import FORMAT, load_checkpoint, save_checkpoint, vocab_record
from smlstm.data import ShardBlockBatchSampler, TrainingSet, split_token_lists
from smlstm.loss import LossConfig, ranking_loss
from smlstm.model import SMLSTM, ModelConfig, TextCodes
from smlstm.reports import HISTORY_SCHEMA, history_frame, new_run_id
from smlstm.text import Vocabulary

__all__ = [
    "BatchScorer", "TrainConfig", "TrainSummary", "batch_loss", "gather_with_grad", "main",
    "prepare", "train", "training_complete", "validate", "validate_config",
]

LOG_EVERY_STEPS = 20
# Fields that change the maths of a run: a resume must use the checkpoint's values.
RESUME_FIXED_FIELDS = (
    "preset", "model", "loss", "lr", "lr_decay_epochs", "batch_size", "grad_clip", "seed",
    "window_shards", "min_count", "captions_per_image", "val_every_epochs",
)
CACHE_SET_FIELDS = ("vocab_size", "instance_dim", "global_dim")  # taken from cache / vocab


class TrainConfig(StageConfig):
    """Everything stage 2 needs; saved as `<out>/train_config.json` and in each checkpoint."""

    model_config = ConfigDict(extra="forbid")
    source_name: ClassVar[str] = "train config"

    cache: str = Field(description="feature cache directory (stage 1 output)")
    out: str = Field(description="run directory")
    preset: Literal["paper", "small"] = "paper"
    model: dict[str, Any] = Field(default_factory=dict, description="ModelConfig overrides")
    loss: LossConfig = Field(default_factory=LossConfig)
    epochs: int = Field(30, ge=1)
    lr: float = Field(2e-4, gt=0)
    lr_decay_epochs: int = Field(15, ge=1, description="lr x0.1 every this many epochs")
    batch_size: int = Field(128, ge=2, description="global batch (all DDP ranks together)")
    grad_clip: float = Field(2.0, ge=0, description="max grad norm; 0 = no clipping")
    seed: int = 0
    workers: int = Field(2, ge=0, le=64, description="DataLoader processes")
    window_shards: int = Field(2, ge=1, description="shards mixed into one run of batches")
    device: str = "auto"
    min_count: int = Field(1, ge=1, description="vocabulary: min train count of a word")
    captions_per_image: int = Field(5, ge=1, description="val: first K captions per image")
    val_every_epochs: int = Field(1, ge=1)
    checkpoint_every_steps: int = Field(0, ge=0, description="0 = only at each epoch end")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps in all")
    expected_weights_sha256: str | None = None
    resume: bool = False

    @field_validator("cache", "out")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty path")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
        return value

    @field_validator("model")
    @classmethod
    def _model_overrides(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in CACHE_SET_FIELDS:
            if name in value:
                raise ValueError(f"{name} is set from the cache / vocabulary, not by the config")
        return value

    def model_config_for(self, vocab_size: int, cache: FeatureCache | None = None) -> ModelConfig:
        """The ModelConfig of this run: preset widths + overrides, dims from the cache."""
        dims = {}
        if cache is not None:
            dims = {"instance_dim": cache.instance_dim, "global_dim": cache.global_dim}
        build = ModelConfig.small if self.preset == "small" else ModelConfig.paper
        return build(vocab_size, **{**dims, **self.model})


@dataclass
class TrainSummary:
    """What a `train` call did (this process's part of it, for a resumed run)."""

    run_dir: str
    run_id: str
    epochs_completed: int
    steps: int
    losses: list[float] = field(default_factory=list)  # per step, this process only
    history: list[dict[str, Any]] = field(default_factory=list)  # every validation of the run
    best_rsum: float | None = None
    best_epoch: int | None = None
    stopped_at_max_steps: bool = False
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
# validation at the door


def validate_config(raw: TrainConfig | dict[str, Any], source: str = "train config") -> TrainConfig:
    """A validated TrainConfig; ConfigError "<source>: <field>: <problem>" (one line) otherwise.

    Also checks the ModelConfig overrides (`model.<name>`) against the chosen preset.
    """
    if isinstance(raw, TrainConfig):
        raw = raw.to_dict()
    config = TrainConfig.from_dict(raw, source)
    try:
        config.model_config_for(vocab_size=2)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"{source}: model")) from None
    except TypeError as err:
        raise ConfigError(f"{source}: model: {err}") from None
    return config


def _load_config_file(path: str | Path) -> TrainConfig:
    return validate_config(read_config_json(path), source=str(path))


@dataclass
class Prepared:
    """The checked inputs of a run: nothing has been written yet."""

    config: TrainConfig
    cache: FeatureCache
    vocab: Vocabulary
    model_config: ModelConfig
    checkpoint: dict[str, Any] | None  # latest.pt when resuming


def _checkpoint_path(run_dir: Path, name: str = "latest") -> Path:
    return run_dir / "checkpoints" / f"{name}.pt"


def prepare(raw: TrainConfig | dict[str, Any]) -> Prepared:
    """Validate the config, open and check the cache, and (resume) the checkpoint.

    Raises an InputError (one line) on any problem; writes nothing.
    """
    config = validate_config(raw)
    cache = FeatureCache.open(config.cache)
    cache.check_weights(expected_sha256=config.expected_weights_sha256)
    if len(cache.rows("train")) == 0:
        raise ConfigError(f"{config.cache}: the cache has no good train images")
    if len(cache.rows("val")) == 0:
        raise ConfigError(f"{config.cache}: the cache has no good val images to validate on")
    run_dir = Path(config.out)
    latest = _checkpoint_path(run_dir)
    check_writable(run_dir)

    if not config.resume:
        if latest.exists():
            raise ConfigError(
                f"{run_dir}: already holds a training run ({latest.name}); "
                "pass resume=true to continue it or choose another out"
            )
        vocab = Vocabulary.build(split_token_lists(cache, "train"), min_count=config.min_count)
        return Prepared(config, cache, vocab, config.model_config_for(len(vocab), cache), None)

    ckpt = load_checkpoint(latest)
    if ckpt.get("cache_identity") != _plain(cache.identity):
        raise CacheMismatch(
            f"{latest}: cache_identity: the checkpoint was trained on another cache than "
            f"{config.cache} (other weights, config or dataset)"
        )
    old = ckpt.get("train_config", {})
    new = config.to_dict()
    for name in RESUME_FIXED_FIELDS:
        if old.get(name) != new[name]:
            raise ConfigError(
                f"{latest}: train_config.{name}: resume must keep {old.get(name)!r}, "
                f"got {new[name]!r}"
            )
    record = ckpt["vocab"]
    vocab = Vocabulary(record["tokens"], min_count=record["min_count"])
    if vocab.fingerprint != record.get("fingerprint"):
        raise CheckpointError(f"{latest}: vocab.fingerprint does not match its words")
    # The vocabulary is a function of the cache's train captions: rebuilding it must agree.
    rebuilt = Vocabulary.build(split_token_lists(cache, "train"), min_count=vocab.min_count)
    if rebuilt.fingerprint != vocab.fingerprint:
        raise CacheMismatch(
            f"{latest}: vocab.fingerprint: the cache's train captions give another vocabulary"
        )
    model_config = config.model_config_for(len(vocab), cache)
    if model_config.model_dump(mode="json") != ckpt["model_config"]:
        raise CheckpointError(f"{latest}: model_config: differs from this run's model config")
    return Prepared(config, cache, vocab, model_config, ckpt)



def training_complete(config: TrainConfig | dict[str, Any]) -> bool:
    """True when `out` holds a finished run of this config on this cache: latest.pt at the end
    of the last epoch with the same maths fields and cache identity, best.pt and history.
    Never raises on missing inputs: a stage whose inputs are missing is simply not complete."""
    try:
        config = validate_config(config)
        run_dir = Path(config.out)
        if not (_checkpoint_path(run_dir, "best").is_file()
                and (run_dir / "history.parquet").is_file()):
            return False
        ckpt = load_checkpoint(_checkpoint_path(run_dir))
        cache = FeatureCache.open(config.cache)
    except (InputError, OSError):
        return False
    old, new = ckpt.get("train_config", {}), config.to_dict()
    return (
        ckpt["epoch"] >= config.epochs
        and ckpt.get("batch_in_epoch") == 0
        and all(old.get(name) == new[name] for name in RESUME_FIXED_FIELDS)
        and ckpt.get("cache_identity") == _plain(cache.identity)
    )


def _plain(value: Any) -> Any:
    """A JSON round trip: tuples -> lists, so identities compare equal to their saved form."""
    return json.loads(json.dumps(value))


# ----------------------------------------------------------------------------------------------
# distributed helpers


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistEnv:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 (equal sizes) whose backward returns this rank's slice of the
    SUM over ranks of the gathered tensor's gradient (every rank uses the whole gather).

    Written with all_reduce, which every backend has (gloo lacks reduce_scatter)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0, differentiably."""
    return _GatherWithGrad.apply(tensor)


def gather_plain(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (no gradient)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class BatchScorer(nn.Module):
    """The module DDP wraps: scores this rank's images against every caption of the batch.

    One process: the (B, B) score matrix of the batch. DDP with W ranks: this rank's (B/W, B)
    rows; the caption codes of the other ranks arrive through `gather_with_grad`, so their
    encoder receives the gradient of this rank's scores too.
    """

    def __init__(self, model: SMLSTM, distributed: bool):
        super().__init__()
        self.model = model
        self.distributed = distributed

    def forward(self, instances, global_features, tokens, lengths) -> torch.Tensor:
        img = self.model.encode_images(instances, global_features)
        txt = self.model.encode_texts(tokens, lengths)
        if self.distributed:
            txt = TextCodes(
                words=gather_with_grad(txt.words),
                words_attn=gather_with_grad(txt.words_attn),
                mask=gather_plain(txt.mask.to(torch.uint8)).bool(),
                sent_ctx=gather_with_grad(txt.sent_ctx),
                lengths=gather_plain(txt.lengths),
            )
        return self.model.score_pairs(img, txt)


def batch_loss(
    scorer: nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    distributed: bool,
    loss_config: LossConfig,
    epoch: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, scores) of one batch, the same on every rank: scores is the full (B, B) matrix.

    `scorer` is a BatchScorer (wrapped in DistributedDataParallel when distributed); `batch`
    is this rank's slice as TrainingSet returns it.
    """
    inputs = [batch[k].to(device, non_blocking=True)
              for k in ("instances", "global", "tokens", "lengths")]
    image_ids = batch["image_ids"].to(device)
    if distributed:
        inputs[2] = _pad_to_global_length(inputs[2])
        image_ids = gather_plain(image_ids)
    scores = scorer(*inputs)
    if distributed:
        scores = gather_with_grad(scores)  # (B/W, B) row blocks -> (B, B)
    loss = ranking_loss(scores, image_ids, image_ids, loss_config, epoch, generator)
    return loss, scores


# ----------------------------------------------------------------------------------------------
# state that must survive a restart


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    version, internal, gauss = random.getstate()
    state["python"] = [version, list(internal), gauss]
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The generator of one step's sampled negatives: a function of (seed, epoch, step) only,
    so a resumed run draws the same negatives without saving any generator state."""
    generator = torch.Generator(device="cpu")  # the loss draws on the CPU: same on any device
    generator.manual_seed(int(np.random.SeedSequence([seed, epoch, step]).generate_state(1)[0]))
    return generator


def _write_history(run_dir: Path, rows: list[dict[str, Any]], run_id: str) -> None:
    """Rewrite history.parquet atomically (temp file + os.replace)."""
    table = pa.Table.from_pandas(history_frame(rows, run_id), schema=HISTORY_SCHEMA,
                                 preserve_index=False)
    final = run_dir / "history.parquet"
    tmp = run_dir / f".history.parquet.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, final)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# validation on the val split


@torch.no_grad()
def validate(model: SMLSTM, cache: FeatureCache, vocab: Vocabulary, device: torch.device,
             captions_per_image: int, split: str = "val") -> dict[str, float]:
    """Retrieval metrics (exact protocol, rsum included) of `model` on a split of the cache."""
    from smlstm.metrics import retrieval_metrics
    from smlstm.scoring import EvalGallery, score_matrix

    was_training = model.training
    model.eval()
    try:
        gallery = EvalGallery.from_cache(cache, split, captions_per_image=captions_per_image)
        scores = score_matrix(model, cache, gallery, vocab, device)
    finally:
        model.train(was_training)
    return retrieval_metrics(scores, gallery.owner)


# ----------------------------------------------------------------------------------------------
# the training loop


def train(
    config: TrainConfig | dict[str, Any], log: Callable[[str], None] = print
) -> TrainSummary:
    """Train (or resume) one run; see the module docstring. Returns what this process did."""
    env = DistEnv.from_env()
    prepared = prepare(config)  # every rank checks; only rank 0 writes
    config = prepared.config
    if config.batch_size % env.world_size:
        raise ConfigError(
            f"train config: batch_size: {config.batch_size} is not divisible by the "
            f"{env.world_size} DDP processes"
        )
    if not env.is_main:
        log = _silent

    if env.distributed:
        device = _ddp_device(config.device, env)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2)
        )
    else:
        device = pick_device(config.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _run(prepared, env, device, log)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        if env.distributed:
            dist.destroy_process_group()


def _silent(_: str) -> None:
    pass


def _ddp_device(requested: str, env: DistEnv) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"train config: device: {requested!r} requested but CUDA is unavailable")
    device = torch.device("cuda", env.local_rank)
    torch.cuda.set_device(device)
    return device


def _run(prepared: Prepared, env: DistEnv, device: torch.device,
         log: Callable[[str], None]) -> TrainSummary:
    config, cache, vocab = prepared.config, prepared.cache, prepared.vocab
    ckpt = prepared.checkpoint
    run_dir = Path(config.out)
    ckpt_dir = run_dir / "checkpoints"
    started = time.perf_counter()

    # ---- the model, optimizer and schedule (same seed on every rank -> same init)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = SMLSTM(prepared.model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_decay_epochs, gamma=0.1)

    epoch, batch_in_epoch, step = 0, 0, 0
    best_rsum, best_epoch = -math.inf, None
    history: list[dict[str, Any]] = []
    loss_sum, loss_count, elapsed_before = 0.0, 0, 0.0
    run_id = new_run_id()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        epoch, batch_in_epoch, step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
        best_rsum = ckpt["best_rsum"]
        best_epoch = ckpt.get("best_epoch")
        history = list(ckpt.get("history", []))
        loss_sum, loss_count = ckpt.get("epoch_loss_sum", 0.0), ckpt.get("epoch_loss_count", 0)
        elapsed_before = ckpt.get("seconds", 0.0)
        run_id = ckpt.get("run_id", run_id)
        _set_rng_state(ckpt["rng"], device)
        log(f"resuming {run_dir} at epoch {epoch + 1}, batch {batch_in_epoch}, step {step}")
    elif env.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "train_config.json", config.to_dict())
        vocab.save(run_dir / "vocab.json")
    if env.distributed:
        run_id = _broadcast_str(run_id)

    if env.distributed:
        find_unused = prepared.model_config.steps == 1  # H_a, H_w only act from step 2 on
        scorer: nn.Module = DistributedDataParallel(
            BatchScorer(model, distributed=True),
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused,
        )
    else:
        scorer = BatchScorer(model, distributed=False)

    # ---- data: every rank plans the same global batches and takes its slice
    dataset = TrainingSet(cache, "train", vocab, block_cache=config.window_shards)
    sampler = ShardBlockBatchSampler(
        dataset.rows, cache.shard_size, config.batch_size, window_shards=config.window_shards,
        seed=config.seed, rank=env.rank, world_size=env.world_size,
    )
    loader = DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=config.workers,
        persistent_workers=config.workers > 0, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
    )
    batches_per_epoch = len(sampler.global_batches(0))
    total_steps = sum(len(sampler.global_batches(e)) for e in range(config.epochs))
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    log(
        f"training {cache.path} -> {run_dir}: {len(dataset)} train captions, "
        f"{batches_per_epoch} batches of {config.batch_size} per epoch, {config.epochs} epochs, "
        f"{len(vocab)} words, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{device}{f' x {env.world_size} ranks' if env.distributed else ''}"
    )

    def checkpoint(name: str) -> None:
        if not env.is_main:
            return
        save_checkpoint({
            "format": FORMAT,
            "model": model.state_dict(),
            "model_config": prepared.model_config.model_dump(mode="json"),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(device),
            "epoch": epoch,
            "step": step,
            "batch_in_epoch": batch_in_epoch,
            "best_rsum": best_rsum,
            "best_epoch": best_epoch,
            "history": history,
            "epoch_loss_sum": loss_sum,
            "epoch_loss_count": loss_count,
            "seconds": elapsed_before + time.perf_counter() - started,
            "run_id": run_id,
            "train_config": config.to_dict(),
            "vocab": vocab_record(vocab),
            "cache_identity": _plain(cache.identity),
        }, ckpt_dir / f"{name}.pt")

    summary = TrainSummary(run_dir=str(run_dir), run_id=run_id, epochs_completed=epoch, steps=step)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    window_start, window_step = time.perf_counter(), step
    stopped = config.max_steps is not None and step >= config.max_steps  # resumed past it
    while epoch < config.epochs and not stopped:
        sampler.set_epoch(epoch)
        sampler.skip_batches(batch_in_epoch)
        for batch in loader:
            with autocast:
                loss, scores = batch_loss(scorer, batch, device, env.distributed, config.loss,
                                          epoch, _step_generator(config.seed, epoch, step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()

            step += 1
            batch_in_epoch += 1
            value = float(loss.detach())
            loss_sum, loss_count = loss_sum + value, loss_count + 1
            summary.losses.append(value)
            if step % LOG_EVERY_STEPS == 0 or step == 1:
                now = time.perf_counter()
                per_step = (now - window_start) / max(1, step - window_step)
                pairs = scores.shape[0] * scores.shape[1]
                log(f"epoch {epoch + 1} step {step}/{total_steps} loss {value:.4f} "
                    f"{pairs / per_step:,.0f} pairs/s ETA {_eta(per_step * (total_steps - step))}")
                window_start, window_step = now, step
            if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
                checkpoint("latest")
            if config.max_steps is not None and step >= config.max_steps:
                stopped = True
                break

        if batch_in_epoch < len(sampler.global_batches(epoch)):  # stopped inside the epoch
            checkpoint("latest")
            break

        # ---- the epoch is done
        scheduler.step()
        mean_loss = loss_sum / max(1, loss_count)
        metrics, improved = None, False
        if (epoch + 1) % config.val_every_epochs == 0 or epoch + 1 == config.epochs:
            if env.is_main:
                metrics = validate(model, cache, vocab, device, config.captions_per_image)
            row = {
                "epoch": epoch + 1, "step": step, "loss": mean_loss,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": elapsed_before + time.perf_counter() - started,
            }
            if metrics is not None:
                row.update({k: metrics[k] for k in HISTORY_SCHEMA.names if k in metrics})
                history.append(row)
                if metrics["rsum"] > best_rsum:
                    best_rsum, best_epoch, improved = metrics["rsum"], epoch + 1, True
                log(f"epoch {epoch + 1} done: loss {mean_loss:.4f} val rsum "
                    f"{metrics['rsum']:.1f} (best {best_rsum:.1f} at epoch {best_epoch})")
        epoch += 1
        batch_in_epoch, loss_sum, loss_count = 0, 0.0, 0
        if env.is_main and metrics is not None:
            if improved:
                checkpoint("best")
            _write_history(run_dir, history, run_id)
        checkpoint("latest")
        if env.distributed:
            dist.barrier()  # the other ranks wait while rank 0 validates and writes

    summary.epochs_completed = epoch
    summary.steps = step
    summary.history = history
    summary.best_rsum = None if best_epoch is None else best_rsum
    summary.best_epoch = best_epoch
    summary.stopped_at_max_steps = stopped and epoch < config.epochs
    summary.seconds = time.perf_counter() - started
    return summary


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _pad_to_global_length(tokens: torch.Tensor) -> torch.Tensor:
    """Pad this rank's (b, L_local) tokens to the longest caption of the global batch, so the
    caption codes of all ranks have the same shape (exactly what one process would pad to)."""
    width = torch.tensor([tokens.shape[1]], device=tokens.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    extra = int(width) - tokens.shape[1]
    return nn.functional.pad(tokens, (0, extra)) if extra else tokens


def _broadcast_str(value: str) -> str:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------
# python -m smlstm.train --config FILE  (what torchrun runs)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: train from a TrainConfig JSON file; one-line errors, exit 2."""
    parser = argparse.ArgumentParser(prog="python -m smlstm.train",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="TrainConfig as JSON")
    parser.add_argument("--resume", action="store_true", help="continue checkpoints/latest.pt")
    args = parser.parse_args(argv)
    try:
        config = _load_config_file(args.config)
        if args.resume:
            config = config.model_copy(update={"resume": True})
        summary = train(config, log=lambda line: print(line, flush=True))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if DistEnv.from_env().is_main:
        best = "none" if summary.best_rsum is None else f"{summary.best_rsum:.1f}"
        print(f"done: {summary.steps} steps, {summary.epochs_completed} epochs, best rsum {best}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
