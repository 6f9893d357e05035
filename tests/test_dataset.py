"""The Karpathy reader: a hand-written fixture, every validation error, the tokenizer, the CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from features.dataset import KarpathyDataset, load_karpathy, tokenize
from features.errors import DatasetError, InputError

FIXTURE = Path(__file__).parent / "data" / "karpathy_small.json"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixture_json() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def write(tmp_path: Path, payload, name: str = "data.json") -> Path:
    path = tmp_path / name
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path, **kwargs) -> str:
    """Load a bad file; return the message after checking it is one line naming the file."""
    with pytest.raises(DatasetError) as info:
        load_karpathy(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert isinstance(info.value, InputError)  # the CLI's catch-all for user errors
    return message


# -- the fixture ---------------------------------------------------------------------------------


def test_reads_fixture(fixture_json):
    dataset = load_karpathy(FIXTURE)
    assert isinstance(dataset, KarpathyDataset)
    assert dataset.name == "minicoco"
    assert dataset.path == str(FIXTURE)
    assert [im.index for im in dataset.images] == list(range(len(fixture_json["images"])))

    for record, raw in zip(dataset.images, fixture_json["images"], strict=True):
        assert record.imgid == raw["imgid"]
        assert record.filename == raw["filename"]
        expected_rel = (
            f"{raw['filepath']}/{raw['filename']}" if "filepath" in raw else raw["filename"]
        )
        assert record.relpath == expected_rel
        assert [c.sentid for c in record.captions] == [s["sentid"] for s in raw["sentences"]]
        assert [c.raw for c in record.captions] == [s["raw"] for s in raw["sentences"]]
        # re-tokenized captions reproduce the Karpathy tokens of the file
        assert [list(c.tokens) for c in record.captions] == [s["tokens"] for s in raw["sentences"]]

    restval = dataset.images[1]
    assert restval.split == "train"  # restval joins train by default
    assert len(restval.captions) == 7  # all captions kept, not only 5
    assert "café" in restval.captions[3].raw and "«Le Monde»" in restval.captions[3].raw
    assert [im.imgid for im in dataset.split("train")] == [0, 1, 4]
    assert [im.imgid for im in dataset.split("val")] == [2]
    assert dataset.split_counts()["train"] == (3, 5 + 7 + 1)


def test_restval_kept_when_asked():
    dataset = load_karpathy(FIXTURE, restval_as_train=False)
    assert dataset.images[1].split == "restval"
    assert [im.imgid for im in dataset.split("train")] == [0, 4]
    assert dataset.split("restval") == (dataset.images[1],)


def test_name_falls_back_to_stem(tmp_path, fixture_json):
    payload = copy.deepcopy(fixture_json)
    del payload["dataset"]
    dataset = load_karpathy(write(tmp_path, payload, "flickr_tiny.json"))
    assert dataset.name == "flickr_tiny"


def test_unknown_keys_and_missing_tokens_are_fine(tmp_path, fixture_json):
    payload = copy.deepcopy(fixture_json)
    payload["info"] = {"year": 2014}
    payload["images"][0]["whatever"] = [1, 2]
    del payload["images"][0]["sentences"][0]["tokens"]
    dataset = load_karpathy(write(tmp_path, payload))
    assert dataset.images[0].captions[0].tokens[:3] == ("a", "black", "dog")


def test_same_filename_in_other_folder_is_not_a_duplicate(tmp_path, fixture_json):
    payload = copy.deepcopy(fixture_json)
    payload["images"][3]["filename"] = payload["images"][4]["filename"]
    payload["images"][3]["filepath"] = "test2014"
    dataset = load_karpathy(write(tmp_path, payload))
    assert dataset.images[3].relpath != dataset.images[4].relpath


def test_required_splits(tmp_path, fixture_json):
    payload = copy.deepcopy(fixture_json)
    payload["images"] = [im for im in payload["images"] if im["split"] != "test"]
    path = write(tmp_path, payload)
    message = load_error(path)
    assert "'test'" in message and "images" in message
    assert len(load_karpathy(path, required_splits=("train", "val")).images) == 4


def test_restval_only_train_fails_when_kept_separate(tmp_path, fixture_json):
    payload = copy.deepcopy(fixture_json)
    for im in payload["images"]:
        if im["split"] == "train":
            im["split"] = "restval"
    path = write(tmp_path, payload)
    assert len(load_karpathy(path).split("train")) == 3
    assert "'train'" in load_error(path, restval_as_train=False)


# -- file-level errors ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    message = load_error(tmp_path / "nope.json")
    assert "cannot read" in message


def test_directory_instead_of_file(tmp_path):
    assert "cannot read" in load_error(tmp_path)


def test_truncated_json_names_line_and_column(tmp_path):
    text = FIXTURE.read_text(encoding="utf-8")
    cut = text[: len(text) // 2]
    message = load_error(write(tmp_path, cut))
    line = cut.count("\n") + 1
    assert "invalid JSON" in message and f"line {line}" in message and "column" in message


def test_non_utf8_names_byte_offset(tmp_path):
    good = json.dumps({"images": []}).encode()
    bad = good[:5] + b"\xff" + good[5:]
    path = tmp_path / "latin.json"
    path.write_bytes(bad)
    message = load_error(path)
    assert "UTF-8" in message and "byte offset 5" in message and "0xff" in message


def test_utf8_bom_is_accepted(tmp_path, fixture_json):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(fixture_json).encode())
    assert load_karpathy(path).name == "minicoco"


@pytest.mark.parametrize(
    "payload, expected",
    [
        ([], "expected an object"),
        ({"dataset": "x"}, "missing required key 'images'"),
        ({"images": {"a": 1}}, "images: expected a list, got object"),
        ({"images": [], "dataset": 3}, "dataset: expected a string, got int"),
        ("", "empty file"),
    ],
)
def test_top_level_errors(tmp_path, payload, expected):
    assert expected in load_error(write(tmp_path, payload))


# -- record-level errors: each names images[i] and the field ------------------------------------

# (what to change in image 1 (the 7-caption restval one), the field path, a word of the message)
RECORD_CASES = {
    "missing filename": (lambda im: im.pop("filename"), "images[1]", "'filename'"),
    "missing imgid": (lambda im: im.pop("imgid"), "images[1]", "'imgid'"),
    "missing split": (lambda im: im.pop("split"), "images[1]", "'split'"),
    "missing sentences": (lambda im: im.pop("sentences"), "images[1]", "'sentences'"),
    "missing raw": (lambda im: im["sentences"][2].pop("raw"), "images[1].sentences[2]", "'raw'"),
    "missing sentid": (
        lambda im: im["sentences"][6].pop("sentid"),
        "images[1].sentences[6]",
        "'sentid'",
    ),
    "filename int": (lambda im: im.update(filename=7), "images[1].filename", "got int"),
    "filepath list": (lambda im: im.update(filepath=["a"]), "images[1].filepath", "got list"),
    "imgid bool": (lambda im: im.update(imgid=True), "images[1].imgid", "got bool"),
    "imgid string": (lambda im: im.update(imgid="1"), "images[1].imgid", "got string"),
    "imgid float": (lambda im: im.update(imgid=1.0), "images[1].imgid", "got float"),
    "split int": (lambda im: im.update(split=1), "images[1].split", "got int"),
    "sentences dict": (lambda im: im.update(sentences={}), "images[1].sentences", "got object"),
    "sentence string": (
        lambda im: im["sentences"].__setitem__(0, "A dog."),
        "images[1].sentences[0]",
        "expected an object",
    ),
    "raw int": (
        lambda im: im["sentences"][0].update(raw=12),
        "images[1].sentences[0].raw",
        "expected a string, got int",
    ),
    "raw null": (
        lambda im: im["sentences"][0].update(raw=None),
        "images[1].sentences[0].raw",
        "got null",
    ),
    "sentid bool": (
        lambda im: im["sentences"][3].update(sentid=False),
        "images[1].sentences[3].sentid",
        "got bool",
    ),
    "tokens not a list": (
        lambda im: im["sentences"][1].update(tokens="a man"),
        "images[1].sentences[1].tokens",
        "got string",
    ),
    "token not a string": (
        lambda im: im["sentences"][1].update(tokens=["a", 5]),
        "images[1].sentences[1].tokens[1]",
        "got int",
    ),
    "sentence imgid mismatch": (
        lambda im: im["sentences"][4].update(imgid=99),
        "images[1].sentences[4].imgid",
        "99",
    ),
    "no sentences": (lambda im: im.update(sentences=[]), "images[1].sentences", "no captions"),
    "empty raw": (
        lambda im: im["sentences"][5].update(raw="   "),
        "images[1].sentences[5].raw",
        "empty",
    ),
    "unknown split": (
        lambda im: im.update(split="dev"),
        "images[1].split",
        "train, val, test, restval",
    ),
    "dotdot filename": (lambda im: im.update(filename="../x.jpg"), "images[1].filename", ".."),
    "dotdot filepath": (
        lambda im: im.update(filepath="val2014/../../etc"),
        "images[1].filepath",
        "..",
    ),
    "absolute filename": (
        lambda im: (im.pop("filepath"), im.update(filename="/etc/passwd")),
        "images[1].filename",
        "absolute",
    ),
    "absolute filepath": (lambda im: im.update(filepath="/data"), "images[1].filepath", "absolute"),
    "backslash": (lambda im: im.update(filename="..\\x.jpg"), "images[1].filename", "backslash"),
    "drive letter": (lambda im: im.update(filepath="C:"), "images[1].filepath", "drive letter"),
    "empty filename": (lambda im: im.update(filename=""), "images[1].filename", "empty"),
    "empty component": (lambda im: im.update(filename="a//b.jpg"), "images[1].filename", "empty"),
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_record_errors(tmp_path, fixture_json, case):
    change, field, word = RECORD_CASES[case]
    payload = copy.deepcopy(fixture_json)
    change(payload["images"][1])
    path = write(tmp_path, payload)
    message = load_error(path)
    assert f": {field}: " in message, message
    assert word in message, message


def test_image_not_an_object(tmp_path, fixture_json):
    payload = copy.deepcopy(fixture_json)
    payload["images"][1] = "oops"
    message = load_error(write(tmp_path, payload))
    assert message.endswith(": images[1]: expected an object, got string")


def test_duplicate_filename_names_both(tmp_path, fixture_json):
    payload = copy.deepcopy(fixture_json)
    payload["images"][3]["filename"] = payload["images"][1]["filename"]  # both under val2014
    message = load_error(write(tmp_path, payload))
    assert ": images[3].filename: " in message and "images[1]" in message
    assert payload["images"][1]["filename"] in message


def test_duplicate_imgid_names_both(tmp_path, fixture_json):
    payload = copy.deepcopy(fixture_json)
    payload["images"][4]["imgid"] = 0
    message = load_error(write(tmp_path, payload))
    assert ": images[4].imgid: " in message and "images[0]" in message


def test_duplicate_sentid_names_both(tmp_path, fixture_json):
    payload = copy.deepcopy(fixture_json)
    payload["images"][2]["sentences"][1]["sentid"] = 8
    message = load_error(write(tmp_path, payload))
    assert ": images[2].sentences[1].sentid: " in message
    assert "images[1].sentences[3]" in message


# -- tokenizer -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, tokens",
    [
        ("A man, in a red shirt's pocket.", ["a", "man", "in", "a", "red", "shirt", "s", "pocket"]),
        (
            "A black dog is running after a white dog in the snow .",
            [
                "a",
                "black",
                "dog",
                "is",
                "running",
                "after",
                "a",
                "white",
                "dog",
                "in",
                "the",
                "snow",
            ],
        ),
        (
            "Two kids don't want to leave the BEACH.",
            ["two", "kids", "don", "t", "want", "to", "leave", "the", "beach"],
        ),
        (
            "A boy in a T-shirt jumps off a 3-ft wall!",
            ["a", "boy", "in", "a", "t", "shirt", "jumps", "off", "a", "3", "ft", "wall"],
        ),
        ("2 dogs;  1 cat\tand 10 birds", ["2", "dogs", "1", "cat", "and", "10", "birds"]),
        ("A woman at the café", ["a", "woman", "at", "the", "caf"]),
        ("... !!! ", []),
    ],
)
def test_tokenize_reproduces_karpathy_tokens(raw, tokens):
    assert tokenize(raw) == tokens


# -- CLI -----------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smlstm.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_check_dataset_ok():
    result = run_cli("check-dataset", str(FIXTURE))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "minicoco" in lines[0]
    train = next(line for line in lines if line.split()[0] == "train")
    assert train.split()[1:] == ["3", "images", "13", "captions"]


def test_cli_check_dataset_invalid_json_exits_2_one_line(tmp_path):
    path = write(tmp_path, '{"images": [\n  {"filename": "a.jpg",\n')
    result = run_cli("check-dataset", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no traceback
    assert lines[0].startswith(f"error: {path}: invalid JSON at line 3")
