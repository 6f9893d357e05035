"""Parquet reports, run identity, the terminal table and the summary page (smlstm/reports.py)."""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from features.errors import ConfigError
from smlstm import metrics, reports

# Spawned (not forked) writers: real, independent interpreters, as concurrent evaluations are.
SPAWN = multiprocessing.get_context("spawn")


def gallery(seed: int, n_images: int = 12, per_image: int = 5):
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(n_images), per_image)
    S = rng.standard_normal((n_images, len(owner))).astype(np.float32)
    S[owner, np.arange(len(owner))] += 1.5  # some signal, so ranks vary
    return S, owner


def metrics_df(run_id: str, seed: int = 0, protocol: str = "1k") -> pd.DataFrame:
    S, owner = gallery(seed, n_images=10 if protocol == "coco-1k" else 12)
    rows = metrics.evaluate(S, owner, protocol)
    meta = {
        "run_id": run_id,
        "dataset": "shapes",
        "split": "test",
        "checkpoint": "runs/a/checkpoints/best.pt",
        "cache_id": "vgg19-448-pool5",
        "config_hash": reports.config_hash({"seed": seed}),
        "created_at": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    }
    return reports.metrics_frame(rows, meta)


# -- writer processes (top level so that spawn can import them) ---------------------------------


def write_runs(directory: str, run_ids: list[str], barrier) -> None:
    barrier.wait()  # start together, so the writes really overlap
    for i, run_id in enumerate(run_ids):
        reports.write_table(metrics_df(run_id, seed=i), directory, run_id)


def write_same_run(directory: str, run_id: str, seed: int, barrier, results) -> None:
    barrier.wait()
    try:
        reports.write_table(metrics_df(run_id, seed=seed), directory, run_id)
        results.put(("ok", seed))
    except FileExistsError:
        results.put(("exists", seed))


