"""Benchmark: training steps/s streaming from the Zarr cache vs the same batches in memory.

    .venv/bin/python bench/train.py [--cache DIR] [--steps 40] [--batch-size 64] [--workers 1]

Both runs take the same batches (the shard-aligned sampler of epoch 0) through the same
training step (smlstm.train.batch_loss, Adam, grad clip) from the same initial weights:
- streaming: DataLoader(TrainingSet, batch_size=None, sampler=...) with worker processes
  reading contiguous shard blocks from Zarr while the main process trains;
- in memory: the batches read beforehand into a list of tensors.
The ratio streaming / in-memory steps/s is the cost of streaming (goal >= 0.95). Also reports
pairs/s (scored image-caption pairs, B x B per step) and peak RSS of the main process and of
the DataLoader workers. Without --cache it builds a shapes cache (128 px, 4x4 grid, random
VGG-19 weights) under runs/bench/cache-train (git-ignored). Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from features.cache import FeatureCache  # noqa: E402
from smlstm.data import ShardBlockBatchSampler, TrainingSet, split_token_lists  # noqa: E402
from smlstm.loss import LossConfig  # noqa: E402
from smlstm.model import SMLSTM, ModelConfig  # noqa: E402
from smlstm.text import Vocabulary  # noqa: E402
from smlstm.train import BatchScorer, batch_loss  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def build_cache(out: Path, images: int, size: int) -> Path:
    """A shapes cache with random weights (reused when it already exists)."""
    from features.extract import run_extraction
    from features.shapes import make_shapes

    if (out / "captions.parquet").exists():
        return out
    data = out.with_name(out.name + "-shapes")
    dataset = make_shapes(data, images=images, seed=0, size=size, splits=(0.8, 0.1, 0.1))
    run_extraction(dict(dataset=str(dataset), images=str(data), out=str(out), weights="random",
                        image_size=size, shard_size=32, workers=1, device="auto"),
                   progress=print)
    return out


def run_steps(batches, model: SMLSTM, device: torch.device, steps: int, warmup: int) -> dict:
    """Train `steps` steps from `batches`; time them after `warmup` steps."""
    scorer = BatchScorer(model, distributed=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    loss_config = LossConfig()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    pairs = 0
    started = first = time.perf_counter()
    for step, batch in enumerate(batches):
        if step == steps:
            break
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, pairs = time.perf_counter(), 0
        with autocast:
            loss, scores = batch_loss(scorer, batch, device, False, loss_config, epoch=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        pairs += scores.shape[0] * scores.shape[1]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    timed = steps - warmup
    return {"steps_timed": timed, "seconds": seconds, "steps_per_s": timed / seconds,
            "pairs_per_s": pairs / seconds, "seconds_with_warmup": time.perf_counter() - first}


def _median(runs: list[dict]) -> dict:
    """The run with the median steps/s."""
    return sorted(runs, key=lambda run: run["steps_per_s"])[len(runs) // 2]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", help="an existing feature cache (default: build one)")
    parser.add_argument("--images", type=int, default=320, help="images of the built cache")
    parser.add_argument("--size", type=int, default=128, help="image side of the built cache")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7,
                        help="alternate the two modes this many times; report the medians")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the training process (0: cores - workers)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    # Both modes train with the same thread count, so the ratio isolates the cost of streaming.
    # Leaving cores to the workers matters on small machines: OpenMP threads that share a core
    # with a busy worker stall each other (2 threads + 2 workers on 2 cores ran 3-10x slower).
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - args.workers))

    RESULTS.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache) if args.cache else build_cache(
        ROOT / "runs" / "bench" / "cache-train", args.images, args.size)
    cache = FeatureCache.open(cache_dir)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    vocab = Vocabulary.build(split_token_lists(cache, "train"))
    dataset = TrainingSet(cache, "train", vocab)
    sampler = ShardBlockBatchSampler(dataset.rows, cache.shard_size, args.batch_size, seed=0)
    available = len(sampler.global_batches(0))
    steps = min(args.steps, available)
    if steps <= args.warmup:
        raise SystemExit(f"only {available} batches per epoch: use a bigger cache or batch")
    model_config = ModelConfig.small(len(vocab), instance_dim=cache.instance_dim,
                                     global_dim=cache.global_dim)

    def fresh_model() -> SMLSTM:
        torch.manual_seed(0)
        return SMLSTM(model_config).to(device).train()

    # in memory: the same batches, read before the clock starts
    sampler.set_epoch(0)
    preloaded = [dataset[batch] for batch in list(sampler)[:steps]]
    runs: dict[str, list[dict]] = {"in_memory": [], "streaming": []}
    # Alternate the modes: on a shared machine the load drifts, and medians of interleaved
    # runs compare the two under the same conditions.
    for _ in range(args.repeats):
        runs["in_memory"].append(run_steps(preloaded, fresh_model(), device, steps, args.warmup))
        sampler.set_epoch(0)
        loader = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=args.workers,
                            pin_memory=device.type == "cuda")
        runs["streaming"].append(run_steps(iter(loader), fresh_model(), device, steps,
                                           args.warmup))
        del loader  # stops the workers, so their peak RSS is counted below
    del preloaded
    in_memory, streaming = (_median(runs[mode]) for mode in ("in_memory", "streaming"))

    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {
        "bench": "train",
        "cache": str(cache_dir),
        "instances": [cache.num_instances, cache.instance_dim],
        "global_dim": cache.global_dim,
        "shard_size": cache.shard_size,
        "train_captions": len(dataset),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "model": "small",
        "parameters": sum(p.numel() for p in fresh_model().parameters()),
        "repeats": args.repeats,
        "streaming": streaming,
        "in_memory": in_memory,
        "runs": runs,
        "ratio_streaming_over_memory": streaming["steps_per_s"] / in_memory["steps_per_s"],
        "goal_ratio": 0.95,
        "peak_rss_mb": {"main": rss_self, "largest_worker": rss_children},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    result["meets_goal"] = result["ratio_streaming_over_memory"] >= result["goal_ratio"]
    (RESULTS / "train.json").write_text(json.dumps(result, indent=2))
    print(f"streaming {streaming['steps_per_s']:.2f} steps/s ({streaming['pairs_per_s']:,.0f} "
          f"pairs/s), in memory {in_memory['steps_per_s']:.2f} steps/s "
          f"({in_memory['pairs_per_s']:,.0f} pairs/s): ratio "
          f"{result['ratio_streaming_over_memory']:.3f} (goal >= 0.95); peak RSS main "
          f"{rss_self:.0f} MB, worker {rss_children:.0f} MB -> {RESULTS / 'train.json'}")
    return result


if __name__ == "__main__":
    main()
