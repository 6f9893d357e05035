"""The blocked all-pairs scorer: every image of a gallery against every caption, memory-bounded.

sm-LSTM has no embedding space: a pair's score needs its own T-step attention + LSTM pass, so
a Flickr30K test gallery is 1000 x 5000 = 5M passes and COCO 5K is 125M. Two things make it
tractable:

1. Everything that does not depend on the pair is computed ONCE per image / caption
   (`encode_gallery` -> `SMLSTM.encode_images` / `encode_texts`), not once per pair.
2. Pairs are scored a whole (image block x caption block) at a time with one
   `SMLSTM.score_pairs` call, i.e. one batched kernel sequence per block. The block shape is
   chosen from a memory budget (`plan_blocks`): the largest intermediate is the
   (Bi, Bt, I, K) attention energy, so the full N_images x N_captions x I tensor never exists.

`score_matrix` returns float32 scores (N_images, N_captions); caption k belongs to image
`gallery.owner[k]`, which is what `smlstm.metrics` takes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from features.cache import FeatureCache
from features.errors import CacheError, ConfigError
from smlstm.metrics import select_captions
from smlstm.model import SMLSTM, ImageCodes, ModelConfig, TextCodes
from smlstm.text import Vocabulary

__all__ = [
    "DEFAULT_BLOCK_BUDGET_MB",
    "BlockPlan",
    "EvalGallery",
    "ScoreProgress",
    "autocast_for",
    "encode_captions",
    "encode_gallery",
    "encode_image_rows",
    "plan_blocks",
    "score_codes",
    "score_matrix",
]

DEFAULT_BLOCK_BUDGET_MB = 256.0
DEFAULT_ENCODE_BATCH = 128
_MB = 2**20


# ---------------------------------------------------------------------------------------------
# the gallery: which images and captions, in which order


@dataclass(frozen=True)
class EvalGallery:
    """The images and captions of one split, in score-matrix order.

    rows:        (N_images,)   cache rows of the split's good images, ascending (score rows)
    image_ids:   (N_images,)   the dataset's image ids of those rows
    caption_ids: (N_captions,) the cache's caption ids (score columns), by (image, caption_index)
    owner:       (N_captions,) index into `rows` of each caption's image
    tokens:      the tokens of each caption; raw: its original text
    """

    split: str
    rows: np.ndarray
    image_ids: np.ndarray
    caption_ids: np.ndarray
    owner: np.ndarray
    tokens: tuple[tuple[str, ...], ...]
    raw: tuple[str, ...]
    captions_per_image: int | None = 5

    @property
    def num_images(self) -> int:
        return len(self.rows)

    @property
    def num_captions(self) -> int:
        return len(self.caption_ids)

    @classmethod
    def from_cache(
        cls, cache: FeatureCache, split: str, captions_per_image: int | None = 5
    ) -> EvalGallery:
        """The split's good images (row order) with the first `captions_per_image` captions of
        each by caption_index (None keeps all). CacheError (one line) when the split is empty
        or one of its images has no caption in the cache."""
        if captions_per_image is not None and captions_per_image < 1:
            raise ConfigError(
                f"captions_per_image: expected a positive number, got {captions_per_image}"
            )
        rows = cache.rows(split)
        if len(rows) == 0:
            raise CacheError(f"{cache.path}: split {split!r} has no good images in the cache")
        captions = cache.captions[cache.captions["row"].isin(rows)]
        try:
            selection = select_captions(captions, captions_per_image, "row", image_keys=rows)
        except ValueError as err:
            raise CacheError(f"{cache.path}: captions.parquet: split {split!r}: {err}") from None
        chosen = captions.iloc[selection.positions]
        manifest = cache.manifest.set_index("row")
        return cls(
            split=split,
            rows=rows,
            image_ids=manifest.loc[rows, "image_id"].to_numpy(dtype=np.int64),
            caption_ids=chosen["caption_id"].to_numpy(dtype=np.int64),
            owner=selection.owner,
            tokens=tuple(tuple(tokens) for tokens in chosen["tokens"]),
            raw=tuple(str(text) for text in chosen["raw"]),
            captions_per_image=captions_per_image,
        )


# ---------------------------------------------------------------------------------------------
# encoding: once per image, once per caption


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the model keeps softmax, LSTM state and scores in float32);
    nothing on the CPU, where bf16 matmuls are slower than fp32."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _eval_mode(model: SMLSTM) -> Iterator[None]:
    """Eval mode (no dropout) for scoring, restoring the caller's mode afterwards (training
    scores its val split mid-run)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _row_spans(rows: np.ndarray, max_rows: int, max_gap: int = 8) -> Iterator[tuple[int, int]]:
    """Cover sorted `rows` with contiguous [start, stop) spans of at most `max_rows` rows.

    Contiguous reads are what the sharded cache serves fastest; a small gap of rows we do not
    need is cheaper to read and drop than to split the read.
    """
    start = prev = int(rows[0])
    for row in map(int, rows[1:]):
        if row - prev > max_gap or row + 1 - start > max_rows:
            yield start, prev + 1
            start = row
        prev = row
    yield start, prev + 1


