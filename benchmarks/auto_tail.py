"""`--method auto` deciding for the whole batch (the default) against deciding for the sequences still generating
(auto.TAIL_AWARE), in one process on the real default model (GPU), with every decision of the timed run traced.

Per cell: AR and MagicDec once, then auto under each variant with a fresh cost cache (its first run calibrates, the
timed run is the median of --repeats). Writes benchmarks/results/auto_tail.json: rows with speedup over AR and
auto's decisions (sequences generating, mean context, choice, predicted dense and best speculative tokens/s per
sequence).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import specattn.auto  # noqa: E402
from benchmarks.common import RESULTS, environment, gutenberg_tokens  # noqa: E402
from specattn.api import SpeculationParams  # noqa: E402
from specattn.evaluation import bench  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.loader import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402

VARIANTS = {"whole-batch": (False, 1.0), "tail": (True, 1.0), "tail-decay0.8": (True, 0.8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=os.environ.get("SPECATTN_DEFAULT_GGUF", DEFAULT_MODEL))
    ap.add_argument("--cells", default="64x8000,16x8000", help="batch x context, comma-separated")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "auto_tail.json"))
    ap.add_argument("--device", default="cuda", help="cpu (fp32) for a dry run")
    args = ap.parse_args()
    model = load_model(args.model, args.device, "bf16" if args.device == "cuda" else "fp32", progress=False)
    tokens = gutenberg_tokens(load_tokenizer(args.model))
    rows = []
    for cell in args.cells.split(","):
        batch, context = (int(x) for x in cell.split("x"))
        prompts = bench.prompts_from(tokens, batch, context)
        cfg = bench.BenchConfig(["ar"], [context], [batch], SpeculationParams(512, 4), args.new_tokens,
                                repeats=args.repeats)
        ar = {}
        for method in ("ar", "magicdec"):
            res, _ = bench.run_method(model, method, prompts, cfg, model.embed.weight.dtype)
            ar[method] = res.stats["decode_tokens_per_s"]
            rows.append({"batch": batch, "context": context, "method": method,
                         "decode_tokens_per_s": ar[method], "speedup_vs_ar": ar[method] / ar["ar"]})
            print(rows[-1], flush=True)
        for name in args.variants.split(","):
            specattn.auto.TAIL_AWARE, specattn.auto.TOKENS_DECAY = VARIANTS[name]
            os.environ["SPECATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="specattn-auto-")
            res, _ = bench.run_method(model, "auto", prompts, cfg, model.embed.weight.dtype)
            s = res.stats
            rows.append({"batch": batch, "context": context, "method": f"auto/{name}",
                         "decode_tokens_per_s": s["decode_tokens_per_s"],
                         "speedup_vs_ar": s["decode_tokens_per_s"] / ar["ar"],
                         "speculative_share": s["auto_speculative_share"], "rounds": s["rounds"],
                         "dense_steps": s["dense_steps"], "rounds_by_policy": s["auto_rounds_by_policy"],
                         "decisions": s["auto_decisions"]})
            print({k: v for k, v in rows[-1].items() if k != "decisions"}, flush=True)
            print("  decisions (active, context, choice):",
                  [(d[0], d[2]) for d in s["auto_decisions"]][:60], flush=True)
        # after every cell, so that a run cut short by its time limit keeps what it measured
        write_json_atomic(args.out, {**environment(), "model": DEFAULT_MODEL, "dtype": "bf16",
                                     "config": {"cells": args.cells, "variants": {n: VARIANTS[n] for n in
                                                                                  args.variants.split(",")},
                                                "budget": 512, "gamma": 4, "new_tokens": args.new_tokens,
                                                "repeats": args.repeats}, "rows": rows})
    for r in rows:
        print(f"b{r['batch']:<3} ctx{r['context']:<6} {r['method']:22s} {r['decode_tokens_per_s']:9.0f} tok/s "
              f"x{r['speedup_vs_ar']:.2f}" + (f"  spec share {r['speculative_share']:.2f}" if "decisions" in r else ""))


if __name__ == "__main__":
    main()
