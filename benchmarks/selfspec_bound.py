"""How far self-speculation can get over AR on this GPU for a model shape, from graph-timed step costs alone.

A round of γ sparse draft steps and one verify step yields at most γ + 1 tokens a sequence, where AR spends γ + 1
steps. So over AR, in steady state and with no host time or tail:
    bound = tokens a round x AR step / (γ x draft step + verify step)
with tokens a round = γ + 1 (every draft accepted) or a measured mean accepted length. Random weights (the cost of a
step does not depend on them). Writes benchmarks/results/selfspec_bound.json (or the path given); prints a table.
    python benchmarks/selfspec_bound.py [OUT] [--cells 8b:1x32768,8b:8x32768,qwen1.5b:64x32000] [--gammas 4,6]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, SHAPES, environment  # noqa: E402
from benchmarks.selfspec import step_costs  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402

# Tokens a round measured at γ 4 on the real model of each shape (SpecAttn-Y/blk64, greedy: the 1.5B in
# selfspec_qwen_b64_384_steady_h100.json, the default model in selfspec_tail_b32.json): the bound at the acceptance
# seen, beside the one at full acceptance. The 8B shape has no real model here.
MEASURED_TOKENS_A_ROUND = {("qwen1.5b", 4): 4.71, ("smol", 4): 4.62}
BUDGETS = {"smol": 512}          # draft budget in tokens by shape, as its real-model runs use (else 1024)


def bound(tokens: float, gamma: int, ar_ms: float, draft_ms: float, verify_ms: float) -> float:
    return tokens * ar_ms / (gamma * draft_ms + verify_ms)


def cell_row(shape: str, batch: int, ctx: int, gamma: int) -> dict:
    budget = BUDGETS.get(shape, 1024)
    c = step_costs(ctx, batch, gamma, [budget], SHAPES[shape])
    ar, draft = c["decode_ms"], c[f"draft_ms_budget_{budget}"]
    verify = c["verify_block64_mass_ms"]          # SpecAttn-Y/blk64's verify, the by-product included
    row = {"shape": shape, "batch": batch, "context": ctx, "gamma": gamma, "draft_budget": budget,
           "ar_step_ms": ar, "draft_step_ms": draft, "verify_step_ms": verify, "verify_step_plain_ms": c["verify_ms"],
           "bound_every_draft_accepted": bound(gamma + 1, gamma, ar, draft, verify)}
    measured = MEASURED_TOKENS_A_ROUND.get((shape, gamma))
    if measured:
        row["measured_tokens_a_round"] = measured
        row["bound_at_measured_acceptance"] = bound(measured, gamma, ar, draft, verify)
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=str(RESULTS / "selfspec_bound.json"))
    ap.add_argument("--cells", default="8b:1x32768,8b:8x32768,8b:12x32768,qwen1.5b:64x32000,smol:32x8000")
    ap.add_argument("--gammas", default="4,6")
    args = ap.parse_args()
    cells = []
    for cell in args.cells.split(","):
        shape, _, dims = cell.partition(":")
        if shape not in SHAPES or not re.fullmatch(r"\d+x\d+", dims):
            ap.error(f"bad cell {cell!r}: want SHAPE:BATCHxCONTEXT with SHAPE one of {', '.join(SHAPES)}")
        cells.append((shape, *(int(x) for x in dims.split("x"))))
    rows = []
    for shape, batch, ctx in cells:
        for gamma in (int(g) for g in args.gammas.split(",")):
            rows.append(cell_row(shape, batch, ctx, gamma))
            torch.cuda.empty_cache()
            write_json_atomic(args.out, {**environment(), "rows": rows})
    print("\n| shape | batch x context | γ | AR ms | draft ms | verify ms | bound, all accepted | "
          "bound at the measured tokens a round |")
    for r in rows:
        at_measured = (f"{r['bound_at_measured_acceptance']:.2f}x ({r['measured_tokens_a_round']})"
                       if "measured_tokens_a_round" in r else "–")
        print(f"| {r['shape']} | {r['batch']} x {r['context']} | {r['gamma']} | {r['ar_step_ms']:.2f} | "
              f"{r['draft_step_ms']:.2f} | {r['verify_step_ms']:.2f} | {r['bound_every_draft_accepted']:.2f}x | "
              f"{at_measured} |")


if __name__ == "__main__":
    main()
