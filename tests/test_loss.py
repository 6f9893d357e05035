"""Ranking loss: negatives by image id, hardest negatives, sampled negatives, warm-up."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from smlstm.loss import LossConfig, ranking_loss, ranking_loss_terms, sample_negatives


def naive_loss(scores, ids_img, ids_cap, margin, hardest=False):
    """The definition, one positive and one negative at a time."""
    B = scores.shape[0]
    total = 0.0
    for k in range(B):
        pos = float(scores[k, k])
        caption_costs = [max(0.0, margin - pos + float(scores[k, c]))
                         for c in range(B) if ids_cap[c] != ids_img[k]]
        image_costs = [max(0.0, margin - pos + float(scores[i, k]))
                       for i in range(B) if ids_img[i] != ids_cap[k]]
        if hardest:
            total += max(caption_costs, default=0.0) + max(image_costs, default=0.0)
        else:
            total += sum(caption_costs) + sum(image_costs)
    return total


def batch_with_repeated_images(seed=0):
    """6 captions; rows 0, 1 and 4 show image 7, rows 2 and 5 image 3, row 3 image 9."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([7, 7, 3, 9, 7, 3])
    scores = torch.randn(6, 6, generator=g) * 0.3
    return scores, ids


@pytest.mark.parametrize("mode", ["sum", "max_violation"])
def test_loss_matches_the_definition(mode):
    scores, ids = batch_with_repeated_images()
    config = LossConfig(mode=mode)
    got = ranking_loss(scores, ids, ids, config)
    expected = naive_loss(scores, ids.tolist(), ids.tolist(), 0.2, hardest=mode != "sum")
    assert expected > 0
    assert abs(float(got) - expected) < 1e-5
    mean = ranking_loss(scores, ids, ids, config.model_copy(update={"reduction": "mean"}))
    assert abs(float(mean) - expected / 6) < 1e-6


def test_max_violation_skips_captions_of_the_same_image():
    ids = torch.tensor([0, 0, 1, 2])  # rows/captions 0 and 1 show the same image
    scores = torch.full((4, 4), 0.0)
    scores.fill_diagonal_(1.0)
    scores[0, 1] = 5.0  # the same image's other caption: highest, yet not a negative
    scores[0, 3] = 0.9  # the hardest real negative of positive 0 (caption direction)
    scores[0, 2] = 0.5
    scores[1, 0] = 4.0  # same image again, image direction of positive 0
    scores[2, 0] = 0.95  # the hardest real negative image of positive 0
    terms = ranking_loss_terms(scores, ids, ids, LossConfig(mode="max_violation"))
    assert int(terms.hardest_caption[0]) == 3
    assert int(terms.hardest_image[0]) == 2
    # no positive ever takes a caption/row of its own image as its hardest negative
    for k in range(4):
        assert ids[terms.hardest_caption[k]] != ids[k]
        assert ids[terms.hardest_image[k]] != ids[k]
    # positive 0 alone: [0.2 - 1 + 0.9]+ + [0.2 - 1 + 0.95]+
    per_positive_0 = (0.2 - 1.0 + 0.9) + (0.2 - 1.0 + 0.95)
    rest = naive_loss(scores, ids.tolist(), ids.tolist(), 0.2, hardest=True)
    assert abs(float(terms.loss) - rest) < 1e-6 and rest > per_positive_0


def test_positive_without_negatives_gets_minus_one_and_no_loss():
    ids = torch.tensor([4, 4])
    terms = ranking_loss_terms(torch.randn(2, 2), ids, ids, LossConfig(mode="max_violation"))
    assert terms.hardest_caption.tolist() == [-1, -1]
    assert float(terms.loss) == 0.0


