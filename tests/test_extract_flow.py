"""The `extract-features` Prefect flow against a real temporary Prefect server.

In process, and on a real 2-process Dask LocalCluster, the flow must write the same bytes as
the library's own run_extraction; a bad parameter must fail the flow run before any output.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import zarr

from features.errors import ConfigError
from features.extract import run_extraction
from features.shapes import make_shapes
from flows.extract import extract_features

PARAMS = dict(
    weights="random",
    image_size=64,
    shard_size=4,
    batch_size=4,
    workers=1,
    device="cpu",
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, 12, seed=7, size=64)  # -> 3 shards of 4
    return root


@pytest.fixture(scope="module")
def library_cache(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("library") / "cache"
    config = dict(dataset=str(data / "dataset.json"), images=str(data), out=str(out), **PARAMS)
    run_extraction(config, progress=None)
    return out


def _flow_args(data: Path, out: Path) -> dict:
    return dict(dataset=str(data / "dataset.json"), images=str(data), out=str(out), **PARAMS)


def _assert_same_cache(a: Path, b: Path) -> None:
    store_a = zarr.open_group(str(a / "features.zarr"), mode="r")
    store_b = zarr.open_group(str(b / "features.zarr"), mode="r")
    for name in ("instances", "global", "shard_done"):
        assert store_a[name][:].tobytes() == store_b[name][:].tobytes(), name
    assert store_a.attrs["identity_hash"] == store_b.attrs["identity_hash"]
    for table in ("manifest", "captions", "failures"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(a / f"{table}.parquet"), pd.read_parquet(b / f"{table}.parquet")
        )


def test_flow_in_process_equals_library_run(prefect_harness, data, library_cache, tmp_path):
    out = tmp_path / "cache"
    summary = extract_features(**_flow_args(data, out))
    assert summary["cache"] == str(out)
    assert (summary["num_images"], summary["good_images"], summary["failures"]) == (12, 12, 0)
    assert summary["shards_extracted"] == [0, 1, 2] and summary["images_per_s"] > 0
    _assert_same_cache(out, library_cache)

    again = extract_features(**_flow_args(data, out))  # a rerun resumes: nothing left to do
    assert again["shards_extracted"] == [] and again["identity_hash"] == summary["identity_hash"]


def test_flow_on_local_dask_cluster_equals_local_run(
    prefect_harness, data, library_cache, tmp_path
):
    out = tmp_path / "cache"
    summary = extract_features(**_flow_args(data, out), local_cluster_workers=2)
    assert sorted(summary["shards_extracted"]) == [0, 1, 2]
    _assert_same_cache(out, library_cache)


def test_bad_parameter_fails_flow_run_and_writes_nothing(prefect_harness, data, tmp_path):
    out = tmp_path / "cache"
    args = {**_flow_args(data, out), "image_size": 100}
    state = extract_features(**args, return_state=True)
    assert state.is_failed()
    assert "image_size: must be a multiple of 32, got 100" in state.message
    with pytest.raises(ConfigError) as caught:
        state.result()
    assert "\n" not in str(caught.value)
    assert not out.exists()
