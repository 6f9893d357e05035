"""The `smlstm` console script. Each area registers its commands from smlstm/commands/."""

from __future__ import annotations

import typer

from smlstm.commands import data, evaluate, extract, train

app = typer.Typer(
    help="sm-LSTM image-sentence matching: synthetic data, feature extraction, training, evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for area in (data, extract, train, evaluate):
    area.register(app)


if __name__ == "__main__":
    app()
