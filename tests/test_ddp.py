"""DDP training equals single-process training with the same global batch.

Two checks, both with real gloo process groups on the CPU:
- the gradient of one batch: 2 processes (torch.multiprocessing.spawn) running the training
  step's own code (BatchScorer in DistributedDataParallel + batch_loss) vs one process;
- a whole epoch through `torchrun -m smlstm.train` vs `train()` in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_data import build_tiny_cache  # tests/ is on sys.path under pytest

from smlstm.loss import LossConfig
from smlstm.model import SMLSTM, ModelConfig
from smlstm.train import BatchScorer, batch_loss, train

LOSSES = [LossConfig(), LossConfig(mode="max_violation"), LossConfig(negatives=3)]
WORLD = 2


def _batch(batch_size: int = 8, vocab_size: int = 30) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 7, 2, 5, 4, 2, 6, 3])[:batch_size]  # rank 0 longest 7, rank 1 6
    tokens = torch.randint(2, vocab_size, (batch_size, int(lengths.max())), generator=g)
    tokens[torch.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = 0
    return {
        "instances": torch.randn(batch_size, 4, 8, generator=g),
        "global": torch.randn(batch_size, 6, generator=g),
        "tokens": tokens,
        "lengths": lengths,
        "image_ids": torch.tensor([0, 1, 1, 2, 3, 3, 4, 5])[:batch_size],  # repeated images
    }


def _model() -> SMLSTM:
    torch.manual_seed(0)
    config = ModelConfig.small(30, instance_dim=8, global_dim=6, embed_dim=8, text_hidden=8,
                               joint_dim=8, attn_dim=4, lstm_hidden=12)
    return SMLSTM(config)


def _grads(scorer, model, batch, distributed: bool) -> list[dict]:
    out = []
    for i, loss_config in enumerate(LOSSES):
        model.zero_grad(set_to_none=True)
        generator = torch.Generator().manual_seed(100 + i)
        loss, scores = batch_loss(scorer, batch, torch.device("cpu"), distributed, loss_config,
                                  epoch=0, generator=generator)
        loss.backward()
        out.append({"loss": loss.detach(), "scores": scores.detach(),
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters()}})
    return out


def _ddp_worker(rank: int, init_file: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model = _model()
        scorer = torch.nn.parallel.DistributedDataParallel(BatchScorer(model, distributed=True))
        batch = _batch()
        per_rank = len(batch["lengths"]) // WORLD
        local = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
        # as the dataset pads: to this rank's longest caption only
        local["tokens"] = local["tokens"][:, : int(local["lengths"].max())]
        results = _grads(scorer, model, local, distributed=True)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_gradient_equals_single_process_gradient(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        expected = _grads(BatchScorer(model, distributed=False), model, _batch(), False)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    got = torch.load(out, weights_only=True)
    for mine, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine["scores"], theirs["scores"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mine["loss"], theirs["loss"], rtol=1e-6, atol=1e-6)
        assert mine["grads"].keys() == theirs["grads"].keys()
        for name, grad in theirs["grads"].items():
            # DDP averages W copies of (W x each rank's share): the single-process gradient
            torch.testing.assert_close(mine["grads"][name], grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
        assert any(g.abs().sum() > 0 for g in theirs["grads"].values())


# ---------------------------------------------------------------------------------------------
# end to end: torchrun, 2 processes, one epoch


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory) -> Path:
    return build_tiny_cache(tmp_path_factory.getbasetemp())


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten().float() for t in state.values()])


def test_torchrun_epoch_matches_single_process(cache_path, tmp_path):
    # window_shards=16 puts all train shards in one window: 450 captions = 11 x 40 + 10, an even
    # partial batch, so nothing is rounded to the world size and both runs see the same batches.
    base = dict(cache=str(cache_path), preset="small", epochs=1, batch_size=40, window_shards=16,
                lr=1e-3, seed=3)
    config_file = tmp_path / "ddp.json"
    config_file.write_text(json.dumps({**base, "out": str(tmp_path / "ddp"), "workers": 1}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={WORLD}", "-m", "smlstm.train", "--config", str(config_file)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"x {WORLD} ranks" in result.stdout

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the one-thread DDP ranks
    try:
        summary = train({**base, "out": str(tmp_path / "one"), "workers": 0}, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    one = torch.load(tmp_path / "one/checkpoints/latest.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp/checkpoints/latest.pt", weights_only=True)
    assert ddp["step"] == one["step"] == summary.steps == 12
    assert ddp["history"][0]["loss"] == pytest.approx(one["history"][0]["loss"], rel=1e-6)
    assert (tmp_path / "ddp/history.parquet").exists()

    # Adam's first moment holds the (clipped) gradients: they agree to float reassociation.
    for key, state in one["optimizer"]["state"].items():
        torch.testing.assert_close(ddp["optimizer"]["state"][key]["exp_avg"], state["exp_avg"],
                                   rtol=1e-3, atol=1e-5)
    # Adam divides by sqrt(v): an element whose true gradient is ~0 moves by +-lr on float
    # noise alone, so compare the weights as a whole, not element by element.
    init = _model_init(one)
    change = _flat(one["model"]) - init
    diff = _flat(ddp["model"]) - _flat(one["model"])
    assert diff.norm() < 1e-2 * change.norm()


def _model_init(ckpt: dict) -> torch.Tensor:
    torch.manual_seed(ckpt["train_config"]["seed"])
    return _flat(SMLSTM(ModelConfig(**ckpt["model_config"])).state_dict())
