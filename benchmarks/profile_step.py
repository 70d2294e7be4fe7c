"""Where one dense decode step's device time goes, per kernel (torch.profiler), on a random model.

Usage: python benchmarks/profile_step.py [--batch 1] [--context 8192]. Prints kernel name, calls and
microseconds per step, biggest first, and the total against the step's weight + KV bytes at copy speed.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import LLAMA3_8B, copy_bandwidth_gbs, random_model, weight_bytes_per_step  # noqa: E402
from specattn.cache import PagedKVCache  # noqa: E402
from specattn.decoding.runner import StepRunner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    copy = copy_bandwidth_gbs()
    model = random_model(LLAMA3_8B)
    cache = PagedKVCache(model.cfg, args.batch, args.context + 16, dtype=torch.bfloat16, device="cuda")
    cache.k.normal_()
    cache.v.normal_()
    cache.reset(args.batch)
    cache.reserve(args.context)
    cache.advance(args.context)
    cache.reserve(1)
    runner = StepRunner(model, cache)
    tokens = torch.randint(0, model.cfg.vocab_size, (args.batch, 1), device="cuda")
    for _ in range(3):
        runner(tokens)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            runner(tokens)
        torch.cuda.synchronize()
    per_kernel = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[ev.name][0] += 1
            per_kernel[ev.name][1] += ev.device_time
    total = sum(us for _, us in per_kernel.values()) / args.steps
    moved = weight_bytes_per_step(model, args.batch) + args.batch * args.context * model.cfg.kv_bytes_per_token * 2
    print(f"copy {copy:.0f} GB/s; floor {moved / copy / 1e3:.0f} us; kernels sum {total:.0f} us per step")
    for name, (calls, us) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"{us / args.steps:9.1f} us {calls // args.steps:5d}x  {name[:110]}")


if __name__ == "__main__":
    main()
