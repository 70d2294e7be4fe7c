"""Render README tables from benchmarks/results/*.json, so every number in the README comes from a file.

Usage: python benchmarks/report.py ar   (prints Markdown)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

GPT_FAST = {(1, 512): 725, (1, 4096): 580, (16, 4096): 2386}   # measured by the project on this H100 (issue 3)


def ar_tables(data: dict) -> str:
    head = (f"Device: {data['device']}, torch {data['torch']}, triton {data['triton']}, commit {data['commit']}; "
            f"copy bandwidth {data['copy_bandwidth_gbs']:.0f} GB/s (read + write). "
            f"Source: [`benchmarks/results/ar.json`](benchmarks/results/ar.json).\n")
    e2e = ["| batch | prompt tokens | tok/s (128 new, prefill included) | gpt-fast, same H100 | ours / gpt-fast |",
           "|---:|---:|---:|---:|---:|"]
    step = ["| model | batch | context | tok/s | GB/s moved | fraction of copy bandwidth |",
            "|---|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        if "prompt_tokens" in r:
            ref = GPT_FAST.get((r["batch"], r["prompt_tokens"]))
            e2e.append(f"| {r['batch']} | {r['prompt_tokens']} | {r['tokens_per_s']:.0f} | {ref} | "
                       f"{r['tokens_per_s'] / ref:.2f} |")
        elif "skipped" in r:
            step.append(f"| {r['model']} | {r['batch']} | {r['context']} | skipped: {r['skipped']} | | |")
        else:
            step.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['tokens_per_s']:.0f} | "
                        f"{r['achieved_gbs']:.0f} | {r['bandwidth_fraction']:.2f} |")
    checks = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in data["checks"].items())
    return "\n".join([head, *e2e, "", *step, "", f"Checks in the same run: {checks}."])


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "ar"
    data = json.loads((RESULTS / f"{which}.json").read_text())
    print({"ar": ar_tables}[which](data))


if __name__ == "__main__":
    main()
