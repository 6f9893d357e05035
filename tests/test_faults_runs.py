"""Stages 2 and 3 under faults: SIGKILL at exact points of training and evaluation, concurrent
report writers and readers, mismatched / unsafe checkpoints, read-only and out-of-range
options, and the local Prefect server's bind address. Also keeps docs/reliability.md true.

test_train.py and test_evaluate.py already kill a run once (by time) and check the basic
refusals; this file adds the exact kill points (checkpoint, best, history, score and report
files), readers running while the writers do, and the mismatches they do not try.
Killed runs are forks of this process (see test_faults_extract.py for the kill points).
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from test_faults_extract import KillPoint, install_kill_point  # tests/ is on sys.path
from typer.testing import CliRunner

from features.errors import CacheMismatch, CheckpointError, ConfigError
from features.extract import run_extraction
from features.shapes import make_shapes
from smlstm.checkpoint import load_checkpoint, save_checkpoint
from smlstm.cli import app
from smlstm.evaluate import evaluate, load_scores
from smlstm.reports import read_table
from smlstm.text import Vocabulary
from smlstm.train import train

ROOT = Path(__file__).resolve().parents[1]
FORK = multiprocessing.get_context("fork")
TINY_MODEL = {"embed_dim": 16, "text_hidden": 16, "joint_dim": 16, "attn_dim": 8, "lstm_hidden": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train_config(world: dict, out: Path, **overrides) -> dict:
    config = dict(
        cache=str(world["cache"]),
        out=str(out),
        preset="small",
        model=TINY_MODEL,
        epochs=2,
        batch_size=20,
        lr=2e-3,
        workers=0,
        device="cpu",
        seed=3,
        checkpoint_every_steps=1,
    )
    return {**config, **overrides}


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A 24-image shapes cache (about 12 train / 6 val / 6 test images), a reference training
    run of two epochs and a reference evaluation of its best checkpoint."""
    root = tmp_path_factory.mktemp("world")
    dataset = make_shapes(
        root / "shapes", 24, seed=2, size=64, splits=(0.5, 0.25, 0.25), twin_fraction=0.0
    )
    extract = dict(
        dataset=str(dataset),
        images=str(root / "shapes"),
        weights="random",
        image_size=64,
        shard_size=4,
        batch_size=4,
        workers=0,
        device="cpu",
    )
    run_extraction({**extract, "out": str(root / "cache")}, progress=None)
    # The same images under another extraction config (no global fc7 vector).
    run_extraction({**extract, "out": str(root / "cache_off"), "global_mode": "off"}, progress=None)
    world = {"root": root, "cache": root / "cache", "cache_off": root / "cache_off"}
    summary = train(_train_config(world, root / "run"), log=_quiet)
    assert summary.epochs_completed == 2 and summary.steps % 2 == 0 and summary.steps >= 6
    world["steps_per_epoch"] = summary.steps // 2
    world["run"] = root / "run"
    world["checkpoint"] = root / "run" / "checkpoints" / "best.pt"
    world["eval"] = evaluate(_eval_config(world, root / "reports", run_id="reference"), log=_quiet)
    return world


def _eval_config(world: dict, out: Path, **overrides) -> dict:
    return {
        "checkpoint": str(world["checkpoint"]),
        "cache": str(world["cache"]),
        "out": str(out),
        "device": "cpu",
        "figures": 0,
        **overrides,
    }


def _fork(target, *args) -> int:
    process = FORK.Process(target=target, args=args)
    process.start()
    process.join(180)
    if process.exitcode is None:
        process.kill()
        process.join()
        pytest.fail("a forked run hung")
    return process.exitcode


# ----------------------------------------------------------------------------------------------
# training: killed at exact points, resumed, equal to the uninterrupted run


def _train_in_child(config: dict, point: KillPoint) -> None:
    torch.set_num_threads(1)
    install_kill_point(point)
    train(config, log=_quiet)


