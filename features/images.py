"""Image decoding for stage 1: one file -> a normalised (3, S, S) tensor, or a named failure.

Real image folders hold surprises: missing files, directories named .jpg, HTML error pages
saved as .jpg, files cut short by a failed download, decompression bombs, 16-bit greyscale,
CMYK, palette images with transparency, phone photos whose pixels are stored sideways with an
EXIF orientation tag. `load_image` turns each into either a tensor or an `ImageDecodeError`
whose `kind` is one of FAILURE_KINDS, so the extractor can record it and keep the row.

Choices (documented because they change pixels):
- EXIF orientation is applied first; the reported (width, height) is the upright size.
- Transparency (RGBA, LA, PA, P or L with a transparent colour) is composited onto white:
  the colour stored under fully transparent pixels is arbitrary, often black, and a viewer
  shows such images on a light page.
- 16-bit (I;16*, I) greyscale is scaled from 0..65535 to 0..255 (65535 -> white), not clipped
  as PIL's own convert would; float (F) images are read as 0..1 when their max is <= 1, else
  as 16-bit. Everything else (L, 1, P, CMYK, YCbCr, LAB, HSV) goes through PIL's convert.
- Resize to S x S with PIL's bilinear filter, which is antialiased on downscaling (the same as
  torchvision's Resize); aspect ratio is not kept (the spec resizes to 448 x 448).
- Tiny images (even 1 x 1) are accepted: resizing works and there is no reason to drop them.
  There is therefore no "too_small" kind.
- Pixel limit: `max_pixels` (default 50M) is checked on the header, before decoding. PIL's own
  bomb check also runs: its warning (at ~89M pixels) is silenced because our limit is the
  policy, its error (at ~179M pixels) is reported as "too_large" too.
- Truncated files fail (ImageFile.LOAD_TRUNCATED_IMAGES is never set).
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Same values as features.backbone.IMAGENET_MEAN/STD; repeated here so decoding does not
# import torchvision (DataLoader workers start faster).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_MAX_PIXELS = 50_000_000

FAILURE_KINDS = (
    "missing",  # no such path (or a dangling symlink)
    "not_a_file",  # a directory, FIFO, device... named like an image
    "unreadable",  # cannot be stat'ed or opened (permissions, symlink loop, I/O error)
    "empty",  # zero bytes
    "not_an_image",  # PIL recognises no image format (text, HTML, ...)
    "truncated",  # a valid header, then the data stops
    "too_large",  # more pixels than max_pixels (or PIL's decompression-bomb error)
    "decode_error",  # anything else that fails while decoding or converting
)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(Exception):
    """An image that cannot be used; `kind` is one of FAILURE_KINDS, `message` is one line."""

    def __init__(self, kind: str, message: str):
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown image failure kind {kind!r}")
        self.kind = kind
        self.message = " ".join(str(message).split())
        super().__init__(self.message)

    def __reduce__(self):  # keep (kind, message) when crossing a process boundary
        return (type(self), (self.kind, self.message))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, following the choices in the module docstring."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        values = np.asarray(img).astype(np.float64)
        if img.mode == "F" and values.size and np.nanmax(values) <= 1.0:
            scaled = values * 255.0
        else:
            scaled = values / 257.0  # 65535 / 257 = 255 exactly
        grey = np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # uint8 2-D -> mode L
    has_alpha = "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _decode(path: Path, max_pixels: int) -> Image.Image:
    """Open, size-check, fully decode and orient one file; raise ImageDecodeError on failure."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError) as err:  # also "a_file.txt/x.jpg"
        raise ImageDecodeError("missing", f"{path}: no such file") from err
    except OSError as err:
        raise ImageDecodeError("unreadable", f"{path}: cannot stat: {err.strerror or err}") from err
    if not stat.S_ISREG(info.st_mode):
        what = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise ImageDecodeError("not_a_file", f"{path}: is {what}")
    if info.st_size == 0:
        raise ImageDecodeError("empty", f"{path}: file is empty (0 bytes)")
    try:
        handle = open(path, "rb")  # closed by the `with` below; PIL reads lazily
    except OSError as err:
        raise ImageDecodeError("unreadable", f"{path}: cannot open: {err.strerror or err}") from err

    with handle, warnings.catch_warnings():
        # Our max_pixels check below is the policy; PIL's warning would only repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(handle)
        except Image.DecompressionBombError as err:
            raise ImageDecodeError("too_large", f"{path}: {err}") from err
        except UnidentifiedImageError as err:
            raise ImageDecodeError(
                "not_an_image", f"{path}: not a recognised image format"
            ) from err
        except Exception as err:  # a header PIL recognised but cannot parse
            raise _classify(path, err) from err

        width, height = img.size
        if width * height > max_pixels:
            raise ImageDecodeError(
                "too_large",
                f"{path}: {width}x{height} = {width * height} pixels exceeds max_pixels "
                f"{max_pixels}",
            )
        try:
            img.load()  # decode everything now, so a truncated file fails here
            return ImageOps.exif_transpose(img)
        except Exception as err:
            raise _classify(path, err) from err


