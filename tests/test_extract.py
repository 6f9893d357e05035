"""Stage 1 end to end on a tiny synthetic set: real JPEGs, real VGG-19 (random weights), real Zarr.

Sizes are tiny (64 px images -> a 2x2 pool5 grid) so the whole file runs in well under a
minute on two shared cores. One reference extraction (module fixture) is compared against a
direct backbone call, an interrupted-and-resumed CLI run, and a run with broken images.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from helpers import tiny_extract_config
from typer.testing import CliRunner

from features.backbone import FeatureExtractor, load_vgg19
from features.cache import FeatureCache
from features.config import ExtractConfig
from features.errors import CacheError, CacheMismatch, ConfigError
from features.extract import (
    extract_shard,
    extraction_complete,
    finalize_extraction,
    plan_extraction,
    run_extraction,
)
from features.images import ImageFolderDataset, collate_images
from features.shapes import make_shapes
from smlstm.cli import app

NUM_IMAGES = 24
SHARD = 4  # -> 6 shards
BATCH = 4


def _config(data: Path, out: Path, **overrides) -> ExtractConfig:
    fields = {"shard_size": SHARD, "batch_size": BATCH, "workers": 1, **overrides}
    return tiny_extract_config(data, out, **fields)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, NUM_IMAGES, seed=3, size=64)
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """One uninterrupted extraction that the other tests compare against."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    summary = run_extraction(_config(data, out), progress=None)
    assert summary.num_failures == 0 and summary.shards_extracted == list(range(6))
    return out


