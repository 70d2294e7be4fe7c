"""Turning logits into tokens: greedy, temperature and top-p (nucleus), seeded."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidInputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 means greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise InvalidInputError(f"temperature {self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top-p {self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [..., vocab] -> the distribution tokens are drawn from (temperature, then top-p)."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        probs = nucleus(probs, params.top_p)
    return probs


# H200, results/sampling.json (top-p 0.95 at T 0.6): the sorting-free kernel holds rows of up to 32K tokens in
# registers; longer rows are re-read from L2 on each of ~28 halvings, one program a row: ~55 µs for 49K tokens,
# ~250 µs for 128K, where sorting a few rows is cheaper (1 x 128K: sort 93 µs, kernel 276; 8 x 128K: 352 vs 283;
# 32 x 49K: 306 vs 82; 160 x 49K: 1217 vs 218). So rows longer than that sort below one row per 16K tokens.
TOKENS_PER_SORTED_ROW = 16384


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [..., vocab] restricted to the smallest top set holding mass >= top_p (tokens tied with the last one
    kept too), renormalised. On the GPU the set's threshold comes from the sorting-free kernel (kernels/topp.py)
    rather than a sort of the vocabulary, except for a few very long rows (TOKENS_PER_SORTED_ROW)."""
    rows = probs.reshape(-1, probs.shape[-1]).contiguous()
    from ..kernels import topp
    if probs.is_cuda and (rows.shape[1] <= topp.ROW_IN_REGISTERS
                          or rows.shape[0] * TOKENS_PER_SORTED_ROW >= rows.shape[1]):
        topp_threshold = topp.topp_threshold
    else:
        from ..kernels.reference import topp_threshold
    theta = topp_threshold(rows, top_p).view(probs.shape[:-1])
    kept = torch.where(probs >= theta[..., None], probs, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits: [batch, vocab] -> tokens [batch] (int64)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, params), 1, generator=generator).squeeze(-1)


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row of probs [batch, vocab] from uniforms u [batch] in (0, 1], by inverse CDF.

    Same distribution as torch.multinomial, but the randomness comes in as a tensor, so a CUDA graph can
    replay it with fresh numbers copied in. u > 0 never lands on a zero-probability token.
    """
    cdf = probs.cumsum(-1)
    index = (cdf < u[:, None] * cdf[:, -1:]).sum(-1)
    return index.clamp(max=probs.shape[-1] - 1)


def agree(tokens: torch.Tensor, model, params: SamplingParams) -> torch.Tensor:
    """Under tensor parallelism, tokens drawn at random are rank 0's on every rank (greedy ones agree anyway)."""
    if model.tp is not None and not params.greedy:
        model.tp.broadcast(tokens)
    return tokens
