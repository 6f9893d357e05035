"""smlstm.data: the shard-aligned batch sampler and the caption Dataset over a real cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from features.cache import FeatureCache
from features.errors import ConfigError
from smlstm.data import ShardBlockBatchSampler, TrainingSet, split_token_lists
from smlstm.text import Vocabulary


def build_tiny_cache(root: Path, name: str = "cache", images: int = 150, weights_seed: int = 0,
                     shard_size: int = 16) -> Path:
    """A real shapes cache (64 px, random VGG-19, 2x2 grid), built once per test session.

    150 images split 90 / 30 / 30, no twins: big enough that a short run beats chance on val.
    """
    from features.extract import run_extraction
    from features.shapes import make_shapes

    out = root / name
    if (out / "captions.parquet").exists():
        return out
    data = root / f"{name}-shapes"
    dataset = make_shapes(data, images=images, seed=0, size=64, splits=(0.6, 0.2, 0.2),
                          twin_fraction=0.0)
    run_extraction(
        dict(dataset=str(dataset), images=str(data), out=str(out), weights="random",
             seed=weights_seed, image_size=64, shard_size=shard_size, workers=0, device="cpu"),
        progress=None,
    )
    return out


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> FeatureCache:
    return FeatureCache.open(build_tiny_cache(tmp_path_factory.getbasetemp()))


# ---------------------------------------------------------------------------------------------
# the sampler on its own (caption rows made up, several captions per image, uneven shards)


def _rows(images: int = 53, per_image: int = 5, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(images), per_image)
    keep = rng.random(len(rows)) > 0.1  # some images lose captions (failed rows, other splits)
    return rows[keep]


def _epoch(sampler: ShardBlockBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_every_caption_once_per_epoch_in_shard_aligned_batches():
    rows = _rows()
    sampler = ShardBlockBatchSampler(rows, shard_size=8, batch_size=16, window_shards=2, seed=3)
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(len(rows)))  # each caption exactly once
        for batch in batches:
            assert 2 <= len(batch) <= 16
            assert len(np.unique(rows[batch] // 8)) <= 2  # at most window_shards shards
        assert len(sampler) == len(batches)


def test_partial_batches_follow_the_option():
    rows = np.array([0, 0, 1, 1, 1, 9, 9, 9, 9, 9])  # shard 0: 5 captions, shard 1: 5 captions
    keep = ShardBlockBatchSampler(rows, shard_size=8, batch_size=4, window_shards=1)
    sizes = sorted(len(b) for b in keep)
    assert sizes == [4, 4]  # the two partial batches of 1 caption each are dropped
    rows = np.array([0, 0, 1, 1, 1, 1, 9, 9, 9, 9, 9, 9])  # partials of 2
    keep = ShardBlockBatchSampler(rows, 8, 4, window_shards=1)
    assert sorted(len(b) for b in keep) == [2, 2, 4, 4]
    drop = ShardBlockBatchSampler(rows, 8, 4, window_shards=1, drop_last=True)
    assert sorted(len(b) for b in drop) == [4, 4]


def test_deterministic_per_seed_and_different_per_epoch():
    rows = _rows()
    a = ShardBlockBatchSampler(rows, 8, 16, seed=7)
    b = ShardBlockBatchSampler(rows, 8, 16, seed=7)
    c = ShardBlockBatchSampler(rows, 8, 16, seed=8)
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 1) == _epoch(b, 1)
    assert _epoch(a, 0) != _epoch(a, 1)
    assert _epoch(a, 0) != _epoch(c, 0)


def test_skip_batches_resumes_inside_an_epoch():
    sampler = ShardBlockBatchSampler(_rows(), 8, 16, seed=2)
    full = _epoch(sampler, 4)
    sampler.set_epoch(4)
    sampler.skip_batches(3)
    assert len(sampler) == len(full) - 3
    assert list(sampler) == full[3:]
    assert list(sampler) == full  # a skip applies to one iteration only


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_slices_make_up_the_single_process_batch(world_size):
    rows = _rows()
    planner = ShardBlockBatchSampler(rows, 8, 16, seed=5, world_size=world_size)
    single = [batch.tolist() for batch in planner.global_batches(2)]
    ranks = [
        _epoch(ShardBlockBatchSampler(rows, 8, 16, seed=5, rank=r, world_size=world_size), 2)
        for r in range(world_size)
    ]
    assert all(len(r) == len(single) for r in ranks)
    for i, batch in enumerate(single):
        parts = [r[i] for r in ranks]
        assert len({len(p) for p in parts}) == 1  # equal slices: DDP all_gather needs it
        assert sum(parts, []) == batch  # rank order = the global batch's order
    flat = sorted(sum(single, []))
    assert len(flat) == len(set(flat)) and len(flat) >= len(rows) - 8 * (world_size - 1)


def test_ddp_sampler_equals_one_process_when_sizes_divide():
    rows = np.repeat(np.arange(32), 5)  # 4 shards of 8 images, 80 captions per window
    one = _epoch(ShardBlockBatchSampler(rows, 8, 16, seed=1), 0)
    two = [_epoch(ShardBlockBatchSampler(rows, 8, 16, seed=1, rank=r, world_size=2), 0)
           for r in range(2)]
    assert [a + b for a, b in zip(*two, strict=True)] == one


def test_bad_sampler_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="not divisible"):
        ShardBlockBatchSampler(_rows(), 8, 10, world_size=4)
    with pytest.raises(ConfigError, match="batch_size"):
        ShardBlockBatchSampler(_rows(), 8, 1)


# ---------------------------------------------------------------------------------------------
# the dataset on a real cache, in a real DataLoader with worker processes


def test_dataloader_with_workers_returns_the_right_features(tiny_cache):
    vocab = Vocabulary.build(split_token_lists(tiny_cache, "train"))
    dataset = TrainingSet(tiny_cache, "train", vocab)
    captions = tiny_cache.captions.set_index("caption_id")
    assert len(dataset) == int((tiny_cache.captions["split"] == "train").sum())
    sampler = ShardBlockBatchSampler(dataset.rows, tiny_cache.shard_size, 12, seed=0)
    loader = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=2)
    seen = []
    for batch in loader:
        n = len(batch["caption_ids"])
        assert batch["instances"].shape == (n, tiny_cache.num_instances, tiny_cache.instance_dim)
        assert batch["instances"].dtype == torch.float32
        assert batch["global"].shape == (n, tiny_cache.global_dim)
        for k, caption_id in enumerate(batch["caption_ids"].tolist()):
            record = captions.loc[caption_id]
            inst, glob = tiny_cache.read_rows(int(record["row"]), int(record["row"]) + 1)
            assert torch.equal(batch["instances"][k], torch.from_numpy(inst[0]).float())
            assert torch.equal(batch["global"][k], torch.from_numpy(glob[0]).float())
            assert batch["image_ids"][k] == record["image_id"]
            length = int(batch["lengths"][k])
            assert batch["tokens"][k, :length].tolist() == vocab.encode(record["tokens"])
            assert (batch["tokens"][k, length:] == 0).all()
        seen.extend(batch["caption_ids"].tolist())
    planned = dataset.caption_ids[np.concatenate(sampler.global_batches(0))]
    assert sorted(seen) == sorted(planned.tolist())  # every planned caption, once
    assert set(seen) <= set(captions.index[captions["split"] == "train"].tolist())
    assert np.abs(dataset[[0]]["instances"].numpy()).sum() > 0  # real features, not zeros


@pytest.mark.parametrize("block_cache", [0, 2])
def test_reads_are_contiguous_shard_blocks(tiny_cache, block_cache):
    vocab = Vocabulary.build(split_token_lists(tiny_cache, "train"))
    dataset = TrainingSet(tiny_cache, "train", vocab, block_cache=block_cache)
    size = tiny_cache.shard_size
    calls = []
    real_read = tiny_cache.read_rows

    def recording_read(start, stop):  # a spy: the real reader runs
        calls.append((start, stop))
        return real_read(start, stop)

    dataset.cache.read_rows = recording_read
    try:
        sampler = ShardBlockBatchSampler(dataset.rows, size, 16, window_shards=2, seed=0)
        touched = []
        for batch in sampler:
            before = len(calls)
            expected = dataset.read_features(dataset.rows[batch])
            torch.testing.assert_close(dataset[batch]["instances"],
                                       torch.from_numpy(expected[0]).float())
            shards = np.unique(dataset.rows[batch] // size)
            touched.extend(shards.tolist())
            new = calls[before:]
            for start, stop in new:  # each read stays inside one shard
                assert start // size == (stop - 1) // size
            if block_cache == 0:
                assert len(new) == 2 * len(shards)  # one range per shard (per call above)
        if block_cache:
            # whole shards, each read once per window: once per epoch here
            assert all(start % size == 0 for start, _ in calls)
            assert sorted(start // size for start, _ in calls) == sorted(set(touched))
    finally:
        del dataset.cache.read_rows
