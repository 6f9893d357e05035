"""Stage 2 end to end on a real tiny cache: checkpoints, training, exact resume, refusals,
the `smlstm train` command and the `train-smlstm` flow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_data import build_tiny_cache  # tests/ is on sys.path under pytest
from typer.testing import CliRunner

from features.cache import FeatureCache
from features.errors import CacheMismatch, CheckpointError, ConfigError, InputError
from smlstm.checkpoint import FORMAT, load_checkpoint, model_from_checkpoint, save_checkpoint
from smlstm.metrics import retrieval_metrics
from smlstm.reports import HISTORY_SCHEMA
from smlstm.scoring import EvalGallery
from smlstm.text import Vocabulary
from smlstm.train import train, training_complete

SMALL = dict(preset="small", workers=0, lr=1e-3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory) -> Path:
    return build_tiny_cache(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def other_cache_path(tmp_path_factory) -> Path:
    """Another cache: other random weights (seed 1), another dataset."""
    return build_tiny_cache(tmp_path_factory.getbasetemp(), "other", images=10, weights_seed=1)


@pytest.fixture(scope="module")
def trained(cache_path, tmp_path_factory):
    """A short real run: 5 epochs of batches of 10, DataLoader with one worker process."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run") / "run"
    lines: list[str] = []
    summary = train(dict(cache=str(cache_path), out=str(out), preset="small", epochs=5,
                         batch_size=10, lr=2e-3, workers=1, seed=0), log=lines.append)
    return out, summary, lines


# ---------------------------------------------------------------------------------------------
# checkpoints


def _plain_checkpoint(**extra) -> dict:
    return {"format": FORMAT, "model": {"w": torch.arange(6.0)}, "model_config": {},
            "vocab": {}, "epoch": 1, "step": 2, **extra}


def test_save_is_atomic_and_loads_back(tmp_path):
    path = tmp_path / "ck" / "latest.pt"
    save_checkpoint(_plain_checkpoint(), path)
    save_checkpoint(_plain_checkpoint(step=3), path)  # replaces
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(6.0))
    assert os.listdir(path.parent) == ["latest.pt"]  # no temp file left behind


