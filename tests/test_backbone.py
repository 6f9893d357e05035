"""VGG-19 backbone: real random-weight models, real weight files on disk, real forwards at 64 px."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from features.backbone import (
    WEIGHTS_FILENAME,
    FeatureExtractor,
    grid_size,
    load_vgg19,
    pick_device,
    state_dict_sha256,
)
from features.errors import InputError

IMAGE_SIZE = 64  # pool5 grid 2x2, conv5_4 grid 4x4: a fast forward


@pytest.fixture(scope="module")
def vgg():
    """One random VGG-19 (seed 0) for the whole module; building one takes about a second."""
    return load_vgg19("random", seed=0)


@pytest.fixture(scope="module")
def weights_file(vgg, tmp_path_factory):
    """The seed-0 model's state dict saved as a real .pth file (about 550 MB, written once)."""
    path = tmp_path_factory.mktemp("weights") / "my-vgg19.pth"
    torch.save(vgg[0].state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def global_reference(model, pool5):
    """fc7 after ReLU computed directly from torchvision's own modules."""
    with torch.no_grad():
        return model.classifier[:5](torch.flatten(model.avgpool(pool5), 1))


# ---------------------------------------------------------------- extractor


@pytest.mark.parametrize(("layer", "end"), [("pool5", 37), ("conv5_4", 36)])
def test_instances_are_the_feature_map_in_row_major_order(vgg, images, layer, end):
    model, _ = vgg
    instances, global_ = FeatureExtractor(model, layer, "off")(images)
    h, w = grid_size(IMAGE_SIZE, layer)
    assert instances.shape == (2, h * w, 512) and instances.dtype == torch.float32
    assert global_ is None
    with torch.no_grad():
        feature_map = model.features[:end](images)  # (B, 512, h, w)
    assert feature_map.shape == (2, 512, h, w)
    for y in range(h):
        for x in range(w):
            assert torch.allclose(instances[:, y * w + x], feature_map[:, :, y, x], atol=1e-5)


@pytest.mark.parametrize("layer", ["pool5", "conv5_4"])
def test_same_pass_global_is_fc7_of_pool5(vgg, images, layer):
    model, _ = vgg
    _, global_ = FeatureExtractor(model, layer, "same_pass")(images)
    with torch.no_grad():
        expected = global_reference(model, model.features(images))
    assert global_.shape == (2, 4096) and global_.dtype == torch.float32
    assert torch.allclose(global_, expected, atol=1e-5)
    assert (global_ >= 0).all() and global_.abs().sum() > 0  # after ReLU, and not all zero


def test_separate_224_global_is_a_second_pass_at_224(vgg, images):
    model, _ = vgg
    one = images[:1]  # a 224 pass costs about half a second per image here
    instances, global_ = FeatureExtractor(model, "pool5", "separate_224")(one)
    resized = F.interpolate(one, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = global_reference(model, model.features(resized))
        same_pass = global_reference(model, model.features(one))
    assert instances.shape == (1, 4, 512)
    assert global_.shape == (1, 4096) and global_.dtype == torch.float32
    assert torch.allclose(global_, expected, atol=1e-5)
    assert not torch.allclose(global_, same_pass, atol=1e-3)


def test_extractor_stays_in_eval_mode(vgg, images):
    model, _ = vgg
    extractor = FeatureExtractor(model, "pool5", "same_pass").train()  # asked to train anyway
    assert not extractor.training and not any(m.training for m in extractor.modules())
    first = extractor(images)[1]
    assert torch.equal(first, extractor(images)[1])  # dropout off: repeatable


def test_extractor_rejects_unknown_options(vgg):
    with pytest.raises(InputError, match="layer"):
        FeatureExtractor(vgg[0], "conv4_4")
    with pytest.raises(InputError, match="global_mode"):
        FeatureExtractor(vgg[0], "pool5", "fc8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_cpu_fp32(vgg, images):
    model, _ = vgg
    cpu_instances, cpu_global = FeatureExtractor(model, "pool5", "same_pass")(images)
    extractor = FeatureExtractor(model, "pool5", "same_pass").to("cuda")
    try:
        instances, global_ = extractor(images)  # CPU input: moved to the model's device
        assert instances.is_cuda and instances.dtype == torch.float32
        assert global_.dtype == torch.float32
        for got, want in ((instances.cpu(), cpu_instances), (global_.cpu(), cpu_global)):
            relative = (got - want).norm() / want.norm()
            assert relative < 0.05  # bf16 autocast, not bit-exact
    finally:
        model.to("cpu", memory_format=torch.contiguous_format)


# ---------------------------------------------------------------- random weights, identity


def test_random_weights_are_seeded_frozen_and_leave_the_global_rng_alone(vgg):
    model, identity = vgg
    assert identity["name"] == "random" and identity["seed"] == 0
    assert identity["source"] == "random"
    assert identity["sha256"] == state_dict_sha256(model.state_dict())
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    rng_before = torch.get_rng_state()
    again, again_identity = load_vgg19("random", seed=None)  # None means seed 0
    assert torch.equal(rng_before, torch.get_rng_state())
    assert again_identity == identity
    assert torch.equal(again.features[0].weight, model.features[0].weight)
    del again

    _, other_identity = load_vgg19("random", seed=1)
    assert other_identity["seed"] == 1
    assert other_identity["sha256"] != identity["sha256"]


def test_state_dict_sha256_covers_names_dtypes_shapes_and_values():
    base = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}
    digest = state_dict_sha256(base)
    assert digest == state_dict_sha256(dict(reversed(list(base.items()))))  # key order
    # Same values in another memory layout hash the same.
    strided = base["a.weight"].t().contiguous().t()  # same values, column-major strides
    assert not strided.is_contiguous()
    assert state_dict_sha256({**base, "a.weight": strided}) == digest
    changed = [
        {"a.weight2": base["a.weight"], "b": base["b"]},
        {**base, "a.weight": base["a.weight"].double()},
        {**base, "a.weight": base["a.weight"].reshape(3, 2)},
        {**base, "b": torch.tensor([1.0, 1.0 + 2**-20])},
        {**base, "b": base["b"].to(torch.bfloat16)},
    ]
    digests = {state_dict_sha256(variant) for variant in changed}
    assert digest not in digests and len(digests) == len(changed)


# ---------------------------------------------------------------- weight files


def test_weights_file_loads_with_the_source_identity(vgg, weights_file):
    source, source_identity = vgg
    model, identity = load_vgg19("imagenet", weights_file=weights_file)
    assert identity == {
        "name": "file",  # a valid VGG-19 state dict, but not torchvision's published file
        "seed": None,
        "sha256": source_identity["sha256"],
        "source": str(weights_file.resolve()),
    }
    assert torch.equal(model.classifier[3].weight, source.classifier[3].weight)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_torch_home_hub_cache_is_used(vgg, weights_file, tmp_path, monkeypatch):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.link(weights_file, checkpoints / WEIGHTS_FILENAME)  # same file, no 550 MB copy
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _, identity = load_vgg19("imagenet")
    assert identity["sha256"] == vgg[1]["sha256"]
    assert identity["source"] == str((checkpoints / WEIGHTS_FILENAME).resolve())


def test_missing_imagenet_weights_say_where_they_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(InputError) as caught:
        load_vgg19("imagenet")
    message = str(caught.value)
    assert str(tmp_path / "hub" / "checkpoints" / WEIGHTS_FILENAME) in message
    assert "--weights-file" in message and "--weights random" in message
    assert "\n" not in message

    with pytest.raises(InputError, match="nowhere.pth"):
        load_vgg19("imagenet", weights_file=tmp_path / "nowhere.pth")


@pytest.mark.parametrize(
    ("state_dict", "bad_key"),
    [
        ({"features.0.weight": torch.zeros(3, 3)}, "features.0.weight"),  # wrong shape
        ({"features.0.weight": torch.zeros(64, 3, 3, 3)}, "features.0.bias"),  # missing
        ({"conv1.weight": torch.zeros(64, 3, 3, 3)}, "features.0.weight"),  # another model
    ],
)
def test_state_dict_that_is_not_vgg19_names_file_and_key(tmp_path, state_dict, bad_key):
    path = tmp_path / "wrong.pth"
    torch.save(state_dict, path)
    with pytest.raises(InputError) as caught:
        load_vgg19("imagenet", weights_file=path)
    assert str(path) in str(caught.value) and repr(bad_key) in str(caught.value)


class Payload:
    """An arbitrary class: weights_only loading must refuse to unpickle it."""


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ({"x": Payload()}, "weights_only"),
        ([torch.zeros(1)], "expected a state dict"),
        (b"<html>not weights</html>", "weights_only"),
        (b"", "not a readable torch weights file"),
    ],
)
def test_unsafe_or_unreadable_weight_files_are_refused(tmp_path, content, fragment):
    path = tmp_path / "bad.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(InputError) as caught:
        load_vgg19("imagenet", weights_file=path)
    assert str(path) in str(caught.value) and fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_random_weights_take_no_file(tmp_path):
    with pytest.raises(InputError):
        load_vgg19("random", weights_file=tmp_path / "x.pth")
    with pytest.raises(InputError):
        load_vgg19("pretrained")


# ---------------------------------------------------------------- grid and device


def test_grid_size():
    assert grid_size(448, "pool5") == (14, 14)
    assert grid_size(448, "conv5_4") == (28, 28)
    assert grid_size(32, "pool5") == (1, 1)
    for bad_size in (0, 16, 100, 449):
        with pytest.raises(InputError, match="image_size"):
            grid_size(bad_size, "pool5")
    with pytest.raises(InputError, match="layer"):
        grid_size(448, "fc7")


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu please"):
        with pytest.raises(InputError, match="device"):
            pick_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            pick_device("cuda")
    else:
        with pytest.raises(InputError, match="device"):
            pick_device(f"cuda:{torch.cuda.device_count()}")
