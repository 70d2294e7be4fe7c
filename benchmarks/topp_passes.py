"""How many passes over a row each top-p search of kernels/topp.py needs, on the CPU: the kernel's searches
re-enacted step for step in NumPy (bisection on the float bits, to the end or until one key is left between the
bounds; interpolation with snapping, Illinois rule and a halving when the interval shrinks slowly, removed from the
kernel when it measured slower), on softmax rows like benchmarks/kernels.py's and on flatter and peakier ones. All
must find the same threshold. The GPU time per pass is kernels.py's business.

Usage: python benchmarks/topp_passes.py [out.json]   (default results/topp_passes_cpu.json)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402


def _bits(x) -> int:
    return int(np.float32(x).view(np.int32))


def _value(b: int) -> np.float32:
    return np.int32(b).view(np.float32)


def bisect(a: np.ndarray, goal, lo: int, hi: int) -> tuple[int, int]:
    passes = 0
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        passes += 1
        lo, hi = (mid, hi) if a[a >= _value(mid)].sum() >= goal else (lo, mid)
    return lo, passes


def bisect_early_exit(a: np.ndarray, total, goal, lo: int, hi: int) -> tuple[int, int]:
    """The kernel's "bisect": halvings until the two sums say one key is left in [lo, hi), then a pass of min and
    max to confirm it (counted as a pass, like each halving)."""
    lo_got, hi_got, passes, margin = total, np.float32(0), 0, total * np.float32(2.0 ** -20)
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        passes += 1
        got = a[a >= _value(mid)].sum()
        if got >= goal:
            lo, lo_got = mid, got
        else:
            hi, hi_got = mid, got
        if lo_got - hi_got < 2 * _value(lo) - margin:
            passes += 1
            between = a[(a >= _value(lo)) & (a < _value(hi))]
            if between.min() == between.max():
                lo = hi = _bits(between.min())
                hi += 1
    return lo, passes


def interpolate(a: np.ndarray, total, goal, lo: int, hi: int) -> tuple[int, int]:
    lo_got, hi_got, side, slow, passes = total, np.float32(0), 0, 0, 0
    while hi - lo > 1:
        width = hi - lo
        lo_v, hi_v = _value(lo), _value(hi)
        mid = _bits(lo_v + (lo_got - goal) / (lo_got - hi_got) * (hi_v - lo_v))
        if slow >= 2:
            mid, slow = lo + width // 2, 0
        mid = min(max(mid, lo + 1), hi - 1)
        passes += 1
        keep = a >= _value(mid)
        got = a[keep].sum()
        if got >= goal:
            hi_got = (hi_got + goal) / 2 if side == 1 else hi_got
            lo, lo_got, side = _bits(a[keep].min()), got, 1
        else:
            lo_got = (lo_got + goal) / 2 if side == -1 else lo_got
            hi, hi_got, side = _bits(a[~keep].max()) + 1, got, -1
        slow = slow + 1 if hi - lo > width // 2 else 0
    return lo, passes


def rows(kind: str, n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((count, n)).astype(np.float32) * {"softmax x1": 1, "softmax x3": 3, "softmax x6": 6}[kind]
    e = np.exp(x - x.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(0)
    out_rows = []
    for kind, n in [("softmax x3", 8192), ("softmax x3", 32768), ("softmax x1", 32768), ("softmax x6", 32768)]:
        for p in (0.5, 0.9, 0.95, 0.99):
            counts = {"bisect": [], "bisect_early_exit": [], "interpolate": []}
            for a in rows(kind, n, 32, rng):
                total = a.sum(dtype=np.float32)
                goal = np.float32(total * np.float32(p))
                lo, hi = _bits((total - goal) / n * 0.5), _bits(a.max()) + 1
                t_b, k_b = bisect(a, goal, lo, hi)
                t_i, k_i = interpolate(a, total, goal, lo, hi)
                t_e, k_e = bisect_early_exit(a, total, goal, lo, hi)
                assert t_b == t_i == t_e, (kind, n, p)
                counts["bisect"].append(k_b)
                counts["bisect_early_exit"].append(k_e)
                counts["interpolate"].append(k_i)
            row = {"rows": f"32 x {n} {kind}", "p": p,
                   **{f"{s}_passes_max": max(c) for s, c in counts.items()},
                   **{f"{s}_passes_mean": float(np.mean(c)) for s, c in counts.items()}}
            out_rows.append(row)
            print(row, flush=True)
    write_json_atomic(sys.argv[1] if len(sys.argv) > 1 else RESULTS / "topp_passes_cpu.json",
                      {**environment(), "rows": out_rows,
                       "note": "passes over a row until the threshold is exact; the slowest of 32 rows sets a "
                               "launch's time; every search gave the same threshold on every row (bisect_early_exit "
                               "counts its checking pass)"})


if __name__ == "__main__":
    main()
