"""Vegas's selection scores in Triton: the softmax weight every key gets from the first and the last verified row,
averaged over all query heads and the two rows. The verify pass already knows each row's log-sum-exp, so one more
read of K gives exact probabilities (exp(q.k * scale - lse)) with no second normalisation pass.
Reference: `reference.two_row_token_scores`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_attention import INTERPRETED


@triton.jit
def _two_row_scores_kernel(q_ptr, k_ptr, page_table_ptr, lens_ptr, lse_ptr, out_ptr, scale,
                           stride_qb, stride_qt, stride_qh, stride_kp, stride_kr, stride_kh, stride_ptb, out_len,
                           Q_LEN: tl.constexpr, HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                           PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                           UPCAST_DOT: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)          # key positions
    seq_len = tl.load(lens_ptr + b)
    key_ok = j < seq_len
    page = tl.load(page_table_ptr + b * stride_ptb + j // PAGE_SIZE, mask=key_ok, other=0)
    slot = page.to(tl.int64) * stride_kp + (j % PAGE_SIZE) * stride_kr
    r = tl.arange(0, BLOCK_R)                                        # row r = (which of the two rows, head in group)
    row_ok = r < 2 * GROUP
    t = tl.where(r < GROUP, 0, Q_LEN - 1)
    dims = tl.arange(0, HEAD_DIM)
    query_pos = seq_len - Q_LEN + t
    total = tl.zeros([BLOCK_N], tl.float32)
    for kvh in tl.static_range(HEADS // GROUP):
        head = kvh * GROUP + r % GROUP
        q = tl.load(q_ptr + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None], other=0.0)
        k = tl.load(k_ptr + slot[:, None] + kvh * stride_kh + dims[None, :], mask=key_ok[:, None], other=0.0)
        if UPCAST_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        lse = tl.load(lse_ptr + (b * Q_LEN + t) * HEADS + head, mask=row_ok, other=0.0)
        visible = row_ok[:, None] & key_ok[None, :] & (j[None, :] <= query_pos[:, None])
        total += tl.sum(tl.where(visible, tl.exp(s - lse[:, None]), 0.0), 0)
    tl.store(out_ptr + b * out_len + j, total / (2 * HEADS), mask=j < out_len)


def two_row_token_scores(q: torch.Tensor, k_pages: torch.Tensor, page_table: torch.Tensor, lens_after: torch.Tensor,
                         lse: torch.Tensor, scale: float, block_n: int = 64) -> torch.Tensor:
    """q: [batch, q_len, heads, dim]; lse: [batch, q_len, heads] from the verify pass ->
    [batch, page_table.shape[1] * page_size] fp32 (zero past each sequence's visible keys)."""
    batch, q_len, heads, dim = q.shape
    page_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = heads // kv_heads
    out_len = page_table.shape[1] * page_size
    out = torch.empty(batch, out_len, dtype=torch.float32, device=q.device)
    q = q.contiguous()
    _two_row_scores_kernel[(batch, triton.cdiv(out_len, block_n))](
        q, k_pages, page_table, lens_after, lse.contiguous(), out, scale,
        q.stride(0), q.stride(1), q.stride(2), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        page_table.stride(0), out_len,
        Q_LEN=q_len, HEADS=heads, GROUP=group, HEAD_DIM=dim, PAGE_SIZE=page_size, BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(2 * group)), UPCAST_DOT=INTERPRETED, num_warps=4,
    )
    return out
