"""SpecAttn-S results: the perplexity study (from `specattn ppl --json`), the attention-time speedup of draft-guided
sparse verification with our kernel, and the summary fields of the issue.

    python3 benchmarks/specattn_s.py                      # summary + plot from results/ppl_qwen_*.json (CPU)
    python3 benchmarks/specattn_s.py --ppl ... --attention --out $OUT/specattn_s.json      # + GPU attention times

The attention part times one verify step (gamma + 1 = 5 rows) of the verifier's attention shape (Qwen2.5-1.5B:
12 query heads, 2 KV heads, head dim 128) over the KV cache, dense vs a token list of the fraction of keys that
SpecAttn-S kept at p = 0.97 in the study (its union over draft steps is one list per sequence, shared by heads).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402

HEADS, KV_HEADS, DIM, PAGE = 12, 2, 128, 16


def study_summary(study: dict) -> dict:
    """One `specattn ppl` study: SpecAttn-S at p = 0.95, the baselines at the budget they were matched to, and
    the most KV reads SpecAttn-S saves within +10% perplexity (the issue's target point)."""
    runs = {r["name"]: r for r in study["runs"]}
    dense = runs["dense"]["ppl"]

    def increase(name):
        return runs[name]["ppl"] / dense - 1

    ref = runs["specattn-s:p=0.95"]
    ours = [r for r in study["runs"] if r["name"].startswith("specattn-s")]
    within = max((r for r in ours if increase(r["name"]) <= 0.10), key=lambda r: 1 - r["keys_kept_fraction"])
    return {
        "context": study["context"],
        "dense_ppl": dense,
        "kv_reduction_at_p095": 1 - ref["keys_kept_fraction"],
        "kv_reduction_at_p095_sparse_layers": 1 - ref["keys_kept_fraction_sparse_layers"],
        "ppl_increase_at_p095": increase("specattn-s:p=0.95"),
        "quest_ppl_increase_same_budget": increase("quest"),
        "streaming_ppl_increase_same_budget": increase("streaming"),
        "baselines_budget_from": runs["quest"].get("extra", {}).get("budget_from", "specattn-s:p=0.95"),
        "best_within_10pct": {"method": within["name"], "kv_reduction": 1 - within["keys_kept_fraction"],
                              "ppl_increase": increase(within["name"])},
    }


def summary_from_ppl(studies: list[dict]) -> dict:
    """The headline fields come from the longest window; every study is listed by context."""
    def key(study):                          # the text is recorded since `specattn ppl` wrote it (session 6)
        return f"{study['context']} {study['text']}" if "text" in study else str(study["context"])

    by_context = {key(s): study_summary(s) for s in studies}
    main = by_context[key(max(studies, key=lambda s: s["context"]))]
    return {**{k: v for k, v in main.items() if k != "best_within_10pct"},
            "kv_reduction_within_10pct": main["best_within_10pct"],
            "ppl_by_context": by_context,
            "note": "KV reduction over all layers (the first two stay dense); per-query key sets in one window; "
                    "headline fields from the longest window"}


def plot(studies: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for study, color in zip(sorted(studies, key=lambda s: s["context"]),
                            ("tab:blue", "tab:green", "tab:purple", "tab:red", "tab:orange"), strict=False):
        runs = study["runs"]
        dense = next(r for r in runs if r["name"] == "dense")["ppl"]
        ctx = f"{study['context']}" + (f" ({study['text'].removesuffix('.txt')})" if "text" in study else "")
        ours = sorted((r for r in runs if r["name"].startswith("specattn-s")), key=lambda r: r["keys_kept_fraction"])
        ax.plot([1 - r["keys_kept_fraction"] for r in ours], [r["ppl"] / dense - 1 for r in ours], "o-",
                color=color, label=f"SpecAttn-S, {ctx} tokens (p)")
        for r in ours:
            ax.annotate(r["name"].split("=")[1], (1 - r["keys_kept_fraction"], r["ppl"] / dense - 1), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        budget = next(x for x in runs if x["name"] == "quest").get("extra", {}).get("budget_from", "p=0.95")
        for name, marker in (("quest", "s"), ("streaming", "^")):
            r = next(x for x in runs if x["name"] == name)
            ax.plot(1 - r["keys_kept_fraction"], r["ppl"] / dense - 1, marker, color=color, mfc="none",
                    label=f"{name}, {ctx} tokens (budget of {budget.split(':')[-1]})")
    ax.axhline(0.10, color="gray", ls=":", lw=1, label="+10% perplexity")
    ax.axvline(0.85, color="gray", ls="--", lw=1, label="85% fewer KV reads")
    ax.set_xlabel("KV reads saved (fraction, all layers)")
    ax.set_ylabel("perplexity increase over dense")
    ax.set_title("Qwen2.5-Coder-1.5B with keys chosen by 0.5B's attention")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attention_times(keep: float) -> list[dict]:
    from benchmarks.common import graph_ms
    from specattn.kernels import paged_attention
    rows = []
    for batch, ctx in [(1, 2048), (8, 2048), (1, 8192), (8, 8192), (1, 32768)]:
        pages = -(-ctx // PAGE)
        k = torch.randn(batch * pages, PAGE, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        table = torch.randperm(batch * pages, device="cuda").view(batch, pages).int()
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(batch, 5, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
        n = max(5, int(keep * ctx))
        tokens = torch.stack([torch.cat([torch.randperm(ctx - 5, device="cuda")[: n - 5].sort().values,
                                         torch.arange(ctx - 5, ctx, device="cuda")]) for _ in range(batch)])
        sel = tokens[:, None].expand(-1, KV_HEADS, -1).int().contiguous()
        counts = torch.full((batch, KV_HEADS), n, dtype=torch.int32, device="cuda")
        scale = DIM ** -0.5
        dense = graph_ms(lambda: paged_attention.paged_attention(q, k, v, table, lens, scale))
        sparse = graph_ms(lambda: paged_attention.paged_attention(q, k, v, table, lens, scale, selected_pages=sel,
                                                                  selected_counts=counts, token_level=True))
        rows.append({"batch": batch, "context": ctx, "keys_kept": keep, "dense_us": dense * 1e3,
                     "sparse_us": sparse * 1e3, "speedup": dense / sparse})
        print(rows[-1], flush=True)
    return rows


def e2e_cell(batch: int, context: int, config: dict) -> str:
    """A cell's name: batch and context, plus top-p and key steps where they differ from the defaults (0.95, all),
    so runs with other settings add cells instead of overwriting them."""
    name = f"b{batch}_ctx{context}"
    if config.get("keys_p", 0.95) != 0.95:
        name += f"_p{config['keys_p']}"
    if config.get("keys_from_steps", "all") != "all":
        name += f"_keys-{config['keys_from_steps']}"
    return name


def e2e_summary(paths: list[Path]) -> dict:
    """SpecAttn-S vs lossless draft-model speculation, decode tokens/s in the same cell of one `specattn bench`
    run (methods ar, draft-spec, specattn-s); cells of several runs are pooled."""
    by_cell, notes = {}, []
    for path in paths:
        if not path.exists():
            continue
        run = json.loads(path.read_text())
        tok_s = {(r["method"], r["batch"], r["context"]): r["decode_tokens_per_s"] for r in run["rows"]}
        by_cell.update({e2e_cell(b, c, run["config"]): tok_s[("specattn-s", b, c)] / tok_s[("draft-spec", b, c)]
                        for (m, b, c) in tok_s if m == "specattn-s" and ("draft-spec", b, c) in tok_s})
        notes.append(f"{path.name}: {run['device']}, commit {run['commit']}, top-p {run['config']['keys_p']} at "
                     f"page level, keys from {run['config'].get('keys_from_steps', 'all')} draft steps, gamma "
                     f"{run['config']['gamma']}, {run['config']['new_tokens']} new tokens, median of "
                     f"{run['config'].get('repeats', 1)} timed run(s)")
    if not by_cell:
        return {"e2e_over_plain_spec": None, "e2e_note": "not measured: no specattn bench JSON found"}
    best = max(by_cell, key=by_cell.get)
    return {"e2e_over_plain_spec": by_cell[best], "e2e_over_plain_spec_cell": best,
            "e2e_over_plain_spec_by_cell": by_cell,
            "e2e_note": "; ".join(notes) + "; greedy; decode tokens/s of specattn-s / draft-spec in the same cell"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ppl", action="append", help="JSON from `specattn ppl --json` (repeat for several windows; "
                    "default: results/ppl_qwen_*.json)")
    ap.add_argument("--attention", action="store_true", help="also time verify attention on the GPU")
    ap.add_argument("--out", default=str(RESULTS / "specattn_s.json"))
    ap.add_argument("--e2e", action="append", help="JSON from `specattn bench --methods ar,draft-spec,specattn-s` "
                    "on the GPU (repeat; default: results/specattn_s_e2e*.json)")
    args = ap.parse_args()
    ppl_paths = args.ppl or sorted(RESULTS.glob("ppl_qwen_*.json"))
    studies = [json.loads(Path(p).read_text()) for p in ppl_paths]
    summary = summary_from_ppl(studies)
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    attention = previous.get("attention_p097", [])
    if args.attention:
        short = min(studies, key=lambda s: s["context"])
        keep = next(r for r in short["runs"] if r["name"] == "specattn-s:p=0.97")["keys_kept_fraction_sparse_layers"]
        attention = attention_times(keep)
    if attention:
        summary["attn_speedup_p097"] = next(r["speedup"] for r in attention if (r["batch"], r["context"]) == (1, 2048))
    summary.update(e2e_summary([Path(p) for p in args.e2e or sorted(RESULTS.glob("specattn_s_e2e*.json"))]))
    out = {**environment(), "ppl_studies": studies, "attention_p097": attention, "summary": summary}
    write_json_atomic(out_path, out)
    plot(studies, out_path.with_name("specattn_s_ppl.png"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
