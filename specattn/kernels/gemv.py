"""Matrix-vector products for decode steps of a few rows, in Triton, launched early (PDL).

A decode step at batch 1 multiplies one row by each projection: pure weight streaming, ~10 kernels a layer, and
each launch costs its start-up (first loads' latency, a partly idle last wave) on top of its bytes. cuBLAS also
runs split-K kernels plus a reduction kernel for the output and down projections. Here each program owns
BLOCK_N output columns over all of K (no split, no reduction launch) and keeps [rows, BLOCK_N, BLOCK_K] partial
sums in registers, reduced once at the end. Launched with programmatic dependent launch (pdl.py), a program
loads its first weight tile *before* waiting for the kernel ahead (weights are never written by a step), so the
stream starts while that kernel finishes. `add=out` adds the product into `out` in place (the residual stream: one
rounding, as cuBLAS's addmm_ with beta 1). Weights should be row-major [N, K] (K contiguous, each program reading
whole rows); other strides work but read poorly. Reference: F.linear in fp32.

Tried and removed (2026-11-29, results/profile_pdlmode_8b_b1.json): computing the down projection's input (SwiGLU
of the unnormed gate/up rows and their rms) inside this kernel, to save the SwiGLU launch: 8B-shaped step at batch
1 4,894 against 4,692 µs without (round-robin medians): each program recomputing the rms before its stream costs
more than the launch. Also tried (profile_l2_8b_b1.json): each program asking for all its weight rows in L2
(prefetch.global.L2) before its wait, to stream the output projection's weights during attention: 4,693 against
4,654 µs without, and 5,661 with every projection doing so.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import InvalidInputError
from .pdl import INTERPRETED, launch_options, wait_for_predecessor

MAX_ROWS = 4           # rows multiplied with FMAs, [rows, BLOCK_N, BLOCK_K] sums in registers; more: tensor cores
DOT_BLOCK_M = 64       # tensor-core path: rows per program at most (a program per block of rows and of columns)


@dataclass(frozen=True)
class GemvTiling:
    block_n: int = 8       # output columns per program
    block_k: int = 512
    num_warps: int = 4
    block_m: int | None = None   # tensor-core path: rows per program (None: row_blocks' default)
    num_stages: int = 3


@dataclass(frozen=True)
class RowBlocks:
    """How a product's rows are split over programs: FMA sums of all rows in one program (<= MAX_ROWS), or
    tensor-core tiles of block_m rows (DOT)."""
    block_m: int
    count: int
    dot: bool


def row_blocks(m: int, tiling: GemvTiling | None = None) -> RowBlocks:
    if m <= MAX_ROWS:
        return RowBlocks(max(1, triton.next_power_of_2(m)), 1, False)
    block_m = tiling.block_m if tiling is not None and tiling.block_m else DOT_BLOCK_M
    block_m = min(block_m, max(16, triton.next_power_of_2(m)))
    return RowBlocks(block_m, triton.cdiv(m, block_m), True)


def load_dot_tilings(path: str | None) -> dict[tuple[int, int, int], GemvTiling]:
    """Tensor-core tilings by (rows rounded up to a power of two, N, K), from a JSON list of {"m", "n", "k",
    "tiling": {GemvTiling fields}} (benchmarks/tune_gemv.py --tilings-out writes one): how a sweep's winners reach
    a step for timing (environment SPECATTN_GEMV_DOT_TILINGS) before any becomes a rule in choose_tiling."""
    if not path:
        return {}
    try:
        with open(path) as f:
            return {(triton.next_power_of_2(e["m"]), e["n"], e["k"]): GemvTiling(**e["tiling"]) for e in json.load(f)}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(f"tensor-core tilings {path} (SPECATTN_GEMV_DOT_TILINGS): {type(e).__name__}: {e}; "
                                "give a file written by benchmarks/tune_gemv.py --tilings-out, or unset it") from None


DOT_TILINGS = load_dot_tilings(os.environ.get("SPECATTN_GEMV_DOT_TILINGS"))


def choose_tiling(m: int, n: int, k: int) -> GemvTiling:
    """Tensor-core path (more than MAX_ROWS rows): the sweep's tiling for this shape where DOT_TILINGS holds one, else
    32 columns and 64 keys a tile (not yet timed). FMA path: the
    fastest tiling at one and two rows in the H200 sweep (results/tune_gemv_pdl.json): 8 columns a program; a whole
    row of K <= 1,024 (Qwen2.5 0.5B / 1.5B) in one or two tiles; at K = 4,096 256-key tiles over 8 warps for the
    wide q/k/v product (6,144 columns, one row: 15.2 against 18.4 us for 512 x 4 warps), 512-key tiles otherwise;
    16 columns over 8 warps for outputs of 8,192 columns and more at one row (results/tune_gemv_70b.json)."""
    if m > MAX_ROWS:
        return DOT_TILINGS.get((triton.next_power_of_2(m), n, k), GemvTiling(32, 64, 4))
    if n >= 16384:                     # gate/up products: 16 columns at one row (8B: 59.8 us, as cuBLAS)
        return GemvTiling(16 if m == 1 else 8, 256, 4)
    if k <= 2048:
        return GemvTiling(8, 1024, 4)
    if n >= 8192 and m == 1:           # a 70B rank's (TP=2) output and down products: 19.7 / 58.5 against 24.2 /
        return GemvTiling(16, 256, 8)  # 74.1 us for 8 x 512 over 4 warps (cuBLAS 19.3 / 57.4; tune_gemv_70b.json)
    if n >= 5120:                      # ... and its q/k/v product (5,120 columns): 25.5 against 33.7 us
        return GemvTiling(8, 256, 8 if m == 1 else 4)
    return GemvTiling(8, 512 if m <= 2 else 256, 4)


@triton.jit
def _dot(x, w, acc, UPCAST: tl.constexpr):
    """acc + x [BLOCK_M, BLOCK_K] @ w [BLOCK_N, BLOCK_K].T on tensor cores (fp32 operands in the interpreter, whose
    bf16 tl.dot is wrong)."""
    if UPCAST:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def stream_rows(x_ptr, stride_xm, w_rows, stride_wk, col_ok, row0, M, K, PDL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr):
    """The product of rows x[row0: row0 + BLOCK_M] (of M) with this program's BLOCK_N weight rows (pointers w_rows
    [BLOCK_N, 1]) over all of K: (fp32 [BLOCK_M, BLOCK_N], each row's sum of squares of x [BLOCK_M], for a folded
    norm's rms). The first weight tile is loaded before the PDL wait: weights are never written by a step, x comes
    from the kernel ahead. DOT: tensor-core tiles (more than MAX_ROWS rows), else FMA sums over [rows, BLOCK_N,
    BLOCK_K] in registers, reduced once at the end."""
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ks = tl.arange(0, BLOCK_K)
    w = tl.load(w_rows + ks[None, :] * stride_wk, mask=col_ok[:, None] & (ks < K)[None, :], other=0.0)
    wait_for_predecessor(PDL)
    squares = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    if DOT:
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :],
                    other=0.0)
        squares += x.to(tl.float32) * x.to(tl.float32)
        acc = _dot(x, w, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST)
        for k0 in range(BLOCK_K, K, BLOCK_K):      # the rest pipelined by Triton (num_stages)
            k_ok = (k0 + ks < K)[None, :]
            w = tl.load(w_rows + (k0 + ks)[None, :] * stride_wk, mask=col_ok[:, None] & k_ok, other=0.0)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok,
                        other=0.0)
            squares += x.to(tl.float32) * x.to(tl.float32)
            acc = _dot(x, w, acc, UPCAST)
        product = acc
    else:
        acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            nxt = k0 + BLOCK_K + ks
            w_next = tl.load(w_rows + nxt[None, :] * stride_wk, mask=col_ok[:, None] & (nxt < K)[None, :],
                             other=0.0)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + ks)[None, :],
                        mask=row_ok[:, None] & (k0 + ks < K)[None, :], other=0.0).to(tl.float32)
            squares += x * x
            acc3 += x[:, None, :] * w.to(tl.float32)[None, :, :]
            w = w_next
        product = tl.sum(acc3, 2)
    return product, tl.sum(squares, 1)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, add_ptr, M, N, K, stride_xm, stride_wn, stride_wk, stride_om, stride_am,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ADD: tl.constexpr,
                 DOT: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    row0 = tl.program_id(1) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    y, _ = stream_rows(x_ptr, stride_xm, w_rows, stride_wk, col_ok, row0, M, K, PDL, BLOCK_M, BLOCK_N, BLOCK_K, DOT,
                       UPCAST)
    ok = (rows < M)[:, None] & col_ok[None, :]
    if ADD:
        y += tl.load(add_ptr + rows[:, None] * stride_am + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None, add: torch.Tensor | None = None,
         tiling: GemvTiling | None = None) -> torch.Tensor:
    """x [M, K], weight [N, K] -> x @ weight.T (+ add) [M, N] in x's dtype, written to `out` if given (add may be
    out itself: accumulate in place). Up to MAX_ROWS rows with FMAs, more on tensor cores (see row_blocks)."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"gemv: rows of width {k} against a weight of width {weight.shape[1]}")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    for name, t in (("out", out), ("add", add)):
        if t is not None and (t.shape != (m, n) or t.stride(1) != 1):
            raise ValueError(f"{name} must be [{m}, {n}] with contiguous columns, got {tuple(t.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    t = tiling or choose_tiling(m, n, k)
    blocks = row_blocks(m, t)
    _gemv_kernel[(triton.cdiv(n, t.block_n), blocks.count)](
        x, weight, out, add if add is not None else out, m, n, k, x.stride(0), weight.stride(0), weight.stride(1),
        out.stride(0), (add if add is not None else out).stride(0), BLOCK_M=blocks.block_m, BLOCK_N=t.block_n,
        BLOCK_K=t.block_k, ADD=add is not None, DOT=blocks.dot, UPCAST=INTERPRETED, num_warps=t.num_warps,
        num_stages=t.num_stages,
        **launch_options(x.device))
    return out
