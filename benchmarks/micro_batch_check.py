"""GPU token check for micro-batches (decoding/micro_batches.py) on the real default model: a batch run as two
micro-batches on two streams must give exactly the tokens of each half run alone on one stream (anything else is
a race between the streams); against the whole batch in one run, bf16 rounding differs with the batch's kernel
shapes, so this reports how many sequences agree (greedy, near-tied tokens can flip).

Usage (GPU, after scripts/gpu_setup.sh): python benchmarks/micro_batch_check.py [--batch 32 --context 8000]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment, first_difference, gutenberg_tokens  # noqa: E402
from specattn.api import SpeculationParams, make_policy  # noqa: E402
from specattn.cache import PagedKVCache  # noqa: E402
from specattn.decoding.ar import GenerationParams, generate_ar  # noqa: E402
from specattn.decoding.micro_batches import (  # noqa: E402
    generate_ar_micro_batches,
    generate_self_speculative_micro_batches,
    micro_batch_caches,
)
from specattn.decoding.self_speculative import cache_tokens_needed, generate_self_speculative  # noqa: E402
from specattn.evaluation import bench  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.loader import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402


def identical(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(first_difference(x, y) == len(x) == len(y) for x, y in zip(a, b, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.environ.get("SPECATTN_DEFAULT_GGUF", DEFAULT_MODEL))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS / "micro_batch_check.json"))
    args = ap.parse_args()
    model = load_model(args.model, "cuda", "bf16", progress=False)
    prompts = bench.prompts_from(gutenberg_tokens(load_tokenizer(args.model)), args.batch, args.context)
    need = cache_tokens_needed(args.context, args.new_tokens, 4)
    params = GenerationParams(max_new_tokens=args.new_tokens)
    half = args.batch // 2
    halves = [prompts[:half], prompts[half:]]
    kw = {"dtype": torch.bfloat16, "device": "cuda"}
    rows = []
    for method in ("ar", "specattn-y/blk64"):
        policy = None if method == "ar" else make_policy("specattn-y", SpeculationParams(512, mass_tokens=64),
                                                         model.cfg.num_layers)

        def run(cache, ps, policy=policy):
            if policy is None:
                return generate_ar(model, cache, ps, params).tokens
            return generate_self_speculative(model, cache, ps, params, policy, 4).tokens

        whole = run(PagedKVCache(model.cfg, args.batch, need, **kw), prompts)
        alone = sum((run(PagedKVCache(model.cfg, len(h), need, **kw), h) for h in halves), [])
        caches = micro_batch_caches(model, prompts, 2, need, **kw)
        micro = [(generate_ar_micro_batches(model, caches, prompts, params) if policy is None else
                  generate_self_speculative_micro_batches(model, caches, prompts, params, policy, 4)).tokens
                 for _ in range(2)]
        row = {"method": method, "batch": args.batch, "context": args.context, "new_tokens": args.new_tokens,
               "micro_equals_halves_alone": [m == alone for m in micro],
               "micro_sequences_identical_to_halves_alone": [identical(m, alone) for m in micro],
               "halves_alone_sequences_identical_to_whole": identical(alone, whole),
               "micro_sequences_identical_to_whole": identical(micro[0], whole)}
        rows.append(row)
        print(row, flush=True)
        del caches
        torch.cuda.empty_cache()
    write_json_atomic(args.out, {**environment(), "rows": rows})
    for r in rows:
        print(f"{r['method']:18} micro == halves alone {r['micro_equals_halves_alone']}  halves alone vs whole "
              f"{r['halves_alone_sequences_identical_to_whole']}/{r['batch']}")


if __name__ == "__main__":
    main()
