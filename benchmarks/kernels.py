"""GPU benchmark of the kernels issue: verify attention (+ page-mass by-product), sparse page attention,
sorting-free top-p vs sort, Quest page scores. Device time from CUDA graphs; buffers rotated past L2. Kernels are
launched without programmatic dependent launch (pdl.MODE 0), as in every kernels.json before it existed: back-to-back
calls of one kernel would otherwise overlap their launches, which a per-kernel figure should not count.
Writes benchmarks/results/kernels.json (or argv[1])."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, copy_bandwidth_gbs, environment, graph_ms  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import paged_attention, pdl, quest, reference, topp  # noqa: E402

L2_BEATING_BYTES = 200 << 20
KV_HEADS, GROUP, DIM, PAGE = 8, 4, 128, 16          # Llama-3-8B attention shape


def kv_pools(batch: int, ctx: int, kv_heads: int = KV_HEADS, dim: int = DIM, page: int = PAGE):
    pages = -(-ctx // page)
    kv_bytes = 2 * batch * ctx * kv_heads * dim * 2
    pools = [(torch.randn(batch * pages, page, kv_heads, dim, device="cuda", dtype=torch.bfloat16),
              torch.randn(batch * pages, page, kv_heads, dim, device="cuda", dtype=torch.bfloat16))
             for _ in range(-(-L2_BEATING_BYTES // kv_bytes))]
    table = torch.randperm(batch * pages, device="cuda").view(batch, pages).int()
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    return pools, table, lens, kv_bytes


def time_attention(q, pools, table, lens, **kw) -> float:
    scale = DIM ** -0.5
    return graph_ms(lambda: [paged_attention.paged_attention(q, k, v, table, lens, scale, **kw)
                             for k, v in pools]) / len(pools)


STEP_LAYERS = 32      # the 8B shape's layers: a verify step finishes its page mass once for all of them


def time_attention_step(q, pools, table, lens, layers: int = STEP_LAYERS, **kw) -> float:
    """ms per layer of one step's attention over `layers` layers (K/V rotated over the pools), as the model runs
    it: with page_mass, every layer leaves its partials and one launch after the last finishes them all
    (paged_attention.StepMass)."""
    scale = DIM ** -0.5
    mass = (torch.empty(layers, q.shape[0], KV_HEADS, table.shape[1], device="cuda")
            if kw.get("page_mass") else None)

    def step():
        step_mass = paged_attention.StepMass(layers) if mass is not None else None
        for i in range(layers):
            k, v = pools[i % len(pools)]
            paged_attention.paged_attention(q, k, v, table, lens, scale, step_mass=step_mass, layer=i, **kw)
        if step_mass is not None:
            step_mass.finish(mass, lens)
    return graph_ms(step, calls=3) / layers


def copy_fraction_at(nbytes: int, copy: float) -> float:
    """The fraction of the copy bandwidth that a device-to-device copy of nbytes of traffic (half read, half
    written) reaches when timed like the kernels here (20 calls in a CUDA graph, buffers rotated past L2): the floor
    that launch and ramp set for a kernel moving that many bytes."""
    count = -(-L2_BEATING_BYTES // nbytes)
    pairs = [(torch.empty(nbytes // 4, dtype=torch.bfloat16, device="cuda"),
              torch.empty(nbytes // 4, dtype=torch.bfloat16, device="cuda")) for _ in range(count)]
    ms = graph_ms(lambda: [dst.copy_(src) for src, dst in pairs]) / count
    return nbytes / ms / 1e6 / copy


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Sum one CHUNK of x a program: every byte read once, 4 bytes written a program."""
    base = tl.program_id(0).to(tl.int64) * CHUNK
    acc = tl.zeros([BLOCK], tl.float32)
    for off in range(0, CHUNK, BLOCK):
        idx = base + off + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


READ_CHUNKS = (4096, 8192, 16384, 32768)     # bf16 elements a program: 8-64 KB
READ_WARPS = (4, 8)