TRAIN_KILLS = [
    ("before the first checkpoint", KillPoint(r"/train_config\.json$", 1, "after")),
    ("torn write of the step-2 checkpoint", KillPoint(r"/checkpoints/latest\.pt$", 2, "torn")),
    ("epoch 1: best.pt written, history not", KillPoint(r"/checkpoints/best\.pt$", 1, "after")),
    ("epoch 1: history written, latest not", KillPoint(r"/history\.parquet$", 1, "after")),
    ("epoch 2: checkpoint complete, not renamed", KillPoint(r"/latest\.pt$", 3, "before")),
]


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_training_killed_at_exact_points_resumes_to_the_uninterrupted_run(world, tmp_path):
    out = tmp_path / "run"
    latest = out / "checkpoints" / "latest.pt"
    steps = []
    for label, point in TRAIN_KILLS:
        # What a user (or the flow) does: resume when there is a checkpoint, else start over.
        config = _train_config(world, out, resume=latest.exists())
        assert _fork(_train_in_child, config, point) == -signal.SIGKILL, label
        # Whatever the moment, the files in place are whole.
        steps.append(load_checkpoint(latest)["step"] if latest.exists() else None)
        if (out / "history.parquet").exists():
            pd.read_parquet(out / "history.parquet")
    per_epoch = world["steps_per_epoch"]
    assert steps == [None, 1, per_epoch, per_epoch, per_epoch + 1]  # through both epochs

    summary = train(_train_config(world, out, resume=True), log=_quiet)
    assert summary.steps == 2 * per_epoch and summary.epochs_completed == 2
    for name in ("latest", "best"):
        got = load_checkpoint(out / "checkpoints" / f"{name}.pt")
        want = load_checkpoint(world["run"] / "checkpoints" / f"{name}.pt")
        assert (got["epoch"], got["step"], got["best_rsum"]) == (
            want["epoch"],
            want["step"],
            want["best_rsum"],
        )
        for key, tensor in want["model"].items():
            assert torch.equal(got["model"][key], tensor), (name, key)
        for key, state in want["optimizer"]["state"].items():
            for part in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(got["optimizer"]["state"][key][part], state[part])
        assert got["scheduler"] == want["scheduler"]
        assert _strip(got["history"]) == _strip(want["history"])
    drop = ["seconds", "run_id"]
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "history.parquet").drop(columns=drop),
        pd.read_parquet(world["run"] / "history.parquet").drop(columns=drop),
    )
    # Only hidden temp files of the killed writers are left besides the run's own files.
    own = {p.relative_to(world["run"]) for p in world["run"].rglob("*") if p.is_file()}
    extra = {p.relative_to(out) for p in out.rglob("*") if p.is_file()} - own
    assert all(path.name.startswith(".") for path in extra), extra


# ----------------------------------------------------------------------------------------------
# evaluation: killed at exact points, no partial file visible, reports stay readable


def _evaluate_in_child(config: dict, point: KillPoint | None) -> None:
    torch.set_num_threads(1)
    if point is not None:
        install_kill_point(point)
    evaluate(config, log=_quiet)


def visible_files(directory: Path) -> list[Path]:
    """What a reader lists: no path component starting with '.' (temp files are hidden).

    os.walk, not Path.rglob: a writer renames its hidden temp directories while we walk.
    """
    found = []
    for parent, dirs, files in os.walk(directory):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found += [Path(parent) / name for name in files if not name.startswith(".")]
    return found


def assert_reports_readable(out: Path) -> pd.DataFrame:
    """Every visible table and score file reads whole; every run in metrics has its files."""
    for path in visible_files(out):
        if path.suffix == ".parquet":
            pd.read_parquet(path)
    for store in out.glob("scores/run_id=*.zarr"):
        scores, attrs = load_scores(store)
        assert scores.shape == (len(attrs["image_rows"]), len(attrs["caption_ids"]))
        assert np.isfinite(scores).all()
    if not (out / "metrics").exists():
        return pd.DataFrame()
    metrics = read_table(out / "metrics")
    for run_id in set(metrics.get("run_id", [])):
        assert (out / "ranks" / f"run_id={run_id}" / "part-0.parquet").is_file()
        assert (out / "scores" / f"run_id={run_id}.zarr").is_dir()
    if (out / "ranks").exists():
        read_table(out / "ranks")
    return metrics


