"""The synthetic shapes benchmark: determinism, twins, real JPEGs that match their JSON, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from features.dataset import load_karpathy, tokenize
from features.errors import ConfigError, InputError
from features.shapes import COLOURS, make_shapes

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, SIZE = 40, 64


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), images=N_IMAGES, seed=3, size=SIZE)


@pytest.fixture(scope="module")
def records(shapes) -> list[dict]:
    return json.loads(shapes.read_text(encoding="utf-8"))["images"]


def file_bytes(json_path: Path) -> dict[str, bytes]:
    root = json_path.parent
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_and_reader(shapes, records):
    assert shapes.name == "dataset.json"
    dataset = load_karpathy(shapes)  # valid Karpathy format, all three splits present
    assert dataset.name == "shapes"
    assert len(dataset.images) == N_IMAGES
    counts = dataset.split_counts()
    assert counts["train"][0] == N_IMAGES - 8 and counts["val"][0] == 4 and counts["test"][0] == 4
    for record, image in zip(records, dataset.images, strict=True):
        assert image.relpath == f"images/{record['filename']}"
        assert len(image.captions) == 5
        assert len({c.raw for c in image.captions}) == 5
        for sentence in record["sentences"]:
            assert sentence["tokens"] == tokenize(sentence["raw"])
        with Image.open(shapes.parent / image.relpath) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
    assert len(list((shapes.parent / "images").iterdir())) == N_IMAGES


def test_captions_name_the_objects(records):
    for record in records:
        text = " ".join(s["raw"].lower() for s in record["sentences"])
        for thing in record["objects"]:
            colour_words = {"purple": ("purple", "violet")}.get(thing["colour"], (thing["colour"],))
            assert any(word in text for word in colour_words), (thing, text)
        assert 1 <= len(record["objects"]) <= 4
        cells = [(t["row"], t["col"]) for t in record["objects"]]
        assert len(set(cells)) == len(cells)


def test_pixels_match_the_scene(shapes, records):
    """Each object's colour is in its cell; cells without objects hold none of those colours."""
    cell = SIZE / 3
    for record in records[:12]:
        pixels = np.asarray(Image.open(shapes.parent / "images" / record["filename"]), np.float32)
        occupied = {(t["row"], t["col"]): t["colour"] for t in record["objects"]}
        colours = {t["colour"] for t in record["objects"]}
        for row in range(3):
            for col in range(3):
                y0, y1 = round(row * cell), round((row + 1) * cell)
                x0, x1 = round(col * cell), round((col + 1) * cell)
                if (row, col) in occupied:
                    block = pixels[y0:y1, x0:x1]
                    near = np.linalg.norm(block - COLOURS[occupied[(row, col)]], axis=-1) < 60
                    assert near.sum() >= 15, (record["imgid"], row, col)
                else:  # leave a margin: JPEG bleeds colour a few pixels across cell borders
                    block = pixels[y0 + 4 : y1 - 4, x0 + 4 : x1 - 4]
                    for colour in colours:
                        near = np.linalg.norm(block - COLOURS[colour], axis=-1) < 60
                        assert near.sum() <= 2, (record["imgid"], row, col, colour)


def test_twins(records):
    by_imgid = {r["imgid"]: r for r in records}
    twins = [r for r in records if "twin_of" in r]
    assert 0.1 * N_IMAGES <= len(twins) <= 0.5 * N_IMAGES
    for twin in twins:
        source = by_imgid[twin["twin_of"]]
        assert source["imgid"] < twin["imgid"]
        assert source["split"] == twin["split"]
        assert "twin_of" not in source

        def kinds(r):
            return Counter((t["colour"], t["shape"], t["size"]) for t in r["objects"])

        assert kinds(twin) == kinds(source)  # the same objects ...
        place = {
            (t["colour"], t["shape"], t["size"]): (t["row"], t["col"]) for t in source["objects"]
        }
        for thing in twin["objects"]:  # ... each one somewhere else
            assert (thing["row"], thing["col"]) != place[
                (thing["colour"], thing["shape"], thing["size"])
            ]
        source_captions = {s["raw"] for s in source["sentences"]}
        assert not source_captions & {s["raw"] for s in twin["sentences"]}


def test_same_seed_same_bytes_whatever_workers(tmp_path, shapes):
    again = make_shapes(tmp_path / "again", images=N_IMAGES, seed=3, size=SIZE, workers=2)
    assert file_bytes(again) == file_bytes(shapes)


def test_other_seed_other_bytes(tmp_path, shapes):
    other = make_shapes(tmp_path / "other", images=N_IMAGES, seed=4, size=SIZE)
    a, b = file_bytes(shapes), file_bytes(other)
    assert a.keys() == b.keys()
    assert a["dataset.json"] != b["dataset.json"]
    assert sum(a[k] != b[k] for k in a) >= N_IMAGES  # every image differs


def test_rerun_smaller_removes_stale_images(tmp_path):
    out = tmp_path / "s"
    make_shapes(out, images=12, seed=0, size=32)
    make_shapes(out, images=5, seed=0, size=32)
    assert len(list((out / "images").iterdir())) == 5
    assert len(load_karpathy(out / "dataset.json").images) == 5


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"images": 2}, "images"),
        ({"size": 16}, "size"),
        ({"splits": (0.5, 0.3, 0.1)}, "splits"),
        ({"splits": (0.9, 0.1, 0.0)}, "splits"),
        ({"splits": (0.8, 0.2)}, "splits"),
        ({"workers": 0}, "workers"),
        ({"seed": -1}, "seed"),
        ({"images": 3, "splits": (0.2, 0.2, 0.6)}, "splits"),
    ],
)
def test_bad_arguments_write_nothing(tmp_path, kwargs, field):
    args = {"images": 10, "seed": 0, "size": 32} | kwargs
    with pytest.raises(ConfigError) as info:
        make_shapes(tmp_path / "out", **args)
    assert isinstance(info.value, InputError)
    message = str(info.value)
    assert "\n" not in message and message.startswith("make_shapes: ")
    assert field in message
    assert not (tmp_path / "out").exists()


def test_cli_make_shapes(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "smlstm.cli", "make-shapes", "--out", str(out)]
    result = subprocess.run(
        [*cmd, "--images", "6", "--seed", "1", "--size", "32"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "images/s" in lines[0]
    assert lines[-1] == str(out / "dataset.json")
    assert len(load_karpathy(out / "dataset.json").images) == 6

    bad = subprocess.run(
        [*cmd, "--images", "6", "--size", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith("error: make_shapes: size:")
