"""Sorting-free top-p (nucleus) and top-k selection over attention weights, in Triton.

Non-negative floats order like their bit patterns read as integers, so the selection threshold is found
by bisection on the integer domain: the largest theta with mass(a >= theta) >= p * total (top-p) or
count(a >= theta) >= k (top-k). About 30 halvings give the exact threshold, an element of the row; the
set is then {a >= theta}: ties at theta are all kept, deterministically. One program per row. Rows of up to
ROW_IN_REGISTERS keys are loaded once and bisected in registers; longer rows are re-read from L2 on each
halving. Reference: `reference.topp_threshold` (torch.sort + cumsum).

SEARCH = "interpolate" (rows in registers) needs fewer passes over the row: each probe is placed by
interpolating the mass between the bounds (Illinois rule; a plain halving when the interval shrinks slowly), and
the same reduction also returns the smallest value at or above the probe and the largest below it, to which the
bounds snap. It ends when the bounds hold one distinct value: at most 9-14 passes instead of 26-28 on 32 softmax
rows of 8K-32K (benchmarks/topp_passes.py), each pass reducing three quantities instead of one. The answer is the
same up to the order of fp32 sums at the boundary. On the H200 a pass of it cost ~2.3 µs against ~0.85 for a
halving (32 x 32K: 28.5 vs 23.8 µs): "interpolate-3" takes the three as separate built-in reductions instead of
one tuple reduction, to tell whether the combined reduction is what costs: it does not (27.1 vs 25.6 µs at
32 x 32K on the H200, results/kernels.json).

Tried and removed (commit 07f036e, measured at a9ea7c5: results/topp_warps.json): gathering the narrow band left
after a few whole-row halvings with a prefix sum and finishing over those keys only. It was slower, 45 vs 23 µs at
32 x 32K and 13.4 vs 11.0 µs at 32 x 8K: the prefix sum over a row held in registers costs more than the halvings
it saves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_attention import INTERPRETED  # CPU tests: see ONE_REDUCTION

BLOCK = 4096
ROW_IN_REGISTERS = 32768
SEARCHES = ("bisect", "interpolate", "interpolate-3")   # -3: sum, min and max as three built-in reductions
SEARCH = "bisect"        # fastest of the three on the H200 at 32 x 32K (results/kernels.json)


@triton.jit
def _reaches(a, theta, goal, TOP_K: tl.constexpr):
    # Padding is loaded as 0 and theta > 0 on every halving, so padding never counts.
    return tl.sum(tl.where(a >= theta, 1.0 if TOP_K else a, 0.0), 0) >= goal


@triton.jit
def _sum_min_max(s1, lo1, hi1, s2, lo2, hi2):
    return s1 + s2, tl.minimum(lo1, lo2), tl.maximum(hi1, hi2)


@triton.jit
def _interpolating_search(a, total, goal, lo, hi, TOP_K: tl.constexpr, ONE_REDUCTION: tl.constexpr):
    """Bounds as in the kernel (bit patterns: {a >= lo} reaches the goal, {a >= hi} does not) -> the answer lo.
    Probes interpolate the reached amount between the bounds in value space; after a probe the bound that moves
    snaps to the nearest element (above the probe: the smallest kept; below: the largest dropped, + 1 bit), so the
    loop ends once one distinct value is left between them. Padding (0) is never kept: every probe is > 0."""
    lo_got = total                     # an upper bound of what {a >= lo} holds: only steers the first probe
    hi_got = tl.zeros([], tl.float32)
    kept_side = tl.zeros([], tl.int32)     # +1: the last probe moved lo, -1: it moved hi (Illinois rule)
    slow = tl.zeros([], tl.int32)          # probes in a row that did not halve the interval
    while hi - lo > 1:
        width = hi - lo
        lo_v = lo.to(tl.float32, bitcast=True)
        hi_v = hi.to(tl.float32, bitcast=True)
        guess = lo_v + (lo_got - goal) / (lo_got - hi_got) * (hi_v - lo_v)
        mid = guess.to(tl.int32, bitcast=True)
        mid = tl.where(slow >= 2, lo + width // 2, mid)
        mid = tl.minimum(tl.maximum(mid, lo + 1), hi - 1)
        slow = tl.where(slow >= 2, 0, slow)
        theta = mid.to(tl.float32, bitcast=True)
        keep = a >= theta
        amount, kept, dropped = tl.where(keep, 1.0 if TOP_K else a, 0.0), tl.where(keep, a, float("inf")), \
            tl.where(keep, -1.0, a)
        if ONE_REDUCTION:      # one pass of shuffles and barriers for the three
            got, kept_min, dropped_max = tl.reduce((amount, kept, dropped), 0, _sum_min_max)
        else:                  # the interpreter runs a custom combine element by element: 100x slower
            got, kept_min, dropped_max = tl.sum(amount, 0), tl.min(kept, 0), tl.max(dropped, 0)
        reached = got >= goal
        # Illinois: when the same bound moves twice, halve the other's distance to the goal so probes keep moving.
        hi_got = tl.where(reached & (kept_side == 1), (hi_got + goal) * 0.5, hi_got)
        lo_got = tl.where(~reached & (kept_side == -1), (lo_got + goal) * 0.5, lo_got)
        lo = tl.where(reached, kept_min.to(tl.int32, bitcast=True), lo)
        lo_got = tl.where(reached, got, lo_got)
        hi = tl.where(reached, hi, dropped_max.to(tl.int32, bitcast=True) + 1)
        hi_got = tl.where(reached, hi_got, got)
        kept_side = tl.where(reached, 1, -1)
        slow = tl.where(hi - lo > width // 2, slow + 1, 0)
    return lo


@triton.jit
def _threshold_kernel(x_ptr, thr_ptr, n, stride, target_frac, k, TOP_K: tl.constexpr, IN_REGISTERS: tl.constexpr,
                      INTERPOLATE: tl.constexpr, ONE_REDUCTION: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    if IN_REGISTERS:
        offs = tl.arange(0, BLOCK)
        row_vals = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
        total = tl.sum(row_vals, 0)
        top = tl.max(row_vals, 0)
    else:
        acc_total = tl.zeros([BLOCK], tl.float32)
        acc_top = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            a = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
            acc_total += a
            acc_top = tl.maximum(acc_top, a)
        total = tl.sum(acc_total, 0)
        top = tl.max(acc_top, 0)
    goal = k * 1.0 if TOP_K else total * target_frac
    # Invariant: the set {a >= bits(lo)} reaches the goal, {a >= bits(hi)} does not. For top-p the answer
    # exceeds (1 - p) * total / n (the keys below it hold more than 1 - p of the mass, each less than it), so
    # bisection starts there, at half that bound to stay clear of fp32 rounding in the sums.
    lo = tl.zeros([], tl.int32)
    if not TOP_K:
        lo = ((total - goal) / n * 0.5).to(tl.int32, bitcast=True)
    hi = top.to(tl.int32, bitcast=True) + 1
    if IN_REGISTERS and INTERPOLATE:
        lo = _interpolating_search(row_vals, total, goal, lo, hi, TOP_K, ONE_REDUCTION)
        hi = lo + 1
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        theta = mid.to(tl.float32, bitcast=True)
        if IN_REGISTERS:
            reached = _reaches(row_vals, theta, goal, TOP_K)
        else:
            got = tl.zeros([BLOCK], tl.float32)
            for start in range(0, n, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                a = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
                got += tl.where(a >= theta, 1.0 if TOP_K else a, 0.0)
            reached = tl.sum(got, 0) >= goal
        lo = tl.where(reached, mid, lo)
        hi = tl.where(reached, hi, mid)
    tl.store(thr_ptr + row, lo.to(tl.float32, bitcast=True))


def _thresholds(x: torch.Tensor, top_k: bool, frac: float, k: int, search: str | None = None,
                num_warps: int | None = None) -> torch.Tensor:
    search = search or SEARCH
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    n = rows.shape[1]
    thr = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    in_registers = n <= ROW_IN_REGISTERS
    block = triton.next_power_of_2(n) if in_registers else BLOCK
    warps = num_warps or 8     # fastest of 4-32 for 8K and 32K rows on the H200: results/topp_warps.json
    _threshold_kernel[(rows.shape[0],)](rows, thr, n, rows.stride(0), frac, k, TOP_K=top_k,
                                        IN_REGISTERS=in_registers, INTERPOLATE=search != "bisect",
                                        ONE_REDUCTION=search == "interpolate" and not INTERPRETED, BLOCK=block,
                                        num_warps=warps)
    return thr.view(x.shape[:-1])


def topp_threshold(weights: torch.Tensor, p: float, search: str | None = None) -> torch.Tensor:
    """weights: [..., n] >= 0 -> theta [...]: {w >= theta} is the smallest top set holding mass >= p * sum
    (up to ties at theta). p >= 1 keeps everything: fp32 sums in another order could otherwise drop
    weights below rounding, and p = 1 must mean dense."""
    if p >= 1.0:
        return torch.zeros(weights.shape[:-1], dtype=torch.float32, device=weights.device)
    return _thresholds(weights, False, p, 0, search)


def topk_threshold(weights: torch.Tensor, k: int, search: str | None = None) -> torch.Tensor:
    """weights: [..., n] >= 0 -> theta [...]: {w >= theta} holds the k largest (more only on ties)."""
    return _thresholds(weights, True, 0.0, k, search)
