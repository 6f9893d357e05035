"""FeatureCache, the stage 1 -> 2 contract: opening checks, lazy arrays, pickling into workers."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import tiny_extract_config as _config
from torch.utils.data import DataLoader, Dataset

from features.cache import FeatureCache, identity_hash
from features.errors import CacheError, CacheMismatch
from features.extract import plan_extraction, run_extraction
from features.shapes import make_shapes


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, 10, seed=5, size=64)  # 10 images -> shards of 4, 4 and 2
    return root


@pytest.fixture(scope="module")
def cache_dir(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache"
    run_extraction(_config(data, out), progress=None)
    return out


class RowsDataset(Dataset):
    """Reads one row per item from a FeatureCache, as stage 2's datasets do."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache

    def __len__(self) -> int:
        return self.cache.num_images

    def __getitem__(self, row: int):
        had_handle = self.cache._instances is not None
        instances, global_ = self.cache.read_rows(row, row + 1)
        return torch.from_numpy(instances[0]), torch.from_numpy(global_[0]), had_handle, os.getpid()


def test_read_rows_blocks_and_splits(cache_dir):
    cache = FeatureCache.open(cache_dir)
    instances, global_ = cache.read_rows(2, 7)  # crosses a shard boundary
    assert instances.shape == (5, 4, 512) and instances.dtype == np.float16
    assert global_.shape == (5, 4096) and global_.dtype == np.float16
    group = zarr.open_group(str(cache_dir / "features.zarr"), mode="r")
    np.testing.assert_array_equal(instances, group["instances"][2:7])
    np.testing.assert_array_equal(global_, group["global"][2:7])
    with pytest.raises(IndexError):
        cache.read_rows(8, 11)

    all_rows = np.concatenate([cache.rows(split) for split in ("train", "val", "test")])
    assert sorted(all_rows.tolist()) == list(range(10))
    for split in ("train", "val", "test"):
        rows = cache.rows(split)
        assert rows.dtype == np.int64 and (np.diff(rows) > 0).all()
        expected = cache.manifest.loc[cache.manifest["split"] == split, "row"]
        assert set(rows.tolist()) == set(expected.tolist())


def test_pickles_without_handles_and_reads_in_dataloader_workers(cache_dir):
    cache = FeatureCache.open(cache_dir)
    cache.read_rows(0, 1)  # opens the handles in this process
    assert cache._instances is not None
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._instances is None and clone._global is None
    assert clone.identity == cache.identity and len(clone.captions) == len(cache.captions)

    # spawn: each worker gets the cache by pickle and must open its own array handles.
    loader = DataLoader(
        RowsDataset(cache), batch_size=5, num_workers=2, multiprocessing_context="spawn"
    )
    batches = list(loader)
    instances = torch.cat([batch[0] for batch in batches]).numpy()
    global_ = torch.cat([batch[1] for batch in batches]).numpy()
    expected_instances, expected_global = cache.read_rows(0, 10)
    np.testing.assert_array_equal(instances, expected_instances)
    np.testing.assert_array_equal(global_, expected_global)
    pids = {int(pid) for batch in batches for pid in batch[3]}
    assert os.getpid() not in pids
    first_items = [bool(batch[2][0]) for batch in batches]  # each worker's first item
    assert first_items == [False, False]  # the handle was not pickled across


def test_identity_and_check_weights(cache_dir, data):
    cache = FeatureCache.open(cache_dir)
    assert cache.identity["config_hash"] == identity_hash(cache.identity["cache_fields"])
    assert cache.identity["cache_fields"]["image_size"] == 64
    assert cache.identity["weights"]["seed"] == 0
    sha = cache.weights["sha256"]
    cache.check_weights(expected_sha256=sha, expected_name="random")  # no error

    with pytest.raises(CacheMismatch) as caught:
        cache.check_weights(expected_sha256="0" * 64)
    message = str(caught.value)
    assert sha in message and "0" * 64 in message and "\n" not in message
    with pytest.raises(CacheMismatch, match="'random' differ from the expected 'imagenet'"):
        cache.check_weights(expected_name="imagenet")


def test_open_refuses_missing_incomplete_and_unfinalized(cache_dir, data, tmp_path):
    with pytest.raises(CacheError, match="no feature cache here"):
        FeatureCache.open(tmp_path / "nothing")

    planned = tmp_path / "planned"
    plan_extraction(_config(data, planned))  # store created, no shard extracted
    with pytest.raises(CacheError, match=r"cache incomplete: 0 of 3 shards done; rerun"):
        FeatureCache.open(planned)

    unfinalized = tmp_path / "unfinalized"
    shutil.copytree(cache_dir, unfinalized)
    (unfinalized / "captions.parquet").unlink()
    with pytest.raises(CacheError, match="captions.parquet missing"):
        FeatureCache.open(unfinalized)


def test_global_off_has_no_global_array(data, tmp_path):
    out = tmp_path / "cache"
    run_extraction(_config(data, out, global_mode="off", shard_size=8), progress=None)
    cache = FeatureCache.open(out)
    assert cache.global_dim == 0 and cache.global_array() is None
    instances, global_ = cache.read_rows(0, 3)
    assert instances.shape == (3, 4, 512) and global_.shape == (3, 0)
    assert not (out / "features.zarr" / "global").exists()