class _Payload:
    """Unpickling this would run code: Path(marker).touch()."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save(_plain_checkpoint(extra=_Payload(marker)), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    torch.save(_plain_checkpoint(extra=np.zeros(3)), path)  # numpy objects are not allowed
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)


def test_wrong_format_missing_and_truncated_are_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({**_plain_checkpoint(), "format": "other/1"}, path)
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(path)
    torch.save({k: v for k, v in _plain_checkpoint().items() if k != "model"}, path)
    with pytest.raises(CheckpointError, match="model: missing"):
        load_checkpoint(path)
    save_checkpoint(_plain_checkpoint(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "absent.pt")


# ---------------------------------------------------------------------------------------------
# a short real run


def test_loss_falls_and_val_rsum_beats_chance(trained, cache_path):
    out, summary, lines = trained
    assert summary.epochs_completed == 5 and len(summary.history) == 5
    losses = [row["loss"] for row in summary.history]
    assert losses[-1] < 0.8 * losses[0]
    # chance: the same gallery scored at random, many times
    gallery = EvalGallery.from_cache(FeatureCache.open(cache_path), "val", captions_per_image=5)
    rng = np.random.default_rng(0)
    chance = [retrieval_metrics(rng.random((gallery.num_images, gallery.num_captions)),
                                gallery.owner)["rsum"] for _ in range(200)]
    assert summary.best_rsum > np.mean(chance) + 3 * np.std(chance)
    assert any("pairs/s" in line and "ETA" in line for line in lines)


def test_run_directory_holds_the_contract(trained):
    out, summary, _ = trained
    assert json.loads((out / "train_config.json").read_text())["batch_size"] == 10
    vocab = Vocabulary.load(out / "vocab.json")
    history = pd.read_parquet(out / "history.parquet")
    assert list(history.columns) == HISTORY_SCHEMA.names
    assert history["rsum"].tolist() == pytest.approx([row["rsum"] for row in summary.history])
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["history"][-1]["rsum"] == max(history["rsum"])
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["epoch"] == 5

    model, ckpt_vocab = model_from_checkpoint(best, "cpu", source="best.pt")
    assert ckpt_vocab == vocab and not model.training
    tampered = {**best, "vocab": {**best["vocab"], "fingerprint": "0" * 64}}
    with pytest.raises(CheckpointError, match="fingerprint"):
        model_from_checkpoint(tampered)
    wrong_size = {**best, "model_config": {**best["model_config"], "vocab_size": 3}}
    with pytest.raises(CheckpointError, match="vocab_size"):
        model_from_checkpoint(wrong_size)


def test_train_vocabulary_comes_from_the_train_split_only(trained, cache_path):
    out, _, _ = trained
    captions = FeatureCache.open(cache_path).captions
    train_words = {w for tokens in captions.loc[captions["split"] == "train", "tokens"]
                   for w in tokens}
    vocab = Vocabulary.load(out / "vocab.json")
    assert set(vocab.words[2:]) == train_words


# ---------------------------------------------------------------------------------------------
# kill -9 and resume == uninterrupted


def test_killed_run_resumes_to_the_same_weights(cache_path, tmp_path):
    config = dict(cache=str(cache_path), epochs=2, batch_size=40, checkpoint_every_steps=1,
                  seed=1, **SMALL)
    reference = train({**config, "out": str(tmp_path / "ref")}, log=lambda _: None)

    killed = tmp_path / "killed"
    config_file = tmp_path / "killed.json"
    config_file.write_text(json.dumps({**config, "out": str(killed)}))
    latest = killed / "checkpoints" / "latest.pt"
    process = subprocess.Popen(
        [sys.executable, "-m", "smlstm.train", "--config", str(config_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()  # SIGKILL: no cleanup of any kind
    process.wait()
    assert process.returncode == -9, process.stderr.read().decode()[-2000:]
    stopped_at = load_checkpoint(latest)["step"]
    assert 0 < stopped_at < reference.steps

    resumed = train({**config, "out": str(killed), "resume": True}, log=lambda _: None)
    assert resumed.steps == reference.steps and resumed.epochs_completed == 2
    ref = load_checkpoint(tmp_path / "ref" / "checkpoints" / "latest.pt")
    got = load_checkpoint(latest)
    for name, tensor in ref["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for key, state in ref["optimizer"]["state"].items():
        assert torch.equal(got["optimizer"]["state"][key]["exp_avg_sq"], state["exp_avg_sq"])
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in ref["history"]]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in got["history"]] == strip
    assert got["run_id"] == load_checkpoint(latest)["run_id"]


# ---------------------------------------------------------------------------------------------
# refusals: nothing is written


def test_other_weights_are_refused_before_writing(cache_path, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CacheMismatch, match="sha256"):
        train(dict(cache=str(cache_path), out=str(out), expected_weights_sha256="0" * 64,
                   **SMALL))
    assert not out.exists()
    sha = FeatureCache.open(cache_path).weights["sha256"]
    summary = train(dict(cache=str(cache_path), out=str(out), expected_weights_sha256=sha,
                         max_steps=1, batch_size=20, **SMALL), log=lambda _: None)
    assert summary.steps == 1 and summary.stopped_at_max_steps


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "train config: epochs: "),
        ({"model": {"attention": "bogus"}}, "model: attention: "),
        ({"model": {"vocab_size": 5}}, "model: vocab_size is set from the cache"),
        ({"loss": {"mode": "hardest"}}, "loss.mode: "),
        ({"surprise": 1}, "surprise: unknown field"),
        ({"cache": "/nonexistent/cache"}, "no feature cache here"),
    ],
)
def test_bad_config_is_one_line_and_writes_nothing(cache_path, tmp_path, change, message):
    out = tmp_path / "run"
    with pytest.raises(InputError) as err:
        train({**dict(cache=str(cache_path), out=str(out), **SMALL), **change})
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_resume_refuses_another_cache_and_changed_maths(trained, other_cache_path, tmp_path):
    source, _, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(source, run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    config = dict(out=str(run), epochs=6, batch_size=10, lr=2e-3, preset="small", workers=0,
                  resume=True)
    with pytest.raises(CacheMismatch, match="another cache"):
        train({**config, "cache": str(other_cache_path)})
    with pytest.raises(ConfigError, match="batch_size"):
        train({**config, "cache": _cache_of(source), "batch_size": 20})
    with pytest.raises(ConfigError, match="resume=true"):
        train({**config, "cache": _cache_of(source), "resume": False})
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_out_that_cannot_be_created_is_refused(cache_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="is not a directory"):
        train(dict(cache=str(cache_path), out=str(blocker / "run"), **SMALL))


def test_training_complete_only_for_a_finished_matching_run(trained, other_cache_path):
    source, _, _ = trained
    config = json.loads((source / "train_config.json").read_text())
    assert training_complete(config)
    assert not training_complete({**config, "epochs": 6})  # more epochs asked: not finished
    assert not training_complete({**config, "lr": 1e-4})  # other maths
    assert not training_complete({**config, "cache": str(other_cache_path)})
    assert not training_complete({**config, "out": str(source / "absent")})


def _cache_of(run: Path) -> str:
    return json.loads((run / "train_config.json").read_text())["cache"]


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_trains_and_reports_errors_in_one_line(cache_path, tmp_path):
    from smlstm.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["train", "--cache", str(cache_path), "--out", str(out),
                                 "--epochs", "0"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not out.exists()

    result = runner.invoke(app, ["train", "--cache", str(cache_path), "--out", str(out),
                                 "--preset", "small", "--attention", "plain", "--loss",
                                 "max_violation", "--negatives", "4", "--batch-size", "20",
                                 "--max-steps", "2", "--workers", "0"])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out / "checkpoints" / "latest.pt")
    assert ckpt["step"] == 2 and ckpt["model_config"]["attention"] == "plain"
    assert ckpt["train_config"]["loss"]["negatives"] == 4

    result = runner.invoke(app, ["train", "--cache", str(cache_path), "--out", str(out),
                                 "--preset", "small", "--batch-size", "20", "--max-steps", "3",
                                 "--workers", "0", "--attention", "plain", "--loss",
                                 "max_violation", "--negatives", "4", "--resume"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out / "checkpoints" / "latest.pt")["step"] == 3


# ---------------------------------------------------------------------------------------------
# the Prefect flow


def test_flow_trains_and_fails_on_bad_parameters(prefect_harness, cache_path, tmp_path,
                                                 monkeypatch):
    from flows.train import train_smlstm

    bad = tmp_path / "bad"
    with pytest.raises(ConfigError, match="epochs"):
        train_smlstm(cache=str(cache_path), out=str(bad), epochs=0)
    assert not bad.exists()

    out = tmp_path / "flow"
    result = train_smlstm(cache=str(cache_path), out=str(out), preset="small", epochs=1,
                          batch_size=40, workers=0, model={"attention": "mean"})
    assert result["processes"] == 1 and result["epochs_completed"] == 1
    assert result["best_rsum"] is not None and (out / "history.parquet").exists()

    monkeypatch.setenv("SMLSTM_TRAIN_NPROC", "2")  # the torchrun path, 2 gloo processes
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ddp = tmp_path / "ddp"
    result = train_smlstm(cache=str(cache_path), out=str(ddp), preset="small", epochs=1,
                          batch_size=40, workers=0)
    assert result["processes"] == 2 and result["epochs_completed"] == 1
    assert result["steps"] == load_checkpoint(ddp / "checkpoints" / "latest.pt")["step"]
    assert (ddp / "history.parquet").exists()
