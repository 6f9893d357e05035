"""CLI commands of stage 3: `smlstm evaluate`, `smlstm ensemble`, `smlstm report`, `smlstm search`.

Only argument parsing here; the work is in smlstm.evaluate and smlstm.search (imported when a
command runs, so `smlstm --help` does not load torch). A user mistake prints one line
`error: ...` on stderr and exits 2.
"""

from __future__ import annotations

import typer

from features.errors import InputError


def _fail(err: InputError) -> typer.Exit:
    """User mistakes print one line on stderr and exit 2, without a traceback."""
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(2)


def evaluate_command(
    checkpoint: str = typer.Option(..., "--checkpoint", help="Checkpoint file (.pt)."),
    cache: str = typer.Option(..., "--cache", help="The feature cache it was trained on."),
    out: str = typer.Option(..., "--out", help="Reports directory (shared by runs)."),
    split: str = typer.Option("test", "--split", help="Split to evaluate."),
    protocol: str = typer.Option("1k", "--protocol", help="1k | 5k | coco-1k."),
    captions_per_image: int = typer.Option(5, "--captions-per-image",
                                           help="First K captions of each image."),
    figures: int = typer.Option(3, "--figures", help="Attention figures of sample queries."),
    block_budget_mb: float = typer.Option(256.0, "--block-budget-mb",
                                          help="Memory of one scoring block (MB)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    run_id: str | None = typer.Option(None, "--run-id", help="Default: a new timestamped id."),
) -> None:
    """Score a checkpoint on a split and write scores, ranks, history and metrics reports."""
    from smlstm.evaluate import evaluate

    try:
        result = evaluate(
            {"checkpoint": checkpoint, "cache": cache, "out": out, "split": split,
             "protocol": protocol, "captions_per_image": captions_per_image,
             "figures": figures, "block_budget_mb": block_budget_mb, "device": device,
             "run_id": run_id},
            log=typer.echo,
        )
    except InputError as err:
        raise _fail(err) from None
    typer.echo(f"run {result.run_id}: rsum {result.rsum:.1f}; metrics {result.metrics_path}")


def ensemble_command(
    more_scores: list[str] | None = typer.Argument(None, help="More score files.",
                                                   show_default=False),
    scores: list[str] | None = typer.Option(None, "--scores",
                                            help="Score files (.zarr) to average, 2 or more."),
    out: str = typer.Option(..., "--out", help="Reports directory."),
    protocol: str | None = typer.Option(None, "--protocol", help="Default: the first file's."),
    run_id: str | None = typer.Option(None, "--run-id", help="Default: a new timestamped id."),
) -> None:
    """Average several models' score matrices on the same gallery (sm-LSTM*) and report it.

    `--scores A.zarr B.zarr` and `--scores A.zarr --scores B.zarr` both work.
    """
    from smlstm.evaluate import ensemble

    try:
        result = ensemble([*(scores or []), *(more_scores or [])], out, run_id=run_id, protocol=protocol, log=typer.echo)
    except InputError as err:
        raise _fail(err) from None
    typer.echo(f"run {result.run_id}: rsum {result.rsum:.1f}; metrics {result.metrics_path}")


def report_command(
    reports_dir: str = typer.Argument(..., help="Reports directory (the --out of evaluate)."),
    run_id: str | None = typer.Option(None, "--run-id", help="Default: the newest run."),
    html: str | None = typer.Option(None, "--html", help="Summary page path (.html)."),
) -> None:
    """Print a run's metrics table and write its one-page HTML/PNG summary."""
    from smlstm.evaluate import report

    try:
        text, html_path, png_path = report(reports_dir, run_id=run_id, html=html)
    except InputError as err:
        raise _fail(err) from None
    typer.echo(text)
    typer.echo(f"\nsummary: {html_path} ({png_path.name})")


def search_command(
    run: str = typer.Option(..., "--run", help="Run directory or checkpoint file."),
    cache: str = typer.Option(..., "--cache", help="The feature cache it was trained on."),
    split: str = typer.Option("test", "--split", help="Gallery split."),
    text: str | None = typer.Option(None, "--text", help="A sentence: retrieve images."),
    image: str | None = typer.Option(None, "--image", help="An image file: retrieve captions."),
    k: int = typer.Option(10, "--k", help="How many results."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    weights_file: str | None = typer.Option(
        None, "--weights-file", help="VGG-19 weights for --image (default: the cache's)."),
) -> None:
    """Retrieve the split's images for a sentence, or its captions for a new image."""
    from smlstm.search import format_results, search

    try:
        result = search(run, cache, split=split, text=text, image=image, k=k, device=device,
                        weights_file=weights_file)
    except InputError as err:
        raise _fail(err) from None
    typer.echo(format_results(result))


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `smlstm` app."""
    app.command("evaluate")(evaluate_command)
    app.command("ensemble")(ensemble_command)
    app.command("report")(report_command)
    app.command("search")(search_command)
