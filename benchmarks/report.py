"""Render README tables from benchmarks/results/*.json, so every number in the README comes from a file.

Usage: python benchmarks/report.py NAME   (prints Markdown; NAME: a key of TABLES, e.g. ar, kernels, selfspec,
auto, tp, specattn_s_e2e, specattn_s_keys_last, ppl_qwen_8192, peers, gptfast, targets)
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
    # gpt-fast was measured on an H100 only: a ratio against it means something only for an H100 run.
    same_gpu = "H100" in data["device"]
    e2e = (["| batch | prompt tokens | tok/s (128 new, prefill included) | gpt-fast, same H100 | ours / gpt-fast |",
            "|---:|---:|---:|---:|---:|"] if same_gpu else
           ["| batch | prompt tokens | tok/s (128 new, prefill included) |", "|---:|---:|---:|"])
    step = ["| model | batch | context | tok/s | GB/s moved | fraction of copy bandwidth |",
            "|---|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        if "prompt_tokens" in r:
            ref = GPT_FAST.get((r["batch"], r["prompt_tokens"]))
            vs = f" {ref} | {r['tokens_per_s'] / ref:.2f} |" if same_gpu else ""
            e2e.append(f"| {r['batch']} | {r['prompt_tokens']} | {r['tokens_per_s']:.0f} |{vs}")
        elif "skipped" in r:
            step.append(f"| {r['model']} | {r['batch']} | {r['context']} | skipped: {r['skipped']} | | |")
        else:
            step.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['tokens_per_s']:.0f} | "
                        f"{r['achieved_gbs']:.0f} | {r['bandwidth_fraction']:.2f} |")
    checks = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in data["checks"].items())
    return "\n".join([head, *e2e, "", *step, "", f"Checks in the same run: {checks}."])


def _sparse_floors(summary: dict, suffix: str) -> str:
    """What the sparse kernel's bytes allow at best: a copy of as many bytes and, since 68c4785, a plain read."""
    floors = [f"a {what} of as many bytes: {summary[key + suffix]:.4f}"
              for what, key in (("copy", "copy_of_sparse_bytes_fraction"), ("read", "read_of_sparse_bytes_fraction"))
              if key + suffix in summary]
    return f" ({'; '.join(floors)})" if floors else ""


