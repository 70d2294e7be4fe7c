"""Sorting-free top-p (nucleus) and top-k selection over attention weights, in Triton.

Non-negative floats order like their bit patterns read as integers, so the selection threshold is found
by bisection on the integer domain: the largest theta with mass(a >= theta) >= p * total (top-p) or
count(a >= theta) >= k (top-k). About 30 halvings give the exact threshold, an element of the row; the
set is then {a >= theta}: ties at theta are all kept, deterministically. One program per row. Rows of up to
ROW_IN_REGISTERS keys are loaded once and bisected in registers; longer rows are re-read from L2 on each
halving. Reference: `reference.topp_threshold` (torch.sort + cumsum).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
ROW_IN_REGISTERS = 32768


@triton.jit
def _reaches(a, theta, goal, TOP_K: tl.constexpr):
    # Padding is loaded as 0 and theta > 0 on every halving, so padding never counts.
    return tl.sum(tl.where(a >= theta, 1.0 if TOP_K else a, 0.0), 0) >= goal


@triton.jit
def _threshold_kernel(x_ptr, thr_ptr, n, stride, target_frac, k, TOP_K: tl.constexpr, IN_REGISTERS: tl.constexpr,
                      BLOCK: tl.constexpr):
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


def _thresholds(x: torch.Tensor, top_k: bool, frac: float, k: int) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    n = rows.shape[1]
    thr = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    in_registers = n <= ROW_IN_REGISTERS
    block = triton.next_power_of_2(n) if in_registers else BLOCK
    warps = 16 if block >= 16384 else 8
    _threshold_kernel[(rows.shape[0],)](rows, thr, n, rows.stride(0), frac, k, TOP_K=top_k,
                                        IN_REGISTERS=in_registers, BLOCK=block, num_warps=warps)
    return thr.view(x.shape[:-1])


def topp_threshold(weights: torch.Tensor, p: float) -> torch.Tensor:
    """weights: [..., n] >= 0 -> theta [...]: {w >= theta} is the smallest top set holding mass >= p * sum
    (up to ties at theta). p >= 1 keeps everything: fp32 sums in another order could otherwise drop
    weights below rounding, and p = 1 must mean dense."""
    if p >= 1.0:
        return torch.zeros(weights.shape[:-1], dtype=torch.float32, device=weights.device)
    return _thresholds(weights, False, p, 0)


def topk_threshold(weights: torch.Tensor, k: int) -> torch.Tensor:
    """weights: [..., n] >= 0 -> theta [...]: {w >= theta} holds the k largest (more only on ties)."""
    return _thresholds(weights, True, 0.0, k)
