"""Retrieval with a trained checkpoint: a sentence against the split's images, or a new image
against the split's captions.

- A text query is tokenized like the captions of the cache (features.dataset.tokenize), mapped
  through the checkpoint's vocabulary, and scored against every good image of the split.
- An image query goes through stage 1's preprocessing (features.images.load_image) and the
  SAME backbone weights as the cache: `load_vgg19` with the cache's recorded weights (for
  random weights, rebuilt from the recorded seed), refused unless its sha256 equals the one
  the cache recorded. Its features are rounded to float16 like the cache's, then scored
  against the split's captions (the first `captions_per_image` of each image, as evaluation).

Scores are exactly what `score_matrix` gives for the same image / caption: the query is one
more row / column of the gallery's score matrix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from features.backbone import FeatureExtractor, load_vgg19, pick_device
from features.cache import FeatureCache
from features.dataset import tokenize
from features.errors import CacheMismatch, CheckpointError, ConfigError, InputError
from features.images import ImageDecodeError, load_image
from smlstm.checkpoint import load_checkpoint, model_from_checkpoint
from smlstm.evaluate import check_cache_identity
from smlstm.metrics import top_k
from smlstm.model import SMLSTM
from smlstm.scoring import (
    DEFAULT_BLOCK_BUDGET_MB,
    EvalGallery,
    autocast_for,
    encode_captions,
    encode_image_rows,
    score_codes,
)

__all__ = ["SearchHit", "SearchResult", "format_results", "query_image_features",
           "resolve_checkpoint", "search"]


@dataclass(frozen=True)
class SearchHit:
    """One retrieved item: an image (text query) or a caption (image query)."""

    rank: int
    score: float
    image_id: int
    row: int
    relpath: str
    caption_id: int | None = None
    caption: str | None = None


@dataclass
class SearchResult:
    query: str
    kind: str  # "text" (-> images) or "image" (-> captions)
    hits: list[SearchHit]
    scores: np.ndarray  # the query's scores against the whole gallery, gallery order
    gallery: EvalGallery


def resolve_checkpoint(run_or_checkpoint: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory -> its checkpoints/best.pt (else latest.pt)."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        for name in ("best.pt", "latest.pt"):
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: no checkpoints/best.pt or checkpoints/latest.pt here")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    return path


def query_image_features(
    cache: FeatureCache, image_path: str | os.PathLike, weights_file: str | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stage 1 on one new image with the cache's own backbone: (instances (I, C), global (G,))
    as float16 on the CPU, like the cache rows. CacheMismatch when the weights found are not
    the cache's."""
    config, recorded = cache.config, cache.weights
    if recorded.get("name") == "random":
        vgg, identity = load_vgg19("random", seed=recorded.get("seed"))
    else:
        vgg, identity = load_vgg19("imagenet", weights_file or config.get("weights_file"))
    cache.check_weights(expected_sha256=identity["sha256"])  # the weights must be the cache's
    extractor = FeatureExtractor(vgg, layer=config.get("layer", "pool5"),
                                 global_mode=config.get("global_mode", "same_pass")).to(device)
    try:
        pixels, _ = load_image(image_path, int(config["image_size"]),
                               int(config.get("max_pixels", 50_000_000)))
    except ImageDecodeError as err:
        raise InputError(f"--image: {err.kind}: {err.message}") from None
    instances, global_ = extractor(pixels[None])
    if tuple(instances.shape[1:]) != (cache.num_instances, cache.instance_dim):
        raise CacheMismatch(f"{image_path}: features of shape {tuple(instances.shape[1:])} do not "
                            f"match the cache's ({cache.num_instances}, {cache.instance_dim})")
    glob = None if global_ is None else global_[0].half().cpu()
    return instances[0].half().cpu(), glob


def _image_hits(cache: FeatureCache, gallery: EvalGallery, order: np.ndarray,
                scores: np.ndarray) -> list[SearchHit]:
    relpaths = cache.manifest.set_index("row")["relpath"]
    return [SearchHit(rank=r + 1, score=float(scores[i]), image_id=int(gallery.image_ids[i]),
                      row=int(gallery.rows[i]), relpath=str(relpaths.loc[int(gallery.rows[i])]))
            for r, i in enumerate(order)]


