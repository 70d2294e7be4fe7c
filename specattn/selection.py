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

from .cache import PagedKVCache, to_device
from .errors import InvalidInputError

# Selections made on the device (inside the draft graph) also carry their pages as physical page ids, so the
# sparse kernel loads K without a page-table lookup in between (kernels/paged_attention.py, selected_physical).
# Off until the GPU has timed it (benchmarks/sparse_scaling.py, kernels.py: us_physical_lists).
PHYSICAL_LISTS = False


@dataclass
class PageSelection:
    pages: torch.Tensor                  # [layers, batch, kv_heads, K] int32, ascending, -1 padded
    counts: torch.Tensor                 # [layers, batch, kv_heads] int32
    dense_layers: frozenset[int] = frozenset()   # layers that attend to every page regardless
    token_level: bool = False            # `pages` holds token positions (Vegas) instead of pages
    physical: torch.Tensor | None = None  # `pages` as physical pages (PHYSICAL_LISTS), for the Triton kernel

    def pages_for(self, layer: int, q: torch.Tensor, view, kernels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The page lists of one layer for this step: [batch, kv_heads, K] and counts [batch, kv_heads]."""
        return self.pages[layer], self.counts[layer]

    def tokens_selected(self, page_size: int) -> torch.Tensor:
        """Token slots the draft attention reads per step, summed over sparse layers, sequences and KV heads
        (a device scalar: reading it would sync the loop)."""
        sparse = [layer for layer in range(self.counts.shape[0]) if layer not in self.dense_layers]
        per_item = 1 if self.token_level else page_size
        if not sparse:
            return torch.zeros((), dtype=torch.long, device=self.counts.device)
        # Indexing with a host list would copy it synchronously, stalling the host until the queued draft ran.
        layers = to_device(sparse, torch.long, self.counts.device)
        return self.counts.index_select(0, layers).sum() * per_item


def top_pages(score: torch.Tensor, forced: torch.Tensor, valid: torch.Tensor, k: int,
              forced_only: bool = False, k_device: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best pages by score, forced pages first, never an invalid one. score: [..., batch, kv_heads, pages];
    forced, valid: [batch, pages]. Returns ascending page lists [..., K] (-1 padded) and counts [...].
    k_device (a device scalar): keep only that many of the k, for a list width fixed in advance."""
    max_pages = score.shape[-1]
    score = torch.where(forced[:, None], float("inf"), score.float())
    score = torch.where(valid[:, None], score, float("-inf"))
    top = score.topk(min(k, max_pages), dim=-1)
    keep = top.values > float("-inf")
    if k_device is not None:
        keep &= torch.arange(top.values.shape[-1], device=score.device) < k_device
    if forced_only:
        keep &= torch.isinf(top.values)
    pages = torch.where(keep, top.indices, max_pages).sort(dim=-1).values
    return torch.where(pages == max_pages, -1, pages).to(torch.int32), keep.sum(-1).to(torch.int32)


@dataclass
class QuestSelection:
    """Quest drafting: at every step and layer, the pages whose key min/max bound q.k highest for the current
    query (per KV head: max over its query heads), plus the forced sinks and window."""
    budget_pages: int
    token_level = False
    physical = None                      # no physical lists (PageSelection's) for lists chosen per step
    forced: torch.Tensor                 # [batch, max_pages]
    valid: torch.Tensor                  # [batch, max_pages]
    key_min: torch.Tensor                # [layers, pages, kv_heads, dim], the cache's page bounds
    key_max: torch.Tensor
    page_size: int
    dense_layers: frozenset[int] = frozenset()

    def pages_for(self, layer: int, q: torch.Tensor, view, kernels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """kernels: the Triton path (scores, then a sorting-free top-k: two launches a layer instead of ~10)."""
        if kernels:
            from .kernels.quest import quest_page_scores, select_top_pages
        else:
            from .kernels.reference import quest_page_scores
            select_top_pages = top_pages
        scores = quest_page_scores(q[:, -1], self.key_min[layer], self.key_max[layer],
                                   view.page_table, view.lens_after, self.page_size)
        return select_top_pages(scores, self.forced, self.valid, self.budget_pages)

    def tokens_selected(self, page_size: int) -> torch.Tensor:
        """Token slots listed per step: min(budget, pages that exist) per sequence, KV head and sparse layer
        (which pages is decided per step; how many is not). A device scalar."""
        sparse_layers = self.key_min.shape[0] - len(self.dense_layers)
        per_seq = self.valid.sum(-1).clamp(max=self.budget_pages)
        return per_seq.sum() * (self.key_min.shape[2] * sparse_layers * page_size)


def _at_least_0(x):
    """max(x, 0) of an int or elementwise of a tensor."""
    return max(x, 0) if isinstance(x, int) else x.clamp(min=0)


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
    wants_token_scores = False
    needs_key_bounds = False
    # Whether lists of select_on_device's width hold every round's selection (so the next round's drafts can be
    # queued before its lengths are known on the host); not for Vegas, whose lists grow with the context.
    device_lists_always_fit = True

    def reset(self, cache: PagedKVCache) -> None:
        pass

    def settings(self) -> tuple:
        """The class and every setting, without the state a run builds up (underscored attributes): two policies
        with equal settings select alike, so graphs captured for one serve the other."""
        return type(self), tuple(sorted((k, v) for k, v in vars(self).items() if not k.startswith("_")))

    def check_context(self, context_tokens: int) -> None:
        """Reject a budget that leaves nothing to drop from a context of this many tokens."""

    def select(self, cache: PagedKVCache, gamma: int) -> PageSelection | None:
        return None

    def observe(self, page_mass: torch.Tensor) -> None:
        """page_mass: [layers, batch, kv_heads, max_pages] from the round's verification."""

    def mass_this_round(self) -> bool:
        """Called once at each round: whether its verification should produce the by-product this policy ranks by
        (always, but for SpecAttn-Y with mass_every > 1)."""
        return True

    def observe_token_scores(self, scores: torch.Tensor, verify_start: list[int]) -> None:
        """scores: [layers, batch, max_tokens] (Vegas); verify_start: first position of the verify window."""

    def fits_device_lists(self, cache: PagedKVCache, gamma: int, width: int) -> bool:
        """Whether this round's selection fits lists of `width` (select_on_device's); if not, select() serves."""
        return True


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

    def check_context(self, context_tokens: int) -> None:
        if self.budget >= 1 and self.budget >= context_tokens:
            raise InvalidInputError(
                f"KV budget of {self.budget:g} tokens is not below the {context_tokens}-token prompt, so drafting "
                "would not be sparse; give a smaller --budget (or a fraction below 1), or use --method selfspec-full")

    def first_window_page(self, lens, n_pages, gamma: int, ps: int, context_tokens: int):
        """First page of the recent window of sequences of `lens` tokens whose draft steps fill `n_pages` pages
        (ints on the host, or tensors on the device): the page holding the window_tokens-th last token.
        context_tokens: what a fractional budget is a fraction of."""
        return _at_least_0(lens - self.window_tokens) // ps

    def most_window_pages(self, gamma: int, ps: int) -> int:
        """Most pages a recent window (drafts included) can span."""
        return -(-(self.window_tokens + gamma) // ps) + 1     # + 1: a window straddles a page boundary

    def forced_pages(self, cache: PagedKVCache, gamma: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(forced [batch, pages]: sinks + recent window incl. the draft tokens, valid [batch, pages], k)."""
        ps = cache.page_size
        host_lens = cache.host_lens()
        sink_pages = -(-self.sink_tokens // ps)
        n_pages = [-(-(n + gamma) // ps) for n in host_lens]        # pages that exist once the draft steps ran
        first_window = [self.first_window_page(n, p, gamma, ps, max(host_lens))
                        for n, p in zip(host_lens, n_pages, strict=True)]
        # Counted on the host (a device count would sync the loop): pages that are sink or window or both.
        most_forced = max(min(sink_pages, f) + (p - f) for f, p in zip(first_window, n_pages, strict=True))
        forced, valid = self._page_masks(cache, to_device(first_window, torch.long, cache.device),
                                         to_device(n_pages, torch.long, cache.device))
        k = max(budget_pages(self.budget, max(host_lens), ps), most_forced)
        return forced, valid, k

    def _page_masks(self, cache: PagedKVCache, first_window: torch.Tensor,
                    n_pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(forced, valid) [batch, pages] from each sequence's first recent-window page and page count [batch]."""
        page = torch.arange(cache.max_pages_per_seq, device=cache.device)[None, :]
        valid = page < n_pages[:, None]
        sink_pages = -(-self.sink_tokens // cache.page_size)
        return ((page < sink_pages) | (page >= first_window[:, None])) & valid, valid

    def select(self, cache: PagedKVCache, gamma: int) -> PageSelection:
        forced, valid, k = self.forced_pages(cache, gamma)
        return self._top(cache, self.scores(cache), forced, valid, k)

    def _top(self, cache: PagedKVCache, raw, forced, valid, k: int, k_device=None) -> PageSelection:
        cfg = cache.cfg
        shape = (cfg.num_layers, cache.batch, cfg.num_kv_heads, cache.max_pages_per_seq)
        score = torch.zeros(shape, device=cache.device) if raw is None else raw[..., : cache.max_pages_per_seq]
        pages, counts = top_pages(score, forced, valid, k, forced_only=raw is None, k_device=k_device)
        return PageSelection(pages, counts, self.dense_layers)

    def device_list_width(self, cache: PagedKVCache, gamma: int) -> int | None:
        """Width of the page lists `select_on_device` returns: fixed when the budget is in tokens; None when it is
        a fraction of a context that grows (then only the host path, `select`, serves)."""
        if self.budget < 1:
            return None
        ps = cache.page_size
        most_forced = -(-self.sink_tokens // ps) + self.most_window_pages(gamma, ps)
        return min(cache.max_pages_per_seq, max(budget_pages(self.budget, 0, ps), most_forced))

    def select_on_device(self, cache: PagedKVCache, gamma: int, width: int, raw) -> PageSelection:
        """select() computed from the device lengths alone, so that it can run inside the draft steps' CUDA graph
        (no host work, no copy per round). The same pages as select(); `raw`: the scores to rank by, or None."""
        ps = cache.page_size
        lens = cache.lens[: cache.batch].long()
        sink_pages = -(-self.sink_tokens // ps)
        n_pages = (lens + gamma + ps - 1) // ps
        first_window = self.first_window_page(lens, n_pages, gamma, ps, 0)     # token budgets only here
        forced, valid = self._page_masks(cache, first_window, n_pages)
        most_forced = (first_window.clamp(max=sink_pages) + n_pages - first_window).max()
        k = most_forced.clamp(min=budget_pages(self.budget, 0, ps))
        selection = self._top(cache, raw, forced, valid, width, k_device=k)
        if PHYSICAL_LISTS:     # the drafts' pages are reserved by now, so the page table holds them all
            from .kernels.paged_attention import physical_pages
            selection.physical = physical_pages(cache.page_table, selection.pages)
        return selection


class StreamingPolicy(ScoredPagePolicy):
    """MagicDec's StreamingLLM drafting: attention sinks plus the most recent tokens, budget = sinks + window.
    The window is counted in pages: the last (budget - sink) pages, drafts' pages included, so the lists hold
    exactly the budget's pages, as SpecAttn-Y's do, whatever the page alignment of each sequence."""
    name = "streaming"

    def __init__(self, budget: float, sink_tokens: int = 16, dense_layers: tuple[int, ...] = ()):
        super().__init__(budget, sink_tokens, 0, dense_layers)

    def window_pages(self, gamma: int, ps: int, context_tokens: int = 0) -> int:
        """Pages of the recent window: what the budget leaves after the sinks, but at least the drafts' pages."""
        total = budget_pages(self.budget, context_tokens, ps)
        return max(total - -(-self.sink_tokens // ps), -(-gamma // ps) + 1)

    def first_window_page(self, lens, n_pages, gamma: int, ps: int, context_tokens: int):
        return _at_least_0(n_pages - self.window_pages(gamma, ps, context_tokens))

    def most_window_pages(self, gamma: int, ps: int) -> int:
        return self.window_pages(gamma, ps)


class VerificationGuidedPolicy(ScoredPagePolicy):
    """SpecAttn-Y, our generalisation: pages ranked by the attention mass the last verification gave them,
    per layer and KV head, summed over all verified rows and grouped query heads; sinks and a recent window
    always kept. Before the first verification it falls back to sinks + window."""
    name = "verification-guided"
    wants_page_mass = True
    _mass: torch.Tensor | None = None
    _rounds = 0

    def __init__(self, budget: float, sink_tokens: int = 16, window_tokens: int = 64,
                 dense_layers: tuple[int, ...] = (), mass_tokens: int | None = None, mass_every: int = 1):
        super().__init__(budget, sink_tokens, window_tokens, dense_layers)
        if mass_tokens is not None and (mass_tokens <= 0 or mass_tokens % 16):
            raise InvalidInputError(f"mass block of {mass_tokens} keys must be a positive multiple of 16")
        if mass_every < 1:
            raise InvalidInputError(f"mass every {mass_every} rounds: must be at least 1")
        self.mass_tokens = mass_tokens     # None: exact mass per page; 64: per 64-key block (free on the GPU)
        # Every k-th verification measures the mass; the rounds between rank by the last one and their verify steps
        # skip the by-product. Pages newer than that mass rank last, so the recent window (window_tokens) must
        # cover them: it does while mass_every x (gamma + 1) <= window_tokens (64: k up to 12 at gamma 4).
        self.mass_every = mass_every

    def reset(self, cache: PagedKVCache) -> None:
        self._mass = None
        self._rounds = 0

    def mass_this_round(self) -> bool:
        fresh = self._rounds % self.mass_every == 0
        self._rounds += 1
        return fresh

    def observe(self, page_mass: torch.Tensor) -> None:
        self._mass = page_mass

    def scores(self, cache: PagedKVCache) -> torch.Tensor | None:
        return self._mass


class QuestPolicy(ScoredPagePolicy):
    """Quest-style drafting (MagicDec's other draft): page selection from the query of every draft step and
    the cache's per-page key min/max; needs a cache built with track_key_bounds=True."""
    name = "quest"
    needs_key_bounds = True

    def device_list_width(self, cache: PagedKVCache, gamma: int) -> None:
        return None                  # its pages are chosen per draft step, from that step's query

    def select(self, cache: PagedKVCache, gamma: int) -> QuestSelection:
        if not cache.track_key_bounds:
            raise InvalidInputError("quest drafting needs per-page key bounds: build the cache with "
                                    "track_key_bounds=True")
        forced, valid, k = self.forced_pages(cache, gamma)
        return QuestSelection(k, forced, valid, cache.key_min, cache.key_max, cache.page_size, self.dense_layers)


class VegasPolicy(SelectionPolicy):
    """The recipe of Vegas (SpecAttn-Y v2) as its code does it: scores of the first and last verify rows,
    softmax-normalised, averaged over all heads; one token-level top-k per layer shared by every head over the
    context before the last verify window; that window and this round's drafts always attended; budget
    ceil(ratio x length), at least `min_tokens`; one selection for all gamma draft steps. The first round,
    before any verification, drafts densely."""
    name = "vegas"
    wants_token_scores = True
    device_lists_always_fit = False

    def __init__(self, ratio: float = 0.05, min_tokens: int = 256, dense_layers: tuple[int, ...] = ()):
        if not 0 < ratio <= 1 or min_tokens < 0:
            raise InvalidInputError(f"vegas budget ratio {ratio} must be in (0, 1] and min tokens >= 0")
        self.ratio, self.min_tokens, self.dense_layers = ratio, min_tokens, frozenset(dense_layers)
        self._scores, self._verify_start = None, None

    def reset(self, cache: PagedKVCache) -> None:
        self._scores, self._verify_start = None, None

    def observe_token_scores(self, scores: torch.Tensor, verify_start: list[int]) -> None:
        self._scores, self._verify_start = scores, verify_start

    def verify_start(self) -> list[int]:
        return self._verify_start

    def select(self, cache: PagedKVCache, gamma: int) -> PageSelection | None:
        if self._scores is None:
            return None
        start = to_device(self._verify_start, torch.long, cache.device)
        end = to_device(cache.host_lens(), torch.long, cache.device) + gamma
        return self._top(cache, self._scores, start, end, self._list_length(cache, gamma))

    def _list_length(self, cache: PagedKVCache, gamma: int) -> int:
        """Tokens listed per sequence this round: the budget plus the longest verify window and drafts."""
        lens = cache.host_lens()
        most_recent = max(n + gamma - s for n, s in zip(lens, self._verify_start, strict=True))
        return max(self.min_tokens, math.ceil(self.ratio * max(lens))) + most_recent

    def _top(self, cache: PagedKVCache, scores: torch.Tensor, start: torch.Tensor, end: torch.Tensor, k: int,
             k_device: torch.Tensor | None = None) -> PageSelection:
        """Token lists: the verify window and drafts [start, end) forced, then the best-scored earlier tokens."""
        pos = torch.arange(scores.shape[-1], device=cache.device)
        context = pos[None, :] < start[:, None]                                        # [batch, tokens]
        recent = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
        tokens, counts = top_pages(scores[:, :, None], recent, context | recent, k, k_device=k_device)
        heads = cache.cfg.num_kv_heads                                                  # shared by every head
        return PageSelection(tokens.expand(-1, -1, heads, -1).contiguous(), counts.expand(-1, -1, heads).contiguous(),
                             self.dense_layers, token_level=True)

    def device_list_width(self, cache: PagedKVCache, gamma: int) -> int:
        """List width for the draft graph: the budget at the cache's full length plus the verify window and drafts
        when the last round had this gamma (at most 2 gamma + 1 tokens). Longer windows (after a round of a larger
        gamma, or dense steps) fail fits_device_lists and take the host path."""
        capacity = cache.max_pages_per_seq * cache.page_size
        return min(capacity, max(self.min_tokens, math.ceil(self.ratio * capacity)) + 2 * gamma + 1)

    def fits_device_lists(self, cache: PagedKVCache, gamma: int, width: int) -> bool:
        return self._scores is None or self._list_length(cache, gamma) <= width

    def select_on_device(self, cache: PagedKVCache, gamma: int, width: int, raw) -> PageSelection | None:
        """select() from device state alone, for the draft graph: raw = (token scores, verify start [batch]) as the
        verify step left them, or None before the first verification (dense drafting). Same lists as select()."""
        if raw is None:
            return None
        scores, verify_start = raw
        lens = cache.lens[: cache.batch].long()
        start, end = verify_start.long(), lens + gamma
        # float64, as the host path's math.ceil on a Python float: the same budget to the token
        k = (lens.max().double() * self.ratio).ceil().long().clamp(min=self.min_tokens) + (end - start).max()
        return self._top(cache, scores, start, end, width, k_device=k)

    def scores(self, cache: PagedKVCache) -> torch.Tensor | None:
        return self._scores


POLICIES = {"full": SelectionPolicy, "streaming": StreamingPolicy, "verification-guided": VerificationGuidedPolicy,
            "quest": QuestPolicy, "vegas": VegasPolicy}
