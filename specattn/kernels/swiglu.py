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

from .pdl import launch_options, wait_for_predecessor

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
