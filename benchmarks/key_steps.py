"""Which draft steps should choose SpecAttn-S's keys? Lossless draft-model speculation and page-level SpecAttn-S
with keys from all gamma draft steps, the first or the last, on the real pair: tokens per verify, verifier keys
read in the sparse layers, and where each run's greedy output first departs from the lossless one (= AR).
Runs on the CPU (fp32, eager; minutes) or the GPU.

Usage: python benchmarks/key_steps.py --draft D --target T --text F --layer-map map.json [--context 1536]
[--new-tokens 32] [--batch 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, first_difference  # noqa: E402
from specattn.alignment import LayerMap  # noqa: E402
from specattn.cache import PagedKVCache  # noqa: E402
from specattn.decoding.ar import GenerationParams  # noqa: E402
from specattn.decoding.draft_speculative import KEY_STEPS, SparseVerification, generate_draft_speculative  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.loader import load_model, load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("--draft", "--target", "--text", "--layer-map"):
        ap.add_argument(name, required=True)
    ap.add_argument("--context", type=int, default=1536)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--p", type=float, default=0.95)
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    ids = load_tokenizer(args.target)(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False)[
        "input_ids"]
    prompts = [ids[20000 + i * 5000: 20000 + i * 5000 + args.context] for i in range(args.batch)]
    draft = load_model(args.draft, dev, dtype, "auto", progress=False)
    target = load_model(args.target, dev, dtype, "auto", progress=False)
    layer_map = LayerMap.load(args.layer_map, target.cfg.num_layers, draft.cfg.num_layers).draft_layer
    runs = {"draft-spec": None} | {f"specattn-s keys from {s}": SparseVerification(
        tuple(layer_map), args.p, (0, 1), page_level=True, key_steps=s) for s in KEY_STEPS}
    rows, lossless = [], None
    for name, sparse in runs.items():
        size = args.context + args.new_tokens + 16
        res = generate_draft_speculative(
            target, draft, PagedKVCache(target.cfg, args.batch, size, dtype=dtype, device=dev),
            PagedKVCache(draft.cfg, args.batch, size, dtype=dtype, device=dev), prompts,
            GenerationParams(args.new_tokens), 4, sparse)
        lossless = lossless or res.tokens
        s = res.stats
        rows.append({"method": name, "tokens_per_verify": s["mean_accepted_len"], "rounds": s["rounds"],
                     "keys_read_sparse_layers": s.get("verifier_keys_read_fraction_sparse_layers"),
                     "first_difference_from_lossless": [first_difference(a, b)
                                                        for a, b in zip(res.tokens, lossless, strict=True)]})
        print(rows[-1], flush=True)
    if args.json:
        write_json_atomic(args.json, {**environment(), "dtype": str(dtype), "text": Path(args.text).name,
                                      "context": args.context, "new_tokens": args.new_tokens, "batch": args.batch,
                                      "p": args.p, "gamma": 4, "rows": rows})


if __name__ == "__main__":
    main()
