"""Peers on the same GPU, model and run: transformers' `generate` (eager) on our exact weights against our AR, and
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


def hf_generate_tok_s(hf, prompts, new_tokens) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts, device=hf.device)
    out, secs = bench.timed(hf.device, lambda: hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0))
    return len(prompts) * new_tokens / secs, out[:, ids.shape[1]:].tolist()


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
    ap.add_argument("--spec-cell", default="32x8000")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dtype = "bf16" if args.device == "cuda" else "fp32"
    model = load_model(args.model, args.device, dtype, progress=False)
    text = gutenberg_tokens(load_tokenizer(args.model))
    hf = to_transformers(model)
    rows = []
    for cell in args.cells.split(","):
        batch, ctx = (int(x) for x in cell.split("x"))
        prompts = bench.prompts_from(text, batch, ctx)
        ours, ours_tokens = ours_tok_s(model, prompts, args.new_tokens)
        theirs, hf_tokens = hf_generate_tok_s(hf, prompts, args.new_tokens)
        same = sum(a[:16] == b[:16] for a, b in zip(ours_tokens, hf_tokens, strict=True))
        rows.append({"peer": "transformers generate (eager)", "batch": batch, "prompt_tokens": ctx,
                     "new_tokens": args.new_tokens, "ours_tok_s": ours, "peer_tok_s": theirs,
                     "ours_over_peer": ours / theirs, "sequences_same_first_16_tokens": same})
        print(rows[-1], flush=True)
    del hf
    batch, ctx = (int(x) for x in args.spec_cell.split("x"))
    cfg = bench.BenchConfig(["ar", "magicdec", "specattn-y"], [ctx], [batch], SpeculationParams(512, 4, (0,)),
                            args.new_tokens)
    spec_rows = bench.run_matrix(model, text, cfg)
    for r in spec_rows:
        print({k: r.get(k) for k in ("method", "batch", "context", "decode_tokens_per_s", "speedup_vs_ar",
                                     "same_tokens_as_ar")}, flush=True)
    measured = [r for r in spec_rows if "skipped" not in r and r["method"] != "ar"]
    best = max(measured, key=lambda r: r["speedup_vs_ar"], default=None)
    summary = {
        "ar_over_hf_generate": min(r["ours_over_peer"] for r in rows),
        "ar_over_hf_generate_by_cell": {f"b{r['batch']}x{r['prompt_tokens']}": r["ours_over_peer"] for r in rows},
        "ar_over_gptfast": None,
        "best_over_ar_b32_8k": best["speedup_vs_ar"] if best else None,
        "best_method_b32_8k": best["method"] if best else None,
        "note": "tokens/s include prefill for the generate comparison (128 new tokens); the speculation cell is decode "
                "tokens/s; gpt-fast could not run here (see the module docstring)",
    }
    write_json_atomic(args.out, {**environment(), "rows": rows, "spec_rows": spec_rows, "summary": summary})
    print(summary)


if __name__ == "__main__":
    main()
