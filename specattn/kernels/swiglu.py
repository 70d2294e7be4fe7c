"""SwiGLU of an MLP whose RMSNorm weight is folded into its gate/up projection, in Triton.

With `Transformer.fold_norms` the gate/up projection reads the residual stream itself, so each row of its output
still lacks the row's 1 / rms. This kernel applies it while computing silu(gate) * up: the norm costs no launch
of its own. Each program recomputes its row's rms (a few KB read from L2) rather than waiting for another's.
Reference: `reference.swiglu_rms`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv import choose_tiling, row_blocks, stream_rows
from .pdl import INTERPRETED, launch_options, wait_for_predecessor

BLOCK_I = 1024       # output columns per program


@triton.jit
def _swiglu_rms_kernel(gu_ptr, x_ptr, out_ptr, stride_gu, stride_x, inter, hidden, eps,
                       BLOCK_X: tl.constexpr, BLOCK_I: tl.constexpr, PDL: tl.constexpr):
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_X)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = i < inter
    gate = tl.load(gu_ptr + row * stride_gu + i, mask=ok, other=0.0).to(tl.float32) * r
    up = tl.load(gu_ptr + row * stride_gu + inter + i, mask=ok, other=0.0).to(tl.float32) * r
    act = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * inter + i, act.to(out_ptr.dtype.element_ty), mask=ok)


def swiglu_rms(gate_up: torch.Tensor, norm_of: torch.Tensor, eps: float) -> torch.Tensor:
    """gate_up [..., 2 * inter] (gate, then up), norm_of [..., hidden] -> silu(gate / rms) * up / rms [..., inter]."""
    inter = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * inter)
    x = norm_of.reshape(-1, norm_of.shape[-1])
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
    rows = gu.shape[0]
    _swiglu_rms_kernel[(rows, triton.cdiv(inter, BLOCK_I))](
        gu, x, out, gu.stride(0), x.stride(0), inter, x.shape[1], eps,
        BLOCK_X=triton.next_power_of_2(x.shape[1]), BLOCK_I=BLOCK_I, num_warps=4, **launch_options(gate_up.device))
    return out


@triton.jit
def _gate_up_swiglu_kernel(x_ptr, w_ptr, out_ptr, M, K, inter, stride_xm, stride_wn, stride_om, eps,
                           PAIRS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                           UPCAST: tl.constexpr, PDL: tl.constexpr):
    # Program p computes outputs [p * PAIRS, (p + 1) * PAIRS): their gate rows and up rows (inter rows later)
    # side by side, so silu(gate) * up needs nothing from other programs.
    i = tl.arange(0, 2 * PAIRS)
    cols = (i % 2) * inter + tl.program_id(0) * PAIRS + i // 2
    row0 = tl.program_id(1) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    product, squares = stream_rows(x_ptr, stride_xm, w_rows, 1, cols < 2 * inter, row0, M, K, PDL, BLOCK_M,
                                   2 * PAIRS, BLOCK_K, DOT, UPCAST)
    # Rounded to the weights' dtype before the 1 / rms scale, as cuBLAS's product reaches _swiglu_rms_kernel.
    y = product.to(w_ptr.dtype.element_ty).to(tl.float32) * tl.rsqrt(squares / K + eps)[:, None]
    gate, up = tl.split(tl.reshape(y, [BLOCK_M, PAIRS, 2]))
    out = tl.program_id(0) * PAIRS + tl.arange(0, PAIRS)
    tl.store(out_ptr + rows[:, None] * stride_om + out[None, :], (gate * tl.sigmoid(gate) * up).to(
        out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (out < inter)[None, :])


def project_swiglu_rms(x: torch.Tensor, gate_up_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`swiglu_rms(F.linear(x, gate_up_weight), x, eps)` for a step's rows x [n, hidden] as one kernel: the
    gate/up product of rows taken before their folded RMSNorm (weight [2 * inter, hidden], row-major), each row's
    1 / rms summed as x streams by. Returns silu(gate) * up [n, inter]."""
    n, hidden = x.shape
    inter = gate_up_weight.shape[0] // 2
    if gate_up_weight.shape[1] != hidden or gate_up_weight.stride(1) != 1:
        raise ValueError(f"project_swiglu_rms takes a row-major weight [2 * inter, {hidden}], got rows "
                         f"{tuple(x.shape)}, weight {tuple(gate_up_weight.shape)} strides {gate_up_weight.stride()}")
    if x.stride(1) != 1:
        x = x.contiguous()
    tiling = choose_tiling(n, 2 * inter, hidden)
    blocks = row_blocks(n, tiling)
    pairs = max(8, tiling.block_n // 2) if blocks.dot else tiling.block_n // 2   # tensor cores: >= 16 weight rows
    out = torch.empty(n, inter, dtype=x.dtype, device=x.device)
    _gate_up_swiglu_kernel[(triton.cdiv(inter, pairs), blocks.count)](
        x, gate_up_weight, out, n, hidden, inter, x.stride(0), gate_up_weight.stride(0), out.stride(0), eps,
        PAIRS=pairs, BLOCK_M=blocks.block_m, BLOCK_K=tiling.block_k, DOT=blocks.dot, UPCAST=INTERPRETED,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages, **launch_options(x.device))
    return out