def read_fraction_at(nbytes: int, copy: float) -> tuple[float, dict]:
    """The fraction of the copy bandwidth that a plain read of nbytes reaches (a reduction that writes 4 bytes a
    program), timed like the kernels here, best over a few chunk sizes and warp counts: the floor for a kernel
    that only reads nbytes, as copy_fraction_at is for one that also writes them."""
    n = nbytes // 2
    count = -(-L2_BEATING_BYTES // nbytes)
    bufs = [torch.randn(n, dtype=torch.bfloat16, device="cuda") for _ in range(count)]
    best_ms, best_cfg = float("inf"), {}
    for chunk in READ_CHUNKS:
        for warps in READ_WARPS:
            grid = (-(-n // chunk),)
            out = torch.empty(grid[0], device="cuda")
            ms = graph_ms(lambda: [_read_kernel[grid](x, out, n, CHUNK=chunk, BLOCK=1024, num_warps=warps)
                                   for x in bufs]) / count
            if ms < best_ms:
                best_ms, best_cfg = ms, {"chunk_elements": chunk, "num_warps": warps, "programs": grid[0]}
    return nbytes / best_ms / 1e6 / copy, best_cfg


def selection(batch: int, pages: int, frac: float, kv_heads: int = KV_HEADS):
    """Per (sequence, KV head): a random sorted `frac` of the pages, always with the last one."""
    keep = max(1, int(frac * pages))
    sel = torch.stack([torch.stack([torch.cat([torch.randperm(pages - 1)[:keep - 1].sort().values,
                                               torch.tensor([pages - 1])]) for _ in range(kv_heads)])
                       for _ in range(batch)]).int().cuda()
    return sel, torch.full((batch, kv_heads), keep, dtype=torch.int32, device="cuda")


def errors_against_reference(q, k, v, table, lens) -> tuple[float, float]:
    """Dense attention with page mass against the fp32 reference: (output's relative error, the mass's largest
    error relative to its largest value)."""
    ref_out, ref_mass = reference.paged_attention(q.float(), k.float(), v.float(), table, lens, DIM ** -0.5,
                                                  page_mass=True)
    out, mass = paged_attention.paged_attention(q, k, v, table, lens, DIM ** -0.5, page_mass=True)
    return (((out.float() - ref_out).norm() / ref_out.norm()).item(),
            ((mass - ref_mass).abs().max() / ref_mass.abs().max()).item())


def attention_rows(copy: float) -> tuple[list[dict], dict]:
    rows, summary = [], {}
    for batch, ctx in [(1, 32768), (8, 32768), (8, 8192), (1, 8192)]:
        pools, table, lens, kv_bytes = kv_pools(batch, ctx)
        for q_len in (1, 5):
            q = torch.randn(batch, q_len, KV_HEADS * GROUP, DIM, device="cuda", dtype=torch.bfloat16)
            k, v = pools[0]
            err, mass_err = errors_against_reference(q, k, v, table, lens)
            plain = time_attention(q, pools, table, lens)
            with_mass = time_attention(q, pools, table, lens, page_mass=True)
            with_block_mass = time_attention(q, pools, table, lens, page_mass=True, mass_tokens=64)
            # the same three in a step of STEP_LAYERS layers, the mass finished once after the last (as the model)
            step = {name: time_attention_step(q, pools, table, lens, **kw) for name, kw in
                    (("plain", {}), ("page", {"page_mass": True}), ("block64", {"page_mass": True, "mass_tokens": 64}))}
            row = {"kernel": "verify_attention", "batch": batch, "context": ctx, "q_len": q_len,
                   "us": plain * 1e3, "us_with_page_mass": with_mass * 1e3, "rel_err": err, "mass_rel_err": mass_err,
                   "bandwidth_fraction": kv_bytes / plain / 1e6 / copy, "page_mass_overhead": with_mass / plain - 1,
                   "us_with_block64_mass": with_block_mass * 1e3, "block64_mass_overhead": with_block_mass / plain - 1,
                   "step_layers": STEP_LAYERS, "step_us_per_layer": {n: ms * 1e3 for n, ms in step.items()},
                   "step_page_mass_overhead": step["page"] / step["plain"] - 1,
                   "step_block64_mass_overhead": step["block64"] / step["plain"] - 1}
            rows.append(row)
            print(row, flush=True)
            if (batch, ctx, q_len) == (1, 32768, 5):
                summary["verify_attn_bandwidth_fraction"] = row["bandwidth_fraction"]
                # as the model runs it: one finishing launch per step of STEP_LAYERS layers
                summary["score_byproduct_overhead"] = row["step_page_mass_overhead"]
                summary["score_byproduct_overhead_block64"] = row["step_block64_mass_overhead"]
                # one layer alone with its own finishing launch (every kernels.json before 2026-12-06)
                summary["score_byproduct_overhead_one_layer"] = row["page_mass_overhead"]
                summary["score_byproduct_overhead_block64_one_layer"] = row["block64_mass_overhead"]
            sel, counts = selection(batch, -(-ctx // PAGE), 0.10)
            ref_sparse = reference.paged_attention(q.float(), k.float(), v.float(), table, lens, DIM ** -0.5,
                                                   selected_pages=sel, selected_counts=counts)
            got = paged_attention.paged_attention(q, k, v, table, lens, DIM ** -0.5, selected_pages=sel,
                                                  selected_counts=counts)
            sparse = time_attention(q, pools, table, lens, selected_pages=sel, selected_counts=counts)
            # A/B: the same lists also as physical pages (no page-table lookup between list and K)
            phys = paged_attention.physical_pages(table, sel)
            sparse_phys = time_attention(q, pools, table, lens, selected_pages=sel, selected_counts=counts,
                                         selected_physical=phys)
            # A/B at batch 1 (few programs): SPARSE_FEW_PROGRAMS's tiles with 1, 2 and 3 pipeline stages (3: the
            # dense launch, FEW_PROGRAMS, which sparse lists used before 9b180b0)
            by_stages = {st: 1e3 * time_attention(q, pools, table, lens, selected_pages=sel, selected_counts=counts,
                                                  launch=dataclasses.replace(paged_attention.SPARSE_FEW_PROGRAMS,
                                                                             num_stages=st))
                         for st in (1, 2, 3)} if batch == 1 else None
            sel_bytes = kv_bytes * counts.sum().item() / (batch * KV_HEADS * -(-ctx // PAGE))
            row = {"kernel": "sparse_attention_10pct", "batch": batch, "context": ctx, "q_len": q_len,
                   "us": sparse * 1e3, "us_physical_lists": sparse_phys * 1e3,
                   "us_by_stages": by_stages,
                   "dense_us": plain * 1e3, "speedup_vs_dense": plain / sparse,
                   "rel_err": ((got.float() - ref_sparse).norm() / ref_sparse.norm()).item(),
                   "bandwidth_fraction_on_selected": sel_bytes / sparse / 1e6 / copy,
                   "copy_of_selected_bytes_fraction": copy_fraction_at(int(sel_bytes), copy)}
            if q_len == 1:       # the bytes are the same for five rows
                row["read_of_selected_bytes_fraction"], row["read_launch"] = read_fraction_at(int(sel_bytes), copy)
            rows.append(row)
            print(row, flush=True)
            if (batch, ctx, q_len) == (8, 32768, 1):      # 107 MB selected: past launch and ramp-up
                summary["sparse_attn_bandwidth_fraction_b8_32k"] = row["bandwidth_fraction_on_selected"]
                summary["sparse_attn_bandwidth_fraction_b8_32k_physical_lists"] = (
                    row["bandwidth_fraction_on_selected"] * row["us"] / row["us_physical_lists"])
                summary["copy_of_sparse_bytes_fraction_b8_32k"] = row["copy_of_selected_bytes_fraction"]
                summary["read_of_sparse_bytes_fraction_b8_32k"] = row["read_of_selected_bytes_fraction"]
            if (batch, ctx, q_len) == (1, 32768, 1):
                summary["sparse_attn_speedup_10pct_32k"] = row["speedup_vs_dense"]
                summary["sparse_attn_bandwidth_fraction"] = row["bandwidth_fraction_on_selected"]
                summary["copy_of_sparse_bytes_fraction"] = row["copy_of_selected_bytes_fraction"]
                summary["read_of_sparse_bytes_fraction"] = row["read_of_selected_bytes_fraction"]
        del pools
        torch.cuda.empty_cache()
        rows += large_page_rows(batch, ctx, summary)
    return rows, summary


LARGE_PAGE = 64


def large_page_rows(batch: int, ctx: int, summary: dict) -> list[dict]:
    """Exact page mass when the cache's pages hold LARGE_PAGE tokens: the block-mass path, each block one page
    (paged_attention.BLOCK_PATH_MIN_PAGE), in a step of STEP_LAYERS layers against plain attention over the same
    pools."""
    pools, table, lens, _ = kv_pools(batch, ctx, page=LARGE_PAGE)
    rows = []
    for q_len in (1, 5):
        q = torch.randn(batch, q_len, KV_HEADS * GROUP, DIM, device="cuda", dtype=torch.bfloat16)
        _, mass_err = errors_against_reference(q, *pools[0], table, lens)
        plain = time_attention_step(q, pools, table, lens)
        with_mass = time_attention_step(q, pools, table, lens, page_mass=True)
        row = {"kernel": f"verify_attention_page{LARGE_PAGE}", "batch": batch, "context": ctx, "q_len": q_len,
               "page_size": LARGE_PAGE, "step_layers": STEP_LAYERS, "us": plain * 1e3,
               "step_us_per_layer_with_page_mass": with_mass * 1e3,
               "mass_rel_err": mass_err,
               "step_page_mass_overhead": with_mass / plain - 1}
        rows.append(row)
        print(row, flush=True)
        if (batch, ctx, q_len) == (1, 32768, 5):
            summary[f"score_byproduct_overhead_page{LARGE_PAGE}"] = row["step_page_mass_overhead"]
    del pools
    torch.cuda.empty_cache()
    return rows


def topp_rows() -> tuple[list[dict], dict]:
    """The top-p kernel's searches (topp.SEARCHES) against sort + cumsum, same rows, same run."""
    rows, summary = [], {}
    for n in (8192, 32768, 131072):
        w = torch.softmax(torch.randn(32, n, device="cuda") * 3, dim=-1)
        sort = graph_ms(lambda: reference.topp_threshold(w, 0.95))
        ref_keep = w >= reference.topp_threshold(w, 0.95)[:, None]
        for search in topp.SEARCHES:
            try:
                ours = graph_ms(lambda s=search: topp.topp_threshold(w, 0.95, s))
            except Exception as err:  # a search that fails to build must not cost the other rows their numbers
                rows.append({"kernel": "topp_threshold", "search": search, "n": n, "error": repr(err)[:300]})
                print(rows[-1], flush=True)
                continue
            keep = w >= topp.topp_threshold(w, 0.95, search)[:, None]
            row = {"kernel": "topp_threshold", "search": search, "rows": 32, "n": n, "us": ours * 1e3,
                   "sort_us": sort * 1e3, "speedup_vs_sort": sort / ours,
                   "max_set_size_diff": (keep.sum(-1) - ref_keep.sum(-1)).abs().max().item(),
                   "min_mass": (w * keep).sum(-1).min().item()}
            rows.append(row)
            print(row, flush=True)
            if n == 32768:
                key = "topp_speedup_vs_sort_32k" + ("" if search == topp.SEARCH else f"_{search}")
                summary[key] = row["speedup_vs_sort"]
    return rows, summary


def quest_row() -> dict:
    batch, ctx = 1, 32768
    pages = ctx // PAGE
    kmin = torch.randn(pages, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    kmax = kmin + torch.rand_like(kmin)
    table = torch.randperm(pages, device="cuda").view(1, pages).int()
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, KV_HEADS * GROUP, DIM, device="cuda", dtype=torch.bfloat16)
    got = quest.quest_page_scores(q, kmin, kmax, table, lens)
    want = reference.quest_page_scores(q, kmin, kmax, table, lens)
    us = graph_ms(lambda: quest.quest_page_scores(q, kmin, kmax, table, lens)) * 1e3
    row = {"kernel": "quest_page_scores", "batch": batch, "context": ctx, "us": us,
           "max_abs_err": (got - want).abs().max().item()}
    print(row, flush=True)
    return row


def quest_top_pages_rows() -> list[dict]:
    """Quest's top-k pages from its scores: the sorting-free kernel against topk + sort (selection.top_pages), batch
    1 and 16 at 32K with 8 KV heads, a 10% budget, sinks and a window forced."""
    from specattn.selection import top_pages
    rows = []
    for batch in (1, 16):
        pages = 32768 // PAGE
        score = torch.randn(batch, KV_HEADS, pages, device="cuda")
        page = torch.arange(pages, device="cuda")
        forced = ((page < 1) | (page >= pages - 5))[None].expand(batch, -1).contiguous()
        valid = torch.ones(batch, pages, dtype=torch.bool, device="cuda")
        k = pages // 10
        ours = quest.select_top_pages(score, forced, valid, k)
        ref = top_pages(score, forced, valid, k)
        us = graph_ms(lambda: quest.select_top_pages(score, forced, valid, k)) * 1e3
        sort_us = graph_ms(lambda: top_pages(score, forced, valid, k)) * 1e3
        row = {"kernel": "quest_top_pages", "batch": batch, "context": 32768, "k": k, "us": us, "sort_us": sort_us,
               "speedup_vs_sort": sort_us / us,
               "same_lists": bool(torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1]))}
        print(row, flush=True)
        rows.append(row)
    return rows


def large_page_only(path: str) -> None:
    """--page64: only the exact-mass rows of 64-token pages (large_page_rows), at batch 1 and 8 x 32K."""
    summary = {}
    rows = large_page_rows(1, 32768, summary) + large_page_rows(8, 32768, summary)
    write_json_atomic(path, {**environment(), "config": {"kv_heads": KV_HEADS, "group": GROUP, "head_dim": DIM,
                                                         "page_size": LARGE_PAGE, "pdl": 0},
                             "rows": rows, "summary": summary})
    print("summary", summary)


def main() -> None:
    torch.manual_seed(0)
    pdl.MODE = 0
    if "--page64" in sys.argv:
        return large_page_only(next((a for a in sys.argv[1:] if not a.startswith("--")),
                                    str(RESULTS / "kernels_page64.json")))
    copy = copy_bandwidth_gbs()
    out = {**environment(), "copy_bandwidth_gbs": copy, "config": {"kv_heads": KV_HEADS, "group": GROUP,
                                                                    "head_dim": DIM, "page_size": PAGE, "pdl": 0}}
    attn, s1 = attention_rows(copy)
    tp, s2 = topp_rows()
    out["rows"] = attn + tp + [quest_row()] + quest_top_pages_rows()
    out["summary"] = {**s1, **s2}
    write_json_atomic(sys.argv[1] if len(sys.argv) > 1 else RESULTS / "kernels.json", out)
    print("\nkernel                  batch context q  us       vs")
    for r in out["rows"]:
        if "error" in r:
            print(f"{r['kernel']:24s} {r['search']} failed: {r['error'][:60]}")
            continue
        extra = r.get("bandwidth_fraction", r.get("speedup_vs_sort", r.get("speedup_vs_dense", "")))
        print(f"{r['kernel']:24s} {r.get('batch', r.get('rows'))!s:>4} {r.get('context', r.get('n'))!s:>7} "
              f"{r.get('q_len', '')!s:>2} {r['us']:8.1f} {extra}")
    print("summary", out["summary"])


if __name__ == "__main__":
    main()
