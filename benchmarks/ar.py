"""Dense AR decode throughput on the GPU: a Llama-3-8B-shaped random model and the real default model.

Writes benchmarks/results/ar.json (or --out). Also runs GPU correctness checks first (kernel vs reference in
bf16, CUDA-graph decoding vs eager decoding) and records them, so every number comes with its check.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import specattn.model  # noqa: E402
from benchmarks.common import (  # noqa: E402
    LLAMA3_8B,
    RESULTS,
    context_cache,
    copy_bandwidth_gbs,
    environment,
    gemv_projections,
    gutenberg_tokens,
    median_ms,
    random_model,
    weight_bytes_per_step,
)
from specattn.cache import PagedKVCache  # noqa: E402
from specattn.decoding.ar import GenerationParams, generate_ar  # noqa: E402
from specattn.decoding.runner import StepRunner  # noqa: E402
from specattn.evaluation.perplexity import perplexity  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import paged_attention, pdl, reference  # noqa: E402
from specattn.loader import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402


def check_kernel() -> dict:
    """Triton paged attention vs the PyTorch reference in bf16 on fresh random inputs."""
    worst = 0.0
    for batch, q_len, heads, kv_heads, dim, ctx in [(1, 1, 32, 8, 128, 32768), (4, 5, 9, 3, 64, 3001),
                                                    (8, 16, 32, 8, 128, 2048), (3, 1, 8, 1, 64, 777)]:
        ps = 16
        pages_per_seq = -(-ctx // ps)
        kp = torch.randn(batch * pages_per_seq, ps, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
        vp = torch.randn_like(kp)
        table = torch.randperm(batch * pages_per_seq, device="cuda").view(batch, -1).int()
        lens = torch.randint(ctx // 2, ctx + 1, (batch,), device="cuda", dtype=torch.int32)
        q = torch.randn(batch, q_len, heads, dim, device="cuda", dtype=torch.bfloat16)
        ref = reference.paged_attention(q.float(), kp.float(), vp.float(), table, lens, dim ** -0.5)
        out = paged_attention.paged_attention(q, kp, vp, table, lens, dim ** -0.5)
        worst = max(worst, ((out.float() - ref).norm() / ref.norm()).item())
    return {"paged_attention_bf16_rel_err_max": worst}


def decode_step_row(model, name: str, batch: int, ctx: int, copy_gbs: float) -> dict:
    """Time one graph-captured dense decode step at `ctx` tokens of context per sequence."""
    cfg = model.cfg
    dtype = model.embed.weight.dtype
    kv_bytes = batch * (ctx + 1) * cfg.kv_bytes_per_token * torch.finfo(dtype).bits // 8
    free = torch.cuda.mem_get_info()[0]
    if kv_bytes > 0.9 * free:
        return {"model": name, "batch": batch, "context": ctx, "skipped": f"KV cache {kv_bytes / 2**30:.1f} GiB "
                f"does not fit in {free / 2**30:.1f} GiB free"}
    cache = context_cache(cfg, batch, ctx, dtype=dtype)
    runner = StepRunner(model, cache)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda")
    ms = median_ms(lambda: runner(tokens))
    moved = weight_bytes_per_step(model, batch) + kv_bytes
    row = {"model": name, "batch": batch, "context": ctx, "step_ms": ms, "tokens_per_s": batch / ms * 1e3,
           "bytes_per_step": moved, "achieved_gbs": moved / ms / 1e6, "bandwidth_fraction": moved / ms / 1e6 / copy_gbs}
    return row


def decode_step_rows(model, name: str, contexts: tuple[int, ...], copy_gbs: float,
                     batches: tuple[int, ...] = (1, 8, 32)) -> list[dict]:
    rows = []
    for ctx in contexts:
        for batch in batches:
            rows.append(decode_step_row(model, name, batch, ctx, copy_gbs))
            torch.cuda.empty_cache()
            print(rows[-1], flush=True)
    return rows


def e2e_row(model, prompts: list[list[int]], new_tokens: int, reps: int = 3) -> dict:
    """Tokens/s of a whole generate call (prefill included), graph captured beforehand, median of reps."""
    cache = PagedKVCache(model.cfg, len(prompts), len(prompts[0]) + new_tokens, dtype=model.embed.weight.dtype,
                         device="cuda")
    runner = StepRunner(model, cache)
    params = GenerationParams(max_new_tokens=new_tokens)
    generate_ar(model, cache, prompts, params, runner)              # warm-up: Triton compile + graph capture
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = generate_ar(model, cache, prompts, params, runner)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    return {"model": "real", "batch": len(prompts), "prompt_tokens": len(prompts[0]), "new_tokens": new_tokens,
            "total_s": t, "tokens_per_s": len(prompts) * new_tokens / t, "prefill_s": res.stats["prefill_s"],
            "tokens_first_seq": res.tokens[0][:16]}


def check_graph_vs_eager(model, prompt: list[int]) -> dict:
    cache = PagedKVCache(model.cfg, 1, len(prompt) + 64, dtype=model.embed.weight.dtype, device="cuda")
    params = GenerationParams(max_new_tokens=64)
    graph = generate_ar(model, cache, [prompt], params).tokens[0]
    eager = generate_ar(model, cache, [prompt], GenerationParams(max_new_tokens=64, use_cuda_graph=False)).tokens[0]
    same = next((i for i, (a, b) in enumerate(zip(graph, eager, strict=False)) if a != b), len(graph))
    return {"graph_vs_eager_same_prefix_of_64": same}


def real_model_rows(path: str, out: dict, copy: float) -> None:
    """The default model: perplexity and graph-vs-eager checks, whole generate calls, and decode steps."""
    model = load_model(path, "cuda", "bf16", progress=False)
    tok = load_tokenizer(path)
    text = gutenberg_tokens(tok)
    out["checks"]["real_ppl_bf16_2048_pg2554"] = perplexity(model, text[:2048])
    out["checks"].update(check_graph_vs_eager(model, text[:512]))
    print(f"checks {out['checks']}", flush=True)
    for prompt_len, batch in [(512, 1), (4096, 1), (4096, 16)]:
        prompts = [text[i * 4096: i * 4096 + prompt_len] for i in range(batch)]
        row = e2e_row(model, prompts, 128)
        out["rows"].append(row)
        print(row, flush=True)
    out["rows"] += decode_step_rows(model, "real", (1024, 8064), copy)
    del model
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.environ.get("SPECATTN_DEFAULT_GGUF", DEFAULT_MODEL))
    ap.add_argument("--out", default=str(RESULTS / "ar.json"))
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--skip-real", action="store_true", help="only the 8B-shaped random model (nothing to carry)")
    ap.add_argument("--cells-8b", default="", help="e.g. 1x8192,8x32768 (batch x context): only these 8B steps")
    ap.add_argument("--folds", default="on", help="on,off: the 8B steps with norms folded (the default) and not, "
                    "one after the other in this run")
    ap.add_argument("--pdl", default=str(pdl.MODE), help="comma-separated pdl.MODE values for the 8B steps (0: no "
                    "programmatic dependent launch), one after the other inside each --folds (the summary reads the "
                    "first)")
    ap.add_argument("--gemv", default="+".join(specattn.model.GEMV_PROJECTIONS),
                    help="comma-separated sets of projections computed by kernels.gemv in small steps, each "
                    "'+'-joined or 'none'; inside each --pdl (the summary reads the first)")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = {**environment(), "config": {"dtype": "bf16", "page_size": 16, "new_tokens": 128}, "rows": []}
    out["copy_bandwidth_gbs"] = copy = copy_bandwidth_gbs()
    out["checks"] = check_kernel()
    print(f"copy bandwidth {copy:.0f} GB/s; checks {out['checks']}", flush=True)

    if not args.skip_real:
        real_model_rows(args.model, out, copy)
    if not args.skip_8b:
        default_gemv = specattn.model.GEMV_PROJECTIONS
        variants = [(fold == "on", int(p), g) for fold in args.folds.split(",") for p in args.pdl.split(",")
                    for g in args.gemv.split(",")]
        default_pdl = pdl.MODE
        for fold, pdl_mode, gemv in variants:
            specattn.model.FOLD_NORMS = fold
            pdl.MODE = pdl_mode
            specattn.model.GEMV_PROJECTIONS = gemv_projections(gemv)
            torch._dynamo.reset()
            model8b = random_model(LLAMA3_8B)
            if args.cells_8b:
                cells = [tuple(int(v) for v in c.split("x")) for c in args.cells_8b.split(",")]
                rows = [decode_step_row(model8b, "llama3-8b-random", b, ctx, copy) for b, ctx in cells]
                print(*rows, sep="\n", flush=True)
            else:
                rows = decode_step_rows(model8b, "llama3-8b-random", (1024, 8192, 32768), copy)
            out["rows"] += [{**row, "folded_norms": fold, "pdl": pdl_mode, "gemv": gemv} for row in rows]
            del model8b
            torch.cuda.empty_cache()
        pdl.MODE = default_pdl
        specattn.model.GEMV_PROJECTIONS = default_gemv
        specattn.model.FOLD_NORMS = True

    def find(**kw):
        return next((r for r in out["rows"] if all(r.get(k) == v for k, v in kw.items()) and "skipped" not in r), {})
    out["summary"] = {
        "ar_bandwidth_fraction": find(model="llama3-8b-random", batch=1, context=8192,
                                      folded_norms=True, pdl=int(args.pdl.split(",")[0]),
                                      gemv=args.gemv.split(",")[0]).get("bandwidth_fraction"),
        "real_b1_512_tok_s": find(model="real", batch=1, prompt_tokens=512).get("tokens_per_s"),
        "real_b1_4k_tok_s": find(model="real", batch=1, prompt_tokens=4096).get("tokens_per_s"),
        "real_b16_4k_tok_s": find(model="real", batch=16, prompt_tokens=4096).get("tokens_per_s"),
    }
    write_json_atomic(args.out, out)
    print("\nmodel              batch  context   tok/s   GB/s  frac")
    for r in out["rows"]:
        if "skipped" in r:
            print(f"{r['model']:18s} {r['batch']:5d} {r['context']:8d}  skipped: {r['skipped']}")
        elif "step_ms" in r:
            print(f"{r['model']:18s} {r['batch']:5d} {r['context']:8d} {r['tokens_per_s']:7.0f} "
                  f"{r['achieved_gbs']:6.0f} {r['bandwidth_fraction']:.2f}")
        else:
            print(f"{'real e2e':18s} {r['batch']:5d} {r['prompt_tokens']:8d} {r['tokens_per_s']:7.0f}  "
                  "(128 new, incl. prefill)")
    print("summary", out["summary"])


if __name__ == "__main__":
    main()
