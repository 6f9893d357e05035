"""The frozen VGG-19 backbone: weight loading, weight identity and the instance/global extractor.

Stage 1 runs every image through VGG-19 once and keeps two things (model-spec section 1):

- the instance map: the conv5 block's output (after pool5 by default, or conv5_4's ReLU),
  one 512-d vector per grid cell, flattened row-major so that instance i = y * w + x;
- the global context g: fc7 after its ReLU (4096-d), either from the same forward pass
  (pool5 -> adaptive avg-pool 7x7 -> fc6 -> fc7) or from a separate 224x224 pass.

Weights are never downloaded. `imagenet` reads torchvision's own file from a path the user
gives or from the torch hub cache; `random` is a seeded initialisation for tests and the
synthetic benchmark. Either way the caller gets an identity dict whose `sha256` is a hash of
the actual tensors, so the cache and every later stage can tell which weights made it.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from features.errors import InputError

# torchvision's VGG19_Weights.IMAGENET1K_V1 file; its name carries the first 8 hex digits of
# the file's sha256 (torch.hub's convention), which is how we recognise the genuine file.
WEIGHTS_FILENAME = "vgg19-dcbb9e9d.pth"
_WEIGHTS_FILE_SHA256_PREFIX = "dcbb9e9d"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LAYERS = ("pool5", "conv5_4")
GLOBAL_MODES = ("same_pass", "separate_224", "off")

# Indices into torchvision's vgg19().features (37 modules): 34 = conv5_4, 35 = its ReLU,
# 36 = the last max-pool (pool5). A slice [:end] keeps modules 0 .. end-1.
_FEATURES_END = {"pool5": 37, "conv5_4": 36}
_POOL5_INDEX = 36
_STRIDE = {"pool5": 32, "conv5_4": 16}
_FC7_END = 5  # classifier[0..4] = fc6, ReLU, Dropout, fc7, ReLU
_SEPARATE_GLOBAL_SIZE = 224


def state_dict_sha256(state_dict: dict) -> str:
    """Deterministic sha256 of a state dict: sorted keys, each key's name, dtype, shape and bytes.

    Two models hash equal exactly when they hold the same tensors under the same names, whatever
    device or memory layout they live in.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if not isinstance(value, Tensor):  # e.g. an `_extra_state`; VGG has none
            digest.update(f"{key}\0{value!r}\0".encode())
            continue
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        # Viewing as bytes works for every dtype (bfloat16 has no numpy equivalent).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _default_weights_path() -> Path:
    # torch.hub.get_dir() honours $TORCH_HOME (and torch.hub.set_dir) at call time.
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """torch.load with weights_only=True; every way it can fail becomes one InputError line."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses arbitrary pickled objects (and non-torch files); its message is a
        # page of advice, keep only the unpickler's reason.
        match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(err).strip())
        reason = match.group(1) if match else type(err).__name__
        raise InputError(
            f"{path}: refused by torch.load(weights_only=True), not a plain tensor state dict: "
            f"{reason}"
        ) from err
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as err:
        reason = str(err) or f"{type(err).__name__} (empty or cut short?)"
        raise InputError(f"{path}: not a readable torch weights file: {reason}") from err
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    return loaded


def _check_state_dict(path: Path, state_dict: dict, expected: dict[str, Tensor]) -> None:
    """Raise InputError naming the first key (in model order) that is missing or mis-shaped."""
    for key, reference in expected.items():
        if key not in state_dict:
            raise InputError(f"{path}: not a VGG-19 state dict: missing key {key!r}")
        value = state_dict[key]
        if not isinstance(value, Tensor):
            raise InputError(
                f"{path}: not a VGG-19 state dict: {key!r} is a {type(value).__name__}, "
                "expected a tensor"
            )
        if tuple(value.shape) != tuple(reference.shape):
            raise InputError(
                f"{path}: not a VGG-19 state dict: {key!r} has shape {tuple(value.shape)}, "
                f"expected {tuple(reference.shape)}"
            )
        if not value.is_floating_point():
            raise InputError(f"{path}: not a VGG-19 state dict: {key!r} has dtype {value.dtype}")
    unexpected = [key for key in state_dict if key not in expected]
    if unexpected:
        raise InputError(f"{path}: not a VGG-19 state dict: unexpected key {unexpected[0]!r}")


def _freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def load_vgg19(
    weights: Literal["imagenet", "random"],
    weights_file: str | Path | None = None,
    seed: int | None = None,
) -> tuple[torchvision.models.VGG, dict]:
    """Build a frozen, eval-mode VGG-19 on the CPU and return it with its identity.

    weights="imagenet": read `weights_file`, or torchvision's file in the torch hub cache
    ($TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth). Never downloads, never falls back to
    random weights. The identity's name is "imagenet" only when the file's sha256 matches
    torchvision's published file; any other valid VGG-19 state dict is named "file".

    weights="random": torchvision's initialisation drawn from `seed` (0 when None); the global
    RNG is left untouched.

    Returns (model, {"name", "seed", "sha256", "source"}), where sha256 = state_dict_sha256.
    """
    if weights == "random":
        if weights_file is not None:
            raise InputError("weights: 'random' takes no weights file; use weights='imagenet'")
        seed = 0 if seed is None else int(seed)
        # fork_rng(devices=[]) restores the CPU RNG afterwards; VGG's init runs on the CPU only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = torchvision.models.vgg19(weights=None)
        _freeze(model)
        identity = {
            "name": "random",
            "seed": seed,
            "sha256": state_dict_sha256(model.state_dict()),
            "source": "random",
        }
        return model, identity

    if weights != "imagenet":
        raise InputError(f"weights: expected 'imagenet' or 'random', got {weights!r}")

    path = Path(weights_file).expanduser() if weights_file is not None else _default_weights_path()
    if not path.is_file():
        where = "--weights-file" if weights_file is not None else "the torch hub cache"
        raise InputError(
            f"VGG-19 ImageNet weights not found: looked at {path} ({where}); provide the file "
            f"with --weights-file PATH or place {WEIGHTS_FILENAME} in $TORCH_HOME/hub/checkpoints/ "
            "(nothing is downloaded); use --weights random for tests"
        )

    state_dict = _read_state_dict(path)
    # Build on the meta device: no point drawing 143M random numbers we overwrite at once.
    with torch.device("meta"):
        model = torchvision.models.vgg19(weights=None)
    expected = model.state_dict()
    _check_state_dict(path, state_dict, expected)
    # fp32 on the CPU whatever the file stores (a half-precision copy would break CPU runs).
    state_dict = {key: state_dict[key].to(torch.float32).contiguous() for key in expected}
    model.load_state_dict(state_dict, assign=True)
    _freeze(model)

    genuine = file_sha256(path).startswith(_WEIGHTS_FILE_SHA256_PREFIX)
    identity = {
        "name": "imagenet" if genuine else "file",
        "seed": None,
        "sha256": state_dict_sha256(model.state_dict()),
        "source": str(path.resolve()),
    }
    return model, identity


def grid_size(image_size: int, layer: str) -> tuple[int, int]:
    """The (h, w) instance grid for a square input: pool5 -> size/32, conv5_4 -> size/16."""
    if layer not in _STRIDE:
        raise InputError(f"layer: expected one of {', '.join(LAYERS)}, got {layer!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise InputError(f"image_size: expected an integer, got {type(image_size).__name__}")
    if image_size < 32 or image_size % 32 != 0:
        raise InputError(f"image_size: expected a multiple of 32 and >= 32, got {image_size}")
    side = image_size // _STRIDE[layer]
    return side, side


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cpu', 'cuda', 'cuda:N' are checked to exist."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as err:
        raise InputError(
            f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {requested!r}"
        ) from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device: {requested!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(
                f"device: {requested!r} requested but only {torch.cuda.device_count()} "
                "CUDA device(s) exist"
            )
    elif device.type != "cpu":
        raise InputError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {requested!r}")
    return device


class FeatureExtractor(nn.Module):
    """VGG-19 -> (instances (B, I, 512), global fc7 (B, 4096) or None), both float32.

    Holds the VGG's modules (no copy). Always in eval mode: dropout between fc6 and fc7 must
    stay off, so `train()` is a no-op. Move it with `.to(device)`; inputs are moved to the
    model's device. On CUDA it runs channels_last under bf16 autocast; on CPU plain fp32.
    """

    def __init__(
        self,
        vgg: torchvision.models.VGG,
        layer: Literal["pool5", "conv5_4"] = "pool5",
        global_mode: Literal["same_pass", "separate_224", "off"] = "same_pass",
    ):
        super().__init__()
        if layer not in LAYERS:
            raise InputError(f"layer: expected one of {', '.join(LAYERS)}, got {layer!r}")
        if global_mode not in GLOBAL_MODES:
            raise InputError(
                f"global_mode: expected one of {', '.join(GLOBAL_MODES)}, got {global_mode!r}"
            )
        self.layer = layer
        self.global_mode = global_mode
        self.trunk = vgg.features[: _FEATURES_END[layer]]  # up to the instance layer
        self.pool5 = vgg.features[_POOL5_INDEX]  # only used after conv5_4 for same_pass
        self.full_features = vgg.features  # the separate 224 pass always goes to pool5
        self.avgpool = vgg.avgpool
        self.fc7 = vgg.classifier[:_FC7_END]
        self._channels_last = False
        _freeze(self)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Frozen extractor: stays in eval mode whatever is asked (dropout must stay off)."""
        return super().train(False)

    def _global_from_pool5(self, pool5: Tensor) -> Tensor:
        return self.fc7(torch.flatten(self.avgpool(pool5), 1))

    def _run(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        feature_map = self.trunk(images)  # (B, 512, h, w)
        # (B, 512, h, w) -> (B, h*w, 512), row-major over the grid: instance i = y * w + x.
        instances = feature_map.flatten(2).transpose(1, 2)
        if self.global_mode == "off":
            return instances, None
        if self.global_mode == "same_pass":
            pool5 = feature_map if self.layer == "pool5" else self.pool5(feature_map)
            return instances, self._global_from_pool5(pool5)
        small = F.interpolate(
            images,
            size=(_SEPARATE_GLOBAL_SIZE, _SEPARATE_GLOBAL_SIZE),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        return instances, self._global_from_pool5(self.full_features(small))

    @torch.inference_mode()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """images: (B, 3, H, W) ImageNet-normalised float -> (instances, global) in float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        device = next(self.parameters()).device
        if device.type == "cuda":
            if not self._channels_last:
                self.to(memory_format=torch.channels_last)
                self._channels_last = True
            images = images.to(device, non_blocking=True).contiguous(
                memory_format=torch.channels_last
            )
            with torch.autocast("cuda", dtype=torch.bfloat16):
                instances, global_ = self._run(images)
        else:
            instances, global_ = self._run(images.to(device, dtype=torch.float32))
        instances = instances.float().contiguous()
        return instances, None if global_ is None else global_.float()
