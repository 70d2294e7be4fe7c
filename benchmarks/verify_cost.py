"""Where a verify step's attention time goes at one shape (default: Qwen2.5-Coder-1.5B, batch 64 x 32K, the cell
where SpecAttn-Y's verify costs 1.14x an AR step): one layer's paged attention for 1 query row (AR's decode) and
for gamma + 1 rows, each plain, with page mass and with 64-key block mass (SpecAttn-Y/blk64's by-product);
optionally with fewer warps a program (--warps). No model files. Device time from CUDA graphs, as
benchmarks/kernels.py; --kernels adds each variant's device time per kernel (split attention, split merge, mass
finishing) from torch.profiler, to tell a by-product's in-loop cost from its extra launch. Writes JSON (--out)."""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, copy_bandwidth_gbs, environment, profile_kernels  # noqa: E402
from benchmarks.kernels import kv_pools, time_attention  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import paged_attention, pdl  # noqa: E402

BLOCK64 = {"page_mass": True, "mass_tokens": 64}
# name -> (paged_attention keywords, paged_attention module flags set for the call). block64_uncapped: block mass over
# 32-key tiles of 64-row blocks without the 128-register cap (the same as block64_mass elsewhere).
# Exact page mass by the page one-hot's tensor-core product, by sums inside warps
# (paged_attention.PAGE_SUMS_BY_WARP), or summed as block mass is (a masked row sum a page), whatever
# paged_attention.exact_mass_by_blocks would pick (page_mass: the library's choice).
ONE_HOT_FLAGS = {"BLOCK_PATH_MIN_PAGE": 1 << 30, "BLOCK_PATH_MAX_HEAD_DIM": 0, "PAGE_SUMS_BY_WARP": False}
WARP_SUMS_FLAGS = {**ONE_HOT_FLAGS, "PAGE_SUMS_BY_WARP": True}
BLOCK_PATH_FLAGS = {"BLOCK_PATH_MIN_PAGE": 1}
VARIANTS = {"plain": ({}, {}), "page_mass": ({"page_mass": True}, {}), "block64_mass": (BLOCK64, {}),
            "page_mass_one_hot": ({"page_mass": True}, ONE_HOT_FLAGS),
            "page_mass_warp_sums": ({"page_mass": True}, WARP_SUMS_FLAGS),
            "page_mass_warp_sums_stored": ({"page_mass": True}, {**WARP_SUMS_FLAGS, "DEFER_PAGE_MASS_MAX_BLOCK_N": 0}),
            "block64_uncapped": (BLOCK64, {"WIDE_BLOCK_MASS_REGISTER_CAP": None}),
            "page_mass_block_path": ({"page_mass": True}, BLOCK_PATH_FLAGS),
            "block64_finished_per_page": (BLOCK64, {"MASS_FINISH_BY_BLOCK": False})}


def time_variant(q, pools, table, lens, kw: dict, flags: dict) -> float:
    return time_variant_flags(flags, lambda: time_attention(q, pools, table, lens, **kw))


def kernel_us(q, pools, table, lens, kw: dict, flags: dict, calls: int = 20) -> dict[str, float]:
    """Device µs per call of each kernel one attention call launches (names shortened to the Triton function)."""
    scale = q.shape[-1] ** -0.5

    def run():
        for k, v in pools:
            paged_attention.paged_attention(q, k, v, table, lens, scale, **kw)
    time_variant_flags(flags, run)                      # warm-up: compile outside the profile
    totals = time_variant_flags(flags, lambda: profile_kernels(run, calls))
    return {name.split("_kernel")[0].lstrip("_") + "_kernel": us / (calls * len(pools))
            for name, (_, us) in totals.items()}


def time_variant_flags(flags: dict, fn):
    """fn() with paged_attention's module flags set as `flags` says, restored after."""
    saved = {name: getattr(paged_attention, name) for name in flags}
    try:
        for name, value in flags.items():
            setattr(paged_attention, name, value)
        return fn()
    finally:
        for name, value in saved.items():
            setattr(paged_attention, name, value)


def launch_with_warps(batch: int, kv_heads: int, dim: int, warps: str) -> dict:
    """paged_attention's keyword for `warps`: 'auto' is the library's own launch; 'W' or 'W/N' its launch with W
    warps a program (fewer warps split a tile's keys among fewer warps, so row reductions need fewer barriers; more
    hold a 64-row tile's accumulator in fewer registers each) and N keys a tile."""
    if warps == "auto":
        return {}
    n_warps, _, block_n = warps.partition("/")
    launch = dataclasses.replace(paged_attention.choose_launch(batch * kv_heads, dim), num_warps=int(n_warps))
    if block_n:
        launch = dataclasses.replace(launch, block_n=int(block_n))
    return {"launch": launch}


