"""Dense autoregressive decoding: the baseline every other method must match (greedy) or beat (speed)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..cache import PagedKVCache
from ..errors import InvalidInputError
from ..model import Transformer
from .runner import DEFAULT_PREFILL_CHUNK, StepRunner, check_prompts, prefill
from .sampling import SamplingParams, agree, sample

STOP_CHECK_EVERY = 16  # steps between host checks of stop tokens: one sync per 16 tokens, not per token


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    use_cuda_graph: bool = True
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise InvalidInputError(f"max new tokens must be > 0, got {self.max_new_tokens}")
        if self.prefill_chunk <= 0:
            raise InvalidInputError(f"prefill chunk must be > 0, got {self.prefill_chunk}")


@dataclass
class GenerationResult:
    tokens: list[list[int]]                      # new tokens per sequence, cut after the first stop token
    stats: dict = field(default_factory=dict)
    runner: object | None = None    # the run's step runner (CUDA graphs): pass it to a next run of the same shape


def cut_at_stop(tokens: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_step(model: Transformer, cache: PagedKVCache, runner: StepRunner, tok: torch.Tensor,
                sampling: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One dense step for every active sequence from its last token [batch]: the next tokens [batch]. Pages must
    be reserved; the step advances the cache and counts the KV it read."""
    logits = runner(tok[:, None])
    cache.advance(1)
    cache.count_read(sum(cache.host_lens()))
    return agree(sample(logits[:, -1], sampling, generator), model, sampling)


@torch.no_grad()
def generate_ar(model: Transformer, cache: PagedKVCache, prompts: list[list[int]],
                params: GenerationParams, runner: StepRunner | None = None) -> GenerationResult:
    """Generate up to `params.max_new_tokens` tokens per prompt, one dense decode step at a time."""
    check_prompts(model, cache, prompts, params.max_new_tokens)
    device = cache.device
    generator = torch.Generator(device=device).manual_seed(params.sampling.seed)
    runner = runner or StepRunner(model, cache, params.use_cuda_graph)
    stop_ids = torch.tensor(params.stop_token_ids or [-1], device=device)

    _sync(device)
    t0 = time.perf_counter()
    next_tok = agree(sample(prefill(model, cache, prompts, params.prefill_chunk), params.sampling, generator),
                     model, params.sampling)
    _sync(device)
    t_prefill = time.perf_counter() - t0

    cache.reserve(params.max_new_tokens - 1)     # pages for the whole run, so steps need no host work
    out = [next_tok]
    finished = torch.isin(next_tok, stop_ids)
    for step in range(1, params.max_new_tokens):
        if params.stop_token_ids and step % STOP_CHECK_EVERY == 0 and bool(finished.all()):
            break
        next_tok = decode_step(model, cache, runner, next_tok, params.sampling, generator)
        if params.stop_token_ids:
            finished |= torch.isin(next_tok, stop_ids)
            cache.mark_idle_on_device(finished)         # stopped sequences: attention reads only the new token
        out.append(next_tok)
    tokens = torch.stack(out, dim=1).tolist()
    t_total = time.perf_counter() - t0
    tokens = [cut_at_stop(t, params.stop_token_ids) for t in tokens]
    new = sum(len(t) for t in tokens)
    decode_tokens = (len(out) - 1) * len(prompts)
    return GenerationResult(tokens, {
        "method": "ar", "new_tokens": new, "prefill_s": t_prefill, "total_s": t_total,
        "tokens_per_s": new / t_total, "decode_tokens_per_s": decode_tokens / max(t_total - t_prefill, 1e-9),
        "kv_bytes_read": cache.kv_bytes_read,
    }, runner)
