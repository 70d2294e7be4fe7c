"""Sorting-free top-p (nucleus) and top-k selection over attention weights, in Triton.

Non-negative floats order like their bit patterns read as integers, so the selection threshold is found
by bisection on the integer domain: the largest theta with mass(a >= theta) >= p * total (top-p) or
count(a >= theta) >= k (top-k). About 31 halvings give the exact threshold, an element of the row; the
set is then {a >= theta}: ties at theta are all kept, deterministically. One program per row; the row is
re-read from L2 on each halving. Reference: `reference.topp_threshold` (torch.sort + cumsum).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _threshold_kernel(x_ptr, thr_ptr, n, stride, target_frac, k, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    total = tl.zeros([BLOCK], tl.float32)
    top = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        a = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
        total += a
        top = tl.maximum(top, a)
    target = tl.sum(total, 0) * target_frac
    # Invariant: the set {a >= bits(lo)} reaches the target, {a >= bits(hi)} does not.
    lo = tl.zeros([], tl.int32)
    hi = tl.max(top, 0).to(tl.int32, bitcast=True) + 1
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        theta = mid.to(tl.float32, bitcast=True)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            a = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
            if TOP_K:
                acc += tl.where((a >= theta) & (offs < n), 1.0, 0.0)
            else:
                acc += tl.where(a >= theta, a, 0.0)
        reached = tl.sum(acc, 0) >= (k if TOP_K else target)
        lo = tl.where(reached, mid, lo)
        hi = tl.where(reached, hi, mid)
    tl.store(thr_ptr + row, lo.to(tl.float32, bitcast=True))


def _thresholds(x: torch.Tensor, top_k: bool, frac: float, k: int) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    thr = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    _threshold_kernel[(rows.shape[0],)](rows, thr, rows.shape[1], rows.stride(0), frac, k, TOP_K=top_k,
                                        BLOCK=min(BLOCK, triton.next_power_of_2(rows.shape[1])), num_warps=8)
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
