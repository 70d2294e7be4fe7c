"""`specattn generate ...`: the command line. Every SpecAttnError becomes one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import InvalidInputError, SpecAttnError
from .loader import DEFAULT_MODEL


def read_prompt(args) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise InvalidInputError("give either --prompt or --prompt-file, not both")
    if args.prompt_file is None:
        if args.prompt is None:
            raise InvalidInputError("no prompt: pass --prompt TEXT or --prompt-file FILE")
        return args.prompt
    path = Path(args.prompt_file)
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise InvalidInputError(f"cannot read prompt file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"prompt file {path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from e


def cmd_generate(args) -> int:
    from .api import Session, SpeculationParams, check_request
    prompt = read_prompt(args)
    if args.batch <= 0:
        raise InvalidInputError(f"batch must be > 0, got {args.batch}")
    check_request(args.method, args.max_new_tokens, args.temperature, args.top_p)
    spec = SpeculationParams(args.budget, args.gamma, tuple(args.dense_layers))
    session = Session.load(args.model, args.device, args.dtype, args.attention, progress=not args.quiet)
    texts, result = session.generate([prompt] * args.batch, args.max_new_tokens, args.method, args.temperature,
                                     args.top_p, args.seed, use_cuda_graph=not args.no_cuda_graph, spec=spec)
    print(texts[0])
    s = result.stats
    speed = f"{s['tokens_per_s']:.1f} tok/s incl. prefill"
    if "decode_tokens_per_s" in s:
        speed += f", {s['decode_tokens_per_s']:.1f} tok/s decode"
    if "mean_accepted_len" in s:
        speed += f", {s['mean_accepted_len']:.2f} tokens per verification"
    print(f"[{s['method']}] {s['new_tokens']} new tokens in {s['total_s']:.2f} s ({speed}) "
          f"on {session.device} {str(session.dtype).removeprefix('torch.')}", file=sys.stderr)
    if args.json:
        from .evaluation.results import write_json_atomic
        write_json_atomic(args.json, {"texts": texts, "tokens": result.tokens, "stats": s})
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specattn",
                                description="Long-context decoding with speculation and sparse attention.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt and report tokens/s")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint folder, .gguf file or {DEFAULT_MODEL}")
    g.add_argument("--prompt")
    g.add_argument("--prompt-file")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--method", default="ar", help="ar, specattn-y, vegas, magicdec, quest or selfspec-full")
    g.add_argument("--budget", type=float, default=256,
                   help="KV budget of a draft step: tokens, or a fraction of the context if below 1")
    g.add_argument("--gamma", type=int, default=4, help="draft tokens per verification")
    g.add_argument("--dense-layers", type=int, nargs="*", default=[0],
                   help="layers that draft with the full cache (default: 0)")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecAttnError as e:
        print(f"specattn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
