"""Page mass on the GPU against the fp32 reference, for every way the kernel sums it: page sums by warp (fp16 and fp32
rows), the page one-hot, the block path; dense (verify) and over page lists (SpecAttn-S's draft layers), for the
head shapes the benchmarks use. CPU CI checks the same paths in Triton's interpreter, which does not run the GPU's
layouts; this is the check that the compiled kernels agree. No model files. Writes JSON (--out).

Usage (GPU): python benchmarks/page_mass_check.py [--out results/page_mass_check.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment  # noqa: E402
from benchmarks.verify_cost import ONE_HOT_FLAGS, WARP_SUMS_FLAGS, time_variant_flags  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import paged_attention, reference  # noqa: E402

# (name, KV heads, query heads per KV head, head dim)
HEADS = [("llama3-8b", 8, 4, 128), ("qwen2.5-1.5b", 2, 6, 128), ("qwen2.5-0.5b", 2, 7, 64), ("smollm2-135m", 3, 3, 64)]
WAYS = {"warp_fp16": {**WARP_SUMS_FLAGS, "PAGE_SUMS_HALF": True},
        "warp_fp32": {**WARP_SUMS_FLAGS, "PAGE_SUMS_HALF": False},
        "one_hot": ONE_HOT_FLAGS,
        "library": {}}
TOLERANCE = 2e-3      # of the largest page's mass (bf16 inputs; fp16 sums keep ~3 digits)


def inputs(batch: int, ctx: int, kv_heads: int, group: int, dim: int, q_len: int, page: int = 16,
           device: str = "cuda"):
    pages = -(-ctx // page) + 1
    k = torch.randn(batch * pages, page, kv_heads, dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = torch.randperm(batch * pages, device=device).view(batch, pages).int()
    lens = torch.tensor([ctx - (ctx // (4 * batch)) * i for i in range(batch)], device=device, dtype=torch.int32)
    q = torch.randn(batch, q_len, kv_heads * group, dim, device=device, dtype=torch.bfloat16)
    keep = max(2, pages // 5)      # a fifth of the pages, per (sequence, KV head), always the last one

    def page_list(n: int) -> torch.Tensor:
        last = (n - 1) // page
        return torch.cat([torch.randperm(last)[:keep - 1].sort().values, torch.tensor([last])])
    sel = torch.stack([torch.stack([page_list(n) for _ in range(kv_heads)]) for n in lens.tolist()])
    counts = torch.full((batch, kv_heads), keep, device=device, dtype=torch.int32)
    return q, k, v, table, lens, sel.int().to(device), counts


def check(batch: int, ctx: int, heads: tuple, q_len: int, device: str = "cuda") -> list[dict]:
    name, kv_heads, group, dim = heads
    q, k, v, table, lens, sel, counts = inputs(batch, ctx, kv_heads, group, dim, q_len, device=device)
    scale = dim ** -0.5
    rows = []
    for sparse in (False, True):
        lists = {"selected_pages": sel, "selected_counts": counts} if sparse else {}
        _, ref = reference.paged_attention(q.float(), k.float(), v.float(), table, lens, scale, page_mass=True,
                                           **lists)
        for way, flags in WAYS.items():
            _, mass = time_variant_flags(flags, lambda: paged_attention.paged_attention(
                q, k, v, table, lens, scale, page_mass=True, **lists))
            err = ((mass - ref).abs().max() / ref.abs().max()).item()
            rows.append({"heads": name, "batch": batch, "context": ctx, "q_len": q_len, "sparse": sparse, "way": way,
                         "mass_rel_err": err, "ok": err < TOLERANCE})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(RESULTS / "page_mass_check.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [row for heads in HEADS for batch, ctx in ((1, 8192), (8, 4096), (64, 2048)) for q_len in (1, 5)
            for row in check(batch, ctx, heads, q_len)]
    bad = [r for r in rows if not r["ok"]]
    write_json_atomic(args.out, {**environment(), "tolerance": TOLERANCE, "rows": rows, "failures": len(bad)})
    worst = max(rows, key=lambda r: r["mass_rel_err"])
    print(f"{len(rows)} checks, {len(bad)} over {TOLERANCE:g}; worst {worst['mass_rel_err']:.1e} "
          f"({worst['heads']} b{worst['batch']} x {worst['context']} q{worst['q_len']} sparse={worst['sparse']} "
          f"{worst['way']})")
    for r in bad[:10]:
        print("  over:", r)


if __name__ == "__main__":
    main()
