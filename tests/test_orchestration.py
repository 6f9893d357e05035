"""Orchestration against real Prefect: a local server + process worker, deployments from
prefect.yaml, `prefect deployment run ... --watch`; and the `pipeline` flow's stage skipping.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from features.cache import FeatureCache
from features.errors import ConfigError
from features.shapes import make_shapes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prefect-local"
PREFECT = Path(sys.executable).parent / "prefect"

TINY_EXTRACT = {"weights": "random", "image_size": 64, "shard_size": 8, "batch_size": 8,
                "workers": 0}
TINY_TRAIN = {"preset": "small", "epochs": 2, "batch_size": 16, "lr": 1e-3, "workers": 0}
TINY_EVALUATE = {"split": "test", "protocol": "1k", "figures": 1}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("shapes")
    make_shapes(data, images=24, seed=3, size=64)
    return data


@pytest.fixture(scope="module")
def local_prefect(tmp_path_factory):
    """scripts/prefect-local start: server on 127.0.0.1, pool, deploy --all, worker. Always stopped."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(home), "SMLSTM_PREFECT_PORT": str(port),
            "SMLSTM_VENV_BIN": str(Path(sys.executable).parent)}
    try:
        started = subprocess.run([str(SCRIPT), "start"], env=env, cwd=ROOT, text=True,
                                 capture_output=True, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        yield env | {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, cwd=ROOT, capture_output=True, timeout=120)
        assert not (home / "run" / "server.pid").exists()
        assert not (home / "run" / "worker.pid").exists()


def _run_deployment(env: dict[str, str], name: str, params: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(PREFECT), "deployment", "run", name, "--params", json.dumps(params), "--watch",
         "--watch-timeout", "600"],
        env=env, cwd=ROOT, text=True, capture_output=True, timeout=660,
    )


def test_deployments_extract_train_evaluate_through_a_worker(local_prefect, shapes, tmp_path):
    """The README walkthrough: deployments from prefect.yaml, run by a process worker."""
    listed = subprocess.run([str(PREFECT), "deployment", "ls"], env=local_prefect, text=True,
                            capture_output=True, timeout=60)
    for flow_name in ("extract-features", "train-smlstm", "evaluate-retrieval", "pipeline"):
        assert flow_name in listed.stdout

    cache, run, reports = tmp_path / "cache", tmp_path / "run", tmp_path / "reports"
    done = _run_deployment(local_prefect, "extract-features/shapes", {
        "dataset": str(shapes / "dataset.json"), "images": str(shapes), "out": str(cache),
        **TINY_EXTRACT})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Completed" in done.stdout
    opened = FeatureCache.open(cache)
    assert opened.num_images == 24 and opened.grid == (2, 2)
    manifest = pd.read_parquet(cache / "manifest.parquet")
    assert sorted(manifest["row"]) == list(range(24))
    assert (shapes / "images" / manifest.iloc[0]["filename"]).exists()

    done = _run_deployment(local_prefect, "train-smlstm/shapes", {
        "cache": str(cache), "out": str(run), **TINY_TRAIN, "resume": False})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (run / "checkpoints" / "best.pt").exists()

    done = _run_deployment(local_prefect, "evaluate-retrieval/shapes", {
        "checkpoint": str(run / "checkpoints" / "best.pt"), "cache": str(cache),
        "out": str(reports), **TINY_EVALUATE})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = pd.read_parquet(reports / "metrics")
    assert set(metrics["direction"]) >= {"i2t", "t2i"}
    assert metrics["rsum"].notna().any()


def test_a_bad_deployment_parameter_fails_the_run_before_any_output(local_prefect, shapes,
                                                                    tmp_path):
    out = tmp_path / "cache"
    done = _run_deployment(local_prefect, "extract-features/shapes", {
        "dataset": str(shapes / "dataset.json"), "images": str(shapes), "out": str(out),
        **TINY_EXTRACT, "image_size": 100})
    assert done.returncode != 0
    assert "Failed" in done.stdout
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# the pipeline flow, in-process against the session's temporary Prefect server


def _pipeline_params(shapes: Path, workdir: Path) -> dict:
    return {"dataset": str(shapes / "dataset.json"), "images": str(shapes),
            "workdir": str(workdir), "weights": "random",
            "extract": {k: v for k, v in TINY_EXTRACT.items() if k != "weights"},
            "train": TINY_TRAIN, "evaluate": TINY_EVALUATE}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


async def _task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.name for run in runs}


def test_pipeline_second_run_skips_every_stage(prefect_harness, shapes, tmp_path):
    import asyncio

    from flows.pipeline import pipeline

    params = _pipeline_params(shapes, tmp_path)
    first = pipeline(**params, return_state=True)
    assert first.is_completed(), first.message
    assert first.result()["stages"] == {"extract": "ran", "train": "ran", "evaluate": "ran"}
    before = _mtimes(tmp_path)
    assert any(name.startswith("reports/metrics/") for name in before)

    second = pipeline(**params, return_state=True)
    assert second.is_completed(), second.message
    assert second.result()["stages"] == {stage: "skipped" for stage in ("extract", "train",
                                                                         "evaluate")}
    states = asyncio.run(_task_states(second.state_details.flow_run_id))
    assert {states[f"skip-{stage}"] for stage in ("extract", "train", "evaluate")} == {"Skipped"}
    assert _mtimes(tmp_path) == before  # nothing rewritten, nothing added


def test_pipeline_refuses_a_bad_parameter_before_any_output(prefect_harness, shapes, tmp_path):
    from flows.pipeline import pipeline

    params = _pipeline_params(shapes, tmp_path / "work")
    params["train"] = {**TINY_TRAIN, "epochs": 0}
    with pytest.raises(ConfigError, match="epochs"):
        pipeline(**params)
    assert not (tmp_path / "work").exists()
