"""Quest in Triton: page scores, an upper bound of q.k over each page from the page's key min/max, and the
update of those per-page bounds after a step writes new keys.

score(page) = sum_d max(q_d * kmax_d, q_d * kmin_d) >= q.k for every key in the page. Aggregated per
KV head as the max over its query heads, so one page list per (sequence, KV head) covers all of them.
References: `reference.quest_page_scores`, `reference.update_key_bounds`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quest_kernel(q_ptr, kmin_ptr, kmax_ptr, page_table_ptr, lens_ptr, out_ptr,
                  stride_qb, stride_qh, stride_mp, stride_mh, stride_ptb, max_pages,
                  GROUP: tl.constexpr, HEADS: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    pid_bh = tl.program_id(0)
    kv_heads = HEADS // GROUP
    b = pid_bh // kv_heads
    kvh = pid_bh % kv_heads
    logical = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n_pages = (tl.load(lens_ptr + b) + PAGE_SIZE - 1) // PAGE_SIZE
    ok = logical < n_pages
    page = tl.load(page_table_ptr + b * stride_ptb + logical, mask=ok, other=0).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)
    off = page[:, None] * stride_mp + kvh * stride_mh + dims[None, :]
    kmin = tl.load(kmin_ptr + off, mask=ok[:, None], other=0.0).to(tl.float32)
    kmax = tl.load(kmax_ptr + off, mask=ok[:, None], other=0.0).to(tl.float32)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for g in range(GROUP):
        q = tl.load(q_ptr + b * stride_qb + (kvh * GROUP + g) * stride_qh + dims).to(tl.float32)
        bound = tl.sum(tl.maximum(q[None, :] * kmax, q[None, :] * kmin), 1)
        best = tl.maximum(best, bound)
    tl.store(out_ptr + pid_bh * max_pages + logical, tl.where(ok, best, float("-inf")), mask=logical < max_pages)


def quest_page_scores(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, page_table: torch.Tensor,
                      lens: torch.Tensor, page_size: int = 16) -> torch.Tensor:
    """q: [batch, heads, dim] (the current query); key_min/max: [pages, kv_heads, dim] (one layer);
    -> [batch, kv_heads, max_pages] fp32, -inf past each sequence's last page."""
    batch, heads, dim = q.shape
    if q.stride(2) != 1:
        q = q.contiguous()
    kv_heads = key_min.shape[1]
    max_pages = page_table.shape[1]
    out = torch.empty(batch, kv_heads, max_pages, dtype=torch.float32, device=q.device)
    block_p = 64
    _quest_kernel[(batch * kv_heads, triton.cdiv(max_pages, block_p))](
        q, key_min, key_max, page_table, lens, out, q.stride(0), q.stride(1), key_min.stride(0), key_min.stride(1),
        page_table.stride(0), max_pages, GROUP=heads // kv_heads, HEADS=heads, PAGE_SIZE=page_size,
        HEAD_DIM=dim, BLOCK_P=block_p, num_warps=4)
    return out


