"""Benchmark of stage 1 (features.extract) on a synthetic shapes set, random VGG-19 weights.

Measures, in one run and on the same images, batch size and input size:

- pipeline images/s: the real `run_extraction` (JPEG decoding in DataLoader workers, the
  forward pass, float16 conversion, Zarr shard writes, per-shard Parquet, done marks);
- bare forward images/s: `FeatureExtractor` alone on tensors decoded beforehand;
- their ratio, best run against best run (goal >= 0.9: the pipeline costs under 10 %);
- peak RSS of a whole extraction of N and of 4N images, each in a fresh child process
  (ru_maxrss): memory must not grow with the number of images (goal: flat).

    .venv/bin/python bench/extract.py [--images 64 --image-size 128 --batch-size 16]

Prints a summary and writes bench/results/extract.json. About 2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from features.backbone import FeatureExtractor, load_vgg19, pick_device
from features.extract import run_extraction
from features.images import ImageFolderDataset, collate_images
from features.shapes import make_shapes

RESULTS = Path(__file__).resolve().parent / "results" / "extract.json"


def _config(data: Path, out: Path, args: argparse.Namespace) -> dict:
    return dict(
        dataset=str(data / "dataset.json"),
        images=str(data),
        out=str(out),
        weights="random",
        image_size=args.image_size,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        overwrite=True,
    )


def _subset(data: Path, count: int, out_dir: Path) -> Path:
    """A dataset.json of the first `count` images of `data`, whose images it reuses."""
    records = json.loads((data / "dataset.json").read_text())["images"][:count]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dataset.json").write_text(json.dumps({"dataset": "shapes", "images": records}))
    link = out_dir / "images"
    if not link.exists():
        link.symlink_to(data / "images")
    return out_dir


def bare_forward(data: Path, args: argparse.Namespace) -> float:
    """Images/s of the backbone alone on already-decoded tensors (same batches as the pipeline)."""
    vgg, _ = load_vgg19("random", seed=0)
    extractor = FeatureExtractor(vgg).to(pick_device(args.device))
    records = json.loads((data / "dataset.json").read_text())["images"][: args.images]
    items = [(row, str(data / "images" / r["filename"])) for row, r in enumerate(records)]
    decoded = ImageFolderDataset(items, args.image_size)
    batches = [
        collate_images([decoded[i] for i in range(start, min(start + args.batch_size, len(items)))])
        for start in range(0, len(items), args.batch_size)
    ]
    extractor(batches[0]["image"])  # warm-up (kernel selection, allocator)
    started = time.perf_counter()
    for batch in batches:
        instances, global_ = extractor(batch["image"])
        instances.cpu(), global_.cpu()  # include the copy back to the host, as the pipeline does
    return len(items) / (time.perf_counter() - started)


def pipeline(data: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(images/s of the shard extraction, images/s including plan and finalize)."""
    started = time.perf_counter()
    summary = run_extraction(_config(data, out, args), progress=None)
    return summary.images_per_s, summary.num_images / (time.perf_counter() - started)


def child_peak_rss(data: Path, out: Path, args: argparse.Namespace) -> dict:
    """Run one extraction in a fresh interpreter; its peak RSS (this process, its workers)."""
    command = [sys.executable, __file__, "--child", str(data), str(out)]
    command += ["--image-size", str(args.image_size), "--shard-size", str(args.shard_size)]
    command += ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    command += ["--device", args.device]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _child(args: argparse.Namespace) -> None:
    data, out = Path(args.child[0]), Path(args.child[1])
    summary = run_extraction(_config(data, out, args), progress=None)
    kib = 1024  # ru_maxrss is in KiB on Linux
    print(
        json.dumps(
            {
                "images": summary.num_images,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
                "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib,
                "images_per_s": summary.images_per_s,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images for the throughput test")
    parser.add_argument("--rss-images", type=int, default=32, help="N of the N vs 4N RSS test")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--source-size", type=int, default=128, help="side of the JPEGs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader decoding processes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="alternated runs; best counts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        tmp = Path(tmp)
        total = max(args.images, 4 * args.rss_images)
        started = time.perf_counter()
        make_shapes(tmp / "data", total, seed=0, size=args.source_size)
        print(
            f"made {total} images of {args.source_size} px in {time.perf_counter() - started:.1f} s"
        )

        throughput_set = _subset(tmp / "data", args.images, tmp / "throughput")
        # Alternate bare and pipeline runs and keep the best of each: on a shared machine a
        # slow phase then hits both sides instead of biasing the ratio one way.
        bare_runs, piped_runs, piped_total_runs = [], [], []
        for _ in range(args.repeats):
            bare_runs.append(bare_forward(throughput_set, args))
            piped, piped_total = pipeline(throughput_set, tmp / "cache", args)
            piped_runs.append(piped)
            piped_total_runs.append(piped_total)
        bare, piped, piped_total = max(bare_runs), max(piped_runs), max(piped_total_runs)
        ratio = piped / bare
        print(
            f"{args.images} images at {args.image_size} px, batch {args.batch_size}, "
            f"{args.workers} decoding workers: bare forward {bare:.2f} images/s "
            f"(runs {', '.join(f'{r:.2f}' for r in bare_runs)}), pipeline {piped:.2f} images/s "
            f"(runs {', '.join(f'{r:.2f}' for r in piped_runs)}); ratio {ratio:.3f} "
            f"(goal >= 0.9); with plan + finalize {piped_total:.2f} images/s"
        )

        n = args.rss_images
        small = child_peak_rss(_subset(tmp / "data", n, tmp / "n"), tmp / "cache-n", args)
        large = child_peak_rss(_subset(tmp / "data", 4 * n, tmp / "4n"), tmp / "cache-4n", args)
        growth = large["peak_rss_mb"] / small["peak_rss_mb"]
        print(
            f"peak RSS: {n} images {small['peak_rss_mb']:.0f} MB, {4 * n} images "
            f"{large['peak_rss_mb']:.0f} MB (x{growth:.3f}, goal: flat); DataLoader workers "
            f"{small['workers_peak_rss_mb']:.0f} / {large['workers_peak_rss_mb']:.0f} MB"
        )

    device = pick_device(args.device)
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else None,
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "params": {
            "images": args.images,
            "image_size": args.image_size,
            "source_size": args.source_size,
            "batch_size": args.batch_size,
            "shard_size": args.shard_size,
            "workers": args.workers,
            "repeats": args.repeats,
            "weights": "random",
        },
        "throughput": {
            "bare_forward_images_per_s": bare,
            "bare_forward_runs": bare_runs,
            "pipeline_images_per_s": piped,
            "pipeline_runs": piped_runs,
            "pipeline_with_plan_and_finalize_images_per_s": piped_total,
            "ratio": ratio,
            "goal": 0.9,
            "meets_goal": ratio >= 0.9,
        },
        "memory": {
            "n": n,
            "peak_rss_mb_n": small["peak_rss_mb"],
            "peak_rss_mb_4n": large["peak_rss_mb"],
            "growth": growth,
            "workers_peak_rss_mb_n": small["workers_peak_rss_mb"],
            "workers_peak_rss_mb_4n": large["workers_peak_rss_mb"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