def _two_places(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def kernel_tables(data: dict) -> str:
    head = (f"Device: {data['device']}, torch {data['torch']}, triton {data['triton']}, commit {data['commit']}; "
            f"copy bandwidth {data['copy_bandwidth_gbs']:.0f} GB/s. Llama-3-8B attention shape (8 KV heads x 4, "
            f"head_dim 128, pages of 16), bf16. Source: [`benchmarks/results/kernels.json`]"
            f"(benchmarks/results/kernels.json).\n")
    sparse = [r for r in data["rows"] if r["kernel"] == "sparse_attention_10pct"]
    floor = all("copy_of_selected_bytes_fraction" in r for r in sparse)     # since 415f43e
    read_floor = any("read_of_selected_bytes_fraction" in r for r in sparse)    # since 68c4785, one-row cells
    dense = {(r["batch"], r["context"], r["q_len"]): r for r in data["rows"] if r["kernel"] == "verify_attention"}
    per_step = all("step_page_mass_overhead" in r for r in dense.values())      # since 2026-12-06
    layers = next(iter(dense.values())).get("step_layers")
    page64 = {(r["batch"], r["context"], r["q_len"]): r for r in data["rows"]
              if r["kernel"] == "verify_attention_page64"}        # since 9737dba
    attn = ["| batch | context | new rows | dense µs | fraction of copy bw | + page mass µs | overhead | "
            "+ 64-key block mass | overhead |"
            + (f" overhead in a {layers}-layer step, mass finished once: page / block |" if per_step else "")
            + (" the same, exact mass of 64-token pages |" if page64 else "")
            + " 10% pages µs | speedup | fraction on selected bytes |"
            + (" a copy of as many bytes |" if floor else "") + (" a read of them |" if read_floor else ""),
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if floor else "")
            + ("---:|" if read_floor else "")
            + ("---:|" if per_step else "") + ("---:|" if page64 else "")]
    for r in sparse:
        key = (r["batch"], r["context"], r["q_len"])
        d = dense[key]
        attn.append(f"| {r['batch']} | {r['context']} | {r['q_len']} | {d['us']:.1f} | "
                    f"{d['bandwidth_fraction']:.2f} | {d['us_with_page_mass']:.1f} | "
                    f"{d['page_mass_overhead']:.0%} | {d.get('us_with_block64_mass', float('nan')):.1f} | "
                    f"{d.get('block64_mass_overhead', float('nan')):.0%} |"
                    + (f" {d['step_page_mass_overhead']:.1%} / {d['step_block64_mass_overhead']:.1%} |"
                       if per_step else "")
                    + (f" {page64[key]['step_page_mass_overhead']:.1%} |" if page64 else "")
                    + f" {r['us']:.1f} | {r['speedup_vs_dense']:.1f}x | {r['bandwidth_fraction_on_selected']:.2f} |"
                    + (f" {r['copy_of_selected_bytes_fraction']:.2f} |" if floor else "")
                    + (f" {_two_places(r.get('read_of_selected_bytes_fraction'))} |" if read_floor else ""))
    topp = ["| rows x keys | search | ours µs | torch.sort + cumsum µs | speedup | max set-size difference |",
            "|---|---|---:|---:|---:|---:|"]
    for r in data["rows"]:
        if r["kernel"] == "topp_threshold" and "error" in r:
            topp.append(f"| {r['n']} keys | {r['search']} | failed to build: {r['error'][:80]} | | | |")
        elif r["kernel"] == "topp_threshold":     # runs before the interpolating search had only bisection
            topp.append(f"| {r['rows']} x {r['n']} | {r.get('search', 'bisect')} | {r['us']:.1f} | "
                        f"{r['sort_us']:.1f} | {r['speedup_vs_sort']:.1f}x | {r['max_set_size_diff']} |")
    q = next(r for r in data["rows"] if r["kernel"] == "quest_page_scores")
    summary = ", ".join(f"`{k}` = {v:.3g}" for k, v in data["summary"].items())
    quest = f"Quest page scores, batch 1, 32K context (2,048 pages): {q['us']:.1f} µs."
    tops = [r for r in data["rows"] if r["kernel"] == "quest_top_pages"]
    if tops:        # since 97e11ac
        quest += " Their top 10% of pages as ascending lists, sorting-free vs topk + sort: " + ", ".join(
            f"batch {r['batch']} {r['us']:.1f} vs {r['sort_us']:.1f} µs ({r['speedup_vs_sort']:.1f}x, "
            f"{'the same lists' if r['same_lists'] else 'OTHER LISTS'})" for r in tops) + "."
    return "\n".join([head, *attn, "", *topp, "", quest, "", f"Summary: {summary}."])


def dense_drafting_layers(config: dict) -> list[int]:
    """A self-speculative run's dense drafting layers: files from before `dense_layers` was recorded kept layer 0."""
    return config.get("dense_layers", [0])


def drafting_layers(config: dict) -> str:
    """How a run's drafts used the cache, in words."""
    dense = dense_drafting_layers(config)
    return "every layer drafting sparsely" if not dense else f"layer{'s' * (len(dense) > 1)} " \
        f"{', '.join(map(str, dense))} dense"


