"""Self-speculative decoding on the GPU: every method against AR in the same run, plus per-step costs.

Part 1, real default model (SmolLM2-135M, bf16): decode tokens/s of ar, magicdec, quest, specattn-y and vegas at
each (batch, context) cell and budget, greedy (tokens checked against AR) and with sampling (T 0.6, top-p 0.95);
acceptance and the draft / verify / select split. Part 2, Llama-3-8B-shaped random model at 32K: graph-timed
cost of a dense decode step, a verify step with and without the page-mass by-product, sparse draft steps by
budget, and selection. Writes benchmarks/results/selfspec.json (or --out); the last lines printed are a table.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    LLAMA3_8B,
    RESULTS,
    environment,
    first_difference,
    graph_ms,
    gutenberg_tokens,
    parse_dense_layers,
    random_model,
)
from specattn import selection  # noqa: E402
from specattn.api import METHODS, SpeculationParams, make_policy, method_variant  # noqa: E402
from specattn.cache import DEFAULT_PAGE_SIZE, PagedKVCache  # noqa: E402
from specattn.decoding import ar as ar_decoding  # noqa: E402
from specattn.decoding import runner  # noqa: E402
from specattn.decoding import self_speculative as self_spec_decoding  # noqa: E402
from specattn.decoding.ar import GenerationParams, generate_ar  # noqa: E402
from specattn.decoding.sampling import SamplingParams  # noqa: E402
from specattn.decoding.self_speculative import cache_tokens_needed, generate_self_speculative  # noqa: E402
from specattn.evaluation import bench  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import paged_attention  # noqa: E402
from specattn.loader import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402
from specattn.selection import StreamingPolicy, VerificationGuidedPolicy  # noqa: E402

SPARSE_METHODS = ("magicdec", "quest", "specattn-y", "specattn-y/blk64", "vegas")
STATS = ("mean_accepted_len", "acceptance_rate", "acceptance_per_position", "draft_s", "verify_s", "select_s",
         "kv_bytes_read_draft", "kv_bytes_read_prefill_and_verify", "rounds", "prefill_s", "rounds_by_sequence",
         "full_batch_rounds")


DEVICE = "cuda"      # the CPU smoke test in tests/ sets "cpu"
REPEATS = 1          # timed runs per method and cell (--repeats); the one with the median decode tokens/s is kept


def timed(fn):
    return bench.timed_median(torch.device(DEVICE), fn, REPEATS)


# "+" switches that set module flags for one method's run: suffix -> [(module, flag, value), ...]
FLAG_SWITCHES = {"+phys": [(selection, "PHYSICAL_LISTS", True)],
                 "+fullwave": [(paged_attention, "SPARSE_SMALL_HEADS_FULL_WAVE", paged_attention.FULL_WAVE_CANDIDATE)],
                 "+layerfinish": [(paged_attention, "FINISH_MASS_PER_STEP", False)],
                 "+notail": [(runner, "TAIL_PLANS", False)],
                 "+pipe": [(self_spec_decoding, "PIPELINE_DRAFTS", True)],
                 "+nopipe": [(self_spec_decoding, "PIPELINE_DRAFTS", False)],
                 "+onehot": [(paged_attention, "BLOCK_PATH_MAX_HEAD_DIM", 0),
                             (paged_attention, "PAGE_SUMS_BY_WARP", False)],
                 "+warp": [(paged_attention, "BLOCK_PATH_MAX_HEAD_DIM", 0),
                           (paged_attention, "PAGE_SUMS_BY_WARP", True)]}


def run_method(model, caches, method: str, prompts, new_tokens: int, spec: SpeculationParams,
               sampling: SamplingParams, warm_prompts=None):
    """Warm-up run (compiles, captures graphs), then the measured run reusing those graphs. warm_prompts: shorter
    prompts for the warm-up (the graphs depend on the cache's capacity, not on the lengths, which they read from the
    device), so that a long-context cell does not pay its prefill twice per method. Names: "/" suffixes are
    SpecAttn-Y's selection variants, which users name the same way (`api.method_variant`, e.g. specattn-y/blk64);
    "+" suffixes are this benchmark's switches for A/Bs in one run, each what a user sets with an option instead:
    "+phys" (e.g. magicdec+phys) turns selection.PHYSICAL_LISTS on, "+nodense" drafts every layer sparsely
    (`--dense-layers none`, the default since session 17; it matters beside a run given `--dense-layers 0`),
    "+adaptive" an adaptive gamma (`--adaptive-gamma`), "+fullwave" paged_attention.FULL_WAVE_CANDIDATE for sparse
    drafts (a kernel launch under test, no option), "+layerfinish" the verify's page mass finished by one launch a
    layer instead of one a step (paged_attention.FINISH_MASS_PER_STEP off; no option), "+onehot" / "+warp" exact
    page mass by the page one-hot product / by sums inside warps at any head size, where small heads would take the
    block path (paged_attention.BLOCK_PATH_MAX_HEAD_DIM 0, PAGE_SUMS_BY_WARP; no option), "+notail" a fixed
    batch's tail run as before session 29: verify attention planned for the whole batch, idle sequences drafting
    from their whole lists (runner.TAIL_PLANS off; no option), "+pipe" / "+nopipe" each round's drafts queued before
    the last round's sync or only after it (self_speculative.PIPELINE_DRAFTS on / off; no option)."""
    for suffix, flags in FLAG_SWITCHES.items():
        if method.endswith(suffix):
            with contextlib.ExitStack() as stack:
                for module, flag, value in flags:
                    stack.enter_context(mock.patch.object(module, flag, value))
                return run_method(model, caches, method.removesuffix(suffix), prompts, new_tokens, spec, sampling,
                                  warm_prompts)
    if method.endswith("+nodense"):     # e.g. specattn-y/blk64+nodense: every layer drafts sparsely (dense_layers ())
        return run_method(model, caches, method.removesuffix("+nodense"), prompts, new_tokens,
                          dataclasses.replace(spec, dense_layers=()), sampling, warm_prompts)
    params = GenerationParams(max_new_tokens=new_tokens, sampling=sampling)
    adaptive = method.endswith("+adaptive")      # e.g. magicdec+adaptive: adaptive gamma, at most spec.gamma
    method = method.removesuffix("+adaptive")
    method, overrides = method_variant(method)      # specattn-y/blk64/r2: mass per 64-key block, every 2nd round
    spec = dataclasses.replace(spec, **overrides)
    warm = GenerationParams(max_new_tokens=4 * spec.gamma, sampling=sampling)
    warm_prompts = warm_prompts or prompts
    if METHODS[method] is None:
        runner = generate_ar(model, caches["plain"], warm_prompts, warm).runner
        return timed(lambda: generate_ar(model, caches["plain"], prompts, params, runner))
    policy = make_policy(method, spec, model.cfg.num_layers)
    cache = caches["bounds" if policy.needs_key_bounds else "plain"]
    steps = generate_self_speculative(model, cache, warm_prompts, warm, policy, spec.gamma,
                                      adaptive_gamma=adaptive).runner
    return timed(lambda: generate_self_speculative(model, cache, prompts, params, policy, spec.gamma, steps,
                                                   adaptive_gamma=adaptive))


