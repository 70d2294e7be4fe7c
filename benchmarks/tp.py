"""Tensor-parallel decoding on the GPUs of one host, random weights (no checkpoint to carry).

  python benchmarks/tp.py --out $OUT/tp1.json                                # one GPU: the 8B-shaped model
  torchrun --standalone --nproc-per-node 2 benchmarks/tp.py --out $OUT/tp2.json   # TP=2: 8B- and 70B-shaped
  python benchmarks/tp.py --merge $OUT/tp1.json $OUT/tp2.json --out benchmarks/results/tp.json

Per (model, batch, context): the graph-captured dense decode step, tokens/s, the bytes one GPU reads per step
(its weight shard, replicated embeddings/norms/head and its KV heads' cache) against that GPU's measured copy
bandwidth, and the all-reduce share of the step (the same step captured with the all-reduces left out). TP rows
time the step with NCCL's all-reduce (the default) and, with SPECATTN_TP_ALL_REDUCE=one-shot (scripts/gpu_tp.sh
sets it), also with the one-shot kernel over symmetric memory in the same run, checking both give the same logits.
The 8B shape at b1 8K also runs with the output head replicated (as before vocabulary-split heads), and
`--profile` lists that cell's kernels; all its cells also run with the tensor-parallel blocks' unfolded path
(model.TP_FOLDED False: cuBLAS products, norm kernels) for an A/B in the same run (before it became the default,
results/tp_folded_ab.json measured the folded path against it).
For the 70B shape also SpecAttn-Y's round parts: gamma sparse draft steps (selection in the graph) and the
verify step with the page-mass by-product. A cell whose weights + KV do not fit is skipped with its reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import specattn.model  # noqa: E402
from benchmarks.common import (  # noqa: E402
    LLAMA3_8B,
    RESULTS,
    context_cache,
    copy_bandwidth_gbs,
    environment,
    gemv_projections,
    median_ms,
    profile_kernels,
    weight_bytes_per_step,
)
from specattn.api import SpeculationParams, make_policy  # noqa: E402
from specattn.cache import PagedKVCache  # noqa: E402
from specattn.config import ModelConfig  # noqa: E402
from specattn.decoding.runner import StepRunner  # noqa: E402
from specattn.decoding.sampling import SamplingParams  # noqa: E402
from specattn.decoding.self_speculative import RoundSteps  # noqa: E402
from specattn.distributed import init_tensor_parallel, local_config  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.model import Transformer  # noqa: E402

LLAMA3_70B = dataclasses.replace(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64)

CELLS_8B = [(1, 8192), (1, 32768), (16, 8192)]
CELLS_70B = [(1, 8192), (1, 32768), (4, 32768), (16, 8192)]
SPEC_CELLS_70B = [(1, 32768), (16, 8192)]
GAMMA, BUDGET = 4, 512


def sharded_random_model(cfg: ModelConfig, tp, whole_head: bool = False) -> Transformer:
    """This rank's shard of a random model, built in bf16 on its GPU (a 70B shard never exists in fp32).
    whole_head: every rank holds the whole output head (no vocabulary split)."""
    local = local_config(cfg, tp.world) if tp else cfg
    if whole_head:
        local = dataclasses.replace(local, vocab_shards=1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Transformer(local, "auto", "cuda")
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    model.set_tensor_parallel(tp)
    return model.eval()


def filled_cache(model: Transformer, batch: int, ctx: int) -> PagedKVCache:
    return context_cache(model.cfg, batch, ctx, new_tokens=GAMMA + 1, spare=32)


def fits(model: Transformer, batch: int, ctx: int, tp) -> str | None:
    """None if the cache fits this GPU (the smallest free memory over ranks, so all ranks agree), else why not."""
    kv = batch * (ctx + 32) * model.cfg.kv_bytes_per_token * 2
    free = torch.tensor([torch.cuda.mem_get_info()[0]], dtype=torch.float64, device="cuda")
    if tp:
        import torch.distributed as dist
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
    headroom = 8 << 30          # activations, graph pools, logits
    if kv + headroom > free.item():
        return f"KV cache {kv / 2**30:.0f} GiB per GPU + 8 GiB headroom > {free.item() / 2**30:.0f} GiB free"
    return None


def step_runner(model, cache, batch: int):
    """A captured step and its input tokens (the same on every rank)."""
    runner = StepRunner(model, cache)
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, 1), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(batch))
    runner(tokens)
    return lambda: runner(tokens)


def dense_step(model, cache, batch: int) -> float:
    return median_ms(step_runner(model, cache, batch))


def one_shot_vs_nccl(model, cache, batch: int, rounds: int = 3) -> dict:
    """The step captured twice, all-reduces through the one-shot kernel and through NCCL, timed in alternation
    (medians over `rounds` turns each, so drift between the two falls on both) and their logits compared."""
    tp = model.tp
    one_shot = step_runner(model, cache, batch)
    model.set_tensor_parallel(dataclasses.replace(tp, one_shot=None))
    try:
        nccl = step_runner(model, cache, batch)
    finally:
        model.set_tensor_parallel(tp)
    times = {"one-shot": [], "nccl": []}
    for _ in range(rounds):
        times["one-shot"].append(median_ms(one_shot))
        times["nccl"].append(median_ms(nccl))
    diff = (one_shot().clone() - nccl()).abs().max().item()
    middle = {k: sorted(v)[rounds // 2] for k, v in times.items()}
    return {"step_ms_one_shot": middle["one-shot"], "step_ms_nccl": middle["nccl"],
            "one_shot_vs_nccl_max_logit_diff": diff}


def without_all_reduce_ms(model, cache, batch: int) -> float:
    """The same step with every all-reduce left out (each rank alone): what the communication costs. The
    vocabulary-split head still gathers its logits."""
    tp = model.tp
    for block in model.blocks:
        block.all_reduce = lambda x: x
    try:
        return dense_step(model, cache, batch)
    finally:
        model.set_tensor_parallel(tp)


def profile_step(model, cache, batch: int, steps: int = 10, top: int = 16) -> dict:
    """Per-kernel device time of one graph-captured step (torch.profiler; every rank runs it, rank 0 reports)."""
    step = step_runner(model, cache, batch)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    per_kernel = profile_kernels(step, steps)
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])
    return {"kernels": sum(c for c, _ in per_kernel.values()) // steps,
            "kernel_sum_us": sum(us for _, us in per_kernel.values()) / steps,
            "top": [{"kernel": n[:90], "calls": c // steps, "us": u / steps} for n, (c, u) in ranked[:top]]}


def specattn_round(model, cache, batch: int) -> dict:
    """Device time of SpecAttn-Y's draft graph (selection + gamma sparse steps) and of its verify step."""
    policy = make_policy("specattn-y", SpeculationParams(BUDGET, GAMMA), model.cfg.num_layers)
    policy.reset(cache)
    steps = RoundSteps(model, cache, policy, batch, GAMMA, SamplingParams())
    gen = torch.Generator(device="cuda")
    first = torch.randint(0, model.cfg.vocab_size, (batch,), device="cuda")
    block = torch.randint(0, model.cfg.vocab_size, (batch, GAMMA + 1), device="cuda")
    draft_ms = median_ms(lambda: steps.draft_selecting(first, gen), reps=15)
    verify_ms = median_ms(lambda: steps.verify(block), reps=15)
    return {"draft_round_ms": draft_ms, "draft_step_ms": draft_ms / GAMMA, "verify_ms": verify_ms}


