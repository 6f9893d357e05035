"""sm-LSTM: selective multimodal LSTM for image-sentence matching (Huang, Wang, Wang, CVPR 2017).

The model scores one (image, sentence) pair at a time: over T steps a context-modulated
attention picks a few image instances (grid cells of a frozen CNN map) and a few word
instances (BiLSTM states), and an LSTM fuses the selected pair of vectors; the score is a
linear read-out of its last hidden state. See docs/model.md for the equations as implemented
and /work/shared/docs/model-spec.md for where each choice comes from.

The cost is all in `score_pairs`: every pair needs its own T-step pass. Everything that does
not depend on the pair (the projections, U_a a~_i + c_a, U_w w~_j + c_w, W_g g, W_s s) is
computed once per image / caption by `encode_images` / `encode_texts`, and `score_pairs`
runs all Bi x Bt pairs of a block at once, looping only over the T steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

PAD_INDEX = 0  # smlstm.text.Vocabulary puts <pad> at 0

# -----------------------------------------------------------------------------
# config


class ModelConfig(BaseModel):
    """Every width and every reconstructed [R] / convention [C] choice of the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(ge=2)  # includes <pad>=0 and <unk>=1
    embed_dim: int = Field(300, ge=1)  # word embedding [R]
    text_hidden: int = Field(512, ge=1)  # BiLSTM width per direction; word instance = 2x [R]
    instance_dim: int = Field(512, ge=1)  # C of the cached instance map (VGG-19 pool5)
    global_dim: int | None = Field(4096, ge=0)  # G of the cached global feature (fc7); 0/None = none
    use_global_image: bool = True  # put W_g g into the multimodal context m [R]
    joint_dim: int = Field(512, ge=1)  # D, the shared space
    attn_dim: int = Field(256, ge=1)  # K, attention hidden width
    lstm_hidden: int = Field(1024, ge=1)  # H, the multimodal LSTM
    steps: int = Field(3, ge=1)  # T
    attention: Literal["context", "plain", "mean"] = "context"  # the paper's ablation axis
    fusion: Literal["concat", "product"] = "concat"  # x[t] = [a^; w^] or a^ * w^
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # on instances, global feature, word embeddings

    @property
    def uses_global(self) -> bool:
        """True when the global image feature g enters the multimodal context m."""
        return self.use_global_image and bool(self.global_dim) and self.attention == "context"

    @property
    def word_dim(self) -> int:
        """Width of a word instance w_j = [forward h_j; backward h_j]."""
        return 2 * self.text_hidden

    @property
    def lstm_input_dim(self) -> int:
        """Width of x[t]: 2D for concat, D for product."""
        return 2 * self.joint_dim if self.fusion == "concat" else self.joint_dim

    @classmethod
    def paper(cls, vocab_size: int, **overrides) -> ModelConfig:
        """The paper's widths as reconstructed (model-spec sections 2-5)."""
        return cls(vocab_size=vocab_size, **overrides)

    @classmethod
    def small(cls, vocab_size: int, **overrides) -> ModelConfig:
        """A narrow preset that trains on the synthetic set in minutes on 2 CPU cores.

        Same structure as `paper` (context attention, concat fusion, T=3, global context on),
        about 1/8 of the widths: roughly 0.8 MFLOP per pair at I=196, L=12.
        """
        widths = dict(embed_dim=64, text_hidden=64, joint_dim=64, attn_dim=32, lstm_hidden=128)
        return cls(vocab_size=vocab_size, **{**widths, **overrides})

    def pair_flops(self, num_instances: int, num_words: int) -> int:
        """FLOPs (2 x multiply-adds of the matrix products) `score_pairs` spends per pair.

        Counts only the per-pair work, i.e. what scales with Bi x Bt; the per-image and
        per-caption encoders are amortised over the block. Elementwise ops (tanh, softmax,
        gates) are left out. At paper widths, I=196 and L=12 this is about 45 MFLOP.
        """
        D, K, H, T = self.joint_dim, self.attn_dim, self.lstm_hidden, self.steps
        n_inst, L, X = num_instances, num_words, self.lstm_input_dim
        macs = 0
        if self.attention == "context":
            macs += 2 * D * K  # G_a m and G_w m, once per pair
        for t in range(T):
            if self.attention != "mean":
                if t > 0:
                    macs += 2 * H * K  # H_a h[t-1] and H_w h[t-1] (h[0] = 0 is skipped)
                macs += n_inst * K + L * K  # the energies: v_a . tanh(...), v_w . tanh(...)
                macs += n_inst * D + L * D  # the attended vectors a^[t], w^[t]
            macs += 4 * H * X  # LSTM input-to-gates
            if t > 0:
                macs += 4 * H * H  # LSTM hidden-to-gates (h[0] = 0 is skipped)
        macs += H  # the score read-out w_o . h[T]
        return 2 * macs

    def score_block_bytes(
        self, num_images: int, num_captions: int, num_instances: int, num_words: int,
        element_size: int = 4,
    ) -> int:
        """Rough peak activation bytes of one `score_pairs` call without autograd.

        The largest intermediate is the (Bi, Bt, I, K) image attention energy; next come the
        (Bi, Bt, L, K) word energy and the (Bi, Bt, 4H) LSTM gates (float32). Pass
        element_size=2 for bf16 autocast (gates and cell state stay float32 either way).
        A blocked scorer picks Bi x Bt so that this fits its memory budget.
        """
        pairs = num_images * num_captions
        D, K, H = self.joint_dim, self.attn_dim, self.lstm_hidden
        per_pair = 0
        if self.attention != "mean":
            per_pair += element_size * ((num_instances + num_words) * K + 4 * K)
            per_pair += 4 * (num_instances + num_words)  # the float32 attention weights
        per_pair += element_size * (3 * D + self.lstm_input_dim)  # m, a^, w^, x
        per_pair += 4 * (4 * H + 3 * H)  # gates, h, c, tanh(c) in float32
        return pairs * per_pair


