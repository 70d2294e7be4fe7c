"""`specattn bench`: methods x contexts x batches on one model, every lossless method checked against AR.

Each cell prefills the same prompts (windows of a text) for every method, runs a short warm-up (compiles and
captures the CUDA graphs), then the measured run. Memory is planned before a cell starts: a cell whose KV cache
would not fit is skipped with a reason instead of failing halfway.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from ..api import DRAFT_METHODS, METHODS, SpeculationParams, make_policy, method_variant
from ..cache import PagedKVCache
from ..decoding.ar import GenerationParams, generate_ar
from ..decoding.sampling import SamplingParams
from ..decoding.self_speculative import cache_tokens_needed, generate_self_speculative
from ..errors import InvalidInputError
from ..model import Transformer

MEMORY_HEADROOM = 0.8        # use at most this share of free memory for KV caches


def parse_sizes(text: str, what: str) -> list[int]:
    """'1k,4k,8000' -> [1024, 4096, 8000]."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            value = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
        except ValueError:
            raise InvalidInputError(f"cannot read {what} {part!r}; give numbers like 512,4k,8k") from None
        if value <= 0:
            raise InvalidInputError(f"{what} must be > 0, got {part!r}")
        out.append(value)
    return out


def parse_methods(text: str) -> list[str]:
    """Method names, AR first; SpecAttn-Y may carry variant suffixes (api.method_variant: specattn-y/blk64)."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if method_variant(m)[0] not in METHODS and m not in DRAFT_METHODS and m != "auto"]
    if unknown:
        raise InvalidInputError(f"unknown method(s) {', '.join(unknown)}; choose from "
                                f"{', '.join((*METHODS, *DRAFT_METHODS, 'auto'))} (specattn-y also as "
                                "specattn-y/blk64, /r2)")
    return ["ar"] + [m for m in methods if m != "ar"]          # AR first: the reference of every cell


@dataclass
class BenchConfig:
    methods: list[str]
    contexts: list[int]
    batches: list[int]
    spec: SpeculationParams
    new_tokens: int = 64
    sampling: SamplingParams = SamplingParams()
    draft: Transformer | None = None     # draft-spec / specattn-s
    sparse: object | None = None         # specattn-s: a SparseVerification
    repeats: int = 1                     # timed runs per method and cell; the median (by decode tokens/s) is kept


def free_memory_bytes(device: torch.device, tp=None) -> int:
    """Free memory on this device; under tensor parallelism the smallest over the ranks, so that every rank
    skips the same cells (a rank that ran a cell alone would wait forever in its all-reduces)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import os
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if tp is not None:
        import torch.distributed as dist
        least = torch.tensor([free], dtype=torch.int64, device=device)
        dist.all_reduce(least, op=dist.ReduceOp.MIN, group=tp.group)
        free = int(least.item())
    return free


def cell_cache_bytes(model: Transformer, batch: int, context: int, cfg: BenchConfig, dtype: torch.dtype) -> int:
    """KV bytes a cell needs: one cache at a time, sized for the longest run (speculation needs 2 gamma + 1 more)."""
    per_token = model.cfg.kv_bytes_per_token * torch.finfo(dtype).bits // 8
    return batch * cache_tokens_needed(context, cfg.new_tokens, cfg.spec.gamma) * per_token


def skip_reason(model: Transformer, batch: int, context: int, cfg: BenchConfig, device: torch.device,
                dtype: torch.dtype) -> str | None:
    need_positions = context + cfg.new_tokens + 2 * cfg.spec.gamma + 1
    if need_positions > model.cfg.max_positions:
        return (f"context {context} + {cfg.new_tokens} new tokens exceeds the model's "
                f"{model.cfg.max_positions} positions")
    need = cell_cache_bytes(model, batch, context, cfg, dtype)
    free = free_memory_bytes(device, model.tp)
    if need > MEMORY_HEADROOM * free:
        return f"KV cache of {need / 2**30:.1f} GiB does not fit in {free / 2**30:.1f} GiB free"
    if cfg.spec.budget >= 1 and cfg.spec.budget >= context:
        return f"budget {cfg.spec.budget:g} tokens is not below the {context}-token context"
    return None


