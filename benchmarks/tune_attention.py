"""Sweeps for the decode step's pieces on the GPU: attention launch configs, the K/V write, and whether
cuBLAS is faster on pre-transposed weights for skinny (decode) products. Device times from CUDA graphs
(as the decode step runs). Writes results/tune.json (or argv[1]); `--splits` sweeps tile configs and split counts
for sparse and dense decode/verify attention instead (`--batches=32,64`, `--names=sparse6`, `--warps=2,4,8`,
`--stages=1,2,3,4`, `--blocks=64,128` narrow or widen it)."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, copy_bandwidth_gbs, environment, graph_ms  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import paged_attention, reference  # noqa: E402
from specattn.kernels.paged_attention import LaunchConfig  # noqa: E402

L2_BEATING_BYTES = 200 << 20   # several times the H100's 50 MB L2
# (name, batch, kv_heads, group, head_dim, context)
SHAPES = [("8b-b1-8k", 1, 8, 4, 128, 8192), ("8b-b1-32k", 1, 8, 4, 128, 32768), ("8b-b8-8k", 8, 8, 4, 128, 8192),
          ("smol-b1-8k", 1, 3, 3, 64, 8064), ("smol-b32-8k", 32, 3, 3, 64, 8064)]
CONFIGS = [LaunchConfig(bn, w, s, f)
           for bn, w, s, f in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4), (1, 2, 4))
           if not (bn == 128 and w == 2)]


def attention_sweep(copy: float) -> list[dict]:
    rows = []
    for name, batch, kv_heads, group, dim, ctx in SHAPES:
        pages = -(-ctx // 16)
        kv_bytes = 2 * batch * ctx * kv_heads * dim * 2
        copies = -(-L2_BEATING_BYTES // kv_bytes)     # rotate over pools so no call finds its KV in L2
        pools = [(torch.randn(batch * pages, 16, kv_heads, dim, device="cuda", dtype=torch.bfloat16),
                  torch.randn(batch * pages, 16, kv_heads, dim, device="cuda", dtype=torch.bfloat16))
                 for _ in range(copies)]
        table = torch.randperm(batch * pages, device="cuda").view(batch, -1).int()
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(batch, 1, kv_heads * group, dim, device="cuda", dtype=torch.bfloat16)
        kp, vp = pools[0]
        ref = reference.paged_attention(q.float(), kp.float(), vp.float(), table, lens, dim ** -0.5)
        results = []
        for cfg in CONFIGS:
            try:
                fn = lambda cfg=cfg: paged_attention.paged_attention(q, kp, vp, table, lens, dim ** -0.5, launch=cfg)
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                ms = graph_ms(lambda cfg=cfg: [paged_attention.paged_attention(q, k, v, table, lens, dim ** -0.5,
                                                                               launch=cfg) for k, v in pools]) / copies
            except Exception as e:  # some tilings do not fit in shared memory; record and move on
                results.append({"config": cfg.__dict__, "error": str(e).splitlines()[0][:120]})
                continue
            results.append({"config": cfg.__dict__, "us": ms * 1e3, "rel_err": err,
                            "bandwidth_fraction": kv_bytes / ms / 1e6 / copy})
        ok = sorted((r for r in results if "us" in r and r["rel_err"] < 1e-2), key=lambda r: r["us"])
        default = next(r for r in results if r["config"] == LaunchConfig().__dict__)
        rows.append({"shape": name, "kv_bytes": kv_bytes, "default": default, "best": ok[:5]})
        print(f"{name:12s} default {default['us']:7.1f} us ({default['bandwidth_fraction']:.2f}); best "
              + "; ".join(f"{r['us']:.1f} us ({r['bandwidth_fraction']:.2f}) {tuple(r['config'].values())}"
                          for r in ok[:3]), flush=True)
    return rows


def gemv_sweep(copy: float) -> list[dict]:
    rows = []
    for name, n, k in [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
                       ("lm_head", 128256, 4096), ("smol_qkv", 960, 576), ("smol_gate_up", 3072, 576)]:
        copies = -(-L2_BEATING_BYTES // (n * k * 2))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        for m in (1, 8, 32):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_nt = graph_ms(lambda: [F.linear(x, w) for w in ws]) * 1e3 / copies
            t_nn = graph_ms(lambda: [x @ wt for wt in wts]) * 1e3 / copies
            frac = n * k * 2 / (min(t_nt, t_nn) / 1e3) / 1e9 / copy
            rows.append({"weight": name, "m": m, "linear_us": t_nt, "pretransposed_us": t_nn, "best_fraction": frac})
            print(f"gemv {name:12s} m={m:2d}: F.linear {t_nt:7.1f} us, x @ w.T(contig) {t_nn:7.1f} us", flush=True)
    return rows


# (batch, context, q_len, kv_heads, group, head_dim, fraction of pages attended; 0 = dense): the kernels.py shapes
# (8B heads), the Qwen2.5 pair's decode / verify steps (0.5B: 2 KV heads x 7, dim 64; 1.5B: 2 x 6, dim 128) and
# the default model's sparse draft step at batch 32 and 64, 8K, budget 512 (3 KV heads x 3, dim 64: 1/16 of pages).
SPLIT_SHAPES = [(1, 32768, 1, 8, 4, 128, 0.1), (1, 32768, 5, 8, 4, 128, 0.1), (8, 8192, 5, 8, 4, 128, 0.1),
                (1, 32768, 5, 8, 4, 128, 0.0), (1, 8192, 1, 2, 7, 64, 0.0), (8, 8192, 1, 2, 7, 64, 0.0),
                (1, 8192, 5, 2, 6, 128, 0.0), (8, 8192, 5, 2, 6, 128, 0.0),
                (32, 8192, 1, 3, 3, 64, 1 / 16), (64, 8192, 1, 3, 3, 64, 1 / 16),
                # MagicDec's lists before 2026-11-29: 33 pages for a 512-token budget (a fifth, nearly empty tile)
                (32, 8192, 1, 3, 3, 64, 33 / 512), (64, 8192, 1, 3, 3, 64, 33 / 512),
                # the 8B shape's decode step at batch 1 on one GPU (8 KV heads) and on each of 2 (TP=2: 4 KV heads)
                (1, 8192, 1, 8, 4, 128, 0.0), (1, 8192, 1, 4, 4, 128, 0.0), (1, 32768, 1, 4, 4, 128, 0.0),
                # Qwen2.5-1.5B's draft step at batch 64 x 32K: 1,024-token lists of 2 KV heads x 6
                (64, 32768, 1, 2, 6, 128, 1 / 32)]
SPLIT_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def kernel_split_us(call, pools) -> dict[str, float]:
    """Device µs per call of each kernel the attention launches (split, merge), from torch.profiler."""
    from benchmarks.common import profile_kernels
    reps = 20
    totals = profile_kernels(lambda: [call(k, v) for k, v in pools], reps)
    return {name: us / (reps * len(pools)) for name, (_, us) in totals.items()}


def split_sweep(copy: float, batches: set[int] | None = None, names: list[str] | None = None,
                tile_warps: tuple[int, ...] = (4,), stages: tuple[int, ...] = (2, 3),
                blocks: tuple[int, ...] = (32, 64, 128)) -> list[dict]:
    """Tile configs x explicit split counts: with few keys per program each split may hold a single tile (nothing
    pipelined) and the merge reads many partials."""
    from benchmarks.kernels import kv_pools, selection
    rows = []
    for batch, ctx, q_len, kv_heads, group, dim, fraction in SPLIT_SHAPES:
        kind = f"sparse{100 * fraction:.3g}" if fraction else "dense"
        name = f"{kind}-b{batch}-{ctx // 1024}k-q{q_len}-h{kv_heads}x{group}-d{dim}"
        if (batches and batch not in batches) or (names and not any(n in name for n in names)):
            continue
        pages = -(-ctx // 16)
        pools, table, lens, kv_bytes = kv_pools(batch, ctx, kv_heads, dim)
        q = torch.randn(batch, q_len, kv_heads * group, dim, device="cuda", dtype=torch.bfloat16)
        kw = {}
        if fraction:
            sel, counts = selection(batch, pages, fraction, kv_heads)
            kw = {"selected_pages": sel, "selected_counts": counts}
            kv_bytes = kv_bytes * counts.sum().item() / (batch * kv_heads * pages)
        kp, vp = pools[0]
        ref = reference.paged_attention(q.float(), kp.float(), vp.float(), table, lens, dim ** -0.5, **kw)
        results = []
        for (bn, w, st), splits in itertools.product(
                itertools.product(blocks, tile_warps, stages), SPLIT_COUNTS):
            cfg = LaunchConfig(bn, w, st)
            if splits * bn > 2 * ctx:       # more splits than tiles: the same as fewer
                continue
            try:
                def call(k, v, cfg=cfg, splits=splits):
                    return paged_attention.paged_attention(q, k, v, table, lens, dim ** -0.5, launch=cfg,
                                                           num_splits=splits, **kw)
                err = ((call(kp, vp).float() - ref).norm() / ref.norm()).item()
                ms = graph_ms(lambda call=call: [call(k, v) for k, v in pools]) / len(pools)
            except Exception as e:  # some tilings do not fit in shared memory
                results.append({"config": cfg.__dict__, "splits": splits, "error": str(e).splitlines()[0][:120]})
                continue
            results.append({"config": cfg.__dict__, "splits": splits, "us": ms * 1e3, "rel_err": err,
                            "bandwidth_fraction": kv_bytes / ms / 1e6 / copy})
        auto_ms = graph_ms(lambda: [paged_attention.paged_attention(q, k, v, table, lens, dim ** -0.5, **kw)
                                    for k, v in pools]) / len(pools)
        paged_attention.DIRECT_ONE_SPLIT = False      # one split through the merge kernel, as before 3dfb4e6
        one_split_merged_ms = graph_ms(lambda: [paged_attention.paged_attention(
            q, k, v, table, lens, dim ** -0.5, num_splits=1, **kw) for k, v in pools]) / len(pools)
        paged_attention.DIRECT_ONE_SPLIT = True
        merge_us = {}
        for warps in (1, 2, 4, 8):      # the merge kernel's warps, at the automatic tiling
            paged_attention.MERGE_WARPS = warps
            merge_us[warps] = 1e3 * graph_ms(lambda: [paged_attention.paged_attention(
                q, k, v, table, lens, dim ** -0.5, **kw) for k, v in pools]) / len(pools)
        paged_attention.MERGE_WARPS = None
        by_kernel = kernel_split_us(lambda k, v: paged_attention.paged_attention(q, k, v, table, lens, dim ** -0.5,
                                                                                 **kw), pools)
        ok = sorted((r for r in results if "us" in r and r["rel_err"] < 1e-2), key=lambda r: r["us"])
        rows.append({"shape": name, "kv_bytes": kv_bytes, "auto_us": auto_ms * 1e3, "auto_us_by_merge_warps": merge_us,
                     "one_split_merged_us": one_split_merged_ms * 1e3, "auto_us_by_kernel": by_kernel,
                     "best": ok[:8]})
        print(f"{name:32s} auto {auto_ms * 1e3:6.1f} us ({kv_bytes / auto_ms / 1e6 / copy:.2f}), merge warps "
              + " ".join(f"{w}:{u:.1f}" for w, u in merge_us.items()) + "; kernels "
              + " ".join(f"{k[:12]}:{u:.1f}" for k, u in by_kernel.items()) + "; best "
              + "; ".join(f"{r['us']:.1f} us ({r['bandwidth_fraction']:.2f}) {tuple(r['config'].values())[:3]} "
                          f"s{r['splits']}" for r in ok[:4]), flush=True)
    return rows


# Verify steps whose attention also yields the page-mass by-product: (batch, context, q_len, kv_heads, group, dim).
# The default model at batch 32 / 64 (SpecAttn-Y's verify at 8K) and the 8B heads at batch 1, 32K and batch 8, 8K
# (kernels.py; at batch 8 block mass cost +72% with five rows against +29% for page mass: not yet explained).
BYPRODUCT_SHAPES = [(32, 8000, 5, 3, 3, 64), (64, 8000, 5, 3, 3, 64), (1, 32768, 5, 8, 4, 128),
                    (8, 8192, 5, 8, 4, 128)]


def byproduct_sweep(copy: float) -> list[dict]:
    """Plain verify attention against the same with page mass and with block mass (64-key blocks; a tile per
    block, or two blocks per 128-key tile where the launch has them), and plain attention at the split count and
    tiling each block-mass launch used. (Block sums held in registers, the way before 597e70f, are in
    results/byproduct_registers.json.)"""
    from benchmarks.kernels import kv_pools
    rows = []
    for batch, ctx, q_len, kv_heads, group, dim in BYPRODUCT_SHAPES:
        pools, table, lens, kv_bytes = kv_pools(batch, ctx, kv_heads, dim)
        q = torch.randn(batch, q_len, kv_heads * group, dim, device="cuda", dtype=torch.bfloat16)

        def timed(**kw):
            return 1e3 * graph_ms(lambda: [paged_attention.paged_attention(q, k, v, table, lens, dim ** -0.5, **kw)
                                           for k, v in pools]) / len(pools)
        row = {"shape": f"b{batch}-{ctx // 1024}k-q{q_len}-h{kv_heads}x{group}-d{dim}", "plain_us": timed(),
               "page_mass_us": timed(page_mass=True)}
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        default_subtiles = paged_attention.BLOCK_MASS_SUBTILES
        for subtiles in (False, True):
            paged_attention.BLOCK_MASS_SUBTILES = subtiles
            way = "subtiles" if subtiles else "stored_per_tile"
            launch, splits, *_ = paged_attention._plan_launch(batch, kv_heads, dim, 16, ctx, sms, None, None, True,
                                                              64, False)
            row[f"block64_{way}_us"] = timed(page_mass=True, mass_tokens=64)
            row[f"block64_{way}_splits"] = splits
            row[f"plain_at_{way}_splits_us"] = timed(num_splits=splits, launch=launch)
        paged_attention.BLOCK_MASS_SUBTILES = default_subtiles
        finish = {}
        for tile, warps in itertools.product((512, 1024, 2048, 4096, 8192), (1, 2, 4, 8)):
            paged_attention.MASS_FINISH_TILE, paged_attention.MASS_FINISH_WARPS = tile, warps
            finish[f"{tile}x{warps}"] = timed(page_mass=True, mass_tokens=64)
        paged_attention.MASS_FINISH_TILE, paged_attention.MASS_FINISH_WARPS = 1024, 4
        row["block64_by_finish_tile_x_warps_us"] = finish
        best = min(finish, key=finish.get)
        row["block64_best_finish"] = f"{best}: {finish[best]:.1f}"
        rows.append(row)
        print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                       if not isinstance(v, dict)), flush=True)
    return rows


def main() -> None:
    copy = copy_bandwidth_gbs()
    out = {**environment(), "copy_bandwidth_gbs": copy}
    if "--byproduct" in sys.argv:
        out["byproduct"] = byproduct_sweep(copy)
    elif "--splits" in sys.argv:     # --batches=32,64 / --names=h4x4,h8x4-d128: only those shapes
        only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--batches=")), "")
        names = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--names=")), "")
        warps = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--warps=")), "4")
        stages = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--stages=")), "2,3")
        blocks = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--blocks=")), "32,64,128")
        out["splits"] = split_sweep(copy, {int(b) for b in only.split(",") if b}, [n for n in names.split(",") if n],
                                    tuple(int(w) for w in warps.split(",")), tuple(int(x) for x in stages.split(",")),
                                    tuple(int(x) for x in blocks.split(",")))
    else:
        out["gemv"] = gemv_sweep(copy)
        out["attention"] = attention_sweep(copy)
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    write_json_atomic(paths[0] if paths else RESULTS / "tune.json", out)


if __name__ == "__main__":
    main()