class PrefillReuse:
    """A cell's prompts prefilled once for all its methods. A decoding run writes K/V only past each prompt's end and
    never shortens a sequence below it, so rolling the cache back to the prompt lengths leaves what a fresh prefill of
    the same prompts would: the same K/V and, kept from the one real prefill, the same last logits. At the 1.5B's
    batch 64 x 32K a prefill takes ~40 s of device time per method; the decode being timed is unchanged (prefill is
    excluded from every decode figure). Caches that track Quest's key bounds always prefill: a page cut mid-way keeps
    bounds loosened by the tokens decoded into it."""

    def __init__(self):
        self.cache, self.prompts, self.logits, self.bytes_read, self.hits = None, None, None, 0, 0

    def __call__(self, model, cache, prompts, chunk=runner.DEFAULT_PREFILL_CHUNK):
        if self._reusable(cache, prompts):
            cache.mark_idle([False] * cache.max_batch)
            cache.truncate([len(p) for p in prompts])
            cache.kv_bytes_read = self.bytes_read
            self.hits += 1
            return self.logits.clone()
        logits = runner.prefill(model, cache, prompts, chunk)
        if not cache.track_key_bounds:
            self.cache, self.prompts, self.logits, self.bytes_read = cache, prompts, logits.clone(), cache.kv_bytes_read
        return logits

    def _reusable(self, cache, prompts) -> bool:
        if cache is not self.cache or cache.batch != len(prompts):
            return False
        if prompts is not self.prompts and prompts != self.prompts:
            return False
        return all(n >= len(p) for n, p in zip(cache.host_lens(), prompts, strict=True))


