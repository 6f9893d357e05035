"""Benchmark of the blocked all-pairs scorer (smlstm.scoring) against per-pair loops.

At the paper's widths (D=512, K=256, H=1024, T=3, I=196 instances, 12-word captions) it
measures, with the same random weights:

- pairs/s of `score_codes` (one `score_pairs` call per image block x caption block) at two
  block budgets, with the peak memory of each (CPU RSS, or CUDA max allocated);
- pairs/s of the public-code approach, one pair at a time (Bi = Bt = 1) through the same
  model, both with the per-image / per-caption codes precomputed (`loop_codes`, the fairest
  loop) and with the whole model re-run for every pair (`loop_forward`);
- the achieved FLOP rate (ModelConfig.pair_flops) as a fraction of a measured fp32 matmul peak
  (torch.mm on large square matrices) on the same machine;
- the projected time of Flickr30K test (1000 x 5000 pairs) on this machine.

    .venv/bin/python bench/score.py [--images 40 --captions 200] [--device auto]

Prints a summary and writes bench/results/score.json. About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import torch

from features.backbone import pick_device
from smlstm.model import SMLSTM, ModelConfig
from smlstm.scoring import autocast_for, plan_blocks, score_codes

RESULTS = Path(__file__).resolve().parent / "results" / "score.json"
FLICKR30K_TEST_PAIRS = 1000 * 5000
NUM_INSTANCES, NUM_WORDS, VOCAB = 196, 12, 10_000


class PeakRSS:
    """Peak process RSS over a code block, sampled every 2 ms (Linux /proc), as an increase."""

    def __init__(self):
        self.base_bytes = self.peak_bytes = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:  # pages -> bytes
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.rss())
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        self.base_bytes = self.peak_bytes = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def increase_mb(self) -> float:
        return (self.peak_bytes - self.base_bytes) / 2**20


def peak_tensor_memory_mb(fn, device: torch.device) -> float:
    """Peak bytes of tensors allocated by `fn()` beyond those alive before it.

    CUDA: the caching allocator's max_memory_allocated. CPU: the profiler's memory events in
    time order (each op's own allocations minus its own frees, plus frees between ops); RSS is
    no use here because glibc keeps freed blocks in the heap after the first large free.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events()
    )
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak / 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_flops(device: torch.device, size: int = 2048, reps: int = 5) -> float:
    """fp32 FLOP/s of torch.mm on (size x size) matrices: the machine's practical peak."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)  # warm-up (thread pool, kernels)
    sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def make_inputs(model: SMLSTM, num_images: int, num_captions: int, device: torch.device):
    """Random cached-like features (float16, like the cache) and 12-word captions."""
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    instances = torch.randn(num_images, NUM_INSTANCES, cfg.instance_dim, generator=gen).relu()
    global_ = torch.randn(num_images, cfg.global_dim, generator=gen).relu()
    tokens = torch.randint(2, cfg.vocab_size, (num_captions, NUM_WORDS), generator=gen)
    lengths = torch.full((num_captions,), NUM_WORDS)
    return (instances.half().to(device), global_.half().to(device), tokens.to(device),
            lengths.to(device))


def time_batched(model, images, texts, budget_mb: float, device: torch.device) -> dict:
    """Score the whole gallery (after a warm-up on a slice): pairs/s and peak RSS."""
    score_codes(model, images.index(slice(0, 2)), texts.index(slice(0, 10)), budget_mb)
    with PeakRSS() as rss:
        sync(device)
        start = time.perf_counter()
        scores = score_codes(model, images, texts, budget_mb)
        sync(device)
        seconds = time.perf_counter() - start
    plan = plan_blocks(model.config, len(images), len(texts), NUM_INSTANCES, NUM_WORDS,
                       budget_mb, images.inst.element_size())
    return {
        "block_budget_mb": budget_mb,
        "block": [plan.images, plan.captions],
        "planned_block_mb": round(plan.block_bytes / 2**20, 2),
        "seconds": seconds,
        "pairs_per_s": scores.size / seconds,
        "peak_rss_increase_mb": round(rss.increase_mb, 1),
        "_scores": scores,
    }


def time_loop(pairs, score_one, device: torch.device, max_seconds: float) -> dict:
    """One pair at a time over `pairs` (i, k), until done or `max_seconds` have passed.

    Timed with 1 thread and with torch's default thread count, keeping the faster: tiny ops
    lose more to thread synchronisation than they gain, worst on a busy machine, and the
    comparison should be against the loop at its best.
    """
    default_threads = torch.get_num_threads()
    best: dict = {}
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        try:
            score_one(*pairs[0])  # warm-up
            done, values, start = 0, {}, time.perf_counter()
            for i, k in pairs:
                values[(i, k)] = score_one(i, k)
                done += 1
                if time.perf_counter() - start > max_seconds / 2:
                    break
            sync(device)
            seconds = time.perf_counter() - start
        finally:
            torch.set_num_threads(default_threads)
        run = {"pairs": done, "seconds": seconds, "pairs_per_s": done / seconds,
               "threads": threads, "_values": values}
        best.setdefault("by_threads", {})[threads] = round(run["pairs_per_s"], 2)
        if run["pairs_per_s"] > best.get("pairs_per_s", 0.0):
            best.update(run)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--budgets", type=float, nargs=2, default=[32.0, 512.0],
                        help="two block budgets in MB")
    parser.add_argument("--loop-seconds", type=float, default=30.0,
                        help="time spent in each per-pair loop (split over thread counts)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    device = pick_device(args.device)
    torch.manual_seed(0)
    model = SMLSTM(ModelConfig.paper(vocab_size=VOCAB)).to(device).eval()
    cfg = model.config
    instances, global_, tokens, lengths = make_inputs(model, args.images, args.captions, device)
    with torch.inference_mode(), autocast_for(device):
        images = model.encode_images(instances, global_)
        texts = model.encode_texts(tokens, lengths)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"paper widths, I={NUM_INSTANCES}, L={NUM_WORDS}; gallery {args.images} x "
          f"{args.captions} = {args.images * args.captions:,} pairs")

    peak = matmul_peak_flops(device)
    flops_per_pair = cfg.pair_flops(NUM_INSTANCES, NUM_WORDS)
    print(f"fp32 matmul peak {peak / 1e9:,.1f} GFLOP/s; {flops_per_pair / 1e6:.1f} MFLOP per pair")

    batched = [time_batched(model, images, texts, budget, device) for budget in args.budgets]
    for run in batched:
        print(f"batched, budget {run['block_budget_mb']:>6.0f} MB: block {run['block']} "
              f"(planned {run['planned_block_mb']} MB), {run['pairs_per_s']:,.0f} pairs/s")
    best = max(batched, key=lambda run: run["pairs_per_s"])
    scores = best["_scores"]

    # the per-pair loops, over pairs spread across the gallery
    rng = np.random.default_rng(0)
    pairs = [(int(i), int(k)) for i, k in zip(rng.integers(0, args.images, 10_000),
                                              rng.integers(0, args.captions, 10_000),
                                              strict=True)]

    def one_from_codes(i: int, k: int) -> float:
        with torch.inference_mode(), autocast_for(device):
            return model.score_pairs(images.index(slice(i, i + 1)),
                                     texts.index(slice(k, k + 1))).item()

    def one_forward(i: int, k: int) -> float:
        with torch.inference_mode(), autocast_for(device):
            return model(instances[i:i + 1], global_[i:i + 1], tokens[k:k + 1],
                         lengths[k:k + 1]).item()

    loops = {}
    for name, fn in (("loop_codes", one_from_codes), ("loop_forward", one_forward)):
        loops[name] = time_loop(pairs, fn, device, args.loop_seconds)
        got = loops[name].pop("_values")
        ref = np.array([scores[i, k] for i, k in got])
        loops[name]["max_abs_diff_vs_batched"] = float(np.abs(np.array(list(got.values())) - ref).max())
        print(f"{name}: {loops[name]['pairs_per_s']:,.1f} pairs/s with "
              f"{loops[name]['threads']} thread(s) (by threads: {loops[name]['by_threads']}; "
              f"max |diff| vs batched {loops[name]['max_abs_diff_vs_batched']:.1e})")

    # memory last: the CPU profiler leaves hooks behind that slow later Python-heavy loops
    for run in batched:
        run.pop("_scores")
        budget = run["block_budget_mb"]
        run["peak_tensor_memory_mb"] = round(peak_tensor_memory_mb(
            lambda budget=budget: score_codes(model, images, texts, budget), device), 1)
        run["peak_tensor_memory_kind"] = ("cuda_max_allocated" if device.type == "cuda"
                                          else "cpu_profiler")
        print(f"batched, budget {budget:>6.0f} MB: peak tensor memory "
              f"{run['peak_tensor_memory_mb']} MB (planned block {run['planned_block_mb']} MB), "
              f"peak RSS +{run['peak_rss_increase_mb']} MB")
    rate = best["pairs_per_s"]
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "model": "paper widths (ModelConfig.paper)",
        "num_instances": NUM_INSTANCES,
        "num_words": NUM_WORDS,
        "gallery": [args.images, args.captions],
        "pair_flops": flops_per_pair,
        "matmul_peak_gflops": peak / 1e9,
        "batched": batched,
        **loops,
        "speedup_vs_loop_codes": rate / loops["loop_codes"]["pairs_per_s"],
        "speedup_vs_loop_forward": rate / loops["loop_forward"]["pairs_per_s"],
        "achieved_gflops": rate * flops_per_pair / 1e9,
        "fraction_of_matmul_peak": rate * flops_per_pair / peak,
        "flickr30k_test_pairs": FLICKR30K_TEST_PAIRS,
        "flickr30k_test_projected_minutes": FLICKR30K_TEST_PAIRS / rate / 60,
        "flickr30k_test_projected_minutes_loop_codes":
            FLICKR30K_TEST_PAIRS / loops["loop_codes"]["pairs_per_s"] / 60,
    }
    print(f"speed-up: {result['speedup_vs_loop_codes']:.0f}x vs the per-pair loop on precomputed "
          f"codes, {result['speedup_vs_loop_forward']:.0f}x vs the per-pair full forward")
    print(f"achieved {result['achieved_gflops']:.1f} GFLOP/s = "
          f"{100 * result['fraction_of_matmul_peak']:.0f}% of the matmul peak")
    print(f"Flickr30K test (5M pairs) projected: {result['flickr30k_test_projected_minutes']:.1f} "
          f"min batched, {result['flickr30k_test_projected_minutes_loop_codes']:.0f} min per-pair")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
