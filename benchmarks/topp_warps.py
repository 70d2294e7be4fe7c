"""GPU: the top-p kernel's time per warp count and search, 32 softmax rows of 8K and 32K keys (rows held in
registers), against torch.sort + cumsum in the same run. kernels/topp.py uses 8 warps (fastest here on the H200);
this says whether another count is faster elsewhere. Device time from CUDA graphs.

Usage: python benchmarks/topp_warps.py [out.json]   (default results/topp_warps.json)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment, graph_ms  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import reference, topp  # noqa: E402

P = 0.95


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for n in (8192, 32768):
        w = torch.softmax(torch.randn(32, n, device="cuda") * 3, dim=-1)
        want = reference.topp_threshold(w, P)
        sort_us = graph_ms(lambda: reference.topp_threshold(w, P)) * 1e3
        for search in topp.SEARCHES:
            for warps in (4, 8, 16, 32):
                def run(s=search, nw=warps):
                    return topp._thresholds(w, False, P, 0, s, nw)
                try:
                    us = graph_ms(run) * 1e3
                except Exception as err:   # e.g. too many registers for the row at this warp count
                    rows.append({"n": n, "search": search, "warps": warps, "error": repr(err)[:200]})
                    continue
                same = bool(((w >= run()[:, None]) == (w >= want[:, None])).all())
                rows.append({"n": n, "search": search, "warps": warps, "us": us, "sort_us": sort_us,
                             "speedup_vs_sort": sort_us / us, "same_set_as_sort": same})
    write_json_atomic(sys.argv[1] if len(sys.argv) > 1 else RESULTS / "topp_warps.json",
                      {**environment(), "config": {"rows": 32, "p": P}, "rows": rows})
    print("n      search       warps  us      vs sort  same")
    for r in rows:
        tail = r["error"][:50] if "error" in r else \
            f"{r['us']:7.1f} {r['speedup_vs_sort']:6.2f}x  {r['same_set_as_sort']}"
        print(f"{r['n']:<6} {r['search']:12s} {r['warps']:>5}  {tail}")


if __name__ == "__main__":
    main()