def timed(device: torch.device, fn):
    """(fn(), wall seconds), with the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    res = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return res, time.perf_counter() - t0


def timed_median(device: torch.device, fn, repeats: int):
    """timed(fn) `repeats` times; the run with the median decode tokens/s."""
    runs = sorted((timed(device, fn) for _ in range(max(1, repeats))),
                  key=lambda run: run[0].stats.get("decode_tokens_per_s", 0.0))
    return runs[len(runs) // 2]


def run_method(model: Transformer, method: str, prompts: list[list[int]], cfg: BenchConfig, dtype: torch.dtype):
    device = model.embed.weight.device

    def timed(device, fn):
        return timed_median(device, fn, cfg.repeats)

    params = GenerationParams(max_new_tokens=cfg.new_tokens, sampling=cfg.sampling)
    warm = GenerationParams(max_new_tokens=min(cfg.new_tokens, 4 * cfg.spec.gamma), sampling=cfg.sampling)
    need = cache_tokens_needed(max(len(p) for p in prompts), cfg.new_tokens, cfg.spec.gamma)
    if method in DRAFT_METHODS:
        return _run_with_draft(model, method, prompts, cfg, params, warm, need)
    if method == "auto":     # its first run is the calibration a user's first run of this shape pays
        from ..auto import auto_cache, generate_auto
        cache = auto_cache(model, prompts, params, cfg.spec)
        steps = generate_auto(model, prompts, params, cfg.spec, cache=cache).runner
        return timed(device, lambda: generate_auto(model, prompts, params, cfg.spec, cache=cache, steps=steps))
    if method == "ar":
        cache = PagedKVCache(model.cfg, len(prompts), need, dtype=dtype, device=device, page_size=cfg.spec.page_size)
        runner = generate_ar(model, cache, prompts, warm).runner
        return timed(device, lambda: generate_ar(model, cache, prompts, params, runner))
    base, overrides = method_variant(method)
    policy = make_policy(base, dataclasses.replace(cfg.spec, **overrides), model.cfg.num_layers)
    cache = PagedKVCache(model.cfg, len(prompts), need, dtype=dtype, device=device,
                         track_key_bounds=policy.needs_key_bounds, page_size=cfg.spec.page_size)
    steps = generate_self_speculative(model, cache, prompts, warm, policy, cfg.spec.gamma).runner
    return timed(device, lambda: generate_self_speculative(model, cache, prompts, params, policy, cfg.spec.gamma,
                                                            steps))


def _run_with_draft(model, method, prompts, cfg: BenchConfig, params, warm, need):
    from ..decoding.draft_speculative import generate_draft_speculative
    if cfg.draft is None or (method == "specattn-s" and cfg.sparse is None):
        raise InvalidInputError(f"method {method} needs --draft (and for specattn-s a layer map)")
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    sparse = cfg.sparse if method == "specattn-s" else None

    caches = (PagedKVCache(model.cfg, len(prompts), need, dtype=dtype, device=device, page_size=cfg.spec.page_size),
              PagedKVCache(cfg.draft.cfg, len(prompts), need, dtype=dtype, device=device,
                           page_size=cfg.spec.page_size))
    steps = generate_draft_speculative(model, cfg.draft, *caches, prompts, warm, cfg.spec.gamma, sparse).runner
    return timed(device, lambda: generate_draft_speculative(model, cfg.draft, *caches, prompts, params,
                                                             cfg.spec.gamma, sparse, steps))


def prompts_from(text_tokens: list[int], batch: int, context: int) -> list[list[int]]:
    if len(text_tokens) < context:
        raise InvalidInputError(f"the text has {len(text_tokens)} tokens; a {context}-token context needs more")
    stride = max(1, (len(text_tokens) - context) // batch)
    return [text_tokens[i * stride: i * stride + context] for i in range(batch)]


def run_matrix(model: Transformer, text_tokens: list[int], cfg: BenchConfig, progress=None) -> list[dict]:
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    rows = []
    cells = [(c, b) for c in cfg.contexts for b in cfg.batches]
    total = len(cells) * len(cfg.methods)
    done = 0
    for context, batch in cells:
        reason = skip_reason(model, batch, context, cfg, device, dtype)
        if reason:
            rows.append({"context": context, "batch": batch, "skipped": reason})
            done += len(cfg.methods)
            if progress:
                progress(done, total, f"skip b{batch} ctx{context}: {reason}")
            continue
        prompts = prompts_from(text_tokens, batch, context)
        ar = None
        for method in cfg.methods:
            res, secs = run_method(model, method, prompts, cfg, dtype)
            ar = ar or res
            s = res.stats
            decode = s.get("decode_tokens_per_s", 0.0)
            rows.append({
                "method": method, "context": context, "batch": batch, "seconds": secs,
                "tokens_per_s": sum(len(t) for t in res.tokens) / secs, "decode_tokens_per_s": decode,
                "ms_per_token": 1000 / decode if decode else None,
                "speedup_vs_ar": decode / ar.stats["decode_tokens_per_s"],
                # A fixed batch waits for its slowest sequence; with finished slots refilled (continuous batching)
                # each round would yield batch x mean accepted length (self-speculative methods; auto mixes in
                # dense steps, which that count leaves out).
                "steady_speedup_vs_ar": (s["decode_tokens_per_s_steady"] / ar.stats["decode_tokens_per_s"]
                                         if "decode_tokens_per_s_steady" in s and method != "auto" else None),
                "same_tokens_as_ar": res.tokens == ar.tokens if cfg.sampling.greedy else None,
                "mean_accepted_len": s.get("mean_accepted_len", 1.0),
                "acceptance_per_position": s.get("acceptance_per_position"),
                "kv_bytes_per_token": _kv_bytes(s) / max(1, sum(len(t) for t in res.tokens)),
                **{k: s[k] for k in ("draft_s", "verify_s", "select_s", "ar_steps_s", "rounds_by_sequence",
                                     "auto_speculative_share",
                                     "auto_alpha", "verifier_keys_read_fraction_sparse_layers") if k in s},
                **({"verify_kv_bytes_per_token": s["kv_bytes_read_verify"] / max(1, sum(len(t) for t in res.tokens))}
                   if "kv_bytes_read_verify" in s else {}),
            })
            done += 1
            if progress:
                progress(done, total, f"b{batch} ctx{context} {method}")
    return rows


def _kv_bytes(stats: dict) -> int:
    return stats.get("kv_bytes_read", 0) + stats.get("kv_bytes_read_prefill_and_verify", 0) + \
        stats.get("kv_bytes_read_verify", 0) + stats.get("kv_bytes_read_draft", 0)


def table(rows: list[dict]) -> str:
    lines = [f"{'batch':>5} {'context':>7} {'method':>16} {'tok/s':>9} {'vs ar':>6} {'steady':>6} {'tok/verify':>10} "
             f"{'KV MB/token':>11} {'same as ar':>10} {'note':>4}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['batch']:>5} {r['context']:>7} {'(skipped)':>16}  {r['skipped']}")
            continue
        same = "" if r["same_tokens_as_ar"] is None else ("yes" if r["same_tokens_as_ar"] else "NO")
        steady = "" if r.get("steady_speedup_vs_ar") is None else f"{r['steady_speedup_vs_ar']:.2f}x"
        lines.append(f"{r['batch']:>5} {r['context']:>7} {r['method']:>16} {r['decode_tokens_per_s']:>9.1f} "
                     f"{r['speedup_vs_ar']:>5.2f}x {steady:>6} {r['mean_accepted_len']:>10.2f} "
                     f"{r['kv_bytes_per_token'] / 1e6:>11.2f} {same:>10} {_note(r)}")
    return "\n".join(lines)


def _note(row: dict) -> str:
    if "auto_speculative_share" in row:
        return f"{100 * row['auto_speculative_share']:.0f}% of tokens from speculation"
    return ""


def plot(rows: list[dict], path) -> None:
    """Speedup over AR vs context, one line per (method, batch)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in rows:
        if "skipped" not in r and r["method"] != "ar":
            series.setdefault((r["method"], r["batch"]), []).append((r["context"], r["speedup_vs_ar"]))
    for (method, batch), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{method}, batch {batch}")
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    if series:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode speedup over AR")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(rows: list[dict]) -> dict:
    measured = [r for r in rows if "skipped" not in r and r["method"] != "ar"]
    best = max(measured, key=lambda r: r["speedup_vs_ar"], default=None)
    lossless = [r for r in measured if r["same_tokens_as_ar"] is not None]
    return {
        **_auto_summary(rows),
        "best": None if best is None else {k: best[k] for k in ("method", "batch", "context", "speedup_vs_ar")},
        "lossless_runs_identical_to_ar": sum(bool(r["same_tokens_as_ar"]) for r in lossless),
        "lossless_runs": len(lossless),
        "skipped_cells": sum("skipped" in r for r in rows),
        "geomean_speedup": {m: math.exp(sum(math.log(max(r["speedup_vs_ar"], 1e-9)) for r in measured
                                            if r["method"] == m)
                                        / max(1, sum(r["method"] == m for r in measured)))
                            for m in dict.fromkeys(r["method"] for r in measured)},
    }


def _auto_summary(rows: list[dict]) -> dict:
    """auto against the best fixed method (AR included) and against AR, cell by cell; the minimum over cells."""
    cells: dict[tuple[int, int], dict[str, float]] = {}
    for r in rows:
        if "skipped" not in r:
            cells.setdefault((r["batch"], r["context"]), {})[r["method"]] = r["decode_tokens_per_s"]
    ratios = [(c["auto"] / max(v for m, v in c.items() if m != "auto"), c["auto"] / c["ar"])
              for c in cells.values() if "auto" in c and len(c) > 1]
    if not ratios:
        return {}
    return {"auto_over_best_fixed_min": min(r[0] for r in ratios), "auto_over_ar_min": min(r[1] for r in ratios)}