@contextlib.contextmanager
def prefill_reused():
    """Decoding runs inside prefill each cell's prompts once (PrefillReuse); yields the reuse, to count its hits."""
    reuse = PrefillReuse()
    with mock.patch.object(ar_decoding, "prefill", reuse), mock.patch.object(self_spec_decoding, "prefill", reuse):
        yield reuse


def model_label(path: str) -> str:
    if path == DEFAULT_MODEL or path == os.environ.get("SPECATTN_DEFAULT_GGUF"):
        return "SmolLM2-135M-Instruct (Q4_1 GGUF -> bf16)"
    return f"{Path(path).name} -> bf16"


def real_model_rows(model, text, cells, budgets, gamma, new_tokens, sampling, methods, log,
                    warm_context: int | None = None, dense_layers: tuple[int, ...] = (),
                    page_size: int = DEFAULT_PAGE_SIZE, reuse_prefill: bool = False) -> list[dict]:
    """reuse_prefill: one prefill per cell (PrefillReuse); warm-ups then run on the full prompts (a shorter warm-up
    prefill would overwrite them), so warm_context is not used."""
    rows = []
    for batch, ctx in cells:
        with prefill_reused() if reuse_prefill else contextlib.nullcontext():
            rows += _cell_rows(model, text, batch, ctx, budgets, gamma, new_tokens, sampling, methods, log,
                               None if reuse_prefill else warm_context, dense_layers, page_size)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def _cell_rows(model, text, batch, ctx, budgets, gamma, new_tokens, sampling, methods, log, warm_context,
               dense_layers, page_size) -> list[dict]:
    rows = []
    prompts = bench.prompts_from(text, batch, ctx)
    need = cache_tokens_needed(ctx, new_tokens, gamma)
    caches = {"plain": PagedKVCache(model.cfg, batch, need, dtype=model.embed.weight.dtype, device=DEVICE,
                                    page_size=page_size)}
    if "quest" in methods:
        caches["bounds"] = PagedKVCache(model.cfg, batch, need, dtype=model.embed.weight.dtype, device=DEVICE,
                                        track_key_bounds=True, page_size=page_size)
    configs = [("ar", None)] + [(m, b) for m in methods for b in (budgets if m != "vegas" else [256])]
    ar = None
    for method, budget in configs:
        spec = SpeculationParams(budget or 256, gamma, dense_layers, page_size=page_size)
        # a warm-up prompt must stay longer than the budget (else drafting would not be sparse)
        warm_len = max(warm_context or ctx, 2 * spec.budget)
        warm_prompts = [p[-warm_len:] for p in prompts] if warm_len < ctx else None
        res, secs = run_method(model, caches, method, prompts, new_tokens, spec, sampling, warm_prompts)
        if method == "ar":
            ar = res
        same = [first_difference(x, y) for x, y in zip(res.tokens, ar.tokens, strict=True)]
        row = {"method": method, "budget": budget, "batch": batch, "context": ctx, "gamma": gamma,
               "greedy": sampling.greedy, "seconds": secs,
               "tokens_per_s": sum(len(t) for t in res.tokens) / secs,
               "decode_tokens_per_s": res.stats["decode_tokens_per_s"],
               "same_tokens_as_ar": min(same) == new_tokens if sampling.greedy else None,
               "sequences_identical_to_ar": sum(d == new_tokens for d in same) if sampling.greedy else None,
               "first_difference_min": min(same) if sampling.greedy else None,
               **{k: res.stats[k] for k in STATS if k in res.stats}}
        row["decode_speedup_vs_ar"] = row["decode_tokens_per_s"] / ar.stats["decode_tokens_per_s"]
        steady = res.stats.get("decode_tokens_per_s_steady", res.stats["decode_tokens_per_s"])
        row["decode_tokens_per_s_steady"] = steady
        row["steady_speedup_vs_ar"] = steady / ar.stats["decode_tokens_per_s"]
        rows.append(row)
        log(row)
    return rows


