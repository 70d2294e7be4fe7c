"""Perplexity of a model on a token sequence, through the paged cache (the runtime under test)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..cache import PagedKVCache
from ..model import Transformer


@torch.no_grad()
def perplexity(model: Transformer, token_ids: list[int], chunk: int = 512) -> float:
    """exp(mean NLL of tokens 1..n given their prefix), prefilling `chunk` tokens at a time."""
    cache = PagedKVCache(model.cfg, 1, len(token_ids), dtype=model.embed.weight.dtype,
                         device=model.embed.weight.device)
    cache.reset(1)
    ids = torch.tensor(token_ids, device=cache.device)
    total_nll = 0.0
    for start in range(0, len(token_ids) - 1, chunk):
        piece = ids[start:start + chunk]
        cache.reserve(len(piece))
        logits = model(piece[None], cache, cache.step_view(len(piece)), all_logits=True)[0]
        cache.advance(len(piece))
        targets = ids[start + 1:start + 1 + len(piece)]
        total_nll += F.cross_entropy(logits[: len(targets)], targets, reduction="sum").item()
    return math.exp(total_nll / (len(token_ids) - 1))
