"""Every transformer block of a sparse draft step in one persistent launch (one new token per sequence).

Why it was built: the default model's batch-64 draft step is ~263 kernels, 8 a layer, in 1.19 ms on the H100, while
its bytes at copy speed take ~0.3-0.5 ms (results/profile_draft_b64_h100.json): the step seemed to pay for kernel
boundaries rather than bytes (measured below: a barrier costs about as much). Here a program per SM walks all
layers; each layer is five phases whose tiles are spread over the programs, and a grid-wide barrier (an atomic
counter) stands where a kernel boundary stood:

  1. q/k/v product of the residual stream (norm weight folded in), each row's 1 / rms, bias, rotary embedding;
     q to a buffer, k and v to their cache slots;
  2. attention of each (sequence, KV head) over its own page list, the list split over SPLITS programs;
  3. the splits merged while they are read as the output product's input; the product added into the stream;
  4. gate/up product, 1 / rms, SwiGLU into a buffer;
  5. down product added into the stream.

For drafting only: a draft proposes and the verify step decides, so these numerics need not equal the verify
step's. They follow the library's small-step kernels all the same (products rounded to the weights' dtype before
the 1 / rms scale, rotation in fp32, residual adds rounded once). The barrier needs every program resident at
once: the grid is one program per SM. Triton's interpreter runs programs one after another, so there (PHASE > 0)
each phase of each layer is a launch of its own: tests cover the phases' arithmetic, the GPU the barrier.
Reference: the model's own blocks (model.Block.forward_folded) over the same page lists.

Measured (H100, 69edda7, b64 x 8K, budget 512): correct and race-free (30 repeats bit for bit, no barrier timeout),
but slower than the library's separate kernels: the blocks alone 2,733 us at the first tiling, 1,853 at the best of
17 (num_stages 3, 128-key attention tiles, block_k 128), against 1,263 us for the library's whole draft step. One
layer's phases alone: 7.3 / 20.2 / 6.8 / 7.3 / 11.8 us; all five with barriers 56.5 us. A barrier costs about a graph's
kernel boundary; the phases lose because 36-96 tiles walking their reductions serially leave the SMs waiting
(results/draft_kernel_*.json). Next: split-K products into a double-buffered residual stream, shorter attention chains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import INTERPRETED

PHASES = 5


@dataclass(frozen=True)
class DraftTiling:
    block_p: int = 8       # rotation pairs a q/k/v tile (2 x block_p weight rows: both halves of each pair)
    block_o: int = 16      # output-product columns a tile
    block_i: int = 16      # SwiGLU outputs a tile (their gate and up rows)
    block_d: int = 16      # down-product columns a tile
    block_k: int = 128     # reduction tile of the products
    block_keys: int = 128  # keys an attention tile
    block_m: int | None = None   # rows a product tile; None: the batch rounded up to a power of two, 16-64
    splits: int | None = None   # programs per (sequence, KV head) list; None: choose_splits
    # 8 warps: 4 spill at 255 registers (offline sm_90 compile of the default model's shapes); one program an SM
    num_warps: int = 8
    num_stages: int = 3
    # All programs must be resident at once (the barrier): the kernel takes ~255 registers a thread, so an SM holds 8
    # warps of it; draft_blocks refuses programs_per_sm x num_warps above that.
    programs_per_sm: int = 1
    # block_k / block_keys 128 and 3 stages: the best of 17 tilings on the H100 (b64: 1,853 us for the blocks against
    # 2,733 at 64 / 64 / 2; draft_kernel_sweep2.json)


def choose_splits(pairs: int, programs: int) -> int:
    """Split each list so the (sequence, KV head) pairs give every program work, at most 4 ways (each split adds
    a partial the output product re-reads)."""
    splits = 1
    while pairs * splits < programs and splits < 4:
        splits *= 2
    return splits


@triton.jit
def _dot_t(x, w, acc, UPCAST: tl.constexpr):
    """acc + x [M, K] @ w [N, K].T (fp32 operands in the interpreter, whose bf16 tl.dot is wrong)."""
    if UPCAST:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a [M, K] @ b [K, N]."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _grid_barrier(counter_ptr, target):
    """Wait until every program has arrived `target // programs` times. Stores before it are visible after it:
    a CTA barrier, then one thread's release / acquire at GPU scope (cooperative groups' grid sync, in Triton).
    A wait of ~2^22 polls (seconds) gives up and raises the flag counter_ptr[1] instead of hanging the GPU: drafts
    computed past a failed barrier are wrong, but verification still decides every token."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    polls = 0
    while (seen < target) & (polls < 4194304):
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        polls += 1
    if seen < target:
        tl.atomic_max(counter_ptr + 1, 1)
    tl.debug_barrier()