@triton.jit
def _key_bounds_kernel(k_ptr, kmin_ptr, kmax_ptr, page_table_ptr, lens_ptr, stride_kp, stride_kr, stride_mp,
                       stride_ptb, Q_LEN: tl.constexpr, PAGE_SIZE: tl.constexpr, WIDTH: tl.constexpr,
                       BLOCK_W: tl.constexpr):
    """One program per (sequence, touched page): min and max over the page's valid rows of all its KV heads'
    channels (WIDTH = kv_heads x dim, contiguous in both the page's rows and the bounds)."""
    b = tl.program_id(0)
    lens_after = tl.load(lens_ptr + b)
    logical = tl.minimum((lens_after - Q_LEN) // PAGE_SIZE + tl.program_id(1), (lens_after - 1) // PAGE_SIZE)
    page = tl.load(page_table_ptr + b * stride_ptb + logical).to(tl.int64)
    rows = tl.arange(0, PAGE_SIZE)
    cols = tl.arange(0, BLOCK_W)
    valid = (logical * PAGE_SIZE + rows < lens_after)[:, None] & (cols < WIDTH)[None, :]
    keys = tl.load(k_ptr + page * stride_kp + rows[:, None] * stride_kr + cols[None, :], mask=valid,
                   other=0.0).to(tl.float32)        # exact for bf16/fp16 keys
    kmin = tl.min(tl.where(valid, keys, float("inf")), 0)
    kmax = tl.max(tl.where(valid, keys, float("-inf")), 0)
    out = page * stride_mp + cols
    tl.store(kmin_ptr + out, kmin.to(kmin_ptr.dtype.element_ty), mask=cols < WIDTH)
    tl.store(kmax_ptr + out, kmax.to(kmax_ptr.dtype.element_ty), mask=cols < WIDTH)


def update_key_bounds(k_pool: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, page_table: torch.Tensor,
                      lens_after: torch.Tensor, q_len: int) -> None:
    """Same contract as `reference.update_key_bounds`, in one launch (the reference is ~15 small ops a layer)."""
    page_size, kv_heads, dim = k_pool.shape[1:]
    if k_pool.stride(2) != dim or k_pool.stride(3) != 1 or key_min.stride(1) != dim or key_min.stride(2) != 1:
        raise ValueError("update_key_bounds needs each page row's and each page bound's heads x dim contiguous")
    batch = lens_after.shape[0]
    n_touch = (q_len + page_size - 1) // page_size + 1
    _key_bounds_kernel[(batch, n_touch)](
        k_pool, key_min, key_max, page_table, lens_after, k_pool.stride(0), k_pool.stride(1), key_min.stride(0),
        page_table.stride(0), Q_LEN=q_len, PAGE_SIZE=page_size, WIDTH=kv_heads * dim,
        BLOCK_W=triton.next_power_of_2(kv_heads * dim), num_warps=4)


@triton.jit
def _select_top_pages_kernel(score_ptr, forced_ptr, valid_ptr, pages_ptr, counts_ptr, max_pages, k, width,
                             KV_HEADS: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program per (sequence, KV head): the k best pages of its score row, forced pages first, never an
    invalid one, as an ascending list (-1 padded to `width`) and a count. The k-th best score is found by
    bisection on the scores' bits (order-preserving as int32), so nothing is sorted: ties at it are taken in
    page order."""
    pid = tl.program_id(0)
    b = pid // KV_HEADS
    page = tl.arange(0, BLOCK_P)
    in_row = page < max_pages
    score = tl.load(score_ptr + pid * max_pages + page, mask=in_row, other=float("-inf"))
    forced = tl.load(forced_ptr + b * max_pages + page, mask=in_row, other=0) != 0
    valid = tl.load(valid_ptr + b * max_pages + page, mask=in_row, other=0) != 0
    score = tl.where(valid, tl.where(forced, float("inf"), score), float("-inf"))
    bits = score.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)              # float order as signed int order
    candidate = score > float("-inf")
    kk = tl.minimum(k, tl.sum(candidate.to(tl.int32), 0))
    lo = tl.min(tl.where(candidate, key, 0x7FFFFFFF), 0).to(tl.int64)
    hi = tl.max(tl.where(candidate, key, -0x7FFFFFFF - 1), 0).to(tl.int64)
    key64 = key.to(tl.int64)
    for _ in range(33):                                   # largest t with at least kk keys >= t
        mid = lo + (hi - lo + 1) // 2
        enough = tl.sum((candidate & (key64 >= mid)).to(tl.int32), 0) >= kk
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = candidate & (key64 > lo)
    tie = candidate & (key64 == lo)
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= kk - tl.sum(above.to(tl.int32), 0)))
    take = take & (kk > 0)
    slot = tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(pages_ptr + pid * width + slot, page, mask=take)
    tl.store(pages_ptr + pid * width + page, tl.full([BLOCK_P], -1, tl.int32), mask=(page >= kk) & (page < width))
    tl.store(counts_ptr + pid, kk)


def select_top_pages(score: torch.Tensor, forced: torch.Tensor, valid: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`selection.top_pages` without sorting, in one launch: score [batch, kv_heads, pages] fp32, forced and
    valid [batch, pages] bool -> ascending page lists [batch, kv_heads, min(k, pages)] (-1 padded), counts."""
    batch, kv_heads, max_pages = score.shape
    width = min(k, max_pages)
    pages = torch.empty(batch, kv_heads, width, dtype=torch.int32, device=score.device)
    counts = torch.empty(batch, kv_heads, dtype=torch.int32, device=score.device)
    block_p = max(16, triton.next_power_of_2(max_pages))
    _select_top_pages_kernel[(batch * kv_heads,)](
        score.contiguous(), forced.contiguous().view(torch.uint8), valid.contiguous().view(torch.uint8), pages,
        counts, max_pages, k, width, KV_HEADS=kv_heads, BLOCK_P=block_p, num_warps=4 if block_p <= 2048 else 8)
    return pages, counts
