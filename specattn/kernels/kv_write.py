"""Write new keys and values into their cache slots in one launch (instead of two index copies).

Reference: `reference.write_kv`. Each program copies one token's K and V rows (kv_heads * head_dim
contiguous elements each) to `slot` of the flat page pool.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, slots_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < ROW
    tl.store(k_pool_ptr + slot * ROW + offs, tl.load(k_ptr + i * stride_k + offs, mask=ok), mask=ok)
    tl.store(v_pool_ptr + slot * ROW + offs, tl.load(v_ptr + i * stride_v + offs, mask=ok), mask=ok)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k_pool, v_pool: [pages, page_size, kv_heads, dim] (one layer); k, v: [batch, q_len, kv_heads, dim] whose
    last two dims are contiguous (rows may be strided); slots: [batch * q_len]."""
    row = k.shape[-1] * k.shape[-2]
    k2, v2 = k.reshape(-1, row), v.reshape(-1, row)
    _write_kv_kernel[(k2.shape[0],)](k2, v2, k_pool, v_pool, slots, k2.stride(0), v2.stride(0),
                                     ROW=row, BLOCK=triton.next_power_of_2(row), num_warps=4)
