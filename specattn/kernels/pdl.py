"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of a decode step.

A decode step of a large model at batch 1 is ~10 kernels a layer, each streaming a few MB to a few tens of
MB: every kernel boundary costs its launch, its first loads' latency and its last wave's tail (profile_step.py:
~0.7 µs between kernels in a CUDA graph, on top of ramp-up). A kernel launched with the PDL attribute may be
scheduled before the kernel ahead of it has finished: it waits (`gdc_wait`) for that kernel's completion and
memory flush before it reads anything, so its launch and start overlap the other's tail. Each of our kernels
then lets its own successor launch early (`gdc_launch_dependents`) right after its wait. cuBLAS kernels are not
launched this way, so a boundary into them is unchanged. Correctness holds transitively: a kernel that passed its
wait saw its predecessor complete, which in turn had seen its own predecessor complete.

ENABLED: set SPECATTN_PDL=0 to launch every kernel plainly (A/B timing: benchmarks/profile_step.py --pdl).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = os.environ.get("SPECATTN_PDL", "1") != "0"
# Triton 3.6's interpreter (TRITON_INTERPRET=1, the CPU test path): no griddepcontrol there, and see
# paged_attention for what else it gets wrong.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _hopper_or_later(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def active(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL now (never in Triton's interpreter, which has no griddepcontrol)."""
    return ENABLED and not INTERPRETED and device.type == "cuda" and _hopper_or_later(device.index or 0)


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: its PDL constexpr and, when active, Triton's launch_pdl option."""
    on = active(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """First thing in a kernel launched with launch_options: wait for the kernel ahead, then let the next start."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