def _caption_hits(cache: FeatureCache, gallery: EvalGallery, order: np.ndarray,
                  scores: np.ndarray) -> list[SearchHit]:
    relpaths = cache.manifest.set_index("row")["relpath"]
    hits = []
    for r, k in enumerate(order):
        i = int(gallery.owner[k])
        hits.append(SearchHit(rank=r + 1, score=float(scores[k]), image_id=int(gallery.image_ids[i]),
                              row=int(gallery.rows[i]),
                              relpath=str(relpaths.loc[int(gallery.rows[i])]),
                              caption_id=int(gallery.caption_ids[k]), caption=gallery.raw[k]))
    return hits


def search(
    run_or_checkpoint: str | os.PathLike,
    cache: str | os.PathLike | FeatureCache,
    split: str = "test",
    text: str | None = None,
    image: str | os.PathLike | None = None,
    k: int = 10,
    captions_per_image: int | None = 5,
    device: str = "auto",
    block_budget_mb: float = DEFAULT_BLOCK_BUDGET_MB,
    weights_file: str | None = None,
    model: tuple[SMLSTM, Any] | None = None,
) -> SearchResult:
    """Top-k images for `text`, or top-k captions for `image`, from the split's gallery.

    Exactly one of text / image. InputError (one line) on any bad input, checked before the
    gallery is scored. `model` = (SMLSTM, Vocabulary) skips loading the checkpoint again.
    """
    if (text is None) == (image is None):
        raise ConfigError("search: give exactly one of --text or --image")
    if k < 1:
        raise ConfigError(f"k: expected a positive number, got {k}")
    checkpoint_path = resolve_checkpoint(run_or_checkpoint)
    ckpt = load_checkpoint(checkpoint_path)
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache.open(cache)
    check_cache_identity(ckpt, cache, str(checkpoint_path))
    torch_device = pick_device(device)
    net, vocab = model or model_from_checkpoint(ckpt, torch_device, source=str(checkpoint_path))
    gallery = EvalGallery.from_cache(cache, split, captions_per_image)

    if text is not None:
        tokens = tokenize(text)
        if not tokens:
            raise ConfigError(f"--text: {text!r} has no words (letters or digits)")
        images = encode_image_rows(net, cache, gallery.rows, torch_device)
        query = encode_captions(net, [tokens], vocab, torch_device)
        scores = score_codes(net, images, query, block_budget_mb)[:, 0]
        order, _ = top_k(scores, k)
        return SearchResult(text, "text", _image_hits(cache, gallery, order, scores), scores,
                            gallery)

    instances, global_ = query_image_features(cache, image, weights_file, torch_device)
    with torch.inference_mode(), autocast_for(torch_device):
        query = net.encode_images(instances[None].to(torch_device),
                                  None if global_ is None else global_[None].to(torch_device))
    captions = encode_captions(net, gallery.tokens, vocab, torch_device)
    scores = score_codes(net, query, captions, block_budget_mb)[0]
    order, _ = top_k(scores, k)
    return SearchResult(str(image), "image", _caption_hits(cache, gallery, order, scores), scores,
                        gallery)


def format_results(result: SearchResult) -> str:
    """The hits as a fixed-width table, best first."""
    if result.kind == "text":
        lines = [f"top {len(result.hits)} images for {result.query!r} "
                 f"({result.gallery.num_images} {result.gallery.split} images)",
                 f"{'rank':>4}  {'score':>9}  {'image_id':>8}  path"]
        lines += [f"{h.rank:>4}  {h.score:>9.4f}  {h.image_id:>8}  {h.relpath}" for h in result.hits]
    else:
        lines = [f"top {len(result.hits)} captions for {result.query} "
                 f"({result.gallery.num_captions} {result.gallery.split} captions)",
                 f"{'rank':>4}  {'score':>9}  {'image_id':>8}  caption"]
        lines += [f"{h.rank:>4}  {h.score:>9.4f}  {h.image_id:>8}  {h.caption}"
                  for h in result.hits]
    return "\n".join(lines)
