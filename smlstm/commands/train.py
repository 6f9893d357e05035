"""CLI command of stage 2: `smlstm train`. No Prefect here; the work is in smlstm.train.

Flags override the fields of an optional `--config` JSON file (a TrainConfig); choices are
plain strings checked by the config, so a bad value gives the same one-line `error: ...`
(exit 2) as every other input problem, and nothing is written.
"""

from __future__ import annotations

from typing import Any

import typer

from features.config import read_config_json
from features.errors import InputError


def _fail(err: InputError) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(2)



def train(
    cache: str | None = typer.Option(None, help="Feature cache directory (stage 1 output)."),
    out: str | None = typer.Option(None, help="Run directory (checkpoints, history)."),
    preset: str | None = typer.Option(None, help="paper | small (default paper)."),
    attention: str | None = typer.Option(None, help="context | plain | mean."),
    fusion: str | None = typer.Option(None, help="concat | product."),
    epochs: int | None = typer.Option(None, help="Epochs (default 30)."),
    batch_size: int | None = typer.Option(None, help="Global batch size (default 128)."),
    lr: float | None = typer.Option(None, help="Adam learning rate (default 2e-4)."),
    loss: str | None = typer.Option(None, help="sum | max_violation."),
    warmup_epochs: int | None = typer.Option(None, help="Epochs of 'sum' before --loss."),
    negatives: int | None = typer.Option(None, help="K sampled negatives (default: all)."),
    max_steps: int | None = typer.Option(None, help="Stop after this many steps."),
    workers: int | None = typer.Option(None, help="DataLoader processes (default 2)."),
    seed: int | None = typer.Option(None, help="Seed (init, batch order)."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda[:N]."),
    resume: bool = typer.Option(False, "--resume", help="Continue checkpoints/latest.pt."),
    config: str | None = typer.Option(None, "--config", help="TrainConfig JSON; flags override."),
) -> None:
    """Train sm-LSTM from a feature cache (rerun with --resume to continue)."""
    from smlstm.train import train as run_training  # torch loads only when the command runs

    try:
        fields: dict[str, Any] = read_config_json(config) if config else {}
        flags = {"cache": cache, "out": out, "preset": preset, "epochs": epochs,
                 "batch_size": batch_size, "lr": lr, "max_steps": max_steps,
                 "workers": workers, "seed": seed, "device": device}
        fields.update({name: value for name, value in flags.items() if value is not None})
        model = dict(fields.get("model") or {})
        model.update({k: v for k, v in {"attention": attention, "fusion": fusion}.items()
                      if v is not None})
        loss_fields = dict(fields.get("loss") or {})
        loss_fields.update({k: v for k, v in {"mode": loss, "warmup_epochs": warmup_epochs,
                                              "negatives": negatives}.items() if v is not None})
        fields["model"], fields["loss"] = model, loss_fields
        if resume:
            fields["resume"] = True
        summary = run_training(fields, log=typer.echo)
    except InputError as err:
        raise _fail(err) from None
    best = "none" if summary.best_rsum is None else f"{summary.best_rsum:.1f}"
    typer.echo(f"done: {summary.run_dir}: {summary.steps} steps, "
               f"{summary.epochs_completed} epochs, best val rsum {best}")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `smlstm` app."""
    app.command("train")(train)
