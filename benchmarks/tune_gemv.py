"""Tile sweep of kernels.gemv (split-K partials) against cuBLAS (F.linear on the column-major weight view the
model uses on the GPU), for the decode projections of the 8B shape and the Qwen2.5 0.5B / 1.5B pair.

Usage (GPU): python benchmarks/tune_gemv.py [out.json]. Times are medians of CUDA-graph replays of 20 calls with
the weights rotated past L2, so every call reads its weight from HBM. `sum_us` is a standalone partials.sum(0)
(an upper bound: in the model the consumer's pointwise kernel would do it)."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import copy_bandwidth_gbs, environment, replay_us  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import gemv  # noqa: E402

SHAPES = {  # name: (N, K)
    "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096), "8b down": (4096, 14336),
    "1.5b qkv": (2048, 1536), "1.5b o": (1536, 1536), "1.5b gate_up": (17920, 1536), "1.5b down": (1536, 8960),
    "0.5b qkv": (1152, 896), "0.5b o": (896, 896), "0.5b gate_up": (9728, 896), "0.5b down": (896, 4864),
}


def tilings(k: int):
    for bn, bk, warps, stages in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 4)):
        for splits in (1, 2, 4, 8, 16):
            if k // splits >= bk:
                yield gemv.GemvTiling(bn, bk, splits, warps, stages)


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else None
    copy = copy_bandwidth_gbs()
    rows = []
    for name, (n, k) in SHAPES.items():
        rows += shape_rows(name, n, k, copy)
    if out_path:
        write_json_atomic(out_path, {**environment(), "copy_bandwidth_gbs": copy, "rows": rows})


def shape_rows(name: str, n: int, k: int, copy: float) -> list[dict]:
    rows = []
    copies = max(2, int(3e8 // (n * k * 2)) + 1)
    ws = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16).t() / k ** 0.5 for _ in range(copies)]
    for m in (1, 4):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cublas = replay_us(lambda i: F.linear(x, ws[i % copies]))
        want = F.linear(x.float(), ws[0].float())
        best = None
        for t in tilings(k):
            try:
                us = replay_us(lambda i, t=t: gemv.gemv_partials(x, ws[i % copies], t))
            except Exception as e:          # a tiling the compiler rejects (registers, shared memory)
                print(f"{name} m={m} {t}: {type(e).__name__}", flush=True)
                continue
            if best is None or us < best[0]:
                best = (us, t)
        us, t = best
        got = gemv.gemv_partials(x, ws[0], t).sum(0)
        parts = gemv.gemv_partials(x, ws[0], t)
        sum_us = replay_us(lambda i: parts.sum(0))
        auto = gemv.choose_tiling(n, k)
        auto_us = replay_us(lambda i: gemv.gemv_partials(x, ws[i % copies], auto))
        row = {"shape": name, "n": n, "k": k, "m": m, "cublas_us": cublas, "gemv_us": us, "sum_us": sum_us,
               "auto_us": auto_us, "best": vars(t), "gemv_over_cublas": cublas / us,
               "gemv_bw_fraction": n * k * 2 / us / 1e3 / copy,
               "cublas_bw_fraction": n * k * 2 / cublas / 1e3 / copy,
               "rel_err": ((got - want).norm() / want.norm()).item()}
        rows.append(row)
        print(f"{name:14s} m={m} cublas {cublas:7.1f} us  gemv {us:7.1f} us ({t.block_n},{t.block_k},"
              f"s{t.splits},w{t.num_warps},st{t.num_stages}) auto {auto_us:7.1f}  sum {sum_us:5.1f}  "
              f"bw {row['gemv_bw_fraction']:.2f} vs {row['cublas_bw_fraction']:.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
