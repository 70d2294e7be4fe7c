"""GPU: the top-p kernel's time per warp count and search, 32 softmax rows of 8K and 32K keys (rows held in
registers), against torch.sort + cumsum in the same run; for bisect-compact also the number of halvings over the
whole row before the band is gathered. Device time from CUDA graphs.

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


def configs() -> list[tuple[str, int, int | None]]:
    """(search, warps, coarse halvings before gathering the band: bisect-compact only)."""
    out = [(s, nw, None) for s in ("bisect", "interpolate", "interpolate-3") for nw in (4, 8, 16, 32)]
    return out + [("bisect-compact", nw, c) for nw in (4, 8, 16) for c in (4, 6, 8, 10)]


def main() -> None:
    default_coarse = topp.COARSE_PASSES
    torch.manual_seed(0)
    rows = []
    for n in (8192, 32768):
        w = torch.softmax(torch.randn(32, n, device="cuda") * 3, dim=-1)
        want = reference.topp_threshold(w, P)
        sort_us = graph_ms(lambda: reference.topp_threshold(w, P)) * 1e3
        for search, warps, coarse in configs():
            topp.COARSE_PASSES = coarse or topp.COARSE_PASSES

            def run(s=search, nw=warps):
                return topp._thresholds(w, False, P, 0, s, nw)
            cell = {"n": n, "search": search, "warps": warps, "coarse": coarse}
            try:
                us = graph_ms(run) * 1e3
            except Exception as err:   # e.g. too many registers for the row at this warp count
                rows.append({**cell, "error": repr(err)[:200]})
                continue
            same = bool(((w >= run()[:, None]) == (w >= want[:, None])).all())
            rows.append({**cell, "us": us, "sort_us": sort_us, "speedup_vs_sort": sort_us / us,
                         "same_set_as_sort": same})
        topp.COARSE_PASSES = default_coarse
    write_json_atomic(sys.argv[1] if len(sys.argv) > 1 else RESULTS / "topp_warps.json",
                      {**environment(), "config": {"rows": 32, "p": P}, "rows": rows})
    print("n      search          warps coarse us      vs sort  same")
    for r in rows:
        tail = r["error"][:50] if "error" in r else \
            f"{r['us']:7.1f} {r['speedup_vs_sort']:6.2f}x  {r['same_set_as_sort']}"
        print(f"{r['n']:<6} {r['search']:15s} {r['warps']:>5} {r['coarse'] or '':>6} {tail}")


if __name__ == "__main__":
    main()
