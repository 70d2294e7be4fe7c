"""Where one decode step's device time goes, per kernel (torch.profiler), on a random model.

Usage: python benchmarks/profile_step.py [--shape 8b|smol|qwen0.5b|qwen1.5b] [--batch 1] [--context 8192]
[--draft-budget N] [--compile-modes default,max-autotune-no-cudagraphs] [--json out.json]
Prints the step's replay time (CUDA graph), its kernel count and sum, and kernel name, calls and microseconds
per step, biggest first, against the step's weight + KV bytes at copy speed. --draft-budget profiles a sparse
draft step (sinks + window selection of N tokens per KV head, layer 0 dense) instead of a dense decode step;
--verify magicdec,specattn-y/blk64 --q-len 5 profiles those methods' verify steps (page-mass by-product included).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import specattn.kernels.pdl  # noqa: E402
import specattn.model  # noqa: E402
from benchmarks.common import (  # noqa: E402
    SHAPES,
    context_cache,
    copy_bandwidth_gbs,
    environment,
    gemv_projections,
    median_ms,
    profile_kernels,
    random_model,
    weight_bytes_per_step,
)
from specattn.api import SpeculationParams, make_policy, method_variant  # noqa: E402
from specattn.decoding.runner import StepRunner  # noqa: E402
from specattn.decoding.sampling import SamplingParams  # noqa: E402
from specattn.decoding.self_speculative import RoundSteps  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import paged_attention  # noqa: E402


def step_fn(model, cache, batch: int, draft_budget: int | None, q_len: int = 1, verify: str | None = None,
            physical_lists: bool = False):
    """A callable running one step (a graph replay), and the KV tokens per sequence it reads. verify: the verify
    step of that self-speculation method (q_len = gamma + 1), page-mass by-product and all. physical_lists: the
    draft's page lists also come as physical pages (selection.PHYSICAL_LISTS)."""
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, q_len), device="cuda")
    if verify is not None:
        method, overrides = method_variant(verify)
        spec = SpeculationParams(512, q_len - 1, **overrides)
        policy = make_policy(method, spec, model.cfg.num_layers)
        policy.reset(cache)
        steps = RoundSteps(model, cache, policy, batch, q_len - 1, SamplingParams())
        return (lambda: steps.verify(tokens)), cache.host_lens()[0]
    if draft_budget is None:
        runner = StepRunner(model, cache)
        return (lambda: runner(tokens)), cache.host_lens()[0]
    policy = make_policy("magicdec", SpeculationParams(draft_budget, 1), model.cfg.num_layers)
    policy.reset(cache)
    selection = policy.select(cache, 1)
    if physical_lists:
        selection.physical = paged_attention.physical_pages(cache.page_table, selection.pages)
    steps = RoundSteps(model, cache, policy, batch, 1, SamplingParams())
    gen = torch.Generator(device="cuda")
    dense = 1 / model.cfg.num_layers
    kv_tokens = dense * cache.host_lens()[0] + (1 - dense) * draft_budget
    return (lambda: steps.draft(selection, tokens[:, 0], gen)), kv_tokens


