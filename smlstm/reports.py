"""Evaluation and training reports as partitioned Parquet datasets, plus a terminal table and a
one-page HTML/PNG summary.

Layout of a report directory (hive-style, one file per run):

    <directory>/run_id=<run_id>/part-0.parquet

The run_id lives in the directory name, not in the file, so `pandas.read_parquet(directory)`,
`pyarrow.dataset` and DuckDB (`read_parquet('<dir>/*/*.parquet', hive_partitioning=true)`) read all
runs as one table with a run_id column. Files are written to a hidden temp file in the same
directory, fsynced, then hard-linked into place: concurrent evaluations never overwrite each other
and a killed writer leaves only a hidden `.tmp` file, which every reader skips.
The schemas are documented in docs/reports.md.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import importlib.metadata
import io
import json
import os
import re
import secrets
import subprocess
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from features.errors import ConfigError
from smlstm.metrics import DEFAULT_CHUNK, i2t_ranks, t2i_ranks, top_k_rows

SCHEMA_VERSION = "1"
PART_NAME = "part-0.parquet"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # safe as a path segment and hive value


def _schema(name: str, fields: list[tuple[str, pa.DataType]]) -> pa.Schema:
    """A schema tagged with its table name and version (kept in every file's metadata)."""
    return pa.schema(fields).with_metadata(
        {"smlstm.table": name, "smlstm.schema_version": SCHEMA_VERSION}
    )


_F64 = pa.float64()
METRICS_SCHEMA = _schema(
    "metrics",
    [
        ("run_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("protocol", pa.string()),
        ("fold", pa.string()),  # "all", "mean" or "0".."4"
        ("direction", pa.string()),  # "i2t", "t2i" or "both" (rsum only)
        ("r1", _F64),
        ("r5", _F64),
        ("r10", _F64),
        ("medr", _F64),
        ("meanr", _F64),
        ("rsum", _F64),
        ("checkpoint", pa.string()),
        ("cache_id", pa.string()),
        ("config_hash", pa.string()),
        ("code_version", pa.string()),
    ],
)
RANKS_SCHEMA = _schema(
    "ranks",
    [
        ("run_id", pa.string()),
        ("query_id", pa.int64()),
        ("direction", pa.string()),
        ("gt_rank", pa.int64()),
        ("top10_ids", pa.list_(pa.int64())),
        ("top10_scores", pa.list_(pa.float32())),
    ],
)
HISTORY_SCHEMA = _schema(
    "history",
    [
        ("run_id", pa.string()),
        ("epoch", pa.int64()),
        ("step", pa.int64()),
        ("loss", _F64),
        ("lr", _F64),
        ("i2t_r1", _F64),
        ("i2t_r5", _F64),
        ("i2t_r10", _F64),
        ("t2i_r1", _F64),
        ("t2i_r5", _F64),
        ("t2i_r10", _F64),
        ("rsum", _F64),
        ("seconds", _F64),
    ],
)
SCHEMAS = {"metrics": METRICS_SCHEMA, "ranks": RANKS_SCHEMA, "history": HISTORY_SCHEMA}


# ---------------------------------------------------------------------------------------------
# identity of a run


def new_run_id() -> str:
    """A sortable, unique run id: UTC timestamp to the microsecond + a random suffix."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(3)}"


def _json_default(value: Any) -> Any:
    """JSON encoding for the non-JSON values configs tend to hold."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    raise TypeError(f"config_hash: cannot encode {type(value).__name__} as JSON")


def config_hash(config: Mapping[str, Any] | BaseModel) -> str:
    """First 16 hex digits of the sha256 of the config's canonical JSON (sorted keys, no spaces)."""
    if isinstance(config, BaseModel):
        config = config.model_dump(mode="json")
    text = json.dumps(
        config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.cache
def code_version() -> str:
    """Package version plus `+g<short sha>` when a git checkout is found; never fails."""
    try:
        version = importlib.metadata.version("smlstm")
    except Exception:  # not installed (e.g. run from a plain checkout)
        version = "unknown"
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        sha = result.stdout.strip()
        if result.returncode == 0 and sha:
            version += f"+g{sha}"
    except Exception:  # no git, no repo, no commits: the version alone will do
        pass
    return version


class RunMeta(BaseModel):
    """What identifies an evaluation run in every row of its metrics table."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    dataset: str
    split: str
    protocol: str | None = None  # rows from metrics.evaluate carry their own protocol
    checkpoint: str | None = None
    cache_id: str | None = None
    config_hash: str | None = None
    code_version: str = Field(default_factory=code_version)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def _validate_meta(run_meta: Mapping[str, Any] | RunMeta) -> RunMeta:
    if isinstance(run_meta, RunMeta):
        return run_meta
    try:
        return RunMeta.model_validate(dict(run_meta))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"run_meta: {where}: {first['msg']}") from None


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ValueError(
            f"run_id: expected letters, digits, '.', '_' or '-' (not starting with '.'), got {run_id!r}"
        )


# ---------------------------------------------------------------------------------------------
# frames


def metrics_frame(
    rows: Iterable[Mapping[str, Any]], run_meta: Mapping[str, Any] | RunMeta
) -> pd.DataFrame:
    """Rows from `metrics.evaluate` + the run's identity -> a DataFrame in METRICS_SCHEMA order."""
    meta = _validate_meta(run_meta)
    _check_run_id(meta.run_id)
    created = meta.created_at
    created = created.replace(tzinfo=UTC) if created.tzinfo is None else created.astimezone(UTC)
    records = []
    for i, row in enumerate(rows):
        protocol = row.get("protocol") or meta.protocol
        if protocol is None:
            raise ValueError(
                f"metrics rows[{i}].protocol: missing (give it in the row or in run_meta)"
            )
        missing = {"fold", "direction"} - set(row)
        if missing:
            raise ValueError(f"metrics rows[{i}]: missing {', '.join(sorted(missing))}")
        records.append(
            {
                "run_id": meta.run_id,
                "created_at": created,
                "dataset": meta.dataset,
                "split": meta.split,
                "protocol": protocol,
                "fold": str(row["fold"]),
                "direction": row["direction"],
                **{key: row.get(key) for key in ("r1", "r5", "r10", "medr", "meanr", "rsum")},
                "checkpoint": meta.checkpoint,
                "cache_id": meta.cache_id,
                "config_hash": meta.config_hash,
                "code_version": meta.code_version,
            }
        )
    return _conform(
        pd.DataFrame.from_records(records, columns=METRICS_SCHEMA.names), METRICS_SCHEMA
    )


def ranks_frame(
    S: np.ndarray,
    owner: np.ndarray,
    run_id: str,
    image_ids: np.ndarray | None = None,
    caption_ids: np.ndarray | None = None,
    k: int = 10,
    chunk: int = DEFAULT_CHUNK,
) -> pd.DataFrame:
    """Per-query ranks table: one row per image (i2t) and per caption (t2i).

    query_id is the image id (i2t) or caption id (t2i); default ids are positions in S.
    top10_ids hold the ids of the k best candidates (caption ids for i2t, image ids for t2i),
    best first, ties by lower position, the same rule as the ranks.
    """
    _check_run_id(run_id)
    S = np.asarray(S)
    n_images, n_captions = S.shape
    image_ids = np.arange(n_images) if image_ids is None else np.asarray(image_ids, dtype=np.int64)
    caption_ids = (
        np.arange(n_captions) if caption_ids is None else np.asarray(caption_ids, dtype=np.int64)
    )
    if image_ids.shape != (n_images,) or caption_ids.shape != (n_captions,):
        raise ValueError(
            f"ranks_frame: expected {n_images} image ids and {n_captions} caption ids, "
            f"got {image_ids.shape} and {caption_ids.shape}"
        )

    parts = []
    for direction, ranks, n_queries, query_ids, candidate_ids in (
        ("i2t", i2t_ranks(S, owner, chunk), n_images, image_ids, caption_ids),
        ("t2i", t2i_ranks(S, owner, chunk), n_captions, caption_ids, image_ids),
    ):
        ids, scores = [], []
        for start in range(0, n_queries, chunk):
            block = (
                S[start : start + chunk] if direction == "i2t" else S[:, start : start + chunk].T
            )
            top, top_scores = top_k_rows(block, k)
            ids += list(candidate_ids[top])
            scores += list(top_scores.astype(np.float32))
        parts.append(
            pd.DataFrame(
                {
                    "run_id": run_id,
                    "query_id": query_ids,
                    "direction": direction,
                    "gt_rank": ranks,
                    "top10_ids": ids,
                    "top10_scores": scores,
                }
            )
        )
    return _conform(pd.concat(parts, ignore_index=True), RANKS_SCHEMA)


def history_frame(rows: Iterable[Mapping[str, Any]], run_id: str) -> pd.DataFrame:
    """Training history rows (one per evaluation/epoch) -> a DataFrame in HISTORY_SCHEMA order.

    Missing metric keys become nulls; unknown keys are an error (they would be dropped silently).
    """
    _check_run_id(run_id)
    records = []
    allowed = set(HISTORY_SCHEMA.names) - {"run_id"}
    for i, row in enumerate(rows):
        unknown = set(row) - allowed
        if unknown:
            raise ValueError(f"history rows[{i}]: unknown keys {', '.join(sorted(unknown))}")
        records.append({"run_id": run_id, **row})
    return _conform(
        pd.DataFrame.from_records(records, columns=HISTORY_SCHEMA.names), HISTORY_SCHEMA
    )


def _to_arrow(df: pd.DataFrame, schema: pa.Schema, what: str) -> pa.Table:
    """Convert column by column so a bad value is reported with its column name."""
    missing = [name for name in schema.names if name not in df.columns]
    extra = [name for name in df.columns if name not in schema.names]
    if missing or extra:
        raise ValueError(
            f"{what}: columns differ from the schema (missing {missing}, unexpected {extra})"
        )
    arrays = []
    for field in schema:
        try:
            arrays.append(pa.array(df[field.name], type=field.type, from_pandas=True))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as err:
            message = " ".join(str(err).split())
            raise ValueError(
                f"{what}: column {field.name}: expected {field.type}: {message}"
            ) from None
        if not field.nullable and arrays[-1].null_count:
            raise ValueError(f"{what}: column {field.name}: contains nulls")
    return pa.Table.from_arrays(arrays, schema=schema)


def _conform(df: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    """Round-trip through Arrow so dtypes are exactly what a reader of the file will get."""
    name = schema.metadata.get(b"smlstm.table", b"table").decode()
    return _to_arrow(df, schema, name).to_pandas()


# ---------------------------------------------------------------------------------------------
# writing and reading


def fsync_dir(directory: Path) -> None:
    """Make a rename/link durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(final: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write via `write(file)` to a hidden temp file beside `final`, fsynced; return its path.

    The name is `.<final name>.<random>.tmp`: hidden (every reader skips dot files) and unique,
    so two writers aiming at the same file never share a temp file.
    """
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _atomic_replace(final: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Atomically create or replace `final` (for figures and pages, which may be regenerated)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(final, write)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def _schema_for(df: pd.DataFrame) -> pa.Schema | None:
    """The known schema whose columns are exactly df's (run_id optional), if any."""
    columns = set(df.columns) | {"run_id"}
    for schema in SCHEMAS.values():
        if set(schema.names) == columns:
            return schema
    return None


def write_table(
    df: pd.DataFrame, directory: str | os.PathLike, run_id: str, schema: pa.Schema | None = None
) -> Path:
    """Write one run's table to `<directory>/run_id=<run_id>/part-0.parquet`; return the path.

    `schema` defaults to the known schema (metrics, ranks, history) matching df's columns, else
    pyarrow's inference. A run_id column, if present, must equal `run_id`; it is stored in the
    directory name only. Refuses (FileExistsError) to overwrite an existing run's file, also
    against a concurrent writer of the same run: the file is linked into place, which fails if
    the name exists, where `os.replace` would silently win.
    """
    _check_run_id(run_id)
    if "run_id" in df.columns:
        others = set(df["run_id"].dropna().astype(str)) - {run_id}
        if others:
            raise ValueError(
                f"write_table: run_id column holds {sorted(others)[:3]}, not {run_id!r}"
            )
        df = df.drop(columns="run_id")
    schema = schema if schema is not None else _schema_for(df)
    if schema is None:
        table = pa.Table.from_pandas(df, preserve_index=False)
    else:
        file_schema = (
            schema.remove(schema.get_field_index("run_id")) if "run_id" in schema.names else schema
        )
        table = _to_arrow(df, file_schema, f"write_table {run_id}")

    run_dir = Path(directory) / f"run_id={run_id}"
    final = run_dir / PART_NAME
    if final.exists():
        raise FileExistsError(f"{final}: run {run_id} already has a report here; use a new run id")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(final, lambda f: pq.write_table(table, f))
    try:
        try:
            os.link(tmp, final)  # atomic and never overwrites
        except FileExistsError:
            raise FileExistsError(
                f"{final}: run {run_id} already has a report here; use a new run id"
            ) from None
        except OSError:
            # Filesystems without hard links: a checked replace (the race window is tiny).
            if final.exists():
                raise FileExistsError(f"{final}: run {run_id} already has a report here") from None
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(run_dir)
    return final


def write_parquet(
    df: pd.DataFrame, path: str | os.PathLike, schema: pa.Schema | None = None
) -> Path:
    """Write (or atomically replace) one standalone Parquet file, all columns kept.

    For files that are rewritten in place, such as a training run's history.parquet
    (HISTORY_SCHEMA): readers see the old or the new file, never a partial one.
    """
    schema = schema if schema is not None else _schema_for(df)
    if schema is None:
        table = pa.Table.from_pandas(df, preserve_index=False)
    else:
        table = _to_arrow(df, schema, str(path))
    return _atomic_replace(Path(path), lambda f: pq.write_table(table, f))


def run_files(directory: str | os.PathLike) -> list[Path]:
    """The finished run files of a report directory, sorted by run id (temp files excluded)."""
    # Only the final names: hidden temp files (".part-0.parquet.*.tmp") never match.
    return sorted(Path(directory).glob(f"run_id=*/{PART_NAME}"))


def read_table(directory: str | os.PathLike) -> pd.DataFrame:
    """All runs of a report directory as one DataFrame, run_id first; hidden/temp files skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such report directory")
    files = run_files(directory)
    if not files:
        return pd.DataFrame()
    # Unify the file schemas so a column added in a later version reads as null in older runs.
    schema = pa.unify_schemas([pq.read_schema(path) for path in files])
    partitioning = ds.partitioning(pa.schema([("run_id", pa.string())]), flavor="hive")
    dataset = ds.dataset(
        [str(p) for p in files],
        schema=schema.append(pa.field("run_id", pa.string())),
        format="parquet",
        partitioning=partitioning,
        partition_base_dir=str(directory),
    )
    df = dataset.to_table().to_pandas()
    return df[["run_id", *[c for c in df.columns if c != "run_id"]]]


# ---------------------------------------------------------------------------------------------
# terminal table and summary page

_SUMMARY_FOLDS = ("all", "mean")


def _summary_rows(df: pd.DataFrame, all_folds: bool = False) -> pd.DataFrame:
    return df if all_folds else df[df["fold"].astype(str).isin(_SUMMARY_FOLDS)]


def print_metrics(df: pd.DataFrame, all_folds: bool = False) -> str:
    """A fixed-width table per (run, protocol, fold): rows i2t/t2i x R@1/5/10/medr/meanr, rsum.

    Only the summary folds ("all", "mean") unless `all_folds`. Returns the text (the caller
    prints it) so the CLI, flows and logs show the same thing.
    """
    df = _summary_rows(df, all_folds)
    blocks = []
    group_keys = [
        key for key in ("run_id", "dataset", "split", "protocol", "fold") if key in df.columns
    ]
    for keys, group in df.groupby(group_keys, sort=False, dropna=False):
        title = "  ".join(f"{k}={v}" for k, v in zip(group_keys, keys, strict=True))
        lines = [title, f"{'':<10}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medr':>8}{'meanr':>8}"]
        for direction in ("i2t", "t2i"):
            for _, row in group[group["direction"] == direction].iterrows():
                values = "".join(
                    f"{row[key]:>8.1f}" for key in ("r1", "r5", "r10", "medr", "meanr")
                )
                lines.append(f"{direction:<10}{values}")
        for _, row in group[group["direction"] == "both"].iterrows():
            lines.append(f"{'rsum':<10}{row['rsum']:>8.1f}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


FIGURE_SIZE_PX = (900, 450)
_DPI = 100


def _figure_png(df: pd.DataFrame) -> bytes:
    """Grouped bars of R@1/5/10 per direction, one panel per (protocol, fold) summary."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display, no pyplot
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIGURE_SIZE_PX[0] / _DPI, FIGURE_SIZE_PX[1] / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    groups = list(df.groupby(["protocol", "fold"], sort=False)) or [(("-", "-"), df)]
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    ks = ["r1", "r5", "r10"]
    x = np.arange(len(ks))
    for ax, ((protocol, fold), group) in zip(axes, groups, strict=True):
        for offset, direction in ((-0.2, "i2t"), (0.2, "t2i")):
            row = group[group["direction"] == direction]
            values = row[ks].iloc[0].to_numpy(dtype=float) if len(row) else np.zeros(len(ks))
            bars = ax.bar(x + offset, values, width=0.4, label=direction)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        rsum = group.loc[group["direction"] == "both", "rsum"]
        rsum_text = f"rsum {rsum.iloc[0]:.1f}" if len(rsum) else ""
        ax.set_title(f"{protocol} ({fold})  {rsum_text}", fontsize=10)
        ax.set_xticks(x, ["R@1", "R@5", "R@10"])
        ax.set_ylim(0, 112)  # room for the labels above 100 %
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("recall (%)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)  # no bbox_inches="tight": keep the exact size
    return buffer.getvalue()


def summary_page(
    metrics_df: pd.DataFrame, out_html: str | os.PathLike, out_png: str | os.PathLike
) -> tuple[Path, Path]:
    """Write a one-page HTML summary (with the PNG embedded) and the PNG itself, atomically."""
    if metrics_df.empty:
        raise ValueError("summary_page: the metrics table is empty")
    summary = _summary_rows(metrics_df)
    if summary.empty:  # only per-fold rows were given: show them all
        summary = metrics_df
    png = _figure_png(summary)

    first = metrics_df.iloc[0]
    meta_keys = [
        "run_id",
        "created_at",
        "dataset",
        "split",
        "checkpoint",
        "cache_id",
        "config_hash",
        "code_version",
    ]
    meta_rows = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(first[key]))}</td></tr>"
        for key in meta_keys
        if key in metrics_df.columns
    )
    table_columns = [
        c
        for c in ("protocol", "fold", "direction", "r1", "r5", "r10", "medr", "meanr", "rsum")
        if c in metrics_df.columns
    ]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>smlstm run {html.escape(str(first.get("run_id", "")))}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}}
pre{{background:#f6f6f6;padding:1em}}</style></head>
<body><h1>sm-LSTM retrieval: {html.escape(str(first.get("dataset", "")))} / {html.escape(str(first.get("split", "")))}</h1>
<table>{meta_rows}</table>
<img alt="recall by direction" width="{FIGURE_SIZE_PX[0]}" height="{FIGURE_SIZE_PX[1]}"
 src="data:image/png;base64,{base64.b64encode(png).decode()}">
<pre>{html.escape(print_metrics(metrics_df))}</pre>
<h2>All rows</h2>
{metrics_df[table_columns].to_html(index=False, na_rep="", float_format=lambda v: f"{v:.2f}")}
</body></html>
"""
    png_path = _atomic_replace(Path(out_png), lambda f: f.write(png))
    html_path = _atomic_replace(Path(out_html), lambda f: f.write(page.encode()))
    return html_path, png_path
