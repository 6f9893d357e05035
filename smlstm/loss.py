"""Bidirectional hinge ranking loss over in-batch negatives (VSE++ conventions, model-spec 6).

A training batch is built from captions: caption k brings its image as row k, so the score
matrix is square and the positives are its diagonal. Several rows may show the same image
(two of its captions were drawn), so negatives are chosen by image id, never by position:
neither another caption of the same image nor another row of the same image is a negative.

For the positive (row k, caption k), with margin m:
    caption direction: [m - s(k, k) + s(k, c')]+  for captions c' of another image
    image direction:   [m - s(k, k) + s(i', k)]+  for rows i' showing another image
`sum` adds every term, `max_violation` keeps the hardest (highest-scoring) valid negative per
positive and direction, and `negatives=K` first draws K valid negatives per positive and
direction uniformly at random (then sums or takes their hardest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class LossConfig(BaseModel):
    """The ranking loss options, all [C] conventions of the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    margin: float = Field(0.2, ge=0.0)
    mode: Literal["sum", "max_violation"] = "sum"
    warmup_epochs: int = Field(0, ge=0)  # epochs of "sum" before `mode` takes over
    negatives: int | None = Field(None, ge=1)  # None: all in-batch; K: K sampled per positive
    reduction: Literal["sum", "mean"] = "sum"  # over the positives; "sum" is VSE++'s

    def mode_at(self, epoch: int) -> str:
        """The mode in force at a 0-based epoch (warm-up epochs use "sum")."""
        return "sum" if epoch < self.warmup_epochs else self.mode


@dataclass
class LossTerms:
    """A loss value and the negatives it used, for tests and diagnostics.

    loss: scalar. candidates_caption / candidates_image: (B, B) bool, the negatives that
    entered the loss ([row k, caption c'] and [row i', caption k]). hardest_caption[k]:
    the highest-scoring candidate caption for positive k; hardest_image[k]: the highest-
    scoring candidate row; -1 where a positive has no valid negative.
    """

    loss: torch.Tensor
    candidates_caption: torch.Tensor
    candidates_image: torch.Tensor
    hardest_caption: torch.Tensor
    hardest_image: torch.Tensor


def negative_mask(image_ids_of_images: torch.Tensor,
                  image_ids_of_captions: torch.Tensor) -> torch.Tensor:
    """(B_img, B_cap) bool: True where row and caption show different images."""
    return image_ids_of_images[:, None] != image_ids_of_captions[None, :]


def sample_negatives(valid: torch.Tensor, k: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep at most k True entries per row of `valid`, chosen uniformly without replacement.

    Random keys are drawn on the generator's device (the CPU without one, so a seeded CPU
    generator gives the same draw whatever device the scores live on); invalid entries get
    key -1 and can never be picked over a valid one.
    """
    key_device = generator.device if generator is not None else torch.device("cpu")
    keys = torch.rand(valid.shape, generator=generator, device=key_device).to(valid.device)
    keys = keys.masked_fill(~valid, -1.0)
    k = min(k, valid.shape[1])
    picked = keys.topk(k, dim=1).indices
    chosen = torch.zeros_like(valid).scatter_(1, picked, True)
    return chosen & valid  # rows with fewer than k valid negatives keep just those


def ranking_loss_terms(
    scores: torch.Tensor,
    image_ids_of_images: torch.Tensor,
    image_ids_of_captions: torch.Tensor,
    config: LossConfig,
    epoch: int = 0,
    generator: torch.Generator | None = None,
) -> LossTerms:
    """The loss of a (B, B) score matrix whose diagonal holds the positives, with details."""
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores: expected a square (B, B) matrix, got {tuple(scores.shape)}")
    B = scores.shape[0]
    if image_ids_of_images.shape != (B,) or image_ids_of_captions.shape != (B,):
        raise ValueError(f"image ids: expected ({B},) each, got "
                         f"{tuple(image_ids_of_images.shape)}, {tuple(image_ids_of_captions.shape)}")
    ids_img = image_ids_of_images.to(scores.device)
    ids_cap = image_ids_of_captions.to(scores.device)
    scores = scores.float()

    valid = negative_mask(ids_img, ids_cap)  # [row, caption]
    cand_caption, cand_image = valid, valid  # caption direction reads rows, image reads columns
    if config.negatives is not None:
        cand_caption = sample_negatives(valid, config.negatives, generator)
        cand_image = sample_negatives(valid.T, config.negatives, generator).T

    positive = scores.diagonal()
    cost_caption = (config.margin - positive[:, None] + scores).clamp(min=0)  # [k, c']
    cost_image = (config.margin - positive[None, :] + scores).clamp(min=0)  # [i', k]
    cost_caption = cost_caption.masked_fill(~cand_caption, 0.0)
    cost_image = cost_image.masked_fill(~cand_image, 0.0)

    if config.mode_at(epoch) == "sum":
        per_positive = cost_caption.sum(1) + cost_image.sum(0)
    else:  # the hinge is monotone in the negative's score: hardest negative = largest cost
        per_positive = cost_caption.amax(1) + cost_image.amax(0)
    loss = per_positive.sum() if config.reduction == "sum" else per_positive.mean()

    with torch.no_grad():
        hardest_caption = _argmax_or_minus_one(scores.masked_fill(~cand_caption, -torch.inf), 1)
        hardest_image = _argmax_or_minus_one(scores.masked_fill(~cand_image, -torch.inf), 0)
    return LossTerms(loss=loss, candidates_caption=cand_caption, candidates_image=cand_image,
                     hardest_caption=hardest_caption, hardest_image=hardest_image)


def ranking_loss(
    scores: torch.Tensor,
    image_ids_of_images: torch.Tensor,
    image_ids_of_captions: torch.Tensor,
    config: LossConfig,
    epoch: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bidirectional hinge ranking loss (scalar) of a (B, B) score matrix.

    scores[i, c] = s(row i, caption c); the diagonal holds the positives; negatives are
    masked by image id. `epoch` (0-based) selects "sum" during warm-up; `generator` seeds
    the sampled negatives (config.negatives) and is unused otherwise.
    """
    return ranking_loss_terms(scores, image_ids_of_images, image_ids_of_captions, config,
                              epoch, generator).loss


def _argmax_or_minus_one(masked_scores: torch.Tensor, dim: int) -> torch.Tensor:
    best = masked_scores.argmax(dim)
    has_any = torch.isfinite(masked_scores).any(dim)
    return torch.where(has_any, best, torch.full_like(best, -1))
