"""Exact page mass in a verify step, by variant: how many tiles deferred page mass holds in registers
(paged_attention.MAX_PAGE_MASS_TILES; fewer tiles a split means more splits) against plain attention and 64-key
block mass. A 32-layer step's attention over Llama-3-8B-shaped heads (8 KV heads of 128, 4 query heads each), the mass
finished once a step, as benchmarks/kernels.py times it. No model files. Writes JSON (--out).

Usage (GPU): python benchmarks/page_mass_sweep.py [--cells 1x8192,8x8192,8x32768] [--tiles 8,16,32]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment  # noqa: E402
from benchmarks.kernels import DIM, GROUP, KV_HEADS, kv_pools, time_attention_step  # noqa: E402
from benchmarks.verify_cost import time_variant_flags  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import pdl  # noqa: E402


def variants(tiles: list[int]) -> dict[str, tuple[dict, dict]]:
    """name -> (paged_attention keywords, module flags)."""
    out = {"plain": ({}, {}), "block64": ({"page_mass": True, "mass_tokens": 64}, {}),
           "page": ({"page_mass": True}, {})}          # the library's own choice (paged_attention.page_mass_tiles)
    for n in tiles:
        out[f"page_tiles{n}"] = ({"page_mass": True}, {"MAX_PAGE_MASS_TILES": n, "PAGE_MASS_HELD_VALUES": 1 << 30})
    return out


def cell_row(batch: int, ctx: int, q_len: int, tiles: list[int]) -> dict:
    pools, table, lens, _ = kv_pools(batch, ctx)
    q = torch.randn(batch, q_len, KV_HEADS * GROUP, DIM, device="cuda", dtype=torch.bfloat16)
    us = {}
    for name, (kw, flags) in variants(tiles).items():
        us[name] = 1e3 * time_variant_flags(flags, lambda kw=kw: time_attention_step(q, pools, table, lens, **kw))
    return {"batch": batch, "context": ctx, "q_len": q_len, **{f"us_{n}": t for n, t in us.items()},
            **{f"{n}_overhead": t / us["plain"] - 1 for n, t in us.items() if n != "plain"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cells", default="1x8192,8x8192,2x32768,4x32768,8x32768", help="batch x context")
    ap.add_argument("--tiles", default="8,16,32")
    ap.add_argument("--q-len", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "page_mass_sweep.json"))
    args = ap.parse_args()
    pdl.MODE = 0                 # kernels timed as kernels.py times them
    tiles = [int(t) for t in args.tiles.split(",")]
    rows = []
    for cell in args.cells.split(","):
        batch, ctx = (int(x) for x in cell.split("x"))
        rows.append(cell_row(batch, ctx, args.q_len, tiles))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    write_json_atomic(args.out, {**environment(), "rows": rows})
    names = [n for n in variants(tiles) if n != "plain"]
    print(f"{'cell':>10} {'plain us':>9} " + " ".join(f"{n:>12}" for n in names))
    for r in rows:
        print(f"{r['batch']:>3}x{r['context']:<6} {r['us_plain']:>9.1f} "
              + " ".join(f"{r[n + '_overhead']:>+12.1%}" for n in names))


if __name__ == "__main__":
    main()