EVAL_KILLS = [
    ("torn chunk of the score matrix", KillPoint(r"/scores/\.run_id=.*\.tmp/c/0/0$", 1, "torn")),
    ("score file published, no reports", KillPoint(r"/scores/run_id=[^/]*\.zarr$", 1, "after")),
    ("torn write of the ranks table", KillPoint(r"/ranks/run_id=.*/part-0\.parquet$", 1, "torn")),
    ("ranks and history in, metrics not", KillPoint(r"/history/run_id=.*parquet$", 1, "after")),
    ("metrics written, not linked", KillPoint(r"/metrics/run_id=.*/part-0\.parquet$", 1, "before")),
]


def test_evaluation_killed_at_exact_points_leaves_no_partial_file_visible(world, tmp_path):
    out = tmp_path / "reports"
    reference = world["eval"]
    for index, (label, point) in enumerate(EVAL_KILLS):
        config = _eval_config(world, out, run_id=f"killed-{index}")
        assert _fork(_evaluate_in_child, config, point) == -signal.SIGKILL, label
        metrics = assert_reports_readable(out)
        assert metrics.empty, label  # no killed run reached the metrics table
    # The kills left hidden temp files (a torn chunk, a torn table): readers never list them.
    hidden = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert any("ranks" in str(p) for p in hidden) and any("scores" in str(p) for p in hidden)

    result = evaluate(_eval_config(world, out, run_id="after-kills"), log=_quiet)
    metrics = assert_reports_readable(out)
    assert set(metrics["run_id"]) == {"after-kills"}
    assert result.summary == reference.summary
    np.testing.assert_array_equal(
        load_scores(result.scores_path)[0], load_scores(reference.scores_path)[0]
    )


def test_concurrent_evaluations_with_a_reader_keep_every_table_readable(world, tmp_path):
    # The train split in many tiny scoring blocks: long enough for the reader to overlap.
    out = tmp_path / "reports"
    writers = []
    for run_id in ("left", "right"):
        config = _eval_config(world, out, run_id=run_id, split="train", block_budget_mb=0.02)
        process = FORK.Process(target=_evaluate_in_child, args=(config, None))
        process.start()
        writers.append(process)
    reads = 0
    while any(process.is_alive() for process in writers):
        assert_reports_readable(out)
        reads += 1
    for process in writers:
        process.join()
        assert process.exitcode == 0
    assert reads >= 3, "the reader never overlapped the writers"
    metrics = assert_reports_readable(out)
    assert sorted(set(metrics["run_id"])) == ["left", "right"] and len(metrics) == 6
    ranks = read_table(out / "ranks")
    left, right = (load_scores(out / "scores" / f"run_id={r}.zarr")[0] for r in ("left", "right"))
    assert ranks.groupby("run_id").size().tolist() == [left.shape[0] + left.shape[1]] * 2
    np.testing.assert_array_equal(left, right)  # the same model and gallery: the same scores
    by_run = metrics.set_index(["run_id", "direction"])["rsum"]
    assert by_run[("left", "both")] == by_run[("right", "both")]


# ----------------------------------------------------------------------------------------------
# mismatches: refused before any work, nothing written


def test_checkpoint_on_a_cache_of_another_config_is_refused(world, tmp_path):
    out = tmp_path / "reports"
    with pytest.raises(CacheMismatch, match=r"cache_identity\.[a-z_.]+: the checkpoint"):
        evaluate(_eval_config(world, out, cache=str(world["cache_off"])), log=_quiet)
    assert not out.exists()

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(CacheMismatch, match="another cache"):
        train(_train_config(world, run, cache=str(world["cache_off"]), epochs=3, resume=True))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def _edited_checkpoint(world: dict, where: Path, edit) -> Path:
    ckpt = torch.load(world["checkpoint"], weights_only=True)
    edit(ckpt)
    return save_checkpoint(ckpt, where / "checkpoints" / "best.pt")


