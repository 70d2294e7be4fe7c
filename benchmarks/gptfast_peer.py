"""gpt-fast and our AR decoding on the same weights, GPU and run (issue 7's `summary.ar_over_gptfast`).

gpt-fast (github.com/pytorch-labs/gpt-fast) stays out of this repository: `bash scripts/fetch_gptfast.sh` copies
its model.py, generate.py and tokenizer.py from a fetched snapshot into .peers/gpt-fast (ignored by git), which a
device call then carries. On the GPU machine, after `source scripts/gpu_setup.sh part01`:

  python3 benchmarks/gptfast_peer.py --gpt-fast .peers/gpt-fast --out $OUT/gptfast.json

Both run the real default model's weights (ours exported to gpt-fast's layout, as its HF converter does), bf16,
128 new tokens after a prompt of the cell's length, the same prompt in every row of the batch (gpt-fast's
benchmark does that), prefill included. gpt-fast runs as its `generate.py --compile` does: the decode step under
torch.compile(mode="reduce-overhead", fullgraph=True), prefill eager, its own generate loop; it decodes with
temperature 1e-5 (its sampler has no greedy path), which picks the argmax. Tokens/s are counted the same way for
both (batch x new tokens / wall time; gpt-fast's own printout counts one sequence), median of the timed runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment, gutenberg_tokens  # noqa: E402
from specattn.cache import PagedKVCache  # noqa: E402
from specattn.decoding.ar import GenerationParams, generate_ar  # noqa: E402
from specattn.decoding.runner import StepRunner  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.loader import DEFAULT_MODEL, hf_state_dict, load_model, load_tokenizer  # noqa: E402

CELLS = [(1, 512), (1, 4096), (16, 4096)]
NEW_TOKENS = 128


def gptfast_weights(model) -> dict[str, torch.Tensor]:
    """Our weights under gpt-fast's names; q and k rows reordered for its interleaved rotary (its HF converter's
    permutation), q/k/v fused."""
    hf, cfg = hf_state_dict(model), model.cfg

    def interleave(w, heads):
        return w.reshape(heads, 2, cfg.head_dim // 2, cfg.hidden_size).transpose(1, 2).reshape(-1, cfg.hidden_size)

    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
           "output.weight": hf["lm_head.weight"]}
    for i in range(cfg.num_layers):
        p, g = f"model.layers.{i}.", f"layers.{i}."
        q = interleave(hf[p + "self_attn.q_proj.weight"], cfg.num_heads)
        k = interleave(hf[p + "self_attn.k_proj.weight"], cfg.num_kv_heads)
        out[g + "attention.wqkv.weight"] = torch.cat([q, k, hf[p + "self_attn.v_proj.weight"]])
        out[g + "attention.wo.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[g + "feed_forward.w1.weight"] = hf[p + "mlp.gate_proj.weight"]
        out[g + "feed_forward.w3.weight"] = hf[p + "mlp.up_proj.weight"]
        out[g + "feed_forward.w2.weight"] = hf[p + "mlp.down_proj.weight"]
        out[g + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[g + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def build_gptfast(folder: str, model):
    sys.path.insert(0, os.path.abspath(folder))
    gf_model = importlib.import_module("model")
    gf_generate = importlib.import_module("generate")
    c = model.cfg
    args = gf_model.ModelArgs(block_size=c.max_positions, vocab_size=c.vocab_size, n_layer=c.num_layers,
                              n_head=c.num_heads, dim=c.hidden_size, intermediate_size=c.intermediate_size,
                              n_local_heads=c.num_kv_heads, rope_base=c.rope_theta, norm_eps=c.rms_norm_eps)
    with torch.device("cuda"):
        peer = gf_model.Transformer(args).to(torch.bfloat16)
    peer.load_state_dict(gptfast_weights(model))
    peer.eval()
    gf_generate.decode_one_token = torch.compile(gf_generate.decode_one_token, mode="reduce-overhead",
                                                 fullgraph=True)
    return gf_generate, peer


def timed(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats + 1):                    # the first run compiles / captures
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpt-fast", required=True, help="folder holding gpt-fast's model.py, generate.py, tokenizer.py")
    ap.add_argument("--model", default=os.environ.get("SPECATTN_DEFAULT_GGUF", DEFAULT_MODEL))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "gptfast.json"))
    args = ap.parse_args()
    model = load_model(args.model, "cuda", "bf16", progress=False)
    text = gutenberg_tokens(load_tokenizer(args.model))
    ours = {}
    # Ours first: importing gpt-fast's generate.py changes inductor settings (coordinate descent tuning) for
    # everything compiled after it.
    for batch, prompt_len in CELLS:
        cache = PagedKVCache(model.cfg, batch, prompt_len + NEW_TOKENS, dtype=torch.bfloat16, device="cuda")
        runner, prompts = StepRunner(model, cache), [text[:prompt_len]] * batch
        ours[batch, prompt_len] = timed(lambda: generate_ar(model, cache, prompts, GenerationParams(NEW_TOKENS),
                                                            runner=runner), args.repeats)

    gf_generate, peer = build_gptfast(args.gpt_fast, model)
    rows = []
    for batch, prompt_len in CELLS:
        ids = torch.tensor(text[:prompt_len], device="cuda", dtype=torch.int)
        peer_s, (peer_out, _) = timed(lambda: gf_generate.generate(
            peer, ids, NEW_TOKENS, batch_size=batch, interactive=False, draft_model=None, temperature=1e-5,
            top_k=None), args.repeats)
        ours_s, result = ours[batch, prompt_len]
        peer_tokens = peer_out[0, prompt_len:].tolist()
        same = sum(a == b for a, b in zip(peer_tokens, result.tokens[0], strict=False))
        row = {"batch": batch, "prompt_tokens": prompt_len, "new_tokens": NEW_TOKENS,
               "gptfast_tokens_per_s": batch * NEW_TOKENS / peer_s, "ours_tokens_per_s": batch * NEW_TOKENS / ours_s,
               "ours_over_gptfast": peer_s / ours_s, "first_sequence_positions_equal": same}
        rows.append(row)
        print(row, flush=True)
    result = {**environment(), "model": DEFAULT_MODEL, "dtype": "bf16", "repeats": args.repeats,
              "gptfast": "pytorch-labs/gpt-fast 32971d3 (model.py, generate.py; decode compiled reduce-overhead)",
              "rows": rows, "summary": {"ar_over_gptfast": min(r["ours_over_gptfast"] for r in rows),
                                        "ar_over_gptfast_by_cell": {f"b{r['batch']}x{r['prompt_tokens']}":
                                                                    r["ours_over_gptfast"] for r in rows}}}
    write_json_atomic(args.out, result)
    print(f"ar_over_gptfast {result['summary']['ar_over_gptfast']:.3f} (min over cells; target 1.0)")


if __name__ == "__main__":
    main()
