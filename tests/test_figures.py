"""Attention figures: valid PNGs of a fixed pixel size, with or without the photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from smlstm.figures import FIGURE_SIZE_PX, attention_figure, load_photo
from smlstm.model import SMLSTM, ModelConfig


@pytest.fixture(scope="module")
def explained():
    """A real `explain` output of a tiny model on a 3 x 4 grid and a 6-word caption."""
    torch.manual_seed(0)
    model = SMLSTM(ModelConfig.small(vocab_size=20, instance_dim=8, global_dim=10))
    output = model.explain(torch.randn(12, 8), torch.randn(10), torch.tensor([2, 3, 4, 5, 6, 7]),
                           6, grid=(3, 4))
    return output, ["a", "red", "circle", "left", "of", "square"]


def assert_png_of_expected_size(path):
    with Image.open(path) as img:
        img.verify()  # a complete, uncorrupted PNG
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == FIGURE_SIZE_PX
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10  # something was drawn


def test_figure_over_a_photo_file(explained, tmp_path):
    output, tokens = explained
    photo = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)).save(photo)
    png = attention_figure(photo, output, tokens, tmp_path / "figs" / "a.png", title="pair 1")
    assert png == tmp_path / "figs" / "a.png"
    assert_png_of_expected_size(png)
    assert [p.name for p in png.parent.iterdir()] == ["a.png"]  # no temp file left behind


def test_size_does_not_depend_on_the_photo_or_the_caption(explained, tmp_path):
    output, tokens = explained
    tall = np.zeros((300, 40, 3), dtype=np.uint8)
    long_caption = {**output, "word_weights": torch.full((output["word_weights"].shape[0], 40),
                                                         1 / 40)}
    a = attention_figure(tall, output, tokens, tmp_path / "tall.png")
    b = attention_figure(np.zeros((20, 20), dtype=np.uint8), long_caption, ["w"] * 40,
                         tmp_path / "long.png")
    for png in (a, b):
        assert_png_of_expected_size(png)


def test_a_missing_photo_still_gives_a_figure(explained, tmp_path):
    output, tokens = explained
    assert load_photo(tmp_path / "gone.jpg") is None
    png = attention_figure(tmp_path / "gone.jpg", output, tokens, tmp_path / "no-photo.png")
    assert_png_of_expected_size(png)


def test_maps_and_words_must_agree(explained, tmp_path):
    output, tokens = explained
    bad = {**output, "word_weights": output["word_weights"][:1]}  # 1 step of words vs 3 of maps
    with pytest.raises(ValueError, match="image_maps"):
        attention_figure(None, bad, tokens, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
