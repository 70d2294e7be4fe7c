"""Split-K matrix-vector products for decode steps of a few rows, in Triton.

A decode step at batch 1 multiplies one row by each projection: pure weight streaming. cuBLAS picks split-K
kernels for these shapes and adds a reduction kernel after them. Here each program owns BLOCK_N output columns
over one of `splits` slices of K and writes fp32 partial sums [splits, M, N]; whoever consumes the product sums
the slices as part of its own pointwise work, so no reduction kernel is launched. Deterministic: each partial
has one writer and the slices are summed in a fixed order. The weight may be stored row-major [N, K] or as the
transposed view of a [K, N] tensor (`Transformer.store_weights_column_major`); strides handle both.
Reference: `partials_reference` (and F.linear on their sum).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 4           # rows per product handled here; a wider product loads each weight tile for too many rows


@dataclass(frozen=True)
class GemvTiling:
    block_n: int = 64
    block_k: int = 128
    splits: int = 4
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _gemv_partials_kernel(x_ptr, w_ptr, out_ptr, M, N, K, k_per_split, stride_xm, stride_wn, stride_wk,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_hi
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=(rows < M)[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    out = out_ptr + (split * M + rows[:, None]).to(tl.int64) * N + cols[None, :]
    tl.store(out, acc, mask=(rows < M)[:, None] & col_ok[None, :])


def choose_tiling(n: int, k: int, num_sms: int = 132) -> GemvTiling:
    """Enough (column block, K slice) programs to fill the SMs about twice, K slices no shorter than 512."""
    tiling = GemvTiling()
    col_blocks = triton.cdiv(n, tiling.block_n)
    return dataclasses.replace(tiling, splits=max(1, min(triton.cdiv(2 * num_sms, col_blocks), k // 512)))


def gemv_partials(x: torch.Tensor, weight: torch.Tensor, tiling: GemvTiling | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, contiguous rows), weight [N, K] (any strides) -> fp32 partial products
    [splits, M, N] whose sum over dim 0 is x @ weight.T."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS or weight.shape[1] != k:
        raise ValueError(f"gemv_partials takes at most {MAX_ROWS} rows of width {weight.shape[1]}, "
                         f"got {tuple(x.shape)}")
    tiling = tiling or choose_tiling(n, k)
    x = x.contiguous()
    k_per_split = triton.cdiv(triton.cdiv(k, tiling.splits), tiling.block_k) * tiling.block_k
    splits = triton.cdiv(k, k_per_split)
    out = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    _gemv_partials_kernel[(triton.cdiv(n, tiling.block_n), splits)](
        x, weight, out, m, n, k, k_per_split, x.stride(0), weight.stride(0), weight.stride(1),
        BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    return out


def partials_reference(x: torch.Tensor, weight: torch.Tensor, splits: int, block_k: int) -> torch.Tensor:
    """The same slices of K as gemv_partials, in PyTorch fp32."""
    k = x.shape[1]
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return torch.stack([x[:, lo: lo + k_per_split].float() @ weight[:, lo: lo + k_per_split].float().T
                        for lo in range(0, k, k_per_split)])
