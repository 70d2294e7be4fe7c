"""What a fixed batch's tail costs: verify and draft steps with only some sequences still generating.

Usage: python benchmarks/tail_cost.py [--shape qwen1.5b] [--batch 64] [--context 32000] [--active 64,16,4,1]
[--methods magicdec,specattn-y/blk64,draft-spec] [--draft-shape qwen0.5b] [--json out.json]

Once most of a fixed batch has its tokens, the finished sequences idle (their attention reads only the new block)
while the slowest ones finish. Each verify step is timed (CUDA graph replays, random weights of the shape, median
of round-robin repeats) with `active` sequences generating, its attention planned for the whole batch (as before
runner.TAIL_PLANS) and for the sequences left (tail_plan), against the full batch's step and its bytes at
copy speed. A sparse draft step at the same activity shows what drafting costs there (idle sequences draft from
one list entry; with TAIL_PLANS off, from their whole lists). `draft-spec` is draft-model speculation's verify step
(the verifier's plain step over the block, StepRunner); --draft-shape adds a draft model's gamma dense steps, with
its own cache, planned for the whole batch and for the sequences left.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    SHAPES,
    context_cache,
    copy_bandwidth_gbs,
    environment,
    median_ms,
    random_model,
    weight_bytes_per_step,
)
from specattn.api import SpeculationParams, make_policy, method_variant  # noqa: E402
from specattn.decoding.runner import (
    StepRunner,  # noqa: E402
    tail_plan,  # noqa: E402
)
from specattn.decoding.sampling import SamplingParams  # noqa: E402
from specattn.decoding.self_speculative import RoundSteps  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.selection import SelectionPolicy  # noqa: E402


def verify_steps(model, cache, method: str, batch: int, gamma: int) -> RoundSteps:
    name, overrides = method_variant(method)
    policy = make_policy(name, SpeculationParams(512, gamma, **overrides), model.cfg.num_layers)
    policy.reset(cache)
    return RoundSteps(model, cache, policy, batch, gamma, SamplingParams())


def draft_step(model, cache, batch: int, budget: int):
    policy = make_policy("magicdec", SpeculationParams(budget, 1), model.cfg.num_layers)
    policy.reset(cache)
    selection = policy.select(cache, 1)
    steps = RoundSteps(model, cache, policy, batch, 1, SamplingParams())
    tok = torch.zeros(batch, dtype=torch.long, device="cuda")
    gen = torch.Generator(device="cuda")
    return lambda: steps.draft(selection, tok, gen)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=tuple(SHAPES), default="qwen1.5b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=32000)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--active", default="64,16,4,1", help="comma-separated counts of sequences still generating")
    ap.add_argument("--methods", default="magicdec,specattn-y/blk64", help="verify steps of these methods")
    ap.add_argument("--draft-budget", type=int, default=1024, help="the draft step's list length (0: no draft)")
    ap.add_argument("--draft-shape", choices=tuple(SHAPES), help="also time a draft model's gamma dense steps")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin repeats; the median is reported")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    copy = copy_bandwidth_gbs()
    cfg = SHAPES[args.shape]
    model = random_model(cfg)
    q_len = args.gamma + 1
    cache = context_cache(cfg, args.batch, args.context, new_tokens=q_len)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, q_len), device="cuda")
    actives = [int(a) for a in args.active.split(",")]
    cases = []      # (label, active, callable)
    for method in args.methods.split(","):
        if method == "draft-spec":
            runner = StepRunner(model, cache)
            verify = lambda active=None, r=runner: r(tokens, active)          # noqa: E731
        else:
            steps = verify_steps(model, cache, method, args.batch, args.gamma)
            verify = lambda active=None, s=steps: s.verify(tokens, active=active)     # noqa: E731
        verify(args.batch)                               # captures every plan's graph
        for a in actives:
            cases.append((f"{method} verify, whole-batch plan", a, verify))
            plan = tail_plan(a, args.batch)
            if plan is not None:
                cases.append((f"{method} verify, plan {plan}", a, lambda v=verify, a=a: v(a)))
    caches = [cache]
    if args.draft_shape:
        draft = random_model(SHAPES[args.draft_shape])
        draft_cache = context_cache(draft.cfg, args.batch, args.context, new_tokens=q_len)
        caches.append(draft_cache)
        dsteps = RoundSteps(draft, draft_cache, SelectionPolicy(), args.batch, args.gamma, SamplingParams(),
                            catch_up=True)
        pairs, gen = torch.zeros(args.batch, 2, dtype=torch.long, device="cuda"), torch.Generator(device="cuda")
        drafting = lambda active=None: dsteps.draft(None, pairs, gen, active)      # noqa: E731
        drafting(args.batch)                             # captures every plan's graph
        label = f"draft model {args.draft_shape}: {args.gamma} dense steps"
        for a in actives:
            cases.append((f"{label}, whole-batch plan", a, drafting))
            plan = tail_plan(a, args.batch)
            if plan is not None:
                cases.append((f"{label}, plan {plan}", a, lambda a=a: drafting(a)))
    if args.draft_budget:
        draft = draft_step(model, cache, args.batch, args.draft_budget)
        cases += [(f"draft step @{args.draft_budget}", a, draft) for a in actives]
    times = [[] for _ in cases]
    for _ in range(args.rounds):
        for t, (_, a, fn) in zip(times, cases, strict=True):
            for c in caches:
                c.mark_idle([i >= a for i in range(args.batch)])
            t.append(median_ms(fn, warmup=3, reps=15) * 1000)
    for c in caches:
        c.mark_idle([False] * args.batch)
    weights = weight_bytes_per_step(model, args.batch)
    rows = []
    print(f"\n{args.shape} b{args.batch} x {args.context}, {q_len}-token verify blocks, median of {args.rounds}")
    for (label, a, _), t in zip(cases, times, strict=True):
        us = sorted(t)[len(t) // 2]
        kv = a * args.context * cfg.kv_bytes_per_token * 2 if "verify" in label else 0
        floor_us = (weights + kv) / copy / 1e3
        rows.append({"step": label, "active": a, "us": us, "us_rounds": t, "bytes_at_copy_speed_us": floor_us})
        print(f"{us:9.0f} us  (bytes at copy speed {floor_us:7.0f})  active {a:3d}  {label}")
    if args.json:
        write_json_atomic(args.json, {**environment(), "copy_bandwidth_gbs": copy, "shape": args.shape,
                                      "batch": args.batch, "context": args.context, "gamma": args.gamma,
                                      "draft_shape": args.draft_shape,
                                      "rows": rows})


if __name__ == "__main__":
    main()
