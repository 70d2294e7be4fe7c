"""SpecAttn-S results: the perplexity study (from `specattn ppl --json`), the attention-time speedup of draft-guided
sparse verification with our kernel, and the summary fields of the issue.

    python3 benchmarks/specattn_s.py --ppl benchmarks/results/ppl_qwen_2048.json          # summary + plot (CPU)
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


def summary_from_ppl(study: dict) -> dict:
    runs = {r["name"]: r for r in study["runs"]}
    dense = runs["dense"]["ppl"]

    def increase(name):
        return runs[name]["ppl"] / dense - 1

    ref = runs["specattn-s:p=0.95"]
    return {
        "kv_reduction_at_p095": 1 - ref["keys_kept_fraction"],
        "kv_reduction_at_p095_sparse_layers": 1 - ref["keys_kept_fraction_sparse_layers"],
        "ppl_increase_at_p095": increase("specattn-s:p=0.95"),
        "quest_ppl_increase_same_budget": increase("quest"),
        "streaming_ppl_increase_same_budget": increase("streaming"),
        "dense_ppl": dense,
        "note": "KV reduction over all layers (the first two stay dense); per-query key sets in one window",
    }


def plot(study: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = study["runs"]
    dense = next(r for r in runs if r["name"] == "dense")["ppl"]
    ours = sorted((r for r in runs if r["name"].startswith("specattn-s")), key=lambda r: r["keys_kept_fraction"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([1 - r["keys_kept_fraction"] for r in ours], [r["ppl"] for r in ours], "o-", label="SpecAttn-S (p)")
    for r in ours:
        ax.annotate(r["name"].split("=")[1], (1 - r["keys_kept_fraction"], r["ppl"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    for name, marker in (("quest", "s"), ("streaming", "^")):
        r = next(x for x in runs if x["name"] == name)
        ax.plot(1 - r["keys_kept_fraction"], r["ppl"], marker, label=f"{name} (same budget as p=0.95)")
    ax.axhline(dense, color="gray", ls="--", lw=1, label="dense")
    ax.set_xlabel("KV reads saved (fraction, all layers)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Qwen2.5-Coder-1.5B guided by 0.5B, {study['context']}-token window")
    ax.legend(fontsize=7)
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


def e2e_summary(path: Path) -> dict:
    """SpecAttn-S vs lossless draft-model speculation, decode tokens/s in the same cell of one `specattn bench`
    run (methods ar, draft-spec, specattn-s)."""
    if not path.exists():
        return {"e2e_over_plain_spec": None, "e2e_note": f"not measured: {path.name} is missing"}
    run = json.loads(path.read_text())
    tok_s = {(r["method"], r["batch"], r["context"]): r["decode_tokens_per_s"] for r in run["rows"]}
    by_cell = {f"b{b}_ctx{c}": tok_s[("specattn-s", b, c)] / tok_s[("draft-spec", b, c)]
               for (m, b, c) in tok_s if m == "specattn-s" and ("draft-spec", b, c) in tok_s}
    best = max(by_cell, key=by_cell.get)
    return {"e2e_over_plain_spec": by_cell[best], "e2e_over_plain_spec_cell": best,
            "e2e_over_plain_spec_by_cell": by_cell,
            "e2e_note": (f"{path.name}: {run['device']}, commit {run['commit']}, top-p {run['config']['keys_p']} at "
                         f"page level, gamma {run['config']['gamma']}, {run['config']['new_tokens']} new tokens, "
                         "greedy; decode tokens/s of specattn-s / draft-spec in the same cell")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ppl", default=str(RESULTS / "ppl_qwen_2048.json"), help="JSON from `specattn ppl --json`")
    ap.add_argument("--attention", action="store_true", help="also time verify attention on the GPU")
    ap.add_argument("--out", default=str(RESULTS / "specattn_s.json"))
    ap.add_argument("--e2e", default=str(RESULTS / "specattn_s_e2e.json"),
                    help="JSON from `specattn bench --methods ar,draft-spec,specattn-s` on the GPU")
    args = ap.parse_args()
    study = json.loads(Path(args.ppl).read_text())
    summary = summary_from_ppl(study)
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    attention = previous.get("attention_p097", [])
    if args.attention:
        keep = next(r for r in study["runs"] if r["name"] == "specattn-s:p=0.97")["keys_kept_fraction_sparse_layers"]
        attention = attention_times(keep)
    if attention:
        summary["attn_speedup_p097"] = next(r["speedup"] for r in attention if (r["batch"], r["context"]) == (1, 2048))
    summary.update(e2e_summary(Path(args.e2e)))
    out = {**environment(), "ppl_study": study, "attention_p097": attention, "summary": summary}
    write_json_atomic(out_path, out)
    plot(study, out_path.with_name("specattn_s_ppl.png"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