def cell(model, name: str, batch: int, ctx: int, tp, copy_gbs: float, spec: bool, profile: bool = False) -> dict:
    world = tp.world if tp else 1
    row = {"model": name, "tp": world, "batch": batch, "context": ctx, "vocab_shards": model.cfg.vocab_shards}
    reason = fits(model, batch, ctx, tp)
    if reason:
        return {**row, "skipped": reason}
    cache = filled_cache(model, batch, ctx)
    ab = one_shot_vs_nccl(model, cache, batch) if tp and tp.one_shot is not None else {}
    ms = ab.get("step_ms_nccl") or dense_step(model, cache, batch)       # the library's default path
    moved = weight_bytes_per_step(model, batch) + batch * ctx * model.cfg.kv_bytes_per_token * 2
    row.update(step_ms=ms, tokens_per_s=batch / ms * 1e3, bytes_per_gpu=moved, gbs_per_gpu=moved / ms / 1e6,
               bandwidth_fraction=moved / ms / 1e6 / copy_gbs)
    if tp:
        row.update(ab, all_reduce="nccl")
        alone = without_all_reduce_ms(model, cache, batch)
        row.update(step_ms_without_all_reduce=alone, all_reduce_share=max(0.0, (ms - alone) / ms))
    if profile:
        row["profile"] = profile_step(model, cache, batch)
    if spec:
        round_ = specattn_round(model, cache, batch)
        row.update(round_, specattn_y={"gamma": GAMMA, "budget": BUDGET, "dense_layers": []},
                   draft_step_over_ar_step=round_["draft_step_ms"] / ms, verify_over_ar_step=round_["verify_ms"] / ms)
    del cache
    return row