def _with_vocab(ckpt: dict, words: list[str]) -> None:
    vocab = Vocabulary(words, min_count=ckpt["vocab"]["min_count"])
    ckpt["vocab"] = {
        "tokens": list(vocab.words),
        "min_count": vocab.min_count,
        "fingerprint": vocab.fingerprint,
    }


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (  # one more word than the embedding has rows
            lambda c: _with_vocab(c, [*c["vocab"]["tokens"], "zebra"]),
            r"model_config\.vocab_size: \d+ != \d+ words",
        ),
        (  # the config says wider than the weights are
            lambda c: c["model_config"].update(joint_dim=32),
            r"model: .*size mismatch",
        ),
        (  # the recorded LSTM width differs from the weights'
            lambda c: c["model_config"].update(lstm_hidden=8),
            r"model: .*size mismatch",
        ),
    ],
    ids=["vocabulary", "joint_dim", "lstm_hidden"],
)
def test_checkpoint_whose_vocabulary_or_widths_do_not_match_is_refused(
    world, tmp_path, edit, expected
):
    checkpoint = _edited_checkpoint(world, tmp_path / "edited", edit)
    out = tmp_path / "reports"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(checkpoint),
            "--cache",
            str(world["cache"]),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and str(checkpoint) in result.stderr
    assert re.search(expected, result.stderr), result.stderr
    assert result.stdout == "" and not out.exists()


def test_resume_with_another_vocabulary_or_widths_is_refused(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    latest = run / "checkpoints" / "latest.pt"
    ckpt = torch.load(latest, weights_only=True)
    words = list(ckpt["vocab"]["tokens"])
    words[-1] = "zebra"  # same size, another word: these ids mean other words
    _with_vocab(ckpt, words)
    save_checkpoint(ckpt, latest)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(CacheMismatch, match="give another vocabulary"):
        train(_train_config(world, run, epochs=3, resume=True), log=_quiet)
    shutil.copyfile(world["run"] / "checkpoints" / "latest.pt", latest)
    with pytest.raises(ConfigError, match=r"train_config\.model: resume must keep"):
        train(
            _train_config(world, run, epochs=3, resume=True, model={**TINY_MODEL, "joint_dim": 32}),
            log=_quiet,
        )
    del before[latest]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p != latest} == before


# ----------------------------------------------------------------------------------------------
# unsafe checkpoints


