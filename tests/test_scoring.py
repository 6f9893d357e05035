"""The blocked all-pairs scorer against the obvious per-pair loop, and its memory plan.

Tiny widths and random features: the maths is the same at any size. The gallery-from-cache
path (EvalGallery, encode_gallery) is exercised end to end in test_evaluate.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.errors import ConfigError
from smlstm.model import SMLSTM, ModelConfig
from smlstm.scoring import (
    _block_bytes,
    _row_spans,
    encode_captions,
    plan_blocks,
    score_codes,
    score_matrix,
)
from smlstm.text import Vocabulary

N_IMAGES, N_CAPTIONS, GRID, MAX_LEN = 6, 11, 4, 9
WORDS = [f"w{i}" for i in range(20)]


def tiny_model(attention: str = "context", seed: int = 0) -> SMLSTM:
    torch.manual_seed(seed)
    config = ModelConfig.small(
        vocab_size=len(WORDS) + 2, instance_dim=16, global_dim=24, embed_dim=12, text_hidden=10,
        joint_dim=16, attn_dim=8, lstm_hidden=20, attention=attention,
    )
    return SMLSTM(config).eval()


@pytest.fixture(scope="module")
def gallery():
    """Random features and captions of varied lengths (1..MAX_LEN words, some unknown)."""
    rng = np.random.default_rng(0)
    instances = torch.from_numpy(rng.standard_normal((N_IMAGES, GRID, 16)).astype(np.float32))
    global_ = torch.from_numpy(rng.standard_normal((N_IMAGES, 24)).astype(np.float32))
    lengths = [1, MAX_LEN, *rng.integers(1, MAX_LEN + 1, N_CAPTIONS - 2).tolist()]
    captions = [[str(rng.choice(WORDS + ["unseen"])) for _ in range(n)] for n in lengths]
    return instances, global_, captions, Vocabulary(["<pad>", "<unk>", *WORDS])


def per_pair_scores(model, instances, global_, captions, vocab) -> np.ndarray:
    """The obvious loop: every pair through the whole model (both encoders included) alone."""
    out = np.empty((len(instances), len(captions)), dtype=np.float32)
    with torch.inference_mode():
        for k, tokens in enumerate(captions):
            ids, lengths = vocab.encode_batch([tokens])
            for i in range(len(instances)):
                out[i, k] = model(instances[i:i + 1], global_[i:i + 1], ids, lengths).item()
    return out


@pytest.mark.parametrize("attention", ["context", "plain", "mean"])
def test_blocked_scores_equal_the_per_pair_loop(gallery, attention):
    instances, global_, captions, vocab = gallery
    model = tiny_model(attention)
    with torch.inference_mode():
        images = model.encode_images(instances, global_)
    # encode the captions in uneven batches of 4: padding and batching must not matter
    texts = encode_captions(model, captions, vocab, torch.device("cpu"), batch=4)

    one_pair = _block_bytes(model.config, 1, 1, GRID, MAX_LEN, 4) / 2**20
    blocks = []
    tiny = score_codes(model, images, texts, block_budget_mb=6 * one_pair,
                       progress=lambda p: blocks.append(p.block))
    whole = score_codes(model, images, texts, block_budget_mb=256)
    expected = per_pair_scores(model, instances, global_, captions, vocab)

    image_sizes = {i1 - i0 for i0, i1, _, _ in blocks}
    caption_sizes = {t1 - t0 for _, _, t0, t1 in blocks}
    assert len(blocks) > 4 and len(image_sizes | caption_sizes) > 1  # many, uneven blocks
    assert tiny.dtype == np.float32 and tiny.shape == (N_IMAGES, N_CAPTIONS)
    np.testing.assert_allclose(tiny, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(whole, expected, rtol=0, atol=1e-5)
    assert np.abs(expected).max() > 1e-3  # the model is not scoring everything ~0


def test_blocks_tile_the_matrix_exactly_once(gallery):
    instances, global_, captions, vocab = gallery
    model = tiny_model()
    with torch.inference_mode():
        images = model.encode_images(instances, global_)
    texts = encode_captions(model, captions, vocab, torch.device("cpu"))
    seen = np.zeros((N_IMAGES, N_CAPTIONS), dtype=int)
    progress = []

    def record(p):
        i0, i1, t0, t1 = p.block
        seen[i0:i1, t0:t1] += 1
        progress.append(p)

    budget = 5 * _block_bytes(model.config, 1, 1, GRID, MAX_LEN, 4) / 2**20
    score_codes(model, images, texts, block_budget_mb=budget, progress=record)
    assert (seen == 1).all()
    done = [p.pairs_done for p in progress]
    assert done == sorted(done) and done[-1] == N_IMAGES * N_CAPTIONS
    assert all(p.pairs_per_s > 0 for p in progress)
    assert "pairs/s" in str(progress[-1])


@pytest.mark.parametrize("budget_pairs", [1, 3, 17, 64, 10_000])
def test_block_plan_respects_the_budget(budget_pairs):
    """Paper widths, I=196: the plan's block (the (Bi, Bt, I, K) energy + LSTM state) fits."""
    config = ModelConfig.paper(vocab_size=50)
    num_images, num_captions, num_instances, num_words = 100, 500, 196, 20
    one = _block_bytes(config, 1, 1, num_instances, num_words, 4)
    budget_mb = budget_pairs * one / 2**20
    plan = plan_blocks(config, num_images, num_captions, num_instances, num_words, budget_mb)
    assert plan.block_bytes <= plan.budget_bytes
    assert _block_bytes(config, plan.images, plan.captions, num_instances, num_words, 4) \
        <= budget_mb * 2**20
    assert 1 <= plan.images <= num_images and 1 <= plan.captions <= num_captions
    # the budget is used: a block at least a quarter of what fits (rounding to even tiles)
    assert plan.pairs >= min(budget_pairs, num_images * num_captions) / 4


