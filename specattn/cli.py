"""`specattn generate ...`: the command line. Every SpecAttnError becomes one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cache import DEFAULT_PAGE_SIZE
from .errors import InvalidInputError, SpecAttnError
from .loader import DEFAULT_MODEL


def read_text(path_str: str, what: str = "text file") -> str:
    path = Path(path_str)
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise InvalidInputError(f"cannot read {what} {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{what} {path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from e


def read_prompt(args) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise InvalidInputError("give either --prompt or --prompt-file, not both")
    if args.prompt_file is None:
        if args.prompt is None:
            raise InvalidInputError("no prompt: pass --prompt TEXT or --prompt-file FILE")
        return args.prompt
    return read_text(args.prompt_file, "prompt file")


def cmd_generate(args) -> int:
    from .api import Session, SpeculationParams, check_request
    prompt = read_prompt(args)
    if args.batch <= 0:
        raise InvalidInputError(f"batch must be > 0, got {args.batch}")
    check_request(args.method, args.max_new_tokens, args.temperature, args.top_p)
    spec = SpeculationParams(args.budget, args.gamma, tuple(args.dense_layers), args.mass_tokens, args.adaptive_gamma,
                             args.mass_every, args.page_size)
    session = Session.load(args.model, args.device, args.dtype, args.attention, progress=not args.quiet)
    draft = sparse = None
    if args.method in ("draft-spec", "specattn-s"):
        draft, sparse = _load_draft(args, session, prompt)
    texts, result = session.generate([prompt] * args.batch, args.max_new_tokens, args.method, args.temperature,
                                     args.top_p, args.seed, use_cuda_graph=not args.no_cuda_graph, spec=spec,
                                     draft=draft, sparse=sparse)
    tp = session.model.tp
    if tp is not None and tp.rank != 0:      # every rank holds the same tokens; rank 0 speaks for them
        return 0
    print(texts[0])
    s = result.stats
    speed = f"{s['tokens_per_s']:.1f} tok/s incl. prefill"
    if "decode_tokens_per_s" in s:
        speed += f", {s['decode_tokens_per_s']:.1f} tok/s decode"
        if s.get("graph_capture_s", 0.0) > 0.05:      # the first run of a shape compiles and captures its steps
            warm = (s["new_tokens"] - args.batch) / max(s["total_s"] - s["prefill_s"] - s["graph_capture_s"], 1e-9)
            speed += (f"; {s['graph_capture_s']:.1f} s of it compiling and capturing CUDA graphs, once per shape: "
                      f"{warm:.1f} tok/s decode without it")
    if "mean_accepted_len" in s:
        speed += f", {s['mean_accepted_len']:.2f} tokens per verification"
    if s["method"] == "auto":
        speed += (f"; auto: {s['auto_speculative_rounds']} speculative rounds, {s['auto_dense_steps']} dense steps, "
                  + ("costs from the cache" if s["auto_had_costs"] else "costs measured in this run"))
    print(f"[{s['method']}] {s['new_tokens']} new tokens in {s['total_s']:.2f} s ({speed}) "
          f"on {session.device} {str(session.dtype).removeprefix('torch.')}", file=sys.stderr)
    if args.json:
        from .evaluation.results import write_json_atomic
        write_json_atomic(args.json, {"texts": texts, "tokens": result.tokens, "stats": s})
    return 0


def _load_draft(args, session, prompt: str):
    """The draft Session and, for specattn-s, its SparseVerification (layer map from --layer-map, or calibrated on
    the prompt itself)."""
    from .alignment import LayerMap, align_layers
    from .api import Session
    from .decoding.draft_speculative import SparseVerification
    from .loader import check_same_tokenizer
    if not args.draft:
        raise InvalidInputError(f"--method {args.method} needs --draft (a smaller model with the same tokenizer)")
    draft = Session.load(args.draft, args.device, args.dtype, args.attention, progress=not args.quiet)
    check_same_tokenizer(draft.tokenizer, session.tokenizer, args.draft, args.model)
    if args.method != "specattn-s":
        return draft, None
    target_layers, draft_layers = session.model.cfg.num_layers, draft.model.cfg.num_layers
    if args.layer_map:
        layer_map = LayerMap.load(args.layer_map, target_layers, draft_layers)
    else:
        layer_map = align_layers(draft.model, session.model, session.encode(prompt)[:1024])
    return draft, SparseVerification(tuple(layer_map.draft_layer), args.keys_p, tuple(args.sparse_dense_layers),
                                     page_level=args.page_level, key_steps=args.keys_from_steps)


def load_pair(args):
    """Draft and verifier on one device, checked to share a tokenizer. Returns (draft, target, tokenizer)."""
    from .api import pick_device
    from .loader import check_same_tokenizer, load_model, load_tokenizer, parse_dtype
    dev = pick_device(args.device)
    dtype = parse_dtype(args.dtype or ("bf16" if dev.type == "cuda" else "fp32"))
    tok_t = load_tokenizer(args.target)
    draft = None
    if args.draft:
        check_same_tokenizer(load_tokenizer(args.draft), tok_t, args.draft, args.target)
        draft = load_model(args.draft, str(dev), dtype, "reference", progress=not args.quiet)
    target = load_model(args.target, str(dev), dtype, "reference", progress=not args.quiet)
    return draft, target, tok_t


def window_tokens(tokenizer, text: str, n: int, start_char: int = 0) -> list[int]:
    ids = tokenizer(text[start_char:], add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise InvalidInputError(f"the text has {len(ids)} tokens; the window needs {n}")
    return ids[:n]


def cmd_layermap(args) -> int:
    from .alignment import align_layers, save_heatmap
    text = read_text(args.text)
    if args.tokens < 64:
        raise InvalidInputError(f"--tokens must be >= 64, got {args.tokens}")
    draft, target, tok = load_pair(args)
    layer_map = align_layers(draft, target, window_tokens(tok, text, args.tokens), args.mode)
    layer_map.save(args.out)
    png = args.png or str(Path(args.out).with_suffix(".png"))
    save_heatmap(layer_map, png, f"KL(verifier || draft): {Path(args.target).name} <- {Path(args.draft).name}")
    print(" ".join(f"{j}->{i}" for j, i in enumerate(layer_map.draft_layer)))
    print(f"wrote {args.out} and {png}", file=sys.stderr)
    return 0


def cmd_ppl(args) -> int:
    from .alignment import LayerMap, align_layers
    from .evaluation.bench import parse_sizes
    from .evaluation.results import write_json_atomic
    from .evaluation.sparse_ppl import MethodSpec, parse_methods, run_methods
    if args.methods:
        specs = parse_methods(args.methods)
    else:   # dense, SpecAttn-S at every --ps, and both baselines at SpecAttn-S's budget for --reference-p
        ps = [float(p) for p in args.ps.split(",")]
        if any(not 0 < p <= 1 for p in ps) or args.reference_p not in ps:
            raise InvalidInputError(f"every p must be in (0, 1] and include --reference-p, got {args.ps}")
        ordered = [args.reference_p] + [p for p in ps if p != args.reference_p]
        specs = [MethodSpec("dense")] + [MethodSpec("specattn-s", p=p) for p in ordered] + \
            [MethodSpec("streaming"), MethodSpec("quest")]
    needs_draft = any(s.kind == "specattn-s" for s in specs)
    if needs_draft and not args.draft:
        raise InvalidInputError("specattn-s methods need --draft (a smaller model with the same tokenizer)")
    context = parse_sizes(args.context, "context")[0]
    stride = parse_sizes(args.stride, "stride")[0] if args.stride else context
    if args.windows <= 0:
        raise InvalidInputError(f"--windows must be > 0, got {args.windows}")
    text = read_text(args.text)
    draft, target, tok = load_pair(args)
    all_ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(all_ids) < context:
        raise InvalidInputError(f"the text has {len(all_ids)} tokens; a {context}-token window needs more")
    windows = [all_ids[i * stride: i * stride + context] for i in range(args.windows)
               if i * stride + context <= len(all_ids)]
    layer_map = None
    if needs_draft and args.layer_map:
        layer_map = LayerMap.load(args.layer_map, target.cfg.num_layers, draft.cfg.num_layers)
    elif needs_draft:   # calibrate on text after the evaluated windows, never on them
        start = (len(windows) - 1) * stride + context
        calib = all_ids[start: start + 1024]
        if len(calib) < 64:
            raise InvalidInputError("no text is left after the windows to calibrate the layer map; pass --layer-map")
        layer_map = align_layers(draft, target, calib)
    dense = tuple(args.dense_layers)
    runs = run_methods(target, windows, specs, draft, layer_map, dense,
                       progress=lambda name: print(f"  done: {name}", file=sys.stderr))
    rows = [vars(r) for r in runs]
    for r in rows:
        print(f"{r['name']:>24}  ppl {r['ppl']:8.3f}  keys kept {r['keys_kept_fraction']:.3f} "
              f"(sparse layers {r['keys_kept_fraction_sparse_layers']:.3f})")
    if args.json:
        from .evaluation.results import environment
        write_json_atomic(args.json, {**environment(), "text": Path(args.text).name,
                                      "dtype": str(target.embed.weight.dtype), "context": context, "stride": stride,
                                      "windows": len(windows), "dense_layers": list(dense),
                                      "layer_map": layer_map.draft_layer if layer_map else None, "runs": rows})
    if args.plot:
        _plot_ppl(rows, args.plot)
    return 0


def _plot_ppl(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot(1 - r["keys_kept_fraction"], r["ppl"], "o")
        ax.annotate(r["name"], (1 - r["keys_kept_fraction"], r["ppl"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("KV reads saved (fraction, all layers)")
    ax.set_ylabel("perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_bench(args) -> int:
    from .api import Session, SpeculationParams
    from .decoding.sampling import SamplingParams
    from .evaluation import bench
    from .evaluation.results import write_json_atomic
    cfg = bench.BenchConfig(bench.parse_methods(args.methods), bench.parse_sizes(args.context, "context"),
                            bench.parse_sizes(args.batch, "batch"),
                            SpeculationParams(args.budget, args.gamma, tuple(args.dense_layers),
                                              page_size=args.page_size),
                            args.new_tokens, SamplingParams(args.temperature, args.top_p, args.seed),
                            repeats=args.repeats)
    if args.new_tokens <= 0:
        raise InvalidInputError(f"--new-tokens must be > 0, got {args.new_tokens}")
    if args.repeats <= 0:
        raise InvalidInputError(f"--repeats must be > 0, got {args.repeats}")
    text = read_text(args.text)
    session = Session.load(args.model, args.device, args.dtype, args.attention, progress=not args.quiet)
    tokens = session.tokenizer(text, add_special_tokens=False)["input_ids"]
    if any(m in ("draft-spec", "specattn-s") for m in cfg.methods):
        args.method = "specattn-s" if "specattn-s" in cfg.methods else "draft-spec"
        draft, cfg.sparse = _load_draft(args, session, text[:20000])
        cfg.draft = draft.model
    from tqdm.auto import tqdm
    tp = session.model.tp
    speaker = tp is None or tp.rank == 0     # under torchrun every rank runs the matrix; rank 0 reports it
    bar = tqdm(total=len(cfg.methods) * len(cfg.contexts) * len(cfg.batches), disable=args.quiet or not speaker,
               unit="run")

    def progress(done, total, what):
        bar.set_description(what)
        bar.update(done - bar.n)

    rows = bench.run_matrix(session.model, tokens, cfg, progress)
    bar.close()
    if not speaker:
        return 0
    print(bench.table(rows))
    from .evaluation.results import environment
    sparse = ({"draft": args.draft, "keys_p": args.keys_p, "page_level": args.page_level,
               "keys_from_steps": args.keys_from_steps} if args.draft else {})
    result = {**environment(), "model": args.model, "dtype": str(session.dtype),
              "config": {"methods": cfg.methods, "contexts": cfg.contexts, "batches": cfg.batches,
                         "budget": args.budget, "gamma": args.gamma, "page_size": args.page_size,
                         "new_tokens": args.new_tokens,
                         "temperature": args.temperature, "top_p": args.top_p, "repeats": args.repeats, **sparse},
              "summary": bench.summary(rows), "rows": rows}
    write_json_atomic(args.json, result)
    bench.plot(rows, Path(args.json).with_suffix(".png"))
    print(f"wrote {args.json} and {Path(args.json).with_suffix('.png')}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .decoding.draft_speculative import KEY_STEPS
    p = argparse.ArgumentParser(prog="specattn",
                                description="Long-context decoding with speculation and sparse attention.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt and report tokens/s")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint folder, .gguf file or {DEFAULT_MODEL}")
    g.add_argument("--prompt")
    g.add_argument("--prompt-file")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--method", default="ar",
                   help="ar, specattn-y, vegas, magicdec, quest, selfspec-full, auto (dense steps, specattn-y "
                        "or magicdec rounds, whichever a cost model measured on this machine predicts faster, round "
                        "by round), or with --draft: draft-spec (lossless) and specattn-s (draft-guided sparse "
                        "verification); specattn-y/blk64 = specattn-y --mass-tokens 64, /r2 = --mass-every 2")
    g.add_argument("--budget", type=float, default=256,
                   help="KV budget of a draft step: tokens, or a fraction of the context if below 1")
    g.add_argument("--gamma", type=int, default=4, help="draft tokens per verification")
    g.add_argument("--dense-layers", type=int, nargs="*", default=[],
                   help="layers that draft with the full cache, e.g. 0 (default: none)")
    g.add_argument("--draft", help="draft model for --method draft-spec / specattn-s (same tokenizer)")
    g.add_argument("--layer-map", help="specattn-s: JSON from `specattn layermap` (default: calibrate on the prompt)")
    g.add_argument("--keys-p", type=float, default=0.95,
                   help="specattn-s: the verifier reads the keys holding this much of the draft's attention")
    g.add_argument("--sparse-dense-layers", type=int, nargs="*", default=[0, 1],
                   help="specattn-s: verifier layers that stay dense (default: 0 1)")
    g.add_argument("--page-level", action="store_true",
                   help="specattn-s: choose pages from the draft's page mass instead of tokens")
    g.add_argument("--keys-from-steps", choices=KEY_STEPS, default="all",
                   help="specattn-s: draft steps whose attention chooses the verifier's keys (default: all, the "
                        "paper's union; one step spends less draft time on page mass). Fastest measured on the GPU: "
                        "--page-level --keys-p 0.9 --keys-from-steps last (README, SpecAttn-S results)")
    g.add_argument("--adaptive-gamma", action="store_true",
                   help="draft up to --gamma tokens per round, fewer while recent drafts get rejected")
    g.add_argument("--mass-tokens", type=int, default=None,
                   help="specattn-y: rank keys by verification mass per block of this many keys (default: per "
                        "page; 64 is nearly free on the GPU)")
    g.add_argument("--mass-every", type=int, default=1,
                   help="specattn-y: measure the verification's mass every K-th round only; the verify steps between "
                        "skip the by-product and the drafts rank pages by the last mass (default 1: every round)")
    g.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE,
                   help="KV cache page in tokens (16, 32 or 64): what sparse drafts select; 64 makes SpecAttn-Y's "
                        "exact page mass as cheap as /blk64's")
    g.add_argument("--batch", type=int, default=1, help="decode this many copies of the prompt together")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--attention", default="auto", help="attention backend: auto, reference or triton")
    g.add_argument("--no-cuda-graph", action="store_true")
    g.add_argument("--json", help="also write texts, tokens and stats to this JSON file")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=cmd_generate)

    def pair_args(c, draft_required=True):
        c.add_argument("--draft", required=draft_required, help="draft checkpoint (folder or .gguf)")
        c.add_argument("--target", "--model", dest="target", required=True,
                       help="verifier checkpoint (sharing the draft's tokenizer)")
        c.add_argument("--text", required=True, help="UTF-8 text file")
        c.add_argument("--device", default="auto")
        c.add_argument("--dtype", default=None)
        c.add_argument("--quiet", action="store_true")

    m = sub.add_parser("layermap", help="map each verifier layer to the draft layer with the closest attention")
    pair_args(m)
    m.add_argument("--tokens", type=int, default=1024, help="calibration tokens from the start of the text")
    m.add_argument("--mode", default="monotone", help="monotone (the paper's DP) or closest")
    m.add_argument("--out", default="layermap.json")
    m.add_argument("--png", help="heatmap path (default: next to --out)")
    m.set_defaults(func=cmd_layermap)

    b = sub.add_parser("bench", help="tokens/s of methods x contexts x batches; lossless ones checked against AR")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--text", required=True, help="UTF-8 text the prompts are cut from")
    b.add_argument("--methods", default="ar,magicdec,quest,specattn-y")
    b.add_argument("--context", default="1k,4k", help="prompt lengths, e.g. 1k,4k,8000")
    b.add_argument("--batch", default="1,8")
    b.add_argument("--budget", type=float, default=256)
    b.add_argument("--gamma", type=int, default=4)
    b.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="KV cache page in tokens (16, 32 or 64)")
    b.add_argument("--dense-layers", type=int, nargs="*", default=[])
    b.add_argument("--draft", help="draft model for the draft-spec and specattn-s methods")
    b.add_argument("--layer-map", help="specattn-s: JSON from `specattn layermap` (default: calibrate on the text)")
    b.add_argument("--keys-p", type=float, default=0.95)
    b.add_argument("--sparse-dense-layers", type=int, nargs="*", default=[0, 1])
    b.add_argument("--page-level", action="store_true")
    b.add_argument("--keys-from-steps", choices=KEY_STEPS, default="all")
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=1, help="timed runs per method and cell; the median is kept")
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--top-p", type=float, default=1.0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", default=None)
    b.add_argument("--attention", default="auto")
    b.add_argument("--json", default="bench.json", help="results; the plot goes next to it (.png)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    q = sub.add_parser("ppl", help="verifier perplexity with draft-guided sparse attention vs Quest and streaming")
    pair_args(q, draft_required=False)
    q.add_argument("--context", default="2048", help="tokens in each evaluated window (e.g. 2048 or 8k)")
    q.add_argument("--stride", default=None, help="tokens between window starts (default: the context)")
    q.add_argument("--windows", type=int, default=1, help="how many windows to average over")
    q.add_argument("--methods", default=None,
                   help="e.g. dense,specattn-s:p=0.95,quest:budget=512,streaming (default: dense, SpecAttn-S at "
                        "--ps, and Quest and streaming at SpecAttn-S's budget for --reference-p)")
    q.add_argument("--plot", help="write a perplexity vs KV-reads-saved plot here (PNG)")
    q.add_argument("--ps", default="0.9,0.95,0.97,0.99,1.0")
    q.add_argument("--reference-p", type=float, default=0.95, help="p whose KV budget Quest and streaming get")
    q.add_argument("--dense-layers", type=int, nargs="*", default=[0, 1])
    q.add_argument("--layer-map", help="JSON from `specattn layermap` (default: calibrate on the next window)")
    q.add_argument("--json", help="write the results here")
    q.set_defaults(func=cmd_ppl)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except SpecAttnError as e:
        print(f"specattn: error: {e}", file=sys.stderr)
        code = 2
    from .distributed import finish_tensor_parallel
    if finish_tensor_parallel(wait=code != 2):
        # A rank under torchrun leaves without the interpreter's teardown: there, now and then, a native thread of
        # the distributed stack was destroyed while still joinable ("terminate called without an active
        # exception", SIGABRT, exit -6) after all the work was done and printed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
