"""Prefect flow `train-smlstm`: stage 2, in this process or as a torchrun DDP job.

The flow is thin: `smlstm.train` does the work and also runs without Prefect (`smlstm train`,
`python -m smlstm.train`). The flow validates the config, the cache and (on resume) the
checkpoint in its own process first, so a bad parameter fails the run with the one-line
message before anything is written. Then:
- one process (the default, or gpus=1): `train()` runs here, logging through Prefect;
- gpus > 1 (or env SMLSTM_TRAIN_NPROC=N > 1): the resolved config is written to
  `<out>/train_config.json` and `torchrun --standalone --nproc_per_node N -m smlstm.train
  --config <out>/train_config.json` runs as a subprocess; its output streams into the flow
  log and a non-zero exit fails the flow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger

from features.errors import ConfigError, InputError
from smlstm.checkpoint import load_checkpoint
from smlstm.train import TrainConfig, prepare, train

__all__ = ["train_smlstm"]

_DEFAULTS = {name: info.get_default(call_default_factory=True)
             for name, info in TrainConfig.model_fields.items()}


def _nproc(gpus: int) -> int:
    if gpus > 1:
        return gpus
    value = os.environ.get("SMLSTM_TRAIN_NPROC", "").strip()
    if not value:
        return 1
    try:
        return max(1, int(value))
    except ValueError:
        raise ConfigError(f"SMLSTM_TRAIN_NPROC: expected an integer, got {value!r}") from None


def _torchrun(config: TrainConfig, nproc: int, logger) -> None:
    """Run the DDP job as a subprocess, streaming its lines into the flow log."""
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "train_config.json"
    config_file.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "smlstm.train", "--config", str(config_file),
    ]
    logger.info("launching %s", " ".join(command))
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            tail.append(line)
            logger.info("%s", line)
        code = process.wait()
    if code != 0:
        errors = [line for line in tail if line.startswith("error: ")]
        reason = errors[-1] if errors else (tail[-1] if tail else "no output")
        raise RuntimeError(f"torchrun exited with status {code}: {reason}")


@flow(name="train-smlstm")
def train_smlstm(
    cache: str,
    out: str,
    preset: Literal["paper", "small"] = _DEFAULTS["preset"],
    model: dict[str, Any] | None = None,
    loss: dict[str, Any] | None = None,
    epochs: int = _DEFAULTS["epochs"],
    lr: float = _DEFAULTS["lr"],
    lr_decay_epochs: int = _DEFAULTS["lr_decay_epochs"],
    batch_size: int = _DEFAULTS["batch_size"],
    grad_clip: float = _DEFAULTS["grad_clip"],
    seed: int = _DEFAULTS["seed"],
    workers: int = _DEFAULTS["workers"],
    window_shards: int = _DEFAULTS["window_shards"],
    device: str = _DEFAULTS["device"],
    min_count: int = _DEFAULTS["min_count"],
    captions_per_image: int = _DEFAULTS["captions_per_image"],
    val_every_epochs: int = _DEFAULTS["val_every_epochs"],
    checkpoint_every_steps: int = _DEFAULTS["checkpoint_every_steps"],
    max_steps: int | None = None,
    expected_weights_sha256: str | None = None,
    resume: bool = False,
    gpus: int = 0,
) -> dict[str, Any]:
    """Train sm-LSTM from a feature cache into the run directory `out` (resumable).

    `model` overrides ModelConfig fields of the preset (e.g. {"attention": "plain"}), `loss`
    sets LossConfig fields. `gpus` > 1 runs a DDP job of that many processes (torchrun).
    Returns {"run_dir", "steps", "epochs_completed", "best_rsum", "best_epoch", "processes"}.
    """
    logger = get_run_logger()
    fields = {name: value for name, value in locals().items() if name in TrainConfig.model_fields}
    fields["model"] = model or {}
    fields["loss"] = loss or {}
    try:
        prepared = prepare(fields)  # config, cache, checkpoint: all checked, nothing written
        nproc = _nproc(gpus)
    except InputError as err:
        logger.error("error: %s", err)
        raise
    config = prepared.config

    if nproc > 1:
        _torchrun(config, nproc, logger)
        latest = load_checkpoint(Path(config.out) / "checkpoints" / "latest.pt")
        history = latest.get("history", [])
        best = max(history, key=lambda row: row["rsum"]) if history else None
        return {
            "run_dir": config.out,
            "steps": latest["step"],
            "epochs_completed": latest["epoch"],
            "best_rsum": None if best is None else best["rsum"],
            "best_epoch": None if best is None else best["epoch"],
            "processes": nproc,
        }

    summary = train(config, log=logger.info)
    return {
        "run_dir": summary.run_dir,
        "steps": summary.steps,
        "epochs_completed": summary.epochs_completed,
        "best_rsum": summary.best_rsum,
        "best_epoch": summary.best_epoch,
        "processes": 1,
    }