@triton.jit
def _rows_times(x_ptr, stride_x, rows, row_ok, w_rows, w_ok, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """Rows of x (written in this launch: read past L1) times BLOCK_N weight rows (pointers [BLOCK_N, 1], w_ok
    [BLOCK_N]) over all of K: the fp32 product [BLOCK_M, BLOCK_N] and each row's sum of squares (for its 1 / rms)."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    squares = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok, other=0.0,
                    cache_modifier=".cg")
        w = tl.load(w_rows + (k0 + ks)[None, :], mask=w_ok[:, None] & k_ok, other=0.0)
        squares += tl.sum(x.to(tl.float32) * x.to(tl.float32), 1)
        acc = _dot_t(x, w, acc, UPCAST)
    return acc, squares


@triton.jit
def _add_product(x_ptr, stride_x, a_ptr, stride_a, w, M, K, N, tile, col_tiles, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """One tile of x[:, cols] += a @ w[cols].T (a written in this launch), rounded once."""
    cols = (tile % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows = (tile // col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    acc, _ = _rows_times(a_ptr, stride_a, rows, row_ok, w + cols.to(tl.int64)[:, None] * K, col_ok, K, BLOCK_M,
                         BLOCK_N, BLOCK_K, UPCAST)
    dst = x_ptr + rows[:, None] * stride_x + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    acc += tl.load(dst, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(dst, acc.to(x_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _phase_qkv(x_ptr, stride_x, w, bias, cos_ptr, sin_ptr, stride_cs, slots_ptr, q_buf, k_pool, v_pool, M, eps,
               pid, programs, HIDDEN: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
               HEAD_DIM: tl.constexpr, BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    PER_HEAD: tl.constexpr = HALF // BLOCK_P
    COL_TILES: tl.constexpr = (HEADS + 2 * KV_HEADS) * PER_HEAD
    dt = x_ptr.dtype.element_ty
    i = tl.arange(0, 2 * BLOCK_P)
    for tile in range(pid, COL_TILES * tl.cdiv(M, BLOCK_M), programs):
        head = (tile % COL_TILES) // PER_HEAD
        j0 = ((tile % COL_TILES) % PER_HEAD) * BLOCK_P
        j = j0 + tl.arange(0, BLOCK_P)
        rows = (tile // COL_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        # weight rows pair by pair (j, j + HALF), so the rotation needs nothing from other programs
        cols = head * HEAD_DIM + (i % 2) * HALF + j0 + i // 2
        y, squares = _rows_times(x_ptr, stride_x, rows, row_ok, w + cols.to(tl.int64)[:, None] * HIDDEN, cols >= 0,
                                 HIDDEN, BLOCK_M, 2 * BLOCK_P, BLOCK_K, UPCAST)
        y = y.to(dt).to(tl.float32) * tl.rsqrt(squares / HIDDEN + eps)[:, None]
        if BIAS:
            y += tl.load(bias + cols).to(tl.float32)[None, :]
        x1, x2 = tl.split(tl.reshape(y, [BLOCK_M, BLOCK_P, 2]))
        ok = row_ok[:, None]
        if head < HEADS + KV_HEADS:                   # q and k heads rotate
            cs = rows[:, None] * stride_cs + j[None, :]
            cos1 = tl.load(cos_ptr + cs, mask=ok, other=0.0).to(tl.float32)
            cos2 = tl.load(cos_ptr + cs + HALF, mask=ok, other=0.0).to(tl.float32)
            sin1 = tl.load(sin_ptr + cs, mask=ok, other=0.0).to(tl.float32)
            sin2 = tl.load(sin_ptr + cs + HALF, mask=ok, other=0.0).to(tl.float32)
            x1, x2 = x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2
        if head < HEADS:
            dst = q_buf + (rows[:, None] * HEADS + head) * HEAD_DIM + j[None, :]
        else:
            is_v = head >= HEADS + KV_HEADS
            slot = tl.load(slots_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            pool = tl.where(is_v, v_pool, k_pool)
            kvh = head - HEADS - tl.where(is_v, KV_HEADS, 0)
            dst = pool + (slot[:, None] * KV_HEADS + kvh) * HEAD_DIM + j[None, :]
        tl.store(dst, x1.to(dt), mask=ok)
        tl.store(dst + HALF, x2.to(dt), mask=ok)


@triton.jit
def _phase_attention(q_buf, k_pool, v_pool, table_ptr, stride_table, pages, stride_pb, stride_ph, counts,
                     stride_cb, lens_ptr, o_buf, lse_buf, M, qk_scale, pid, programs, HEADS: tl.constexpr,
                     KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                     GROUP_PAD: tl.constexpr, BLOCK_KEYS: tl.constexpr, SPLITS: tl.constexpr,
                     UPCAST: tl.constexpr):
    GROUP: tl.constexpr = HEADS // KV_HEADS
    ENTRIES: tl.constexpr = BLOCK_KEYS // PAGE_SIZE       # list entries (pages) a tile
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_KEYS)
    for item in range(pid, M * KV_HEADS * SPLITS, programs):
        split = item % SPLITS
        kvh = (item // SPLITS) % KV_HEADS
        b = item // (SPLITS * KV_HEADS)
        count = tl.load(counts + b * stride_cb + kvh)
        per_split = tl.cdiv(tl.cdiv(count, SPLITS), ENTRIES) * ENTRIES
        start = split * per_split
        end = tl.minimum(count, start + per_split)
        seq_len = tl.load(lens_ptr + b)
        heads = kvh * GROUP + g
        q = tl.load(q_buf + (b * HEADS + heads)[:, None] * HEAD_DIM + d[None, :], mask=g_ok[:, None], other=0.0,
                    cache_modifier=".cg")
        m_i = tl.full([GROUP_PAD], -1.0e30, tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for e0 in range(start, end, ENTRIES):
            entry = e0 + n // PAGE_SIZE
            page = tl.load(pages + b * stride_pb + kvh * stride_ph + entry, mask=entry < end, other=-1)
            phys = tl.load(table_ptr + b * stride_table + page, mask=page >= 0, other=0).to(tl.int64)
            ok = (page >= 0) & (page * PAGE_SIZE + n % PAGE_SIZE < seq_len)
            kv = ((phys * PAGE_SIZE + n % PAGE_SIZE) * KV_HEADS + kvh) * HEAD_DIM
            k = tl.load(k_pool + kv[:, None] + d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
            s = _dot_t(q, k, tl.zeros([GROUP_PAD, BLOCK_KEYS], tl.float32), UPCAST) * qk_scale
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_pool + kv[:, None] + d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
            m_i = m_new
        empty = l_i == 0.0                            # a split past the end of its list
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        row = (split * M + b) * HEADS + heads
        tl.store(o_buf + row[:, None] * HEAD_DIM + d[None, :], out.to(o_buf.dtype.element_ty), mask=g_ok[:, None])
        if SPLITS > 1:
            tl.store(lse_buf + row, tl.where(empty, float("-inf"), m_i + tl.log2(l_i)), mask=g_ok)


@triton.jit
def _merged_head(o_buf, lse_buf, rows, row_ok, head, M, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 SPLITS: tl.constexpr):
    """The attention output of one head for these rows [BLOCK_M, HEAD_DIM], its splits merged (fp32)."""
    d = tl.arange(0, HEAD_DIM)
    if SPLITS == 1:
        return tl.load(o_buf + (rows * HEADS + head)[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None],
                       other=0.0, cache_modifier=".cg").to(tl.float32)
    top = tl.full(rows.shape, float("-inf"), tl.float32)
    for s in tl.static_range(SPLITS):
        top = tl.maximum(top, tl.load(lse_buf + (s * M + rows) * HEADS + head, mask=row_ok, other=0.0,
                                      cache_modifier=".cg"))
    num = tl.zeros([rows.shape[0], HEAD_DIM], tl.float32)
    den = tl.zeros(rows.shape, tl.float32)
    for s in tl.static_range(SPLITS):
        weight = tl.exp2(tl.load(lse_buf + (s * M + rows) * HEADS + head, mask=row_ok, other=0.0,
                                 cache_modifier=".cg") - top)
        part = tl.load(o_buf + ((s * M + rows) * HEADS + head)[:, None] * HEAD_DIM + d[None, :],
                       mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
        num += weight[:, None] * part
        den += weight
    return num / den[:, None]


@triton.jit
def _phase_output(x_ptr, stride_x, w, o_buf, lse_buf, M, pid, programs, HIDDEN: tl.constexpr, HEADS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  UPCAST: tl.constexpr):
    COL_TILES: tl.constexpr = (HIDDEN + BLOCK_N - 1) // BLOCK_N
    d = tl.arange(0, HEAD_DIM)
    for tile in range(pid, COL_TILES * tl.cdiv(M, BLOCK_M), programs):
        cols = (tile % COL_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < HIDDEN
        rows = (tile // COL_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for head in range(HEADS):                     # the reduction walks one head's columns at a time
            a = _merged_head(o_buf, lse_buf, rows, row_ok, head, M, HEADS, HEAD_DIM, SPLITS)
            wt = tl.load(w + cols.to(tl.int64)[:, None] * (HEADS * HEAD_DIM) + head * HEAD_DIM + d[None, :],
                         mask=col_ok[:, None], other=0.0)
            acc = _dot_t(a.to(wt.dtype), wt, acc, UPCAST)
        dst = x_ptr + rows[:, None] * stride_x + cols[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        acc += tl.load(dst, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(dst, acc.to(x_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _phase_swiglu(x_ptr, stride_x, w, act_buf, M, eps, pid, programs, HIDDEN: tl.constexpr, INTER: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    COL_TILES: tl.constexpr = (INTER + BLOCK_I - 1) // BLOCK_I
    dt = x_ptr.dtype.element_ty
    n = tl.arange(0, 2 * BLOCK_I)
    for tile in range(pid, COL_TILES * tl.cdiv(M, BLOCK_M), programs):
        i = (tile % COL_TILES) * BLOCK_I + tl.arange(0, BLOCK_I)
        rows = (tile // COL_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        out = (tile % COL_TILES) * BLOCK_I + n // 2    # gate rows and up rows (INTER further) side by side
        cols = (n % 2) * INTER + out
        y, squares = _rows_times(x_ptr, stride_x, rows, row_ok, w + cols.to(tl.int64)[:, None] * HIDDEN,
                                 out < INTER, HIDDEN, BLOCK_M, 2 * BLOCK_I, BLOCK_K, UPCAST)
        y = y.to(dt).to(tl.float32) * tl.rsqrt(squares / HIDDEN + eps)[:, None]
        gate, up = tl.split(tl.reshape(y, [BLOCK_M, BLOCK_I, 2]))
        tl.store(act_buf + rows[:, None] * INTER + i[None, :], (gate * tl.sigmoid(gate) * up).to(dt),
                 mask=row_ok[:, None] & (i < INTER)[None, :])


@triton.jit
def _draft_blocks_kernel(x_ptr, stride_x, cos_ptr, sin_ptr, stride_cs, slots_ptr, lens_ptr, table_ptr, stride_table,
                         pages_ptr, stride_pl, stride_pb, stride_ph, counts_ptr, stride_cl, stride_cb,
                         k_ptr, v_ptr, stride_kl, w_qkv, b_qkv, w_o, w_gate_up, w_down,
                         q_buf, o_buf, lse_buf, act_buf, counter_ptr, M, first_layer, layers, eps, qk_scale,
                         HIDDEN: tl.constexpr, INTER: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                         HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_KEYS: tl.constexpr, GROUP_PAD: tl.constexpr,
                         SPLITS: tl.constexpr, PHASE: tl.constexpr, UPCAST: tl.constexpr):
    """PHASE 0: all phases of layers [first_layer, first_layer + layers), grid barriers between them (GPU);
    PHASE p in 1..5: only phase p (the interpreter, one launch per phase and layer)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    wt = tl.pointer_type(x_ptr.dtype.element_ty)
    for step in range(layers):
        layer = first_layer + step
        k_pool = k_ptr + layer.to(tl.int64) * stride_kl
        v_pool = v_ptr + layer.to(tl.int64) * stride_kl
        arrivals = step * 5 * programs                  # barriers passed before this layer (5 a layer), times programs
        if PHASE == 0 or PHASE == 1:
            _phase_qkv(x_ptr, stride_x, tl.load(w_qkv + layer).to(wt), tl.load(b_qkv + layer).to(wt), cos_ptr,
                       sin_ptr, stride_cs, slots_ptr, q_buf, k_pool, v_pool, M, eps, pid, programs, HIDDEN, HEADS,
                       KV_HEADS, HEAD_DIM, BIAS, BLOCK_M, BLOCK_P, BLOCK_K, UPCAST)
        if PHASE == 0:
            _grid_barrier(counter_ptr, arrivals + programs)
        if PHASE == 0 or PHASE == 2:
            _phase_attention(q_buf, k_pool, v_pool, table_ptr, stride_table, pages_ptr + layer * stride_pl,
                             stride_pb, stride_ph, counts_ptr + layer * stride_cl, stride_cb, lens_ptr, o_buf,
                             lse_buf, M, qk_scale, pid, programs, HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE, GROUP_PAD,
                             BLOCK_KEYS, SPLITS, UPCAST)
        if PHASE == 0:
            _grid_barrier(counter_ptr, arrivals + 2 * programs)
        if PHASE == 0 or PHASE == 3:
            _phase_output(x_ptr, stride_x, tl.load(w_o + layer).to(wt), o_buf, lse_buf, M, pid, programs, HIDDEN,
                          HEADS, HEAD_DIM, SPLITS, BLOCK_M, BLOCK_O, UPCAST)
        if PHASE == 0:
            _grid_barrier(counter_ptr, arrivals + 3 * programs)
        if PHASE == 0 or PHASE == 4:
            _phase_swiglu(x_ptr, stride_x, tl.load(w_gate_up + layer).to(wt), act_buf, M, eps, pid, programs,
                          HIDDEN, INTER, BLOCK_M, BLOCK_I, BLOCK_K, UPCAST)
        if PHASE == 0:
            _grid_barrier(counter_ptr, arrivals + 4 * programs)
        if PHASE == 0 or PHASE == 5:
            col_tiles = tl.cdiv(HIDDEN, BLOCK_D)
            for tile in range(pid, col_tiles * tl.cdiv(M, BLOCK_M), programs):
                _add_product(x_ptr, stride_x, act_buf, INTER, tl.load(w_down + layer).to(wt), M, INTER, HIDDEN,
                             tile, col_tiles, BLOCK_M, BLOCK_D, BLOCK_K, UPCAST)
        if PHASE == 0 and step + 1 < layers:
            _grid_barrier(counter_ptr, arrivals + 5 * programs)


class WeightTables:
    """Each projection's per-layer weight addresses as a device int64 table (the kernel walks layers itself).
    Built once per model outside graph capture; `current` notices weights that moved (e.g. re-laid out)."""

    def __init__(self, model):
        blocks = model.blocks
        device = blocks[0].qkv.weight.device
        self.key = self._key(model)
        self.tables = {name: torch.tensor([getattr(b, name).weight.data_ptr() for b in blocks], dtype=torch.int64,
                                          device=device) for name in ("qkv", "o", "gate_up", "down")}
        bias = [b.qkv.bias.data_ptr() if b.qkv.bias is not None else b.qkv.weight.data_ptr() for b in blocks]
        self.tables["qkv_bias"] = torch.tensor(bias, dtype=torch.int64, device=device)

    @staticmethod
    def _key(model) -> tuple:
        return tuple(getattr(b, n).weight.data_ptr() for b in model.blocks for n in ("qkv", "o", "gate_up", "down"))

    def current(self, model) -> bool:
        return self._key(model) == self.key


def unsupported(model, view, x: torch.Tensor, cache=None) -> str | None:
    """Why this step cannot take the kernel (None: it can). Sparse page-level drafting of one new token per
    sequence on a whole (not tensor-parallel) model with folded norms and row-major projection weights, its cache
    (if given) in the model's dtype."""
    from ..selection import PageSelection
    cfg = model.cfg
    sel = view.selection
    if not (x.is_cuda or INTERPRETED):
        return "needs a CUDA GPU (or Triton's interpreter)"
    if view.q_len != 1 or not isinstance(sel, PageSelection) or sel.token_level or sel.dense_layers:
        return "only sparse page-level draft steps of one token, every layer sparse"
    if (view.page_mass is not None or view.token_scores is not None or view.attention_probs is not None
            or view.key_masks is not None):
        return "the step also measures or records attention"
    if cache is not None and cache.dtype != x.dtype:
        return f"a {cache.dtype} cache under a {x.dtype} model"
    if not model.norms_folded or model.tp is not None:
        return "needs folded norms and a whole model"
    if cfg.head_dim & (cfg.head_dim - 1) or cfg.head_dim < 32:
        return f"head_dim {cfg.head_dim}: a power of two >= 32"
    for name, k in (("qkv", cfg.hidden_size), ("o", cfg.num_heads * cfg.head_dim), ("gate_up", cfg.hidden_size),
                    ("down", cfg.intermediate_size)):
        w = getattr(model.blocks[0], name).weight
        if w.stride() != (k, 1):
            return f"the {name} weight is not row-major"
    return None


def draft_blocks(model, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, view,
                 tiling: DraftTiling | None = None, programs: int | None = None,
                 counter: torch.Tensor | None = None, only: tuple[int, int] | None = None) -> None:
    """Run every block of the model on the new rows x [batch, hidden] (the residual stream, updated in place),
    writing their K/V into the cache at view.slots; attention of layer l reads view.selection's page lists of
    layer l. cos, sin: [batch, 1, 1, head_dim] (model.rope_tables). Check `unsupported` first. counter: int32 [2],
    zeroed here (else a fresh one): the barrier's arrivals, then a flag set if a barrier timed out (GPU checks).
    only (phase, layers): for timing its parts, one launch of that phase (1-5) or all five with their barriers (0)
    over the first `layers` layers."""
    cfg = model.cfg
    t = tiling or DraftTiling()
    if t.programs_per_sm * t.num_warps > 8:
        raise ValueError(f"{t.programs_per_sm} programs of {t.num_warps} warps an SM cannot all be resident at "
                         "~255 registers a thread; the grid barrier would wait for programs that never start")
    m = x.shape[0]
    tables = getattr(model, "_draft_weight_tables", None)
    if tables is None or not tables.current(model):
        tables = model._draft_weight_tables = WeightTables(model)
    if programs is None:
        programs = (torch.cuda.get_device_properties(x.device).multi_processor_count * t.programs_per_sm
                    if x.is_cuda else 4)
    sel = view.selection
    splits = t.splits or choose_splits(m * cfg.num_kv_heads, programs)
    half = cfg.head_dim // 2
    block_p = min(t.block_p, half)
    block_m = t.block_m or min(64, max(16, triton.next_power_of_2(m)))
    q_buf = torch.empty(m, cfg.num_heads, cfg.head_dim, dtype=x.dtype, device=x.device)
    o_buf = torch.empty(splits, m, cfg.num_heads, cfg.head_dim, dtype=x.dtype if splits == 1 else torch.float32,
                        device=x.device)
    lse_buf = torch.empty(splits, m, cfg.num_heads, dtype=torch.float32, device=x.device)
    act_buf = torch.empty(m, cfg.intermediate_size, dtype=x.dtype, device=x.device)
    counter = counter.zero_() if counter is not None else torch.zeros(2, dtype=torch.int32, device=x.device)
    cos2, sin2 = cos.reshape(m, cfg.head_dim), sin.reshape(m, cfg.head_dim)
    pages, counts = sel.pages, sel.counts
    args = (x, x.stride(0), cos2, sin2, cos2.stride(0), view.slots, view.lens_after, view.page_table,
            view.page_table.stride(0), pages, pages.stride(0), pages.stride(1), pages.stride(2), counts,
            counts.stride(0), counts.stride(1), cache.k, cache.v, cache.k.stride(0), tables.tables["qkv"],
            tables.tables["qkv_bias"], tables.tables["o"], tables.tables["gate_up"], tables.tables["down"],
            q_buf, o_buf, lse_buf, act_buf, counter, m)
    meta = dict(HIDDEN=cfg.hidden_size, INTER=cfg.intermediate_size, HEADS=cfg.num_heads, KV_HEADS=cfg.num_kv_heads,
                HEAD_DIM=cfg.head_dim, PAGE_SIZE=cache.page_size, BIAS=cfg.qkv_bias, BLOCK_M=block_m, BLOCK_P=block_p,
                BLOCK_O=t.block_o, BLOCK_I=t.block_i, BLOCK_D=t.block_d, BLOCK_K=t.block_k,
                BLOCK_KEYS=max(t.block_keys, cache.page_size),
                GROUP_PAD=max(16, triton.next_power_of_2(cfg.num_heads // cfg.num_kv_heads)), SPLITS=splits,
                UPCAST=INTERPRETED, num_warps=t.num_warps, num_stages=t.num_stages)
    qk_scale = cfg.head_dim ** -0.5 * 1.4426950408889634      # exp2 domain
    if only is not None:
        if INTERPRETED and only[0] == 0:
            raise ValueError("the interpreter runs programs one after another: no grid barrier (phase 0) there")
        _draft_blocks_kernel[(programs,)](*args, 0, only[1], cfg.rms_norm_eps, qk_scale, PHASE=only[0], **meta)
        return
    if INTERPRETED:
        for layer in range(cfg.num_layers):
            for phase in range(1, PHASES + 1):
                _draft_blocks_kernel[(programs,)](*args, layer, 1, cfg.rms_norm_eps, qk_scale, PHASE=phase, **meta)
    else:
        _draft_blocks_kernel[(programs,)](*args, 0, cfg.num_layers, cfg.rms_norm_eps, qk_scale, PHASE=0, **meta)
    for layer in range(cfg.num_layers):
        cache.wrote(layer, view)