def step_costs(ctx: int, batch: int, gamma: int, budgets: list[int], cfg=LLAMA3_8B) -> dict:
    """Graph-timed per-step costs on a random model of shape cfg (the 8B's unless told): what one round of each
    method costs."""
    model = random_model(cfg)
    model.compile_steps()
    cache = PagedKVCache(model.cfg, batch, ctx + 2 * gamma + 2, dtype=torch.bfloat16, device="cuda")
    cache.reset(batch)
    cache.reserve(ctx)
    cache.advance(ctx)                   # K/V contents do not change the cost; lengths do
    cache.reserve(gamma + 1)
    tok1 = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    tokv = torch.zeros(batch, gamma + 1, dtype=torch.long, device="cuda")
    mass = torch.zeros(model.cfg.num_layers, batch, model.cfg.num_kv_heads, cache.max_pages_per_seq, device="cuda")

    def step(tokens, selection=None, page_mass=None, mass_tokens=None):
        view = cache.step_view(tokens.shape[1], static=True)
        view.selection, view.page_mass = selection, page_mass
        view.mass_tokens = mass_tokens
        return model(tokens, cache, view, all_logits=tokens.shape[1] > 1)

    out = {"context": ctx, "batch": batch, "gamma": gamma,
           "decode_ms": graph_ms(lambda: step(tok1), calls=5),
           "verify_ms": graph_ms(lambda: step(tokv), calls=5),
           "verify_page_mass_ms": graph_ms(lambda: step(tokv, page_mass=mass), calls=5),
           "verify_block64_mass_ms": graph_ms(lambda: step(tokv, page_mass=mass, mass_tokens=64), calls=5)}
    guided = VerificationGuidedPolicy(budgets[0])
    guided.observe(torch.rand_like(mass))
    out["select_ms"] = _eager_ms(lambda: guided.select(cache, gamma))
    for budget in budgets:
        sel = StreamingPolicy(budget).select(cache, gamma)
        out[f"draft_ms_budget_{budget}"] = graph_ms(lambda: step(tok1, sel), calls=5)
    return out


def _eager_ms(fn, reps: int = 20) -> float:
    """Wall time of an eager host+device call (selection runs eagerly between graphs)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1000


def derive_steady(row: dict) -> dict:
    """Continuous-batching throughput for rows written before the loop measured it (over its full-batch rounds,
    FullBatchRate): each round taken to yield batch x mean accepted length tokens. Fair only while a tail round
    cost about what a full one does, i.e. before tail plans (7ba4cf9); AR has no stragglers. A row that carries the
    measured rate (since b95ce69) keeps it: the estimate overstates methods whose tail rounds run on tail plans."""
    if "decode_tokens_per_s_steady" in row:
        return row
    if row["method"] == "ar":
        steady = row["decode_tokens_per_s"]
    else:
        steady = row["batch"] * row["mean_accepted_len"] * row["rounds"] / (row["seconds"] - row["prefill_s"])
    return {**row, "decode_tokens_per_s_steady": steady}


def summarize_metric(rows: list[dict], metric: str) -> dict:
    """Best budgets per cell by `metric`, SpecAttn-Y's speedups over AR and over the best baseline."""
    cells = {}
    for r in rows:
        cells.setdefault((r["greedy"], r["batch"], r["context"]), []).append(r)

    def best(cell, methods):
        cand = [r for r in cell if r["method"].split("/")[0].split("+")[0] in methods]   # +adaptive, +phys, ...
        return max(cand, key=lambda r: r[metric]) if cand else None

    per_cell = []
    for (greedy, batch, ctx), cell in sorted(cells.items(), key=lambda kv: (not kv[0][0], kv[0][1], kv[0][2])):
        ar = best(cell, ("ar",))
        entry = {"greedy": greedy, "batch": batch, "context": ctx}
        y, base = best(cell, ("specattn-y", "vegas")), best(cell, ("magicdec", "quest"))
        for name, methods in (("specattn_y", ("specattn-y",)), ("vegas", ("vegas",)),
                              ("magicdec", ("magicdec",)), ("quest", ("quest",))):
            r = best(cell, methods)
            if r:
                entry[f"{name}_budget"] = r["budget"]
                entry[f"{name}_over_ar"] = round(r[metric] / ar[metric], 3)
        if y and base:
            entry["best_specattn_y_mode"] = f"{y['method']}@{y['budget']}"
            entry["best_baseline"] = f"{base['method']}@{base['budget']}"
            entry["specattn_y_over_best_baseline"] = round(y[metric] / base[metric], 3)
        per_cell.append(entry)
    def headline(greedy: bool) -> dict:
        """The cell where SpecAttn-Y (or Vegas) gains most over AR, among the greedy or the sampled cells."""
        cand = [c for c in per_cell if c["greedy"] == greedy and "specattn_y_over_ar" in c]
        top = max(cand, key=lambda c: max(c["specattn_y_over_ar"], c.get("vegas_over_ar", 0)), default={})
        return {"specattn_y_over_ar": max(top.get("specattn_y_over_ar", 0), top.get("vegas_over_ar", 0)) or None,
                "cell": {k: top.get(k) for k in ("batch", "context", "best_specattn_y_mode")},
                "specattn_y_over_best_baseline": top.get("specattn_y_over_best_baseline")}

    greedy = headline(True)
    return {
        "specattn_y_over_ar": greedy["specattn_y_over_ar"],
        "specattn_y_over_ar_cell": greedy["cell"],
        "specattn_y_over_best_baseline": greedy["specattn_y_over_best_baseline"],
        "sampled": headline(False),      # T 0.6, top-p 0.95: the greedy figures above leave these cells out
        "per_cell": per_cell,
    }


