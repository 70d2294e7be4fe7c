"""Paged attention in Triton for decode, verify and prefill, split over the KV length (flash-decoding).

One program handles one (sequence, KV head, split, query block): all query heads of that KV head
and a block of new tokens at once, so each K/V tile is read once per KV head (GQA reuse). Decode and
verify (q_len <= 16) fit one query block; prefill chunks are tiled into many. Splits let batch 1 at
long context fill every SM; a second small kernel merges the splits with their log-sum-exp. Lengths
are read from the device, so a launch can be replayed in a CUDA graph while sequences grow.
Reference: `reference.paged_attention`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .pdl import INTERPRETED, launch_options, wait_for_predecessor


@dataclass(frozen=True)
class LaunchConfig:
    """Tiling and launch knobs, chosen by the sweep in benchmarks/tune_attention.py."""
    block_n: int = 64        # keys per tile (a multiple of the page size)
    num_warps: int = 4
    num_stages: int = 2
    split_factor: float = 2  # aim for split_factor x SMs programs when splitting the KV length


DEFAULT_LAUNCH = LaunchConfig()
# From benchmarks/results/tune.json and ar.json (H100, bf16, decode): with few (sequence, KV head) pairs
# each program streams a long KV range and wants wide tiles. With many, head_dim 64 gains 16% from deeper
# pipelining and more splits (SmolLM, batch 32, 8K) while head_dim 128 loses 10% with them (8B-shaped,
# batch 8, 32K: 0.93 -> 0.82 of copy bandwidth), so it keeps the plain config.
FEW_PROGRAMS = LaunchConfig(block_n=128, num_warps=4, num_stages=3, split_factor=2)
MANY_PROGRAMS_SMALL_HEADS = LaunchConfig(block_n=64, num_warps=4, num_stages=4, split_factor=4)
# Sparse lists of a few hundred keys per (sequence, KV head) with head_dim 64 (the default model's draft step:
# 32 pages of 3 KV heads at batch 32 / 64). H200, results/tune_splits_draft.json: 128-key tiles, 2 stages and
# ~3 programs per SM, split into a power of two so tiles divide evenly: 7.1 / 9.8 µs against 10.0 / 13.1 for
# MANY_PROGRAMS_SMALL_HEADS at its automatic 6 / 3 splits.
SPARSE_SMALL_HEADS = LaunchConfig(block_n=128, num_warps=4, num_stages=2, split_factor=3)
# At most this many splits for SPARSE_SMALL_HEADS (None: as many as its split factor asks). 1 = each program writes
# its rows itself (DIRECT_ONE_SPLIT): 10.8 vs 9.8 µs alone at batch 64 (tune_splits_draft.json), but one launch
# fewer per layer, whose boundary a whole draft step may value more; for an A/B in the step (profile_step.py
# --sparse-max-splits), not yet timed there.
SPARSE_SMALL_HEADS_MAX_SPLITS: int | None = None
# The same lists when the (sequence, KV head) pairs alone fill the SMs (the default model's draft step at batch 64:
# 192 pairs): one split of 256-key tiles over 8 warps, written directly (no merge launch). H200, standalone
# (tune_splits_draft_s18.json): 10.3 us against 11.0 for SPARSE_SMALL_HEADS at its 2 splits plus the merge; at
# batch 32 (96 pairs) splitting stays faster (6.6 us; 256-key tiles in 2 splits 7.0). In the draft step on random
# weights, round-robin: 1,331 vs 1,345 us; but in the real model's selfspec run after it the b64 drafts took 5.17-5.18
# ms a round against 4.81-5.00 the run before (not an A/B in one run). Off (None) until an A/B in one run decides.
SPARSE_SMALL_HEADS_FULL_WAVE: LaunchConfig | None = None
FULL_WAVE_CANDIDATE = LaunchConfig(block_n=256, num_warps=8, num_stages=2)
# Sparse lists with few programs (8B heads at batch 1, 10% of 32K: one 128-key tile a split): FEW_PROGRAMS with two
# stages, as there is no second tile to pipeline. H200, sweeps of two sessions: 8.30 vs 8.50 µs (tune_splits.json)
# and 8.26 vs 8.65 (tune_splits_warps.json) for FEW_PROGRAMS's three stages. One stage lost in every kernels.py
# A/B (18 runs, H100/H200, b1 x 32K one row: 8.1-8.5 against 8.0-8.4 µs); sparse_sweep_b1.json (4b10033) read 7.6
# against 8.5 once, which the kernels.py run beside it did not repeat (8.46 against 8.26), so two stages stay.
SPARSE_FEW_PROGRAMS = LaunchConfig(block_n=128, num_warps=4, num_stages=2, split_factor=2)
# Sparse lists with many programs at head_dim 128 (8B heads at batch 8 x 32K, 10% of the pages: 64 pairs of ~3,300
# listed keys) take the same 128-key tiles and 2 stages. H100, sparse_sweep_05e8293.json: one row 44.6 us, 0.80 of
# copy, against 50.0 us (0.71) for DEFAULT_LAUNCH's 64-key tiles; physical lists 44.7 vs 46.5. Sharing pages
# across heads (48.4) or a contiguous page table (49.2) did not close the gap: the tile width did. sparse_sweep.json
# (f834aef): one row 44.1 us (0.81) as the library's launch; five rows (32-row query blocks) 46.9 vs 51.0 us. Query
# blocks of 64 rows were not swept and keep DEFAULT_LAUNCH.
SPARSE_MANY_PROGRAMS = SPARSE_FEW_PROGRAMS
SPARSE_MANY_PROGRAMS_MAX_ROWS = 32
# Keys a tile for decode/verify blocks of 64 query rows at head_dim 128 (a KV head's query heads x new tokens over
# 32: Qwen2.5-1.5B's 6 heads at gamma >= 5, 7- and 8-head groups at gamma 4). 64 x 64 tiles take 196 registers
# and 80 KB of shared memory, 2 programs per SM; 64 x 32 take 122 and 48 KB, 4 (offline sm_90 counts). H200, one
# layer at the 1.5B's heads, b64 x 32K (verify_cost_qwen_tiles.json): 7 rows 890 -> 635 us (0.57 -> 0.79 of copy),
# 6 rows 887 -> 651; 32-row tiles (5 rows) and head_dim 64 were slower with 32-key tiles (542 -> 728, 141 -> 181).
# Many programs only: with few (batch 1 x 32K, 8-head groups, 5 rows) plain attention gained (66.6 -> 61.1 us
# against FEW_PROGRAMS's 128-key tiles) but block mass lost (70.1 -> 78.8 us).
WIDE_QUERY_BLOCK_N = 32
# Block mass over those 32-key tiles took 136 registers with a masked store every tile (3 programs per SM; plain
# attention 122, 4). A branch around the block's store takes 132, and with a cap of 128 registers (Triton's maxnreg,
# GPU only) 125 without spills: 4 per SM (offline sm_90, kernel_registers_wide_rows.json). H100, one layer, 7 rows
# (verify_cost_qwen.json, verify_cost_g8.json at 2f2ec3e): 1.5B heads b64 x 32K 914 -> 881 us (+20.1% -> +15.7%
# over plain), b32 507 -> 482; 8-head groups b16 x 16K 459 -> 440. The masked store is gone; None drops the cap.
WIDE_BLOCK_MASS_REGISTER_CAP: int | None = 128


def defer_page_mass(launch: LaunchConfig) -> bool:
    """Whether page mass waits in registers until after the loop (else: stored every tile). H200, kernels.py,
    overhead of page mass over plain attention (commit ad1b820 stores every tile, 29bcad2 defers): many programs
    with 64-key tiles (batch 8, 8K) 0.65 -> 0.31 with 5 rows, 0.10 -> 0.11 with 1; few programs with 128-key tiles
    (batch 1) 0.32 -> 0.41 at 32K and 0.40 -> 0.48 at 8K with 5 rows, 0.17 -> 0.13 at 32K with 1."""
    return launch.block_n <= DEFER_PAGE_MASS_MAX_BLOCK_N


# Tiles of more keys store their page mass every tile (see defer_page_mass). Page sums by warp held over 128-key
# tiles too (bfcb170, page_mass_defer128_q5.json): b1 x 32K +17.3% against +11.4% stored, so 64 stays.
DEFER_PAGE_MASS_MAX_BLOCK_N = 64


def choose_launch(programs: int, head_dim: int, sparse: bool = False, query_rows: int = 16) -> LaunchConfig:
    """programs = batch * kv_heads * query blocks, before splitting the KV length; query_rows: rows a program."""
    if programs < 32:
        return SPARSE_FEW_PROGRAMS if sparse else FEW_PROGRAMS
    if head_dim <= 64:
        return MANY_PROGRAMS_SMALL_HEADS
    return SPARSE_MANY_PROGRAMS if sparse and query_rows <= SPARSE_MANY_PROGRAMS_MAX_ROWS else DEFAULT_LAUNCH
# Triton 3.6's interpreter (pdl.INTERPRETED: the CPU test path) gets tl.dot wrong on bf16/fp16 operands; there
# the kernel upcasts them to fp32 first. Compiled GPU code is unaffected.
# Block mass: each tile stores its row sums and row max as it goes, in one [rows, slots] store (mass_slots; two
# separate stores until 2026-11-29 cost registers at head_dim 128: see mass_slots). Until 597e70f they were
# held in [rows, 32] registers updated by a select every tile, which cost more than the tile's own work at
# head_dim 64 and forced extra splits. H200, byproduct_registers.json (verify, default model, 8K, 5 rows): batch
# 64 plain 112.6 µs, block mass in registers 158.6 µs (4 splits), stored per tile 135.4 µs; batch 32 69 µs both.
# _page_mass_kernel: (row, page) elements and warps per program. H200, byproduct_finish.json (block mass, verify
# of 5 rows): 1024 x 4 against 4096 x 4 takes the whole attention from 132.7 to 121.4 µs at batch 64, 8K (plain
# attention 110.2) and 68.0 to 63.5 at batch 32; every tile of 512-2048 with 4-8 warps within 1 µs of it.
MASS_FINISH_TILE, MASS_FINISH_WARPS = 1024, 4
# Block mass of blocks of several pages (SpecAttn-Y/blk64: 64-key blocks, 16-token pages) is finished per block, each
# block's mass then spread over its pages, instead of per page (each page re-reading its block's partials and tile
# max for every row: 4x the loads and exps). H100, the 1.5B's shape at b64 x 32K, a verify step of 28 layers with the
# mass finished once (profile_qwen_verify_b64.json, d621462): the per-page finishing launch took 705 us of 24.6 ms.
# Per block, one layer's finishing launch: 13.5 against 28.5 us at that shape, 3.7 against 5.7 at the default
# model's b64 x 8K (verify_cost_finish_*.json, 7ba4cf9, H100; variant block64_finished_per_page is the per-page one).
MASS_FINISH_BY_BLOCK = True
# Block mass over tiles wider than a block (128-key tiles, 64-key blocks): keep the launch's tile and store each
# block's sum from a masked row sum, instead of shrinking the tile to the block. H200, byproduct.json (bb38795,
# verify of 5 rows, batch 1 x 32K, 8B heads): plain 43.9 µs, block mass with 64-key tiles 59.1, with sub-tiles
# 53.0; batch 32 / 64 at head_dim 64 have 64-key tiles already (unchanged).
BLOCK_MASS_SUBTILES = True
# Tried (8631c59, removed): the tile's row sums and its first block's in one joint reduction (tl.reduce over a
# pair), 11 barriers in the loop instead of 14 (offline sm_90). H100, b1 x 32K, 5 rows: split kernel 53.5 vs 53.4
# us (verify_cost_8b_joint.json): the loop waits on its loads, not on those barriers.
# Block mass over tiles narrower than a block (WIDE_QUERY_BLOCK_N): the split kernel carries the block's row sums
# over its tiles and stores once a block. H200 (verify_cost_*_wide2.json, 83d9d58): +28.7% /
# +24.9% over plain at 7 rows of the 1.5B's heads (b64 x 32K) / 8-head groups (b16 x 16K), against +35.8% / +29.8%
# for a store every tile summed by the finishing kernel (removed).
# Block mass stores [rows, slots] through shared memory (2 of the verify loop's 11 barriers, offline sm_90 counts).
# Storing row sums and row max as two row vectors instead kept 9 barriers at head_dim 64 but was no faster there
# (+10.7% vs +10.1% over plain, b64 x 8K, 5 rows) and cost +67% vs +12.8% at the 1.5B's heads (b64 x 32K):
# results/verify_cost_*_warps.json (session 18); removed.
# Exact page mass of pages this large comes from the block-mass path (mass_tokens = page_size: each block is one page,
# so nothing is spread): its tile row sums cost a masked row sum or none, against the page one-hot's tensor-core
# product and 16-slot store (H100, a 32-layer verify step at b1 x 32K, 5 rows: +7.2% for 64-key blocks, +12.5%
# for 16-token pages one-hot; kernels.json at 8631c59). Smaller pages: see BLOCK_PATH_MAX_HEAD_DIM.
BLOCK_PATH_MIN_PAGE = 64
# Smaller pages take the block path too (one masked row sum a page instead of the one-hot product) when the heads
# have at most BLOCK_PATH_MAX_HEAD_DIM dimensions and a tile holds at most BLOCK_PATH_MAX_PAGES pages. H100, one
# layer of 5 rows with its finishing launch, over plain (verify_cost_page_block_path_*.json, fc9604e / 5a694b5):
# the default model's heads (3 KV heads of 64, 3 query heads each) with 64-key tiles, b64 / b32 / b16 x 8K: +20.7% /
# +19.1% / +19.1% against +37.6% / +35.4% / +38.2% one-hot; with 128-key tiles (8 pages, b8 / b1) +37.6% / +46.3%
# against +25.4% / +39.2%; 8B heads (128 dims, 32-row query blocks) b1 x 32K +22.7% vs +15.4%, b8 x 32K +91.3% vs
# +35.5%. The masses agree to 2e-5.
# Page sums by warp (PAGE_SUMS_BY_WARP) measured a little cheaper for those heads: one layer at b64 / b32 x 8K
# +17.6% / +17.2% against +21.1% / +20.3% (verify_cost_stored_smol.json, c54235f). On the real default model (H100,
# b64 x 8K, page-level SpecAttn-Y, selfspec_warp_smol.json, 84b92b8): verify 5.26 against 5.59 ms a round, 1.72x vs
# 1.71x AR, but only 32 of 64 sequences kept AR's greedy tokens (62 with the block path), the first departing at
# the second token: the held tiles force ~16 splits where AR's decode runs its own count, so near-tied bf16 argmaxes
# round differently. The block path keeps AR's split count; it stays for these heads.
BLOCK_PATH_MAX_HEAD_DIM = 64
BLOCK_PATH_MAX_PAGES = 4


# Exact page mass not taken the block way: each tile's page sums added up inside the warps that hold the page's
# columns (True; keys in _warp_order, see _page_sums_by_warp; a row's sums in page order, then its tiles' maxima),
# or by a tensor-core product with a page one-hot (False; 16 slots a tile, as tl.dot needs 16 columns). Offline
# sm_90: 226 registers against 230 at batch 1 x 32K (128-key tiles, 5 rows), 168 against 255 when 16 tiles are held
# (64-key tiles, 32-row blocks), none of the one-hot's 4 KB of shared memory. H100, 8B heads, a 32-layer step, mass
# finished once, over plain, with the sums first stored interleaved with the row max (page_mass_warp*.json,
# acbdd90): stored every 128-key tile, 5 rows b1 x 32K +12.1% against +12.7%, b1 x 8K +8.9% against +10.8%, one row
# +1.9% / +1.0% against +4.1% / +4.5%; fewer bytes did the rest (PAGE_SUMS_HALF). Deferred: see
# WARP_SUMS_PAGE_MASS_TILES.
PAGE_SUMS_BY_WARP = True
# Page sums by warp stored in fp16 when attention runs in bf16 / fp16 (row maxima stay fp32): 20 bytes a row and
# 128-key tile instead of 36 (and 64 for the interleaved layout before the compact one). Each sum is <= 16 (16 keys,
# relative to the row max), so fp16 keeps ~3 digits: 1.5e-4 of the largest page's mass against the fp32 reference,
# where the one-hot's bf16 product was 4.5e-4. H100, a 32-layer step, 5 rows (page_mass_compact_q5.json, 10ad12b):
# b1 x 32K +5.9% (fp32 sums +9.8%, one-hot +13.0%), b8 x 32K +13.8% (+14.3%, +24.3%), b8 x 8K +15.9% (+16.5%,
# +23.0%): the bytes were most of the by-product's cost at batch 1.
PAGE_SUMS_HALF = True


def exact_mass_by_blocks(page_size: int, head_dim: int, block_n: int) -> bool:
    """Whether exact page mass is summed the way block mass is (each block one page) rather than page by page in
    the tile (by warp sums or a page one-hot, see PAGE_SUMS_BY_WARP), for tiles of block_n keys."""
    return page_size >= BLOCK_PATH_MIN_PAGE or (head_dim <= BLOCK_PATH_MAX_HEAD_DIM
                                                and block_n // page_size <= BLOCK_PATH_MAX_PAGES)


# Deferred page mass (one-hot): tiles a split holds in registers, each BLOCK_N / page_size pages; more tiles, fewer
# splits. H100, 8B heads, 5 rows, a 32-layer step's attention with the mass finished once (page_mass_sweep.json,
# f5f63c4), over plain: 16 tiles against 8 at b8 x 32K +25.3% vs +34.1%, b4 x 32K +19.0% vs +26.9%, b8 x 8K +22.4% vs
# +29.5%, level at b1 / b2 (128-key tiles are not deferred); 32 tiles +66.6% at b8 x 8K, 4 tiles +42.9% at b8 x 32K.
# Those are 32-row query blocks: 16 tiles hold 32 x 16 x 16 fp32 values (64 registers a thread at 4 warps), as many as
# 32 tiles would at 64-row blocks, which keep the 8 tiles they had (PAGE_MASS_HELD_VALUES).
MAX_PAGE_MASS_TILES = 16
PAGE_MASS_HELD_VALUES = 8192
# Page sums by warp hold 8 tiles a split at any query block. H100, the same step (page_mass_warp_tiles_q*.json,
# acbdd90), 4 / 8 / 16 / 32 tiles at 5 rows: b8 x 8K +30.4% / +17.5% / +36.1% / +53.0% (one-hot at 16, the rule
# above: +21.9%), b16 x 8K 39.4 / 26.1 / 22.6 / 18.6 (28.5), b8 x 32K 34.3 / 17.2 / 17.8 / 14.5 (24.6), b4 x 32K
# 26.9 / 15.0 / 12.3 / 8.7 (17.9), b32 x 8K 14.6 / -2.1 / -2.2 / -4.7 (3.7); at one row 8 tiles: 3.8 / 7.5 / 4.4 /
# 4.2 / 6.2 against the one-hot's 18.2 / 6.0 / 7.4 / 2.3 / 9.0. Fewer tiles, more splits: where more tiles win, they
# lose badly elsewhere (a program count just past a whole wave), so 8 is the choice with no cell far off its best.
# Stored every 64-key tile instead (compact fp16 rows, c54235f, page_mass_stored_q5.json): +46% / +38% / +54% / +56%
# at b8 x 8K / b16 x 8K / b8 x 32K / b4 x 32K against +15% / +22% / +14% / +11% held, so 64-key tiles keep holding.
WARP_SUMS_PAGE_MASS_TILES = 8


def page_sums_by_warp(launch: LaunchConfig, page_size: int) -> bool:
    """Whether exact page mass (not taken the block way) sums pages inside warps with this launch: each warp's
    columns must be whole pages (_warp_order)."""
    return PAGE_SUMS_BY_WARP and page_size % 8 == 0 and launch.block_n % (launch.num_warps * page_size) == 0


def page_mass_tiles(query_rows: int, by_warp: bool = False) -> int:
    """Tiles deferred page mass holds for query blocks of query_rows rows (one-hot: 16 slots a tile)."""
    if by_warp:
        return WARP_SUMS_PAGE_MASS_TILES
    return max(1, min(MAX_PAGE_MASS_TILES, PAGE_MASS_HELD_VALUES // (query_rows * 16)))


MERGE_WARPS: int | None = None   # warps of the split-merge kernel; None: merge_warps() (tune_attention sets it)


def merge_warps(block_s: int, head_dim: int) -> int:
    """Warps for one merge program, which loads all [splits, head_dim] fp32 partials of its row at once: one
    warp while that tile is small (draft and batched shapes), more as it grows. H200, tune_splits_b1.json (8B
    heads, batch 1): 64 x 128 partials 13.0 -> 11.5 µs with 2 warps, 128 x 128 at 32K 37.0 -> 25.7 µs with 4;
    tune_splits.json: shapes of 64 x 64 or fewer partials fastest with 1."""
    return max(1, min(4, block_s * head_dim // 4096))
DIRECT_ONE_SPLIT = True   # one split writes the output itself (no merge launch); False: always merge (A/B timing)
# What the split kernel does before waiting for the kernel ahead (PDL): 0 nothing; 1 read the lengths and list
# counts and prefetch its first tile's page-table or page-list entries into L1. None of these is written by a
# PDL-launched kernel (page tables and lengths by the host or torch ops before the step, page lists by torch ops or
# kernels launched without PDL), so they are complete however far the kernels ahead have got. H200, round-robin
# (profile_early_pages_*.json, two runs on two machines): default model draft step b64 1,533 / 1,520 µs with 1 vs
# 1,551 / 1,541 with 0; 8B b1 8K mixed (4,635 vs 4,672, then 4,727 vs 4,712). Also prefetching the first K/V
# tile into L2 was no faster (4,720 / 1,550 µs; removed).
EARLY_PAGES = 1


@triton.jit
def _prefetch_l1(ptrs, mask, SKIP: tl.constexpr):
    """PTX prefetch of the lines holding ptrs (where mask) into L1: no result, so a later load finds them there.
    SKIP (the interpreter, which runs no PTX): nothing."""
    if not SKIP:
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L1 [$1]; mov.b32 $0, 0; }",
                                  "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _warp_order(c, BLOCK_N: tl.constexpr, WARPS: tl.constexpr):
    """The key a tile's column c holds so that each warp's columns of the QK product are whole pages. The product's
    layout on sm_90 (mma v2, warps side by side along the keys, 8-column instruction tiles) gives warp w the columns
    8w + 8·WARPS·r + i; those columns hold the keys 8R·w + 8r + i (R = BLOCK_N / (8·WARPS)), a contiguous run of
    8R keys. Any order is correct (K, V, masks and page sums all follow it); this one keeps page sums inside warps."""
    reps: tl.constexpr = BLOCK_N // (8 * WARPS)
    return 8 * reps * ((c // 8) % WARPS) + 8 * (c // (8 * WARPS)) + c % 8


@triton.jit
def _page_sums_by_warp(p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, WARPS: tl.constexpr):
    """p [BLOCK_M, BLOCK_N] with keys in _warp_order -> each row's sum over each page of the tile [BLOCK_M, pages],
    pages in key order. Sums over the 8 keys of an instruction tile (shuffles inside a warp), then over the tiles of
    a page (registers of one thread): no value crosses warps."""
    reps: tl.constexpr = BLOCK_N // (8 * WARPS)
    per_page: tl.constexpr = PAGE_SIZE // 8
    s = tl.sum(tl.reshape(p, [BLOCK_M, reps, WARPS, 8]), 3)                      # [rows, r, w]
    s = tl.sum(tl.reshape(s, [BLOCK_M, reps // per_page, per_page, WARPS]), 2)   # [rows, page of the warp, w]
    return tl.reshape(tl.permute(s, (0, 2, 1)), [BLOCK_M, WARPS * (reps // per_page)])


@triton.jit
def _tile_keys(blk, n_keys, seq_len, b, pid_bh, sel_ptr, sel_len, sel_phys_ptr, page_table_ptr, stride_ptb,
               BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, SPARSE: tl.constexpr, TOKEN_LIST: tl.constexpr,
               PHYS_LIST: tl.constexpr, WARP_PAGES: tl.constexpr = 0):
    """Tile blk of the split kernel's virtual key sequence -> (key positions, which are real keys, their physical
    pages). Reads only page lists and the page table. WARP_PAGES (the number of warps, or 0): column c of the tile
    holds key _warp_order(c) instead of key c (see _page_sums_by_warp)."""
    cols = tl.arange(0, BLOCK_N)
    if WARP_PAGES:
        cols = _warp_order(cols, BLOCK_N, WARP_PAGES)
    j = blk * BLOCK_N + cols
    in_range = j < n_keys
    if TOKEN_LIST:
        key_pos = tl.load(sel_ptr + pid_bh * sel_len + j, mask=in_range, other=0)
        logical = key_pos // PAGE_SIZE
    else:
        if SPARSE:
            logical = tl.load(sel_ptr + pid_bh * sel_len + j // PAGE_SIZE, mask=in_range, other=0)
        else:
            logical = j // PAGE_SIZE
        key_pos = logical * PAGE_SIZE + j % PAGE_SIZE
    key_ok = in_range & (key_pos < seq_len)
    if PHYS_LIST:      # the list's physical pages, read beside the logical ones: K's address waits on one load
        page = tl.load(sel_phys_ptr + pid_bh * sel_len + j // PAGE_SIZE, mask=in_range, other=0)
    else:
        page = tl.load(page_table_ptr + b * stride_ptb + logical, mask=key_ok, other=0)
    return key_pos, key_ok, page


@triton.jit
def _paged_attn_split_kernel(
    q_ptr, k_ptr, v_ptr, page_table_ptr, lens_ptr, sel_ptr, sel_count_ptr, sel_phys_ptr,
    o_part_ptr, m_part_ptr, l_part_ptr, mass_part_ptr, out_ptr, lse_ptr,
    scale,
    stride_qb, stride_qt, stride_qh,
    stride_kp, stride_kr, stride_kh,
    stride_ptb, sel_len, mass_tiles,
    num_splits,
    Q_LEN: tl.constexpr, Q_BLOCK: tl.constexpr, GROUP: tl.constexpr, HEADS: tl.constexpr,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPARSE: tl.constexpr, TOKEN_LIST: tl.constexpr, PAGE_MASS: tl.constexpr, MASS_TILE: tl.constexpr,
    MAX_TILES: tl.constexpr, MASS_SLOTS: tl.constexpr, DEFER_MASS: tl.constexpr, DIRECT: tl.constexpr,
    PHYS_LIST: tl.constexpr, MASS_SUB: tl.constexpr, EARLY: tl.constexpr, PDL: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr = 1, WARP_PAGES: tl.constexpr = 0, TILE_PAGES: tl.constexpr = 1,
    SUMS_HALF: tl.constexpr = False,
):
    if not EARLY:
        wait_for_predecessor(PDL)
    # Keys are walked as a "virtual" sequence j = 0, 1, ...: dense, j is the key position; sparse, key j is
    # row j % PAGE_SIZE of the (j // PAGE_SIZE)-th page in this (sequence, KV head)'s list of logical pages,
    # or with TOKEN_LIST the j-th token position of its list.
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    t_lo = tl.program_id(2) * Q_BLOCK            # first new token of this query block
    kv_heads = HEADS // GROUP
    b = pid_bh // kv_heads
    kvh = pid_bh % kv_heads

    seq_len = tl.load(lens_ptr + b)
    if SPARSE:
        n_keys = tl.load(sel_count_ptr + pid_bh) * (1 if TOKEN_LIST else PAGE_SIZE)
    else:
        # Keys past the block's last query are invisible (causal), so prefill blocks stop early.
        n_keys = tl.minimum(seq_len, seq_len - Q_LEN + t_lo + Q_BLOCK)
    n_blocks = (n_keys + BLOCK_N - 1) // BLOCK_N
    blocks_per_split = (n_blocks + num_splits - 1) // num_splits
    # block mass over several tiles: a split holds whole blocks (its last tile closes each)
    blocks_per_split = (blocks_per_split + TILES_PER_BLOCK - 1) // TILES_PER_BLOCK * TILES_PER_BLOCK
    block_lo = split * blocks_per_split
    block_hi = tl.minimum(block_lo + blocks_per_split, n_blocks)

    if EARLY:      # the first tile's page entries on their way to L1 while the kernel ahead finishes (EARLY_PAGES)
        j0 = block_lo * BLOCK_N + tl.arange(0, BLOCK_N // PAGE_SIZE) * PAGE_SIZE
        first = j0 < n_keys        # UPCAST_DOT: the interpreter, where _prefetch_l1 does nothing
        if SPARSE:
            _prefetch_l1(sel_ptr + pid_bh * sel_len + j0 // (1 if TOKEN_LIST else PAGE_SIZE), first, UPCAST_DOT)
            if PHYS_LIST:
                _prefetch_l1(sel_phys_ptr + pid_bh * sel_len + j0 // PAGE_SIZE, first, UPCAST_DOT)
        else:
            _prefetch_l1(page_table_ptr + b * stride_ptb + j0 // PAGE_SIZE, first, UPCAST_DOT)
        wait_for_predecessor(PDL)
    rows = tl.arange(0, BLOCK_M)                 # row r = (query head g, new token t)
    g = rows // Q_BLOCK
    t = t_lo + rows % Q_BLOCK
    row_ok = (rows < GROUP * Q_BLOCK) & (t < Q_LEN)
    head = kvh * GROUP + g
    # The mass buffer holds MASS_SLOTS fp32 words per (row, tile): the tile's page sums (page mass) or block sums
    # (block mass) from slot 0, the row max they are relative to in the last slot. With WARP_PAGES a row holds
    # all its tiles' page sums first (TILE_PAGES a tile, in page order; fp16 with SUMS_HALF, two to a word), then
    # all its tiles' row maxima: no padding, so each row's bytes are read and written whole.
    mass_rows = mass_part_ptr + (pid_bh * GROUP * Q_LEN + g * Q_LEN + t).to(tl.int64) * mass_tiles * MASS_SLOTS
    slot_ids = tl.arange(0, MASS_SLOTS if not WARP_PAGES else 1)
    values_per_tile: tl.constexpr = MASS_SUB if MASS_TILE else BLOCK_N // PAGE_SIZE
    slot_used = (slot_ids < values_per_tile) | (slot_ids == MASS_SLOTS - 1)
    max_ptrs = mass_rows + mass_tiles * (MASS_SLOTS - 1)            # WARP_PAGES: the row's maxima
    if SUMS_HALF:
        sum_ptrs = mass_rows.to(tl.pointer_type(tl.float16), bitcast=True)
    else:
        sum_ptrs = mass_rows
    page_ids = tl.arange(0, TILE_PAGES)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    query_pos = seq_len - Q_LEN + t              # causal inside the new block

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    # Page mass with DEFER_MASS waits in registers and is stored once after the loop: per tile its per-page row
    # sums and row max. A store inside the loop slowed the whole kernel by 15-50% on the H100; deferring page mass
    # measured mixed on the H200 (see defer_page_mass).
    tiles_held = tl.arange(0, MAX_TILES)
    page_sums = tl.zeros([BLOCK_M, MAX_TILES, MASS_SLOTS if not WARP_PAGES else 1], tl.float32)
    held_sums = tl.zeros([BLOCK_M, MAX_TILES if WARP_PAGES else 1, TILE_PAGES], tl.float32)   # WARP_PAGES
    held_max = tl.zeros([BLOCK_M, MAX_TILES if WARP_PAGES else 1], tl.float32)
    block_sum = tl.zeros([BLOCK_M], tl.float32)     # a block's row sums so far when it spans tiles
    for blk in range(block_lo, block_hi):
        key_pos, key_ok, page = _tile_keys(blk, n_keys, seq_len, b, pid_bh, sel_ptr, sel_len, sel_phys_ptr,
                                           page_table_ptr, stride_ptb, BLOCK_N, PAGE_SIZE, SPARSE, TOKEN_LIST,
                                           PHYS_LIST, WARP_PAGES)
        kv_off = page.to(tl.int64) * stride_kp + (key_pos % PAGE_SIZE) * stride_kr + kvh * stride_kh
        k = tl.load(k_ptr + kv_off[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0)
        if UPCAST_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        visible = key_ok[None, :] & (key_pos[None, :] <= query_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no visible key yet keep m = -inf; guard the exp against inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        p_sum = tl.sum(p, 1)
        l_i = l_i * alpha + p_sum
        if PAGE_MASS and MASS_TILE:
            # Mass per block of keys: the row sums of p are already there for l_i; _page_mass_kernel spreads a
            # block's mass evenly over its existing pages. MASS_SUB blocks per tile: a masked row sum for all but
            # the last, which is what the tile's row sum leaves over (one masked sum a tile at 128-key tiles and
            # 64-key blocks).
            sums = tl.zeros([BLOCK_M, MASS_SLOTS], tl.float32)
            rest = p_sum
            if TILES_PER_BLOCK > 1:      # carried over the block's tiles like l_i, stored at its last tile
                block_sum = block_sum * alpha + p_sum
                rest = block_sum
            for sub in tl.static_range(MASS_SUB):
                if sub < MASS_SUB - 1:
                    in_sub = (cols // (BLOCK_N // MASS_SUB)) == sub
                    sub_sum = tl.sum(tl.where(in_sub[None, :], p, 0.0), 1)
                    rest = rest - sub_sum
                    sums = tl.where(slot_ids[None, :] == sub, sub_sum[:, None], sums)
                else:
                    sums = tl.where(slot_ids[None, :] == sub, rest[:, None], sums)
        elif PAGE_MASS and WARP_PAGES:
            # Per-row mass of each page of this tile, relative to m_safe (rescaled as below), summed inside the warps
            # that hold the page's columns (keys in _warp_order); stored with the row max, or held (DEFER_MASS).
            page_sum = _page_sums_by_warp(p, BLOCK_M, BLOCK_N, PAGE_SIZE, WARP_PAGES)
            if DEFER_MASS:
                here = tiles_held == blk - block_lo
                held_sums = tl.where(here[None, :, None], page_sum[:, None, :], held_sums)
                held_max = tl.where(here[None, :], m_safe[:, None], held_max)
            else:
                tl.store(sum_ptrs[:, None] + blk * TILE_PAGES + page_ids[None, :],
                         page_sum.to(sum_ptrs.dtype.element_ty), mask=row_ok[:, None])
                tl.store(max_ptrs + blk, m_safe, mask=row_ok)
        elif PAGE_MASS:
            # Per-row mass of each page of this tile, relative to m_safe; rescaled by exp(m_safe - lse)
            # once the row's log-sum-exp is known (_page_mass_kernel). Rows are (g, t): decode/verify only.
            # Summed per page by a tensor-core product with a page one-hot (MASS_SLOTS >= 16 columns, as
            # tl.dot needs): a reshape-and-sum of p costs a layout conversion every tile.
            onehot = (cols[:, None] // PAGE_SIZE) == slot_ids[None, :]
            if UPCAST_DOT:
                sums = tl.dot(p, onehot.to(tl.float32))
            else:
                sums = tl.dot(p.to(k.dtype), onehot.to(k.dtype))
        if PAGE_MASS and not WARP_PAGES:      # the tile's sums and their row max in one store (see MASS_SLOTS)
            packed = tl.where(slot_ids[None, :] == MASS_SLOTS - 1, m_safe[:, None], sums)
            if DEFER_MASS:
                here = tiles_held == blk - block_lo
                page_sums = tl.where(here[None, :, None], packed[:, None, :], page_sums)
            elif TILES_PER_BLOCK > 1:      # a branch around the block's store (see WIDE_BLOCK_MASS_REGISTER_CAP)
                if ((blk + 1) % TILES_PER_BLOCK == 0) | (blk == block_hi - 1):
                    tl.store(mass_rows[:, None] + (blk // TILES_PER_BLOCK) * MASS_SLOTS + slot_ids[None, :], packed,
                             mask=row_ok[:, None] & slot_used[None, :])
                    block_sum = tl.zeros([BLOCK_M], tl.float32)
            else:
                tl.store(mass_rows[:, None] + blk * MASS_SLOTS + slot_ids[None, :], packed,
                         mask=row_ok[:, None] & slot_used[None, :])
        v = tl.load(v_ptr + kv_off[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0)
        if UPCAST_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if PAGE_MASS and DEFER_MASS and WARP_PAGES:
        tile_idx = block_lo + tiles_held
        held_ok = row_ok[:, None] & (tile_idx < block_hi)[None, :]
        tl.store(sum_ptrs[:, None, None] + tile_idx[None, :, None] * TILE_PAGES + page_ids[None, None, :],
                 held_sums.to(sum_ptrs.dtype.element_ty), mask=held_ok[:, :, None])
        tl.store(max_ptrs[:, None] + tile_idx[None, :], held_max, mask=held_ok)
    elif PAGE_MASS and DEFER_MASS:
        tile_idx = block_lo + tiles_held
        keep = (row_ok[:, None] & (tile_idx < block_hi)[None, :])[:, :, None] & slot_used[None, None, :]
        tl.store(mass_rows[:, None, None] + tile_idx[None, :, None] * MASS_SLOTS + slot_ids[None, None, :],
                 page_sums, mask=keep)
    part = ((b * Q_LEN + t) * HEADS + head) * num_splits + split     # [B, T, H, S] flat
    if DIRECT:       # one split holds every key: the row is final here, no partials and no merge launch
        tl.store(out_ptr + part[:, None] * HEAD_DIM + dims[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(lse_ptr + part, m_i + tl.log(l_i), mask=row_ok)
    else:
        tl.store(m_part_ptr + part, m_i, mask=row_ok)
        tl.store(l_part_ptr + part, l_i, mask=row_ok)
        # Written even by an empty split (the merge skips it by its m): any condition on this store, on the split or
        # on the row's sum, took the 1.5B's block-mass verify from 168 registers to 196-200 (offline sm_90), 2
        # programs an SM instead of 3; its b64 x 32K verify step then took 30.3 ms on the H100 (23.6 ms without).
        tl.store(o_part_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(o_part_ptr, m_part_ptr, l_part_ptr, out_ptr, lse_ptr, num_splits,
                         HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    wait_for_predecessor(PDL)
    row = tl.program_id(0)                       # flat (b, t, h)
    splits = tl.arange(0, BLOCK_S)
    ok = splits < num_splits
    m = tl.load(m_part_ptr + row * num_splits + splits, mask=ok, other=float("-inf"))
    l_part = tl.load(l_part_ptr + row * num_splits + splits, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    seen = ok & (m > float("-inf"))              # splits that saw a key of this row: only their o is read
    w = tl.where(seen, tl.exp(m - m_max), 0.0)
    dims = tl.arange(0, HEAD_DIM)
    o = tl.load(o_part_ptr + (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :],
                mask=seen[:, None], other=0.0)
    l_total = tl.sum(l_part * w, 0)
    tl.store(out_ptr + row * HEAD_DIM + dims, (tl.sum(o * w[:, None], 0) / l_total).to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + row, m_max + tl.log(l_total))


@triton.jit
def _page_mass_kernel(mass_part_ptr, lse_ptr, lens_ptr, sel_count_ptr, mass_ptr,
                      mass_pages, mass_tiles, stride_mb, stride_mh, stride_part_layer, stride_lse_layer, stride_ml,
                      Q_LEN: tl.constexpr, GROUP: tl.constexpr, HEADS: tl.constexpr, PAGE_SIZE: tl.constexpr,
                      PAGES_PER_VALUE: tl.constexpr, VALUES_PER_TILE: tl.constexpr, MASS_SLOTS: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, SPARSE: tl.constexpr, MASS_TILE: tl.constexpr,
                      PDL: tl.constexpr, COMPACT: tl.constexpr = False, SUMS_HALF: tl.constexpr = False,
                      BY_BLOCK: tl.constexpr = False):
    """mass[b, kvh, page] = sum over rows (g, t) of sum_{keys in page} softmax weight. All rows of a
    block of pages in one tile: a loop over rows would serialise dependent loads. Each page reads the value
    holding it (its own page sum, or its block's sum spread over the block's pages) and its tile's row max.
    Grid axis 2 is the layer when one launch finishes a whole step's layers (StepMass; strides 0 for one layer).
    BY_BLOCK (block mass of blocks of several pages): a program's elements are blocks instead of pages, each block's
    mass spread over its pages at the store (MASS_FINISH_BY_BLOCK)."""
    wait_for_predecessor(PDL)
    layer = tl.program_id(2).to(tl.int64)
    mass_part_ptr += layer * stride_part_layer
    lse_ptr += layer * stride_lse_layer
    mass_ptr += layer * stride_ml
    pid_bh = tl.program_id(0)
    kv_heads = HEADS // GROUP
    b = pid_bh // kv_heads
    kvh = pid_bh % kv_heads
    unit = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    vpage = unit * PAGES_PER_VALUE if BY_BLOCK else unit          # (first) page of each element
    if SPARSE:
        n_pages = tl.load(sel_count_ptr + pid_bh)
    else:
        n_pages = (tl.load(lens_ptr + b) + PAGE_SIZE - 1) // PAGE_SIZE
    ok = vpage < n_pages                          # pages no split visited hold stale scratch: skip them
    r = tl.arange(0, BLOCK_R)                     # row r = (query head g, new token t)
    row_ok = r < GROUP * Q_LEN
    head = kvh * GROUP + r // Q_LEN
    lse = tl.load(lse_ptr + (b * Q_LEN + r % Q_LEN) * HEADS + head, mask=row_ok, other=0.0)
    rows = mass_part_ptr + (pid_bh * GROUP * Q_LEN + r).to(tl.int64)[:, None] * mass_tiles * MASS_SLOTS
    both = row_ok[:, None] & ok[None, :]
    value = vpage // PAGES_PER_VALUE
    tile_at = (value // VALUES_PER_TILE) * MASS_SLOTS
    if COMPACT:      # a row's page sums in page order, then its tiles' maxima (the split kernel's WARP_PAGES)
        if SUMS_HALF:
            part = tl.load(rows.to(tl.pointer_type(tl.float16), bitcast=True) + value[None, :], mask=both,
                           other=0.0).to(tl.float32)
        else:
            part = tl.load(rows + value[None, :], mask=both, other=0.0)
        m = tl.load(rows + mass_tiles * (MASS_SLOTS - 1) + (value // VALUES_PER_TILE)[None, :], mask=both, other=0.0)
    else:
        part = tl.load(rows + (tile_at + value % VALUES_PER_TILE)[None, :], mask=both, other=0.0)
        m = tl.load(rows + (tile_at + MASS_SLOTS - 1)[None, :], mask=both, other=0.0)
    if MASS_TILE:      # block mass: spread evenly over the block's pages that exist
        in_block = tl.minimum(PAGES_PER_VALUE, n_pages - value * PAGES_PER_VALUE)
        part = part / tl.maximum(in_block, 1).to(tl.float32)[None, :]
    total = tl.sum(tl.where(both, part * tl.exp(m - lse[:, None]), 0.0), 0)
    out = mass_ptr + b * stride_mb + kvh * stride_mh
    if BY_BLOCK:
        for k in tl.static_range(PAGES_PER_VALUE):
            tl.store(out + vpage + k, tl.where(k < in_block, total, 0.0), mask=vpage + k < mass_pages)
    else:
        tl.store(out + vpage, total, mask=vpage < mass_pages)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch: int, kv_heads: int, max_kv_len: int, num_sms: int = 132,
                      launch: LaunchConfig = DEFAULT_LAUNCH) -> int:
    """Enough splits that batch * kv_heads * splits fills the SMs `split_factor` times over, but no more
    splits than KV tiles, and no more than the longest split's tile count needs: a split the kernel's even share
    (ceil(tiles / splits) each) leaves empty or short only adds a program and a partial for the merge (batch 1 of 8
    KV heads at 32K: 32 splits of 8 tiles instead of 33, the last one empty, whose merge loaded 64 partials a row;
    H200 sweeps at 32 splits 43.3-43.4 µs against 44.5-45.2 at 33 for five rows, tune_splits*.json)."""
    max_blocks = max(1, -(-max_kv_len // launch.block_n))
    splits = max(1, min(max_blocks, math.ceil(launch.split_factor * num_sms / (batch * kv_heads)), 256))
    tiles_per_split = -(-max_blocks // splits)
    return -(-max_blocks // tiles_per_split)


def _plan_launch(rows: int, kv_heads: int, dim: int, page_size: int, cap: int, sms: int,
                 launch: LaunchConfig | None, num_splits: int | None, page_mass: bool, mass_tokens: int | None,
                 sparse: bool, query_rows: int = 16,
                 split_rows: int | None = None) -> tuple[LaunchConfig, int, bool, bool, int]:
    """(launch config, splits, per-block mass?, deferred page mass?, tiles a split may hold) for `rows` (batch x
    query blocks) over at most `cap` keys per (sequence, KV head); query_rows: a decode or verify block's rows per
    program (BLOCK_M; prefill: leave at 16). split_rows: the rows that read their whole length when the others are
    idle; the splits are planned to fill the SMs with these (None: all rows)."""
    tuned_sparse = launch is None and num_splits is None and sparse and dim <= 64 and rows * kv_heads >= 32
    if tuned_sparse and SPARSE_SMALL_HEADS_FULL_WAVE and rows * kv_heads >= sms:
        return SPARSE_SMALL_HEADS_FULL_WAVE, 1, False, False, 1
    wide = (launch is None and not sparse and query_rows >= 64 and dim >= 128 and rows * kv_heads >= 32
            and page_size <= WIDE_QUERY_BLOCK_N)      # a tile holds whole pages
    launch = SPARSE_SMALL_HEADS if tuned_sparse else launch or choose_launch(rows * kv_heads, dim, sparse, query_rows)
    if wide:
        launch = dataclasses.replace(launch, block_n=WIDE_QUERY_BLOCK_N)
    # blocks of several pages, or one large page a block (paged_attention sets mass_tokens so for exact mass)
    mass_tile = (page_mass and mass_tokens is not None
                 and (mass_tokens > page_size
                      or mass_tokens == page_size and exact_mass_by_blocks(page_size, dim, launch.block_n)))
    if mass_tile:
        if sparse or mass_tokens % page_size:
            raise ValueError("block page mass needs dense attention and a multiple of the page size")
        # a tile may hold several blocks (sub-tiles), or a block span several tiles (carried in the split kernel)
        if not ((BLOCK_MASS_SUBTILES and launch.block_n % mass_tokens == 0) or mass_tokens % launch.block_n == 0):
            launch = dataclasses.replace(launch, block_n=mass_tokens)
    if num_splits is None:
        num_splits = choose_num_splits(split_rows or rows, kv_heads, cap, sms, launch)
        if tuned_sparse:
            num_splits = 1 << (num_splits.bit_length() - 1)
            num_splits = min(num_splits, SPARSE_SMALL_HEADS_MAX_SPLITS or num_splits)
    # Deferred page mass holds page_mass_tiles(query_rows) tiles per split: past 256 splits (very long contexts) the
    # merge would hold too many partials, so the mass is stored per tile there.
    held = page_mass_tiles(query_rows, page_sums_by_warp(launch, page_size))
    defer = (page_mass and not mass_tile and defer_page_mass(launch) and -(-cap // (launch.block_n * held)) <= 256)
    max_tiles = held if defer else 1
    if defer:      # every split's tiles must fit the registers that hold their mass
        num_splits = max(num_splits, -(-cap // (launch.block_n * max_tiles)))
    return launch, num_splits, mass_tile, defer, max_tiles


def physical_pages(page_table: torch.Tensor, selected_pages: torch.Tensor) -> torch.Tensor:
    """[..., batch, kv_heads, K] logical page lists (-1 padded) -> the same lists as physical pages (padding: 0),
    looked up in page_table [>= batch, pages]."""
    *lead, batch, kv_heads, k = selected_pages.shape
    logical = selected_pages.long().clamp(min=0).movedim(-3, 0).reshape(batch, -1)
    phys = page_table[:batch].long().gather(1, logical)
    return phys.view(batch, *lead, kv_heads, k).movedim(0, -3).to(torch.int32)


def query_tiling(q_len: int, group: int) -> tuple[int, int]:
    """(BLOCK_M, Q_BLOCK): rows per program and new tokens per program. Short blocks (decode, verify)
    take all q_len tokens in one program; long ones (prefill) are tiled so rows stay at 64."""
    if group * q_len <= 64:
        return max(16, triton.next_power_of_2(group * q_len)), q_len
    block_m = max(64, triton.next_power_of_2(group))
    return block_m, block_m // group


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    page_table: torch.Tensor, lens_after: torch.Tensor, scale: float,
                    max_kv_len: int | None = None, num_splits: int | None = None,
                    launch: LaunchConfig | None = None, page_mass: bool = False,
                    selected_pages: torch.Tensor | None = None, selected_counts: torch.Tensor | None = None,
                    token_level: bool = False, mass_tokens: int | None = None, return_lse: bool = False,
                    selected_physical: torch.Tensor | None = None, mass_out: torch.Tensor | None = None,
                    step_mass: StepMass | None = None, layer: int = 0, plan_rows: int | None = None):
    """Same contract as `reference.paged_attention`. q: [batch, q_len, heads, dim], contiguous in dim.

    selected_pages [batch, kv_heads, K] int32 (logical page numbers, -1 padded) and selected_counts
    [batch, kv_heads]: attend only to those pages (sparse). page_mass=True also returns the softmax mass
    each page received, summed over the query heads of a KV head and the new rows: [batch, kv_heads, pages]
    (dense: indexed by logical page; sparse: by position in the selection list). q_len <= 16 for page_mass.
    token_level=True: selected_pages holds ascending token positions instead of pages (no page_mass then).
    return_lse=True (without page_mass): also return each row's log-sum-exp [batch, q_len, heads] fp32.
    selected_physical (page lists only): the same lists as physical pages (`physical_pages`), so the kernel reads
    them beside the logical ones instead of looking each up in the page table after it.
    mass_out (page_mass only): write the mass into its first pages instead of a new tensor (fp32 [batch, kv_heads,
    >= pages], pages contiguous; e.g. one layer of the caller's mass buffer, which saves a copy per layer).
    mass_tokens (dense page_mass only): a multiple of the page size above it measures mass per block of that
    many keys, spread evenly over its pages: nearly free, since the kernel sums each tile's weights anyway.
    step_mass (dense page_mass only): leave this layer's partial sums in step_mass's slot `layer` and return
    (out, None); step_mass.finish then turns every layer's partials into mass with one launch (see StepMass).
    plan_rows (dense only): how many sequences read their whole length while the others read only the new block
    (idle: a fixed batch's finished sequences). The splits are planned for these, so that a few long sequences are
    still spread over the SMs; None: every sequence. Only the launch changes, not the result.
    """
    batch, q_len, heads, dim = q.shape
    kv_heads, page_size = k_pages.shape[2], k_pages.shape[1]
    group = heads // kv_heads
    sparse = selected_pages is not None
    if page_mass and not sparse and mass_tokens is None:
        mass_tokens = page_size      # exact page mass: block path or page by page, as exact_mass_by_blocks says
    block_m, q_block = query_tiling(q_len, group)
    q_blocks = -(-q_len // q_block)
    if page_mass and (q_blocks != 1 or token_level):
        raise ValueError("page_mass is computed for decode/verify blocks over pages, not prefill or token lists")
    if step_mass is not None and (not page_mass or sparse):
        raise ValueError("step_mass collects the page mass of dense attention (page_mass=True, no page lists)")
    if selected_physical is not None and (not sparse or token_level
                                          or selected_physical.shape != selected_pages.shape):
        raise ValueError("selected_physical must be the physical pages of a page-level selected_pages list")
    if sparse:
        cap = selected_pages.shape[2] * (1 if token_level else page_size)
    else:
        cap = max_kv_len or page_table.shape[1] * page_size
    sms = _num_sms(q.device.index or 0) if q.is_cuda else 132
    split_rows = None if plan_rows is None or sparse else max(1, min(plan_rows, batch)) * q_blocks
    launch, num_splits, mass_tile, defer, max_tiles = _plan_launch(
        batch * q_blocks, kv_heads, dim, page_size, cap, sms, launch, num_splits, page_mass, mass_tokens, sparse,
        block_m if q_blocks == 1 else 16, split_rows)
    q = q.contiguous()
    dev = q.device
    out = torch.empty_like(q)
    mass_pages = selected_pages.shape[2] if sparse else page_table.shape[1]
    mass_sub = max(1, launch.block_n // mass_tokens) if mass_tile else 1      # blocks of mass per tile of keys
    tiles_per_block = max(1, mass_tokens // launch.block_n) if mass_tile else 1     # a block over several tiles
    mass_tiles = -(-mass_pages * page_size // (launch.block_n * tiles_per_block))    # values stored per row
    values_per_tile = mass_sub if mass_tile else launch.block_n // page_size      # block sums or page sums
    by_warp = page_mass and not mass_tile and page_sums_by_warp(launch, page_size)
    half = (by_warp and PAGE_SUMS_HALF and q.dtype in (torch.bfloat16, torch.float16)
            and values_per_tile % 2 == 0)
    # Page sums by warp: fp32 words a tile are its page sums (two to a word in fp16), then its row max; both kernels
    # find a row's maxima after mass_tiles x (slots - 1) words.
    if by_warp:
        slots = (values_per_tile // 2 if half else values_per_tile) + 1
    else:
        slots = mass_slots(values_per_tile, one_hot=not mass_tile)
    pages_per_value = launch.block_n * tiles_per_block // page_size // values_per_tile
    mass_shape = _MassFinish(batch, kv_heads, group, q_len, page_size, mass_pages, mass_tiles, slots,
                             pages_per_value, values_per_tile, mass_tile, by_warp, half)
    if step_mass is not None:      # this layer's slot of the step's buffers; the merge writes the lse there too
        mass_part, lse = step_mass.layer_buffers(layer, mass_shape, dev)
        mass_part, lse = mass_part.view(mass_shape.rows, -1), lse.view(batch, q_len, heads)
    else:
        lse = torch.empty(batch, q_len, heads, dtype=torch.float32, device=dev)
        mass_part = (torch.empty(mass_shape.rows, mass_tiles * slots, dtype=torch.float32, device=dev) if page_mass
                     else lse)             # unused without page mass; any tensor will do as a placeholder pointer
    direct = num_splits == 1 and DIRECT_ONE_SPLIT
    if direct:                                 # the split kernel writes out and lse itself
        o_part = m_part = l_part = lse         # unused placeholders
    else:
        o_part = torch.empty(batch, q_len, heads, num_splits, dim, dtype=torch.float32, device=dev)
        m_part = torch.empty(batch, q_len, heads, num_splits, dtype=torch.float32, device=dev)
        l_part = torch.empty_like(m_part)
    if sparse:
        sel = selected_pages.to(torch.int32).contiguous()
        counts = selected_counts.to(torch.int32).contiguous()
    else:
        sel = counts = lens_after
    phys = selected_physical.to(torch.int32).contiguous() if selected_physical is not None else sel
    capped = WIDE_BLOCK_MASS_REGISTER_CAP if tiles_per_block > 1 else None
    capped_options = {"maxnreg": capped} if capped is not None and not INTERPRETED else {}
    _paged_attn_split_kernel[(batch * kv_heads, num_splits, q_blocks)](
        q, k_pages, v_pages, page_table, lens_after, sel, counts, phys,
        o_part, m_part, l_part, mass_part, out, lse, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        page_table.stride(0), sel.shape[-1] if sparse else 0, mass_tiles, num_splits,
        Q_LEN=q_len, Q_BLOCK=q_block, GROUP=group, HEADS=heads, PAGE_SIZE=page_size, HEAD_DIM=dim,
        BLOCK_M=block_m, BLOCK_N=launch.block_n, UPCAST_DOT=INTERPRETED, SPARSE=sparse,
        TOKEN_LIST=sparse and token_level, PAGE_MASS=page_mass, MASS_TILE=mass_tile,
        MAX_TILES=max_tiles, MASS_SLOTS=slots,
        DEFER_MASS=defer, DIRECT=direct, PHYS_LIST=selected_physical is not None,
        MASS_SUB=mass_sub, EARLY=EARLY_PAGES, TILES_PER_BLOCK=tiles_per_block,
        WARP_PAGES=launch.num_warps if by_warp else 0, TILE_PAGES=max(1, launch.block_n // page_size),
        SUMS_HALF=half,
        num_warps=launch.num_warps, num_stages=launch.num_stages, **launch_options(dev), **capped_options,
    )
    if not direct:
        block_s = max(2, triton.next_power_of_2(num_splits))
        _merge_splits_kernel[(batch * q_len * heads,)](
            o_part, m_part, l_part, out, lse, num_splits,
            HEAD_DIM=dim, BLOCK_S=block_s, num_warps=MERGE_WARPS or merge_warps(block_s, dim), **launch_options(dev),
        )
    if return_lse:                                # each row's log-sum-exp [batch, q_len, heads]: Vegas scores
        return out, lse
    if not page_mass:
        return out
    if step_mass is not None:
        return out, None
    return out, _finish_page_mass(mass_part, lse, lens_after, counts, mass_shape, sparse, mass_out)


def mass_slots(values_per_tile: int, one_hot: bool) -> int:
    """Values the split kernel stores per (row, tile) of keys: the tile's block sums (block mass) or page sums,
    then the row max they are relative to, in one store, rounded up to a power of two (at least 16 with one_hot:
    page sums come from a tensor-core product with a page one-hot of that many columns). With two separate stores
    (the sums, the max) block mass at batch 8 with 8B heads took 198 registers against 128 plain, 156 with one
    store (offline ptxas counts: results/kernel_registers_two_stores.json, kernel_registers.json): 2 programs per
    SM instead of 3."""
    slots = triton.next_power_of_2(values_per_tile + 1)
    return max(16, slots) if one_hot else slots


def _finish_page_mass(mass_part, lse, lens_after, counts, sh: _MassFinish, sparse: bool,
                      mass_out: torch.Tensor | None = None) -> torch.Tensor:
    """The split kernel's partial page (or block) sums, rescaled with each row's log-sum-exp and summed over the
    rows of a KV head: [batch, kv_heads, pages] (a view of mass_out if given). mass_part: [rows, tiles x slots]
    (see mass_slots); sh.pages_per_value: 1 for page mass, the block's pages for block mass."""
    if mass_out is None:
        mass = torch.empty(sh.batch, sh.kv_heads, sh.mass_pages, dtype=torch.float32, device=lse.device)
    else:
        mass = _mass_pages_of(mass_out, (sh.batch, sh.kv_heads), sh.mass_pages, "mass_out")
    _launch_page_mass(mass_part, lse, lens_after, counts, mass, sh, sparse)
    return mass


def _mass_pages_of(buffer: torch.Tensor, lead: tuple[int, ...], pages: int, name: str) -> torch.Tensor:
    """buffer[..., :pages], checked to be an fp32 [*lead, >= pages] buffer with contiguous pages."""
    if (buffer.dtype != torch.float32 or tuple(buffer.shape[:-1]) != lead or buffer.shape[-1] < pages
            or buffer.stride(-1) != 1):
        shape = ", ".join(str(n) for n in lead)
        raise ValueError(f"{name} must be fp32 [{shape}, >= {pages}] with contiguous pages")
    return buffer[..., :pages]


def _launch_page_mass(mass_part, lse, lens_after, counts, mass, sh: _MassFinish, sparse: bool, layers: int = 1,
                      layer_strides: tuple[int, int, int] = (0, 0, 0)) -> None:
    """One finishing launch for `layers` layers whose partials, log-sum-exps and mass lie layer_strides apart."""
    block_r = triton.next_power_of_2(sh.group * sh.q_len)
    block_p = max(16, MASS_FINISH_TILE // block_r)   # a tile of MASS_FINISH_TILE (row, page or block) elements
    by_block = MASS_FINISH_BY_BLOCK and sh.mass_tile and sh.pages_per_value > 1
    units = triton.cdiv(sh.mass_pages, sh.pages_per_value) if by_block else sh.mass_pages
    _page_mass_kernel[(sh.batch * sh.kv_heads, triton.cdiv(units, block_p), layers)](
        mass_part, lse, lens_after, counts, mass, sh.mass_pages, sh.mass_tiles, mass.stride(-3), mass.stride(-2),
        *layer_strides, Q_LEN=sh.q_len, GROUP=sh.group, HEADS=sh.kv_heads * sh.group, PAGE_SIZE=sh.page_size,
        PAGES_PER_VALUE=sh.pages_per_value, VALUES_PER_TILE=sh.values_per_tile, MASS_SLOTS=sh.slots,
        BLOCK_P=block_p, BLOCK_R=block_r, SPARSE=sparse, MASS_TILE=sh.mass_tile, COMPACT=sh.compact,
        SUMS_HALF=sh.half, BY_BLOCK=by_block,
        num_warps=MASS_FINISH_WARPS,
        **launch_options(lse.device),
    )


class _MassFinish(NamedTuple):
    """What the finishing launch needs to know about one layer's partials: the same for every layer of a step."""
    batch: int
    kv_heads: int
    group: int
    q_len: int
    page_size: int
    mass_pages: int
    mass_tiles: int
    slots: int
    pages_per_value: int
    values_per_tile: int
    mass_tile: bool
    compact: bool = False      # a row's page sums, then its tiles' maxima (page sums by warp)
    half: bool = False         # ... the page sums in fp16

    @property
    def rows(self) -> int:       # (sequence, KV head, query head of the group, new token)
        return self.batch * self.kv_heads * self.group * self.q_len


# A verify step finishes its page mass once for all layers (StepMass) instead of once a layer. H100, one layer's
# attention with block mass, 5 rows (verify_cost_*_kernels.json, f6b1183): the split kernel itself costs 0.6% more
# than plain at b1 x 32K (8B heads; 2.5% at b8 x 8K, 4.6% at the default model's b64 x 8K) while the per-layer
# finishing launch took 4.8 / 8.0 / 9.4 us of the +11.5% / +11.1% / +10.6%: the by-product's cost was mostly
# that launch. Once a step (kernels.json, H100, 8631c59, 32 layers, 5 rows): block mass +7.2% / +8.5% at b1 x 32K /
# b8 x 8K against +10.6% / +10.3% one layer alone; whole verify steps (H200, random weights) 1.4-3.1% faster.
# False: one finishing launch a layer (A/B timing).
FINISH_MASS_PER_STEP = True


class StepMass:
    """The page mass of every layer of one step, finished by one launch after the last layer.

    Each layer's split kernel leaves its partial sums (relative to its tiles' row max) in this layer's slot and its
    merge the rows' log-sum-exps beside them; `finish` rescales and sums them into [layers, batch, kv_heads, pages]
    in one launch. The partials are the same bytes the per-layer finishing reads, so this saves launches (and the
    launch gaps between a layer's attention and its output projection), not bandwidth."""

    def __init__(self, layers: int):
        self.layers = layers
        self.part = self.lse = self.shape = None
        self.filled: set[int] = set()

    def layer_buffers(self, layer: int, shape: _MassFinish,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (partial sums, log-sum-exps), flat; the step's buffers are made by its first layer."""
        if not 0 <= layer < self.layers:
            raise ValueError(f"layer {layer} is outside this step's {self.layers} layers")
        if self.part is None:
            self.shape = shape
            self.part = torch.empty(self.layers, shape.rows * shape.mass_tiles * shape.slots, dtype=torch.float32,
                                    device=device)
            self.lse = torch.empty(self.layers, shape.rows, dtype=torch.float32, device=device)
        elif shape != self.shape:
            raise ValueError("every layer of a step must have the same attention shape to share one mass launch")
        self.filled.add(layer)
        return self.part[layer], self.lse[layer]

    def finish(self, mass: torch.Tensor, lens_after: torch.Tensor) -> torch.Tensor:
        """mass: fp32 [layers, batch, kv_heads, >= pages] with contiguous pages (e.g. a verify step's page-mass
        buffer); fills [..., :pages] of every layer and returns that view."""
        if len(self.filled) != self.layers:
            missing = sorted(set(range(self.layers)) - self.filled)
            raise RuntimeError(f"page mass of layers {missing[:8]} was never computed this step")
        sh = self.shape
        pages = _mass_pages_of(mass, (self.layers, sh.batch, sh.kv_heads), sh.mass_pages, "mass")
        _launch_page_mass(self.part, self.lse, lens_after, lens_after, mass, sh, False, self.layers,
                          (self.part.stride(0), self.lse.stride(0), mass.stride(0)))
        self.filled.clear()
        return pages
