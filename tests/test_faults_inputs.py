"""Stage 1 on bad input: odd and broken image files in one real extraction, malformed dataset
files through the real `smlstm extract` subprocess, unsafe weight files, bad options.

test_images.py checks the decoder on each kind of file alone and test_dataset.py every
validation message of the reader; here the same faults go through the whole stage: the run
completes (or is refused before anything is written), failed rows keep their place, and the
good-but-odd files give exactly the features of a plain RGB file of the same picture.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_extract_config
from PIL import Image, ImageOps
from typer.testing import CliRunner

from features.cache import FeatureCache
from features.config import ExtractConfig
from features.extract import run_extraction
from features.images import FAILURE_KINDS
from features.shapes import make_shapes
from smlstm.cli import app

ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 24
SHARD = 4
FORK = multiprocessing.get_context("fork")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, NUM_IMAGES, seed=4, size=64)
    return root


def _config(dataset: Path, images: Path, out: Path, **overrides) -> ExtractConfig:
    return tiny_extract_config(images, out, dataset=str(dataset), shard_size=SHARD, **overrides)


# ----------------------------------------------------------------------------------------------
# odd and broken images: each maker writes the file at `path`; odd ones also return the plain
# RGB picture they must decode to (same size), which the "twin" run reads instead.


def _noise(width: int, height: int, seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba.convert("RGBA")).convert("RGB")


def odd_rgba(path: Path) -> Image.Image:
    pixels = _noise(40, 30, 1, channels=4)
    pixels[:, :20, 3] = 0  # left half fully transparent, right half partly
    image = Image.fromarray(pixels, "RGBA")
    image.save(path)
    return _on_white(image)


def odd_palette(path: Path) -> Image.Image:
    image = Image.fromarray(_noise(48, 48, 2, channels=1) // 64, "L").convert("P")
    image.putpalette([200, 30, 30, 30, 200, 30, 30, 30, 200, 0, 0, 0] + [0] * (3 * 252))
    image.save(path, transparency=3)  # index 3 (black) is transparent
    return _on_white(Image.open(path))


def odd_sixteen_bit(path: Path) -> Image.Image:
    grey = (_noise(36, 36, 3, channels=1).astype(np.uint16) * 257) + 100
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    return Image.fromarray(np.round(grey / 257).astype(np.uint8)).convert("RGB")


def odd_cmyk(path: Path) -> Image.Image:
    Image.fromarray(_noise(32, 40, 4, channels=4), "CMYK").save(path, quality=95)
    with Image.open(path) as image:
        assert image.mode == "CMYK"
        return image.convert("RGB")


def odd_exif_rotated(path: Path) -> Image.Image:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    Image.fromarray(_noise(50, 20, 5)).save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)
        assert upright.size == (20, 50)
        return upright.convert("RGB")


def odd_one_pixel(path: Path) -> Image.Image:
    Image.new("RGB", (1, 1), (10, 140, 250)).save(path)
    return Image.new("RGB", (1, 1), (10, 140, 250))


def odd_grey_jpeg(path: Path) -> Image.Image:
    Image.fromarray(_noise(30, 30, 6, channels=1), "L").save(path, quality=90)
    with Image.open(path) as image:
        return image.convert("RGB")


def bad_truncated(path: Path) -> None:
    full = path.with_suffix(".full.jpg")
    Image.fromarray(_noise(64, 64, 7)).save(full, quality=95)
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])


def bad_empty(path: Path) -> None:
    path.write_bytes(b"")


def bad_html(path: Path) -> None:
    path.write_text("<!DOCTYPE html><html><body><h1>403 Forbidden</h1></body></html>\n")


def bad_bomb(path: Path) -> None:
    Image.new("1", (10_000, 10_000)).save(path, "PNG")  # 100M pixels in a small file


def bad_unreadable(path: Path) -> None:
    Image.fromarray(_noise(16, 16, 8)).save(path, "JPEG")
    path.chmod(0)  # root reads it anyway: the extraction below drops that privilege


def bad_directory(path: Path) -> None:
    path.mkdir()


def bad_missing(path: Path) -> None:
    pass


def bad_symlink_loop(path: Path) -> None:
    path.symlink_to(path)


ODD = {  # name -> (maker, file name)
    "rgba": (odd_rgba, "alpha.png"),
    "palette": (odd_palette, "palette.png"),
    "sixteen_bit": (odd_sixteen_bit, "grey16.png"),
    "cmyk": (odd_cmyk, "cmyk.jpg"),
    "exif_rotated": (odd_exif_rotated, "phone.jpg"),
    "one_pixel": (odd_one_pixel, "dot.png"),
    "grey_jpeg": (odd_grey_jpeg, "grey.jpg"),
}
BAD = {  # name -> (maker, file name, expected failure kind)
    "truncated": (bad_truncated, "cut.jpg", "truncated"),
    "empty": (bad_empty, "zero.jpg", "empty"),
    "html": (bad_html, "error_page.jpg", "not_an_image"),
    "bomb": (bad_bomb, "bomb.png", "too_large"),
    "unreadable": (bad_unreadable, "locked.jpg", "unreadable"),
    "directory": (bad_directory, "folder.jpg", "not_a_file"),
    "missing": (bad_missing, "gone.jpg", "missing"),
    "symlink_loop": (bad_symlink_loop, "loop.jpg", "unreadable"),
}
# Row -> special file; the other rows keep their shapes image. Spread over all six shards.
LAYOUT = {
    0: "rgba", 1: "truncated", 3: "palette", 4: "empty", 6: "sixteen_bit", 7: "html",
    9: "cmyk", 10: "bomb", 12: "exif_rotated", 13: "unreadable", 15: "one_pixel",
    16: "directory", 18: "grey_jpeg", 19: "missing", 21: "symlink_loop",
}  # fmt: skip


def _drop_file_privileges() -> None:
    """As root, give up the capabilities that bypass file permissions (this process only)."""
    if os.geteuid() != 0:
        return

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    assert libc.capget(ctypes.byref(header), data) == 0
    keep = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    data[0].effective &= keep
    data[0].permitted &= keep
    assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()


def _extract_without_file_privileges(config: ExtractConfig) -> None:
    torch.set_num_threads(1)
    _drop_file_privileges()
    run_extraction(config, progress=None)


@pytest.fixture(scope="module")
def odd_world(shapes, tmp_path_factory):
    """Two datasets over the same 24 rows and captions: `faulty` with the odd and broken files
    of LAYOUT, `twin` with, in their place, plain RGB PNGs of what the odd files must decode to
    (and the shapes image where a file is broken). Both extracted."""
    root = tmp_path_factory.mktemp("odd")
    images = root / "images"
    images.mkdir()
    records = json.loads((shapes / "dataset.json").read_text())["images"]
    faulty, twin = [], []
    for row, record in enumerate(records):
        plain = images / f"plain_{row:02d}.jpg"
        shutil.copyfile(shapes / record["filepath"] / record["filename"], plain)
        kind = LAYOUT.get(row)
        faulty_name = twin_name = plain.name
        if kind in ODD:
            maker, name = ODD[kind]
            picture = maker(images / name)
            twin_name = f"twin_{Path(name).stem}.png"
            picture.save(images / twin_name)
            faulty_name = name
        elif kind in BAD:
            maker, name, _ = BAD[kind]
            maker(images / name)
            faulty_name = name
        base = {k: v for k, v in record.items() if k not in ("filepath", "filename")}
        faulty.append({**base, "filename": faulty_name})
        twin.append({**base, "filename": twin_name})
    for name, entries in (("faulty", faulty), ("twin", twin)):
        (root / f"{name}.json").write_text(json.dumps({"dataset": name, "images": entries}))

    twin_config = _config(root / "twin.json", images, root / "twin_cache")
    run_extraction(twin_config, progress=None)
    faulty_config = _config(root / "faulty.json", images, root / "faulty_cache")
    process = FORK.Process(target=_extract_without_file_privileges, args=(faulty_config,))
    process.start()
    process.join(180)
    assert process.exitcode == 0
    (images / BAD["unreadable"][1]).chmod(0o644)  # let pytest clean it up
    return {
        "faulty": FeatureCache.open(root / "faulty_cache"),
        "twin": FeatureCache.open(root / "twin_cache"),
        "images": images,
    }


def test_broken_images_are_listed_with_their_kind(odd_world):
    failures = odd_world["faulty"].failures.set_index("row")
    expected = {row: BAD[kind] for row, kind in LAYOUT.items() if kind in BAD}
    assert sorted(failures.index) == sorted(expected)
    assert len(set(LAYOUT.values())) >= 10 + 5  # kinds of file exercised
    for row, (_, name, kind) in expected.items():
        assert kind in FAILURE_KINDS
        assert failures.loc[row, "kind"] == kind, (name, failures.loc[row, "message"])
        assert failures.loc[row, "path"] == str(odd_world["images"] / name)
        message = failures.loc[row, "message"]
        assert name in message and "\n" not in message


def test_good_and_odd_images_keep_their_rows_and_decode_like_plain_rgb(odd_world):
    faulty, twin = odd_world["faulty"], odd_world["twin"]
    bad_rows = sorted(row for row, kind in LAYOUT.items() if kind in BAD)
    good_rows = [row for row in range(NUM_IMAGES) if row not in bad_rows]
    assert faulty.manifest["row"].tolist() == good_rows
    assert faulty.num_images == twin.num_images == NUM_IMAGES
    # The JSON's own ids and captions stay with their row.
    twin_manifest = twin.manifest.set_index("row")
    assert faulty.manifest["image_id"].tolist() == twin_manifest.loc[good_rows, "image_id"].tolist()
    pd.testing.assert_frame_equal(
        faulty.captions.reset_index(drop=True),
        twin.captions[twin.captions["row"].isin(good_rows)].reset_index(drop=True),
    )

    instances, global_ = faulty.read_rows(0, NUM_IMAGES)
    twin_instances, twin_global = twin.read_rows(0, NUM_IMAGES)
    assert not instances[bad_rows].any() and not global_[bad_rows].any()
    # Good rows and odd rows (alpha, palette, 16-bit, CMYK, EXIF, 1x1, grey) alike: the same
    # features, bit for bit, as the plain RGB twin of the same picture.
    assert instances[good_rows].tobytes() == twin_instances[good_rows].tobytes()
    assert global_[good_rows].tobytes() == twin_global[good_rows].tobytes()

    # The manifest reports the original (upright) size of each odd file.
    sizes = faulty.manifest.set_index("row")[["width", "height"]]
    odd_rows = {kind: row for row, kind in LAYOUT.items() if kind in ODD}
    assert tuple(sizes.loc[odd_rows["exif_rotated"]]) == (20, 50)
    assert tuple(sizes.loc[odd_rows["one_pixel"]]) == (1, 1)
    assert tuple(sizes.loc[odd_rows["rgba"]]) == (40, 30)


# ----------------------------------------------------------------------------------------------
# malformed dataset files through the real CLI: exit 2, one line naming file/record/field,
# nothing written (the out directory does not exist afterwards)


def _good_records() -> list[dict]:
    return [
        {
            "filename": f"img{i}.jpg",
            "imgid": i,
            "split": ("train", "val", "test")[i % 3],
            "sentences": [
                {"raw": f"A red circle number {i}.", "sentid": 10 * i + j, "imgid": i}
                for j in range(2)
            ],
        }
        for i in range(4)
    ]


def _variant(change) -> bytes:
    records = _good_records()
    result = change(records)
    payload = result if result is not None else {"dataset": "bad", "images": records}
    return json.dumps(payload).encode() if not isinstance(payload, bytes) else payload


DATASET_VARIANTS = {  # name -> (file bytes, what the one-line message must contain)
    "truncated_json": (
        json.dumps({"images": _good_records()}).encode()[:150],
        "invalid JSON at line 1 column",
    ),
    "raw_is_int": (
        _variant(lambda r: r[2]["sentences"][1].update(raw=12)),
        "images[2].sentences[1].raw: expected a string, got int",
    ),
    "empty_caption": (
        _variant(lambda r: r[3]["sentences"][0].update(raw="  ")),
        "images[3].sentences[0].raw: empty string",
    ),
    "no_captions": (
        _variant(lambda r: r[0].update(sentences=[])),
        "images[0].sentences: no captions",
    ),
    "duplicate_imgid": (
        _variant(lambda r: [item.update(imgid=1) for item in (r[3], *r[3]["sentences"])] and None),
        "images[3].imgid: duplicate imgid 1 (also images[1])",
    ),
    "duplicate_sentid": (
        _variant(lambda r: r[2]["sentences"][0].update(sentid=11)),
        "images[2].sentences[0].sentid: duplicate sentid 11",
    ),
    "path_escape": (
        _variant(lambda r: r[1].update(filename="../../etc/passwd")),
        "images[1].filename: path '../../etc/passwd' has an empty, '.' or '..' component",
    ),
    "absolute_filepath": (
        _variant(lambda r: r[2].update(filepath="/etc")),
        "images[2].filepath: absolute path '/etc'",
    ),
    "unknown_split": (
        _variant(lambda r: r[0].update(split="dev")),
        "images[0].split: unknown split 'dev'",
    ),
    "non_utf8": (
        _variant(lambda r: None).replace(b"red circle number 2", b"red circle \xff\xfe 2"),
        "not UTF-8: invalid byte 0xff at byte offset",
    ),
    "zero_images": (_variant(lambda r: {"dataset": "bad", "images": []}), "no images"),
}


def _extract_cli(dataset: Path, images: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "smlstm.cli", "extract", "--dataset", str(dataset)]
    command += ["--images", str(images), "--out", str(out), "--weights", "random"]
    command += ["--image-size", "64", "--workers", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_malformed_dataset_files_are_refused_by_the_cli(shapes, tmp_path):
    assert len(DATASET_VARIANTS) >= 10
    jobs = {}
    for name, (content, _) in DATASET_VARIANTS.items():
        (tmp_path / f"{name}.json").write_bytes(content)
        jobs[name] = (tmp_path / f"{name}.json", tmp_path / f"out_{name}")
    # Each process spends ~3 s importing torch before it reads the file: two at a time (cores).
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(
            zip(
                jobs,
                pool.map(lambda job: _extract_cli(job[0], shapes, job[1]), jobs.values()),
                strict=True,
            )
        )
    for name, result in results.items():
        dataset, out = jobs[name]
        expected = DATASET_VARIANTS[name][1]
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), name
        assert str(dataset) in result.stderr and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stdout + result.stderr
        assert not out.exists(), name


# ----------------------------------------------------------------------------------------------
# unsafe files and bad options, through the same CLI (in-process): refused before any work


class _Payload:
    """Unpickling this would run code: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _extract_args(shapes: Path, out: Path, *extra: str) -> list[str]:
    args = ["extract", "--dataset", str(shapes / "dataset.json"), "--images", str(shapes)]
    return [*args, "--out", str(out), "--image-size", "64", "--workers", "0", *extra]