def _cat_images(parts: Sequence[ImageCodes]) -> ImageCodes:
    return ImageCodes(*(torch.cat(ts) for ts in zip(
        *((p.inst, p.inst_attn, p.glob_ctx) for p in parts), strict=True)))


def encode_image_rows(
    model: SMLSTM,
    cache: FeatureCache,
    rows: np.ndarray,
    device: torch.device,
    batch: int = DEFAULT_ENCODE_BATCH,
) -> ImageCodes:
    """ImageCodes of the given sorted cache rows, in that order, on `device` (eval mode).

    Reads contiguous spans (see `_row_spans`) and encodes each once.
    """
    rows = np.asarray(rows, dtype=np.int64)
    parts = []
    with torch.inference_mode(), autocast_for(device), _eval_mode(model):
        for start, stop in _row_spans(rows, max(1, batch)):
            instances, global_ = cache.read_rows(start, stop)
            keep = rows[(rows >= start) & (rows < stop)] - start
            inst = torch.from_numpy(instances[keep]).to(device)
            glob = torch.from_numpy(global_[keep]).to(device) if global_.shape[1] else None
            parts.append(model.encode_images(inst, glob))
    return _cat_images(parts)


def encode_captions(
    model: SMLSTM,
    token_lists: Sequence[Sequence[str]],
    vocab: Vocabulary,
    device: torch.device,
    batch: int = DEFAULT_ENCODE_BATCH,
) -> TextCodes:
    """TextCodes of tokenized captions, padded to the longest one, on `device` (eval mode).

    Every caption is encoded with the full padded width; the BiLSTM runs packed, so padding
    never changes a real word's state (each batch's result equals encoding captions alone).
    """
    ids, lengths = vocab.encode_batch(token_lists)
    parts = []
    with torch.inference_mode(), autocast_for(device), _eval_mode(model):
        for start in range(0, len(ids), max(1, batch)):
            parts.append(model.encode_texts(ids[start:start + batch].to(device),
                                            lengths[start:start + batch].to(device)))
    return TextCodes(*(torch.cat(ts) for ts in zip(
        *((p.words, p.words_attn, p.mask, p.sent_ctx, p.lengths) for p in parts), strict=True)))


def encode_gallery(
    model: SMLSTM,
    cache: FeatureCache,
    gallery: EvalGallery,
    vocab: Vocabulary,
    device: torch.device | str,
    batch: int = DEFAULT_ENCODE_BATCH,
) -> tuple[ImageCodes, TextCodes]:
    """Encode every gallery image and caption once, in gallery order, in `batch`-sized chunks."""
    device = torch.device(device)
    images = encode_image_rows(model, cache, gallery.rows, device, batch)
    texts = encode_captions(model, gallery.tokens, vocab, device, batch)
    return images, texts


# ---------------------------------------------------------------------------------------------
# block planning


@dataclass(frozen=True)
class BlockPlan:
    """Block shape for scoring: `images` x `captions` pairs per `score_pairs` call."""

    images: int
    captions: int
    block_bytes: int  # estimated peak activation bytes of one full block
    budget_bytes: int

    @property
    def pairs(self) -> int:
        return self.images * self.captions


def _block_bytes(cfg: ModelConfig, bi: int, bt: int, num_instances: int, num_words: int,
                 element_size: int) -> int:
    """Peak bytes of one block: score_pairs' intermediates (the (Bi, Bt, I, K) energy, the
    (Bi, Bt, L, K) word energy, LSTM gates and states) plus the copied caption-code slice."""
    pairs = cfg.score_block_bytes(bi, bt, num_instances, num_words, element_size)
    text_slice = bt * num_words * (cfg.joint_dim + cfg.attn_dim) * element_size
    return pairs + text_slice


def _even(total: int, size: int) -> int:
    """The smallest block size with the same number of blocks as `size`: balances the last one."""
    return math.ceil(total / math.ceil(total / size))


