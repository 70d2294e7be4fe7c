"""Where greedy speculative output departs from greedy AR on the GPU (bf16), is it a near tie or a bug?

For one batch x context cell of a real model: AR and a speculative method generate the same prompts; AR also runs on
the first half of the batch alone (is AR itself batch-invariant?). For each sequence that departs, the prompt plus
AR's tokens before the departure are prefilled alone, and the logits there give the margin between AR's token and
the method's token, next to the gap between the top two logits. A rounding flip shows a margin of a few hundredths;
a wrong kernel shows a large one.

Usage (GPU): python benchmarks/divergence_check.py --model GGUF --batch 64 --context 32000 [--method magicdec]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, first_difference, gutenberg_tokens  # noqa: E402
from specattn.api import SpeculationParams, make_policy  # noqa: E402
from specattn.cache import PagedKVCache  # noqa: E402
from specattn.decoding.ar import GenerationParams, generate_ar  # noqa: E402
from specattn.decoding.runner import prefill  # noqa: E402
from specattn.decoding.self_speculative import cache_tokens_needed, generate_self_speculative  # noqa: E402
from specattn.evaluation import bench  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.loader import load_model, load_tokenizer  # noqa: E402


def margin_at(model, device: str, prompt: list[int], prefix: list[int], tok_a: int, tok_b: int) -> dict:
    """Logits after prompt + prefix, prefilled alone: logit(tok_a) - logit(tok_b) and the top-2 gap."""
    ids = prompt + prefix
    cache = PagedKVCache(model.cfg, 1, len(ids) + 16, dtype=model.embed.weight.dtype, device=device)
    logits = prefill(model, cache, [ids])[0].float()
    top2 = logits.topk(2).values
    return {"margin_ar_minus_method": (logits[tok_a] - logits[tok_b]).item(), "top2_gap": (top2[0] - top2[1]).item(),
            "argmax_here": int(logits.argmax()), "ar_token": tok_a, "method_token": tok_b}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=32000)
    ap.add_argument("--method", default="magicdec")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--margins", type=int, default=8, help="departing sequences whose margin is measured")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = load_model(args.model, args.device, args.dtype, progress=False)
    prompts = bench.prompts_from(gutenberg_tokens(load_tokenizer(args.model)), args.batch, args.context)
    need = cache_tokens_needed(args.context, args.new_tokens, args.gamma)
    cache = PagedKVCache(model.cfg, args.batch, need, dtype=model.embed.weight.dtype, device=args.device)
    params = GenerationParams(max_new_tokens=args.new_tokens)
    ar = generate_ar(model, cache, prompts, params).tokens
    half = args.batch // 2
    ar_half = generate_ar(model, cache, prompts[:half], params).tokens
    spec = SpeculationParams(args.budget, args.gamma)
    policy = make_policy(args.method, spec, model.cfg.num_layers)
    got = generate_self_speculative(model, cache, prompts, params, policy, args.gamma).tokens
    del cache
    if args.device == "cuda":
        torch.cuda.empty_cache()
    def departure(a: list[int], b: list[int]) -> int | None:    # None: one is a prefix of the other
        d = first_difference(a, b)
        return d if d < min(len(a), len(b)) else None

    departs = [(i, d) for i, d in enumerate(departure(a, b) for a, b in zip(ar, got, strict=True)) if d is not None]
    ar_batch = [departure(a, b) for a, b in zip(ar[:half], ar_half, strict=True)]
    margins = [{"sequence": i, "position": d,
                **margin_at(model, args.device, prompts[i], ar[i][:d], ar[i][d], got[i][d])}
               for i, d in departs[:args.margins]]
    out = {**environment(), "config": vars(args), "sequences_departing": len(departs),
           "departures": [{"sequence": i, "position": d} for i, d in departs],
           "ar_batch_vs_half_departing": sum(d is not None for d in ar_batch),
           "ar_batch_vs_half_first": [d for d in ar_batch if d is not None][:16], "margins": margins}
    write_json_atomic(args.out, out)
    print(f"{args.method} departs from AR in {len(departs)}/{args.batch} sequences; AR at batch {args.batch} vs "
          f"{half} departs in {out['ar_batch_vs_half_departing']}/{half}")
    for m in margins:
        print(f"  seq {m['sequence']:3d} pos {m['position']:3d}: logit(AR) - logit(method) "
              f"{m['margin_ar_minus_method']:+.4f}, top-2 gap {m['top2_gap']:.4f}, argmax alone = AR's: "
              f"{m['argmax_here'] == m['ar_token']}")


if __name__ == "__main__":
    main()