def test_warmup_uses_sum_then_switches():
    scores, ids = batch_with_repeated_images(seed=1)
    config = LossConfig(mode="max_violation", warmup_epochs=2)
    plain_sum = ranking_loss(scores, ids, ids, LossConfig())
    hardest = ranking_loss(scores, ids, ids, LossConfig(mode="max_violation"))
    assert not torch.isclose(plain_sum, hardest)
    assert torch.equal(ranking_loss(scores, ids, ids, config, epoch=0), plain_sum)
    assert torch.equal(ranking_loss(scores, ids, ids, config, epoch=1), plain_sum)
    assert torch.equal(ranking_loss(scores, ids, ids, config, epoch=2), hardest)


def test_sampled_negatives_are_valid_and_deterministic():
    g = torch.Generator().manual_seed(0)
    B = 12
    ids = torch.randint(0, 5, (B,), generator=g)  # many repeats: few valid negatives each
    scores = torch.randn(B, B, generator=g)
    valid = ids[:, None] != ids[None, :]
    config = LossConfig(negatives=3)

    def draw(seed):
        return ranking_loss_terms(scores, ids, ids, config,
                                  generator=torch.Generator().manual_seed(seed))

    first, again, other = draw(11), draw(11), draw(12)
    assert torch.equal(first.candidates_caption, again.candidates_caption)
    assert torch.equal(first.candidates_image, again.candidates_image)
    assert torch.equal(first.loss, again.loss)
    assert not torch.equal(first.candidates_caption, other.candidates_caption)
    for terms in (first, other):
        assert not (terms.candidates_caption & ~valid).any()
        assert not (terms.candidates_image & ~valid).any()
        # exactly min(K, number of valid negatives) per positive, in both directions
        assert torch.equal(terms.candidates_caption.sum(1), valid.sum(1).clamp(max=3))
        assert torch.equal(terms.candidates_image.sum(0), valid.sum(0).clamp(max=3))
    # the loss is the definition restricted to the drawn negatives
    expected = 0.0
    for k in range(B):
        pos = float(scores[k, k])
        expected += sum(max(0.0, 0.2 - pos + float(scores[k, c]))
                        for c in range(B) if first.candidates_caption[k, c])
        expected += sum(max(0.0, 0.2 - pos + float(scores[i, k]))
                        for i in range(B) if first.candidates_image[i, k])
    assert abs(float(first.loss) - expected) < 1e-5


def test_sampling_is_uniform_over_valid_negatives():
    valid = torch.tensor([[False, True, True, True, False, True]])
    g = torch.Generator().manual_seed(3)
    counts = sum(sample_negatives(valid, 2, g).long() for _ in range(2000))
    assert counts[0, 0] == 0 and counts[0, 4] == 0
    # each of the 4 valid entries is drawn about half of the time (2 of 4)
    assert ((counts[0, valid[0]] - 1000).abs() < 120).all()


def test_enough_sampled_negatives_equal_the_full_loss():
    scores, ids = batch_with_repeated_images(seed=2)
    full = ranking_loss(scores, ids, ids, LossConfig())
    sampled = ranking_loss(scores, ids, ids, LossConfig(negatives=6),
                           generator=torch.Generator().manual_seed(0))
    assert torch.allclose(full, sampled)


def test_gradient_pushes_positives_up_and_violating_negatives_down():
    scores, ids = batch_with_repeated_images(seed=4)
    scores.requires_grad_(True)
    ranking_loss(scores, ids, ids, LossConfig()).backward()
    assert (scores.grad.diagonal() <= 0).all() and (scores.grad.diagonal() < 0).any()
    same_image = (ids[:, None] == ids[None, :]) & ~torch.eye(6, dtype=torch.bool)
    assert (scores.grad[same_image] == 0).all()  # neither positive nor negative


def test_config_and_shapes_are_checked():
    with pytest.raises(ValidationError):
        LossConfig(negatives=0)
    with pytest.raises(ValidationError):
        LossConfig(mode="hardest")
    with pytest.raises(ValidationError):
        LossConfig(margin=0.2, hard=True)
    with pytest.raises(ValueError, match="square"):
        ranking_loss(torch.zeros(2, 3), torch.arange(2), torch.arange(3), LossConfig())
