"""One batch decoded as micro-batches, each with its own KV cache and CUDA stream, so the GPU runs one
micro-batch's steps beside another's.

A small model's sparse draft step is a chain of short kernels, each paying its own fill and drain with most of
the GPU idle in between; a dense verify (or AR) step streams the whole KV cache at close to copy bandwidth.
Queued on two streams, one micro-batch's verify fills the gaps of the other's drafts, and the host's per-round
work (one sync a round) hides behind the other micro-batch's kernels. Each micro-batch is an independent run
of the plain loop, so outputs are exactly the plain loops' (greedy: AR's tokens).
"""
from __future__ import annotations

import contextlib
import copy
import time

import torch

from ..cache import PagedKVCache
from ..errors import InvalidInputError
from ..model import Transformer
from ..selection import SelectionPolicy
from .ar import STOP_CHECK_EVERY, GenerationParams, GenerationResult, _sync, cut_at_stop, decode_step
from .runner import StepRunner, check_prompts, prefill, prepare_graphs
from .sampling import agree, sample
from .self_speculative import _Loop, cache_tokens_needed


def micro_batch_rows(batch: int, parts: int) -> list[slice]:
    """Consecutive rows of each micro-batch, sizes differing by at most one."""
    if parts < 1:
        raise InvalidInputError(f"micro-batches must be at least 1, got {parts}")
    if parts > batch:
        raise InvalidInputError(f"{parts} micro-batches need at least as many prompts; got {batch}")
    size, extra = divmod(batch, parts)
    rows, start = [], 0
    for i in range(parts):
        n = size + (i < extra)
        rows.append(slice(start, start + n))
        start += n
    return rows


def micro_batch_caches(model: Transformer, prompts: list[list[int]], parts: int, tokens: int, **cache_kwargs):
    """One KV cache per micro-batch, each sized for its rows and `tokens` per sequence."""
    return [PagedKVCache(model.cfg, r.stop - r.start, tokens, **cache_kwargs)
            for r in micro_batch_rows(len(prompts), parts)]


def _streams(device: torch.device, parts: int) -> list:
    if device.type != "cuda":
        return [None] * parts
    streams = [torch.cuda.Stream(device) for _ in range(parts)]
    for s in streams:                      # prefill ran on the current stream
        s.wait_stream(torch.cuda.current_stream(device))
    return streams


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _prefill_all(model, caches, groups, params, generators):
    _sync(caches[0].device)
    t0 = time.perf_counter()
    first = [agree(sample(prefill(model, c, g, params.prefill_chunk), params.sampling, gen), model, params.sampling)
             for c, g, gen in zip(caches, groups, generators, strict=True)]
    _sync(caches[0].device)
    return first, t0, time.perf_counter() - t0


def _split(caches: list[PagedKVCache], prompts: list[list[int]], params: GenerationParams):
    if not caches:
        raise InvalidInputError("micro-batches need at least one KV cache")
    groups = [prompts[r] for r in micro_batch_rows(len(prompts), len(caches))]
    generators = [torch.Generator(device=c.device).manual_seed(params.sampling.seed + i) for i, c in enumerate(caches)]
    return groups, generators


@torch.no_grad()
def generate_ar_micro_batches(model: Transformer, caches: list[PagedKVCache], prompts: list[list[int]],
                              params: GenerationParams, runners: list[StepRunner] | None = None) -> GenerationResult:
    """generate_ar with the batch split over len(caches) micro-batches (consecutive rows), their steps queued on
    one stream each. Returns the runners (one a micro-batch) to reuse their graphs."""
    groups, generators = _split(caches, prompts, params)
    for c, g in zip(caches, groups, strict=True):
        check_prompts(model, c, g, params.max_new_tokens)
    device = caches[0].device
    runners = runners or [StepRunner(model, c, params.use_cuda_graph) for c in caches]
    stop_ids = torch.tensor(params.stop_token_ids or [-1], device=device)
    toks, t0, t_prefill = _prefill_all(model, caches, groups, params, generators)
    streams = _streams(device, len(caches))
    outs = [[t] for t in toks]
    finished = [torch.isin(t, stop_ids) for t in toks]
    for c in caches:
        c.reserve(params.max_new_tokens - 1)
    for step in range(1, params.max_new_tokens):
        if params.stop_token_ids and step % STOP_CHECK_EVERY == 0 and all(bool(f.all()) for f in finished):
            break
        for i, (cache, runner, stream) in enumerate(zip(caches, runners, streams, strict=True)):
            with _on(stream):
                toks[i] = decode_step(model, cache, runner, toks[i], params.sampling, generators[i])
                if params.stop_token_ids:
                    finished[i] |= torch.isin(toks[i], stop_ids)
                    cache.mark_idle_on_device(finished[i])
                outs[i].append(toks[i])
    _sync(device)
    tokens = [cut_at_stop(t, params.stop_token_ids) for out in outs for t in torch.stack(out, dim=1).tolist()]
    t_total = time.perf_counter() - t0
    new = sum(len(t) for t in tokens)
    decode_tokens = (len(outs[0]) - 1) * len(prompts)
    return GenerationResult(tokens, {
        "method": "ar", "micro_batches": len(caches), "new_tokens": new, "prefill_s": t_prefill, "total_s": t_total,
        "tokens_per_s": new / t_total, "decode_tokens_per_s": decode_tokens / max(t_total - t_prefill, 1e-9),
        "kv_bytes_read": sum(c.kv_bytes_read for c in caches),
    }, runners)


