"""Plain AR decoding inside the speculative loop (a controller that always picks gamma 0) against generate_ar,
on the real default model: what the loop costs when auto decides not to speculate.

Usage: python benchmarks/dense_chunks.py [--batch 1,32] [--context 1024] [--chunks 16,64]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import gutenberg_tokens  # noqa: E402
from specattn.api import SpeculationParams, make_policy  # noqa: E402
from specattn.cache import PagedKVCache  # noqa: E402
from specattn.decoding import self_speculative  # noqa: E402
from specattn.decoding.ar import GenerationParams, generate_ar  # noqa: E402
from specattn.evaluation.bench import prompts_from  # noqa: E402
from specattn.loader import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402


class AlwaysDense:
    def next(self, context, active=None):
        return 0

    def observe(self, *args, **kwargs):
        pass


def median_rate(fn, repeats: int = 5) -> tuple[float, dict]:
    runs = [fn() for _ in range(repeats)]
    rates = [r.stats["decode_tokens_per_s"] for r in runs]
    return statistics.median(rates), runs[-1].stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.environ.get("SPECATTN_DEFAULT_GGUF", DEFAULT_MODEL))
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--chunks", default="16,64")
    args = ap.parse_args()
    model = load_model(args.model, "cuda", "bf16", progress=False)
    tokens = gutenberg_tokens(load_tokenizer(args.model))
    params = GenerationParams(max_new_tokens=128)
    spec = SpeculationParams(512, 4)
    for batch in [int(b) for b in args.batch.split(",")]:
        prompts = prompts_from(tokens, batch, args.context)
        cache = PagedKVCache(model.cfg, batch, args.context + 256, dtype=torch.bfloat16, device="cuda")
        runner = generate_ar(model, cache, prompts, params).runner
        ar, _ = median_rate(lambda: generate_ar(model, cache, prompts, params, runner))
        line = f"b{batch} ctx{args.context}: generate_ar {ar:.0f} tok/s"
        for chunk in [int(c) for c in args.chunks.split(",")]:
            self_speculative.AR_CHUNK = chunk
            policy = make_policy("specattn-y", spec, model.cfg.num_layers)
            steps = self_speculative.generate_self_speculative(model, cache, prompts, params, policy, 4,
                                                               controller=AlwaysDense()).runner
            rate, stats = median_rate(lambda: self_speculative.generate_self_speculative(
                model, cache, prompts, params, policy, 4, steps, controller=AlwaysDense()))
            line += (f" | loop chunk {chunk}: {rate:.0f} tok/s ({rate / ar:.3f}x), dense steps "
                     f"{stats['dense_steps']} in {stats['dense_step_chunks']} chunks, "
                     f"ar_steps_s {stats['ar_steps_s'] * 1e3:.1f} ms of "
                     f"{(stats['total_s'] - stats['prefill_s']) * 1e3:.1f}")
        print(line, flush=True)
        if batch == 1:     # where the host time of the loop goes
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
            self_speculative.generate_self_speculative(model, cache, prompts, params, policy, 4, steps,
                                                       controller=AlwaysDense())
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
