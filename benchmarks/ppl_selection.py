"""How good is the draft's attention at choosing the verifier's keys? Perplexity of the verifier (one window of
real text, one prefill) with per-query key sets from: the draft's head-averaged attention (SpecAttn-S's top-p,
as `specattn ppl`), the same united with attention sinks and a recent window, the verifier's own head-averaged
attention (an oracle no real method has: the ceiling for any head-shared selection), and Quest at the budget
of SpecAttn-S p = 0.95.

Usage: python benchmarks/ppl_selection.py --draft D --target T --text F --layer-map map.json --context 2048,8192
[--json out.json]. The first two verifier layers stay dense for every method, as in the study.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment  # noqa: E402
from specattn.alignment import LayerMap, head_averaged_attention  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.evaluation.sparse_ppl import _nll, masked_nll, quest_mask_fn, topp_key_mask  # noqa: E402
from specattn.loader import load_model, load_tokenizer  # noqa: E402

DENSE_LAYERS = (0, 1)


def sinks_and_window(t: int, sinks: int, window: int, device) -> torch.Tensor:
    q = torch.arange(t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    return ((k < sinks) | (k > q - window)) & (k <= q)


def evaluate(target, ids: list[int], masks: dict, eval_from: int, dense_nll: float, n_layers: int) -> dict:
    nll, kept, visible = masked_nll(target, ids, masks, eval_from)
    kept_all = (kept / visible * len(masks) + len(DENSE_LAYERS)) / n_layers
    return {"ppl": math.exp(nll), "ppl_increase": math.exp(nll - dense_nll) - 1,
            "keys_kept_sparse_layers": kept / visible, "kv_reduction": 1 - kept_all}


def print_row(row: dict) -> None:
    print(f"  {row['method']:44s} ppl {row['ppl']:8.3f} (+{row['ppl_increase']:.1%})  KV reduction "
          f"{row['kv_reduction']:.3f}", flush=True)


def study(draft, target, ids: list[int], layer_map: list[int]) -> list[dict]:
    t, dev = len(ids), target.embed.weight.device
    eval_from = t // 4
    n_layers = target.cfg.num_layers
    sparse = [j for j in range(n_layers) if j not in DENSE_LAYERS]
    dense_nll = _nll(target, ids, None, eval_from)
    rows = [{"method": "dense", "ppl": math.exp(dense_nll), "ppl_increase": 0.0, "keys_kept_sparse_layers": 1.0,
             "kv_reduction": 0.0}]
    draft_attn = head_averaged_attention(draft, ids)
    own_attn = head_averaged_attention(target, ids)
    local = sinks_and_window(t, 4, 64, dev)
    variants = [(f"specattn-s p={p}", lambda j, p=p: topp_key_mask(draft_attn[layer_map[j]], p))
                for p in (0.8, 0.9, 0.95, 0.97)]
    variants += [(f"specattn-s p={p} + 4 sinks + 64 recent", lambda j, p=p: topp_key_mask(
        draft_attn[layer_map[j]], p) | local) for p in (0.8, 0.9, 0.95)]
    variants += [(f"oracle (verifier's own attention) p={p}", lambda j, p=p: topp_key_mask(own_attn[j], p))
                 for p in (0.9, 0.95)]
    for name, make in variants:
        row = {"method": name, **evaluate(target, ids, {j: make(j)[None, None] for j in sparse}, eval_from,
                                          dense_nll, n_layers)}
        rows.append(row)
        print_row(row)
    for p in (0.9, 0.95):
        budget = next(r for r in rows if r["method"] == f"specattn-s p={p}")["keys_kept_sparse_layers"]
        row = {"method": f"quest (budget of specattn-s p={p})",
               **evaluate(target, ids, dict.fromkeys(sparse, quest_mask_fn(budget)), eval_from, dense_nll, n_layers)}
        rows.append(row)
        print_row(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draft", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--layer-map", required=True)
    ap.add_argument("--context", default="2048")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(args.target)
    draft = load_model(args.draft, dev, torch.float32, "reference", progress=False)
    target = load_model(args.target, dev, torch.float32, "reference", progress=False)
    layer_map = LayerMap.load(args.layer_map, target.cfg.num_layers, draft.cfg.num_layers).draft_layer
    ids = tok(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    out = {**environment(), "dtype": "fp32", "dense_layers": list(DENSE_LAYERS), "layer_map": layer_map,
           "text": Path(args.text).name, "contexts": {}}
    with torch.no_grad():
        for context in (int(c) for c in args.context.split(",")):
            print(f"context {context}:", flush=True)
            out["contexts"][str(context)] = study(draft, target, ids[:context], layer_map)
            if dev == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        write_json_atomic(args.json, out)


if __name__ == "__main__":
    main()
