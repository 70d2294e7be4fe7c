"""GPU: why sparse page attention reads its bytes slower than dense attention reads the same shape's (kernels.json,
H100: 0.71 of copy at batch 8 x 32K with 10% of the pages, dense 0.97, a copy of as many bytes 0.95), and which
launch closes the gap. Llama-3-8B attention shape, one new row, device time from CUDA graphs (kernels.time_attention).

Three questions, one run:
- launch: tile keys x warps x stages x split factor, over logical and physical page lists;
- selection: each KV head its own random 10% (as kernels.py) against the same pages for every head of a sequence
  (each page's rows read whole, as dense attention and MagicDec's drafts read them);
- placement: the page table a random permutation (as kernels.py) against physically contiguous pages;
- the merge launch: one split per (sequence, KV head), written directly, against the library's splits.

Usage: python benchmarks/sparse_sweep.py [--quick | --batch1] [out.json]   (default results/sparse_sweep.json)
--quick: batch 8 x 32K only, 4 warps only (18 launches instead of 36 per cell).
--batch1: batch 1 x 32K only (13 MB selected, where kernels.json's summary reads), one row, a launch set for few
  programs: smaller tiles, 2 warps, 1 stage and more splits, which put more programs (bytes) in flight at once.
Each cell is swept with one new row (sparse drafting) and five (pruned verification of 4 drafts + 1).
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, copy_bandwidth_gbs, environment  # noqa: E402
from benchmarks.kernels import DIM, GROUP, KV_HEADS, PAGE, kv_pools, selection, time_attention  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import paged_attention  # noqa: E402
from specattn.kernels.paged_attention import LaunchConfig  # noqa: E402

CELLS = [(8, 32768), (4, 131072)]
ROWS = (1, 5)
FRACTION = 0.10
LAUNCHES = [LaunchConfig(bn, w, st, f) for bn, w, st, f in
            itertools.product((64, 128), (4, 8), (2, 3, 4), (1, 2, 4))]
BATCH1_LAUNCHES = [LaunchConfig(bn, w, st, f) for bn, w, st, f in
                   itertools.product((32, 64, 128), (2, 4), (1, 2), (1, 2, 4, 8))]


def shared_selection(sel: torch.Tensor) -> torch.Tensor:
    """The first KV head's list for every head of its sequence."""
    return sel[:, :1].expand_as(sel).contiguous()


def time_lists(q, pools, table, lens, sel, counts, launch: LaunchConfig | None, num_splits: int | None = None) -> dict:
    kw = {"selected_pages": sel, "selected_counts": counts, **({"launch": launch} if launch else {}),
          **({"num_splits": num_splits} if num_splits else {})}
    phys = paged_attention.physical_pages(table, sel)
    return {"logical_us": 1e3 * time_attention(q, pools, table, lens, **kw),
            "physical_us": 1e3 * time_attention(q, pools, table, lens, selected_physical=phys, **kw)}


def cell_rows(batch: int, ctx: int, copy: float, launches: list[LaunchConfig], row_counts=ROWS) -> list[dict]:
    """Every question at one (batch, context), for each count of new rows in ROWS: the K/V pools, page lists and
    page tables are built once and shared by the row counts."""
    pools, table, lens, kv_bytes = kv_pools(batch, ctx)
    pages = -(-ctx // PAGE)
    sel, counts = selection(batch, pages, FRACTION)
    sel_bytes = kv_bytes * counts.sum().item() / (batch * KV_HEADS * pages)
    shared = shared_selection(sel)
    contiguous = torch.arange(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages)
    rows = []
    for q_len in row_counts:
        q = torch.randn(batch, q_len, KV_HEADS * GROUP, DIM, device="cuda", dtype=torch.bfloat16)
        base = {"batch": batch, "context": ctx, "q_len": q_len, "selected_mb": sel_bytes / 1e6}

        def row(what: str, times: dict, launch: LaunchConfig | None = None, nbytes: float = sel_bytes) -> dict:
            r = {**base, "what": what, "launch": None if launch is None else launch.__dict__, **times,
                 **{k.replace("_us", "_fraction"): nbytes / v / 1e3 / copy for k, v in times.items()}}
            print(r, flush=True)
            return r

        rows += [row("dense (all pages)", {"dense_us": 1e3 * time_attention(q, pools, table, lens)}, nbytes=kv_bytes),
                 row("library launch", time_lists(q, pools, table, lens, sel, counts, None)),
                 row("same pages for every head", time_lists(q, pools, table, lens, shared, counts, None)),
                 row("contiguous page table", time_lists(q, pools, contiguous, lens, sel, counts, None)),
                 # no merge launch: each (sequence, KV head) in one program that writes its rows itself
                 row("one split, written directly",
                     time_lists(q, pools, table, lens, sel, counts, None, num_splits=1))]
        rows += [row("launch sweep", time_lists(q, pools, table, lens, sel, counts, launch), launch)
                 for launch in launches]
    del pools
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    torch.manual_seed(0)
    copy = copy_bandwidth_gbs()
    quick, batch1 = "--quick" in sys.argv, "--batch1" in sys.argv
    cells = [(1, 32768)] if batch1 else CELLS[:1] if quick else CELLS
    launches = (BATCH1_LAUNCHES if batch1 else [lc for lc in LAUNCHES if lc.num_warps == 4] if quick
                else LAUNCHES)
    row_counts = (1,) if batch1 else ROWS
    rows = [r for batch, ctx in cells for r in cell_rows(batch, ctx, copy, launches, row_counts)]
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    write_json_atomic(paths[0] if paths else RESULTS / "sparse_sweep.json",
                      {**environment(), "copy_bandwidth_gbs": copy,
                       "config": {"fraction": FRACTION, "kv_heads": KV_HEADS, "group": GROUP, "head_dim": DIM},
                       "rows": rows})
    for (batch, ctx), q_len in itertools.product(cells, row_counts):
        cell = [r for r in rows if (r["batch"], r["context"], r["q_len"]) == (batch, ctx, q_len)]
        print(f"\nbatch {batch} x {ctx}, {q_len} rows: {cell[0]['selected_mb']:.0f} MB selected; dense "
              f"{cell[0]['dense_fraction']:.2f} of copy")
        for r in cell[1:5]:
            print(f"  {r['what']:28s} logical {r['logical_fraction']:.3f}  physical {r['physical_fraction']:.3f}")
        sweep = sorted((r for r in cell if r["what"] == "launch sweep"), key=lambda r: r["logical_us"])[:5]
        for r in sweep:
            print(f"  {str(tuple(r['launch'].values())):28s} logical {r['logical_fraction']:.3f}  "
                  f"physical {r['physical_fraction']:.3f}")


if __name__ == "__main__":
    main()
