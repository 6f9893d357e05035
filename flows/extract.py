"""Prefect flow `extract-features`: stage 1 with one task per missing shard.

The flow is thin: `features.extract` does the work and also runs without Prefect
(`smlstm extract`). The flow validates and plans in its own process (failing the run with
the one-line ConfigError/DatasetError message before anything is written), maps
`extract_shard_task` over the shards still missing, then finalizes.

Where shard tasks run depends on the parameters, so the runner is chosen at call time and
the mapping happens in a subflow built with `with_options(task_runner=...)`:
- default: in this process, one shard at a time (each shard already decodes in DataLoader
  workers and uses every core for the forward pass);
- `dask_address` (or env DASK_SCHEDULER_ADDRESS): an existing Dask cluster;
- `local_cluster_workers=N`: a throw-away local Dask cluster of N single-threaded processes.
A shard task ships only the config dict and the shard index; each Dask worker loads VGG once.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any, Literal

import pandas as pd
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from features.config import ExtractConfig
from features.errors import InputError
from features.extract import extract_shard, finalize_extraction, plan_extraction

__all__ = ["extract_features", "extract_shard_task"]


def _retry_unless_input_error(task, task_run, state) -> bool:
    """Retry transient failures (I/O, a lost worker), never a mistake in the user's input."""
    return not isinstance(state.data, InputError)


@task(
    name="extract-shard",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_unless_input_error,
    # The shard's done mark in the Zarr store is the only truth about what is done: a Prefect
    # result cache could claim a shard whose data has since been deleted.
    cache_policy=NO_CACHE,
    task_run_name="extract-shard-{shard}",
)
def extract_shard_task(config: dict[str, Any], shard: int) -> dict[str, Any]:
    """Extract one shard (in whichever process the task runner picked)."""
    result = extract_shard(config, shard)
    get_run_logger().info(
        "shard %d rows %d-%d: %d images (%d failed) in %.1f s, %.1f images/s",
        result.shard,
        result.start,
        result.stop - 1,
        result.images,
        result.failures,
        result.seconds,
        result.images_per_s,
    )
    return asdict(result)


@flow(name="extract-features-shards")
def _extract_shards(config: dict[str, Any], shards: list[int]) -> list[dict[str, Any]]:
    """Map the shard task over `shards` with the task runner given by with_options."""
    futures = extract_shard_task.map(unmapped(config), shards)
    return [future.result() for future in futures]


def _task_runner(dask_address: str | None, local_cluster_workers: int):
    address = dask_address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    if address or local_cluster_workers > 0:
        from prefect_dask import DaskTaskRunner  # only needed (and imported) when asked for

        if address:
            return DaskTaskRunner(address=address), f"Dask cluster at {address}"
        cluster = {
            "n_workers": local_cluster_workers,
            "threads_per_worker": 1,  # torch already uses every core of a worker process
            "processes": True,
            "dashboard_address": ":0",  # a free port: 8787 is often taken
        }
        return DaskTaskRunner(cluster_kwargs=cluster), (
            f"local Dask cluster of {local_cluster_workers} processes"
        )
    return ThreadPoolTaskRunner(max_workers=1), "this process, one shard at a time"


@flow(name="extract-features")
def extract_features(
    dataset: str,
    images: str,
    out: str,
    weights: Literal["imagenet", "random"] = "imagenet",
    weights_file: str | None = None,
    seed: int = 0,
    image_size: int = 448,
    layer: Literal["pool5", "conv5_4"] = "pool5",
    global_mode: Literal["same_pass", "separate_224", "off"] = "same_pass",
    shard_size: int = 256,
    batch_size: int = 16,
    workers: int = 2,
    max_pixels: int = 50_000_000,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    overwrite: bool = False,
    dask_address: str | None = None,
    local_cluster_workers: int = 0,
) -> dict[str, Any]:
    """Extract VGG-19 features of a Karpathy-split dataset into a resumable Zarr cache.

    Returns {"cache", "num_images", "good_images", "failures", "shards_extracted",
    "images_per_s", "identity_hash"}. Rerunning with the same parameters resumes.
    """
    logger = get_run_logger()
    fields = {
        "dataset": dataset,
        "images": images,
        "out": out,
        "weights": weights,
        "weights_file": weights_file,
        "seed": seed,
        "image_size": image_size,
        "layer": layer,
        "global_mode": global_mode,
        "shard_size": shard_size,
        "batch_size": batch_size,
        "workers": workers,
        "max_pixels": max_pixels,
        "device": device,
        "overwrite": overwrite,
    }
    try:
        config = ExtractConfig.from_dict(fields, source="extract-features")
        plan = plan_extraction(config)
    except InputError as err:
        logger.error("error: %s", err)
        raise  # fails the flow run with the one-line message; nothing was written

    logger.info(
        "cache %s: %d images, %d shards of %d; weights %s sha256 %s",
        config.out,
        plan.num_images,
        plan.num_shards,
        config.shard_size,
        plan.weights["name"],
        plan.weights["sha256"][:12],
    )
    results: list[dict[str, Any]] = []
    seconds = 0.0
    if plan.todo:
        runner, where = _task_runner(dask_address, local_cluster_workers)
        logger.info("extracting shards %s on %s", plan.todo, where)
        started = time.perf_counter()
        results = _extract_shards.with_options(task_runner=runner)(config.to_dict(), plan.todo)
        seconds = time.perf_counter() - started
    else:
        logger.info("all shards already extracted")

    cache = finalize_extraction(plan)
    extracted_images = sum(result["images"] for result in results)
    failures = len(pd.read_parquet(f"{str(cache).rstrip('/')}/failures.parquet"))
    summary = {
        "cache": str(cache),
        "num_images": plan.num_images,
        "good_images": plan.num_images - failures,
        "failures": failures,
        "shards_extracted": [result["shard"] for result in results],
        "images_per_s": extracted_images / seconds if seconds > 0 else 0.0,
        "identity_hash": plan.identity_hash,
    }
    logger.info(
        "done: %s (%d good, %d failed images; %.1f images/s)",
        summary["cache"],
        summary["good_images"],
        failures,
        summary["images_per_s"],
    )
    return summary
