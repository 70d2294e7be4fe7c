"""KV selection policies for sparse drafting: which pages each (layer, sequence, KV head) attends to.

A policy returns a `PageSelection` (or None for dense attention) before each round of draft steps and may
observe the page mass that the round's dense verification produced as a by-product. Pages are logical
page numbers of a sequence (page p holds tokens 16p .. 16p + 15). Invariants (tested): never more pages
than the budget, sink pages and the pages of the recent window (which include every token the draft steps
write) always present, lists sorted ascending and padded with -1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cache import PagedKVCache
from .errors import InvalidInputError


@dataclass
class PageSelection:
    pages: torch.Tensor                  # [layers, batch, kv_heads, K] int32, ascending, -1 padded
    counts: torch.Tensor                 # [layers, batch, kv_heads] int32
    dense_layers: frozenset[int] = frozenset()   # layers that attend to every page regardless

    def tokens_selected(self, page_size: int) -> int:
        """Token slots the draft attention reads per step, summed over sparse layers, sequences and KV heads."""
        sparse = [layer for layer in range(self.counts.shape[0]) if layer not in self.dense_layers]
        return int(self.counts[sparse].sum().item()) * page_size if sparse else 0


def budget_pages(budget: float, context_tokens: int, page_size: int) -> int:
    """Budget given as tokens (>= 1) or as a fraction of the context (0 < budget < 1) -> pages."""
    if not budget > 0:
        raise InvalidInputError(f"KV budget {budget} must be > 0 (tokens, or a fraction of the context below 1)")
    tokens = budget * context_tokens if budget < 1 else budget
    return max(1, math.ceil(tokens / page_size))


class SelectionPolicy:
    """Base: dense drafting (the `full` control; acceptance must be 100% under greedy decoding)."""
    name = "full"
    wants_page_mass = False

    def reset(self, cache: PagedKVCache) -> None:
        pass

    def select(self, cache: PagedKVCache, gamma: int) -> PageSelection | None:
        return None

    def observe(self, page_mass: torch.Tensor) -> None:
        """page_mass: [layers, batch, kv_heads, max_pages] from the round's verification."""


class ScoredPagePolicy(SelectionPolicy):
    """Top pages by a per-(layer, sequence, KV head) score within a budget, plus sinks and a recent window."""

    def __init__(self, budget: float, sink_tokens: int = 16, window_tokens: int = 64,
                 dense_layers: tuple[int, ...] = ()):
        if sink_tokens < 0 or window_tokens < 0:
            raise InvalidInputError("sink and window sizes must be >= 0")
        self.budget, self.sink_tokens, self.window_tokens = budget, sink_tokens, window_tokens
        self.dense_layers = frozenset(dense_layers)

    def scores(self, cache: PagedKVCache) -> torch.Tensor | None:
        """[layers, batch, kv_heads, max_pages] or None (no preference: sinks + window only)."""
        return None

    def select(self, cache: PagedKVCache, gamma: int) -> PageSelection:
        cfg, ps = cache.cfg, cache.page_size
        lens = torch.tensor(cache.host_lens(), device=cache.device)
        draft_end = lens + gamma                       # tokens that exist once the draft steps ran
        n_pages = (draft_end + ps - 1) // ps           # [batch]
        max_pages = cache.max_pages_per_seq
        page = torch.arange(max_pages, device=cache.device)
        sink = page[None, :] < -(-self.sink_tokens // ps)
        window = page[None, :] >= ((lens - self.window_tokens).clamp(min=0) // ps)[:, None]
        valid = page[None, :] < n_pages[:, None]
        forced = (sink | window) & valid                                                   # [batch, pages]
        shape = (cfg.num_layers, cache.batch, cfg.num_kv_heads, max_pages)
        raw = self.scores(cache)
        score = torch.zeros(shape, device=cache.device) if raw is None else raw[..., :max_pages].float()
        score = torch.where(forced[None, :, None], float("inf"), score)
        score = torch.where(valid[None, :, None], score, float("-inf"))
        k = min(max_pages, max(budget_pages(self.budget, int(lens.max()), ps), int(forced.sum(-1).max())))
        top = score.topk(k, dim=-1)
        keep = top.values > float("-inf")
        if raw is None:                           # no score: only what is forced (sinks + window)
            keep &= torch.isinf(top.values)
        pages = torch.where(keep, top.indices, max_pages).sort(dim=-1).values
        counts = keep.sum(-1).to(torch.int32)
        pages = torch.where(pages == max_pages, -1, pages).to(torch.int32)
        return PageSelection(pages, counts, self.dense_layers)


class StreamingPolicy(ScoredPagePolicy):
    """MagicDec's StreamingLLM drafting: attention sinks plus the most recent tokens, budget = sinks + window."""
    name = "streaming"

    def __init__(self, budget: float, sink_tokens: int = 16, dense_layers: tuple[int, ...] = ()):
        super().__init__(budget, sink_tokens, 0, dense_layers)

    def select(self, cache: PagedKVCache, gamma: int) -> PageSelection:
        context = max(cache.host_lens())
        self.window_tokens = max(0, budget_pages(self.budget, context, cache.page_size) * cache.page_size
                                 - self.sink_tokens - gamma)
        return super().select(cache, gamma)


class VerificationGuidedPolicy(ScoredPagePolicy):
    """SpecAttn-Y, our generalisation: pages ranked by the attention mass the last verification gave them,
    per layer and KV head, summed over all verified rows and grouped query heads; sinks and a recent window
    always kept. Before the first verification it falls back to sinks + window."""
    name = "verification-guided"
    wants_page_mass = True
    _mass: torch.Tensor | None = None

    def reset(self, cache: PagedKVCache) -> None:
        self._mass = None

    def observe(self, page_mass: torch.Tensor) -> None:
        self._mass = page_mass

    def scores(self, cache: PagedKVCache) -> torch.Tensor | None:
        return self._mass


POLICIES = {"full": SelectionPolicy, "streaming": StreamingPolicy, "verification-guided": VerificationGuidedPolicy}
