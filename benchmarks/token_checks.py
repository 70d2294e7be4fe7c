"""GPU token checks for the launch paths of small steps, on random models (no model files): greedy AR and SpecAttn-Y
tokens with programmatic dependent launch (pdl.MODE 2) and without (0) must be identical; with the small-step
kernels (kernels.gemv and the fused q/k/v + rotary and gate/up + SwiGLU kernels, as model.GEMV_PROJECTIONS
says) against cuBLAS only, and SpecAttn-Y against AR, it
reports how many leading tokens of 48 agree (bf16 rounding may flip near-tied tokens between kernels); at batch 8,
the tensor-core path of the same kernels (model.GEMV_MAX_ROWS 64) against cuBLAS, AR tokens of all 8 sequences.

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
# name: (PDL mode, small-step projections, model.GEMV_MAX_ROWS, batch)
VARIANTS = {"pdl2": (2, SMALL_STEP, 2, 1), "pdl0": (0, SMALL_STEP, 2, 1), "cublas": (2, (), 2, 1),
            "tensor_cores_b8": (2, SMALL_STEP, 64, 8), "cublas_b8": (2, (), 2, 8)}


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


def run_variant(cfg, prompts: list[list[int]], mode: int, projections: tuple[str, ...],
                max_rows: int) -> tuple[list[int], list[int]]:
    """(AR tokens, SpecAttn-Y tokens), all sequences concatenated, with this PDL mode and these small-step
    projections for steps of up to max_rows rows."""
    pdl.MODE = mode
    specattn.model.GEMV_PROJECTIONS = projections
    specattn.model.GEMV_MAX_ROWS = max_rows
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = random_model(cfg)
    cache = PagedKVCache(cfg, len(prompts), len(prompts[0]) + 600, dtype=torch.bfloat16, device="cuda")
    params = GenerationParams(max_new_tokens=NEW_TOKENS)
    ar = generate_ar(model, cache, prompts, params).tokens
    policy = make_policy("specattn-y", SpeculationParams(budget=256), cfg.num_layers)
    spec = generate_self_speculative(model, cache, prompts, params, policy).tokens
    del model, cache
    torch.cuda.empty_cache()
    return sum(ar, []), sum(spec, [])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(RESULTS / "pdl_check.json"))
    args = ap.parse_args()
    defaults = pdl.MODE, specattn.model.GEMV_PROJECTIONS, specattn.model.GEMV_MAX_ROWS
    out = {**environment(), "new_tokens": NEW_TOKENS, "prompt_tokens": 3000,
           "variants": {k: {"pdl": m, "projections": list(p), "gemv_max_rows": r, "batch": b}
                        for k, (m, p, r, b) in VARIANTS.items()}}
    for name, cfg in [("smol", SMOLLM2_135M), ("8b-4layers", dataclasses.replace(LLAMA3_8B, num_layers=4))]:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, cfg.vocab_size, (3000,), generator=g).tolist() for _ in range(8)]
        res = {key: run_variant(cfg, prompts[:batch], mode, proj, rows)
               for key, (mode, proj, rows, batch) in VARIANTS.items()}
        out[name] = {"ar_pdl2_equals_pdl0": res["pdl2"][0] == res["pdl0"][0],
                     "selfspec_pdl2_equals_pdl0": res["pdl2"][1] == res["pdl0"][1],
                     f"ar_gemv_vs_cublas_same_prefix_of_{NEW_TOKENS}": same_prefix(res["pdl2"][0], res["cublas"][0]),
                     f"selfspec_vs_ar_gemv_same_prefix_of_{NEW_TOKENS}": same_prefix(res["pdl2"][1], res["pdl2"][0]),
                     f"selfspec_vs_ar_cublas_same_prefix_of_{NEW_TOKENS}": same_prefix(res["cublas"][1],
                                                                                       res["cublas"][0]),
                     f"b8_ar_tensor_cores_vs_cublas_same_prefix_of_{8 * NEW_TOKENS}": same_prefix(
                         res["tensor_cores_b8"][0], res["cublas_b8"][0])}
        print(name, out[name], flush=True)
    pdl.MODE, specattn.model.GEMV_PROJECTIONS, specattn.model.GEMV_MAX_ROWS = defaults
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
