"""Where a self-speculation round's time goes, by method, on a random model of a real shape (default: Qwen2.5-1.5B at
batch 64 x 32K): wall time per round (host gaps included), the draft / verify split, and each method's device time
by kernel, so that two methods' rounds can be compared kernel by kernel. Model-free (no checkpoint to carry).

Random weights accept almost no draft, so every round emits one token and keeps the whole batch generating: each
round costs what a full-batch round of a real run costs (the acceptance does not change a round's work). Variants are
run round-robin (--repeats) and the median kept. Method names as selfspec.py's: "/" suffixes are SpecAttn-Y's
selection variants, "+" suffixes selfspec.FLAG_SWITCHES' module flags (e.g. "+pipe" / "+nopipe": the next round's drafts
queued before the sync, or not).

Usage (GPU): python benchmarks/profile_selfspec_round.py OUT.json [--methods magicdec,specattn-y/blk64]
    [--budget 512] [--batch 64] [--context 32000] [--rounds 60] [--repeats 3] [--top 8] [--device cpu]"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHAPES, cuda_kernel_totals, environment, random_model  # noqa: E402
from benchmarks.profile_round import skip_prefill as lengths_only_prefill  # noqa: E402
from benchmarks.selfspec import FLAG_SWITCHES  # noqa: E402
from specattn.api import SpeculationParams, make_policy, method_variant  # noqa: E402
from specattn.cache import PagedKVCache  # noqa: E402
from specattn.decoding import self_speculative  # noqa: E402
from specattn.decoding.ar import GenerationParams, generate_ar  # noqa: E402
from specattn.decoding.self_speculative import cache_tokens_needed, generate_self_speculative  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402


class Variant:
    """A method by selfspec.py's name: "/" suffixes select SpecAttn-Y's variant, "+" suffixes the module flags that
    selfspec.FLAG_SWITCHES sets for its run."""

    def __init__(self, name: str, budget: int, gamma: int, num_layers: int):
        base, self.name, self.flags = name, name, []
        for suffix, flags in FLAG_SWITCHES.items():
            if base.endswith(suffix):
                base, self.flags = base.removesuffix(suffix), self.flags + flags
        method, overrides = method_variant(base)
        spec = dataclasses.replace(SpeculationParams(budget, gamma, ()), **overrides)
        self.policy, self.gamma, self.steps = make_policy(method, spec, num_layers), gamma, None

    def run(self, model, cache, prompts, params):
        with contextlib.ExitStack() as stack:
            for module, flag, value in self.flags:
                stack.enter_context(mock.patch.object(module, flag, value))
            res = generate_self_speculative(model, cache, prompts, params, self.policy, self.gamma, self.steps)
        self.steps = res.runner
        return res.stats


def per_round(stats: dict) -> dict:
    n = stats["rounds"]
    return {"round_ms": (stats["total_s"] - stats["prefill_s"]) / n * 1e3, "draft_ms": stats["draft_s"] / n * 1e3,
            "verify_ms": stats["verify_s"] / n * 1e3, "rounds": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", default="qwen1.5b", choices=sorted(SHAPES))
    ap.add_argument("--methods", default="magicdec,specattn-y/blk64,specattn-y/blk64+pipe,specattn-y/blk64/r2,"
                                         "specattn-y/blk64/r4")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=32000)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (eager steps, no kernels)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = random_model(SHAPES[args.shape], device=args.device)
    if args.device == "cuda":
        model.compile_steps()
    size = cache_tokens_needed(args.context, args.rounds, args.gamma)
    cache = PagedKVCache(model.cfg, args.batch, size, dtype=model.embed.weight.dtype, device=args.device)
    # Random keys and values: zero ones give every page the same mass, and a tie-broken top-k would then pick
    # contiguous pages, where a real selection scatters (MagicDec's sinks + window are contiguous either way).
    cache.k.normal_()
    cache.v.normal_()
    prompts = [[1] * args.context for _ in range(args.batch)]
    params = GenerationParams(max_new_tokens=args.rounds)
    variants = [Variant(m, args.budget, args.gamma, model.cfg.num_layers) for m in args.methods.split(",")]
    timings: dict[str, list[dict]] = {v.name: [] for v in variants}
    # lengths set as a prefill would, K/V left as they are: a round's cost depends on lengths, not contents
    with mock.patch.object(self_speculative, "prefill", lengths_only_prefill):
        for v in variants:                    # warm-up: compiles and captures every graph a run uses
            v.run(model, cache, prompts, params)
        for _ in range(args.repeats):
            for v in variants:
                timings[v.name].append(per_round(v.run(model, cache, prompts, params)))
        kernels = {}
        for v in variants:
            activity = torch.profiler.ProfilerActivity
            kind = activity.CUDA if args.device == "cuda" else activity.CPU
            with torch.profiler.profile(activities=[kind]) as prof:
                stats = v.run(model, cache, prompts, params)
                if args.device == "cuda":
                    torch.cuda.synchronize()
            per = cuda_kernel_totals(prof)
            n = stats["rounds"]
            kernels[v.name] = {"kernel_us_per_round": sum(us for _, us in per.values()) / n,
                               "kernels_per_round": sum(c for c, _ in per.values()) / n,
                               "top": [[name[:100], calls / n, us / n] for name, (calls, us)
                                       in sorted(per.items(), key=lambda kv: -kv[1][1])[:args.top]]}
    with mock.patch("specattn.decoding.ar.prefill", lengths_only_prefill):
        ar = generate_ar(model, cache, prompts, params)
        ar_ms = []
        for _ in range(args.repeats):
            a = generate_ar(model, cache, prompts, params, ar.runner).stats
            ar_ms.append((a["total_s"] - a["prefill_s"]) / (args.rounds - 1) * 1e3)
    rows = []
    for v in variants:
        med = {k: statistics.median(t[k] for t in timings[v.name]) for k in ("round_ms", "draft_ms", "verify_ms")}
        rows.append({"method": v.name, "budget": args.budget, **med, "runs": timings[v.name], **kernels[v.name]})
    out = {**environment(), "config": vars(args), "ar_step_ms": statistics.median(ar_ms), "rows": rows}
    write_json_atomic(args.out, out)
    for r in rows:
        print(f"{r['method']:28} round {r['round_ms']:6.2f} ms  draft {r['draft_ms']:6.2f}  "
              f"verify {r['verify_ms']:6.2f}  kernels {r['kernel_us_per_round'] / 1e3:6.2f} ms "
              f"({r['kernels_per_round']:.0f})")
    print(f"AR step {out['ar_step_ms']:.2f} ms")
    for r in rows[:2]:
        print(r["method"], [(name[:40], round(us)) for name, _, us in r["top"]])


if __name__ == "__main__":
    main()
