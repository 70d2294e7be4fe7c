"""`--method auto`: speculate only where it pays, decided by measurement on this machine and model.

For a (model, device, batch, context bucket) never seen before, a short probe decodes the request's own prompts
with each candidate (plain AR and the lossless self-speculative methods at the requested budget and gamma) and
keeps the fastest by decode tokens/s; the choice is cached in a JSON file, so later requests of the same shape
go straight to it. Every candidate is lossless, so the output is AR's whatever is chosen.

This is the measured-once part of issue 9; switching method inside a run as the context grows, and adaptive
gamma, are not built yet.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .api import SpeculationParams, make_policy
from .cache import PagedKVCache
from .decoding.ar import GenerationParams, GenerationResult, generate_ar
from .decoding.self_speculative import cache_tokens_needed, generate_self_speculative
from .evaluation.results import write_json_atomic
from .model import Transformer

CANDIDATES = ("ar", "magicdec", "specattn-y")
PROBE_TOKENS = 32


def default_cache_path() -> Path:
    root = os.environ.get("SPECATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "specattn")
    return Path(root) / "auto.json"


def shape_key(model: Transformer, device: torch.device, batch: int, context: int, spec: SpeculationParams,
              sampling_greedy: bool) -> str:
    source = getattr(model, "source", None)
    cfg = model.cfg
    name = str(getattr(source, "path", "")) or f"{cfg.architecture}-{cfg.num_layers}x{cfg.hidden_size}"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bucket = 1 << max(0, math.ceil(math.log2(max(context, 1))))
    mode = "greedy" if sampling_greedy else "sampling"
    return f"{name}|{dev}|{model.embed.weight.dtype}|b{batch}|ctx<={bucket}|budget{spec.budget:g}|g{spec.gamma}|{mode}"


def _run(model: Transformer, method: str, prompts: list[list[int]], params: GenerationParams,
         spec: SpeculationParams) -> GenerationResult:
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    need = cache_tokens_needed(max(len(p) for p in prompts), params.max_new_tokens, spec.gamma)
    if method == "ar":
        return generate_ar(model, PagedKVCache(model.cfg, len(prompts), need, dtype=dtype, device=device), prompts,
                           params)
    policy = make_policy(method, spec, model.cfg.num_layers)
    cache = PagedKVCache(model.cfg, len(prompts), need, dtype=dtype, device=device,
                         track_key_bounds=policy.needs_key_bounds)
    return generate_self_speculative(model, cache, prompts, params, policy, spec.gamma)


def probe(model: Transformer, prompts: list[list[int]], params: GenerationParams,
          spec: SpeculationParams) -> dict[str, float]:
    """Decode tokens/s of each candidate on these prompts (after one warm-up run each)."""
    short = GenerationParams(max_new_tokens=min(PROBE_TOKENS, params.max_new_tokens), sampling=params.sampling,
                             use_cuda_graph=params.use_cuda_graph, prefill_chunk=params.prefill_chunk)
    speeds = {}
    context = min(len(p) for p in prompts)
    for method in CANDIDATES:
        if method != "ar" and spec.budget >= 1 and spec.budget >= context:
            continue                                  # nothing to drop: speculation cannot be sparse here
        _run(model, method, prompts, short, spec)     # compiles kernels and captures graphs
        speeds[method] = _run(model, method, prompts, short, spec).stats["decode_tokens_per_s"]
    return speeds


def generate_auto(model: Transformer, prompts: list[list[int]], params: GenerationParams,
                  spec: SpeculationParams, cache_path: Path | None = None) -> GenerationResult:
    cache_path = cache_path or default_cache_path()
    key = shape_key(model, model.embed.weight.device, len(prompts), max(len(p) for p in prompts), spec,
                    params.sampling.greedy)
    try:
        known = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    except ValueError:
        known = {}                                    # a damaged cache file is re-measured, not fatal
    probed = key not in known
    if probed:
        speeds = probe(model, prompts, params, spec)
        known[key] = {"choice": max(speeds, key=speeds.get), "decode_tokens_per_s": speeds}
        write_json_atomic(cache_path, known)
    choice = known[key]["choice"]
    result = _run(model, choice, prompts, params, spec)
    result.stats.update({"auto_choice": choice, "auto_probed": probed,
                         "auto_probe_decode_tokens_per_s": known[key]["decode_tokens_per_s"], "auto_key": key})
    result.stats["method"] = f"auto:{result.stats['method']}"
    return result
