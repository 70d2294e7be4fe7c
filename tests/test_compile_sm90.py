"""The Triton kernels compile for the GPU (sm_90, with PDL), not only in the interpreter: CPU CI runs them through
Triton's interpreter, which accepts code the compiler rejects (a module global read inside @jit code, for one).
Triton compiles for a given target without a GPU (~5 s for all of these, with benchmarks/kernel_registers.py's
compile_sm90 and its attention signature); this runs in a subprocess because the
interpreter, switched on for the other tests, turns every @jit function into an interpreted one when its module is
imported."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMPILE_ALL = r'''
from benchmarks.kernel_registers import ATTENTION_SIGNATURE, BASE, compile_sm90
from specattn.kernels import draft_step, gemv, paged_attention, rope_kv, swiglu

def compile_checked(fn, pointers, ints, floats, constexprs):
    pointers = pointers if isinstance(pointers, dict) else {p: "*bf16" for p in pointers}
    signature = {**pointers, **{i: "i32" for i in ints}, **{f: "fp32" for f in floats}}
    kernel = compile_sm90(fn, signature, constexprs, warps=4, stages=3)
    assert kernel.asm["cubin"]
    return kernel

GEMV = (["x_ptr", "w_ptr", "out_ptr", "add_ptr"], ["M", "N", "K", "stride_xm", "stride_wn", "stride_wk", "stride_om",
                                                  "stride_am"], [])
ROPE = ({**{p: "*bf16" for p in ["x_ptr", "w_ptr", "bias_ptr", "cos_ptr", "sin_ptr", "q_out_ptr", "k_pool_ptr",
                                  "v_pool_ptr"]}, "slots_ptr": "*i32"},
        ["M", "K", "stride_xm", "stride_wn", "stride_cs", "heads", "kv_heads"], ["eps"])
SWIGLU = (["x_ptr", "w_ptr", "out_ptr"], ["M", "K", "inter", "stride_xm", "stride_wn", "stride_om"], ["eps"])
for dot, block_m in ((False, 1), (True, 64)):
    base = dict(BLOCK_M=block_m, BLOCK_K=64, DOT=dot, UPCAST=False, PDL=2)
    mma = compile_checked(gemv._gemv_kernel, *GEMV, dict(base, BLOCK_N=16 if dot else 8, ADD=True)).asm["ptx"]
    assert ("mma" in mma) == dot
    compile_checked(rope_kv._qkv_rope_write_kernel, *ROPE, dict(base, HALF=32, PAIRS=8 if dot else 4, BIAS=True))
    compile_checked(swiglu._gate_up_swiglu_kernel, *SWIGLU, dict(base, PAIRS=8 if dot else 4))

ATTN = dict(BASE, PAGE_MASS=True, PDL=2)        # a verify step with the page-mass by-product
compile_checked(paged_attention._paged_attn_split_kernel, ATTENTION_SIGNATURE, [], [], ATTN)
compile_checked(paged_attention._paged_attn_split_kernel, ATTENTION_SIGNATURE, [], [],
                dict(ATTN, Q_LEN=1, Q_BLOCK=1, BLOCK_M=16, SPARSE=True, PAGE_MASS=False))
MERGE = {"o_part_ptr": "*fp32", "m_part_ptr": "*fp32", "l_part_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32"}
compile_checked(paged_attention._merge_splits_kernel, MERGE, ["num_splits"], [], dict(HEAD_DIM=128, BLOCK_S=64, PDL=2))
MASS = {"mass_part_ptr": "*fp32", "lse_ptr": "*fp32", "lens_ptr": "*i32", "sel_count_ptr": "*i32", "mass_ptr": "*fp32"}
compile_checked(paged_attention._page_mass_kernel, MASS, ["mass_pages", "mass_tiles", "stride_mb", "stride_mh",
                                                       "stride_part_layer", "stride_lse_layer", "stride_ml"], [],
                dict(Q_LEN=5, GROUP=4, HEADS=32, PAGE_SIZE=16, PAGES_PER_VALUE=4, VALUES_PER_TILE=2, MASS_SLOTS=4,
                     BLOCK_P=64, BLOCK_R=32, SPARSE=False, MASS_TILE=True, PDL=2, COMPACT=False, SUMS_HALF=False,
                     BY_BLOCK=True))
# exact page sums inside warps (128-key tiles stored, 64-key tiles held; fp16 sums) and their finishing
compile_checked(paged_attention._paged_attn_split_kernel, ATTENTION_SIGNATURE, [], [],
                dict(ATTN, BLOCK_N=128, WARP_PAGES=4, TILE_PAGES=8, SUMS_HALF=True, MASS_SLOTS=5))
compile_checked(paged_attention._paged_attn_split_kernel, ATTENTION_SIGNATURE, [], [],
                dict(ATTN, WARP_PAGES=4, TILE_PAGES=4, SUMS_HALF=True, MASS_SLOTS=3, DEFER_MASS=True, MAX_TILES=8))
compile_checked(paged_attention._page_mass_kernel, MASS, ["mass_pages", "mass_tiles", "stride_mb", "stride_mh",
                                                       "stride_part_layer", "stride_lse_layer", "stride_ml"], [],
                dict(Q_LEN=5, GROUP=4, HEADS=32, PAGE_SIZE=16, PAGES_PER_VALUE=1, VALUES_PER_TILE=8, MASS_SLOTS=5,
                     BLOCK_P=64, BLOCK_R=32, SPARSE=False, MASS_TILE=False, PDL=2, COMPACT=True, SUMS_HALF=True,
                     BY_BLOCK=False))
WRITE = {**{p: "*bf16" for p in ["qkv_ptr", "cos_ptr", "sin_ptr", "q_out_ptr", "k_pool_ptr", "v_pool_ptr", "x_ptr",
                                 "bias_ptr"]}, "slots_ptr": "*i32"}
compile_checked(rope_kv._rope_write_kernel, WRITE,
                ["stride_row", "stride_cs", "stride_x", "heads", "kv_heads", "hidden"], ["eps"],
                dict(HALF=64, BLOCK_D=64, BLOCK_Q=32, BLOCK_KV=8, NORM=True, BIAS=True, BLOCK_X=4096, PDL=2))
compile_checked(swiglu._swiglu_rms_kernel, ["gu_ptr", "x_ptr", "out_ptr"], ["stride_gu", "stride_x", "inter", "hidden"],
                ["eps"], dict(BLOCK_X=4096, BLOCK_I=1024, PDL=2))
DRAFT = {**{p: "*bf16" for p in ["x_ptr", "cos_ptr", "sin_ptr", "k_ptr", "v_ptr", "q_buf", "o_buf", "act_buf"]},
         **{p: "*i32" for p in ["lens_ptr", "table_ptr", "pages_ptr", "counts_ptr", "counter_ptr"]},
         **{p: "*i64" for p in ["slots_ptr", "w_qkv", "b_qkv", "w_o", "w_gate_up", "w_down"]}, "lse_buf": "*fp32"}
DRAFT_INTS = ["stride_x", "stride_cs", "stride_table", "stride_pl", "stride_pb", "stride_ph", "stride_cl", "stride_cb",
              "stride_kl", "M", "first_layer", "layers"]
for splits in (1, 2):     # the default model's shapes, every phase and the grid barriers between them
    ptx = compile_checked(draft_step._draft_blocks_kernel, DRAFT, DRAFT_INTS, ["eps", "qk_scale"],
                          dict(HIDDEN=576, INTER=1536, HEADS=9, KV_HEADS=3, HEAD_DIM=64, PAGE_SIZE=16, BIAS=True,
                               BLOCK_M=64, BLOCK_P=16, BLOCK_O=16, BLOCK_I=16, BLOCK_D=16, BLOCK_K=64, BLOCK_KEYS=64,
                               GROUP_PAD=16, SPLITS=splits, PHASE=0, UPCAST=False)).asm["ptx"]
    assert "atom.global.gpu.release.add" in ptx and "ld.global.gpu.acquire" in ptx
print("compiled")
'''


def test_kernels_compile_for_hopper_with_pdl():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", COMPILE_ALL], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


OCCUPANCY = r'''
from benchmarks.kernel_registers import BASE, QWEN_HEADS, SMALL_HEADS, compile_report
from specattn.kernels import paged_attention
# (warps, stages, constexprs, programs an SM the kernel had when these verify steps were timed)
VERIFY = {
    "1.5B heads, block mass": (4, 2, dict(BASE, **QWEN_HEADS, PAGE_MASS=True, MASS_TILE=True, MASS_SLOTS=2), 3),
    "1.5B heads, plain": (4, 2, dict(BASE, **QWEN_HEADS), 3),
    "default model, block mass": (4, 4, dict(BASE, **SMALL_HEADS, PAGE_MASS=True, MASS_TILE=True, MASS_SLOTS=2), 5),
    "default model, plain": (4, 4, dict(BASE, **SMALL_HEADS), 5),
}
for name, (warps, stages, constexprs, want) in VERIFY.items():
    got = compile_report(paged_attention._paged_attn_split_kernel, warps, stages, dict(constexprs, PDL=2))
    assert got["programs_per_sm"] >= want and got["spill_store_bytes"] == 0, (name, got)
print("occupancy kept")
'''


def test_verify_attention_keeps_its_programs_per_sm():
    """A one-line change to the split kernel's partial-output store (a mask on empty splits) once took the 1.5B's
    block-mass verify from 168 to 198 registers, 3 programs an SM to 2, and its verify step from 23.6 to 30.3 ms
    on the H100 (benchmarks/NOTES.md, session 29). ptxas's allocation is deterministic for a pinned Triton, so the
    verify launches' occupancy is checked offline (sm_90)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", OCCUPANCY], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "occupancy kept" in done.stdout, done.stderr[-3000:]
