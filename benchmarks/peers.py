"""Peers on the same GPU, model and run: transformers' `generate` (eager; static cache + torch.compile; assisted
generation drafting with the model's own first layers) on our exact weights against our AR, and
our best lossless self-speculation against our AR at batch 32, 8K. Writes benchmarks/results/peers.json (or --out).

gpt-fast runs in its own script, benchmarks/gptfast_peer.py (its code is fetched here and carried to the GPU machine,
never committed); that run's ratio is copied into this file's summary.ar_over_gptfast.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment, gutenberg_tokens  # noqa: E402
from specattn.api import SpeculationParams  # noqa: E402
from specattn.cache import PagedKVCache  # noqa: E402
from specattn.decoding.ar import GenerationParams, generate_ar  # noqa: E402
from specattn.evaluation import bench  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.loader import DEFAULT_MODEL, hf_state_dict, load_model, load_tokenizer  # noqa: E402


def to_transformers(model):
    """A transformers LlamaForCausalLM holding our model's weights (same device and dtype)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.cfg
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                      rope_theta=c.rope_theta, max_position_embeddings=c.max_positions,
                      tie_word_embeddings=c.tie_embeddings)
    w = model.embed.weight
    with torch.device(w.device):
        hf = LlamaForCausalLM(cfg).to(w.dtype).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


# transformers' ways to run the same weights: plain `generate` (eager), its static cache with the forward under
# torch.compile (its recommended fast path), and assisted generation drafting with the model's own first layers
# (`assistant_early_exit`, LayerSkip-style self-speculation; batch 1 only).
HF_PEERS = {
    "eager": ("transformers generate (eager)", {}),
    "static-compile": ("transformers generate (static cache + torch.compile)", {"cache_implementation": "static"}),
    "assisted": ("transformers assisted generation (self-draft: early exit)", {}),
}


def graph_safe(compiled):
    """A forward compiled with CUDA graphs returns logits that the next replay overwrites, while `generate` still
    holds them (the first H200 run failed so): mark each call as a new step and hand out a copy of the logits."""
    def forward(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*args, **kwargs)
        out.logits = out.logits.clone()
        return out
    return forward


def hf_generate_tok_s(hf, prompts, new_tokens, extra: dict | None = None,
                      warm_up: bool = False) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts, device=hf.device)
    run = lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,  # noqa: E731
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **(extra or {}))
    if warm_up:
        run()                   # compiles and captures outside the timing, as ours is warmed up
    out, secs = bench.timed(hf.device, run)
    return len(prompts) * new_tokens / secs, out[:, ids.shape[1]:].tolist()


