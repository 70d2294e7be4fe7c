"""A projection, not a measurement: a past fixed-batch run's rounds replayed with measured per-step times.

Usage: python benchmarks/tail_projection.py [RUN.json] [TAIL_COST.json] [AR_STEP_US] [out.json]
(defaults: results/selfspec_qwen_b64_384.json, results/tail_cost_qwen.json, 21624 us from
results/profile_qwen_ar_b64.json, results/tail_projection_qwen.json)

For each round of the run, how many sequences were still generating follows from its `rounds_by_sequence`. A round
costs gamma draft steps and a verify step at that count, interpolated between tail_cost.py's measured counts, once
as the tail ran before session 29 (verify planned for the whole batch, every draft at full cost) and once with tail
plans. Runs on the CPU; no GPU.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402


def step_times(tail: dict, prefix: str) -> dict[int, float]:
    return {r["active"]: r["us"] for r in tail["rows"] if r["step"].startswith(prefix)}


def at(points: dict[int, float], active: int) -> float:
    xs = sorted(points)
    return float(np.interp(active, xs, [points[x] for x in xs]))


def project(row: dict, tail: dict, method: str, ar_step_us: float, new_tokens: int) -> dict:
    whole = step_times(tail, f"{method} verify, whole-batch plan")
    planned = {**{max(whole): whole[max(whole)]}, **step_times(tail, f"{method} verify, plan")}
    draft = step_times(tail, "draft step")
    rounds, batch, gamma = row["rounds_by_sequence"], row["batch"], row["gamma"]
    before = after = 0.0
    for r in range(1, max(rounds) + 1):
        active = sum(n >= r for n in rounds)
        before += gamma * draft[max(draft)] + at(whole, active)
        after += gamma * at(draft, active) + at(planned, active)
    ar = new_tokens * ar_step_us
    return {"method": row["method"], "batch": batch, "rounds": max(rounds), "us_before": before, "us_after": after,
            "over_ar_before": ar / before, "over_ar_after": ar / after}


def main() -> None:
    args = sys.argv[1:]
    run = json.loads(Path(args[0] if args else RESULTS / "selfspec_qwen_b64_384.json").read_text())
    tail = json.loads(Path(args[1] if len(args) > 1 else RESULTS / "tail_cost_qwen.json").read_text())
    ar_step_us = float(args[2]) if len(args) > 2 else 21624.0
    out = args[3] if len(args) > 3 else RESULTS / "tail_projection_qwen.json"
    new_tokens = run["config"]["new_tokens"]
    rows = []
    for row in run["rows"]:
        if "rounds_by_sequence" not in row:
            continue
        method = row["method"].split("+")[0]
        rows.append(project(row, tail, method, ar_step_us, new_tokens))
        r = rows[-1]
        print(f"{r['method']:28s} rounds {r['rounds']:4d}  x AR {r['over_ar_before']:.3f} -> {r['over_ar_after']:.3f}")
    write_json_atomic(out, {"kind": "projection, not a measurement", "run": run.get("commit"),
                            "run_device": run.get("device"), "step_times": tail.get("commit"),
                            "step_times_device": tail.get("device"), "ar_step_us": ar_step_us,
                            "new_tokens": new_tokens, "rows": rows})


if __name__ == "__main__":
    main()
