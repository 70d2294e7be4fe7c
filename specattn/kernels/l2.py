"""Asking L2 for the next kernel's weights while a kernel that leaves DRAM idle finishes.

At batch 1 a decode step is a chain of kernels each streaming one weight matrix; between them DRAM idles through
each kernel's tail and the next one's start. Attention (its last splits and their merge) and the SwiGLU kernel are
such windows. A kernel given `ahead` (a uint8 view of the first bytes of the weight the next product reads) spreads
prefetch.global.L2 requests for those bytes over its programs, so that product finds them in L2. Weights are never
written by a step, so this is safe at any point of a kernel. Only for small steps: where attention or the product
is bandwidth-bound already the prefetched lines only compete.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LINE = 128          # bytes per prefetch request (an L2 line)
MAX_LINES = 1024    # requests per program at a time (registers for their addresses)


@triton.jit
def prefetch_share(ahead_ptr, ahead_bytes, program, programs, LINES: tl.constexpr, SKIP: tl.constexpr):
    """This program's share of ahead_bytes (programs shares of whole lines, the last one short) into L2, LINES
    requests at a time; LINES 0 turns it off. SKIP (the interpreter, which runs no PTX): nothing."""
    if LINES > 0:
        if not SKIP:
            per = tl.cdiv(tl.cdiv(ahead_bytes, 128), programs) * 128
            start = program * per
            end = tl.minimum(start + per, ahead_bytes)
            for chunk in range(start, end, LINES * 128):
                offs = chunk + tl.arange(0, LINES) * 128
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
                    "=r,l,r", [ahead_ptr + offs, (offs < end).to(tl.int32)], dtype=tl.int32, is_pure=False,
                    pack=1)


def lines_per_program(ahead: torch.Tensor | None, programs: int) -> int:
    """LINES for prefetch_share: 0 without `ahead`, else up to MAX_LINES requests per program at a time."""
    if ahead is None or ahead.numel() == 0:
        return 0
    if ahead.numel() >= 2**31:
        raise ValueError("L2 prefetch of 2 GB or more")
    return min(MAX_LINES, triton.next_power_of_2(triton.cdiv(triton.cdiv(ahead.numel(), LINE), programs)))


def first_bytes(weight: torch.Tensor, nbytes: int) -> torch.Tensor | None:
    """A uint8 view of the first nbytes (whole lines, at most all) of a contiguous weight; None for 0 bytes."""
    if nbytes <= 0:
        return None
    if not weight.is_contiguous():
        raise ValueError("L2 prefetch needs a contiguous weight")
    flat = weight.view(-1).view(torch.uint8)
    return flat[: min(flat.numel(), nbytes // LINE * LINE)]