def shape_rows(batch: int, ctx: int, kv_heads: int, group: int, dim: int, q_lens: list[int], copy: float,
               warps_options: list[str], by_kernel: bool = False) -> list:
    pools, table, lens, kv_bytes = kv_pools(batch, ctx, kv_heads, dim)
    rows = []
    for q_len, warps in itertools.product(q_lens, warps_options):
        q = torch.randn(batch, q_len, kv_heads * group, dim, device="cuda", dtype=torch.bfloat16)
        launch = launch_with_warps(batch, kv_heads, dim, warps)
        diff = mass_diff = 0.0
        if launch:          # the library's own launch against this one: same outputs, same block mass?
            k, v = pools[0]
            scale = dim ** -0.5
            auto_out = paged_attention.paged_attention(q, k, v, table, lens, scale)
            out = paged_attention.paged_attention(q, k, v, table, lens, scale, **launch)
            diff = (out.float() - auto_out.float()).abs().max().item()
            if q_len > 1:
                _, auto_mass = paged_attention.paged_attention(q, k, v, table, lens, scale, **BLOCK64)
                _, mass = paged_attention.paged_attention(q, k, v, table, lens, scale, **BLOCK64, **launch)
                mass_diff = (mass - auto_mass).abs().max().item()
        page_diff = 0.0
        if q_len > 1:       # the two ways to exact page mass agree (the block path's sums are exact, not spread)
            k, v = pools[0]
            one_hot, by_blocks = (time_variant_flags(flags, lambda: paged_attention.paged_attention(
                q, k, v, table, lens, dim ** -0.5, page_mass=True)[1]) for flags in (ONE_HOT_FLAGS, BLOCK_PATH_FLAGS))
            page_diff = (by_blocks - one_hot).abs().max().item()
        variants = VARIANTS if q_len > 1 else {"plain": VARIANTS["plain"]}
        times = {name: time_variant(q, pools, table, lens, {**kw, **launch}, flags)
                 for name, (kw, flags) in variants.items()}
        row = {"batch": batch, "context": ctx, "kv_heads": kv_heads, "group": group, "head_dim": dim,
               "q_len": q_len, "num_warps": warps, "kv_gb": kv_bytes / 1e9, "max_abs_diff_vs_auto": diff,
               "max_block_mass_diff_vs_auto": mass_diff, "max_page_mass_diff_block_path": page_diff,
               **{f"us_{n}": t * 1e3 for n, t in times.items()},
               "bandwidth_fraction_plain": kv_bytes / times["plain"] / 1e6 / copy,
               **{f"{n}_overhead": times[n] / times["plain"] - 1 for n in times if n != "plain"}}
        if by_kernel:
            row["kernel_us"] = {name: kernel_us(q, pools, table, lens, {**kw, **launch}, flags)
                                for name, (kw, flags) in variants.items()}
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cells", default="64x32000,32x32000", help="batch x context, comma-separated")
    ap.add_argument("--heads", default="2,6,128", help="KV heads, query heads per KV head, head dim (Qwen 1.5B)")
    ap.add_argument("--q-lens", default="1,5,7")
    ap.add_argument("--warps", default="auto",
                    help="launches: auto (the library's) and/or W or W/N (W warps a program, N keys a tile)")
    ap.add_argument("--kernels", action="store_true", help="also each variant's device time per kernel (profiler)")
    ap.add_argument("--out", default=str(RESULTS / "verify_cost.json"))
    args = ap.parse_args()
    pdl.MODE = 0                 # one kernel timed alone, as kernels.py
    kv_heads, group, dim = (int(x) for x in args.heads.split(","))
    q_lens = [int(x) for x in args.q_lens.split(",")]
    copy = copy_bandwidth_gbs()
    rows = []
    for cell in args.cells.split(","):
        batch, ctx = (int(x) for x in cell.split("x"))
        rows += shape_rows(batch, ctx, kv_heads, group, dim, q_lens, copy, args.warps.split(","), args.kernels)
        torch.cuda.empty_cache()
    write_json_atomic(args.out, {**environment(), "copy_gbs": copy, "rows": rows})
    print(f"{'cell':>10} {'rows':>4} {'warps':>5} {'plain us':>9} {'of copy':>7} {'+page':>7} {'+blk64':>7} "
          f"{'+uncapped':>7} {'+one-hot':>8} {'+warp':>7} {'+stored':>7} {'+page blk':>9}")
    for r in rows:
        print(f"{r['batch']:>3}x{r['context']:<6} {r['q_len']:>4} {r['num_warps']:>5} {r['us_plain']:>9.1f} "
              f"{r['bandwidth_fraction_plain']:>7.3f} {r.get('page_mass_overhead', 0):>+7.1%} "
              f"{r.get('block64_mass_overhead', 0):>+7.1%} {r.get('block64_uncapped_overhead', 0):>+7.1%} "
              f"{r.get('page_mass_one_hot_overhead', 0):>+8.1%} {r.get('page_mass_warp_sums_overhead', 0):>+7.1%} "
              f"{r.get('page_mass_warp_sums_stored_overhead', 0):>+7.1%} "
              f"{r.get('page_mass_block_path_overhead', 0):>+9.1%}")
        for variant, kernels in r.get("kernel_us", {}).items():
            print(f"    {variant:>16}: " + ", ".join(f"{k} {us:.1f} us" for k, us in kernels.items()))


if __name__ == "__main__":
    main()
