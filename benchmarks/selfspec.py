"""Self-speculative decoding on the GPU, real default model: every method against AR in the same run.

Preliminary (issue 5 is open): the speculative loop runs eagerly (no CUDA graphs for draft/verify steps yet),
so its tokens/s are not yet comparable with the graph-captured AR; acceptance, match with AR and KV bytes are.
Writes benchmarks/results/selfspec.json (or --out).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment, gutenberg_tokens  # noqa: E402
from specattn.api import METHODS, SpeculationParams, make_policy  # noqa: E402
from specattn.cache import PagedKVCache  # noqa: E402
from specattn.decoding.ar import GenerationParams, generate_ar  # noqa: E402
from specattn.decoding.self_speculative import cache_tokens_needed, generate_self_speculative  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.loader import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402


def run(model, method: str, prompts: list[list[int]], new_tokens: int, spec: SpeculationParams):
    params = GenerationParams(max_new_tokens=new_tokens)
    need = cache_tokens_needed(len(prompts[0]), new_tokens, spec.gamma)
    if METHODS[method] is None:
        cache = PagedKVCache(model.cfg, len(prompts), need, dtype=torch.bfloat16, device="cuda")
        generate_ar(model, cache, prompts, params)                      # warm-up (compile, graph capture)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = generate_ar(model, cache, prompts, params)
    else:
        policy = make_policy(method, spec, model.cfg.num_layers)
        cache = PagedKVCache(model.cfg, len(prompts), need, dtype=torch.bfloat16, device="cuda",
                             track_key_bounds=policy.needs_key_bounds)
        generate_self_speculative(model, cache, prompts, GenerationParams(max_new_tokens=8), policy, spec.gamma)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = generate_self_speculative(model, cache, prompts, params, policy, spec.gamma)
    torch.cuda.synchronize()
    return res, time.perf_counter() - t0


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.environ.get("SPECATTN_DEFAULT_GGUF", DEFAULT_MODEL))
    ap.add_argument("--out", default=str(RESULTS / "selfspec.json"))
    args = ap.parse_args()
    model = load_model(args.model, "cuda", "bf16", progress=False)
    text = gutenberg_tokens(load_tokenizer(args.model))
    out = {**environment(), "config": {"dtype": "bf16", "greedy": True, "new_tokens": 64, "gamma": 4,
                                      "budget_tokens": 256, "note": "eager speculative loop (no CUDA graphs yet)"},
           "rows": []}
    for batch, ctx in [(1, 4096), (8, 4096)]:
        prompts = [text[i * ctx: i * ctx + ctx] for i in range(batch)]
        ar_tokens = None
        for method in ("ar", "selfspec-full", "magicdec", "quest", "specattn-y", "vegas"):
            res, secs = run(model, method, prompts, 64, SpeculationParams(256, 4, (0,)))
            if method == "ar":
                ar_tokens = res.tokens
            same = [first_difference(x, y) for x, y in zip(res.tokens, ar_tokens, strict=True)]
            row = {"method": method, "batch": batch, "context": ctx, "seconds": secs,
                   "tokens_per_s": sum(len(t) for t in res.tokens) / secs, "same_prefix_as_ar_min": min(same),
                   **{k: res.stats[k] for k in ("mean_accepted_len", "acceptance_rate", "acceptance_per_position",
                                                "draft_s", "verify_s", "select_s", "kv_bytes_read_draft")
                      if k in res.stats}}
            out["rows"].append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
