"""Registers, spills and shared memory of the paged-attention split kernel for sm_90 (H100/H200), counted
offline: Triton compiles the kernel for that target on any machine (no GPU needed) and the ptxas it bundles
reports what it allocated (`ptxas -v`). Arguments carry the 16-divisibility a real launch specialises on
(pointers and the q/K strides), or the counts come out far worse than what runs. Programs per SM follow from
registers (65,536 per SM) and shared memory (227 KB), which decides whether a launch fits one wave.

Usage: python benchmarks/kernel_registers.py [out.json]   (default results/kernel_registers.json)
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)           # compile for the GPU, not the interpreter

import triton  # noqa: E402
import triton.backends.nvidia as nvidia_backend  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS  # noqa: E402
from specattn.evaluation.results import environment, write_json_atomic  # noqa: E402
from specattn.kernels import paged_attention  # noqa: E402

POINTERS = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "page_table_ptr": "*i32", "lens_ptr": "*i32",
            "sel_ptr": "*i32", "sel_count_ptr": "*i32", "sel_phys_ptr": "*i32", "o_part_ptr": "*fp32",
            "m_part_ptr": "*fp32", "l_part_ptr": "*fp32", "mass_part_ptr": "*fp32", "out_ptr": "*bf16",
            "lse_ptr": "*fp32"}
INTS = ["stride_qb", "stride_qt", "stride_qh", "stride_kp", "stride_kr", "stride_kh", "stride_ptb", "sel_len",
        "mass_tiles", "num_splits"]
ATTENTION_SIGNATURE = {**POINTERS, "scale": "fp32", **{k: "i32" for k in INTS}}     # _paged_attn_split_kernel
DIVISIBLE_BY_16 = list(POINTERS) + ["stride_qb", "stride_qt", "stride_qh", "stride_kp", "stride_kr", "stride_kh"]
# Verify steps (5 new rows) as paged_attention launches them: (num_warps, num_stages, constexprs over BASE[,
# register cap]).
BASE = dict(Q_LEN=5, Q_BLOCK=5, GROUP=4, HEADS=32, PAGE_SIZE=16, HEAD_DIM=128, BLOCK_M=32, BLOCK_N=64,
            UPCAST_DOT=False, SPARSE=False, TOKEN_LIST=False, PAGE_MASS=False, MASS_TILE=False, MAX_TILES=1,
            MASS_SLOTS=16, DEFER_MASS=False, DIRECT=False, PHYS_LIST=False, MASS_SUB=1, EARLY=1, PDL=0,
            TILES_PER_BLOCK=1, WARP_PAGES=0, TILE_PAGES=1,
            SUMS_HALF=False)
SMALL_HEADS = dict(GROUP=3, HEADS=9, HEAD_DIM=64, BLOCK_M=16)
QWEN_HEADS = dict(GROUP=6, HEADS=12, HEAD_DIM=128, BLOCK_M=32)      # Qwen2.5-Coder-1.5B
QWEN_WIDE = dict(QWEN_HEADS, BLOCK_M=64, Q_LEN=7, Q_BLOCK=7)           # its verify at gamma 6: 42 rows
WIDE_BLOCK_MASS = dict(QWEN_WIDE, BLOCK_N=32, PAGE_MASS=True, MASS_TILE=True, MASS_SLOTS=2, TILES_PER_BLOCK=2)
CONFIGS = {
    "8B heads, batch 8 x 8K: plain": (4, 2, {}),
    "8B heads, batch 8 x 8K: block mass": (4, 2, dict(PAGE_MASS=True, MASS_TILE=True, MASS_SLOTS=2)),
    "8B heads, batch 8 x 8K: page mass (deferred)": (4, 2, dict(PAGE_MASS=True, DEFER_MASS=True, MAX_TILES=8)),
    "default model, batch 64 x 8K: plain": (4, 4, SMALL_HEADS),
    "default model, batch 64 x 8K: block mass": (4, 4, dict(SMALL_HEADS, PAGE_MASS=True, MASS_TILE=True,
                                                             MASS_SLOTS=2)),
    "8B heads, batch 1 x 32K: plain": (4, 3, dict(BLOCK_N=128)),
    "8B heads, batch 1 x 32K: block mass (sub-tiles)": (4, 3, dict(BLOCK_N=128, PAGE_MASS=True, MASS_TILE=True,
                                                                    MASS_SUB=2, MASS_SLOTS=4)),
    "8B heads, batch 1 x 32K: page mass": (4, 3, dict(BLOCK_N=128, PAGE_MASS=True)),
    "8B heads, batch 1 x 32K: decode (1 row)": (4, 3, dict(BLOCK_N=128, Q_LEN=1, Q_BLOCK=1, BLOCK_M=16)),
    "8B heads, batch 1 x 32K: sparse decode": (4, 3, dict(BLOCK_N=128, Q_LEN=1, Q_BLOCK=1, BLOCK_M=16,
                                                          SPARSE=True)),
    "default model draft, batch 64: sparse": (4, 2, dict(SMALL_HEADS, Q_LEN=1, Q_BLOCK=1, BLOCK_N=128,
                                                         SPARSE=True)),
    "default model, batch 64 x 8K: plain, 1 warp": (1, 4, SMALL_HEADS),
    "default model, batch 64 x 8K: block mass, 1 warp": (1, 4, dict(SMALL_HEADS, PAGE_MASS=True, MASS_TILE=True,
                                                                     MASS_SLOTS=2)),
    "default model, batch 64 x 8K: decode, 1 warp": (1, 4, dict(SMALL_HEADS, Q_LEN=1, Q_BLOCK=1)),
    "default model, batch 64 x 8K: decode": (4, 4, dict(SMALL_HEADS, Q_LEN=1, Q_BLOCK=1)),
    "1.5B heads, batch 64 x 32K: plain": (4, 2, QWEN_HEADS),
    "1.5B heads, batch 64 x 32K: plain, 2 warps": (2, 2, QWEN_HEADS),
    "1.5B heads, batch 64 x 32K: block mass": (4, 2, dict(QWEN_HEADS, PAGE_MASS=True, MASS_TILE=True, MASS_SLOTS=2)),
    "1.5B heads, b64 x 32K, 7 rows: plain, 64-key tiles": (4, 2, QWEN_WIDE),
    "1.5B heads, b64 x 32K, 7 rows: plain, 32-key tiles": (4, 2, dict(QWEN_WIDE, BLOCK_N=32)),
    "1.5B heads, b64 x 32K, 7 rows: block mass, 64-key tiles": (4, 2, dict(QWEN_WIDE, PAGE_MASS=True, MASS_TILE=True,
                                                                            MASS_SLOTS=2)),
    "1.5B heads, b64 x 32K, 7 rows: block mass over 2 32-key tiles, branch store": (4, 2, WIDE_BLOCK_MASS),
    "1.5B heads, b64 x 32K, 7 rows: block mass over 2 32-key tiles, branch store, <= 128 registers": (
        4, 2, WIDE_BLOCK_MASS, 128),
    "1.5B heads, b64 x 32K, 7 rows: 32-key block mass, 32-key tiles": (4, 2, dict(QWEN_WIDE, BLOCK_N=32, PAGE_MASS=True,
                                                                              MASS_TILE=True, MASS_SLOTS=2)),
}


def compile_sm90(fn, signature: dict, constexprs: dict, warps: int, stages: int, divisible_by_16=(),
                 maxnreg: int | None = None):
    """Triton's compile of the @jit function fn for sm_90, on any machine: signature gives every runtime argument's
    type ("*bf16", "i32", "fp32", ...), divisible_by_16 the arguments a real launch specialises on."""
    names = fn.arg_names
    missing = set(names) - set(signature) - set(constexprs)
    if missing:
        raise ValueError(f"{fn.__name__}: no type for {sorted(missing)}")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible_by_16}
    src = ASTSource(fn, {**signature, **{k: "constexpr" for k in constexprs}},
                    constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_report(fn, warps: int, stages: int, constexprs: dict, maxnreg: int | None = None) -> dict:
    kernel = compile_sm90(fn, ATTENTION_SIGNATURE, constexprs, warps, stages, DIVISIBLE_BY_16, maxnreg)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "ptxas")
    done = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True,
                          text=True, check=True)
    os.unlink(f.name)
    text = done.stderr + done.stdout
    ptx = kernel.asm["ptx"]
    head = ptx.index("Inner Loop Header")                        # the key loop: its label up to its back edge
    label = ptx[ptx.rindex("\n", 0, head) + 1:head].split(":")[0]
    loop = ptx[head:ptx.rindex(f"{label};")]
    registers = int(text.split("Used ")[1].split(" registers")[0])
    spilled = int(text.split(" bytes spill stores")[0].rsplit(",", 1)[-1])
    shared = kernel.metadata.shared
    per_sm = min(65536 // (-(-registers // 8) * 8 * 32 * warps), (227 * 1024) // max(shared, 1))
    return {"registers": registers, "spill_store_bytes": spilled, "shared_bytes": shared, "programs_per_sm": per_sm,
            "barriers_in_loop": loop.count("bar.sync")}


def main() -> None:
    rows = []
    for name, (warps, stages, over, *cap) in CONFIGS.items():       # cap: a register limit (maxnreg), if given
        row = {"config": name, "num_warps": warps, "num_stages": stages, "maxnreg": cap[0] if cap else None,
               **compile_report(paged_attention._paged_attn_split_kernel, warps, stages, {**BASE, **over}, *cap)}
        rows.append(row)
        print(f"{name:48s} {row['registers']:3d} registers, {row['spill_store_bytes']:4d} B spilled, "
              f"{row['shared_bytes'] // 1024:3d} KB shared -> {row['programs_per_sm']} per SM, "
              f"{row['barriers_in_loop']} barriers in the loop", flush=True)
    out = {**environment(), "target": "sm_90a (offline ptxas)", "rows": rows}
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    write_json_atomic(paths[0] if paths else RESULTS / "kernel_registers.json", out)


if __name__ == "__main__":
    main()