def selfspec_tables(data: dict) -> str:
    """Decode tokens/s per cell: AR and each method at its best budget, with acceptance; plus the 8B step costs."""
    head = (f"Device: {data['device']}, torch {data['torch']}, triton {data['triton']}, commit {data['commit']}. "
            f"Real default model, bf16, {data['config']['new_tokens']} new tokens, gamma {data['config']['gamma']}, "
            f"budgets {data['config']['budgets_tokens']} tokens, {drafting_layers(data['config'])}. "
            f"Source: [`benchmarks/results/selfspec.json`](benchmarks/results/selfspec.json).\n")
    cells = {}
    for r in data["rows"]:
        cells.setdefault((r["greedy"], r["batch"], r["context"]), []).append(r)
    methods = [m for m in dict.fromkeys(r["method"] for r in data["rows"]) if m != "ar"]
    lines = ["| decoding | batch | context | AR tok/s | " + " | ".join(methods) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(methods)]
    for (greedy, batch, ctx), rows in sorted(cells.items(), key=lambda kv: (not kv[0][0], kv[0][1], kv[0][2])):
        ar = next(r for r in rows if r["method"] == "ar")
        cols = []
        for m in methods:
            cand = [r for r in rows if r["method"] == m]
            if not cand:
                cols.append("")
                continue
            b = max(cand, key=lambda r: r["decode_tokens_per_s"])
            cols.append(f"{b['decode_speedup_vs_ar']:.2f}x @{b['budget']} ({b['mean_accepted_len']:.2f})")
        kind = "greedy" if greedy else "T 0.6, top-p 0.95"
        lines.append(f"| {kind} | {batch} | {ctx} | {ar['decode_tokens_per_s']:.0f} | " + " | ".join(cols) + " |")
    s = data["summary"]
    costs = ["| 8B shape, 32K | decode ms | verify (5 rows) ms | + page mass | + 64-key block mass | draft ms, "
             "budget 512 / 1024 / 2048 | selection ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in data.get("step_costs_llama3_8b_shape", []):
        costs.append(f"| batch {c['batch']} | {c['decode_ms']:.2f} | {c['verify_ms']:.2f} | "
                     f"{c['verify_page_mass_ms']:.2f} | {c.get('verify_block64_mass_ms', float('nan')):.2f} | "
                     f"{c['draft_ms_budget_512']:.2f} / {c['draft_ms_budget_1024']:.2f} / "
                     f"{c['draft_ms_budget_2048']:.2f} | {c['select_ms']:.2f} |")
    summary = (f"Summary (fixed batch): `specattn_y_over_ar` = {s['specattn_y_over_ar']} at "
               f"{s['specattn_y_over_ar_cell']}, `specattn_y_over_best_baseline` = "
               f"{s['specattn_y_over_best_baseline']}; steady state (continuous batching): "
               f"{s['specattn_y_over_ar_steady']} over AR, {s['specattn_y_over_best_baseline_steady']} over the best "
               f"baseline; greedy runs identical to AR: {s['greedy_runs_identical_to_ar']} of {s['greedy_runs']}.")
    costs = costs if len(costs) > 2 else []
    return "\n".join([head, *lines, "", *costs, "", summary])


def _speedup_axes():
    """A figure for decode speedup over AR against batch (log2 axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    return fig, ax


def _save_speedup_plot(fig, ax, ylabel: str, title: str, path: Path) -> None:
    """The line at 1x (AR), labels and legend; writes the PNG."""
    import matplotlib.pyplot as plt
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def selfspec_plot(data: dict, path: Path) -> None:
    """Decode speedup over AR vs batch, one line per method (best budget), greedy, longest context."""
    rows = [r for r in data["rows"] if r["greedy"]]
    ctx = max(r["context"] for r in rows)
    fig, ax = _speedup_axes()
    for m in [m for m in dict.fromkeys(r["method"] for r in rows) if m != "ar"]:
        pts = {}
        for r in rows:
            if r["method"] == m and r["context"] == ctx:
                pts[r["batch"]] = max(pts.get(r["batch"], 0), r["decode_speedup_vs_ar"])
        if pts:
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], "o-", label=m)
    _save_speedup_plot(fig, ax, "decode speedup over AR (best budget)",
                       f"SmolLM2-135M, {ctx}-token prompts, {data['device'].replace('NVIDIA ', '')}, greedy", path)


def auto_plot(data: dict, path: Path) -> None:
    """Decode speedup over AR vs batch for each method of the auto matrix, one line style per context."""
    rows = [r for r in data["rows"] if "skipped" not in r and r["method"] != "ar"]
    fig, ax = _speedup_axes()
    styles = ["--", "-", ":", "-."]
    colors = {}
    for i, ctx in enumerate(sorted({r["context"] for r in rows})):
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = {r["batch"]: r["speedup_vs_ar"] for r in rows if r["method"] == m and r["context"] == ctx}
            xs = sorted(pts)
            line, = ax.plot(xs, [pts[x] for x in xs], styles[i % len(styles)], marker="o", color=colors.get(m),
                            label=f"{m}, {ctx} tokens")
            colors[m] = line.get_color()
    batches = sorted({r["batch"] for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    _save_speedup_plot(fig, ax, "decode speedup over AR",
                       f"SmolLM2-135M, {data['device'].replace('NVIDIA ', '')}, greedy, budget "
                       f"{data['config']['budget']:g}, gamma {data['config']['gamma']}", path)


def auto_tables(data: dict) -> str:
    head = (f"Device: {data['device']}, torch {data['torch']}, triton {data['triton']}, commit {data['commit']}; "
            f"{data['config']['new_tokens']} new tokens, greedy, budget {data['config']['budget']:g}, gamma "
            f"{data['config']['gamma']}, median of {data['config']['repeats']} timed runs. "
            "Source: [`benchmarks/results/auto.json`](benchmarks/results/auto.json).\n")
    cells: dict[tuple[int, int], dict[str, dict]] = {}
    for r in data["rows"]:
        if "skipped" not in r:
            cells.setdefault((r["batch"], r["context"]), {})[r["method"]] = r
    methods = [m for m in data["config"]["methods"] if m != "auto"]
    lines = ["| batch | context | " + " | ".join(f"{m} tok/s" for m in methods)
             + " | auto tok/s | auto / best fixed | auto / ar | auto's tokens from speculation | auto = ar tokens |",
             "|---:|---:|" + "---:|" * (len(methods) + 4) + "---|"]
    for (batch, context), c in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        auto = c["auto"]
        best = max(c[m]["decode_tokens_per_s"] for m in methods)
        lines.append(f"| {batch} | {context} | " + " | ".join(f"{c[m]['decode_tokens_per_s']:.0f}" for m in methods)
                     + f" | {auto['decode_tokens_per_s']:.0f} | {auto['decode_tokens_per_s'] / best:.3f} | "
                     f"{auto['speedup_vs_ar']:.3f} | {100 * auto['auto_speculative_share']:.0f}% | "
                     f"{'yes' if auto['same_tokens_as_ar'] else 'no'} |")
    s = data["summary"]
    tail = (f"auto_over_best_fixed_min = {s['auto_over_best_fixed_min']:.3f} (target 0.95), "
            f"auto_over_ar_min = {s['auto_over_ar_min']:.3f} (target 0.98).")
    return "\n".join([head, *lines, "", tail])


def tp_tables(data: dict) -> str:
    """Tensor-parallel decode steps: one GPU vs two, per model, batch and context."""
    copy = ", ".join(f"{n} GPU{'s' if int(n) > 1 else ''} run: {v:.0f} GB/s"
                     for n, v in data["copy_gbs_per_gpu"].items())
    head = (f"Device: {data['device']} (x2, NVLink), torch {data['torch']}, NCCL {data['nccl']}, commit "
            f"{data['commit']}; copy bandwidth per GPU ({copy}). Random weights, bf16, CUDA graphs. "
            "Source: [`benchmarks/results/tp.json`](benchmarks/results/tp.json).\n")
    lines = ["| model | GPUs | batch | context | step ms | tok/s | GB read per GPU per step | fraction of copy bw "
             "| all-reduce share | step ms: NCCL / one-shot all-reduce | SpecAttn-Y draft step ms "
             "| verify (5 rows) ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(data["rows"], key=lambda r: (r["model"], r["batch"], r["context"], r["tp"])):
        cell = f"| {r['model']} | {r['tp']} | {r['batch']} | {r['context']} |"
        if "skipped" in r:
            lines.append(f"{cell} skipped: {r['skipped']} | | | | | | | |")
            continue
        share = f"{r['all_reduce_share']:.1%}" if "all_reduce_share" in r else ""
        path = r.get("all_reduce", "nccl")       # which path step_ms took (runs before 84f2e7d: one-shot)
        both = {"nccl": r.get("step_ms_nccl"), "one-shot": r.get("step_ms_one_shot"), path: r["step_ms"]}
        ab = (f"{both['nccl']:.2f} / {both['one-shot']:.2f}" if r["tp"] > 1 and None not in both.values() else "")
        spec = (f"{r['draft_step_ms']:.2f} | {r['verify_ms']:.2f}" if "draft_step_ms" in r else " | ")
        lines.append(f"{cell} {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | {r['bytes_per_gpu'] / 1e9:.1f} | "
                     f"{r['bandwidth_fraction']:.2f} | {share} | {ab} | {spec} |")
    s = data["summary"]
    tail = (f"`tp2_ar_bandwidth_fraction` = {s['tp2_ar_bandwidth_fraction']:.3f} (70B shape, minimum over its cells; "
            f"target 0.75), `tp2_over_tp1_8b` = {s['tp2_over_tp1_8b']:.3f} (8B shape, minimum over its cells: "
            + ", ".join(f"{k} {v:.2f}" for k, v in s["tp2_over_tp1_8b_by_cell"].items()) + "; target 1.6).")
    return "\n".join([head, *lines, "", tail])


def _speculation_cells(ar: dict, spec: dict, ours: dict) -> str:
    """AR tok/s | draft-spec (vs AR) | specattn-s (vs AR) | specattn-s / draft-spec | tokens per verify: the cells
    both SpecAttn-S tables share, from one cell's three `specattn bench` rows."""
    tok = {k: r["decode_tokens_per_s"] for k, r in (("ar", ar), ("spec", spec), ("ours", ours))}
    return (f"{tok['ar']:,.0f} | {tok['spec']:,.0f} ({tok['spec'] / tok['ar']:.2f}x) | "
            f"{tok['ours']:,.0f} ({tok['ours'] / tok['ar']:.2f}x) | {tok['ours'] / tok['spec']:.2f} | "
            f"{spec['mean_accepted_len']:.2f} / {ours['mean_accepted_len']:.2f}")


def keys_last_tables(runs: list[dict]) -> str:
    """SpecAttn-S with keys from the last draft step: each run's cells, every ratio within its own run."""
    lines = ["| top-p | context | AR tok/s | draft-spec (vs AR) | specattn-s (vs AR) | specattn-s / draft-spec | "
             "tokens per verify | verifier keys read (sparse layers) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        cfg = run["config"]
        label = f"{cfg['keys_p']:.2f}" + (f", median of {cfg['repeats']}" if cfg.get("repeats", 1) > 1 else "")
        by = {(r["method"], r["context"]): r for r in run["rows"]}
        for ctx in cfg["contexts"]:
            ours = by[("specattn-s", ctx)]
            lines.append(f"| {label} | {ctx} | {_speculation_cells(by[('ar', ctx)], by[('draft-spec', ctx)], ours)} | "
                         f"{ours['verifier_keys_read_fraction_sparse_layers']:.1%} |")
    return "\n".join(lines)


def specattn_s_e2e_tables(run: dict) -> str:
    """SpecAttn-S end to end on the real pair: one row per batch of one `specattn bench` run."""
    lines = ["| batch | AR tok/s | draft-spec tok/s (vs AR) | specattn-s tok/s (vs AR) | specattn-s / draft-spec | "
             "tokens per verify (draft-spec / specattn-s) | verifier KV MB per token (draft-spec / specattn-s) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["method"], r["batch"]): r for r in run["rows"]}
    for batch in run["config"]["batches"]:
        spec, ours = by[("draft-spec", batch)], by[("specattn-s", batch)]
        lines.append(f"| {batch} | {_speculation_cells(by[('ar', batch)], spec, ours)} | "
                     f"{spec['verify_kv_bytes_per_token'] / 1e6:.1f} / {ours['verify_kv_bytes_per_token'] / 1e6:.1f} |")
    return "\n".join(lines)


def ppl_tables(study: dict) -> str:
    """A `specattn ppl` study of the pair: dense, SpecAttn-S per p (below 1), then the baselines at the budget of
    the SpecAttn-S run whose share of keys they were given."""
    runs = {r["name"]: r for r in study["runs"]}
    dense = runs["dense"]["ppl"]
    p_of = lambda r: float(r["name"].split("=")[1])  # noqa: E731   ("specattn-s:p=0.9" -> 0.9)
    ours = sorted((r for n, r in runs.items() if n.startswith("specattn-s:p=") and p_of(r) < 1), key=p_of,
                  reverse=True)

    def row(label: str, r: dict) -> str:
        vs = "" if r is runs["dense"] else f"{r['ppl'] / dense - 1:+.1%}"
        return (f"| {label} | {r['ppl']:.3f} | {vs} | {1 - r['keys_kept_fraction']:.1%} | "
                f"{1 - r['keys_kept_fraction_sparse_layers']:.1%} |")

    lines = ["| method | perplexity | vs dense | KV reads saved (all layers) | (sparse layers) |",
             "|---|---:|---:|---:|---:|", f"| dense | {dense:.3f} | | 0% | 0% |"]
    lines += [row(f"SpecAttn-S p = {p_of(r):.2f}", r) for r in ours]
    for name, label in (("quest", "Quest"), ("streaming", "StreamingLLM")):
        if name in runs:
            ref = min(ours, key=lambda r: abs(r["keys_kept_fraction"] - runs[name]["keys_kept_fraction"]))
            lines.append(row(f"{label}, same budget as p = {p_of(ref):.2f}", runs[name]))
    return "\n".join(lines)


def peers_tables(data: dict) -> str:
    """Ours against transformers' eager `generate` (the rows peers.py measured for that peer)."""
    lines = ["| batch | prompt tokens | ours tok/s | transformers generate tok/s | ours / transformers |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['prompt_tokens']} | {r['ours_tok_s']:,.0f} | {r['peer_tok_s']:.1f} | "
              f"{r['ours_over_peer']:.0f}x |" for r in data["rows"]
              if r["peer"] == "transformers generate (eager)" and "peer_tok_s" in r]
    return "\n".join(lines)


def gptfast_tables(data: dict) -> str:
    lines = ["| batch | prompt tokens | gpt-fast tok/s | ours tok/s | ours / gpt-fast |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['prompt_tokens']} | {r['gptfast_tokens_per_s']:.0f} | "
              f"{r['ours_tokens_per_s']:.0f} | {r['ours_over_gptfast']:.2f} |" for r in data["rows"]]
    return "\n".join(lines)


def selfspec_runs_tables(runs: list[dict], measured_steady_only: bool = False) -> str:
    """Self-speculative runs of one model, one row per method and budget of each run: fixed-batch and steady
    speedups, tokens per verify, the slowest sequence's rounds against the mean, per-round costs.
    measured_steady_only: a steady figure only where the loop measured it over its full-batch rounds
    (full_batch_rounds); the earlier estimate overstates runs with tail plans, whose tail rounds cost less."""
    lines = ["| decoding | batch | γ | new tokens | layer 0 drafts | AR tok/s | method @ budget | x AR, fixed batch | "
             "x AR, steady | tokens per verify | rounds: slowest / mean | draft / verify ms a round | "
             "sequences with AR's tokens | source |",
             "|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for run in runs:
        ar = next(r for r in run["rows"] if r["method"] == "ar")
        dense_by_default = 0 in dense_drafting_layers(run["config"])
        for r in (r for r in run["rows"] if r["method"] != "ar"):
            by_seq, n = r["rounds_by_sequence"], r["rounds"]
            mode = "greedy" if r["greedy"] else "T 0.6, top-p 0.95"
            same = f"{r['sequences_identical_to_ar']} of {r['batch']}" if r["greedy"] else "–"
            layer0 = "dense" if dense_by_default and not r["method"].endswith("+nodense") else "sparse"
            steady = ("–" if measured_steady_only and "full_batch_rounds" not in r
                      else f"{r['steady_speedup_vs_ar']:.2f}x")
            lines.append(f"| {mode} | {r['batch']} | {r['gamma']} | {run['config']['new_tokens']} | {layer0} | "
                         f"{ar['decode_tokens_per_s']:.0f} | {r['method'].removesuffix('+nodense')} "
                         f"@{r['budget']} | {r['decode_speedup_vs_ar']:.2f}x | {steady} | "
                         f"{r['mean_accepted_len']:.2f} | {max(by_seq)} / {sum(by_seq) / len(by_seq):.1f} | "
                         f"{1e3 * r['draft_s'] / n:.1f} / {1e3 * r['verify_s'] / n:.1f} | {same} | "
                         f"[{run['_name']}](benchmarks/results/{run['_name']}.json) |")
    return "\n".join(lines)


def targets_table(runs: list[dict]) -> str:
    """The issues' numeric targets beside the latest measurement of each, every value read from its results file
    (fractions to 4 places, so that rounding never shows a target met that is not)."""
    by = {run["_name"]: run for run in runs}
    k, sel, qwen, peers, auto = (by[n]["summary"] for n in ("kernels", "selfspec", QWEN_TARGET_RUN, "peers", "auto"))
    qwen_rows = by[QWEN_TARGET_RUN]["rows"]
    if all("full_batch_rounds" in r for r in qwen_rows if r["method"] != "ar"):
        qwen_steady = (f" (steady state {qwen['specattn_y_over_ar_steady']:.2f}x)",
                       f" (steady state {qwen['specattn_y_over_best_baseline_steady']:.3f})")
    else:                 # the earlier estimate overstates runs with tail plans (selfspec_runs_tables)
        qwen_steady = ("", "")
    gap = by["gptfast"]["summary"]
    rows = [
        ("3", "AR, fraction of copy bandwidth (8B-shaped, batch 1, 8K)", "≥ 0.85",
         f"{by['ar']['summary']['ar_bandwidth_fraction']:.4f}", "ar"),
        ("3", "our AR over gpt-fast, same weights and run (lowest cell)", "≥ 1.0", f"{gap['ar_over_gptfast']:.2f}",
         "gptfast"),
        ("4", "verify attention, fraction of copy bandwidth (batch 1, 32K, 5 rows)", "≥ 0.8",
         f"{k['verify_attn_bandwidth_fraction']:.4f}", "kernels"),
        ("4", "score by-product overhead: per page / per 64-key block"
         + (" (a verify step's layers, mass finished once a step)" if "score_byproduct_overhead_one_layer" in k
            else ""), "≤ 10%",
         f"{k['score_byproduct_overhead']:.1%} / {k['score_byproduct_overhead_block64']:.1%}"
         + (f" (one layer with its own finishing launch: {k['score_byproduct_overhead_one_layer']:.1%} / "
            f"{k['score_byproduct_overhead_block64_one_layer']:.1%})" if "score_byproduct_overhead_one_layer" in k
            else ""), "kernels"),
    ]
    if "score_byproduct_overhead_page64" in k:
        rows.append(("4", "score by-product overhead, exact mass of 64-token pages (a verify step's layers)", "≤ 10%",
                     f"{k['score_byproduct_overhead_page64']:.1%}", "kernels"))
    rows += [
        ("4", "sparse attention at 10% of pages vs dense, 32K", "≥ 5x", f"{k['sparse_attn_speedup_10pct_32k']:.2f}x",
         "kernels"),
        ("4", "sparse attention, fraction of copy bandwidth on its bytes (batch 1, 32K, 13 MB)", "≥ 0.8",
         f"{k['sparse_attn_bandwidth_fraction']:.4f}" + _sparse_floors(k, ""), "kernels"),
    ]
    if "sparse_attn_bandwidth_fraction_b8_32k" in k:
        rows.append(("4", "the same at batch 8, 32K (107 MB): logical / physical page lists", "≥ 0.8",
                     f"{k['sparse_attn_bandwidth_fraction_b8_32k']:.4f} / "
                     f"{k['sparse_attn_bandwidth_fraction_b8_32k_physical_lists']:.4f}"
                     + _sparse_floors(k, "_b8_32k"), "kernels"))
    rows += [
        ("4", "top-p vs torch.sort + cumsum, 32 x 32K", "≥ 10x", f"{k['topp_speedup_vs_sort_32k']:.2f}x", "kernels"),
        ("5", "SpecAttn-Y over AR, default model (best cell)", "≥ 3.0x",
         f"{sel['specattn_y_over_ar']:.2f}x (steady state {sel['specattn_y_over_ar_steady']:.2f}x)", "selfspec"),
        ("5", "SpecAttn-Y over the best baseline, default model", "≥ 1.29",
         f"{sel['specattn_y_over_best_baseline']:.3f} (steady state {sel['specattn_y_over_best_baseline_steady']:.3f})",
         "selfspec"),
        ("5", "SpecAttn-Y over AR, Qwen2.5-Coder-1.5B, batch 64 × 32K, 384 tokens", "≥ 3.0x",
         f"{qwen['specattn_y_over_ar']:.2f}x{qwen_steady[0]}", QWEN_TARGET_RUN),
        ("5", "SpecAttn-Y over the best baseline, same 1.5B cell", "≥ 1.29",
         f"{qwen['specattn_y_over_best_baseline']:.3f}{qwen_steady[1]}", QWEN_TARGET_RUN),
        ("7", "best lossless method over AR, batch 32 × 8K", "≥ 2x", f"{peers['best_over_ar_b32_8k']:.2f}x", "peers"),
        ("7", "`--method auto` over the best fixed method (lowest cell)", "≥ 0.95",
         f"{auto['auto_over_best_fixed_min']:.3f}", "auto"),
    ]
    lines = ["| issue | metric | target | latest | source (commit, GPU) |", "|---|---|---|---|---|"]
    for issue, metric, target, value, name in rows:
        gpu = next((g for g in ("H100", "H200") if g in by[name]["device"]), by[name]["device"])
        lines.append(f"| {issue} | {metric} | {target} | {value} | [`{name}.json`](benchmarks/results/{name}.json) "
                     f"({by[name]['commit'][:7]}, {gpu}) |")
    return "\n".join(lines)


QWEN_TARGET_RUN = "selfspec_qwen_b64_384_levers_h100"      # the 1.5B's row of the targets table

# name -> its README tables (from results/<name>.json, or the files POOLED names)
TABLES = {"ar": ar_tables, "kernels": kernel_tables, "selfspec": selfspec_tables, "auto": auto_tables,
          "tp": tp_tables, "specattn_s_e2e": specattn_s_e2e_tables, "specattn_s_keys_last": keys_last_tables,
          "ppl_qwen_8192": ppl_tables, "peers": peers_tables, "gptfast": gptfast_tables,
          "selfspec_qwen": selfspec_runs_tables, "targets": targets_table,
          "selfspec_qwen_h100": lambda runs: selfspec_runs_tables(runs, measured_steady_only=True),
          "selfspec_qwen_levers_h100": lambda runs: selfspec_runs_tables(runs, measured_steady_only=True)}
# tables drawn from several results files
POOLED = {"targets": ["ar", "gptfast", "kernels", "selfspec", QWEN_TARGET_RUN, "peers", "auto"],
          "selfspec_qwen_h100": ["selfspec_qwen_b64_384_steady_h100", "selfspec_qwen_b64_384_h100",
                                 "selfspec_qwen_b32_384_h100", "selfspec_qwen_b64_384_sampled_h100"],
          "selfspec_qwen_levers_h100": [QWEN_TARGET_RUN, "selfspec_qwen_b64_384_sampled_levers_h100"],
          "specattn_s_keys_last": ["specattn_s_e2e_last_p0.95", "specattn_s_e2e_last_p0.9",
                                   "specattn_s_e2e_last_p0.9_r3"],
          "selfspec_qwen": ["selfspec_qwen_b32", "selfspec_qwen_b64", "selfspec_qwen_b64_g6",
                            "selfspec_qwen_b64_sampled", "selfspec_qwen_b64_nodense", "selfspec_qwen_b64_384",
                            "selfspec_qwen_b64_384_run2", "selfspec_qwen_b64_384_sampled"]}


def load(which: str):
    """The data TABLES[which] renders: results/<which>.json, or the list of POOLED[which]'s files."""
    if which in POOLED:
        return [{**json.loads((RESULTS / f"{name}.json").read_text()), "_name": name} for name in POOLED[which]]
    return json.loads((RESULTS / f"{which}.json").read_text())


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "ar"
    data = load(which)
    if which == "selfspec":
        selfspec_plot(data, RESULTS / "selfspec_speedup.png")
    if which == "auto":
        auto_plot(data, RESULTS / "speedup_context_batch.png")
    print(TABLES[which](data))


if __name__ == "__main__":
    main()
