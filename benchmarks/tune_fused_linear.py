"""Tile sweep of kernels.fused_linear against cuBLAS (F.linear after the eager pointwise ops), per shape.

Usage (GPU): python benchmarks/tune_fused_linear.py. Times are medians of CUDA-graph replays of 20 calls, with
the weights rotated past L2 so every call reads them from HBM."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import replay_us  # noqa: E402
from specattn.kernels import fused_linear as fl  # noqa: E402

SHAPES = {"8b gate_up": (28672, 4096, "norm"), "8b down": (4096, 14336, "swiglu"), "8b qkv": (6144, 4096, "norm"),
          "smol gate_up": (3072, 576, "norm"), "smol down": (576, 1536, "swiglu")}
TILINGS = [fl.Tiling(32, 256, 4, 3), fl.Tiling(64, 128, 4, 4), fl.Tiling(128, 64, 4, 4), fl.Tiling(64, 256, 8, 3),
           fl.Tiling(16, 512, 4, 3), fl.Tiling(128, 128, 8, 3), fl.Tiling(32, 128, 4, 6), fl.Tiling(256, 64, 8, 3)]


def main() -> None:
    from specattn.model import rms_norm
    for name, (n, k, kind) in SHAPES.items():
        copies = max(2, int(3e8 // (n * k * 2)) + 1)
        ws_row = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        for rows in (1, 32):
            in_k = 2 * k if kind == "swiglu" else k
            x = torch.randn(rows, in_k, device="cuda", dtype=torch.bfloat16)
            g = torch.ones(k, device="cuda", dtype=torch.bfloat16)
            res = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            line = []
            for layout, ws in (("row", ws_row), ("col", [w.t().contiguous().t() for w in ws_row])):
                if kind == "norm":
                    cublas = lambda i=0: torch.nn.functional.linear(rms_norm(x + res, g, 1e-5), ws[i % copies])
                else:
                    cublas = lambda i=0: fl.swiglu_linear_reference(x, ws[i % copies])
                line.append(f"cublas-{layout} {replay_us(cublas):7.1f}")
                for t in TILINGS:
                    if kind == "norm":
                        f = lambda i=0: fl.norm_linear(x, res, g, 1e-5, ws[i % copies], tiling=t)
                    else:
                        f = lambda i=0: fl.swiglu_linear(x, ws[i % copies], tiling=t)
                    line.append(f"{layout}{t.block_n}x{t.block_k}w{t.num_warps}s{t.num_stages} {replay_us(f):7.1f}")
            print(f"{name} M={rows} ({n * k * 2 / 1e6:.0f} MB): " + " | ".join(line), flush=True)


if __name__ == "__main__":
    main()
