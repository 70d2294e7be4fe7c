"""GPU check of model.FP32_LOGITS (the output head's product written in fp32): it runs inside compiled, graph-captured
steps, how far its logits and bf16-written ones are from an fp64 product of the same operands, and what it costs an
AR step (random weights of the default model's shape, batch 64, contexts of 2K; no model files).

Usage (GPU): python benchmarks/fp32_logits_check.py [--out results/fp32_logits_check.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import specattn.model  # noqa: E402
from benchmarks.common import RESULTS, SMOLLM2_135M, environment, random_model  # noqa: E402
from specattn.cache import PagedKVCache  # noqa: E402
from specattn.decoding.ar import GenerationParams, generate_ar  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402


def head_errors(hidden: int, vocab: int, rows: int) -> dict:
    torch.manual_seed(0)
    h = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)
    w = (torch.randn(vocab, hidden, device="cuda") * 0.05).to(torch.bfloat16)
    exact = h.double() @ w.double().t()
    out = {}
    for flag in (True, False):
        specattn.model.FP32_LOGITS = flag
        got = specattn.model.head_product(h, w)
        out["fp32" if flag else "bf16"] = {"dtype": str(got.dtype),
                                           "max_abs_err": (got.double() - exact).abs().max().item(),
                                           "exact_ties_top2": int((got.topk(2).values.diff(dim=-1) == 0).sum())}
    return out


def ar_speed(flag: bool, batch: int, ctx: int, new_tokens: int) -> dict:
    specattn.model.FP32_LOGITS = flag
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = random_model(SMOLLM2_135M)
    cache = PagedKVCache(model.cfg, batch, ctx + new_tokens + 16, dtype=torch.bfloat16, device="cuda")
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, ctx)).tolist()
    params = GenerationParams(max_new_tokens=new_tokens)
    runner = generate_ar(model, cache, prompts, params).runner          # compiles and captures
    speeds = [generate_ar(model, cache, prompts, params, runner).stats["decode_tokens_per_s"] for _ in range(3)]
    return {"fp32_logits": flag, "decode_tokens_per_s_median": sorted(speeds)[1], "runs": speeds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(RESULTS / "fp32_logits_check.json"))
    args = ap.parse_args()
    errors = head_errors(SMOLLM2_135M.hidden_size, SMOLLM2_135M.vocab_size, 320)
    speed = [ar_speed(flag, 64, 2048, 64) for flag in (True, False, True, False)]
    specattn.model.FP32_LOGITS = True
    write_json_atomic(args.out, {**environment(), "head_errors_vs_fp64": errors, "ar_b64_2k": speed})
    print(errors)
    for s in speed:
        print(f"fp32 logits {s['fp32_logits']!s:5}: {s['decode_tokens_per_s_median']:.0f} tok/s (median of 3)")


if __name__ == "__main__":
    main()