def _arrays(cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(str(cache_dir / "features.zarr"), mode="r")
    return group["instances"][:], group["global"][:]


def _done_markers(cache_dir: Path) -> int:
    chunks = cache_dir / "features.zarr" / "shard_done" / "c"
    return len(list(chunks.iterdir())) if chunks.exists() else 0


# ----------------------------------------------------------------------------------------------


def test_cache_layout_shapes_and_dtypes(reference, data):
    cache = FeatureCache.open(reference)
    assert (cache.num_images, cache.grid, cache.num_instances) == (NUM_IMAGES, (2, 2), 4)
    assert (cache.instance_dim, cache.global_dim, cache.shard_size) == (512, 4096, SHARD)

    instances, global_ = cache.instances_array(), cache.global_array()
    assert instances.shape == (NUM_IMAGES, 4, 512) and instances.dtype == np.float16
    assert global_.shape == (NUM_IMAGES, 4096) and global_.dtype == np.float16
    assert instances.chunks == (1, 4, 512) and instances.shards == (SHARD, 4, 512)
    assert global_.chunks == (1, 4096) and global_.shards == (SHARD, 4096)
    done = zarr.open_array(str(reference / "features.zarr" / "shard_done"), mode="r")
    assert done.dtype == np.uint8 and done[:].tolist() == [1] * 6

    # Every image decoded: no all-zero row, and fc7 after ReLU is non-negative.
    assert np.abs(instances[:]).reshape(NUM_IMAGES, -1).max(axis=1).min() > 0
    assert (global_[:] >= 0).all()

    dataset = json.loads((data / "dataset.json").read_text())["images"]
    assert cache.manifest["row"].tolist() == list(range(NUM_IMAGES))
    assert cache.manifest["image_id"].tolist() == [image["imgid"] for image in dataset]
    assert (cache.manifest[["width", "height"]] == 64).all().all()
    assert len(cache.failures) == 0
    assert len(cache.captions) == sum(len(image["sentences"]) for image in dataset)
    first = cache.captions.iloc[0]
    assert first["caption_id"] == dataset[0]["sentences"][0]["sentid"]
    assert list(first["tokens"]) == dataset[0]["sentences"][0]["tokens"]
    assert cache.captions.groupby("row")["caption_index"].apply(list).iloc[0] == [0, 1, 2, 3, 4]

    saved = ExtractConfig.from_json(reference / "extract_config.json")
    assert saved.image_size == 64 and saved.shard_size == SHARD
    assert cache.weights["name"] == "random" and cache.weights["seed"] == 0
    for shard in range(6):
        status = pd.read_parquet(reference / "shards" / f"{shard}.parquet")
        assert status["row"].tolist() == list(range(shard * SHARD, (shard + 1) * SHARD))


def test_cache_info_command(reference, tmp_path):
    result = CliRunner().invoke(app, ["cache-info", str(reference), "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["num_images"], info["good_images"], info["failed_images"]) == (
        NUM_IMAGES,
        NUM_IMAGES,
        0,
    )
    assert info["instances"] == [NUM_IMAGES, 4, 512] and info["weights"]["name"] == "random"
    assert sum(split["images"] for split in info["splits"].values()) == NUM_IMAGES
    text = CliRunner().invoke(app, ["cache-info", str(reference)])
    assert text.exit_code == 0 and f"config_hash    {info['config_hash']}" in text.stdout

    missing = CliRunner().invoke(app, ["cache-info", str(tmp_path / "none")])
    assert missing.exit_code == 2 and missing.stderr.startswith("error: ")
    assert missing.stderr.count("\n") == 1


def test_cache_equals_direct_backbone_call(reference, data):
    vgg, identity = load_vgg19("random", seed=0)
    extractor = FeatureExtractor(vgg, layer="pool5", global_mode="same_pass")
    dataset = json.loads((data / "dataset.json").read_text())["images"]
    items = [(row, str(data / "images" / image["filename"])) for row, image in enumerate(dataset)]
    cached_instances, cached_global = _arrays(reference)
    assert FeatureCache.open(reference).weights["sha256"] == identity["sha256"]
    for start in range(0, NUM_IMAGES, BATCH):  # the same batches as the extraction
        batch = collate_images(list(ImageFolderDataset(items[start : start + BATCH], 64)))
        instances, global_ = extractor(batch["image"])
        np.testing.assert_array_equal(
            cached_instances[start : start + BATCH], instances.half().numpy()
        )
        np.testing.assert_array_equal(cached_global[start : start + BATCH], global_.half().numpy())


def test_killed_run_resumes_to_identical_cache(reference, data, tmp_path):
    out = tmp_path / "cache"
    cfg = _config(data, out)
    command = [sys.executable, "-m", "smlstm.cli", "extract", "--dataset", cfg.dataset]
    command += ["--images", cfg.images, "--out", cfg.out, "--weights", "random"]
    command += ["--image-size", "64", "--shard-size", str(SHARD), "--batch-size", str(BATCH)]
    command += ["--workers", "1", "--device", "cpu"]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 120
    try:
        while _done_markers(out) < 2:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "extraction never finished 2 shards"
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the CLI and its DataLoader worker
        process.wait()
    assert process.returncode == -signal.SIGKILL

    group = zarr.open_group(str(out / "features.zarr"), mode="r")
    done_before = group["shard_done"][:]
    finished = [int(k) for k in np.flatnonzero(done_before)]
    missing = [int(k) for k in np.flatnonzero(done_before == 0)]
    assert len(finished) >= 2 and missing, "the kill came too late to test a resume"
    with pytest.raises(CacheError, match=rf"{len(finished)} of 6 shards done"):
        FeatureCache.open(out)
    mtimes = {k: (out / "shards" / f"{k}.parquet").stat().st_mtime_ns for k in finished}

    lines: list[str] = []
    summary = run_extraction(cfg, progress=lines.append)
    assert summary.shards_extracted == missing
    assert f"extracting shards {missing}" in "\n".join(lines)
    for k, mtime in mtimes.items():  # finished shards were not rewritten
        assert (out / "shards" / f"{k}.parquet").stat().st_mtime_ns == mtime

    for resumed, uninterrupted in zip(_arrays(out), _arrays(reference), strict=True):
        assert resumed.tobytes() == uninterrupted.tobytes()
    for table in ("manifest", "captions", "failures"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / f"{table}.parquet"),
            pd.read_parquet(reference / f"{table}.parquet"),
        )
    assert FeatureCache.open(out).identity == FeatureCache.open(reference).identity


def test_other_config_or_weights_refused_unless_overwrite(reference, data, tmp_path):
    store_meta = reference / "features.zarr" / "zarr.json"
    before = store_meta.stat().st_mtime_ns
    with pytest.raises(CacheMismatch, match=r"image_size: cache 64, this run 96"):
        plan_extraction(_config(data, reference, image_size=96))
    with pytest.raises(CacheMismatch, match=r"weights\.seed: cache 0, this run 1") as caught:
        plan_extraction(_config(data, reference, seed=1))
    assert "weights.sha256" in str(caught.value) and "\n" not in str(caught.value)
    assert store_meta.stat().st_mtime_ns == before  # refused: nothing touched
    FeatureCache.open(reference)
    assert extraction_complete(_config(data, reference))
    assert not extraction_complete(_config(data, reference, image_size=96))

    # A run-time field (workers, batch_size, device) may differ: the same cache, nothing to do.
    assert plan_extraction(_config(data, reference, workers=0, batch_size=2)).todo == []

    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    plan = plan_extraction(_config(data, copy, seed=1, overwrite=True))
    assert plan.todo == list(range(6)) and plan.weights["seed"] == 1
    assert not (copy / "manifest.parquet").exists() and not (copy / "shards").exists()
    attrs = zarr.open_group(str(copy / "features.zarr"), mode="r").attrs
    assert attrs["weights"]["seed"] == 1
    with pytest.raises(CacheError, match="0 of 6 shards done"):
        FeatureCache.open(copy)


@pytest.mark.parametrize("problem", ["invalid_json", "missing_images_dir", "bad_field"])
def test_invalid_input_exits_2_with_one_line_and_writes_nothing(problem, data, tmp_path):
    dataset, images = data / "dataset.json", data
    extra: list[str] = []
    if problem == "invalid_json":
        dataset = tmp_path / "broken.json"
        dataset.write_text('{"images": [{"filename": "a.jpg", ')
    elif problem == "missing_images_dir":
        images = tmp_path / "no-such-dir"
    else:
        extra = ["--image-size", "100"]
    out = tmp_path / "out"
    args = ["extract", "--dataset", str(dataset), "--images", str(images), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--weights", "random", *extra])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    expected = {
        "invalid_json": "broken.json: invalid JSON at line 1",
        "missing_images_dir": "no-such-dir: directory not found",
        "bad_field": "image_size: must be a multiple of 32",
    }[problem]
    assert expected in result.stderr
    assert not out.exists()


def test_broken_images_are_listed_and_good_rows_unchanged(reference, data, tmp_path):
    # The first 8 images of the set, with rows 2 and 5 pointing at a truncated JPEG and at a
    # text file named .jpg.
    images_dir = tmp_path / "images"
    shutil.copytree(data / "images", images_dir)
    jpeg = (images_dir / "shapes_000002.jpg").read_bytes()
    (images_dir / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (images_dir / "text.jpg").write_text("this is not an image\n")
    records = json.loads((data / "dataset.json").read_text())["images"][:8]
    records[2]["filename"], records[5]["filename"] = "cut.jpg", "text.jpg"
    (tmp_path / "dataset.json").write_text(json.dumps({"dataset": "broken", "images": records}))

    out = tmp_path / "cache"
    summary = run_extraction(_config(tmp_path, out, workers=0), progress=None)
    assert (summary.num_good, summary.num_failures) == (6, 2)

    cache = FeatureCache.open(out)
    failures = cache.failures.set_index("row")
    assert failures.loc[2, "kind"] == "truncated" and failures.loc[5, "kind"] == "not_an_image"
    assert failures.loc[2, "path"].endswith("images/cut.jpg")
    good = [0, 1, 3, 4, 6, 7]
    assert cache.manifest["row"].tolist() == good
    assert sorted(set(cache.captions["row"])) == good
    assert not set(cache.captions["caption_id"]) & {
        s["sentid"] for r in (2, 5) for s in records[r]["sentences"]
    }

    instances, global_ = cache.read_rows(0, 8)
    reference_instances, reference_global = FeatureCache.open(reference).read_rows(0, 8)
    assert not instances[[2, 5]].any() and not global_[[2, 5]].any()  # failed rows: zeros
    np.testing.assert_array_equal(instances[good], reference_instances[good])
    np.testing.assert_array_equal(global_[good], reference_global[good])


def test_shards_from_config_dicts_and_finalize_guard(data, tmp_path):
    """The Dask path: shards extracted from the config as a plain dict, in any order."""
    cfg = _config(data, tmp_path / "cache", workers=0)
    assert not extraction_complete(cfg)  # no cache yet
    plan = plan_extraction(cfg)
    with pytest.raises(CacheError, match="0 of 6 shards done"):
        finalize_extraction(plan)
    assert not extraction_complete(cfg)
    result = extract_shard(cfg.to_dict(), 5)
    assert (result.shard, result.start, result.stop, result.failures) == (5, 20, 24, 0)
    assert plan_extraction(cfg).todo == [0, 1, 2, 3, 4]
    with pytest.raises(IndexError):
        extract_shard(plan, 6)
    with pytest.raises(ConfigError, match="image_size"):
        extract_shard({**cfg.to_dict(), "image_size": 65}, 0)
