"""Rotary embedding of q and k and the K/V cache write in one launch (instead of three kernels).

Input is the fused q/k/v projection of the new tokens; output the rotated queries, while the rotated keys and
the values go straight to their cache slots. Reference: `reference.rope_and_write_kv`. The rotation is computed
in fp32 and rounded once, as torch.compile's fused version of `model.apply_rope` does. With norm weights folded
into the projection (`Transformer.fold_norms`), it also applies each row's 1 / rms and the projection's bias.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv import MAX_ROWS, choose_tiling, row_blocks, stream_rows
from .pdl import INTERPRETED, launch_options, wait_for_predecessor


@triton.jit
def _load_scaled(base, bias_base, off, ok, r, BIAS: tl.constexpr):
    x = tl.load(base + off, mask=ok, other=0.0).to(tl.float32) * r
    if BIAS:
        x += tl.load(bias_base + off, mask=ok, other=0.0).to(tl.float32)
    return x


@triton.jit
def _rotate(base, bias_base, heads, r, cos1, cos2, sin1, sin2, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_H: tl.constexpr, BIAS: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    ok = (h < heads) & (d < HALF)
    off = h * (2 * HALF) + d
    x1 = _load_scaled(base, bias_base, off, ok, r, BIAS)
    x2 = _load_scaled(base, bias_base, off + HALF, ok, r, BIAS)
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2, off, ok


@triton.jit
def _rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, k_pool_ptr, v_pool_ptr, slots_ptr, x_ptr, bias_ptr,
                       stride_row, stride_cs, stride_x, heads, kv_heads, hidden, eps,
                       HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
                       NORM: tl.constexpr, BIAS: tl.constexpr, BLOCK_X: tl.constexpr, PDL: tl.constexpr):
    wait_for_predecessor(PDL)
    row = tl.program_id(0)                       # one new token (batch x q_len flattened)
    d = tl.arange(0, BLOCK_D)[None, :]
    d_ok = d < HALF
    cs = row * stride_cs
    cos1 = tl.load(cos_ptr + cs + d, mask=d_ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + cs + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + cs + d, mask=d_ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + cs + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
    if NORM:     # the projection read the row before its RMSNorm: scale by its 1 / rms here
        cols = tl.arange(0, BLOCK_X)
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=cols < hidden, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    else:
        r = 1.0
    src = qkv_ptr + row.to(tl.int64) * stride_row
    q_dim = heads * 2 * HALF
    kv_dim = kv_heads * 2 * HALF

    a, b, off, ok = _rotate(src, bias_ptr, heads, r, cos1, cos2, sin1, sin2, HALF, BLOCK_D, BLOCK_Q, BIAS)
    dst = q_out_ptr + row.to(tl.int64) * q_dim + off
    tl.store(dst, a.to(q_out_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + HALF, b.to(q_out_ptr.dtype.element_ty), mask=ok)

    slot = tl.load(slots_ptr + row).to(tl.int64)
    a, b, off, ok = _rotate(src + q_dim, bias_ptr + q_dim, kv_heads, r, cos1, cos2, sin1, sin2, HALF, BLOCK_D,
                            BLOCK_KV, BIAS)
    tl.store(k_pool_ptr + slot * kv_dim + off, a.to(k_pool_ptr.dtype.element_ty), mask=ok)
    tl.store(k_pool_ptr + slot * kv_dim + off + HALF, b.to(k_pool_ptr.dtype.element_ty), mask=ok)
    if NORM:
        v = _load_scaled(src + q_dim + kv_dim, bias_ptr + q_dim + kv_dim, off, ok, r, BIAS)
        v2 = _load_scaled(src + q_dim + kv_dim, bias_ptr + q_dim + kv_dim, off + HALF, ok, r, BIAS)
    else:        # copied as they are
        v = tl.load(src + q_dim + kv_dim + off, mask=ok)
        v2 = tl.load(src + q_dim + kv_dim + off + HALF, mask=ok)
    tl.store(v_pool_ptr + slot * kv_dim + off, v.to(v_pool_ptr.dtype.element_ty), mask=ok)
    tl.store(v_pool_ptr + slot * kv_dim + off + HALF, v2.to(v_pool_ptr.dtype.element_ty), mask=ok)


def rope_and_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor,
                      v_pool: torch.Tensor, slots: torch.Tensor, heads: int, kv_heads: int,
                      norm_of: torch.Tensor | None = None, eps: float = 0.0,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """qkv: [batch, q_len, (heads + 2 kv_heads) * dim] (rows may be strided, the last dim contiguous);
    cos, sin: [batch, q_len, 1, dim]; pools: one layer's [pages, page_size, kv_heads, dim]; slots:
    [batch * q_len]. Returns q rotated: [batch, q_len, heads, dim]. norm_of, eps, bias: as in
    `reference.rope_and_write_kv` (the projection of rows before their folded RMSNorm)."""
    b, t, width = qkv.shape
    dim = width // (heads + 2 * kv_heads)
    qkv2 = qkv.reshape(b * t, width)
    cos2, sin2 = cos.reshape(b * t, dim).contiguous(), sin.reshape(b * t, dim).contiguous()
    q = torch.empty(b, t, heads, dim, dtype=qkv.dtype, device=qkv.device)
    norm = norm_of is not None
    x = norm_of.reshape(b * t, -1) if norm else qkv2
    if norm and x.stride(-1) != 1:
        x = x.contiguous()
    with_bias = norm and bias is not None
    _rope_write_kernel[(b * t,)](qkv2, cos2, sin2, q, k_pool, v_pool, slots, x, bias if with_bias else qkv2,
                                 qkv2.stride(0), cos2.stride(0), x.stride(0), heads, kv_heads, x.shape[-1], eps,
                                 HALF=dim // 2, BLOCK_D=triton.next_power_of_2(dim // 2),
                                 BLOCK_Q=triton.next_power_of_2(heads), BLOCK_KV=triton.next_power_of_2(kv_heads),
                                 NORM=norm, BIAS=with_bias, BLOCK_X=triton.next_power_of_2(x.shape[-1]) if norm else 16,
                                 num_warps=4, **launch_options(qkv.device))
    return q


@triton.jit
def _qkv_rope_write_kernel(x_ptr, w_ptr, bias_ptr, cos_ptr, sin_ptr, q_out_ptr, k_pool_ptr, v_pool_ptr, slots_ptr,
                           M, K, stride_xm, stride_wn, stride_cs, heads, kv_heads, eps,
                           HALF: tl.constexpr, PAIRS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                           BIAS: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    # Program p computes PAIRS rotation pairs (j, j + HALF) of one head (q heads, then k, then v) as a gemv over all
    # of K: its 2 * PAIRS weight rows are taken pair by pair, so the rotation needs nothing from other programs.
    head = tl.program_id(0) // (HALF // PAIRS)
    j0 = (tl.program_id(0) % (HALF // PAIRS)) * PAIRS
    j = j0 + tl.arange(0, PAIRS)
    i = tl.arange(0, 2 * PAIRS)
    cols = head * (2 * HALF) + (i % 2) * HALF + j0 + i // 2
    row0 = tl.program_id(1) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    product, squares = stream_rows(x_ptr, stride_xm, w_rows, 1, cols >= 0, row0, M, K, PDL, BLOCK_M, 2 * PAIRS,
                                   BLOCK_K, DOT, UPCAST)
    # Rounded to the weights' dtype first, as the product F.linear would hand rope_and_write_kv: a small step then
    # rounds as a verify step of many rows does, and greedy decoding flips fewer near-tied tokens between them.
    y = product.to(w_ptr.dtype.element_ty).to(tl.float32) * tl.rsqrt(squares / K + eps)[:, None]
    if BIAS:
        y += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    x1, x2 = tl.split(tl.reshape(y, [BLOCK_M, PAIRS, 2]))      # the pairs' first and second halves
    cs = rows[:, None] * stride_cs + j[None, :]
    ok = row_ok[:, None]
    is_q, is_v = head < heads, head >= heads + kv_heads
    if not is_v:
        cos1 = tl.load(cos_ptr + cs, mask=ok, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + cs + HALF, mask=ok, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + cs, mask=ok, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + cs + HALF, mask=ok, other=0.0).to(tl.float32)
        x1, x2 = x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2
    if is_q:
        dst = q_out_ptr + (rows[:, None] * heads + head) * (2 * HALF) + j[None, :]
    else:
        kv_dim = kv_heads * 2 * HALF
        slot = tl.load(slots_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        pool = tl.where(is_v, v_pool_ptr, k_pool_ptr)
        kvh = head - heads - tl.where(is_v, kv_heads, 0)
        dst = pool + slot[:, None] * kv_dim + kvh * (2 * HALF) + j[None, :]
    tl.store(dst, x1.to(q_out_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + HALF, x2.to(q_out_ptr.dtype.element_ty), mask=ok)


def project_rope_and_write_kv(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, heads: int,
                              kv_heads: int, eps: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`rope_and_write_kv(F.linear(x, weight), ..., norm_of=x)` for a step's rows as one kernel: the q/k/v
    product of rows x [batch, q_len, hidden] taken before their folded RMSNorm (weight [(heads + 2 kv_heads) *
    dim, hidden], row-major), scaled by each row's 1 / rms (summed as x streams by), bias added, q and k rotated,
    k and v stored at `slots`. Returns q [batch, q_len, heads, dim]. More than gemv.MAX_ROWS rows run on tensor
    cores, which need 8 rotation pairs a program (16 weight rows): head_dim a multiple of 16 there."""
    b, t, hidden = x.shape
    width = weight.shape[0]
    dim = width // (heads + 2 * kv_heads)
    rows = x.reshape(b * t, hidden)
    tiling = choose_tiling(b * t, width, hidden)
    blocks = row_blocks(b * t, tiling)
    if weight.shape[1] != hidden or weight.stride(1) != 1 or dim % (16 if blocks.dot else 2):
        raise ValueError(f"project_rope_and_write_kv takes a row-major weight [(heads + 2 kv_heads) * dim, {hidden}] "
                         f"(dim a multiple of 16 above {MAX_ROWS} rows), got rows {tuple(rows.shape)}, weight "
                         f"{tuple(weight.shape)} strides {weight.stride()}")
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    pairs = min(max(8, tiling.block_n // 2) if blocks.dot else tiling.block_n // 2, dim // 2)
    while (dim // 2) % pairs:          # a program's pairs lie in one head
        pairs //= 2
    cos2, sin2 = cos.reshape(b * t, dim).contiguous(), sin.reshape(b * t, dim).contiguous()
    q = torch.empty(b, t, heads, dim, dtype=x.dtype, device=x.device)
    _qkv_rope_write_kernel[(width // (2 * pairs), blocks.count)](
        rows, weight, bias if bias is not None else weight, cos2, sin2, q, k_pool, v_pool, slots, b * t, hidden,
        rows.stride(0), weight.stride(0), cos2.stride(0), heads, kv_heads, eps, HALF=dim // 2, PAIRS=pairs,
        BLOCK_M=blocks.block_m, BLOCK_K=tiling.block_k, BIAS=bias is not None, DOT=blocks.dot, UPCAST=INTERPRETED,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages, **launch_options(x.device))
    return q
