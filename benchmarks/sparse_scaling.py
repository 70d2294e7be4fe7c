"""GPU: does sparse page attention's bandwidth on the bytes it reads grow with those bytes? kernels.py measures it
at batch 1 x 32K with 10% of the pages (13 MB read in ~9 µs: 0.36 of copy bandwidth); this adds batch 8 and longer
contexts at the same 10%, dense alongside, Llama-3-8B attention shape, one and five new rows. Device time from
CUDA graphs, K/V rotated past L2 (kernels.kv_pools). Each sparse cell also runs with the lists given as physical
pages (`selected_physical`), which takes the page-table lookup out of the chain list -> table -> K.

Usage: python benchmarks/sparse_scaling.py [--head-major] [out.json]   (default results/sparse_scaling_<layout>.json)
--head-major: the same run over K/V stored with each (page, KV head)'s rows contiguous (see head_major).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, copy_bandwidth_gbs, environment  # noqa: E402
from benchmarks.kernels import DIM, GROUP, KV_HEADS, PAGE, kv_pools, selection, time_attention  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import paged_attention  # noqa: E402

CELLS = [(1, 32768), (8, 32768), (1, 131072), (4, 131072)]
FRACTION = 0.10


def head_major(pools):
    """The same K/V with each (page, KV head)'s 16 rows contiguous (4 KB) instead of interleaved with the other
    heads' rows (256 B every 2 KB), seen through the [page, row, head, dim] view the kernel takes by strides."""
    return [tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in kv) for kv in pools]


def main() -> None:
    torch.manual_seed(0)
    copy = copy_bandwidth_gbs()
    rows = []
    layout = "head-major" if "--head-major" in sys.argv else "token-major"
    for batch, ctx in CELLS:
        pools, table, lens, kv_bytes = kv_pools(batch, ctx)
        if layout == "head-major":
            pools = head_major(pools)
        pages = -(-ctx // PAGE)
        sel, counts = selection(batch, pages, FRACTION)
        sel_bytes = kv_bytes * counts.sum().item() / (batch * KV_HEADS * pages)
        for q_len in (1, 5):
            q = torch.randn(batch, q_len, KV_HEADS * GROUP, DIM, device="cuda", dtype=torch.bfloat16)
            dense = time_attention(q, pools, table, lens)
            sparse = time_attention(q, pools, table, lens, selected_pages=sel, selected_counts=counts)
            sparse_phys = time_attention(q, pools, table, lens, selected_pages=sel, selected_counts=counts,
                                         selected_physical=paged_attention.physical_pages(table, sel))
            rows.append({"layout": layout, "batch": batch, "context": ctx, "q_len": q_len,
                         "selected_mb": sel_bytes / 1e6,
                         "dense_us": dense * 1e3, "sparse_us": sparse * 1e3, "speedup_vs_dense": dense / sparse,
                         "sparse_physical_lists_us": sparse_phys * 1e3,
                         "dense_bandwidth_fraction": kv_bytes / dense / 1e6 / copy,
                         "sparse_bandwidth_fraction": sel_bytes / sparse / 1e6 / copy})
            print(rows[-1], flush=True)
        del pools
        torch.cuda.empty_cache()
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    write_json_atomic(paths[0] if paths else RESULTS / f"sparse_scaling_{layout}.json",
                      {**environment(), "copy_bandwidth_gbs": copy,
                       "config": {"fraction": FRACTION, "kv_heads": KV_HEADS, "group": GROUP, "head_dim": DIM},
                       "rows": rows})
    print("batch context q  selected MB  dense µs (bw)   sparse µs (bw)  speedup  physical-list µs")
    for r in rows:
        print(f"{r['batch']:>5} {r['context']:>7} {r['q_len']:>2} {r['selected_mb']:>11.1f} "
              f"{r['dense_us']:8.1f} ({r['dense_bandwidth_fraction']:.2f}) {r['sparse_us']:8.1f} "
              f"({r['sparse_bandwidth_fraction']:.2f}) {r['speedup_vs_dense']:6.2f}x "
              f"{r['sparse_physical_lists_us']:8.1f}")


if __name__ == "__main__":
    main()
