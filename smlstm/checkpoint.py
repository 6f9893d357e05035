"""Training checkpoints: one plain dict per file, written atomically, read without unpickling.

The dict (docs/ARCHITECTURE.md, "Training run directory and checkpoint") holds only tensors,
dicts, lists, str, int, float, bool and None, so `torch.load(..., weights_only=True)` reads it
and a file carrying any other pickled object is refused instead of executed.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from features.errors import CheckpointError
from smlstm.model import SMLSTM, ModelConfig
from smlstm.text import Vocabulary

__all__ = [
    "FORMAT",
    "REQUIRED_KEYS",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
    "vocab_record",
]

FORMAT = "smlstm-checkpoint/1"
REQUIRED_KEYS = ("model", "model_config", "vocab", "epoch", "step")


def vocab_record(vocab: Vocabulary) -> dict[str, Any]:
    """The checkpoint's "vocab" entry: the id -> word table, min_count and fingerprint."""
    return {"tokens": list(vocab.words), "min_count": vocab.min_count,
            "fingerprint": vocab.fingerprint}


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """Write `obj` to `path` atomically: a temp file in the same directory, fsync, os.replace.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        # A full disk or a file-size limit: torch reports it as a RuntimeError from its zip
        # writer ("unexpected pos"), the OS as ENOSPC/EFBIG. The previous checkpoint is intact.
        free = shutil.disk_usage(path.parent).free  # before the temp file gives its space back
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(err, "strerror", None) or "the write failed"
        raise CheckpointError(
            f"{path}: cannot write the checkpoint ({reason}; {free // 1024} KiB free on its "
            "disk); the previous one is intact: free space and rerun with --resume"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # fsync the directory too, so the rename itself survives a power cut
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; CheckpointError (one line naming the file) on any failure:
    missing, truncated, containing pickled objects, or not an smlstm checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused: not a plain weights-only checkpoint ({first[:200]})"
        ) from None
    except Exception as err:  # truncated zip, not a torch file, ...
        reason = f"{type(err).__name__}: {err}"
        raise CheckpointError(f"{path}: cannot read checkpoint: {reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: format: expected {FORMAT!r}, got {found!r}")
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: {missing[0]}: missing from the checkpoint")
    return ckpt


def model_from_checkpoint(
    ckpt: dict[str, Any], device: str | torch.device = "cpu", *, source: str = "checkpoint"
) -> tuple[SMLSTM, Vocabulary]:
    """Rebuild the model (eval mode, on `device`) and its vocabulary from a loaded checkpoint.

    Checks that the vocabulary matches its recorded fingerprint and the model's vocab_size, so
    a checkpoint can never be paired with the wrong word ids. `source` names the file in errors.
    """
    record = ckpt.get("vocab")
    if not isinstance(record, dict) or not isinstance(record.get("tokens"), list):
        raise CheckpointError(f"{source}: vocab.tokens: expected a list of words")
    try:
        vocab = Vocabulary(record["tokens"], min_count=int(record.get("min_count", 1)))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{source}: vocab.tokens: {err}") from None
    if vocab.fingerprint != record.get("fingerprint"):
        raise CheckpointError(
            f"{source}: vocab.fingerprint: {str(record.get('fingerprint'))[:12]} does not match "
            f"the stored words ({vocab.fingerprint[:12]})"
        )
    try:
        config = ModelConfig(**ckpt["model_config"])
    except Exception as err:  # pydantic ValidationError, TypeError on a non-dict
        message = str(err).splitlines()[0]
        raise CheckpointError(f"{source}: model_config: {message}") from None
    if config.vocab_size != len(vocab):
        raise CheckpointError(
            f"{source}: model_config.vocab_size: {config.vocab_size} != {len(vocab)} words "
            "in the checkpoint's vocabulary"
        )
    model = SMLSTM(config)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{source}: model: {' '.join(str(err).split())[:300]}") from None
    return model.to(device).eval(), vocab