def test_budget_too_small_for_one_pair_is_refused():
    model = tiny_model()
    one = _block_bytes(model.config, 1, 1, GRID, MAX_LEN, 4) / 2**20
    with pytest.raises(ConfigError, match="block_budget_mb"):
        plan_blocks(model.config, 3, 3, GRID, MAX_LEN, block_budget_mb=one / 2)


def test_real_peak_memory_of_a_block_stays_under_its_estimate():
    """The profiler's peak CPU allocation of one score_pairs call vs the planned bytes."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    model = SMLSTM(ModelConfig.small(vocab_size=30)).eval()
    rng = np.random.default_rng(1)
    instances = torch.from_numpy(rng.standard_normal((6, 49, 512)).astype(np.float32))
    global_ = torch.from_numpy(rng.standard_normal((6, 4096)).astype(np.float32))
    ids = torch.from_numpy(rng.integers(2, 30, (30, 12)))
    with torch.inference_mode():
        images = model.encode_images(instances, global_)
        texts = model.encode_texts(ids, torch.full((30,), 12))
        estimate = model.config.score_block_bytes(6, 30, 49, 12)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model.score_pairs(images, texts)
    # live bytes over time: each op's own allocations minus its own frees (at its start), plus
    # the "[memory]" events, which are frees of tensors released between ops
    changes = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events()
    )
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    assert live == 0  # every allocation of the call was accounted for and freed
    assert 0.25 * estimate < peak <= estimate


def test_score_matrix_takes_codes_or_refuses_other_things(gallery):
    instances, global_, captions, vocab = gallery
    model = tiny_model()
    with torch.inference_mode():
        images = model.encode_images(instances, global_)
    texts = encode_captions(model, captions, vocab, torch.device("cpu"))
    np.testing.assert_array_equal(score_matrix(model, images, texts),
                                  score_codes(model, images, texts))
    with pytest.raises(TypeError):
        score_matrix(model, instances, texts)


def test_row_spans_cover_sorted_rows_in_bounded_contiguous_reads():
    rows = np.array([0, 1, 2, 5, 6, 40, 41, 42, 43, 44, 45, 46, 100])
    spans = list(_row_spans(rows, max_rows=4, max_gap=8))
    covered = np.concatenate([np.arange(a, b) for a, b in spans])
    assert set(rows) <= set(covered)
    assert all(0 < b - a <= 4 for a, b in spans)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:], strict=False))
    assert (40, 44) in spans and (100, 101) in spans  # a 34-row gap is never read


def test_scoring_runs_without_dropout_and_restores_training_mode(gallery):
    instances, global_, captions, vocab = gallery
    torch.manual_seed(0)
    model = SMLSTM(ModelConfig.small(vocab_size=len(WORDS) + 2, instance_dim=16, global_dim=24,
                                     dropout=0.5))
    model.train()  # as during training, when the val rsum is computed mid-epoch
    texts = encode_captions(model, captions, vocab, torch.device("cpu"))
    with torch.inference_mode():
        images = model.eval().encode_images(instances, global_)
    model.train()
    first = score_codes(model, images, texts)
    assert model.training
    np.testing.assert_array_equal(first, score_codes(model, images, texts))
    np.testing.assert_allclose(first, per_pair_scores(model.eval(), instances, global_,
                                                      captions, vocab), rtol=0, atol=1e-5)
