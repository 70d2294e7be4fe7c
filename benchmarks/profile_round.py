"""Where a draft-model speculation round's time goes, on random models of the real pair's shapes (Qwen2.5 0.5B
drafting for 1.5B), against an AR step of the verifier: wall time per round, the device time of its kernels (by
name, torch.profiler) and the gap between them (host work the GPU waits for).

Usage (GPU): python benchmarks/profile_round.py [--batch 8] [--context 8192] [--rounds 32] [--top 12]
Random weights accept almost nothing, so every round emits one token; the work per round is that of a real
round (gamma draft steps, one verify step over gamma + 1 tokens, acceptance, rollback)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import QWEN25_05B, QWEN25_15B, RESULTS, cuda_kernel_totals, random_model  # noqa: E402
from specattn.cache import PagedKVCache  # noqa: E402
from specattn.decoding import draft_speculative as dspec  # noqa: E402
from specattn.decoding.ar import GenerationParams, generate_ar  # noqa: E402
from specattn.decoding.draft_speculative import SparseVerification, generate_draft_speculative  # noqa: E402


def skip_prefill(model, cache: PagedKVCache, prompts: list[list[int]], chunk: int = 0) -> torch.Tensor:
    cache.reset(len(prompts))
    cache.reserve(len(prompts[0]))
    cache.advance(len(prompts[0]))
    return torch.zeros(len(prompts), model.cfg.vocab_size, device=cache.device)


def kernel_table(prof, divide: int, top: int) -> tuple[float, int]:
    per = cuda_kernel_totals(prof)
    for name, (calls, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{us / divide:9.1f} us {calls / divide:7.1f}x  {name[:90]}")
    return sum(us for _, us in per.values()) / divide, sum(c for c, _ in per.values()) // divide


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=32)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--sparse-p", type=float, help="page-level SpecAttn-S (layer map of results/layermap_qwen.json) "
                                                      "instead of lossless rounds")
    ap.add_argument("--keys-from-steps", choices=("all", "first", "last"), default="all")
    args = ap.parse_args()
    torch.manual_seed(0)
    target, draft = random_model(QWEN25_15B), random_model(QWEN25_05B)
    for m in (target, draft):
        m.compile_steps()
    n_new = args.rounds
    size = args.context + n_new + 2 * (args.gamma + 1) + 16
    tcache = PagedKVCache(target.cfg, args.batch, size, dtype=torch.bfloat16, device="cuda")
    dcache = PagedKVCache(draft.cfg, args.batch, size, dtype=torch.bfloat16, device="cuda")
    prompts = torch.randint(0, target.cfg.vocab_size, (args.batch, args.context)).tolist()
    params = GenerationParams(max_new_tokens=n_new)
    sparse = None
    if args.sparse_p:
        layer_map = json.loads((RESULTS / "layermap_qwen.json").read_text())["draft_layer"]
        sparse = SparseVerification(tuple(layer_map), args.sparse_p, page_level=True, key_steps=args.keys_from_steps)

    def spec(steps=None):
        return generate_draft_speculative(target, draft, tcache, dcache, prompts, params, args.gamma, sparse, steps)

    first = spec()                                    # captures the graphs
    # Later runs skip the prefill's work (the caches keep the first run's K/V; lengths are set as a prefill
    # would), so the profile holds the decode rounds alone.
    dspec.prefill = skip_prefill
    spec(first.runner)
    torch.cuda.synchronize()
    res = spec(first.runner)
    torch.cuda.synchronize()
    s = res.stats
    decode_s = s["total_s"] - s["prefill_s"]
    print(f"\n== {'specattn-s' if sparse else 'draft-spec'} b{args.batch} ctx{args.context}: {s['rounds']} rounds, "
          f"{decode_s / s['rounds'] * 1e3:.2f} ms per round (draft {s['draft_s'] / s['rounds'] * 1e3:.2f}, "
          f"verify {s['verify_s'] / s['rounds'] * 1e3:.2f}), mean accepted {s.get('mean_accepted_len', 0):.2f}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        res = spec(first.runner)
        torch.cuda.synchronize()
    rounds = res.stats["rounds"]
    print(f"kernels per round ({rounds} rounds):")
    total, count = kernel_table(prof, rounds, args.top)
    print(f"kernel time per round {total:.0f} us, {count} kernels")

    ar = generate_ar(target, tcache, prompts, params)
    ar = generate_ar(target, tcache, prompts, params, ar.runner)
    a = ar.stats
    print(f"AR step of the verifier: {(a['total_s'] - a['prefill_s']) / n_new * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
