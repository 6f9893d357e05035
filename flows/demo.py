"""`make demo`: the whole pipeline on the synthetic shapes benchmark, on this machine.

    python -m flows.demo --out runs/demo [--images 600] [--epochs 12]

Generates the data set (deterministic, a few seconds), then runs the `pipeline` flow with an
ephemeral Prefect server (no PREFECT_API_URL needed), a local Zarr cache and local Parquet
reports. VGG-19 weights are random (`weights="random"`, recorded in the cache) because no
pretrained weights can be downloaded here; the shapes set is learnable through them (colour
and place). Run it again and every finished stage is skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from features.errors import InputError
from features.shapes import make_shapes
from flows.pipeline import pipeline
from smlstm.reports import print_metrics, read_table

DEFAULTS = {"images": 600, "size": 128, "epochs": 12, "seed": 0}


def demo_parameters(out: Path, size: int, epochs: int, seed: int) -> dict:
    """The pipeline parameters of the demo: small enough for 2 CPU cores."""
    data = out / "data"
    return {
        "dataset": str(data / "dataset.json"),
        "images": str(data),
        "workdir": str(out),
        "weights": "random",
        "seed": seed,
        "extract": {"image_size": size, "shard_size": 64, "batch_size": 16, "workers": 2},
        "train": {"preset": "small", "epochs": epochs, "batch_size": 64, "lr": 1e-3,
                  "lr_decay_epochs": max(1, epochs * 2 // 3), "workers": 1,
                  "seed": seed},
        "evaluate": {"split": "test", "protocol": "1k", "figures": 3},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="everything goes under this directory")
    parser.add_argument("--images", type=int, default=DEFAULTS["images"])
    parser.add_argument("--size", type=int, default=DEFAULTS["size"], help="image side, px")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    started = time.perf_counter()
    try:
        data = out / "data"
        if not (data / "dataset.json").exists():
            make_shapes(data, images=args.images, seed=args.seed, size=args.size)
        params = demo_parameters(out, args.size, args.epochs, args.seed)
        result = pipeline(**params)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    metrics = read_table(Path(result["reports"]) / "metrics")
    latest = metrics[metrics["run_id"] == metrics["run_id"].max()]
    print()
    print(print_metrics(latest))
    print()
    print(f"demo finished in {time.perf_counter() - started:.0f} s; stages: {result['stages']}")
    rows = [
        ("data set", Path(params["dataset"])),
        ("feature cache (Zarr)", Path(result["cache"])),
        ("training run", Path(result["run"])),
        ("best checkpoint", Path(result["run"]) / "checkpoints" / "best.pt"),
        ("Parquet reports", Path(result["reports"])),
        ("figures", Path(result["reports"]) / "figures"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, path in rows:
        print(f"  {name:<{width}}  {path}")
    print(f"\nRead the reports: python -c \"import pandas as pd; "
          f"print(pd.read_parquet('{result['reports']}/metrics'))\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
