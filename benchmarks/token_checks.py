"""GPU token checks for the launch paths of small steps, on random models (no model files): greedy AR and SpecAttn-Y
tokens with programmatic dependent launch (pdl.MODE 2) and without (0) must be identical; with the small-step
kernels (kernels.gemv and the fused q/k/v + rotary and gate/up + SwiGLU kernels, as model.GEMV_PROJECTIONS
says) against cuBLAS only, and SpecAttn-Y against AR, it
reports how many leading tokens of 48 agree (bf16 rounding may flip near-tied tokens between kernels).

Usage (GPU): python benchmarks/token_checks.py [--out results/pdl_check.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import specattn.model  # noqa: E402
from benchmarks.common import LLAMA3_8B, RESULTS, SMOLLM2_135M, environment, random_model  # noqa: E402
from specattn.api import SpeculationParams, make_policy  # noqa: E402
from specattn.cache import PagedKVCache  # noqa: E402
from specattn.decoding.ar import GenerationParams, generate_ar  # noqa: E402
from specattn.decoding.self_speculative import generate_self_speculative  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import pdl  # noqa: E402

NEW_TOKENS = 48
SMALL_STEP = specattn.model.GEMV_PROJECTIONS      # the default small-step kernels (gate/up + SwiGLU included)
VARIANTS = {"pdl2": (2, SMALL_STEP), "pdl0": (0, SMALL_STEP), "cublas": (2, ())}


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


def run_variant(cfg, prompt: list[int], mode: int, projections: tuple[str, ...]) -> tuple[list[int], list[int]]:
    """(AR tokens, SpecAttn-Y tokens) with this PDL mode and these small-step projections."""
    pdl.MODE = mode
    specattn.model.GEMV_PROJECTIONS = projections
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = random_model(cfg)
    cache = PagedKVCache(cfg, 1, len(prompt) + 600, dtype=torch.bfloat16, device="cuda")
    params = GenerationParams(max_new_tokens=NEW_TOKENS)
    ar = generate_ar(model, cache, [prompt], params).tokens[0]
    policy = make_policy("specattn-y", SpeculationParams(budget=256), cfg.num_layers)
    spec = generate_self_speculative(model, cache, [prompt], params, policy).tokens[0]
    del model, cache
    torch.cuda.empty_cache()
    return ar, spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(RESULTS / "pdl_check.json"))
    args = ap.parse_args()
    default_mode, default_projections = pdl.MODE, specattn.model.GEMV_PROJECTIONS
    out = {**environment(), "new_tokens": NEW_TOKENS, "batch": 1, "prompt_tokens": 3000}
    for name, cfg in [("smol", SMOLLM2_135M), ("8b-4layers", dataclasses.replace(LLAMA3_8B, num_layers=4))]:
        prompt = torch.randint(0, cfg.vocab_size, (3000,), generator=torch.Generator().manual_seed(1)).tolist()
        res = {key: run_variant(cfg, prompt, mode, proj) for key, (mode, proj) in VARIANTS.items()}
        out[name] = {"ar_pdl2_equals_pdl0": res["pdl2"][0] == res["pdl0"][0],
                     "selfspec_pdl2_equals_pdl0": res["pdl2"][1] == res["pdl0"][1],
                     f"ar_gemv_vs_cublas_same_prefix_of_{NEW_TOKENS}": same_prefix(res["pdl2"][0], res["cublas"][0]),
                     f"selfspec_vs_ar_gemv_same_prefix_of_{NEW_TOKENS}": same_prefix(res["pdl2"][1], res["pdl2"][0]),
                     f"selfspec_vs_ar_cublas_same_prefix_of_{NEW_TOKENS}": same_prefix(res["cublas"][1],
                                                                                       res["cublas"][0])}
        print(name, out[name], flush=True)
    pdl.MODE, specattn.model.GEMV_PROJECTIONS = default_mode, default_projections
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