class _Payload:
    """Unpickling this would run code: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_a_pickled_payload_is_refused(world, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = _edited_checkpoint(world, tmp_path / "evil", lambda c: c.update(extra=_Payload(marker)))
    out = tmp_path / "reports"
    result = CliRunner().invoke(
        app,
        ["evaluate", "--checkpoint", str(evil), "--cache", str(world["cache"]), "--out", str(out)],
    )
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"{evil}: refused: not a plain weights-only checkpoint" in result.stderr
    assert not marker.exists() and not out.exists()

    run = tmp_path / "run"  # the same payload as a run's latest.pt: resume refuses it
    shutil.copytree(world["run"], run)
    shutil.copyfile(evil, run / "checkpoints" / "latest.pt")
    with pytest.raises(CheckpointError, match="refused"):
        train(_train_config(world, run, epochs=3, resume=True), log=_quiet)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# read-only outputs and out-of-range options


@pytest.fixture
def read_only_dir(tmp_path):
    where = tmp_path / "ro"
    where.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)]
    if subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only tmpfs is not permitted here")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_reports_on_a_read_only_path_are_refused_before_work(world, read_only_dir):
    out = read_only_dir / "reports"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(world["checkpoint"]),
            "--cache",
            str(world["cache"]),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: out: {out}: {read_only_dir} is not writable\n"
    assert result.stdout == ""  # not even the "evaluate ..." line: no scoring started


def test_training_run_on_a_read_only_path_is_refused_before_work(world, read_only_dir):
    out = read_only_dir / "run"
    args = ["train", "--cache", str(world["cache"]), "--out", str(out), "--preset", "small"]
    result = CliRunner().invoke(app, [*args, "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: out: {out}: {read_only_dir} is not writable\n"
    assert result.stdout == ""  # refused before the "training ..." line: no step taken


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--batch-size", "1"], "batch_size: Input should be greater than or equal to 2"),
        (["train", "--lr", "0"], "lr: Input should be greater than 0"),
        (["train", "--workers", "100"], "workers: Input should be less than or equal to 64"),
        (["train", "--preset", "huge"], "preset: Input should be 'paper' or 'small'"),
        (["train", "--device", "tpu"], "device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (["evaluate", "--figures", "101"], "figures: Input should be less than or equal to 100"),
        (["evaluate", "--captions-per-image", "0"], "captions_per_image: Input should be greater"),
        (["evaluate", "--block-budget-mb", "0"], "block_budget_mb: Input should be greater than 0"),
        (["evaluate", "--run-id", "../x"], "run_id: expected letters, digits"),
    ],
)
def test_out_of_range_options_are_refused_before_work(world, tmp_path, args, expected):
    out = tmp_path / "out"
    command, *options = args
    if command == "train":
        base = ["train", "--cache", str(world["cache"]), "--out", str(out)]
    else:
        base = [
            "evaluate",
            "--checkpoint",
            str(world["checkpoint"]),
            "--cache",
            str(world["cache"]),
            "--out",
            str(out),
        ]
    result = CliRunner().invoke(app, [*base, *options])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert result.stdout == "" and not out.exists()


# ----------------------------------------------------------------------------------------------
# the local Prefect server listens on the loopback address only


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening(port: int) -> set[str]:
    return {
        conn.laddr.ip
        for conn in psutil.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
    }


def test_local_prefect_server_listens_on_loopback_only(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "SMLSTM_PREFECT_PORT": str(port),
    }
    script = str(ROOT / "scripts" / "prefect-local")
    try:
        started = subprocess.run(
            [script, "server"], env=env, capture_output=True, text=True, timeout=240
        )
        assert started.returncode == 0, started.stderr[-2000:]
        assert _listening(port) == {"127.0.0.1"}
        # And it answers there: the health endpoint of the API.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)
    assert _listening(port) == set()


# ----------------------------------------------------------------------------------------------
# docs/reliability.md names real tests


def _defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def test_reliability_table_names_only_existing_tests():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Reliability", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # header, rule
    assert len(rows) >= 20
    named = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 3 and all(cells), row
        references = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", cells[2])
        assert references, f"no test named in: {row}"
        named += references
    for file, name in named:
        assert (ROOT / file).is_file(), file
        assert name in _defined_tests(ROOT / file), f"{file}::{name} does not exist"


def test_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_previous_one(tmp_path):
    """A full disk while writing latest.pt: CheckpointError in one line, no temp file left,
    the previous checkpoint still loads (training then resumes from it once space is freed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        path = disk / "checkpoints" / "latest.pt"
        small = {"format": "smlstm-checkpoint/1", "step": 1, "weights": torch.zeros(1000)}
        save_checkpoint(small, path)
        too_big = {"format": "smlstm-checkpoint/1", "step": 2, "weights": torch.zeros(400_000)}
        with pytest.raises(CheckpointError) as raised:
            save_checkpoint(too_big, path)
        message = str(raised.value)
        assert "\n" not in message and str(path) in message and "--resume" in message
        assert sorted(p.name for p in path.parent.iterdir()) == ["latest.pt"]
        assert torch.load(path, weights_only=True)["step"] == 1  # the previous one, whole
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
