"""CLI commands of this area. Keep logic in the library; here only argument parsing."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `smlstm` app."""