def profile(shape: str, batch: int, context: int, draft_budget: int | None, steps: int, copy: float,
            column_major: bool, q_len: int, top: int, compile_mode: str | None = None,
            verify: str | None = None, fold: bool = True, pdl: int = 2,
            gemv: tuple[str, ...] = specattn.model.GEMV_PROJECTIONS,
            few_programs: str = "default", gemv_rows: int = specattn.model.GEMV_MAX_ROWS,
            early_pages: int = paged_attention.EARLY_PAGES,
            sparse_max_splits: int | None = paged_attention.SPARSE_SMALL_HEADS_MAX_SPLITS,
            sparse_full_wave: bool = False, mass_per_step: bool = True,
            draft_kernel: bool = False, physical_lists: bool = False) -> tuple[dict, object]:
    """(the row, the step callable: its model and graph stay alive for --rounds)."""
    import torch._dynamo

    specattn.model.COLUMN_MAJOR_WEIGHTS = column_major
    specattn.model.FOLD_NORMS = fold
    specattn.kernels.pdl.MODE = pdl
    specattn.model.GEMV_PROJECTIONS = gemv
    paged_attention.FEW_PROGRAMS = launch_config(few_programs)
    specattn.model.GEMV_MAX_ROWS = gemv_rows
    paged_attention.EARLY_PAGES = early_pages
    paged_attention.SPARSE_SMALL_HEADS_MAX_SPLITS = sparse_max_splits
    paged_attention.SPARSE_SMALL_HEADS_FULL_WAVE = paged_attention.FULL_WAVE_CANDIDATE if sparse_full_wave else None
    paged_attention.FINISH_MASS_PER_STEP = mass_per_step
    specattn.model.STEP_COMPILE_MODE = compile_mode
    torch._dynamo.reset()             # each variant compiles the step functions afresh
    model = random_model(SHAPES[shape])
    model.draft_step_kernel = draft_kernel
    cache = context_cache(model.cfg, batch, context, new_tokens=q_len)
    fn, kv_tokens = step_fn(model, cache, batch, draft_budget, q_len, verify, physical_lists)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    replay_us = median_ms(fn) * 1000       # one graph launch per call: host overhead is small
    per_kernel = profile_kernels(fn, steps)
    total = sum(us for _, us in per_kernel.values()) / steps
    count = sum(c for c, _ in per_kernel.values()) // steps
    moved = weight_bytes_per_step(model, batch) + batch * kv_tokens * model.cfg.kv_bytes_per_token * 2
    what = "dense step" if draft_budget is None else f"draft step @{draft_budget}"
    what += f", q_len {q_len}" if q_len > 1 else ""
    what += ", weights column-major" if column_major else ", weights row-major"
    what += "" if fold else ", norms not folded"
    what += f", PDL mode {pdl}"
    what += f", gemv {'+'.join(gemv) or 'none'}"
    what += "" if few_programs == "default" else f", attention {few_programs}"
    what += f", gemv up to {gemv_rows} rows"
    what += f", attention early reads {early_pages}"
    what += f", sparse splits <= {sparse_max_splits}" if sparse_max_splits else ""
    what += ", full-wave sparse launch" if sparse_full_wave else ""
    what += ", blocks in one launch (kernels.draft_step)" if draft_kernel else ""
    what += ", physical page lists" if physical_lists else ""
    what += f", compiled {compile_mode}" if compile_mode else ""
    what += f", {verify} verify" if verify else ""
    what += "" if mass_per_step or not verify else ", page mass finished once a layer"
    print(f"\n== {shape} b{batch} ctx{context} {what}: replay {replay_us:.0f} us, {count} kernels summing "
          f"{total:.0f} us; bytes at copy speed {moved / copy / 1e3:.0f} us")
    top_kernels = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:top]
    for name, (calls, us) in top_kernels:
        print(f"{us / steps:9.1f} us {calls // steps:5d}x  {name[:100]}")
    row = {"shape": shape, "verify": verify, "folded_norms": fold, "pdl": pdl, "gemv": list(gemv),
           "attention_few_programs": few_programs, "gemv_max_rows": gemv_rows, "early_pages": early_pages,
           "sparse_max_splits": sparse_max_splits, "sparse_full_wave": sparse_full_wave,
           "mass_finished_per_step": mass_per_step, "draft_kernel": draft_kernel, "physical_lists": physical_lists,
           "batch": batch, "context": context,
           "draft_budget": draft_budget, "q_len": q_len,
           "compile_mode": compile_mode or "default", "replay_us": replay_us, "kernels": count,
           "kernel_sum_us": total, "bytes_at_copy_speed_us": moved / copy / 1e3,
           "top": [{"kernel": n[:100], "calls": c // steps, "us": u / steps} for n, (c, u) in top_kernels]}
    return row, fn


DEFAULT_FEW_PROGRAMS = paged_attention.FEW_PROGRAMS


def launch_config(spec: str) -> paged_attention.LaunchConfig:
    """'default' or block_n:num_warps:num_stages:split_factor -> the attention launch for few (sequence, KV head)
    programs (batch 1-3 of 8 KV heads: the 8B shape's decode)."""
    if spec == "default":
        return DEFAULT_FEW_PROGRAMS
    block_n, warps, stages, factor = spec.split(":")
    return paged_attention.LaunchConfig(int(block_n), int(warps), int(stages), float(factor))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=tuple(SHAPES), default="8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--draft-budget", type=int)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--row-major", action="store_true", help="keep projection weights row-major (as loaded)")
    ap.add_argument("--q-len", type=int, default=1, help="new tokens per sequence of a dense step (verify: gamma+1)")
    ap.add_argument("--top", type=int, default=18, help="kernels listed")
    ap.add_argument("--compile-modes", default="default", help="comma-separated step compile modes, profiled one "
                    "after the other in this run: default, max-autotune-no-cudagraphs")
    ap.add_argument("--verify", help="comma-separated self-speculation methods whose verify step (q_len = gamma + 1, "
                    "page mass included) to profile one after the other, e.g. magicdec,specattn-y/blk64")
    ap.add_argument("--folds", default="on", help="comma-separated: on (norm weights folded into the projections, "
                    "the default), off (a norm kernel before each), profiled one after the other")
    ap.add_argument("--pdl", default=str(specattn.kernels.pdl.MODE), help="comma-separated pdl.MODE values (0 off, "
                    "1 successor launched after the wait, 2 before it); inside each --folds")
    ap.add_argument("--gemv", default="+".join(specattn.model.GEMV_PROJECTIONS),
                    help="comma-separated sets of projections computed by kernels.gemv in small steps, each "
                    "'+'-joined or 'none' (e.g. qkv+o+down,none); inside each --pdl")
    ap.add_argument("--attn-few", default="default", help="comma-separated attention launches for few programs "
                    "(paged_attention.FEW_PROGRAMS), each 'default' or block_n:warps:stages:split_factor; inside each "
                    "--gemv")
    ap.add_argument("--gemv-rows", default=str(specattn.model.GEMV_MAX_ROWS), help="comma-separated "
                    "model.GEMV_MAX_ROWS values: steps of up to that many rows use the --gemv kernels (above "
                    "gemv.MAX_ROWS on tensor cores); inside each --attn-few")
    ap.add_argument("--early-pages", default=str(paged_attention.EARLY_PAGES),
                    help="comma-separated paged_attention.EARLY_PAGES values: what attention reads or prefetches "
                    "before the PDL wait (0 nothing, 1 lengths + first pages into L1); inside "
                    "each --gemv-rows")
    ap.add_argument("--sparse-max-splits", default="auto", help="comma-separated paged_attention."
                    "SPARSE_SMALL_HEADS_MAX_SPLITS values for sparse draft attention with head_dim <= 64: auto or a "
                    "number (1: no merge launch); inside each --early-pages")
    ap.add_argument("--sparse-full-wave", default="off", help="comma-separated on/off: paged_attention."
                    "SPARSE_SMALL_HEADS_FULL_WAVE (one split of wide tiles when the pairs fill the SMs) or None; "
                    "inside each --sparse-max-splits")
    ap.add_argument("--rounds", type=int, default=1, help="after profiling every variant, time them all again this "
                    "many times round-robin and report the median: variants compared within a round, not one after "
                    "the other (a variant timed later in a process measured up to 3%% slower)")
    ap.add_argument("--mass-finish", default="step", help="comma-separated step/layer: a verify step's page mass "
                    "finished by one launch after the last layer (paged_attention.StepMass) or one launch a layer")
    ap.add_argument("--draft-kernel", default="off", help="comma-separated on/off: a sparse draft step's blocks as "
                    "kernels.draft_step's one persistent launch; inside each --sparse-full-wave")
    ap.add_argument("--physical-lists", default="off", help="comma-separated on/off: a draft step's page lists also "
                    "as physical pages (selection.PHYSICAL_LISTS), so K's address waits on one load, not two")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    copy = copy_bandwidth_gbs()
    variants = [(f == "on", int(p), gemv_projections(g), a, int(r), int(e), None if m == "auto" else int(m), w == "on",
                 d == "on")
                for f in args.folds.split(",") for p in args.pdl.split(",") for g in args.gemv.split(",")
                for a in args.attn_few.split(",") for r in args.gemv_rows.split(",")
                for e in args.early_pages.split(",") for m in args.sparse_max_splits.split(",")
                for w in args.sparse_full_wave.split(",") for d in args.draft_kernel.split(",")]
    if args.verify:
        rows = [profile(args.shape, args.batch, args.context, None, args.steps, copy, not args.row_major,
                        args.q_len, args.top, None if mode == "default" else mode, verify=method, fold=fold, pdl=pdl,
                        gemv=gemv, few_programs=a, gemv_rows=r, early_pages=e, sparse_max_splits=m,
                        sparse_full_wave=w, mass_per_step=per_step == "step")
                for mode in args.compile_modes.split(",") for method in args.verify.split(",")
                for per_step in args.mass_finish.split(",") for fold, pdl, gemv, a, r, e, m, w, _ in variants]
    else:
        rows = [profile(args.shape, args.batch, args.context, args.draft_budget, args.steps, copy,
                        not args.row_major, args.q_len, args.top, None if mode == "default" else mode,
                        fold=fold, pdl=pdl, gemv=gemv, few_programs=a, gemv_rows=r, early_pages=e,
                        sparse_max_splits=m, sparse_full_wave=w, draft_kernel=d, physical_lists=phys == "on")
                for mode in args.compile_modes.split(",") for fold, pdl, gemv, a, r, e, m, w, d in variants
                for phys in args.physical_lists.split(",")]
    rows = interleaved(rows, args.rounds)
    if args.json:
        write_json_atomic(args.json, {**environment(), "copy_bandwidth_gbs": copy, "rows": rows})


def interleaved(built: list[tuple[dict, object]], rounds: int) -> list[dict]:
    """Rows with replay_us re-timed `rounds` times round-robin over the variants (median), when rounds > 1."""
    rows = [row for row, _ in built]
    if rounds > 1:
        times = [[] for _ in built]
        for _ in range(rounds):
            for t, (_, fn) in zip(times, built, strict=True):
                t.append(median_ms(fn) * 1000)
        print("\nround-robin medians of", rounds)
        for row, t in zip(rows, times, strict=True):
            row["replay_us_first"], row["replay_us_rounds"] = row["replay_us"], t
            row["replay_us"] = sorted(t)[len(t) // 2]
            print(f"{row['replay_us']:8.0f} us (first {row['replay_us_first']:.0f}, rounds {min(t):.0f}-{max(t):.0f})"
                  f"  fold {row['folded_norms']} pdl {row['pdl']} gemv {'+'.join(row['gemv']) or 'none'}"
                  f" attention {row['attention_few_programs']} rows {row['gemv_max_rows']}"
                  f" early pages {row['early_pages']} sparse splits <= {row['sparse_max_splits'] or 'auto'}"
                  f" verify {row['verify']} mass per step {row['mass_finished_per_step']}"
                  f" compile {row['compile_mode']} draft kernel {row['draft_kernel']}"
                  f" physical lists {row.get('physical_lists', False)}")
    return rows


if __name__ == "__main__":
    main()