# -----------------------------------------------------------------------------
# codes: the pair-independent part of the work, computed once per image / caption


def _index_fields(codes, sel):
    return dataclasses.replace(
        codes, **{f.name: getattr(codes, f.name)[sel] for f in dataclasses.fields(codes)}
    )


@dataclass
class ImageCodes:
    """Encoded images. Bi images, I instances each.

    inst:      (Bi, I, D) a~_i = W_a a_i + b_a
    inst_attn: (Bi, I, K) U_a a~_i + c_a  (K = 0 for attention="mean", which needs none)
    glob_ctx:  (Bi, D)    W_g g  (zeros when the global feature is not used)
    """

    inst: torch.Tensor
    inst_attn: torch.Tensor
    glob_ctx: torch.Tensor

    def __len__(self) -> int:
        return self.inst.shape[0]

    def index(self, sel) -> ImageCodes:
        """The codes of a subset of images (a slice, index tensor or boolean mask)."""
        return _index_fields(self, sel)

    def to(self, device) -> ImageCodes:
        """A copy on another device."""
        return ImageCodes(*(t.to(device) for t in (self.inst, self.inst_attn, self.glob_ctx)))


@dataclass
class TextCodes:
    """Encoded captions. Bt captions padded to L words; padding carries zeros and mask False.

    words:      (Bt, L, D) w~_j = W_w w_j + b_w   (zero at padding)
    words_attn: (Bt, L, K) U_w w~_j + c_w          (K = 0 for attention="mean")
    mask:       (Bt, L)    True at real words
    sent_ctx:   (Bt, D)    W_s s + b_m             (zeros unless attention="context")
    lengths:    (Bt,)      number of real words, >= 1
    """

    words: torch.Tensor
    words_attn: torch.Tensor
    mask: torch.Tensor
    sent_ctx: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.words.shape[0]

    def index(self, sel, trim: bool = True) -> TextCodes:
        """The codes of a subset of captions; `trim` drops padding columns no caption uses.

        Trimming is safe because padding never influences a score, and it saves work when a
        block holds only short captions (it reads lengths.max(), a device sync on CUDA).
        """
        out = _index_fields(self, sel)
        if trim and len(out) > 0:
            longest = int(out.lengths.max())
            if longest < out.words.shape[1]:
                out = dataclasses.replace(
                    out,
                    words=out.words[:, :longest],
                    words_attn=out.words_attn[:, :longest],
                    mask=out.mask[:, :longest],
                )
        return out

    def to(self, device) -> TextCodes:
        """A copy on another device."""
        return TextCodes(
            *(t.to(device) for t in (self.words, self.words_attn, self.mask, self.sent_ctx,
                                     self.lengths))
        )


