"""Rotary embedding of q and k and the K/V cache write in one launch (instead of three kernels).

Input is the fused q/k/v projection of the new tokens; output the rotated queries, while the rotated keys and
the values go straight to their cache slots. Reference: `reference.rope_and_write_kv`. The rotation is computed
in fp32 and rounded once, as torch.compile's fused version of `model.apply_rope` does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(base, heads, cos1, cos2, sin1, sin2, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    ok = (h < heads) & (d < HALF)
    x1 = tl.load(base + h * (2 * HALF) + d, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + h * (2 * HALF) + HALF + d, mask=ok, other=0.0).to(tl.float32)
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2, h * (2 * HALF) + d, ok


@triton.jit
def _rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, k_pool_ptr, v_pool_ptr, slots_ptr,
                       stride_row, stride_cs, heads, kv_heads,
                       HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr):
    row = tl.program_id(0)                       # one new token (batch x q_len flattened)
    d = tl.arange(0, BLOCK_D)[None, :]
    d_ok = d < HALF
    cs = row * stride_cs
    cos1 = tl.load(cos_ptr + cs + d, mask=d_ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + cs + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + cs + d, mask=d_ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + cs + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
    src = qkv_ptr + row.to(tl.int64) * stride_row
    q_dim = heads * 2 * HALF
    kv_dim = kv_heads * 2 * HALF

    a, b, off, ok = _rotate(src, heads, cos1, cos2, sin1, sin2, HALF, BLOCK_D, BLOCK_Q)
    dst = q_out_ptr + row.to(tl.int64) * q_dim + off
    tl.store(dst, a.to(q_out_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + HALF, b.to(q_out_ptr.dtype.element_ty), mask=ok)

    slot = tl.load(slots_ptr + row).to(tl.int64)
    a, b, off, ok = _rotate(src + q_dim, kv_heads, cos1, cos2, sin1, sin2, HALF, BLOCK_D, BLOCK_KV)
    tl.store(k_pool_ptr + slot * kv_dim + off, a.to(k_pool_ptr.dtype.element_ty), mask=ok)
    tl.store(k_pool_ptr + slot * kv_dim + off + HALF, b.to(k_pool_ptr.dtype.element_ty), mask=ok)
    v = tl.load(src + q_dim + kv_dim + off, mask=ok)
    v2 = tl.load(src + q_dim + kv_dim + off + HALF, mask=ok)
    tl.store(v_pool_ptr + slot * kv_dim + off, v, mask=ok)
    tl.store(v_pool_ptr + slot * kv_dim + off + HALF, v2, mask=ok)


def rope_and_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor,
                      v_pool: torch.Tensor, slots: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """qkv: [batch, q_len, (heads + 2 kv_heads) * dim] (rows may be strided, the last dim contiguous);
    cos, sin: [batch, q_len, 1, dim]; pools: one layer's [pages, page_size, kv_heads, dim]; slots:
    [batch * q_len]. Returns q rotated: [batch, q_len, heads, dim]."""
    b, t, width = qkv.shape
    dim = width // (heads + 2 * kv_heads)
    qkv2 = qkv.reshape(b * t, width)
    cos2, sin2 = cos.reshape(b * t, dim).contiguous(), sin.reshape(b * t, dim).contiguous()
    q = torch.empty(b, t, heads, dim, dtype=qkv.dtype, device=qkv.device)
    _rope_write_kernel[(b * t,)](qkv2, cos2, sin2, q, k_pool, v_pool, slots, qkv2.stride(0), cos2.stride(0),
                                 heads, kv_heads, HALF=dim // 2, BLOCK_D=triton.next_power_of_2(dim // 2),
                                 BLOCK_Q=triton.next_power_of_2(heads), BLOCK_KV=triton.next_power_of_2(kv_heads),
                                 num_warps=4)
    return q
