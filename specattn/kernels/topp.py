"""Sorting-free top-p (nucleus) and top-k selection over attention weights, in Triton.

Non-negative floats order like their bit patterns read as integers, so the selection threshold is found
by bisection on the integer domain: the largest theta with mass(a >= theta) >= p * total (top-p) or
count(a >= theta) >= k (top-k). About 28 halvings give the exact threshold, an element of the row; the
set is then {a >= theta}: ties at theta are all kept, deterministically. One program per row. Rows of up to
ROW_IN_REGISTERS keys are loaded once and bisected in registers; longer rows are re-read from L2 on each
halving. Reference: `reference.topp_threshold` (torch.sort + cumsum).

The bisection stops once one key is left between its bounds, which the two sums it already has tell for free:
every key in [lo, hi) is at least lo, so if they hold less than 2 * lo there is one (a pass of min and max
confirms it, exactly, and gives the key). Halvings continue only to split near neighbours: on 32 softmax rows of
32K the slowest row needs ~21 passes instead of 28 (benchmarks/topp_passes.py), with the same threshold.

Measured on the H100 at 2f2ec3e (results/kernels.json), 32 x 32K softmax rows, p 0.95: 14.8 µs with the early
exit, 19.1 with every halving ("bisect-full"), 23.3 with the three-instruction sums of bd06738, sort + cumsum 192.8
(13.1x, 10.1x, 8.3x). Also tried and removed then: placing each probe by interpolating the mass between the bounds
and snapping them to the nearest keys (9-14 passes, but each reduces sum, min and max: 25.7 µs at 32 x 32K in the
same run, 26.9 as three built-in reductions).

Tried and removed earlier (commit 07f036e, measured at a9ea7c5: results/topp_warps.json): gathering the narrow band left
after a few whole-row halvings with a prefix sum and finishing over those keys only. It was slower, 45 vs 23 µs at
32 x 32K and 13.4 vs 11.0 µs at 32 x 8K: the prefix sum over a row held in registers costs more than the halvings
it saves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
ROW_IN_REGISTERS = 32768
SEARCHES = ("bisect", "bisect-full")      # bisect-full: every halving, no early exit (to time it against)
SEARCH = "bisect"
# The early exit's margin, a fraction of the row's total (top-k: of one key): sums of the same set always agree, of
# different sets they may differ by rounding; 2^-20 is 8 ulps or more. Only when to check depends on it: the check
# is exact, so a margin below 0 (checking after every halving) gives the same answers, slower.
EXIT_MARGIN = 2.0 ** -20


@triton.jit
def _kept(a, theta, TOP_K: tl.constexpr):
    """What {a >= theta} holds: its mass, or its size for top-k. The 0/1 factor compiles to FSET + FFMA, two
    instructions a key where tl.where takes three (FSETP, FSEL, FADD), with the same sums: a halving is bound by
    issuing these. Padding is loaded as 0 and theta > 0 on every halving, so padding never counts."""
    keep = (a >= theta).to(tl.float32)
    return tl.sum(keep if TOP_K else keep * a, 0)


@triton.jit
def _kept_streamed(base, n, theta, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    got = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        a = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
        keep = (a >= theta).to(tl.float32)
        got += keep if TOP_K else keep * a
    return tl.sum(got, 0)


@triton.jit
def _between(a, lo_v, hi_v):
    """The smallest key >= lo_v and the largest key < hi_v (padding, 0, is below every lo_v > 0)."""
    return tl.min(tl.where(a >= lo_v, a, float("inf")), 0), tl.max(tl.where(a < hi_v, a, 0.0), 0)


@triton.jit
def _between_streamed(base, n, lo_v, hi_v, BLOCK: tl.constexpr):
    smallest = tl.full([BLOCK], float("inf"), tl.float32)
    largest = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        a = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
        smallest = tl.minimum(smallest, tl.where(a >= lo_v, a, float("inf")))
        largest = tl.maximum(largest, tl.where(a < hi_v, a, 0.0))
    return tl.min(smallest, 0), tl.max(largest, 0)


@triton.jit
def _threshold_kernel(x_ptr, thr_ptr, n, stride, target_frac, k, exit_margin, TOP_K: tl.constexpr,
                      IN_REGISTERS: tl.constexpr, EARLY_EXIT: tl.constexpr, BLOCK: tl.constexpr):
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
    # What {a >= lo} and {a >= hi} hold, for the early exit: an overestimate for lo until a halving moves it.
    lo_got = n * 1.0 if TOP_K else total
    hi_got = tl.zeros([], tl.float32)
    margin = exit_margin * (1.0 if TOP_K else total)
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        theta = mid.to(tl.float32, bitcast=True)
        if IN_REGISTERS:
            got = _kept(row_vals, theta, TOP_K)
        else:
            got = _kept_streamed(base, n, theta, TOP_K, BLOCK)
        reached = got >= goal
        lo = tl.where(reached, mid, lo)
        hi = tl.where(reached, hi, mid)
        lo_got = tl.where(reached, got, lo_got)
        hi_got = tl.where(reached, hi_got, got)
        if EARLY_EXIT:
            # The keys in [lo, hi) hold lo_got - hi_got, each at least lo's value (top-k: count 1 each). Less than
            # two of them (with the margin) means one key, or one value: then it is the answer, as the remaining
            # halvings would find (the answer is an element of the row). One pass checks, exactly.
            lo_v = lo.to(tl.float32, bitcast=True)
            two_keys = 2.0 if TOP_K else 2.0 * lo_v
            if lo_got - hi_got < two_keys - margin:
                if IN_REGISTERS:
                    smallest, largest = _between(row_vals, lo_v, hi.to(tl.float32, bitcast=True))
                else:
                    smallest, largest = _between_streamed(base, n, lo_v, hi.to(tl.float32, bitcast=True), BLOCK)
                if smallest == largest:
                    lo = smallest.to(tl.int32, bitcast=True)
                    hi = lo + 1
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
    _threshold_kernel[(rows.shape[0],)](rows, thr, n, rows.stride(0), frac, k, EXIT_MARGIN, TOP_K=top_k,
                                        IN_REGISTERS=in_registers, EARLY_EXIT=search == "bisect", BLOCK=block,
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
