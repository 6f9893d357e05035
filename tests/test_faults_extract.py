"""Stage 1 under faults: SIGKILL at chosen and at random points, a reader during a resume, full disks.

Every faulty run is a real process: a fork of this test process (so VGG-19 is already loaded
and a run costs about a second) that is SIGKILLed, either by itself at an exact point of its
I/O or by the test after a random delay. The exact points are found by wrapping `os.replace`
(and os.rename, os.link) in the child: every file of the cache, Zarr chunks included (zarr 3.1's LocalStore writes a
temp file and renames it), reaches its final name through `os.replace`, so "killed while
writing shard k" is "killed with shard k's bytes in a temp file, before the rename"; "torn"
also cuts that temp file in half, as a kill in the middle of write() would.

After every kill: no done-marker claims a shard whose rows or status table are not on disk
(each done shard equals the reference bit for bit), and the cache does not open as finished.
After the final rerun: every file of an uninterrupted reference run is there, byte for byte.

test_extract.py already kills the real CLI once (by time) and checks the resume; this file
adds the precise kill points, random ones, concurrent readers and full disks.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import re
import resource
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from helpers import tiny_extract_config
from typer.testing import CliRunner

from features.cache import FeatureCache
from features.config import ExtractConfig
from features.errors import CacheError
from features.extract import extraction_complete, plan_extraction, run_extraction
from features.shapes import make_shapes
from smlstm.cli import app

NUM_IMAGES = 12
SHARD = 4  # -> 3 shards
NUM_SHARDS = 3
BATCH = 4
FORK = multiprocessing.get_context("fork")
# Left behind by a killed writer and never read: zarr's "<chunk>.<hex>.partial", ours ".tmp-<pid>".
TEMP_FILE = re.compile(r"\.[0-9a-f]{32}\.partial$|\.tmp-\d+$")


def _config(data: Path, out: Path, **overrides) -> ExtractConfig:
    # workers=0: decode in the process itself, so a kill stops all of the run
    return tiny_extract_config(data, out, shard_size=SHARD, batch_size=BATCH, **overrides)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, NUM_IMAGES, seed=11, size=64)
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """One uninterrupted run (it also loads VGG into this process, which every fork inherits)."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    run_extraction(_config(data, out), progress=None)
    return out


# ----------------------------------------------------------------------------------------------
# killing a fork of this process at an exact point of its I/O


@dataclass(frozen=True)
class KillPoint:
    """Kill the process at the `nth` os.replace / os.rename / os.link whose destination matches
    `target` (a regex searched in the path).

    phase: "torn" (the source temp file cut in half, then killed: a kill inside write()),
           "before" (temp file complete, not yet in place), "after" (in place, then killed).
    """

    target: str
    nth: int
    phase: str


def install_kill_point(point: KillPoint) -> None:
    """Arm `point` in this process (meant for a forked child: it changes the os module)."""
    seen = 0

    def wrap(real):
        def move(src, dst, *args, **kwargs):
            nonlocal seen
            if re.search(point.target, os.fspath(dst)):
                seen += 1
                if seen == point.nth:
                    if point.phase == "torn":
                        os.truncate(src, os.path.getsize(src) // 2)
                    if point.phase == "after":
                        real(src, dst, *args, **kwargs)
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *args, **kwargs)

        return move

    # pathlib's Path.replace / Path.rename look these up in `os` at call time.
    os.replace, os.rename, os.link = wrap(os.replace), wrap(os.rename), wrap(os.link)


def _extract_in_child(config: ExtractConfig, point: KillPoint | None) -> None:
    torch.set_num_threads(1)
    if point is not None:
        install_kill_point(point)
    run_extraction(config, progress=None)


def _fork_extraction(config: ExtractConfig, point: KillPoint | None = None):
    process = FORK.Process(target=_extract_in_child, args=(config, point))
    process.start()
    return process


def _wait(process, timeout: float = 120) -> int:
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        pytest.fail("the forked extraction hung")
    return process.exitcode


# ----------------------------------------------------------------------------------------------
# what must hold after a kill, and after the final rerun


def _done(out: Path) -> np.ndarray:
    if not (out / "features.zarr" / "shard_done" / "zarr.json").exists():
        return np.zeros(NUM_SHARDS, dtype=np.uint8)
    return zarr.open_array(str(out / "features.zarr" / "shard_done"), mode="r")[:]


def _rows(out: Path, name: str, shard: int) -> bytes:
    array = zarr.open_array(str(out / "features.zarr" / name), mode="r")
    return np.asarray(array[shard * SHARD : (shard + 1) * SHARD]).tobytes()