def test_weights_file_with_a_pickled_payload_is_refused(shapes, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "vgg19-evil.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "extra": _Payload(marker)}, evil)
    out = tmp_path / "cache"
    result = CliRunner().invoke(app, _extract_args(shapes, out, "--weights-file", str(evil)))
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1
    assert f"{evil}: refused by torch.load(weights_only=True)" in result.stderr
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (("--shard-size", "0"), "shard_size: Input should be greater than or equal to 1"),
        (("--batch-size", "0"), "batch_size: Input should be greater than or equal to 1"),
        (("--workers", "-1"), "workers: Input should be greater than or equal to 0"),
        (("--image-size", "2048"), "image_size: Input should be less than or equal to 1024"),
        (("--max-pixels", "0"), "max_pixels: Input should be greater than or equal to 1"),
        (("--layer", "fc8"), "layer: Input should be 'pool5' or 'conv5_4'"),
        (("--weights", "places365"), "weights: Input should be 'imagenet' or 'random'"),
    ],
)
def test_out_of_range_options_are_refused_before_work(shapes, tmp_path, options, expected):
    out = tmp_path / "cache"
    result = CliRunner().invoke(app, _extract_args(shapes, out, "--weights", "random", *options))
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert result.stdout == "" and not out.exists()  # not even the plan line was printed


def _mount_read_only(where: Path) -> bool:
    where.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)]
    return subprocess.run(command, capture_output=True).returncode == 0


def test_out_on_a_read_only_path_is_refused_before_work(shapes, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a directory should be")
    result = CliRunner().invoke(
        app, _extract_args(shapes, blocker / "cache", "--weights", "random")
    )
    assert result.exit_code == 2 and result.stdout == ""
    assert f"out: {blocker}/cache: cannot create it, {blocker} is not a directory" in result.stderr

    read_only = tmp_path / "ro"
    if not _mount_read_only(read_only):
        pytest.skip("mounting a read-only tmpfs is not permitted here")
    try:
        out = read_only / "cache"
        result = CliRunner().invoke(app, _extract_args(shapes, out, "--weights", "random"))
        assert result.exit_code == 2, result.output
        assert result.stderr == f"error: out: {out}: {read_only} is not writable\n"
        assert result.stdout == ""  # refused before VGG was loaded or a shard planned
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)