def summarize(rows: list[dict]) -> dict:
    rows = [derive_steady(r) for r in rows]
    acceptance = {}
    for r in rows:
        if r["method"] != "ar":
            key = f"{r['method']}@{r['budget']}" + ("" if r["greedy"] else ":sampling")
            acceptance.setdefault(key, {})[f"b{r['batch']}_ctx{r['context']}"] = round(r["mean_accepted_len"], 3)
    fixed = summarize_metric(rows, "decode_tokens_per_s")
    steady = summarize_metric(rows, "decode_tokens_per_s_steady")
    greedy = [r for r in rows if r["greedy"]]
    return {
        "metric": "decode tokens/s, prefill excluded; every ratio within one cell of one run. Fixed batch: "
                  "time until every sequence has its tokens. Steady: batch x mean accepted length per round "
                  "(continuous batching, no stragglers)",
        "specattn_y_over_ar": fixed["specattn_y_over_ar"],
        "specattn_y_over_ar_cell": fixed["specattn_y_over_ar_cell"],
        "specattn_y_over_best_baseline": fixed["specattn_y_over_best_baseline"],
        "specattn_y_over_ar_steady": steady["specattn_y_over_ar"],
        "specattn_y_over_ar_steady_cell": steady["specattn_y_over_ar_cell"],
        "specattn_y_over_best_baseline_steady": steady["specattn_y_over_best_baseline"],
        "sampled": fixed["sampled"], "sampled_steady": steady["sampled"],
        "greedy_runs_identical_to_ar": sum(bool(r["same_tokens_as_ar"]) for r in greedy),
        "greedy_runs": len(greedy),
        "acceptance": acceptance, "per_cell": fixed["per_cell"], "per_cell_steady": steady["per_cell"],
    }


