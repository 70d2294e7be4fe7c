"""Exact page mass in a verify step, by variant: how many tiles deferred page mass holds in registers
(paged_attention.MAX_PAGE_MASS_TILES; fewer tiles a split means more splits) against plain attention and 64-key
block mass. A 32-layer step's attention over Llama-3-8B-shaped heads (8 KV heads of 128, 4 query heads each), the mass
finished once a step, as benchmarks/kernels.py times it. No model files. Writes JSON (--out).

Usage (GPU): python benchmarks/page_mass_sweep.py [--cells 1x8192,8x8192,8x32768] [--tiles 8,16,32] [--q-len 5]
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
from specattn.kernels import paged_attention, pdl, reference  # noqa: E402


def variants(tiles: list[int]) -> dict[str, tuple[dict, dict]]:
    """name -> (paged_attention keywords, module flags): plain attention, 64-key block mass, exact page mass as the
    library chooses, by the page one-hot and by sums inside warps (paged_attention.PAGE_SUMS_BY_WARP), and each
    of those two holding `tiles` tiles a split when deferred."""
    page = {"page_mass": True}
    out = {"plain": ({}, {}), "block64": ({"page_mass": True, "mass_tokens": 64}, {}), "page": (page, {}),
           "page_one_hot": (page, {"PAGE_SUMS_BY_WARP": False}),
           "page_warp_sums": (page, {"PAGE_SUMS_BY_WARP": True}),
           "page_warp_sums_fp32": (page, {"PAGE_SUMS_BY_WARP": True, "PAGE_SUMS_HALF": False}),
           # 128-key tiles (few programs) holding their page sums too, instead of a store every tile
           "page_warp_sums_defer128": (page, {"PAGE_SUMS_BY_WARP": True, "DEFER_PAGE_MASS_MAX_BLOCK_N": 128}),
           # ... or stored every tile at any tile width (no split count forced by the tiles a split can hold)
           "page_warp_sums_stored": (page, {"PAGE_SUMS_BY_WARP": True, "DEFER_PAGE_MASS_MAX_BLOCK_N": 0})}
    for n in tiles:
        held = {"MAX_PAGE_MASS_TILES": n, "PAGE_MASS_HELD_VALUES": 1 << 30}
        out[f"page_one_hot_tiles{n}"] = (page, {**held, "PAGE_SUMS_BY_WARP": False})
        out[f"page_warp_sums_tiles{n}"] = (page, {"WARP_SUMS_PAGE_MASS_TILES": n, "PAGE_SUMS_BY_WARP": True})
    return out


def cell_row(batch: int, ctx: int, q_len: int, tiles: list[int]) -> dict:
    pools, table, lens, _ = kv_pools(batch, ctx)
    q = torch.randn(batch, q_len, KV_HEADS * GROUP, DIM, device="cuda", dtype=torch.bfloat16)
    us = {}
    for name, (kw, flags) in variants(tiles).items():
        us[name] = 1e3 * time_variant_flags(flags, lambda kw=kw: time_attention_step(q, pools, table, lens, **kw))
    return {"batch": batch, "context": ctx, "q_len": q_len, **{f"us_{n}": t for n, t in us.items()},
            **{f"{n}_overhead": t / us["plain"] - 1 for n, t in us.items() if n != "plain"},
            **mass_agreement(q, *pools[0], table, lens)}


def mass_agreement(q, k, v, table, lens) -> dict:
    """The two ways of summing exact page mass on this GPU, against each other and the fp32 reference."""
    scale = DIM ** -0.5
    got = {name: time_variant_flags({"PAGE_SUMS_BY_WARP": on}, lambda: paged_attention.paged_attention(
        q, k, v, table, lens, scale, page_mass=True)) for name, on in (("one_hot", False), ("warp_sums", True))}
    ref_out, ref_mass = reference.paged_attention(q.float(), k.float(), v.float(), table, lens, scale, page_mass=True)
    top = ref_mass.abs().max()
    return {"mass_max_diff_warp_sums_vs_one_hot": ((got["warp_sums"][1] - got["one_hot"][1]).abs().max() / top).item(),
            **{f"mass_rel_err_{n}": ((m - ref_mass).abs().max() / top).item() for n, (_, m) in got.items()},
            **{f"out_rel_err_{n}": ((o.float() - ref_out).norm() / ref_out.norm()).item() for n, (o, _) in got.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cells", default="1x8192,8x8192,2x32768,4x32768,8x32768", help="batch x context")
    ap.add_argument("--tiles", default="8,16,32", help="tiles a split holds (deferred page mass); '' for none")
    ap.add_argument("--q-len", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "page_mass_sweep.json"))
    args = ap.parse_args()
    pdl.MODE = 0                 # kernels timed as kernels.py times them
    tiles = [int(t) for t in args.tiles.split(",") if t]
    rows = []
    for cell in args.cells.split(","):
        batch, ctx = (int(x) for x in cell.split("x"))
        rows.append(cell_row(batch, ctx, args.q_len, tiles))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    write_json_atomic(args.out, {**environment(), "rows": rows})
    names = [n for n in variants(tiles) if n != "plain"]
    for r in rows:      # one line a cell: plain µs, then each variant's overhead over it
        print(f"{r['batch']}x{r['context']} q{r['q_len']} plain {r['us_plain']:.1f} us | "
              + " ".join(f"{n} {r[n + '_overhead']:+.1%}" for n in names)
              + f" | warp vs one-hot mass {r['mass_max_diff_warp_sums_vs_one_hot']:.1e}")


if __name__ == "__main__":
    main()