def _classify(path: Path, err: Exception) -> ImageDecodeError:
    """Map an exception PIL raised while parsing/decoding to a failure kind."""
    text = str(err) or type(err).__name__
    lowered = text.lower()
    if isinstance(err, Image.DecompressionBombError):
        return ImageDecodeError("too_large", f"{path}: {text}")
    # PIL reports cut-short data as OSError "image file is truncated", "Truncated File Read"
    # or "broken data stream"; EOFError / struct errors from early cuts read the same way.
    if isinstance(err, EOFError) or "truncated" in lowered or "broken data stream" in lowered:
        return ImageDecodeError("truncated", f"{path}: truncated image data: {text}")
    return ImageDecodeError("decode_error", f"{path}: {type(err).__name__}: {text}")


def load_image(
    path: str | Path, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode one image into a (3, S, S) float32 tensor, ImageNet-normalised.

    Returns (tensor, (width, height)) where the size is the original one after EXIF
    orientation. Raises ImageDecodeError (kind in FAILURE_KINDS) for any unusable file.
    """
    path = Path(path)
    img = _decode(path, max_pixels)
    width, height = img.size
    try:
        rgb = _to_rgb(img)
        if rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
        pixels = np.asarray(rgb, dtype=np.uint8)
    except Exception as err:
        raise ImageDecodeError("decode_error", f"{path}: {type(err).__name__}: {err}") from err
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean).div_(std), (width, height)


class ImageFolderDataset(torch.utils.data.Dataset):
    """(row, path) items -> decoded images; a bad image gives ok=False, never an exception.

    Each item is a dict: row, image ((3, S, S) tensor; zeros when not ok), ok, width, height
    (0 when not ok), kind and message ("" when ok). Plain attributes only, so it pickles into
    DataLoader workers under fork or spawn.
    """

    def __init__(
        self,
        items: Sequence[tuple[int, str]],
        image_size: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.items = [(int(row), str(path)) for row, path in items]
        self.image_size = int(image_size)
        self.max_pixels = int(max_pixels)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        row, path = self.items[index]
        try:
            image, (width, height) = load_image(path, self.image_size, self.max_pixels)
        except ImageDecodeError as err:
            empty = torch.zeros(3, self.image_size, self.image_size, dtype=torch.float32)
            return dict(
                row=row,
                image=empty,
                ok=False,
                width=0,
                height=0,
                kind=err.kind,
                message=err.message,
            )
        return dict(row=row, image=image, ok=True, width=width, height=height, kind="", message="")


def collate_images(batch: Sequence[dict]) -> dict:
    """Stack ImageFolderDataset items: tensors for row/image/ok/width/height, lists for text."""
    return {
        "row": torch.tensor([item["row"] for item in batch], dtype=torch.int64),
        "image": torch.stack([item["image"] for item in batch]),
        "ok": torch.tensor([item["ok"] for item in batch], dtype=torch.bool),
        "width": torch.tensor([item["width"] for item in batch], dtype=torch.int64),
        "height": torch.tensor([item["height"] for item in batch], dtype=torch.int64),
        "kind": [item["kind"] for item in batch],
        "message": [item["message"] for item in batch],
    }