def resummarize(path: str) -> None:
    """Recompute the derived fields and the summary of a results file from its measured rows."""
    data = json.loads(Path(path).read_text())
    data["rows"] = [derive_steady(r) for r in data["rows"]]
    data["summary"] = summarize(data["rows"])
    write_json_atomic(path, data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.environ.get("SPECATTN_DEFAULT_GGUF", DEFAULT_MODEL))
    ap.add_argument("--model-name", help="how results name the model (default: the default model or the file name)")
    ap.add_argument("--out", default=str(RESULTS / "selfspec.json"))
    ap.add_argument("--cells", default="1x4096,1x8000,8x8000,32x4096,32x8000,64x8000",
                    help="batch x context pairs")
    ap.add_argument("--sampling-cells", default="1x8000,32x8000")
    ap.add_argument("--budgets", default="256,512")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--methods", default=",".join(SPARSE_METHODS))
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="the real model's KV cache page (tokens)")
    ap.add_argument("--dense-layers", default="none", help="layers drafting with the full cache: 0,1 or none")
    ap.add_argument("--warm-context", type=int, help="warm-up runs prefill only this many tokens of each prompt "
                    "(long contexts on larger models: one full prefill per method instead of two)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per method and cell; the median is kept "
                    "(single runs of one configuration moved by up to ±0.1x)")
    ap.add_argument("--reuse-prefill", action="store_true", help="prefill each cell's prompts once for all its "
                    "methods (PrefillReuse): ~40 s of device time saved per method at the 1.5B's b64 x 32K; "
                    "decode figures are unchanged, prefill_s reads ~0")
    ap.add_argument("--resummarize", metavar="JSON", help="only recompute the summary of a results file")
    args = ap.parse_args()
    if args.resummarize:
        resummarize(args.resummarize)
        return

    def cells(s):
        return [tuple(int(x) for x in c.split("x")) for c in s.split(",") if c]

    global REPEATS
    REPEATS = args.repeats
    budgets = [int(b) for b in args.budgets.split(",")]
    dense = parse_dense_layers(args.dense_layers)
    methods = args.methods.split(",")
    env = environment()
    model = load_model(args.model, "cuda", "bf16", progress=False)
    text = gutenberg_tokens(load_tokenizer(args.model))
    partial = Path(args.out).with_suffix(".partial.json")
    table: list[dict] = []

    def log(row):
        table.append(row)          # written as it goes, so a run cut short still leaves its rows
        write_json_atomic(partial, {**env, "rows": table})
        print(f"{'greedy' if row['greedy'] else 'T0.6':6} b{row['batch']:<3} ctx{row['context']:<5} "
              f"{row['method']:>10}@{row['budget'] or '-':<4} decode {row['decode_tokens_per_s']:9.1f} tok/s "
              f"x{row['decode_speedup_vs_ar']:.2f} acc {row.get('mean_accepted_len', 1):.2f} "
              f"same={row['same_tokens_as_ar']}", flush=True)

    rows = real_model_rows(model, text, cells(args.cells), budgets, args.gamma, args.new_tokens,
                           SamplingParams(), methods, log, args.warm_context, dense, args.page_size, args.reuse_prefill)
    rows += real_model_rows(model, text, cells(args.sampling_cells), budgets, args.gamma, args.new_tokens,
                            SamplingParams(0.6, 0.95, seed=0), methods, log, args.warm_context, dense, args.page_size,
                            args.reuse_prefill)
    del model
    torch.cuda.empty_cache()
    costs = []
    for batch in () if args.skip_8b else (1, 8):
        costs.append(step_costs(32768, batch, args.gamma, [512, 1024, 2048]))
        torch.cuda.empty_cache()
    out = {**env, "config": {"dtype": "bf16", "gamma": args.gamma, "new_tokens": args.new_tokens, "repeats": REPEATS,
                             "budgets_tokens": budgets, "dense_layers": list(dense), "page_size": args.page_size,
                             "vegas": "5% of context, >= 256 tokens",
                             "sampling": "T 0.6, top-p 0.95", "model": args.model_name or model_label(args.model),
                             "warm_context": None if args.reuse_prefill else args.warm_context,
                             "prefill_reused": args.reuse_prefill},
           "summary": summarize(rows), "rows": rows, "step_costs_llama3_8b_shape": costs}
    write_json_atomic(args.out, out)
    for c in costs:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in c.items()})
    s = out["summary"]
    print(f"specattn_y_over_ar {s['specattn_y_over_ar']} at {s['specattn_y_over_ar_cell']}; over best baseline "
          f"{s['specattn_y_over_best_baseline']}; steady {s['specattn_y_over_ar_steady']}; greedy runs identical "
          f"to AR {s['greedy_runs_identical_to_ar']}/{s['greedy_runs']}; sampled: {s['sampled']['specattn_y_over_ar']} "
          f"over AR, {s['sampled']['specattn_y_over_best_baseline']} over the best baseline")


if __name__ == "__main__":
    main()
