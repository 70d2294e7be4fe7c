"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of a decode step.

A decode step of a large model at batch 1 is ~10 kernels a layer, each streaming a few MB to a few tens of
MB: every kernel boundary costs its launch, its first loads' latency and its last wave's tail (profile_step.py:
~0.7 µs between kernels in a CUDA graph, on top of ramp-up). A kernel launched with the PDL attribute may be
scheduled before the kernel ahead of it has finished: it waits (`gdc_wait`) for that kernel's completion and
memory flush before it reads anything, so its launch and start overlap the other's tail; reads that do not depend
on the kernels ahead (weights) may come before the wait. Each of our kernels lets its own successor launch
(`gdc_launch_dependents`) at its start (MODE 2) or once its wait returned (MODE 1). A successor launches only when
every program of the kernel ahead has started, so its waiting programs never keep that kernel's programs off the
SMs. cuBLAS kernels are not launched this way, so a boundary into them is unchanged. Correctness holds
transitively: a kernel that passed its wait saw its predecessor complete, which had seen its own predecessor
complete.

MODE (environment SPECATTN_PDL): 0 launches every kernel plainly; A/B timing: benchmarks/profile_step.py --pdl.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

MODES = (0, 1, 2)    # off; trigger the successor after the wait; trigger it first
MODE = int(os.environ.get("SPECATTN_PDL", "2"))
# Triton 3.6's interpreter (TRITON_INTERPRET=1, the CPU test path): no griddepcontrol there, and see
# paged_attention for what else it gets wrong.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _hopper_or_later(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def active(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL now (never in Triton's interpreter, which has no griddepcontrol)."""
    return MODE != 0 and not INTERPRETED and device.type == "cuda" and _hopper_or_later(device.index or 0)


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: its PDL constexpr (the mode) and, when active, Triton's launch_pdl."""
    return {"PDL": MODE, "launch_pdl": True} if active(device) else {"PDL": 0}


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """In a kernel launched with launch_options, before its first read of anything the kernels ahead write: wait
    for the kernel ahead, and let the next one launch (before or after the wait, by mode)."""
    if PDL == 2:
        gdc_launch_dependents()
    if PDL != 0:
        gdc_wait()
    if PDL == 1:
        gdc_launch_dependents()
