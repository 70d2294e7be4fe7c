"""Tokens per verification of the self-speculation policies against the draft budget, greedy and sampling, on the
default model and real text: how much smaller a budget SpecAttn-Y needs than MagicDec and Quest for the same
acceptance. Acceptance does not depend on the device (up to rounding), so this runs on the CPU (fp32, eager;
about a minute per run at 4K) as well as on the GPU.

Usage: python benchmarks/acceptance_sweep.py --text A.txt --text B.txt [--context 4096] [--new-tokens 128]
[--budgets 64,128,256,512] [--methods magicdec,quest,specattn-y] [--gamma 4] [--json out.json]
Methods may carry "/blk64" (SpecAttn-Y ranking 64-key blocks) and "/r<k>" (selection refreshed every k rounds).
Each --text gives --windows sequences of the batch (windows 60,000 characters apart, from 40,000 in). --modes
greedy,sampling picks the decoding modes. Rows keep the speculative rounds each sequence took (a fixed batch waits
for the slowest: `rounds_by_sequence`).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, parse_dense_layers  # noqa: E402
from specattn.api import METHODS, SpeculationParams, make_policy, method_variant  # noqa: E402
from specattn.cache import DEFAULT_PAGE_SIZE, PagedKVCache  # noqa: E402
from specattn.decoding.ar import GenerationParams  # noqa: E402
from specattn.decoding.sampling import SamplingParams  # noqa: E402
from specattn.decoding.self_speculative import cache_tokens_needed, generate_self_speculative  # noqa: E402
from specattn.errors import InvalidInputError  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.loader import load_model, load_tokenizer  # noqa: E402

MODES = {"greedy": SamplingParams(), "sampling": SamplingParams(0.6, 0.95, seed=1)}   # the paper's sampling runs


def budget_for(rows: list[dict], method: str, mode: str, tokens: float) -> float | str:
    """The smallest budget at which `method` reaches `tokens` per verification, interpolated in log2(budget)
    between measured budgets; "<= B" / "> B" where even the smallest reaches it / the largest does not."""
    pts = sorted((r["budget"], r["tokens_per_verify"]) for r in rows if r["method"] == method and r["mode"] == mode)
    if pts[0][1] >= tokens:
        return f"<= {pts[0][0]}"
    for (b0, t0), (b1, t1) in zip(pts, pts[1:], strict=False):
        if t0 < tokens <= t1:
            frac = (tokens - t0) / (t1 - t0)
            return round(2 ** (math.log2(b0) + frac * (math.log2(b1) - math.log2(b0))))
    return f"> {pts[-1][0]}"


def summarize(rows: list[dict], budgets: list[int], methods: list[str]) -> dict:
    """Per mode and budget: SpecAttn-Y's tokens per verification over each baseline's at the same budget, and the
    budget each baseline needs to match SpecAttn-Y at that budget."""
    out = {}
    for mode in MODES:
        tpv = {(r["method"], r["budget"]): r["tokens_per_verify"] for r in rows if r["mode"] == mode}
        for b in budgets:
            ours = tpv.get(("specattn-y", b))
            if ours is None:
                continue
            for m in methods:
                if m == "specattn-y" or (m, b) not in tpv:
                    continue
                out.setdefault(mode, {}).setdefault(m, {})[b] = {
                    "specattn_y_over_it_same_budget": ours / tpv[(m, b)],
                    "its_budget_for_the_same_acceptance": budget_for(rows, m, mode, ours)}
    return out


def make_sweep_policy(method: str, budget: int, gamma: int, num_layers: int, dense_layers: tuple[int, ...] = ()):
    """The policy of `method` ("/blk64": block mass; "/r<k>": the verification's mass every k-th round only,
    SpeculationParams.mass_every)."""
    name, overrides = method_variant(method)
    return make_policy(name, SpeculationParams(budget, gamma, dense_layers, **overrides), num_layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", action="append", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--budgets", default="64,128,256,512")
    ap.add_argument("--methods", default="magicdec,quest,specattn-y")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--windows", type=int, default=1, help="sequences per text, at different offsets")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--dense-layers", default="none", help="layers drafting with the full cache: 0,1 or none")
    ap.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="the KV cache page (tokens)")
    ap.add_argument("--json")
    args = ap.parse_args()
    dense = parse_dense_layers(args.dense_layers)
    try:                                # before the model loads
        unknown = [m for m in args.methods.split(",") if method_variant(m)[0] not in METHODS]
    except InvalidInputError as err:
        raise SystemExit(str(err)) from None
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)} (+ /blk64, /r<k>)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model, tok = load_model(args.model, dev, dtype, progress=False), load_tokenizer(args.model)
    starts = [40000 + 60000 * w for w in range(args.windows)]
    prompts = [tok(Path(t).read_text(encoding="utf-8")[a:a + 360000])["input_ids"][:args.context]
               for t in args.text for a in starts]
    if any(len(p) < args.context for p in prompts):
        raise SystemExit(f"a text is too short for {args.windows} windows of {args.context} tokens")
    modes = {m: MODES[m] for m in args.modes.split(",")}
    budgets, methods = [int(b) for b in args.budgets.split(",")], args.methods.split(",")
    rows = []
    for mode, sampling in modes.items():
        for budget in budgets:
            for method in methods:
                policy = make_sweep_policy(method, budget, args.gamma, model.cfg.num_layers, dense)
                cache = PagedKVCache(model.cfg, len(prompts), cache_tokens_needed(args.context, args.new_tokens,
                                                                                   args.gamma),
                                     dtype=dtype, device=dev, track_key_bounds=policy.needs_key_bounds,
                                     page_size=args.page_size)
                res = generate_self_speculative(model, cache, prompts, GenerationParams(args.new_tokens, sampling),
                                                policy, args.gamma)
                rows.append({"mode": mode, "method": method, "budget": budget,
                             "tokens_per_verify": res.stats["mean_accepted_len"], "rounds": res.stats["rounds"],
                             "acceptance_rate": res.stats.get("acceptance_rate"),
                             "rounds_by_sequence": res.stats["rounds_by_sequence"]})
                print(rows[-1], flush=True)
    summary = summarize(rows, budgets, methods)
    if args.json:
        write_json_atomic(args.json, {**environment(), "model": args.model, "dtype": str(dtype),
                                      "texts": [Path(t).name for t in args.text], "windows": args.windows,
                                      "context": args.context, "page_size": args.page_size,
                                      "new_tokens": args.new_tokens, "gamma": args.gamma, "dense_layers": list(dense),
                                      "rows": rows, "summary": summary})
    print("\nmode      budget " + " ".join(f"{m:>11s}" for m in methods))
    for mode in modes:
        for b in budgets:
            tpv = {r["method"]: r["tokens_per_verify"] for r in rows if r["mode"] == mode and r["budget"] == b}
            print(f"{mode:9s} {b:6d} " + " ".join(f"{tpv.get(m, float('nan')):11.3f}" for m in methods))


if __name__ == "__main__":
    main()
