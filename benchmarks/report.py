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


def kernel_tables(data: dict) -> str:
    head = (f"Device: {data['device']}, torch {data['torch']}, triton {data['triton']}, commit {data['commit']}; "
            f"copy bandwidth {data['copy_bandwidth_gbs']:.0f} GB/s. Llama-3-8B attention shape (8 KV heads x 4, "
            f"head_dim 128, pages of 16), bf16. Source: [`benchmarks/results/kernels.json`]"
            f"(benchmarks/results/kernels.json).\n")
    attn = ["| batch | context | new rows | dense µs | fraction of copy bw | + page mass µs | overhead | "
            "10% pages µs | speedup | fraction on selected bytes |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    dense = {(r["batch"], r["context"], r["q_len"]): r for r in data["rows"] if r["kernel"] == "verify_attention"}
    for r in data["rows"]:
        if r["kernel"] == "sparse_attention_10pct":
            d = dense[(r["batch"], r["context"], r["q_len"])]
            attn.append(f"| {r['batch']} | {r['context']} | {r['q_len']} | {d['us']:.1f} | "
                        f"{d['bandwidth_fraction']:.2f} | {d['us_with_page_mass']:.1f} | "
                        f"{d['page_mass_overhead']:.0%} | {r['us']:.1f} | "
                        f"{r['speedup_vs_dense']:.1f}x | {r['bandwidth_fraction_on_selected']:.2f} |")
    topp = ["| rows x keys | ours µs | torch.sort + cumsum µs | speedup | max set-size difference |",
            "|---|---:|---:|---:|---:|"]
    for r in data["rows"]:
        if r["kernel"] == "topp_threshold":
            topp.append(f"| {r['rows']} x {r['n']} | {r['us']:.1f} | {r['sort_us']:.1f} | "
                        f"{r['speedup_vs_sort']:.1f}x | {r['max_set_size_diff']} |")
    q = next(r for r in data["rows"] if r["kernel"] == "quest_page_scores")
    summary = ", ".join(f"`{k}` = {v:.3g}" for k, v in data["summary"].items())
    return "\n".join([head, *attn, "", *topp, "",
                      f"Quest page scores, batch 1, 32K context (2,048 pages): {q['us']:.1f} µs.", "",
                      f"Summary: {summary}."])


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "ar"
    data = json.loads((RESULTS / f"{which}.json").read_text())
    print({"ar": ar_tables, "kernels": kernel_tables}[which](data))


if __name__ == "__main__":
    main()
