"""Tile sweep of kernels.gemv (row-major weights, PDL) against cuBLAS on the same row-major weights and on the
column-major view the model gives cuBLAS otherwise, for the decode projections of the 8B shape and the Qwen2.5
0.5B / 1.5B pair, at 1, 2 and 4 rows.

Usage (GPU): python benchmarks/tune_gemv.py [out.json] [--shapes=8b,70b/2] [--rows=1,2] [--tilings-out=F]. Above
gemv.MAX_ROWS rows it sweeps tensor-core tiles (rows, columns, keys per program, then warps and stages around the
best); --tilings-out writes those winners for SPECATTN_GEMV_DOT_TILINGS (gemv.load_dot_tilings). Times are medians of
CUDA-graph replays of 20 calls with the weights rotated past L2, so every call reads its weight from HBM;
back-to-back gemv calls overlap through PDL as they do in a step. The kernel as of 2026-11-29 (earlier split-K
version: results/tune_gemv.json)."""
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
    # one rank of the 70B shape at TP=2 (hidden 8,192), where the output and down products lost to cuBLAS in the step
    "70b/2 qkv": (5120, 8192), "70b/2 o": (8192, 4096), "70b/2 down": (8192, 14336),
    # the default model (SmolLM2-135M), whose batched draft steps (32-128 rows) run on tensor cores
    "smol qkv": (960, 576), "smol o": (576, 576), "smol gate_up": (3072, 576), "smol down": (576, 1536),
}


def tilings(m: int):
    if m > gemv.MAX_ROWS:
        yield from dot_tilings(m)
        return
    for bn, bk, warps in itertools.product((8, 16, 32), (256, 512, 1024), (4, 8)):
        if m * bn * bk <= 16384 * warps // 4:        # fp32 sums of at most 128 registers a thread
            yield gemv.GemvTiling(bn, bk, warps)


def dot_tilings(m: int):
    """Tensor-core tiles: rows, columns and keys per program, at 4 warps and 3 stages (shape_rows then tries the
    best one's other warps and stages: `around`)."""
    for bm, bn, bk in itertools.product((16, 32, 64), (16, 32, 64), (64, 128, 256)):
        if bm <= max(16, m) and bm * bk + bn * bk <= 24576:     # a stage's two operand tiles within 48 KB
            yield gemv.GemvTiling(bn, bk, 4, bm, 3)


def around(t: gemv.GemvTiling):
    for warps, stages in itertools.product((4, 8), (2, 3, 4)):
        if (warps, stages) != (t.num_warps, t.num_stages):
            yield gemv.GemvTiling(t.block_n, t.block_k, warps, t.block_m, stages)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--shapes=")), "")   # name prefixes
    ms = tuple(int(m) for m in next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--rows=")), "1,2,4")
               .split(","))
    out_path = args[0] if args else None
    tilings_path = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--tilings-out=")), "")
    copy = copy_bandwidth_gbs()
    rows = []
    for name, (n, k) in SHAPES.items():
        if not only or any(name.startswith(p) for p in only.split(",")):
            rows += shape_rows(name, n, k, copy, ms)
    if out_path:
        write_json_atomic(out_path, {**environment(), "copy_bandwidth_gbs": copy, "rows": rows})
    if tilings_path:       # the tensor-core winners, for a step timed with SPECATTN_GEMV_DOT_TILINGS
        write_json_atomic(tilings_path, [{"m": r["m"], "n": r["n"], "k": r["k"], "tiling": r["best"]}
                                         for r in rows if r["m"] > gemv.MAX_ROWS])


def shape_rows(name: str, n: int, k: int, copy: float, ms: tuple[int, ...] = (1, 2, 4)) -> list[dict]:
    rows = []
    copies = max(2, int(3e8 // (n * k * 2)) + 1)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
    ws_col = [w.t().contiguous().t() for w in ws[:2]] * (copies // 2 + 1)
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cublas_row = replay_us(lambda i: F.linear(x, ws[i % copies]))
        cublas_col = replay_us(lambda i: F.linear(x, ws_col[i % copies]))
        want = F.linear(x.float(), ws[0].float())
        timed = []

        def time_all(candidates):
            for t in candidates:
                try:
                    timed.append((replay_us(lambda i, t=t: gemv.gemv(x, ws[i % copies], tiling=t)), t))
                except Exception as e:          # a tiling the compiler rejects (registers, shared memory)
                    print(f"{name} m={m} {t}: {type(e).__name__}", flush=True)
        time_all(tilings(m))
        if m > gemv.MAX_ROWS:
            time_all(around(min(timed, key=lambda r: r[0])[1]))
        us, t = min(timed, key=lambda r: r[0])
        default_us = replay_us(lambda i: gemv.gemv(x, ws[i % copies]))
        got = gemv.gemv(x, ws[0], tiling=t).float()
        cublas = min(cublas_row, cublas_col)
        row = {"shape": name, "n": n, "k": k, "m": m, "cublas_row_major_us": cublas_row,
               "cublas_column_major_us": cublas_col, "gemv_us": us, "gemv_default_tiling_us": default_us,
               "best": vars(t), "gemv_over_best_cublas": cublas / us, "gemv_bw_fraction": n * k * 2 / us / 1e3 / copy,
               "cublas_bw_fraction": n * k * 2 / cublas / 1e3 / copy,
               "rel_err": ((got - want).norm() / want.norm()).item(),
               "all": [{"us": u, **vars(tt)} for u, tt in timed]}
        rows.append(row)
        print(f"{name:14s} m={m} cublas row {cublas_row:6.1f} col {cublas_col:6.1f} us  gemv {us:6.1f} us "
              f"(m{t.block_m},{t.block_n},{t.block_k},w{t.num_warps},s{t.num_stages}) default {default_us:6.1f}  "
              f"bw {row['gemv_bw_fraction']:.2f} "
              f"vs {row['cublas_bw_fraction']:.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
