"""`--method auto` against every fixed method of the matrix, cell by cell, on the real default model (GPU).

Runs `specattn bench`'s matrix (ar, magicdec, specattn-y, auto; greedy) with a fresh cost cache, so auto's first
run of each shape (the bench warm-up) is the calibration a user's first run pays, and the timed run is a user's
second. Writes benchmarks/results/auto.json with summary.auto_over_best_fixed_min and summary.auto_over_ar_min
(targets: >= 0.95 and >= 0.98).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment, gutenberg_tokens  # noqa: E402
from specattn.api import SpeculationParams  # noqa: E402
from specattn.evaluation import bench  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.loader import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=os.environ.get("SPECATTN_DEFAULT_GGUF", DEFAULT_MODEL))
    ap.add_argument("--context", default="1k,8000")   # 8000 + 128 new tokens fit its 8,192 positions
    ap.add_argument("--batch", default="1,8,32,64")
    ap.add_argument("--methods", default="ar,magicdec,specattn-y,auto")
    ap.add_argument("--budget", type=float, default=512)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method and cell (median kept)")
    ap.add_argument("--out", default=str(RESULTS / "auto.json"))
    args = ap.parse_args()
    os.environ["SPECATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="specattn-auto-")
    model = load_model(args.model, "cuda", "bf16", progress=False)
    tokens = gutenberg_tokens(load_tokenizer(args.model))
    cfg = bench.BenchConfig(bench.parse_methods(args.methods), bench.parse_sizes(args.context, "context"),
                            bench.parse_sizes(args.batch, "batch"),
                            SpeculationParams(args.budget, args.gamma), args.new_tokens, repeats=args.repeats)
    rows = bench.run_matrix(model, tokens, cfg, lambda d, t, what: print(f"[{d}/{t}] {what}", flush=True))
    result = {**environment(), "model": DEFAULT_MODEL, "dtype": "bf16",
              "config": {"methods": cfg.methods, "contexts": cfg.contexts, "batches": cfg.batches,
                         "budget": args.budget, "gamma": args.gamma, "new_tokens": args.new_tokens,
                         "repeats": args.repeats,
                         "sampling": "greedy", "auto": "timed run after one calibrating run of the same shape"},
              "summary": bench.summary(rows), "rows": rows}
    write_json_atomic(args.out, result)
    print(bench.table(rows))
    s = result["summary"]
    print(f"auto_over_best_fixed_min {s.get('auto_over_best_fixed_min', float('nan')):.3f} (target 0.95), "
          f"auto_over_ar_min {s.get('auto_over_ar_min', float('nan')):.3f} (target 0.98)")


if __name__ == "__main__":
    main()
