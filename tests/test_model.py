"""sm-LSTM model: blocked scoring equals per-pair scoring, padding is inert, gradients flow."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from smlstm.loss import LossConfig, ranking_loss
from smlstm.model import SMLSTM, ModelConfig

VOCAB, INST_DIM, GLOBAL_DIM, NUM_INST = 30, 6, 5, 4
VARIANTS = [(a, f) for a in ("context", "plain", "mean") for f in ("concat", "product")]


def tiny_config(**overrides) -> ModelConfig:
    widths = dict(vocab_size=VOCAB, embed_dim=8, text_hidden=6, instance_dim=INST_DIM,
                  global_dim=GLOBAL_DIM, joint_dim=8, attn_dim=5, lstm_hidden=10, steps=3)
    return ModelConfig(**{**widths, **overrides})


def tiny_model(seed: int = 0, **overrides) -> SMLSTM:
    torch.manual_seed(seed)
    return SMLSTM(tiny_config(**overrides)).eval()


def random_batch(num_images: int, num_captions: int, max_len: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    instances = torch.randn(num_images, NUM_INST, INST_DIM, generator=g).to(torch.float16)
    global_features = torch.randn(num_images, GLOBAL_DIM, generator=g)
    lengths = torch.randint(1, max_len + 1, (num_captions,), generator=g)
    lengths[0] = max_len  # at least one full-length caption
    tokens = torch.randint(2, VOCAB, (num_captions, max_len), generator=g)
    tokens[torch.arange(max_len)[None, :] >= lengths[:, None]] = 0  # <pad>
    return instances, global_features, tokens, lengths


@pytest.mark.parametrize("attention,fusion", VARIANTS)
def test_block_scores_equal_pair_by_pair_scores(attention, fusion):
    model = tiny_model(attention=attention, fusion=fusion)
    instances, global_features, tokens, lengths = random_batch(3, 5)
    with torch.no_grad():
        block = model(instances, global_features, tokens, lengths)
        assert block.shape == (3, 5) and block.dtype == torch.float32
        for i in range(3):
            for c in range(5):
                n = int(lengths[c])  # each pair alone, and unpadded
                alone = model(instances[i:i + 1], global_features[i:i + 1],
                              tokens[c:c + 1, :n], lengths[c:c + 1])
                assert alone.shape == (1, 1)
                assert abs(float(alone) - float(block[i, c])) < 1e-5, (i, c)
    # the block's scores are not all alike: the check above compares something
    assert block.std() > 1e-4


@pytest.mark.parametrize("attention", ["context", "plain", "mean"])
def test_padding_never_changes_a_score(attention):
    model = tiny_model(attention=attention)
    instances, global_features, tokens, lengths = random_batch(2, 4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        base = model(instances, global_features, tokens, lengths)
        # 5 extra pad tokens
        padded = torch.cat([tokens, torch.zeros(4, 5, dtype=torch.long)], dim=1)
        assert torch.allclose(model(instances, global_features, padded, lengths), base,
                              atol=1e-6, rtol=0)
        # and garbage (real word ids) in every padding position: still no influence
        garbage = padded.clone()
        is_pad = torch.arange(padded.shape[1])[None, :] >= lengths[:, None]
        garbage[is_pad] = torch.randint(2, VOCAB, (int(is_pad.sum()),), generator=g)
        assert torch.allclose(model(instances, global_features, garbage, lengths), base,
                              atol=1e-6, rtol=0)
        # trimming a block's padding columns (TextCodes.index) is just as inert
        img = model.encode_images(instances, global_features)
        txt = model.encode_texts(padded, lengths)
        short = torch.argsort(lengths)[:2]
        trimmed = txt.index(short)
        assert trimmed.words.shape[1] == int(lengths[short].max())
        assert torch.allclose(model.score_pairs(img, trimmed), base[:, short], atol=1e-6,
                              rtol=0)


def test_mean_attention_averages_real_words_only():
    model = tiny_model(attention="mean")
    instances, global_features, tokens, lengths = random_batch(1, 3)
    c = int(torch.argmin(lengths))
    n = int(lengths[c])
    with torch.no_grad():
        img = model.encode_images(instances, global_features)
        txt = model.encode_texts(tokens, lengths)
        got = model.score_pairs(img, txt)[0, c]
        # the reference: plain means of the real words / all instances through nn.LSTMCell
        x = torch.cat([img.inst[0].mean(0), txt.words[c, :n].mean(0)])[None]
        h = torch.zeros(1, model.config.lstm_hidden)
        cell = torch.zeros_like(h)
        for _ in range(model.config.steps):
            h, cell = model.cell(x, (h, cell))
        expected = model.score_out(h)[0, 0]
    assert abs(float(got) - float(expected)) < 1e-5
    explained = model.explain(instances[0], global_features[0], tokens[c], n, grid=(2, 2))
    assert torch.allclose(explained["word_weights"], torch.full((3, n), 1.0 / n))
    assert torch.allclose(explained["image_maps"], torch.full((3, 2, 2), 1.0 / NUM_INST))


@pytest.mark.parametrize("attention", ["context", "plain", "mean"])
def test_gradients_reach_every_parameter(attention):
    model = tiny_model(attention=attention).train()
    instances, global_features, tokens, lengths = random_batch(4, 4)
    scores = model(instances, global_features, tokens, lengths)
    loss = ranking_loss(scores, torch.arange(4), torch.arange(4), LossConfig(margin=10.0))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name == "score_out.bias":
            # b_o cancels in every hinge term s(neg) - s(pos): its gradient is exactly zero
            assert torch.equal(p.grad, torch.zeros_like(p))
            continue
        assert p.grad.abs().sum() > 0, name


def test_variants_build_only_the_modules_they_use():
    names = {a: {n for n, _ in tiny_model(attention=a).named_parameters()}
             for a in ("context", "plain", "mean")}
    assert "inst_attn_m.weight" in names["context"] and "glob_ctx.weight" in names["context"]
    assert not any(n.startswith(("inst_attn_m", "word_attn_m", "glob_ctx", "sent_ctx"))
                   for n in names["plain"])
    assert "inst_attn_h.weight" in names["plain"]
    assert not any("attn" in n or "ctx" in n for n in names["mean"])
    no_global = {n for n, _ in tiny_model(use_global_image=False).named_parameters()}
    assert "glob_ctx.weight" not in no_global and "sent_ctx.weight" in no_global
    assert {n for n, _ in tiny_model(global_dim=0).named_parameters()} == no_global


def test_global_feature_enters_the_score_only_when_used():
    instances, global_features, tokens, lengths = random_batch(2, 3)
    other_global = global_features + 1.0
    with torch.no_grad():
        model = tiny_model()
        with pytest.raises(ValueError, match="global_features"):
            model(instances, None, tokens, lengths)
        assert not torch.allclose(model(instances, global_features, tokens, lengths),
                                  model(instances, other_global, tokens, lengths))
        model = tiny_model(use_global_image=False)
        assert torch.equal(model(instances, global_features, tokens, lengths),
                           model(instances, None, tokens, lengths))


def test_overfits_a_tiny_set():
    torch.manual_seed(0)
    model = SMLSTM(tiny_config(joint_dim=16, attn_dim=8, lstm_hidden=16)).train()
    instances, global_features, tokens, lengths = random_batch(16, 16, seed=3)
    ids = torch.arange(16)
    config = LossConfig()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        loss = ranking_loss(model(instances, global_features, tokens, lengths), ids, ids, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_explain_maps_and_word_weights():
    model = tiny_model(steps=4)
    instances, global_features, tokens, lengths = random_batch(1, 1, max_len=7)
    padded = torch.cat([tokens[0], torch.randint(2, VOCAB, (3,))])  # junk past the length
    out = model.explain(instances[0], global_features[0], padded, 5)
    assert out["image_maps"].shape == (4, 2, 2)  # square grid inferred from I = 4
    assert out["word_weights"].shape == (4, 5)
    assert torch.allclose(out["image_maps"].sum((1, 2)), torch.ones(4), atol=1e-6)
    # all of each step's word weight lies on the 5 real words, none beyond
    assert torch.allclose(out["word_weights"].sum(1), torch.ones(4), atol=1e-6)
    with torch.no_grad():
        score = model(instances, global_features, padded[None, :5], torch.tensor([5]))
    assert abs(out["score"] - float(score)) < 1e-5
    assert model.explain(instances[0], global_features[0], padded, 5, grid=(1, 4))[
        "image_maps"].shape == (4, 1, 4)
    with pytest.raises(ValueError, match="grid"):
        model.explain(instances[0], global_features[0], padded, 5, grid=(3, 3))


def test_autocast_bf16_stays_close_to_float32():
    model = tiny_model()
    instances, global_features, tokens, lengths = random_batch(3, 4)
    with torch.no_grad():
        full = model(instances, global_features, tokens, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(instances, global_features, tokens, lengths)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - full).abs().max() < 0.05 * full.abs().max() + 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = tiny_model()
    instances, global_features, tokens, lengths = random_batch(3, 4)
    with torch.no_grad():
        cpu = model(instances, global_features, tokens, lengths)
        model.cuda()
        gpu = model(instances.cuda(), global_features.cuda(), tokens.cuda(), lengths.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            gpu_bf16 = model(instances.cuda(), global_features.cuda(), tokens.cuda(),
                             lengths.cuda())
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
    assert gpu_bf16.dtype == torch.float32
    assert (gpu_bf16.cpu() - cpu).abs().max() < 0.05 * cpu.abs().max() + 0.02


def test_presets_and_flop_count():
    paper = ModelConfig.paper(1000)
    small = ModelConfig.small(1000)
    assert (paper.joint_dim, paper.attn_dim, paper.lstm_hidden, paper.steps) == (512, 256, 1024, 3)
    assert paper.attention == "context" and paper.fusion == "concat"
    assert 30e6 <= paper.pair_flops(196, 12) <= 70e6
    assert small.pair_flops(196, 12) < paper.pair_flops(196, 12) / 20
    for config in (paper, small):
        model = SMLSTM(config)
        assert model.cell.hidden_size == config.lstm_hidden
    # the cost grows with the instance count; "mean" skips the attention work
    assert paper.pair_flops(196, 12) > paper.pair_flops(49, 12)
    mean = ModelConfig.paper(1000, attention="mean")
    assert mean.pair_flops(196, 12) < paper.pair_flops(196, 12)
    assert paper.score_block_bytes(2, 3, 196, 12) == 6 * paper.score_block_bytes(1, 1, 196, 12)


def test_config_rejects_unknown_and_bad_fields():
    with pytest.raises(ValidationError):
        tiny_config(hidden=5)
    with pytest.raises(ValidationError):
        tiny_config(attention="cross")
    with pytest.raises(ValidationError):
        tiny_config(steps=0)


def test_bad_lengths_are_refused():
    model = tiny_model()
    tokens = torch.randint(2, VOCAB, (2, 4))
    with pytest.raises(ValueError, match="lengths"):
        model.encode_texts(tokens, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="lengths"):
        model.encode_texts(tokens, torch.tensor([5, 3]))
