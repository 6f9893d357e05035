"""The synthetic "shapes" benchmark: small scenes of coloured shapes with Karpathy-format captions.

Each image holds 1-4 objects (colour x shape x size) on a 3x3 grid of places, drawn with a
little jitter over a light, noisy gradient background. Each gets 5 captions from several
templates that name the objects and their places ("in the top left corner") or relations
("a small red circle above a blue square"). About 30 % of the images are *twins*: the same
objects as an earlier image of the same split, every one moved to another place, so only the
arrangement (and hence the captions) tells them apart. A model that ignores *where* things are
cannot separate a twin from its source; `twin_of` in the JSON lets analysis find the pairs.
The grammar is documented in docs/shapes-grammar.md.

Everything random is drawn up front from one `random.Random(seed)` (the plan); each image is
then rendered from its plan alone (noise from its own seeded generator), so the bytes on disk
depend on the seed only, never on the number of worker processes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from features.dataset import tokenize
from features.errors import ConfigError

# -- the vocabulary of the scenes --------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "green": (35, 150, 55),
    "blue": (35, 75, 205),
    "yellow": (230, 195, 20),
    "purple": (135, 55, 175),
    "orange": (240, 125, 25),
    "black": (25, 25, 25),
}
COLOUR_WORDS = {"purple": ("purple", "violet")}  # synonyms; other colours have one word
SHAPES = ("circle", "square", "triangle", "star", "cross")
SHAPE_WORDS = {"circle": ("circle", "disk"), "cross": ("cross", "plus")}
SIZES = {"small": 0.22, "large": 0.40}  # half-extent as a fraction of the grid cell
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}

# Place names of the 3x3 grid, by (row, col). Several phrasings each; no two cells share one.
PLACES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left corner", "at the top left", "in the upper left"),
    (0, 1): ("at the top", "in the top middle", "at the top center"),
    (0, 2): ("in the top right corner", "at the top right", "in the upper right"),
    (1, 0): ("on the left", "in the middle left", "at the left side"),
    (1, 1): ("in the center", "in the middle", "at the center"),
    (1, 2): ("on the right", "in the middle right", "at the right side"),
    (2, 0): ("in the bottom left corner", "at the bottom left", "in the lower left"),
    (2, 1): ("at the bottom", "in the bottom middle", "at the bottom center"),
    (2, 2): ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
NUMBERS = ("one", "two", "three", "four")
N_OBJECTS_WEIGHTS = (0.2, 0.35, 0.3, 0.15)  # how often a scene has 1, 2, 3, 4 objects
CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class Thing:
    """One object of a scene: what it is, where it is, and its jitter inside its cell."""

    colour: str
    shape: str
    size: str
    row: int
    col: int
    dx: float  # jitter of the centre, in [-1, 1] x the room the object has in its cell
    dy: float

    @property
    def kind(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.size)


@dataclass(frozen=True)
class Scene:
    index: int
    split: str
    things: tuple[Thing, ...]
    background: tuple[int, int, int]
    gradient: tuple[float, float]  # brightness change across x and y, in grey levels
    noise: float  # std of the pixel noise
    captions: tuple[str, ...]
    twin_of: int | None = None


# -- captions ----------------------------------------------------------------------------------


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(thing: Thing, rng: random.Random, *, with_size: bool | None = None) -> str:
    """'small red circle' / 'red circle' / 'big violet disk' ..."""
    words = []
    if with_size if with_size is not None else rng.random() < 0.6:
        words.append(rng.choice(SIZE_WORDS[thing.size]))
    words.append(rng.choice(COLOUR_WORDS.get(thing.colour, (thing.colour,))))
    words.append(rng.choice(SHAPE_WORDS.get(thing.shape, (thing.shape,))))
    return " ".join(words)


def _place(thing: Thing, rng: random.Random) -> str:
    return rng.choice(PLACES[(thing.row, thing.col)])


def _relation(a: Thing, b: Thing, rng: random.Random) -> str:
    """A true relation of a to b: 'above', 'to the left of', ... (cells differ, so one exists)."""
    options = []
    if a.row != b.row:
        options += ["above", "over"] if a.row < b.row else ["below", "under", "beneath"]
    if a.col != b.col:
        options += (
            ["to the left of", "left of"] if a.col < b.col else ["to the right of", "right of"]
        )
    return rng.choice(options)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _caption(things: tuple[Thing, ...], rng: random.Random) -> str:
    """One caption from a randomly chosen template; every template mentions a place or relation."""
    n = len(things)
    order = list(things)
    rng.shuffle(order)  # mention objects in varied order
    templates = ["list", "count", "there_is"] + (
        ["relation", "relation_count"] if n > 1 else ["single"]
    )
    template = rng.choice(templates)
    if template == "list":
        text = _join([f"{_article(_describe(t, rng))} {_place(t, rng)}" for t in order])
    elif template == "count":
        noun = rng.choice(("objects", "shapes")) if n > 1 else rng.choice(("object", "shape"))
        items = _join([f"{_article(_describe(t, rng))} {_place(t, rng)}" for t in order])
        text = f"{NUMBERS[n - 1]} {noun}: {items}"
    elif template == "there_is":
        first = f"{_article(_describe(order[0], rng))} {_place(order[0], rng)}"
        opening = rng.choice(("there is", "an image with", "a picture showing"))
        text = f"{opening} {_join([first] + [_article(_describe(t, rng)) for t in order[1:]])}"
    elif template == "single":
        thing = order[0]
        text = rng.choice(
            (
                f"a single {_describe(thing, rng)} {_place(thing, rng)}",
                f"only {_article(_describe(thing, rng))} {_place(thing, rng)} of the image",
                f"{_article(_describe(thing, rng))} alone {_place(thing, rng)}",
            )
        )
    elif template == "relation":
        a, b = order[0], order[1]
        text = f"{_article(_describe(a, rng))} {_relation(a, b, rng)} {_article(_describe(b, rng))}"
        if n > 2:
            text += f" and {_article(_describe(order[2], rng))} {_place(order[2], rng)}"
    else:  # relation_count
        a, b = order[0], order[1]
        noun = rng.choice(("objects", "shapes"))
        name_a = _describe(a, rng, with_size=False)
        name_b = _describe(b, rng, with_size=False)
        text = f"{NUMBERS[n - 1]} {noun} where the {name_a} is {_relation(a, b, rng)} the {name_b}"
    if rng.random() < 0.15:
        text += rng.choice((" on a light background", " on a plain background"))
    return text[0].upper() + text[1:] + "."


def _captions(
    things: tuple[Thing, ...], rng: random.Random, avoid: frozenset[str] = frozenset()
) -> tuple[str, ...]:
    """CAPTIONS_PER_IMAGE distinct captions, none of them in `avoid` (a twin's source captions)."""
    captions: list[str] = []
    for _ in range(200):
        caption = _caption(things, rng)
        if caption not in captions and caption not in avoid:
            captions.append(caption)
            if len(captions) == CAPTIONS_PER_IMAGE:
                return tuple(captions)
    # Tiny scenes can run out of distinct phrasings: repeat, but never a source caption.
    # (A twin moved every object, so a full 'list' caption always differs from its source's.)
    while len(captions) < CAPTIONS_PER_IMAGE:
        parts = [
            f"{_article(_describe(t, rng, with_size=True))} {PLACES[(t.row, t.col)][0]}"
            for t in things
        ]
        caption = _join(parts)
        captions.append(caption[0].upper() + caption[1:] + ".")
    return tuple(captions)


# -- planning (all random draws happen here, in one process) -----------------------------------


def _place_things(
    kinds: list[tuple[str, str, str]], cells: list[int], rng: random.Random
) -> tuple[Thing, ...]:
    return tuple(
        Thing(colour, shape, size, cell // 3, cell % 3, rng.uniform(-1, 1), rng.uniform(-1, 1))
        for (colour, shape, size), cell in zip(kinds, cells, strict=True)
    )


def _new_things(rng: random.Random) -> tuple[Thing, ...]:
    n = rng.choices(range(1, 5), weights=N_OBJECTS_WEIGHTS)[0]
    # Distinct (colour, shape) within a scene, so "the red circle" names one object.
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    kinds = [(colour, shape, rng.choice(tuple(SIZES))) for colour, shape in pairs]
    return _place_things(kinds, rng.sample(range(9), n), rng)


def _twin_things(source: tuple[Thing, ...], rng: random.Random) -> tuple[Thing, ...]:
    """The same objects, every one in a different cell than in the source."""
    old = [t.row * 3 + t.col for t in source]
    while True:  # for <= 4 objects on 9 cells this takes a couple of tries
        cells = rng.sample(range(9), len(source))
        if all(new != before for new, before in zip(cells, old, strict=True)):
            return _place_things([t.kind for t in source], cells, rng)


def _split_sizes(images: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    n_val = max(1, round(images * fractions[1]))
    n_test = max(1, round(images * fractions[2]))
    n_train = images - n_val - n_test
    if n_train < 1:
        raise ConfigError(f"make_shapes: images={images} is too few for splits {fractions}")
    return n_train, n_val, n_test


def plan_scenes(
    images: int, seed: int, splits: tuple[float, float, float], twin_fraction: float
) -> list[Scene]:
    """Decide every scene (split, objects, places, background, captions, twins) from the seed."""
    rng = random.Random(seed)
    n_train, n_val, n_test = _split_sizes(images, splits)
    labels = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    rng.shuffle(labels)  # interleave splits so a twin's source may lie anywhere before it

    scenes: list[Scene] = []
    originals: dict[str, list[Scene]] = {"train": [], "val": [], "test": []}
    for index, split in enumerate(labels):
        source = None
        if originals[split] and rng.random() < twin_fraction:
            source = rng.choice(originals[split])
            things = _twin_things(source.things, rng)
            captions = _captions(things, rng, avoid=frozenset(source.captions))
        else:
            things = _new_things(rng)
            captions = _captions(things, rng)
        scene = Scene(
            index=index,
            split=split,
            things=things,
            background=(rng.randint(200, 245), rng.randint(200, 245), rng.randint(200, 245)),
            gradient=(rng.uniform(-25, 25), rng.uniform(-25, 25)),
            noise=rng.uniform(2.0, 8.0),
            captions=captions,
            twin_of=None if source is None else source.index,
        )
        scenes.append(scene)
        if source is None:
            originals[split].append(scene)
    return scenes


# -- rendering (pure function of a scene: safe to run in any process) --------------------------


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        h = r * math.sqrt(3) / 2
        return [(cx, cy - r), (cx + h, cy + r / 2), (cx - h, cy + r / 2)]
    if shape == "star":
        return [
            (
                cx + (r if k % 2 == 0 else 0.42 * r) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else 0.42 * r) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
    if shape == "cross":
        w = 0.35 * r
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"no polygon for shape {shape!r}")


def render_scene(scene: Scene, size: int, seed: int) -> Image.Image:
    """Draw one scene as an RGB image of size x size pixels."""
    noise_rng = np.random.default_rng([seed, scene.index])
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    shade = scene.gradient[0] * ramp[None, :] + scene.gradient[1] * ramp[:, None]
    pixels = np.asarray(scene.background, np.float32)[None, None, :] + shade[:, :, None]
    pixels += noise_rng.normal(0.0, scene.noise, (size, size, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(image)
    cell = size / 3
    for thing in scene.things:
        r = SIZES[thing.size] * cell
        room = max(0.0, cell / 2 - r - 1)  # how far the centre may move and stay in its cell
        cx = (thing.col + 0.5) * cell + thing.dx * room
        cy = (thing.row + 0.5) * cell + thing.dy * room
        colour = COLOURS[thing.colour]
        if thing.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif thing.shape == "square":
            s = 0.85 * r  # a square of the same half-extent looks bigger than the circle
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
        else:
            draw.polygon(_shape_points(thing.shape, cx, cy, r), fill=colour)
    return image


def _render_chunk(args: tuple[list[Scene], int, int, str]) -> int:
    scenes, size, seed, image_dir = args
    for scene in scenes:
        render_scene(scene, size, seed).save(
            Path(image_dir) / image_name(scene.index), "JPEG", quality=90
        )
    return len(scenes)


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # respects taskset / container CPU limits
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def image_name(index: int) -> str:
    return f"shapes_{index:06d}.jpg"


# -- the entry point ---------------------------------------------------------------------------


def _validate(
    images: int,
    seed: int,
    size: int,
    splits: tuple[float, float, float],
    workers: int | None,
    twin_fraction: float,
) -> tuple[float, float, float]:
    """Check every argument of make_shapes; return the split fractions as floats."""

    def bad(field: str, what: str) -> ConfigError:
        return ConfigError(f"make_shapes: {field}: {what}")

    for name, value in (("images", images), ("seed", seed), ("size", size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(name, f"expected an integer, got {type(value).__name__}")
    if images < 3:
        raise bad("images", f"need at least 3 (one per split), got {images}")
    if seed < 0:
        raise bad("seed", f"must be >= 0, got {seed}")
    if size < 32:
        raise bad("size", f"must be >= 32 pixels, got {size}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise bad("workers", f"must be a positive integer or None, got {workers!r}")
    if not 0 <= twin_fraction < 1:
        raise bad("twin_fraction", f"must be in [0, 1), got {twin_fraction}")
    try:
        fractions = tuple(float(f) for f in splits)
    except (TypeError, ValueError):
        raise bad("splits", f"expected three numbers (train, val, test), got {splits!r}") from None
    if len(fractions) != 3 or any(not f > 0 for f in fractions):
        raise bad("splits", f"expected three positive fractions (train, val, test), got {splits!r}")
    if abs(sum(fractions) - 1) > 1e-6:
        raise bad("splits", f"fractions must sum to 1, got {sum(fractions):g}")
    train, val, test = fractions
    _split_sizes(images, (train, val, test))
    return train, val, test


def make_shapes(
    out_dir: str | Path,
    images: int,
    seed: int,
    size: int = 128,
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1),
    workers: int | None = None,
    twin_fraction: float = 0.3,
) -> Path:
    """Write `out_dir/images/shapes_NNNNNN.jpg` and `out_dir/dataset.json`; return the JSON path.

    Same seed -> byte-identical files, whatever `workers` is. workers=None picks one process
    for small sets and one per usable core (at most 8) from 1000 images on.
    Raises ConfigError (one line) on bad arguments, before writing anything.
    """
    fractions = _validate(images, seed, size, splits, workers, twin_fraction)
    scenes = plan_scenes(images, seed, fractions, twin_fraction)

    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    wanted = {image_name(scene.index) for scene in scenes}
    for stale in image_dir.glob("shapes_*.jpg"):  # left by an earlier, larger run
        if stale.name not in wanted:
            stale.unlink()

    if workers is None:  # a process renders ~500 images/s: only large sets gain from a pool
        workers = 1 if images < 1000 else min(8, _usable_cores())
    n_chunks = 1 if workers == 1 else workers * 4
    chunk = math.ceil(len(scenes) / n_chunks)
    jobs = [
        (scenes[i : i + chunk], size, seed, str(image_dir)) for i in range(0, len(scenes), chunk)
    ]
    if workers == 1:
        for job in jobs:
            _render_chunk(job)
    else:
        # fork: the workers need only this module, and spawn would re-import the whole CLI.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        with multiprocessing.get_context(method).Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_chunk, jobs):
                pass

    # The JSON goes last: a run that dies half-way leaves no dataset pointing at missing images.
    json_path = out_dir / "dataset.json"
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(_karpathy_json(scenes), separators=(",", ":")), encoding="utf-8")
    tmp.replace(json_path)
    return json_path


def _karpathy_json(scenes: list[Scene]) -> dict:
    records = []
    for scene in scenes:
        sentids = [scene.index * CAPTIONS_PER_IMAGE + j for j in range(len(scene.captions))]
        record = {
            "filepath": "images",
            "filename": image_name(scene.index),
            "imgid": scene.index,
            "split": scene.split,
            "sentids": sentids,
            "sentences": [
                {"tokens": tokenize(raw), "raw": raw, "imgid": scene.index, "sentid": sentid}
                for raw, sentid in zip(scene.captions, sentids, strict=True)
            ],
            "objects": [
                {"colour": t.colour, "shape": t.shape, "size": t.size, "row": t.row, "col": t.col}
                for t in scene.things
            ],
        }
        if scene.twin_of is not None:
            record["twin_of"] = scene.twin_of
        records.append(record)
    return {"dataset": "shapes", "images": records}