def assert_done_shards_are_complete(out: Path, reference: Path) -> list[int]:
    """Each shard marked done has its rows and status table on disk, equal to the reference."""
    done = [int(k) for k in np.flatnonzero(_done(out))]
    for k in done:
        for name in ("instances", "global"):
            assert _rows(out, name, k) == _rows(reference, name, k), f"shard {k} {name} differ"
        status = out / "shards" / f"{k}.parquet"
        assert status.exists(), f"shard {k} marked done without its status table"
        pd.testing.assert_frame_equal(
            pd.read_parquet(status), pd.read_parquet(reference / "shards" / f"{k}.parquet")
        )
    return done


def assert_not_finished(out: Path, config: ExtractConfig) -> None:
    assert not extraction_complete(config)
    with pytest.raises(CacheError):
        FeatureCache.open(out)


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()}


def assert_same_cache(out: Path, reference: Path) -> None:
    """Every file of the reference, byte for byte; anything else is only a dead temp file.

    The config saved in extract_config.json and in the store's attributes names its own `out`:
    that path is the one difference allowed.
    """
    ours, theirs = _files(out), _files(reference)
    for name, path in theirs.items():
        assert name in ours, f"{name} missing"
        content = ours[name].read_bytes().replace(str(out).encode(), str(reference).encode())
        assert content == path.read_bytes(), f"{name} differs"
    extra = sorted(set(ours) - set(theirs))
    assert all(TEMP_FILE.search(name) for name in extra), extra
    FeatureCache.open(out)


# ----------------------------------------------------------------------------------------------


# Each point kills a run that resumes what the previous ones left; the labels say where it lands.
KILL_CHAIN = [
    ("torn write of shard 0's instances", KillPoint(r"instances/c/\d+/0/0$", 1, "torn")),
    ("shard 0: instances on disk, global not", KillPoint(r"global/c/\d+/0$", 1, "before")),
    ("shard 0: arrays on disk, status table not", KillPoint(r"shards/\d+\.parquet$", 1, "before")),
    ("torn write of shard 0's done-marker", KillPoint(r"shard_done/c/\d+$", 1, "torn")),
    ("just after shard 0's done-marker", KillPoint(r"shard_done/c/\d+$", 1, "after")),
    ("torn write of shard 2's global", KillPoint(r"global/c/\d+/0$", 2, "torn")),
    ("finalize: manifest written, captions not", KillPoint(r"captions\.parquet$", 1, "before")),
    ("finalize: tables written, config not", KillPoint(r"extract_config\.json$", 1, "before")),
]


def test_kills_at_exact_points_then_rerun_equals_uninterrupted(data, reference, tmp_path):
    out = tmp_path / "cache"
    config = _config(data, out)
    done_history = []
    for label, point in KILL_CHAIN[:-1]:
        assert _wait(_fork_extraction(config, point)) == -signal.SIGKILL, f"{label}: not killed"
        done_history.append(assert_done_shards_are_complete(out, reference))
        assert_not_finished(out, config)
    # The chain really walked through the shards: none done, then 0, then all three.
    assert done_history[:4] == [[], [], [], []]
    assert done_history[4] == [0] and done_history[5] == [0, 1] and done_history[6] == [0, 1, 2]
    assert (out / "manifest.parquet").exists() and not (out / "captions.parquet").exists()

    # Killed after the three tables, before extract_config.json: the tables a reader can open
    # are already complete, and the extraction still counts as unfinished (a rerun finishes it).
    label, point = KILL_CHAIN[-1]
    assert _wait(_fork_extraction(config, point)) == -signal.SIGKILL, f"{label}: not killed"
    assert not extraction_complete(config) and not (out / "extract_config.json").exists()
    for table in ("manifest", "captions", "failures"):
        assert (out / f"{table}.parquet").read_bytes() == (
            reference / f"{table}.parquet"
        ).read_bytes()

    summary = run_extraction(config, progress=None)
    assert summary.shards_extracted == []  # finishing only rewrote the tables
    assert_same_cache(out, reference)


def test_kills_at_random_times_then_rerun_equals_uninterrupted(data, reference, tmp_path):
    out = tmp_path / "cache"
    config = _config(data, out)
    started = time.perf_counter()
    assert _wait(_fork_extraction(_config(data, tmp_path / "timing"))) == 0
    full_run = time.perf_counter() - started

    rng = random.Random(7)
    killed = 0
    for _ in range(5):
        process = _fork_extraction(config)
        time.sleep(rng.uniform(0.0, full_run))
        process.kill()  # SIGKILL; a no-op if the run already finished
        code = _wait(process)
        assert code in (0, -signal.SIGKILL)
        killed += code == -signal.SIGKILL
        assert_done_shards_are_complete(out, reference)
        if code == -signal.SIGKILL and not extraction_complete(config):
            with pytest.raises(CacheError):
                FeatureCache.open(out)
    assert killed >= 1, "every random kill came after the run had finished"

    run_extraction(config, progress=None)
    assert_same_cache(out, reference)