@torch.no_grad()
def generate_self_speculative_micro_batches(model: Transformer, caches: list[PagedKVCache],
                                            prompts: list[list[int]], params: GenerationParams,
                                            policy: SelectionPolicy, gamma: int = 4,
                                            steps: list[dict] | None = None) -> GenerationResult:
    """generate_self_speculative with the batch split over len(caches) micro-batches (consecutive rows). Each has
    its own copy of the policy, graphs and stream; one micro-batch's round is queued while the host waits for
    another's accepted counts. `steps`: what an earlier run on the same caches returned (its graphs)."""
    if gamma <= 0:
        raise InvalidInputError(f"gamma (draft tokens per round) must be > 0, got {gamma}")
    groups, generators = _split(caches, prompts, params)
    for c, g in zip(caches, groups, strict=True):
        check_prompts(model, c, g, cache_tokens_needed(0, params.max_new_tokens, gamma))
    policy.check_context(max(len(q) for q in prompts))
    device = caches[0].device
    prepare_graphs(model, caches[0], params.use_cuda_graph)
    policies = [policy] + [copy.deepcopy(policy) for _ in caches[1:]]
    toks, t0, t_prefill = _prefill_all(model, caches, groups, params, generators)
    steps = steps or [{} for _ in caches]
    loops = [_Loop(model, c, params, gen, tok, gamma, s)
             for c, gen, tok, s in zip(caches, generators, toks, steps, strict=True)]
    for p, c in zip(policies, caches, strict=True):
        p.reset(c)
    streams = _streams(device, len(caches))
    pending = []
    for loop, p, stream in zip(loops, policies, streams, strict=True):
        with _on(stream):
            pending.append(loop.launch_round(gamma, p))
    while any(r is not None for r in pending):
        for i, (loop, p, stream) in enumerate(zip(loops, policies, streams, strict=True)):
            if pending[i] is None:
                continue
            with _on(stream):
                loop.finish_round(pending[i])
                pending[i] = None if loop.log.finished() else loop.launch_round(gamma, p)
    _sync(device)
    total = time.perf_counter() - t0
    return GenerationResult([t for loop in loops for t in loop.log.tokens()],
                            _merged_stats(loops, policy, gamma, total, t_prefill), [loop.steps for loop in loops])


def _merged_stats(loops: list[_Loop], policy: SelectionPolicy, gamma: int, total: float, prefill_s: float) -> dict:
    """One run's stats from its micro-batches. Rounds: the batch-weighted mean of theirs, so that batch x mean
    accepted length x rounds stays the steady-state token count. Phase seconds are sums over micro-batches, which
    overlap in time."""
    logs = [loop.log for loop in loops]
    batch = sum(loop.batch for loop in loops)
    accepted = [a for log in logs for a in log.accepted]
    drafted = sum(log.drafted for log in logs)
    rounds = sum(loop.batch * max(loop.log.rounds_by_sequence) for loop in loops) / batch   # the slowest's
    mean_len = 1 + sum(accepted) / max(1, len(accepted))
    new = sum(len(t) for log in logs for t in log.tokens())
    decode_s = max(total - prefill_s, 1e-9)
    phases = {}
    for loop in loops:
        for k, v in loop.timer.totals().items():
            phases[k] = phases.get(k, 0.0) + v
    return {
        "method": "self-spec:" + policy.name, "micro_batches": len(loops), "gamma": gamma, "new_tokens": new,
        "total_s": total, "tokens_per_s": new / total, "prefill_s": prefill_s,
        "decode_tokens_per_s": (new - batch) / decode_s, "rounds": rounds,
        "decode_tokens_per_s_steady": batch * mean_len * rounds / decode_s,
        "mean_accepted_len": mean_len, "acceptance_rate": sum(accepted) / max(1, drafted),
        "acceptance_per_position": [sum(a > i for a in accepted) / max(1, len(accepted)) for i in range(gamma)],
        "rounds_by_sequence": [n for log in logs for n in log.rounds_by_sequence],
        "kv_bytes_read_prefill_and_verify": sum(loop.cache.kv_bytes_read for loop in loops),
        "kv_bytes_read_draft": int(sum(int(loop.draft_bytes) for loop in loops)),
        **phases,
    }

