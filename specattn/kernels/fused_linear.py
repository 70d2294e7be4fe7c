"""Projections of a decode/verify step with their pointwise neighbours folded in, in Triton.

A small-batch step is launch-bound: each layer ran ~10 kernels, half of them a few microseconds of pointwise
work around the GEMMs. Two kernels here take three of those launches away per layer:

- `norm_linear`: residual add, RMSNorm and the projection (qkv or gate/up) in one pass. The norm's scale
  1/rms(x) is constant per row, so it is applied to the product at the end: each program sums x^2 over the
  same chunks it multiplies, and no program needs another's result.
- `swiglu_linear`: silu(gate) * up computed while loading the down projection's input.

One program owns BLOCK_N output columns for all M rows (M <= MAX_ROWS) and streams its weight columns once.
Reference: `norm_linear_reference` / `swiglu_linear_reference` (the model's own eager functions).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .paged_attention import INTERPRETED  # the interpreter gets tl.dot wrong on bf16/fp16 operands

MAX_ROWS = 64          # batch x new tokens handled here; larger steps use cuBLAS through the compiled functions


@dataclass(frozen=True)
class Tiling:
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3


TILING = Tiling()


@triton.jit
def _add_tile_product(acc, a, w_ptr, cols, ks, k_ok, col_ok, stride_wn, stride_wk, UPCAST_DOT: tl.constexpr):
    """acc + a [BLOCK_M, BLOCK_K] @ the weight tile W[cols, ks]^T (fp32 accumulation)."""
    w = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :],
                other=0.0)
    if UPCAST_DOT:
        return acc + tl.dot(a.to(tl.float32), w.to(tl.float32))
    return acc + tl.dot(a.to(w.dtype), w)


@triton.jit
def _norm_linear_kernel(x_ptr, res_ptr, g_ptr, w_ptr, bias_ptr, x_out_ptr, y_ptr, M, N, K, eps,
                        stride_wn, stride_wk,
                        HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sum_sq = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        here = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=here, other=0.0)
        if HAS_RES:   # the residual stream gains the previous output, rounded like the eager add
            x = (x.to(tl.float32) + tl.load(res_ptr + rows[:, None] * K + ks[None, :], mask=here,
                                            other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(x_out_ptr + rows[:, None] * K + ks[None, :], x, mask=here & (pid == 0))
        xf = x.to(tl.float32)
        sum_sq += tl.sum(xf * xf, 1)
        g = tl.load(g_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        acc = _add_tile_product(acc, xf * g[None, :], w_ptr, cols, ks, k_ok, col_ok, stride_wn, stride_wk, UPCAST_DOT)
    y = acc * tl.rsqrt(sum_sq / K + eps)[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _swiglu_linear_kernel(h_ptr, w_ptr, y_ptr, M, N, K, stride_wn, stride_wk, UPCAST_DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        here = row_ok[:, None] & k_ok[None, :]
        gate = tl.load(h_ptr + rows[:, None] * (2 * K) + ks[None, :], mask=here, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + rows[:, None] * (2 * K) + K + ks[None, :], mask=here, other=0.0).to(tl.float32)
        # silu(gate) * up rounded once to the model dtype, as the compiled eager function does
        a = (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty)
        acc = _add_tile_product(acc, a, w_ptr, cols, ks, k_ok, col_ok, stride_wn, stride_wk, UPCAST_DOT)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def fits(rows: int) -> bool:
    return rows <= MAX_ROWS


def _block_m(rows: int) -> int:
    return max(16, triton.next_power_of_2(rows))      # tl.dot needs 16 rows at least


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_w: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None,
                tiling: Tiling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [M, K] (residual None: nothing to add); weight [N, K] (any strides). Returns (x + residual,
    F.linear(rms_norm(x + residual) * norm_w, weight, bias)) as [M, K], [M, N]."""
    m, k = x.shape
    n = weight.shape[0]
    t = tiling or TILING
    x = x.contiguous()
    x_out = torch.empty_like(x) if residual is not None else x
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _norm_linear_kernel[(triton.cdiv(n, t.block_n),)](
        x, residual.contiguous() if residual is not None else x, norm_w, weight,
        bias if bias is not None else norm_w, x_out, y, m, n, k, eps, weight.stride(0), weight.stride(1),
        HAS_RES=residual is not None, HAS_BIAS=bias is not None, UPCAST_DOT=INTERPRETED,
        BLOCK_M=_block_m(m), BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages)
    return x_out, y


def swiglu_linear(gate_up: torch.Tensor, weight: torch.Tensor, tiling: Tiling | None = None) -> torch.Tensor:
    """gate_up: [M, 2I] (gate then up); weight [N, I]. Returns F.linear(silu(gate) * up, weight): [M, N]."""
    m, two_k = gate_up.shape
    n = weight.shape[0]
    t = tiling or TILING
    y = torch.empty(m, n, dtype=gate_up.dtype, device=gate_up.device)
    _swiglu_linear_kernel[(triton.cdiv(n, t.block_n),)](
        gate_up.contiguous(), weight, y, m, n, two_k // 2, weight.stride(0), weight.stride(1),
        UPCAST_DOT=INTERPRETED, BLOCK_M=_block_m(m), BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps,
        num_stages=t.num_stages)
    return y


def norm_linear_reference(x, residual, norm_w, eps: float, weight, bias=None):
    from ..model import rms_norm
    if residual is not None:
        x = x + residual
    return x, F.linear(rms_norm(x, norm_w, eps), weight, bias)


def swiglu_linear_reference(gate_up, weight):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight)
