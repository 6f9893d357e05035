"""The Karpathy-split JSON reader (Flickr8k / Flickr30k / COCO), its validation, and the tokenizer.

The file format, as published with Karpathy & Fei-Fei's "Deep visual-semantic alignments":

    {"dataset": "flickr8k",
     "images": [{"filename": "1000268201_693b08cb0e.jpg", "filepath": "val2014" (COCO only),
                 "imgid": 0, "split": "train" | "val" | "test" | "restval",
                 "sentences": [{"raw": "A child in a pink dress ...", "tokens": [...],
                                "sentid": 0, "imgid": 0}, ...],
                 "sentids": [...], "cocoid": ... (ignored)}, ...]}

Everything the rest of the pipeline relies on is checked here, once, so that a bad file fails
before anything is written: each problem raises a `DatasetError` whose message is one line
`<file>: images[<i>].<field>: <what is wrong>`. Unknown keys are ignored. The JSON's own
`tokens` are not trusted: captions are re-tokenized with `tokenize`, which reproduces them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features.errors import DatasetError

__all__ = [
    "Caption",
    "DatasetError",
    "ImageRecord",
    "KarpathyDataset",
    "SPLITS",
    "load_karpathy",
    "tokenize",
]

SPLITS = ("train", "val", "test", "restval")  # the splits a Karpathy file may use
_TOKEN = re.compile(r"[a-z0-9]+")
_DRIVE = re.compile(r"^[A-Za-z]:")


def tokenize(text: str) -> list[str]:
    """Lower-case and keep runs of [a-z0-9]: "A man's T-shirt, 2 dogs." -> a man s t shirt 2 dogs."""
    return _TOKEN.findall(text.lower())


@dataclass(frozen=True)
class Caption:
    sentid: int
    raw: str
    tokens: tuple[str, ...]  # tokenize(raw); the JSON's own tokens are not trusted


@dataclass(frozen=True)
class ImageRecord:
    index: int  # position in the JSON images list == row in the cache
    imgid: int
    filename: str
    relpath: str  # "filepath/filename" (or filename), validated not to escape the root
    split: str  # "train" | "val" | "test" ("restval" -> "train" when restval_as_train)
    captions: tuple[Caption, ...]  # all captions, file order


@dataclass(frozen=True)
class KarpathyDataset:
    path: str
    name: str  # top-level "dataset" key, or the file stem
    images: tuple[ImageRecord, ...]

    def split(self, name: str) -> tuple[ImageRecord, ...]:
        """The images of one split, in file order."""
        return tuple(image for image in self.images if image.split == name)

    def split_counts(self) -> dict[str, tuple[int, int]]:
        """{split: (number of images, number of captions)} in the order splits first appear."""
        counts: dict[str, tuple[int, int]] = {}
        for image in self.images:
            n_images, n_captions = counts.get(image.split, (0, 0))
            counts[image.split] = (n_images + 1, n_captions + len(image.captions))
        return counts


# ----------------------------------------------------------------------------------------------
# type checks that name the field and say what was found


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return "bool"
    return {int: "int", float: "float", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )


class _Checker:
    """Raises one-line DatasetErrors prefixed with the file name."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, what: str) -> DatasetError:
        return DatasetError(f"{self.path}: {where}: {what}" if where else f"{self.path}: {what}")

    def get(self, obj: dict, key: str, where: str) -> Any:
        if key not in obj:
            raise self.fail(where, f"missing required key '{key}'")
        return obj[key]

    def string(self, value: Any, where: str, *, non_empty: bool = False) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"expected a string, got {_json_type(value)}")
        if non_empty and not value.strip():
            raise self.fail(where, "empty string")
        return value

    def integer(self, value: Any, where: str) -> int:
        # JSON true/false load as Python bools, which are ints: refuse them explicitly.
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(where, f"expected an integer, got {_json_type(value)}")
        return value

    def array(self, value: Any, where: str) -> list:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list, got {_json_type(value)}")
        return value

    def mapping(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, got {_json_type(value)}")
        return value

    def safe_relpath(self, value: str, where: str) -> None:
        """Refuse a path that could leave the image root once joined to it."""
        if "\\" in value:
            raise self.fail(where, f"backslash in path {value!r} (use '/')")
        if _DRIVE.match(value):
            raise self.fail(where, f"drive letter in path {value!r}")
        if value.startswith("/"):
            raise self.fail(where, f"absolute path {value!r}")
        if "\x00" in value:
            raise self.fail(where, "NUL character in path")
        for part in value.split("/"):
            if part in ("", ".", ".."):
                raise self.fail(where, f"path {value!r} has an empty, '.' or '..' component")


# ----------------------------------------------------------------------------------------------
# reading


def _read_json(path: Path, check: _Checker) -> Any:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise check.fail("", f"cannot read file: {err.strerror or err}") from None
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is harmless: skip it
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise check.fail(
            "", f"not UTF-8: invalid byte 0x{data[err.start]:02x} at byte offset {err.start}"
        ) from None
    if not text.strip():
        raise check.fail("", "empty file, expected a JSON object")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise check.fail(
            "", f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from None


def _parse_image(raw: Any, index: int, check: _Checker, restval_as_train: bool) -> ImageRecord:
    at = f"images[{index}]"
    image = check.mapping(raw, at)
    filename = check.string(check.get(image, "filename", at), f"{at}.filename", non_empty=True)
    check.safe_relpath(filename, f"{at}.filename")
    filepath = image.get("filepath")
    if filepath is not None and check.string(filepath, f"{at}.filepath") != "":
        check.safe_relpath(filepath, f"{at}.filepath")
        relpath = f"{filepath}/{filename}"
    else:
        relpath = filename

    imgid = check.integer(check.get(image, "imgid", at), f"{at}.imgid")
    split = check.string(check.get(image, "split", at), f"{at}.split")
    if split not in SPLITS:
        raise check.fail(f"{at}.split", f"unknown split {split!r} (allowed: {', '.join(SPLITS)})")
    if split == "restval" and restval_as_train:
        split = "train"

    sentences = check.array(check.get(image, "sentences", at), f"{at}.sentences")
    if not sentences:
        raise check.fail(f"{at}.sentences", "no captions (an image needs at least one)")
    captions = []
    for j, raw_sentence in enumerate(sentences):
        where = f"{at}.sentences[{j}]"
        sentence = check.mapping(raw_sentence, where)
        text = check.string(check.get(sentence, "raw", where), f"{where}.raw", non_empty=True)
        sentid = check.integer(check.get(sentence, "sentid", where), f"{where}.sentid")
        if "imgid" in sentence:
            owner = check.integer(sentence["imgid"], f"{where}.imgid")
            if owner != imgid:
                raise check.fail(
                    f"{where}.imgid", f"{owner} differs from the image's imgid {imgid}"
                )
        if "tokens" in sentence:  # not used, but a wrong type means the file is not what we think
            for k, token in enumerate(check.array(sentence["tokens"], f"{where}.tokens")):
                check.string(token, f"{where}.tokens[{k}]")
        captions.append(Caption(sentid=sentid, raw=text, tokens=tuple(tokenize(text))))

    return ImageRecord(
        index=index,
        imgid=imgid,
        filename=filename,
        relpath=relpath,
        split=split,
        captions=tuple(captions),
    )


def load_karpathy(
    path: str | Path,
    *,
    restval_as_train: bool = True,
    required_splits: Iterable[str] = ("train", "val", "test"),
    image_root: str | Path | None = None,
) -> KarpathyDataset:
    """Read and validate a Karpathy-split JSON file.

    restval_as_train: COCO's "restval" images join "train" (the usual 113k-image training set);
        when False they keep split "restval".
    required_splits: each must hold at least one image, else a DatasetError names it.
    image_root: accepted for callers that pass it; paths stay relative (`ImageRecord.relpath`)
        and are joined to the root by whoever opens the images.
    Raises DatasetError (one line: file, record, field) on any problem.
    """
    del image_root  # relpaths are validated not to escape any root; joining is the caller's job
    path = Path(path)
    check = _Checker(str(path))
    top = _read_json(path, check)
    if not isinstance(top, dict):
        raise check.fail(
            "", f"top level: expected an object with an 'images' list, got {_json_type(top)}"
        )
    images = check.array(check.get(top, "images", "top level"), "images")
    name = top.get("dataset", path.stem)
    name = check.string(name, "dataset", non_empty=True)

    records: list[ImageRecord] = []
    first_relpath: dict[str, int] = {}
    first_imgid: dict[int, int] = {}
    first_sentid: dict[int, tuple[int, int]] = {}
    for index, raw in enumerate(images):
        record = _parse_image(raw, index, check, restval_as_train)
        at = f"images[{index}]"
        if record.relpath in first_relpath:
            other = first_relpath[record.relpath]
            raise check.fail(
                f"{at}.filename", f"duplicate image {record.relpath!r} (also images[{other}])"
            )
        if record.imgid in first_imgid:
            other = first_imgid[record.imgid]
            raise check.fail(
                f"{at}.imgid", f"duplicate imgid {record.imgid} (also images[{other}])"
            )
        for j, caption in enumerate(record.captions):
            if caption.sentid in first_sentid:
                oi, oj = first_sentid[caption.sentid]
                raise check.fail(
                    f"{at}.sentences[{j}].sentid",
                    f"duplicate sentid {caption.sentid} (also images[{oi}].sentences[{oj}])",
                )
            first_sentid[caption.sentid] = (index, j)
        first_relpath[record.relpath] = index
        first_imgid[record.imgid] = index
        records.append(record)

    present = {record.split for record in records}
    required_splits = tuple(required_splits)
    for split in required_splits:
        if split not in present:
            raise check.fail(
                "images", f"no image has split {split!r} (required: {', '.join(required_splits)})"
            )
    return KarpathyDataset(path=str(path), name=name, images=tuple(records))
