"""GPU check of kernels.draft_step (a sparse draft step's blocks in one persistent launch, grid barriers between
phases) against the model's own blocks, before any timing: CPU CI runs its phases one launch each, so the barrier
is checked only here.

Usage: python benchmarks/draft_kernel_check.py [--shape smol] [--batches 64,32,8] [--context 8192] [--repeats 50]
[--out F]. Per batch: a random model of the shape (bf16, norms folded, row-major weights), a cache of random K/V,
MagicDec's page lists at a 512-token budget; one eager draft step through the blocks, then through the kernel:
logits' relative error, argmax agreement, the new K/V; then the kernel `repeats` more times, each output compared
bit for bit with its first (a missed barrier would show as a difference somewhere).
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHAPES, context_cache, environment, graph_ms, random_model  # noqa: E402
from specattn.api import SpeculationParams, make_policy  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import draft_step  # noqa: E402


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def draft_case(shape: str, batch: int, context: int, budget: int):
    """(a random model of the shape, norms folded; a cache of `context` random tokens with room for one more;
    MagicDec's page lists at `budget` tokens)."""
    model = random_model(SHAPES[shape])
    model.fold_norms()
    cache = context_cache(model.cfg, batch, context)
    policy = make_policy("magicdec", SpeculationParams(budget, 1), model.cfg.num_layers)
    policy.reset(cache)
    return model, cache, policy.select(cache, 1)


def check(shape: str, batch: int, context: int, budget: int, repeats: int) -> dict:
    model, cache, selection = draft_case(shape, batch, context, budget)
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, 1), device="cuda")

    def step(use_kernel: bool):
        view = cache.step_view(1, static=True)
        view.selection = selection
        model.draft_step_kernel = use_kernel
        logits = model(tokens, cache, view)
        slots = view.slots
        new_kv = torch.stack([cache.k.flatten(1, 2)[:, slots], cache.v.flatten(1, 2)[:, slots]])
        return logits, new_kv, view

    ref, ref_kv, view = step(False)
    reason = draft_step.unsupported(model, view, model.embed.weight, cache)
    if reason:
        raise SystemExit(f"the kernel does not take this step: {reason}")
    counter = torch.zeros(2, dtype=torch.int32, device="cuda")
    blocks = draft_step.draft_blocks
    draft_step.draft_blocks = functools.partial(blocks, counter=counter)   # to read the barrier's flag
    timed_out = 0
    try:
        got, got_kv, _ = step(True)
        timed_out += counter[1].item()
        same_after = []
        for _ in range(repeats):
            again, again_kv, _ = step(True)
            same_after.append(torch.equal(again, got) and torch.equal(again_kv, got_kv))
            timed_out += counter[1].item()
    finally:
        draft_step.draft_blocks = blocks
    torch.cuda.synchronize()
    row = {"shape": shape, "batch": batch, "context": context, "budget": budget,
           "logits_relative_error": relative_error(got, ref),
           "argmax_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
           "new_kv_relative_error": relative_error(got_kv, ref_kv),
           "repeats_identical": sum(same_after), "repeats": repeats, "barrier_timeouts": timed_out,
           "splits": draft_step.choose_splits(batch * model.cfg.num_kv_heads,
                                              torch.cuda.get_device_properties(0).multi_processor_count)}
    print(f"{shape} b{batch} x {context}: logits rel err {row['logits_relative_error']:.2e}, argmax agree "
          f"{row['argmax_agreement']:.3f}, new K/V rel err {row['new_kv_relative_error']:.2e}, "
          f"repeats identical {row['repeats_identical']}/{repeats}, barrier timeouts {timed_out}, splits "
          f"{row['splits']}", flush=True)
    return row


def sweep(shape: str, batch: int, context: int, budget: int, variants: list[str], phases: bool = False) -> list[dict]:
    """The blocks alone (kernels.draft_step.draft_blocks, every layer), each tiling variant timed as 20 launches in
    one CUDA graph, round-robin over three rounds (median)."""
    model, cache, selection = draft_case(shape, batch, context, budget)
    view = cache.step_view(1, static=True)
    view.selection = selection
    x = torch.randn(batch, model.cfg.hidden_size, dtype=torch.bfloat16, device="cuda") * 0.02
    cos = torch.ones(batch, 1, 1, model.cfg.head_dim, dtype=torch.bfloat16, device="cuda")
    sin = torch.zeros_like(cos)
    calls = {v: functools.partial(draft_step.draft_blocks, model, x, cos, sin, cache, view, tiling=parse_tiling(v))
             for v in variants}
    if phases:       # the first tiling's parts: one layer's phases alone, one layer with barriers, all layers
        t = parse_tiling(variants[0])
        calls = {f"{variants[0]} phase {p} x {n} layers": functools.partial(
            draft_step.draft_blocks, model, x, cos, sin, cache, view, tiling=t, only=(p, n))
            for p, n in ((1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (0, 1), (0, model.cfg.num_layers))}
    times = {v: [] for v in calls}
    for _ in range(3):
        for v, fn in calls.items():
            times[v].append(graph_ms(fn) * 1000)
    rows = []
    for v, t in times.items():
        us = sorted(t)[1]
        rows.append({"shape": shape, "batch": batch, "context": context, "budget": budget, "variant": v,
                     "blocks_us": us, "rounds_us": t})
        print(f"sweep {shape} b{batch}: {v or 'default':50s} {us:8.1f} us (rounds {min(t):.1f}-{max(t):.1f})",
              flush=True)
    return rows


def parse_tiling(spec: str) -> draft_step.DraftTiling:
    """'splits=2;block_m=32' -> DraftTiling with those fields ('' : the default)."""
    fields = dict(kv.split("=") for kv in spec.split(";") if kv)
    return draft_step.DraftTiling(**{k: int(v) for k, v in fields.items()})


SWEEP = ["", "splits=2", "splits=4", "block_m=32", "block_i=8", "block_o=32;block_d=32", "block_keys=128",
         "num_warps=4", "num_stages=3"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smol", choices=tuple(SHAPES))
    ap.add_argument("--batches", default="64,32,8")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--sweep", nargs="?", const="|".join(SWEEP), help="after the checks, time the blocks alone per "
                    "tiling ('|'-separated variants, each ';'-separated DraftTiling fields; bare: a built-in list)")
    ap.add_argument("--phases", action="store_true", help="time the first --sweep tiling's phases instead")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = [check(args.shape, int(b), args.context, args.budget, args.repeats) for b in args.batches.split(",")]
    if args.sweep:
        rows += [r for b in args.batches.split(",")
                 for r in sweep(args.shape, int(b), args.context, args.budget, args.sweep.split("|"), args.phases)]
    if args.out:
        write_json_atomic(args.out, {**environment(), "rows": rows})


if __name__ == "__main__":
    main()