# -----------------------------------------------------------------------------
# the model


class SMLSTM(nn.Module):
    """The sm-LSTM matcher. Scores are unbounded reals; higher = better match.

    Modules a variant does not use are not built (so DDP needs no find_unused_parameters):
    attention="plain" has no m (no global/sentence context, no G_a, G_w); attention="mean"
    has no attention modules at all; without the global feature there is no W_g.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        D, K, H = cfg.joint_dim, cfg.attn_dim, cfg.lstm_hidden
        attends = cfg.attention != "mean"
        self.drop = nn.Dropout(cfg.dropout)

        # words: embedding -> BiLSTM -> w_j (2 x text_hidden)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=PAD_INDEX)
        self.text_rnn = nn.LSTM(cfg.embed_dim, cfg.text_hidden, batch_first=True,
                                bidirectional=True)

        # the shared space: a~_i = W_a a_i + b_a, w~_j = W_w w_j + b_w
        self.inst_proj = nn.Linear(cfg.instance_dim, D)  # W_a, b_a
        self.word_proj = nn.Linear(cfg.word_dim, D)  # W_w, b_w

        # the multimodal context m = tanh(W_g g + W_s s + b_m)
        if cfg.attention == "context":
            self.sent_ctx = nn.Linear(cfg.word_dim, D)  # W_s, b_m
            self.glob_ctx = nn.Linear(cfg.global_dim, D, bias=False) if cfg.uses_global else None

        # attention energies e = v . tanh(U x + H h[t-1] + G m + c)
        if attends:
            self.inst_attn = nn.Linear(D, K)  # U_a, c_a
            self.word_attn = nn.Linear(D, K)  # U_w, c_w
            self.inst_attn_h = nn.Linear(H, K, bias=False)  # H_a
            self.word_attn_h = nn.Linear(H, K, bias=False)  # H_w
            self.inst_attn_v = nn.Linear(K, 1, bias=False)  # v_a
            self.word_attn_v = nn.Linear(K, 1, bias=False)  # v_w
            if cfg.attention == "context":
                self.inst_attn_m = nn.Linear(D, K, bias=False)  # G_a
                self.word_attn_m = nn.Linear(D, K, bias=False)  # G_w

        # the multimodal LSTM and the score read-out
        self.cell = nn.LSTMCell(cfg.lstm_input_dim, H)
        self.score_out = nn.Linear(H, 1)  # w_o, b_o

        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.uniform_(module.weight, -0.1, 0.1)
                with torch.no_grad():
                    module.weight[PAD_INDEX].zero_()
            elif isinstance(module, nn.LSTM | nn.LSTMCell):
                hidden = module.hidden_size
                for name, p in module.named_parameters():
                    if name.startswith("weight_ih"):
                        nn.init.xavier_uniform_(p)
                    elif name.startswith("weight_hh"):
                        for gate in range(4):  # one orthogonal block per gate (i, f, g, o)
                            nn.init.orthogonal_(p.data[gate * hidden:(gate + 1) * hidden])
                    elif name.startswith("bias_ih"):
                        # forget-gate bias 1 (bias_hh stays 0, so the sum is 1): remember early on
                        nn.init.zeros_(p)
                        nn.init.ones_(p.data[hidden:2 * hidden])
                    elif name.startswith("bias_hh"):
                        nn.init.zeros_(p)

    # ---- pair-independent encoders ------------------------------------------------------

    def encode_images(
        self, instances: torch.Tensor, global_features: torch.Tensor | None = None
    ) -> ImageCodes:
        """Encode Bi images: instances (Bi, I, C), global_features (Bi, G) or None.

        Any float dtype is accepted (the cache holds float16); inputs are cast to the model's.
        The global feature is required when the config uses it and ignored otherwise.
        """
        cfg = self.config
        if instances.dim() != 3 or instances.shape[-1] != cfg.instance_dim:
            raise ValueError(f"instances: expected (Bi, I, {cfg.instance_dim}), "
                             f"got {tuple(instances.shape)}")
        dtype = self.inst_proj.weight.dtype
        inst = self.inst_proj(self.drop(instances.to(dtype)))  # (Bi, I, D)
        Bi = inst.shape[0]

        if cfg.attention != "mean":
            inst_attn = self.inst_attn(inst)  # (Bi, I, K)
        else:
            inst_attn = inst.new_zeros((Bi, inst.shape[1], 0))

        if cfg.uses_global:
            if global_features is None:
                raise ValueError("global_features: required by this config (use_global_image)")
            if global_features.shape != (Bi, cfg.global_dim):
                raise ValueError(f"global_features: expected ({Bi}, {cfg.global_dim}), "
                                 f"got {tuple(global_features.shape)}")
            glob_ctx = self.glob_ctx(self.drop(global_features.to(dtype)))  # (Bi, D)
        else:
            glob_ctx = inst.new_zeros((Bi, cfg.joint_dim))
        return ImageCodes(inst=inst, inst_attn=inst_attn, glob_ctx=glob_ctx)

    def encode_texts(self, tokens: torch.Tensor, lengths: torch.Tensor) -> TextCodes:
        """Encode Bt captions: tokens (Bt, L) long, padded anywhere past lengths (Bt,) long.

        The BiLSTM runs on packed sequences, so padding never reaches a real word's state,
        and it runs in float32 even under autocast (it is cheap, and cuDNN RNNs in bf16
        are not a given).
        """
        cfg = self.config
        if tokens.dim() != 2 or lengths.shape != tokens.shape[:1]:
            raise ValueError(f"tokens (Bt, L) and lengths (Bt,): got {tuple(tokens.shape)} "
                             f"and {tuple(lengths.shape)}")
        Bt, L = tokens.shape
        lengths_cpu = lengths.detach().to("cpu", torch.long)
        if Bt and (int(lengths_cpu.min()) < 1 or int(lengths_cpu.max()) > L):
            raise ValueError(f"lengths: must lie in [1, {L}], got min {int(lengths_cpu.min())} "
                             f"max {int(lengths_cpu.max())}")
        lengths = lengths.to(tokens.device, torch.long)
        mask = torch.arange(L, device=tokens.device)[None, :] < lengths[:, None]  # (Bt, L)

        rnn_dtype = self.text_rnn.weight_ih_l0.dtype
        emb = self.drop(self.embed(tokens))
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            packed = pack_padded_sequence(emb.to(rnn_dtype), lengths_cpu, batch_first=True,
                                          enforce_sorted=False)
            out, _ = self.text_rnn(packed)
            w, _ = pad_packed_sequence(out, batch_first=True, total_length=L)  # zeros at padding
        sent = w.sum(1) / lengths[:, None].to(w.dtype)  # s: mean over real words

        words = self.word_proj(w).masked_fill(~mask[..., None], 0.0)  # (Bt, L, D)
        if cfg.attention != "mean":
            words_attn = self.word_attn(words)  # (Bt, L, K)
        else:
            words_attn = words.new_zeros((Bt, L, 0))
        if cfg.attention == "context":
            sent_ctx = self.sent_ctx(sent)  # W_s s + b_m
        else:
            sent_ctx = words.new_zeros((Bt, cfg.joint_dim))
        return TextCodes(words=words, words_attn=words_attn, mask=mask, sent_ctx=sent_ctx,
                         lengths=lengths)

    # ---- the per-pair part ----------------------------------------------------------------

    def score_pairs(self, img: ImageCodes, txt: TextCodes) -> torch.Tensor:
        """Scores of all Bi x Bt pairs, (Bi, Bt) float32. A pair's score depends only on it."""
        scores, _ = self._run_pairs(img, txt, keep_attention=False)
        return scores

    def _run_pairs(
        self, img: ImageCodes, txt: TextCodes, keep_attention: bool
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        cfg = self.config
        Bi, n_inst, D = img.inst.shape
        Bt, L, _ = txt.words.shape
        attention: list[tuple[torch.Tensor, torch.Tensor]] = []  # (p[t], q[t]) per step

        # m and G m depend on the pair but not on the step: once per pair
        ctx_inst = ctx_word = None
        if cfg.attention == "context":
            m = torch.tanh(img.glob_ctx[:, None, :] + txt.sent_ctx[None, :, :])  # (Bi, Bt, D)
            ctx_inst, ctx_word = self.inst_attn_m(m), self.word_attn_m(m)  # (Bi, Bt, K) each

        word_pad = ~txt.mask[None, :, :]  # (1, Bt, L), True at padding
        if cfg.attention == "mean":
            # uniform p over instances and uniform q over real words: the same every step
            p = img.inst.new_full((Bi, Bt, n_inst), 1.0 / n_inst, dtype=_acc_dtype(img.inst))
            q = txt.mask.to(p.dtype) / txt.lengths[:, None].to(p.dtype)
            q = q[None].expand(Bi, Bt, L)
            a_hat = img.inst.mean(1)[:, None, :].expand(Bi, Bt, D)
            w_hat = (txt.words.sum(1) / txt.lengths[:, None].to(txt.words.dtype))
            w_hat = w_hat[None, :, :].expand(Bi, Bt, D)
            x_mean = self._fuse(a_hat, w_hat)

        h = c = None  # h[0] = c[0] = 0, handled by skipping the h terms at t = 0
        for _step in range(cfg.steps):
            if cfg.attention == "mean":
                x = x_mean
            else:
                q_inst, q_word = ctx_inst, ctx_word  # the per-pair-step query vectors
                if h is not None:
                    h_in = h.to(img.inst.dtype)  # float32 state -> the matmul dtype
                    q_inst = _add(q_inst, self.inst_attn_h(h_in))
                    q_word = _add(q_word, self.word_attn_h(h_in))
                p = self._attend_inst(img.inst_attn, q_inst, Bt)  # (Bi, Bt, I) float32
                q = self._attend_word(txt.words_attn, q_word, word_pad, Bi)  # (Bi, Bt, L)
                # a^[t] = sum_i p_i a~_i, one bmm per image; w^[t] likewise per caption
                a_hat = torch.bmm(p.to(img.inst.dtype), img.inst)  # (Bi, Bt, D)
                w_hat = torch.bmm(q.transpose(0, 1).to(txt.words.dtype), txt.words)
                x = self._fuse(a_hat, w_hat.transpose(0, 1))
            h, c = self._lstm_step(x, h, c)
            if keep_attention:
                attention.append((p, q))

        # the read-out in float32 even under autocast: bf16 scores would tie in rankings
        with torch.autocast(device_type=h.device.type, enabled=False):
            w_o, b_o = self.score_out.weight, self.score_out.bias
            scores = F.linear(h, w_o.to(h.dtype), b_o.to(h.dtype)).squeeze(-1)  # (Bi, Bt)
        return scores, attention

    def _attend_inst(self, inst_attn: torch.Tensor, query: torch.Tensor | None,
                     num_captions: int) -> torch.Tensor:
        """p = softmax_i v_a . tanh(U_a a~_i + c_a + query), for every pair: (Bi, Bt, I)."""
        if query is None:  # plain attention at t = 0: nothing pair-dependent yet
            energy = self.inst_attn_v(torch.tanh(inst_attn)).squeeze(-1)  # (Bi, I)
            return _to_acc(energy).softmax(-1)[:, None, :].expand(-1, num_captions, -1)
        # the one big intermediate, (Bi, Bt, I, K): tanh in place so it exists once
        hidden = torch.tanh_(inst_attn[:, None, :, :] + query[:, :, None, :])
        energy = self.inst_attn_v(hidden).squeeze(-1)  # (Bi, Bt, I)
        return _to_acc(energy).softmax(-1)

    def _attend_word(self, words_attn: torch.Tensor, query: torch.Tensor | None,
                     word_pad: torch.Tensor, num_images: int) -> torch.Tensor:
        """q = masked softmax_j v_w . tanh(U_w w~_j + c_w + query): (Bi, Bt, L), 0 at padding."""
        if query is None:
            energy = self.word_attn_v(torch.tanh(words_attn)).squeeze(-1)[None]  # (1, Bt, L)
        else:
            hidden = torch.tanh_(words_attn[None, :, :, :] + query[:, :, None, :])
            energy = self.word_attn_v(hidden).squeeze(-1)  # (Bi, Bt, L)
        # -inf makes exp() exactly 0 at padding, so padded positions cannot matter
        energy = _to_acc(energy).masked_fill(word_pad, float("-inf"))
        return energy.softmax(-1).expand(num_images, -1, -1)

    def _fuse(self, a_hat: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
        if self.config.fusion == "concat":
            return torch.cat([a_hat, w_hat.to(a_hat.dtype)], dim=-1)
        return a_hat * w_hat.to(a_hat.dtype)

    def _lstm_step(self, x: torch.Tensor, h: torch.Tensor | None, c: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """nn.LSTMCell's maths on (Bi, Bt, X) with gates and state in float32.

        Written out (same parameters, same result as nn.LSTMCell) so that under bf16
        autocast only the matmuls run in bf16 while the cell state accumulates in float32,
        and so that the h[0] = 0 matmul is skipped.
        """
        cell = self.cell
        acc = _acc_dtype(x)
        gates = F.linear(x, cell.weight_ih, cell.bias_ih).to(acc) + cell.bias_hh.to(acc)
        if h is not None:
            gates = gates + F.linear(h.to(x.dtype), cell.weight_hh).to(acc)
        i, f, g, o = gates.chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = i * g if c is None else f * c + i * g
        h = o * torch.tanh(c)
        return h, c

    # ---- conveniences ---------------------------------------------------------------------

    def forward(self, instances: torch.Tensor, global_features: torch.Tensor | None,
                tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """All-pairs scores (Bi, Bt) of a batch: encode both sides, then `score_pairs`."""
        return self.score_pairs(self.encode_images(instances, global_features),
                                self.encode_texts(tokens, lengths))

    @torch.no_grad()
    def explain(self, instances: torch.Tensor, global_features: torch.Tensor | None,
                tokens: torch.Tensor, length: int | torch.Tensor,
                grid: tuple[int, int] | None = None) -> dict:
        """Per-step attention of one pair, for figures (runs in eval mode, no dropout).

        instances (I, C), global_features (G,) or None, tokens (L,), length = real words.
        Returns image_maps (T, h, w) with h*w = I (grid, or a square inferred from I),
        word_weights (T, length) and the float score. Each map and each row sums to 1.
        """
        n_inst = instances.shape[0]
        if grid is None:
            side = math.isqrt(n_inst)
            if side * side != n_inst:
                raise ValueError(f"explain: {n_inst} instances are not a square grid; pass grid=")
            grid = (side, side)
        if grid[0] * grid[1] != n_inst:
            raise ValueError(f"explain: grid {tuple(grid)} does not hold {n_inst} instances")
        length = int(length)
        was_training = self.training
        self.eval()
        try:
            img = self.encode_images(instances[None],
                                     None if global_features is None else global_features[None])
            lengths = torch.tensor([length], device=tokens.device)
            txt = self.encode_texts(tokens[None], lengths)
            scores, attention = self._run_pairs(img, txt, keep_attention=True)
        finally:
            self.train(was_training)
        image_maps = torch.stack([p[0, 0] for p, _ in attention]).reshape(-1, *grid)
        word_weights = torch.stack([q[0, 0, :length] for _, q in attention])
        return dict(image_maps=image_maps.cpu(), word_weights=word_weights.cpu(),
                    score=float(scores[0, 0]))


def _add(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a + b


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or wider when the model runs in float64: softmax and LSTM state precision."""
    return torch.promote_types(t.dtype, torch.float32)


def _to_acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(_acc_dtype(t))
