"""Stage 3 end to end on a tiny real cache and a tiny trained checkpoint.

One module-scoped world: 30 synthetic images (64 px) -> a real Zarr cache through stage 1
with random VGG-19 weights -> one epoch of training at tiny widths (a real run directory with
checkpoints and history.parquet). Every test evaluates into its own reports directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from PIL import Image
from typer.testing import CliRunner

from features.cache import FeatureCache
from features.config import ExtractConfig
from features.errors import CacheError, CacheMismatch, ConfigError
from features.extract import run_extraction
from features.shapes import make_shapes
from smlstm.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from smlstm.cli import app
from smlstm.evaluate import (
    EvalConfig,
    ensemble,
    evaluate,
    evaluation_complete,
    load_scores,
    report,
)
from smlstm.figures import FIGURE_SIZE_PX
from smlstm.metrics import retrieval_metrics
from smlstm.reports import read_table
from smlstm.scoring import EvalGallery, score_matrix
from smlstm.search import search
from smlstm.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"embed_dim": 16, "text_hidden": 16, "joint_dim": 16, "attn_dim": 8,
              "lstm_hidden": 16}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    dataset = make_shapes(root / "shapes", images=30, seed=0, size=64)
    run_extraction(ExtractConfig(dataset=str(dataset), images=str(root / "shapes"),
                                 out=str(root / "cache"), weights="random", image_size=64,
                                 shard_size=8, batch_size=8, workers=0, device="cpu"),
                   progress=None)
    train({"cache": str(root / "cache"), "out": str(root / "run"), "preset": "small",
           "model": TINY_MODEL, "epochs": 1, "batch_size": 16, "workers": 0, "device": "cpu"},
          log=lambda line: None)
    checkpoint = root / "run" / "checkpoints" / "best.pt"
    assert checkpoint.is_file() and (root / "run" / "history.parquet").is_file()
    return {"root": root, "cache": str(root / "cache"), "checkpoint": str(checkpoint),
            "run": root / "run"}


def config_for(world, out, **overrides) -> dict:
    return {"checkpoint": world["checkpoint"], "cache": world["cache"], "out": str(out),
            "device": "cpu", "figures": 0, **overrides}


def visible_files(directory: Path) -> list[Path]:
    """Files a reader would see: no path component starting with '.'."""
    return [p for p in directory.rglob("*") if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(directory).parts)]


def test_evaluate_end_to_end(world, tmp_path):
    out = tmp_path / "reports"
    config = config_for(world, out, figures=2, run_id="run-a")
    assert not evaluation_complete(config)
    result = evaluate(config, log=lambda line: None)

    # the score file: the same matrix as an independent score_matrix call, with its gallery
    cache = FeatureCache.open(world["cache"])
    gallery = EvalGallery.from_cache(cache, "test", captions_per_image=5)
    model, vocab = model_from_checkpoint(load_checkpoint(world["checkpoint"]))
    expected = score_matrix(model, cache, gallery, vocab, "cpu")
    scores, attrs = load_scores(result.scores_path)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert attrs["image_rows"] == cache.rows("test").tolist()
    assert attrs["owner"] == gallery.owner.tolist()
    assert attrs["cache_id"] == cache.identity["config_hash"]
    assert np.bincount(gallery.owner).tolist() == [5] * gallery.num_images

    # the reports: one table per kind for all runs, readable with plain pandas
    metrics = pd.read_parquet(out / "metrics")
    assert set(metrics["run_id"].astype(str)) == {"run-a"}
    assert sorted(metrics["direction"]) == ["both", "i2t", "t2i"]
    expected_metrics = retrieval_metrics(expected, gallery.owner)
    rsum = metrics.loc[metrics["direction"] == "both", "rsum"].item()
    assert rsum == pytest.approx(expected_metrics["rsum"])
    assert result.rsum == pytest.approx(expected_metrics["rsum"])
    i2t = metrics[metrics["direction"] == "i2t"].iloc[0]
    assert i2t["r1"] == pytest.approx(expected_metrics["i2t_r1"])
    assert metrics["checkpoint"].iloc[0] == world["checkpoint"]

    ranks = pd.read_parquet(out / "ranks")
    assert len(ranks) == gallery.num_images + gallery.num_captions
    assert set(ranks.loc[ranks["direction"] == "t2i", "query_id"]) == set(gallery.caption_ids)
    history = pd.read_parquet(out / "history")
    assert len(history) == len(pd.read_parquet(world["run"] / "history.parquet"))

    assert len(result.figures) == 2
    for png in result.figures:
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size == FIGURE_SIZE_PX
    assert evaluation_complete(config)
    assert not evaluation_complete({**config, "protocol": "5k"})

    text, html, png = report(out)
    assert "rsum" in text and "run-a" in text
    assert html.is_file() and png.is_file()


def _evaluate_process(world, out: Path, **extra) -> subprocess.Popen:
    args = [sys.executable, "-m", "smlstm.cli", "evaluate", "--checkpoint", world["checkpoint"],
            "--cache", world["cache"], "--out", str(out), "--device", "cpu", "--figures", "0"]
    for name, value in extra.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_concurrent_evaluations_are_both_reported(world, tmp_path):
    out = tmp_path / "reports"
    processes = [_evaluate_process(world, out) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    metrics = read_table(out / "metrics")
    assert metrics["run_id"].nunique() == 2 and len(metrics) == 6
    assert len(list((out / "scores").glob("run_id=*.zarr"))) == 2
    assert read_table(out / "ranks")["run_id"].nunique() == 2


def _kill_after(process: subprocess.Popen, marker: str, delay: float) -> list[str]:
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    return lines


@pytest.mark.parametrize(("marker", "delay"), [("scoring", 0.3), ("wrote", 0.0)])
def test_a_killed_evaluation_leaves_no_partial_file_visible(world, tmp_path, marker, delay):
    """Killed while scoring (many tiny blocks over the train split), or right after the score
    file: every file a reader sees is complete, and no metrics row exists without its files."""
    out = tmp_path / "reports"
    process = _evaluate_process(world, out, split="train", block_budget_mb=0.02, run_id="killed")
    lines = _kill_after(process, marker, delay)
    assert process.returncode == -signal.SIGKILL, lines

    for path in visible_files(out):
        assert "run_id=killed" in str(path)
        if path.suffix == ".parquet":
            pd.read_parquet(path)  # complete, readable
    for store in (out / "scores").glob("run_id=*.zarr") if (out / "scores").exists() else []:
        array = zarr.open_array(str(store), mode="r")
        assert array.shape == (24, 120) and np.isfinite(array[...]).all()
    metrics_dir = out / "metrics"
    if metrics_dir.exists() and not read_table(metrics_dir).empty:  # the kill came too late
        assert (out / "ranks" / "run_id=killed" / "part-0.parquet").is_file()


def _tampered_checkpoint(world, tmp_path) -> Path:
    ckpt = torch.load(world["checkpoint"], weights_only=True)
    ckpt["cache_identity"]["weights"]["sha256"] = "0" * 64
    return save_checkpoint(ckpt, tmp_path / "other" / "checkpoints" / "best.pt")


def test_a_cache_mismatch_is_refused_before_any_output(world, tmp_path):
    out = tmp_path / "reports"
    checkpoint = _tampered_checkpoint(world, tmp_path)
    with pytest.raises(CacheMismatch, match=r"cache_identity\.weights\.sha256"):
        evaluate(config_for(world, out, checkpoint=str(checkpoint)))
    assert not out.exists()

    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(checkpoint), "--cache",
                                      world["cache"], "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "cache_identity.weights.sha256" in result.stderr
    assert not out.exists()


def test_an_unwritable_reports_dir_is_refused_before_work(world, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="not a directory"):
        evaluate(config_for(world, blocker / "reports"), log=lambda line: None)

    if os.geteuid() == 0:
        return  # root writes through permission bits; the file-as-parent case covers it
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            evaluate(config_for(world, locked / "reports"), log=lambda line: None)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_bad_inputs_give_one_line_errors_and_no_output(world, tmp_path):
    out = tmp_path / "reports"
    with pytest.raises(ConfigError, match="cannot be split into 5 equal folds"):
        evaluate(config_for(world, out, protocol="coco-1k"))  # 3 test images
    with pytest.raises(ConfigError, match=r"evaluate config: protocol: "):
        EvalConfig.from_dict(config_for(world, out, protocol="2k"))
    with pytest.raises(CacheError, match="split 'nope'"):
        evaluate(config_for(world, out, split="nope"))
    assert not out.exists()


def test_ensemble_of_a_matrix_with_itself_equals_it(world, tmp_path):
    out = tmp_path / "reports"
    single = evaluate(config_for(world, out, run_id="single"), log=lambda line: None)
    both = ensemble([single.scores_path, single.scores_path], out, run_id="ens",
                    log=lambda line: None)
    np.testing.assert_array_equal(load_scores(both.scores_path)[0],
                                  load_scores(single.scores_path)[0])
    metrics = read_table(out / "metrics").set_index(["run_id", "direction"])
    for direction in ("i2t", "t2i", "both"):
        a, b = metrics.loc[("single", direction)], metrics.loc[("ens", direction)]
        for key in ("r1", "r5", "r10", "medr", "meanr", "rsum"):
            assert a[key] == b[key] or (pd.isna(a[key]) and pd.isna(b[key]))

    val = evaluate(config_for(world, out, split="val", run_id="val"), log=lambda line: None)
    with pytest.raises(ConfigError, match="split: differs"):
        ensemble([single.scores_path, val.scores_path], out, log=lambda line: None)


def test_search_scores_equal_the_score_matrix(world):
    cache = FeatureCache.open(world["cache"])
    gallery = EvalGallery.from_cache(cache, "test")
    model, vocab = model_from_checkpoint(load_checkpoint(world["checkpoint"]))
    matrix = score_matrix(model, cache, gallery, vocab, "cpu")

    k = 7  # a text query made of one gallery caption = that caption's column
    by_text = search(world["run"], cache, text=gallery.raw[k], k=2, device="cpu")
    np.testing.assert_allclose(by_text.scores, matrix[:, k], rtol=0, atol=1e-6)
    best_rows = gallery.rows[np.argsort(-by_text.scores, kind="stable")[:2]]
    assert [h.row for h in by_text.hits] == best_rows.tolist()

    i = 1  # the image file of a gallery image, through stage 1 again = that image's row
    relpath = cache.manifest.set_index("row").loc[gallery.rows[i], "relpath"]
    by_image = search(world["checkpoint"], cache, image=Path(cache.config["images"]) / relpath,
                      k=3, device="cpu")
    np.testing.assert_allclose(by_image.scores, matrix[i], rtol=0, atol=1e-5)
    assert by_image.hits[0].caption == gallery.raw[int(np.argmax(matrix[i]))]


def test_evaluate_retrieval_flow(world, tmp_path, prefect_harness):
    from flows.evaluate import evaluate_retrieval

    out = tmp_path / "reports"
    with pytest.raises(CacheMismatch):
        evaluate_retrieval(checkpoint=str(_tampered_checkpoint(world, tmp_path)),
                           cache=world["cache"], out=str(out))
    assert not out.exists()
    summary = evaluate_retrieval(checkpoint=world["checkpoint"], cache=world["cache"],
                                 out=str(out), device="cpu", figures=1)
    assert summary["rsum"] == pytest.approx(read_table(out / "metrics")["rsum"].sum())
    assert Path(summary["scores"]).is_dir() and len(summary["figures"]) == 1