# --variants 8b|70b: that shape's batch-1 8K cell only, on the block paths and with the small-step kernels named
# after "@" (model.GEMV_PROJECTIONS; none: cuBLAS for every product)
VARIANTS = {"8b": (LLAMA3_8B, ("llama3-8b", "llama3-8b-unfolded", "llama3-8b@none", "llama3-8b@qkv+rope",
                               "llama3-8b@o+down")),
            "70b": (LLAMA3_70B, ("llama3-70b", "llama3-70b@qkv+rope+o+down", "llama3-70b@none"))}
PROFILED = ("llama3-8b", "llama3-70b")     # with --profile, at batch 1 x 8K


def run(tp, profile: bool = False, only_8b: bool = False, variants: str | None = None) -> dict:
    world = tp.world if tp else 1
    copy = copy_bandwidth_gbs()
    plan = [("llama3-8b", LLAMA3_8B, CELLS_8B, [], False)]
    if tp:
        plan += [("llama3-8b-unfolded", LLAMA3_8B, CELLS_8B, [], False)]
    if tp and not only_8b:
        plan += [("llama3-8b-whole-head", LLAMA3_8B, CELLS_8B[:1], [], True),
                 ("llama3-70b", LLAMA3_70B, CELLS_70B, SPEC_CELLS_70B, False)]
    if tp and variants:
        cfg, names = VARIANTS[variants]
        plan = [(name, cfg, [(1, 8192)], [], False) for name in names]
    rows, folded_default, gemv_default = [], specattn.model.TP_FOLDED, specattn.model.GEMV_PROJECTIONS
    for name, cfg, cells, spec_cells, whole_head in plan:
        # "-unfolded": tensor-parallel blocks on their unfolded path (model.TP_FOLDED False: cuBLAS products and
        # norm kernels), the A/B against the default folded one
        specattn.model.TP_FOLDED = folded_default and not name.endswith("-unfolded")
        gemv = name.split("@")[1] if "@" in name else None
        specattn.model.GEMV_PROJECTIONS = gemv_default if gemv is None else gemv_projections(gemv)
        model = sharded_random_model(cfg, tp, whole_head)
        for batch, ctx in cells:
            row = cell(model, name, batch, ctx, tp, copy, (batch, ctx) in spec_cells,
                       profile and name in PROFILED and (batch, ctx) == (1, 8192))
            rows.append(row)
            if not tp or tp.rank == 0:
                print(json.dumps(row), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    specattn.model.TP_FOLDED, specattn.model.GEMV_PROJECTIONS = folded_default, gemv_default
    return {**environment(), "gpus": world, "copy_gbs_per_gpu": copy, "rows": rows,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if world > 1 else None,
            "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                      "SPECATTN_TP_ALL_REDUCE")}}


def merge(parts: list[dict]) -> dict:
    """One result from the one-GPU and the TP runs: rows of both, and the summary ratios."""
    rows = [r for p in parts for r in p["rows"]]
    ok = [r for r in rows if "skipped" not in r]
    one = {(r["batch"], r["context"]): r for r in ok if r["model"] == "llama3-8b" and r["tp"] == 1}
    two = {(r["batch"], r["context"]): r for r in ok if r["model"] == "llama3-8b" and r["tp"] == 2}
    speedups = {f"b{b}_{c // 1024}k": two[b, c]["tokens_per_s"] / one[b, c]["tokens_per_s"]
                for b, c in sorted(one.keys() & two.keys())}
    nccl = {f"b{b}_{c // 1024}k": one[b, c]["step_ms"] / two[b, c]["step_ms_nccl"]
            for b, c in sorted(one.keys() & two.keys()) if "step_ms_nccl" in two[b, c]}
    unfolded = {(r["batch"], r["context"]): r for r in ok if r["model"] == "llama3-8b-unfolded"}
    unfolded_speedups = {f"b{b}_{c // 1024}k": unfolded[b, c]["tokens_per_s"] / one[b, c]["tokens_per_s"]
                         for b, c in sorted(one.keys() & unfolded.keys())}
    big = [r for r in ok if r["model"] == "llama3-70b"]
    summary = {
        "tp2_ar_bandwidth_fraction": min((r["bandwidth_fraction"] for r in big), default=None),
        "tp2_ar_bandwidth_fraction_by_cell": {f"b{r['batch']}_{r['context'] // 1024}k": r["bandwidth_fraction"]
                                              for r in big},
        "tp2_over_tp1_8b": min(speedups.values(), default=None),
        "tp2_over_tp1_8b_by_cell": speedups,
        "tp2_over_tp1_8b_nccl_all_reduce_by_cell": nccl,
        "tp2_unfolded_over_tp1_8b_by_cell": unfolded_speedups,
        "all_reduce_share_70b_by_cell": {f"b{r['batch']}_{r['context'] // 1024}k": r["all_reduce_share"]
                                         for r in big},
        "note": "tp2_ar_bandwidth_fraction and tp2_over_tp1_8b are minima over the cells",
    }
    head = {k: v for k, v in parts[-1].items() if k != "rows"}
    return {**head, "copy_gbs_per_gpu": {p["gpus"]: p["copy_gbs_per_gpu"] for p in parts}, "rows": rows,
            "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "tp.json"))
    ap.add_argument("--merge", nargs="+", help="combine the JSON of a one-GPU and a TP run")
    ap.add_argument("--profile", action="store_true", help="kernel lists of the b1 8K steps of PROFILED")
    ap.add_argument("--only-8b", action="store_true", help="TP: the 8B shape's cells only (both block paths), "
                    "no whole-head or 70B rows: a short A/B run")
    ap.add_argument("--variants", choices=tuple(VARIANTS), help="TP: only that shape's batch-1 8K cell, with the "
                    "block path and small-step kernel variants of VARIANTS")
    args = ap.parse_args()
    if args.merge:
        result = merge([json.loads(Path(p).read_text()) for p in args.merge])
        write_json_atomic(args.out, result)
        print(json.dumps(result["summary"], indent=1))
        return
    tp = init_tensor_parallel()
    result = run(tp, args.profile, args.only_8b, args.variants)
    if not tp or tp.rank == 0:
        write_json_atomic(args.out, result)
    if tp:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