def hf_peer_row(peer: str, hf, prompts, new_tokens, ours: float, ours_tokens) -> dict:
    """One transformers way against ours on the same prompts; a way that fails here is a row with its error."""
    name, extra = HF_PEERS[peer]
    row = {"peer": name, "batch": len(prompts), "prompt_tokens": len(prompts[0]), "new_tokens": new_tokens,
           "ours_tok_s": ours}
    if peer == "assisted":
        if len(prompts) > 1:
            return {**row, "skipped": "transformers' assisted generation takes batch 1 only"}
        extra = {"assistant_early_exit": max(1, hf.config.num_hidden_layers // 4)}
    if peer == "static-compile":     # compiled for this peer only: the others run the plain forward
        if not hasattr(hf, "_compiled_forward"):
            hf._compiled_forward = graph_safe(torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True))
        hf.forward = hf._compiled_forward
    try:
        theirs, hf_tokens = hf_generate_tok_s(hf, prompts, new_tokens, extra, warm_up=peer == "static-compile")
    except Exception as e:       # a peer's failure is a result to record, not a reason to lose the run
        return {**row, "failed": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        hf.__dict__.pop("forward", None)
    same = sum(a[:16] == b[:16] for a, b in zip(ours_tokens, hf_tokens, strict=True))
    return {**row, "peer_tok_s": theirs, "ours_over_peer": ours / theirs, "sequences_same_first_16_tokens": same}


def ours_tok_s(model, prompts, new_tokens) -> tuple[float, list[list[int]]]:
    cache = PagedKVCache(model.cfg, len(prompts), len(prompts[0]) + new_tokens, dtype=model.embed.weight.dtype,
                         device=model.embed.weight.device)
    params = GenerationParams(max_new_tokens=new_tokens)
    runner = generate_ar(model, cache, prompts, GenerationParams(max_new_tokens=8)).runner   # compile + capture
    res, secs = bench.timed(cache.device, lambda: generate_ar(model, cache, prompts, params, runner))
    return sum(len(t) for t in res.tokens) / secs, res.tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.environ.get("SPECATTN_DEFAULT_GGUF", DEFAULT_MODEL))
    ap.add_argument("--out", default=str(RESULTS / "peers.json"))
    ap.add_argument("--cells", default="1x512,1x4096,16x4096")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--spec-cell", default="32x8000", help="batch x context of the speculation cell, or none")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peers", default="eager,static-compile,assisted", help=f"of {', '.join(HF_PEERS)}")
    args = ap.parse_args()
    peers = args.peers.split(",")
    if unknown := [p for p in peers if p not in HF_PEERS]:
        ap.error(f"unknown peers {unknown}; choose from {', '.join(HF_PEERS)}")
    dtype = "bf16" if args.device == "cuda" else "fp32"
    model = load_model(args.model, args.device, dtype, progress=False)
    text = gutenberg_tokens(load_tokenizer(args.model))
    hf = to_transformers(model)
    rows = []
    for cell in args.cells.split(","):
        batch, ctx = (int(x) for x in cell.split("x"))
        prompts = bench.prompts_from(text, batch, ctx)
        ours, ours_tokens = ours_tok_s(model, prompts, args.new_tokens)
        for peer in peers:
            rows.append(hf_peer_row(peer, hf, prompts, args.new_tokens, ours, ours_tokens))
            print(rows[-1], flush=True)
            # compiling a peer can take minutes: rows so far survive a time limit
            write_json_atomic(args.out, {**environment(), "partial": True, "rows": rows})
    del hf
    spec_rows = []
    if args.spec_cell != "none":
        batch, ctx = (int(x) for x in args.spec_cell.split("x"))
        cfg = bench.BenchConfig(["ar", "magicdec", "specattn-y"], [ctx], [batch], SpeculationParams(512, 4),
                                args.new_tokens)
        spec_rows = bench.run_matrix(model, text, cfg)
    for r in spec_rows:
        print({k: r.get(k) for k in ("method", "batch", "context", "decode_tokens_per_s", "speedup_vs_ar",
                                     "same_tokens_as_ar")}, flush=True)
    measured = [r for r in spec_rows if "skipped" not in r and r["method"] != "ar"]
    best = max(measured, key=lambda r: r["speedup_vs_ar"], default=None)
    def by_cell(peer: str) -> dict:
        return {f"b{r['batch']}x{r['prompt_tokens']}": r["ours_over_peer"] for r in rows
                if r["peer"] == HF_PEERS[peer][0] and "ours_over_peer" in r}

    summary = {
        "ar_over_hf_generate": min(by_cell("eager").values(), default=None),
        "ar_over_hf_generate_by_cell": by_cell("eager"),
        "ar_over_hf_static_compile_by_cell": by_cell("static-compile"),
        "ar_over_hf_assisted_by_cell": by_cell("assisted"),
        "ar_over_gptfast": None,
        "best_over_ar_b32_8k": best["speedup_vs_ar"] if best else None,
        "best_method_b32_8k": best["method"] if best else None,
        "note": "tokens/s include prefill for the generate comparisons (128 new tokens); the speculation cell is "
                "decode tokens/s; ar_over_gptfast: see benchmarks/gptfast_peer.py",
    }
    write_json_atomic(args.out, {**environment(), "rows": rows, "spec_rows": spec_rows, "summary": summary})
    print(summary)


if __name__ == "__main__":
    main()