# ----------------------------------------------------------------------------------------------
# concurrency: readers while another process resumes (and re-finalizes) the store


def _finish_repeatedly(config: ExtractConfig, times: int) -> None:
    torch.set_num_threads(1)
    for _ in range(times):
        run_extraction(config, progress=None)  # rewrites the four tables and the group attrs


def test_reader_during_a_resume_sees_only_complete_shards(data, reference, tmp_path):
    out = tmp_path / "cache"
    config = _config(data, out)
    plan = plan_extraction(config)
    from features.extract import extract_shard

    extract_shard(plan, 0)  # a partial cache, as a killed run leaves it

    writer = _fork_extraction(config)
    reads, seen_done = 0, set()
    while writer.is_alive():
        seen_done |= set(assert_done_shards_are_complete(out, reference))
        reads += 1
    assert _wait(writer) == 0
    assert reads >= 3, "the reader never overlapped the writer"
    assert_same_cache(out, reference)

    # The cache is finished: a second process "resuming" it rewrites its tables (atomically)
    # again and again while this one opens it; every open sees complete, equal tables.
    expected = FeatureCache.open(reference)
    writer = FORK.Process(target=_finish_repeatedly, args=(config, 15))
    writer.start()
    opens = 0
    while writer.is_alive() or opens == 0:
        cache = FeatureCache.open(out)
        for table in ("manifest", "captions", "failures"):
            pd.testing.assert_frame_equal(getattr(cache, table), getattr(expected, table))
        assert (
            cache.read_rows(0, NUM_IMAGES)[0].tobytes()
            == expected.read_rows(0, NUM_IMAGES)[0].tobytes()
        )
        opens += 1
    assert _wait(writer) == 0
    assert opens >= 3


# ----------------------------------------------------------------------------------------------
# full disks


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
    )
    return result.returncode == 0


def test_full_disk_stops_with_one_line_then_rerun_completes(data, reference, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("mounting a tmpfs is not permitted here (the RLIMIT_FSIZE test still runs)")
    try:
        # Leave about 120 KiB free: the cache needs about 200 KiB, so a shard write fails.
        stats = os.statvfs(disk)
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - 120 * 1024))
        out = disk / "cache"
        config = _config(data, out)
        args = ["extract", "--dataset", config.dataset, "--images", config.images]
        args += ["--out", str(out), "--weights", "random", "--image-size", "64"]
        args += ["--shard-size", str(SHARD), "--batch-size", str(BATCH), "--workers", "0"]
        args += ["--device", "cpu"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1
        assert re.match(
            rf"error: {re.escape(str(out))}: no space left while writing shard \d: "
            r"No space left on device; free space and rerun to resume",
            result.stderr,
        ), result.stderr
        assert 0 < len(assert_done_shards_are_complete(out, reference)) < NUM_SHARDS
        assert_not_finished(out, config)
        assert not [name for name in _files(out) if TEMP_FILE.search(name)]  # space given back

        filler.unlink()
        summary = run_extraction(config, progress=None)
        assert summary.shards_extracted and 0 not in summary.shards_extracted
        assert_same_cache(out, reference)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _extract_with_file_size_limit(config: ExtractConfig, limit: int, report: Path) -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        run_extraction(config, progress=None)
    except CacheError as err:
        report.write_text(str(err))  # a short file, well under the limit
        raise SystemExit(3) from None


def test_file_size_limit_stops_with_one_line_then_rerun_completes(data, reference, tmp_path):
    # A global shard is 4 x 4096 float16 = 32 KiB: over a 20 000-byte RLIMIT_FSIZE, while the
    # instance shard (16 KiB) and the metadata fit, so shard 0 fails half-way through its writes.
    out, report = tmp_path / "cache", tmp_path / "error.txt"
    config = _config(data, out)
    process = FORK.Process(target=_extract_with_file_size_limit, args=(config, 20_000, report))
    process.start()
    assert _wait(process) == 3
    message = report.read_text()
    assert message == (
        f"{out}: no space left while writing shard 0: {os.strerror(errno.EFBIG)}; "
        "free space and rerun to resume"
    )
    assert (out / "features.zarr" / "instances" / "c" / "0" / "0" / "0").exists()  # got that far
    assert assert_done_shards_are_complete(out, reference) == []
    assert not [name for name in _files(out) if TEMP_FILE.search(name)]

    run_extraction(config, progress=None)  # the limit lifted: the same run resumes and finishes
    assert_same_cache(out, reference)
