"""Training data streamed from the feature cache: a caption Dataset and a shard-aligned sampler.

Why a custom sampler: the cache stores images in Zarr shards of `shard_size` rows, and reading
a contiguous block of a shard is several times faster than reading random single rows. So
instead of shuffling all captions globally, each epoch

1. shuffles the order of the shards (seeded by (seed, epoch)),
2. walks them in windows of `window_shards` shards,
3. shuffles the captions of the window's images and cuts them into batches of `batch_size`.

Every caption of the split is visited exactly once per epoch, and every batch touches at most
`window_shards` shards. `TrainingSet[batch]` then reads one contiguous row range per shard it
touches (`FeatureCache.read_rows`), never the whole array and never single random rows. By
default it reads each touched shard whole and keeps the last `block_cache` shards in memory
(per DataLoader worker): the batches of a window all draw from the same shards, so each shard
is read once per window instead of once per batch.

Use it with `DataLoader(dataset, batch_size=None, sampler=batch_sampler)`: the sampler yields
whole batches of caption indices, so each worker builds a whole batch.

DDP: every rank builds the same global batches and keeps its contiguous slice
(`batch_size / world_size` captions), so the union over ranks is exactly the single-process
batch, in the same order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from features.cache import FeatureCache
from features.errors import ConfigError
from smlstm.text import Vocabulary

__all__ = ["ShardBlockBatchSampler", "TrainingSet", "split_token_lists"]


def split_token_lists(cache: FeatureCache, split: str) -> list[list[str]]:
    """The tokens of every caption of a split, in caption-table order (for `Vocabulary.build`)."""
    captions = cache.captions
    return [list(tokens) for tokens in captions.loc[captions["split"] == split, "tokens"]]


class TrainingSet(Dataset):
    """Every caption of one split, paired with its image's cached features.

    Index with a sequence of caption positions (a batch, as the sampler yields them); returns a
    dict of tensors: instances (B, I, C) float32, global (B, G) float32, tokens (B, L) long
    (right-padded with 0), lengths (B,), image_ids (B,) and caption_ids (B,) (int64).

    block_cache: whole shards kept in memory per process (0: read only the rows a batch
    needs, one contiguous range per shard). Costs block_cache x shard_size x (I x C + G) x 2
    bytes per worker, e.g. 2 x 256 x (196 x 512 + 4096) x 2 B = 105 MB at paper size.
    """

    def __init__(
        self,
        cache: FeatureCache | str | Path,
        split: str,
        vocab: Vocabulary,
        max_len: int | None = None,
        block_cache: int = 2,
    ):
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache.open(cache)
        self.split = split
        self.max_len = max_len
        self.block_cache = block_cache
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        captions = self.cache.captions
        captions = captions[captions["split"] == split]
        # (row, caption_index) order: the same cache always gives the same caption positions
        captions = captions.sort_values(["row", "caption_index"], kind="stable")
        if len(captions) == 0:
            raise ConfigError(f"{self.cache.path}: split {split!r} has no captions in the cache")
        self.rows = captions["row"].to_numpy(dtype=np.int64)
        self.image_ids = captions["image_id"].to_numpy(dtype=np.int64)
        self.caption_ids = captions["caption_id"].to_numpy(dtype=np.int64)
        # Word ids as one flat array + offsets: cheap to pickle into spawned workers.
        encoded = [vocab.encode(tokens)[:max_len] or [1] for tokens in captions["tokens"]]
        self.lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.token_ids = np.fromiter(
            (i for ids in encoded for i in ids), dtype=np.int64, count=int(self.offsets[-1])
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_blocks"] = OrderedDict()  # each worker process fills its own
        return state

    def _shard_block(self, shard: int) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
        """(first row, features) of a whole shard, from the in-memory LRU or read once."""
        start = shard * self.cache.shard_size
        if shard in self._blocks:
            self._blocks.move_to_end(shard)
        else:
            stop = min(start + self.cache.shard_size, self.cache.num_images)
            self._blocks[shard] = self.cache.read_rows(start, stop)
            while len(self._blocks) > self.block_cache:
                self._blocks.popitem(last=False)
        return start, self._blocks[shard]

    def read_features(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float16 features of `rows` (any order, repeats allowed), reading one contiguous
        range per shard touched: the whole shard (kept in the block cache), or with
        block_cache=0 the lowest to the highest needed row of that shard."""
        unique = np.unique(rows)
        shard_of = unique // self.cache.shard_size
        blocks_inst, blocks_glob, block_rows = [], [], []
        for shard in np.unique(shard_of):
            needed = unique[shard_of == shard]
            if self.block_cache > 0:
                start, (inst, glob) = self._shard_block(int(shard))
            else:
                start, stop = int(needed[0]), int(needed[-1]) + 1
                inst, glob = self.cache.read_rows(start, stop)
            keep = needed - start
            blocks_inst.append(inst[keep])
            blocks_glob.append(glob[keep])
            block_rows.append(needed)
        inst = np.concatenate(blocks_inst)
        glob = np.concatenate(blocks_glob)
        where = np.searchsorted(np.concatenate(block_rows), rows)  # unique is sorted
        return inst[where], glob[where]

    def __getitem__(self, batch: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        index = np.asarray(batch, dtype=np.int64)
        if index.ndim != 1:
            raise TypeError("TrainingSet is indexed with a 1-d batch of caption positions")
        inst, glob = self.read_features(self.rows[index])
        lengths = self.lengths[index]
        tokens = np.zeros((len(index), int(lengths.max())), dtype=np.int64)
        for out_row, (position, length) in enumerate(zip(index, lengths, strict=True)):
            start = self.offsets[position]
            tokens[out_row, :length] = self.token_ids[start : start + length]
        return {
            "instances": torch.from_numpy(inst).float(),
            "global": torch.from_numpy(glob).float(),
            "tokens": torch.from_numpy(tokens),
            "lengths": torch.from_numpy(lengths.copy()),
            "image_ids": torch.from_numpy(self.image_ids[index]),
            "caption_ids": torch.from_numpy(self.caption_ids[index]),
        }


class ShardBlockBatchSampler(Sampler[list[int]]):
    """Yields batches of caption positions, shard-aligned, each caption once per epoch.

    caption_rows[k] is the cache row of caption k (`TrainingSet.rows`). A window's last
    partial batch is kept when it has at least 2 captions (and `drop_last` is False); under
    DDP its size is rounded down to a multiple of world_size so every rank gets an equal slice
    (the few captions cut are different ones each epoch).

    Deterministic: the batches of an epoch depend only on (seed, epoch). Call `set_epoch`
    before each epoch and `skip_batches(k)` to resume after k batches of it.
    """

    def __init__(
        self,
        caption_rows: np.ndarray,
        shard_size: int,
        batch_size: int,
        *,
        window_shards: int = 2,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 2:
            raise ConfigError(f"batch_size: must be >= 2 for in-batch negatives, got {batch_size}")
        if window_shards < 1:
            raise ConfigError(f"window_shards: must be >= 1, got {window_shards}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} / world_size {world_size}: invalid")
        if batch_size % world_size:
            raise ConfigError(
                f"batch_size: {batch_size} is not divisible by the {world_size} DDP processes"
            )
        self.caption_rows = np.asarray(caption_rows, dtype=np.int64)
        self.shard_size = int(shard_size)
        self.batch_size = batch_size
        self.window_shards = window_shards
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._skip = 0
        shard_of = self.caption_rows // self.shard_size
        self.shards = np.unique(shard_of)
        # caption positions of each shard, in position order (the shuffle happens per window)
        self._by_shard = {int(s): np.flatnonzero(shard_of == s) for s in self.shards}
        self._plans: dict[int, list[np.ndarray]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields (resets skip_batches)."""
        self.epoch = int(epoch)
        self._skip = 0

    def skip_batches(self, count: int) -> None:
        """Skip the first `count` batches of the current epoch in the next iteration (resume)."""
        self._skip = int(count)

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """All global batches of an epoch (caption positions), before the DDP split."""
        if epoch not in self._plans:
            self._plans = {epoch: self._plan(epoch)}  # keep one epoch: plans are cheap
        return self._plans[epoch]

    def _plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.shards)
        batches = []
        for w in range(0, len(order), self.window_shards):
            window = order[w : w + self.window_shards]
            positions = np.concatenate([self._by_shard[int(s)] for s in window])
            positions = rng.permutation(positions)
            for start in range(0, len(positions), self.batch_size):
                batch = positions[start : start + self.batch_size]
                if len(batch) < self.batch_size:
                    batch = batch[: len(batch) - len(batch) % self.world_size]
                    if self.drop_last or len(batch) < max(2, self.world_size):
                        continue
                batches.append(batch)
        return batches

    def local_slice(self, batch: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch."""
        per_rank = len(batch) // self.world_size
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        skip, self._skip = self._skip, 0  # a skip applies to one iteration only
        for batch in batches[skip:]:
            yield self.local_slice(batch).tolist()

    def __len__(self) -> int:
        return max(0, len(self.global_batches(self.epoch)) - self._skip)