def plan_blocks(
    config: ModelConfig,
    num_images: int,
    num_captions: int,
    num_instances: int,
    num_words: int,
    block_budget_mb: float = DEFAULT_BLOCK_BUDGET_MB,
    element_size: int = 4,
) -> BlockPlan:
    """The largest (Bi, Bt) whose block fits `block_budget_mb`, shaped like the gallery.

    Bt / Bi follows N_captions / N_images (5 captions per image -> blocks 5x wider than tall),
    so blocks tile the matrix evenly; then both sizes are shrunk to the smallest value that
    needs the same number of blocks, so the last blocks are not slivers.
    ConfigError when the budget cannot hold even a single pair.
    """
    budget = int(block_budget_mb * _MB)
    one = _block_bytes(config, 1, 1, num_instances, num_words, element_size)
    if budget < one:
        raise ConfigError(
            f"block_budget_mb: {block_budget_mb} MB cannot hold one pair "
            f"({one / _MB:.3f} MB at I={num_instances}, L={num_words})"
        )
    max_pairs = budget // one  # bytes are linear in the pair count; per-pair is the worst case
    aspect = num_captions / max(num_images, 1)
    bt = max(1, min(num_captions, int(math.sqrt(max_pairs * aspect))))
    bi = max(1, min(num_images, max_pairs // bt))
    bt = max(1, min(num_captions, max_pairs // bi))  # give back what clipping Bi left unused
    bi, bt = _even(num_images, bi), _even(num_captions, bt)
    block = _block_bytes(config, bi, bt, num_instances, num_words, element_size)
    assert block <= budget, (bi, bt, block, budget)  # _even only ever shrinks
    return BlockPlan(images=bi, captions=bt, block_bytes=block, budget_bytes=budget)


# ---------------------------------------------------------------------------------------------
# scoring


@dataclass(frozen=True)
class ScoreProgress:
    """Handed to the `progress` callback after every block."""

    pairs_done: int
    pairs_total: int
    seconds: float
    block: tuple[int, int, int, int]  # image start, image stop, caption start, caption stop
    plan: BlockPlan

    @property
    def pairs_per_s(self) -> float:
        return self.pairs_done / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        pct = 100.0 * self.pairs_done / max(self.pairs_total, 1)
        left = (self.pairs_total - self.pairs_done) / self.pairs_per_s if self.pairs_done else 0.0
        return (f"scored {self.pairs_done:,}/{self.pairs_total:,} pairs ({pct:.0f}%), "
                f"{self.pairs_per_s:,.0f} pairs/s, {left:.0f}s left")


def score_codes(
    model: SMLSTM,
    images: ImageCodes,
    texts: TextCodes,
    block_budget_mb: float = DEFAULT_BLOCK_BUDGET_MB,
    progress: Callable[[ScoreProgress], None] | None = None,
) -> np.ndarray:
    """Scores of every encoded image against every encoded caption: float32 (Ni, Nt).

    Loops over (image block x caption block) with one `score_pairs` call each; blocks come from
    `plan_blocks`, sized with the caption codes' padded width (the worst case of any block).
    """
    device = images.inst.device
    num_images, num_instances = images.inst.shape[:2]
    num_captions, num_words = texts.words.shape[:2]
    # the codes' dtype is the dtype of the big intermediates (bf16 when encoded under autocast)
    element_size = images.inst.element_size()
    plan = plan_blocks(model.config, num_images, num_captions, num_instances, num_words,
                       block_budget_mb, element_size)
    scores = np.empty((num_images, num_captions), dtype=np.float32)
    done, started = 0, time.perf_counter()
    with torch.inference_mode(), autocast_for(device), _eval_mode(model):
        for t0 in range(0, num_captions, plan.captions):
            t1 = min(t0 + plan.captions, num_captions)
            text_block = texts.index(slice(t0, t1))  # trims padding this block does not use
            for i0 in range(0, num_images, plan.images):
                i1 = min(i0 + plan.images, num_images)
                block = model.score_pairs(images.index(slice(i0, i1)), text_block)
                scores[i0:i1, t0:t1] = block.float().cpu().numpy()
                done += (i1 - i0) * (t1 - t0)
                if progress is not None:
                    progress(ScoreProgress(done, num_images * num_captions,
                                           time.perf_counter() - started, (i0, i1, t0, t1), plan))
    return scores


def score_matrix(
    model: SMLSTM,
    images: ImageCodes | FeatureCache,
    texts: TextCodes | EvalGallery,
    vocab: Vocabulary | None = None,
    device: torch.device | str | None = None,
    block_budget_mb: float = DEFAULT_BLOCK_BUDGET_MB,
    progress: Callable[[ScoreProgress], None] | None = None,
    encode_batch: int = DEFAULT_ENCODE_BATCH,
) -> np.ndarray:
    """All-pairs scores, float32 (N_images, N_captions). Two ways to call it:

    - `score_matrix(model, image_codes, text_codes, block_budget_mb=..., progress=...)` on codes
      from `encode_gallery` (evaluation, which keeps the codes for figures and search);
    - `score_matrix(model, cache, gallery, vocab, device, block_budget_mb)` encodes the gallery
      first (training's val rsum: one call).
    """
    if isinstance(images, FeatureCache):
        if not isinstance(texts, EvalGallery) or vocab is None:
            raise TypeError("score_matrix(model, cache, gallery, vocab, device, ...): "
                            "a cache needs an EvalGallery and a Vocabulary")
        device = torch.device(device if device is not None else "cpu")
        images, texts = encode_gallery(model, images, texts, vocab, device, encode_batch)
    if not isinstance(images, ImageCodes) or not isinstance(texts, TextCodes):
        raise TypeError("score_matrix: expected (ImageCodes, TextCodes) or (FeatureCache, "
                        f"EvalGallery), got ({type(images).__name__}, {type(texts).__name__})")
    return score_codes(model, images, texts, block_budget_mb, progress)