def write_forever(directory: str, rows: int) -> None:
    """Writes big ranks tables until killed; each run holds exactly `rows` rows."""
    S, owner = gallery(0, n_images=rows // 6, per_image=5)  # i2t + t2i rows = 6 per image
    frame = reports.ranks_frame(S, owner, "x")
    i = 0
    while True:
        reports.write_table(frame.drop(columns="run_id"), directory, f"run-{i:05d}")
        i += 1


# -- schema round trips -------------------------------------------------------------------------


def test_metrics_round_trip_keeps_schema_and_values(tmp_path):
    run_id = reports.new_run_id()
    df = metrics_df(run_id, protocol="coco-1k")
    assert list(df.columns) == reports.METRICS_SCHEMA.names
    path = reports.write_table(df, tmp_path, run_id)
    assert path == tmp_path / f"run_id={run_id}" / "part-0.parquet"

    # The file holds every column but run_id (it lives in the directory name), typed exactly.
    file_schema = pq.read_schema(path)
    expected = reports.METRICS_SCHEMA.remove(reports.METRICS_SCHEMA.get_field_index("run_id"))
    assert file_schema.equals(expected, check_metadata=False)
    assert file_schema.metadata[b"smlstm.table"] == b"metrics"

    back = reports.read_table(tmp_path)
    assert list(back.columns) == reports.METRICS_SCHEMA.names
    pd.testing.assert_frame_equal(back, df)
    assert str(back["created_at"].dt.tz) == "UTC"
    assert back["created_at"].iloc[0] == pd.Timestamp("2026-01-02 03:04:05.678901", tz="UTC")
    # 5 folds + mean, 3 rows each; rsum only on the "both" rows.
    assert len(back) == 18
    assert back.loc[back["direction"] != "both", "rsum"].isna().all()
    assert set(back["fold"]) == {"0", "1", "2", "3", "4", "mean"}

    # Plain pandas reads the same directory as one table with the run_id column.
    plain = pd.read_parquet(tmp_path)
    assert set(plain["run_id"].astype(str)) == {run_id} and len(plain) == 18


def test_ranks_frame_matches_metric_ranks_and_round_trips(tmp_path):
    S, owner = gallery(1, n_images=15, per_image=3)
    image_ids = np.arange(15) * 10 + 1000
    caption_ids = np.arange(45) + 50_000
    df = reports.ranks_frame(S, owner, "r1", image_ids, caption_ids, chunk=4)
    i2t = df[df["direction"] == "i2t"]
    t2i = df[df["direction"] == "t2i"]
    np.testing.assert_array_equal(i2t["query_id"], image_ids)
    np.testing.assert_array_equal(t2i["query_id"], caption_ids)
    np.testing.assert_array_equal(i2t["gt_rank"], metrics.reference_ranks_i2t(S, owner))
    np.testing.assert_array_equal(t2i["gt_rank"], metrics.reference_ranks_t2i(S, owner))

    for i, row in enumerate(i2t.itertuples()):
        order = np.argsort(-S[i], kind="stable")[:10]
        np.testing.assert_array_equal(row.top10_ids, caption_ids[order])
        np.testing.assert_allclose(row.top10_scores, S[i, order])
        # The image's best own caption is in its top 10 exactly when its rank is below 10.
        assert (row.gt_rank < 10) == bool(np.isin(row.top10_ids, caption_ids[owner == i]).any())
    for k, row in enumerate(t2i.itertuples()):
        assert (row.gt_rank < 10) == (image_ids[owner[k]] in row.top10_ids)
        assert len(row.top10_ids) == 10

    path = reports.write_table(df, tmp_path, "r1")
    file_schema = pq.read_schema(path)
    assert file_schema.field("top10_ids").type == pa.list_(pa.int64())
    assert file_schema.field("top10_scores").type == pa.list_(pa.float32())
    back = reports.read_table(tmp_path)
    assert len(back) == 15 + 45
    np.testing.assert_array_equal(back["top10_ids"].iloc[0], df["top10_ids"].iloc[0])


def test_history_frame_and_standalone_file(tmp_path):
    rows = [
        {"epoch": 0, "step": 10, "loss": 1.5, "lr": 2e-4, "seconds": 3.0},  # no validation yet
        {"epoch": 1, "step": 20, "loss": 1.2, "lr": 2e-4, "i2t_r1": 10.0, "i2t_r5": 30.0,
         "i2t_r10": 50.0, "t2i_r1": 8.0, "t2i_r5": 25.0, "t2i_r10": 40.0, "rsum": 163.0,
         "seconds": 6.5},
    ]  # fmt: skip
    df = reports.history_frame(rows, "train-1")
    assert list(df.columns) == reports.HISTORY_SCHEMA.names
    assert np.isnan(df["rsum"].iloc[0]) and df["rsum"].iloc[1] == 163.0
    path = reports.write_parquet(df, tmp_path / "history.parquet")
    assert pq.read_schema(path).equals(reports.HISTORY_SCHEMA, check_metadata=False)
    pd.testing.assert_frame_equal(pd.read_parquet(path), df)
    # Rewriting replaces it whole and leaves no temp file behind.
    reports.write_parquet(df.iloc[:1], path)
    assert len(pd.read_parquet(path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["history.parquet"]

    with pytest.raises(ValueError, match="unknown keys accuracy"):
        reports.history_frame([{"epoch": 0, "accuracy": 1.0}], "train-1")


def test_bad_values_give_one_line_errors_and_write_nothing(tmp_path):
    df = metrics_df("run-a")
    df["r1"] = df["r1"].astype(object)
    df.loc[0, "r1"] = "high"
    with pytest.raises(ValueError, match=r"column r1: expected double") as err:
        reports.write_table(df, tmp_path / "reports", "run-a")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "reports").exists()

    with pytest.raises(ValueError, match="run_id column holds"):
        reports.write_table(metrics_df("run-b"), tmp_path, "run-c")
    with pytest.raises(ValueError, match="run_id: expected"):
        reports.write_table(metrics_df("run-b"), tmp_path, "../escape")
    with pytest.raises(ConfigError, match="run_meta: dataset: Field required"):
        reports.metrics_frame([], {"run_id": "x", "split": "test"})


def test_refuses_to_overwrite_a_run(tmp_path):
    first = metrics_df("run-1", seed=1)
    path = reports.write_table(first, tmp_path, "run-1")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="run-1 already has a report"):
        reports.write_table(metrics_df("run-1", seed=2), tmp_path, "run-1")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["part-0.parquet"]


# -- concurrency and crashes --------------------------------------------------------------------


def test_two_concurrent_writer_processes(tmp_path):
    runs_a = [f"a-{i}" for i in range(4)]
    runs_b = [f"b-{i}" for i in range(4)]
    barrier = SPAWN.Barrier(2)
    procs = [
        SPAWN.Process(target=write_runs, args=(str(tmp_path), runs, barrier))
        for runs in (runs_a, runs_b)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0

    table = reports.read_table(tmp_path)
    assert sorted(table["run_id"].unique()) == sorted(runs_a + runs_b)
    assert (table.groupby("run_id").size() == 3).all()
    # Each run holds exactly what its writer computed (seed i -> its own metrics).
    for run_id in ("a-2", "b-2"):
        expected = metrics_df(run_id, seed=2)
        got = table[table["run_id"] == run_id].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected)


def test_concurrent_writers_of_the_same_run_one_wins(tmp_path):
    barrier, results = SPAWN.Barrier(2), SPAWN.Queue()
    procs = [
        SPAWN.Process(target=write_same_run, args=(str(tmp_path), "same", seed, barrier, results))
        for seed in (1, 2)
    ]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(60)
    assert [status for status, _ in outcomes] == ["exists", "ok"]
    winner = next(seed for status, seed in outcomes if status == "ok")
    got = reports.read_table(tmp_path)
    pd.testing.assert_frame_equal(got, metrics_df("same", seed=winner))
    assert sorted(p.name for p in (tmp_path / "run_id=same").iterdir()) == ["part-0.parquet"]


def test_temp_files_of_a_killed_writer_are_never_read(tmp_path):
    # A hand-made leftover: a complete parquet file under a temp name, and a truncated one.
    good = reports.write_table(metrics_df("done"), tmp_path, "done")
    leftover = tmp_path / "run_id=crashed" / ".part-0.parquet.123-abcd.tmp"
    leftover.parent.mkdir()
    leftover.write_bytes(good.read_bytes())
    (good.parent / ".part-0.parquet.456-ef01.tmp").write_bytes(good.read_bytes()[:100])
    for table in (reports.read_table(tmp_path), pd.read_parquet(tmp_path)):
        assert set(table["run_id"].astype(str)) == {"done"} and len(table) == 3
    # The crashed run can still be written afterwards.
    reports.write_table(metrics_df("crashed"), tmp_path, "crashed")
    assert set(reports.read_table(tmp_path)["run_id"]) == {"done", "crashed"}

    # A real writer killed with SIGKILL mid-stream: every visible run is complete.
    directory = tmp_path / "ranks"
    rows = 6 * 400
    proc = SPAWN.Process(target=write_forever, args=(str(directory), rows))
    proc.start()
    deadline = time.monotonic() + 60
    while len(reports.run_files(directory) if directory.exists() else []) < 3:
        assert time.monotonic() < deadline and proc.is_alive()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    table = reports.read_table(directory)
    sizes = table.groupby("run_id").size()
    assert len(sizes) >= 3 and (sizes == rows).all()
    assert not any(name.startswith(".") for name in table["run_id"])


# -- identity helpers ---------------------------------------------------------------------------


def test_config_hash_is_canonical():
    a = {"lr": 2e-4, "model": {"width": 512, "attention": "context"}, "path": Path("/x")}
    b = {"path": "/x", "model": {"attention": "context", "width": 512}, "lr": 0.0002}
    assert reports.config_hash(a) == reports.config_hash(b)
    assert len(reports.config_hash(a)) == 16 and int(reports.config_hash(a), 16) >= 0
    assert reports.config_hash({**a, "lr": 1e-4}) != reports.config_hash(a)
    meta = reports.RunMeta(run_id="x", dataset="d", split="test", created_at=datetime(2026, 1, 1))
    assert reports.config_hash(meta) == reports.config_hash(meta.model_dump(mode="json"))


def test_run_ids_sort_by_time_and_are_unique():
    ids = [reports.new_run_id() for _ in range(50)]
    assert len(set(ids)) == 50
    stamps = [r.split("-")[0] for r in ids]  # fixed-width UTC timestamp leads
    assert stamps == sorted(stamps) and all(len(s) == len(stamps[0]) for s in stamps)
    assert datetime.strptime(stamps[0], "%Y%m%dT%H%M%S%fZ").year >= 2024
    assert all(reports._RUN_ID_RE.match(r) for r in ids)  # safe as a hive partition value
    assert reports.code_version().startswith(importlib.metadata.version("smlstm"))


# -- terminal table and summary page ------------------------------------------------------------


def test_print_metrics_shows_each_direction_and_rsum():
    df = metrics_df("run-p", protocol="coco-1k")
    text = reports.print_metrics(df)
    mean = df[df["fold"] == "mean"].set_index("direction")
    lines = text.splitlines()
    assert "protocol=coco-1k" in lines[0] and "fold=mean" in lines[0]
    assert lines[1].split() == ["R@1", "R@5", "R@10", "medr", "meanr"]
    i2t = [float(v) for v in lines[2].split()[1:]]
    assert lines[2].startswith("i2t")
    assert i2t == [round(mean.loc["i2t", k], 1) for k in ("r1", "r5", "r10", "medr", "meanr")]
    assert lines[4].split() == ["rsum", f"{mean.loc['both', 'rsum']:.1f}"]
    assert len(lines) == 5  # per-fold rows are hidden by default
    assert reports.print_metrics(df, all_folds=True).count("fold=") == 6


def test_summary_page_writes_png_and_html(tmp_path):
    df = metrics_df("run-s", protocol="coco-1k")
    html_path, png_path = reports.summary_page(df, tmp_path / "s.html", tmp_path / "fig/s.png")
    with Image.open(png_path) as image:
        image.verify()
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.size == reports.FIGURE_SIZE_PX
    page = html_path.read_text()
    assert "run-s" in page and "data:image/png;base64," in page
    assert f"{df.loc[df['direction'] == 'both', 'rsum'].iloc[-1]:.1f}" in page
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["s.html", "s.png"]
