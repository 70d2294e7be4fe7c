"""Paged KV cache: fixed-size pages, one page table per sequence, O(1) rollback.

Layout (the contract between this module, the model and every attention kernel):

    k, v        [num_layers, num_pages, page_size, num_kv_heads, head_dim]   model dtype
    key_min/max [num_layers, num_pages, num_kv_heads, head_dim]              model dtype (optional)
    page_table  [max_batch, max_pages_per_seq]  int32, page ids; unused entries hold 0
    lens        [max_batch]                     int32, tokens stored per sequence

Token `t` of sequence `b` lives in page `page_table[b, t // page_size]` at row `t % page_size`.
A page of one KV head is `page_size * head_dim` contiguous-by-row elements, so a flat view
`k[layer].view(-1, num_kv_heads, head_dim)` is indexed by slot `page * page_size + row`.

`lens` and `page_table` live on the device so a decode step can be captured in a CUDA graph:
the step derives positions and write slots from them on the device. Page allocation is plain
Python on a host mirror of the lengths; `reserve()` must run before a step that appends.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import CacheFullError, InvalidInputError
from .kernels import reference

DEFAULT_PAGE_SIZE = 16


@dataclass
class StepView:
    """What one forward step needs to know about the cache, all on the device.

    positions:  [batch, q_len] int64, absolute position of each new token
    slots:      [batch * q_len] int64, flat slot each new token's K/V is written to
    lens_after: [batch] int32, KV length of each sequence once the new tokens are written
    attend_lens: [batch] int32, keys dense attention reads: lens_after, but only the new block for idle sequences
    """
    positions: torch.Tensor
    slots: torch.Tensor
    lens_after: torch.Tensor
    page_table: torch.Tensor
    q_len: int
    max_kv_len: int | None = None  # host hint for reference paths; None inside CUDA graphs
    selection: object | None = None        # a selection.PageSelection: sparse attention (draft steps)
    page_mass: torch.Tensor | None = None  # [layers, batch, kv_heads, max_pages], filled by a verify step
    mass_tokens: int | None = None         # measure that mass per block of this many keys (None: per page)
    mass_layers: frozenset | None = None   # only these layers fill page_mass (None: all)
    token_scores: torch.Tensor | None = None   # [layers, batch, max_tokens]: Vegas scores of a verify step
    step_mass: object | None = None        # paged_attention.StepMass while a step's layers fill page_mass
    # Studies (reference attention, any device): record head-averaged probabilities per layer into this dict,
    # and/or restrict keys per layer: key_masks[layer] is a [batch, 1 | kv_heads, q_len, kv_len] bool mask or a
    # function (layer, q, k_pages, view) -> such a mask.
    attention_probs: dict | None = None
    record_layers: frozenset | None = None     # record only these layers (None: all); the rest run the fast path
    key_masks: dict | None = None
    attend_lens: torch.Tensor | None = None    # None: lens_after
    # Sequences (at most) that read their whole length while the rest idle (a fixed batch's tail): dense attention
    # plans its splits for these. A host number, so a graph captured with it serves only such steps. None: all.
    active: int | None = None

    def attention_lens(self) -> torch.Tensor:
        return self.lens_after if self.attend_lens is None else self.attend_lens


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without stalling the host: on CUDA through pinned memory and an
    asynchronous copy (a pageable copy would wait for every kernel queued before it)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, max_batch: int, max_seq_len: int, *,
                 page_size: int = DEFAULT_PAGE_SIZE, num_pages: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 track_key_bounds: bool = False):
        if max_batch <= 0 or max_seq_len <= 0 or page_size <= 0:
            raise InvalidInputError("batch, max sequence length and page size must be positive")
        self.cfg = cfg
        self.page_size = page_size
        self.max_batch = max_batch
        self.max_pages_per_seq = -(-max_seq_len // page_size)
        self.num_pages = num_pages or max_batch * self.max_pages_per_seq
        self.dtype, self.device = dtype, torch.device(device)
        shape = (cfg.num_layers, self.num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.track_key_bounds = track_key_bounds
        if track_key_bounds:
            bshape = (cfg.num_layers, self.num_pages, cfg.num_kv_heads, cfg.head_dim)
            self.key_min = torch.zeros(bshape, dtype=dtype, device=self.device)
            self.key_max = torch.zeros(bshape, dtype=dtype, device=self.device)
        self.page_table = torch.zeros(max_batch, self.max_pages_per_seq, dtype=torch.int32, device=self.device)
        self.lens = torch.zeros(max_batch, dtype=torch.int32, device=self.device)
        # Idle sequences already have their tokens but still step with the batch (outputs dropped): attention
        # reads only their new block, so a batch's stragglers do not pay for the finished sequences' KV.
        self.idle = torch.zeros(max_batch, dtype=torch.bool, device=self.device)
        self._idle_host = [False] * max_batch
        self._free_pages = list(range(self.num_pages - 1, -1, -1))
        self._pages: list[list[int]] = [[] for _ in range(max_batch)]
        self._host_lens = [0] * max_batch
        self.batch = 0
        self.kv_bytes_read = 0

    # ---- bookkeeping (host side) -------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        return self.cfg.kv_bytes_per_token * self.k.element_size()

    def host_lens(self) -> list[int]:
        return self._host_lens[: self.batch]

    def reset(self, batch: int) -> None:
        """Drop every sequence and start `batch` empty ones."""
        if not 0 < batch <= self.max_batch:
            raise InvalidInputError(f"batch {batch} is outside 1..{self.max_batch} that this cache was built for")
        for b in range(self.max_batch):
            self._release_pages(b, 0)
            self._host_lens[b] = 0
        self.lens.zero_()
        self.mark_idle([False] * self.max_batch)
        self.batch = batch
        self.kv_bytes_read = 0

    def mark_idle(self, flags: list[bool]) -> None:
        """Sequences (from the first) whose outputs are no longer used: later steps' attention reads only their
        new tokens. Copies to the device only when the flags change."""
        if flags != self._idle_host[: len(flags)]:
            self._idle_host[: len(flags)] = flags
            self.idle[: len(flags)] = to_device(flags, torch.bool, self.device)

    def mark_idle_on_device(self, flags: torch.Tensor) -> None:
        """mark_idle from a device tensor [batch] bool, without a sync (AR decoding after stop tokens)."""
        self.idle[: flags.shape[0]].copy_(flags)
        self._idle_host = [None] * self.max_batch         # unknown on the host: the next mark_idle copies

    def reserve(self, new_tokens: int, rows: slice | None = None) -> None:
        """Make room for `new_tokens` more tokens in every active sequence (or only in `rows`).
        All or nothing: on CacheFullError no page has been taken."""
        need = {}
        for b in self._seqs(rows):
            pages = -(-(self._host_lens[b] + new_tokens) // self.page_size)
            if pages > self.max_pages_per_seq:
                raise CacheFullError(
                    f"sequence {b} needs {self._host_lens[b] + new_tokens} tokens but the cache holds "
                    f"{self.max_pages_per_seq * self.page_size} per sequence; build it with a larger max_seq_len")
            need[b] = pages
        if sum(max(0, n - len(self._pages[b])) for b, n in need.items()) > len(self._free_pages):
            raise CacheFullError(
                f"the KV cache ran out of its {self.num_pages} pages; give it more pages or a smaller batch")
        changed = []
        for b, n in need.items():
            while len(self._pages[b]) < n:
                self._pages[b].append(self._free_pages.pop())
                changed.append((b, len(self._pages[b]) - 1, self._pages[b][-1]))
        if changed:
            rows, cols, ids = zip(*changed, strict=False)
            rows_t, cols_t = to_device(rows, torch.long, self.device), to_device(cols, torch.long, self.device)
            self.page_table[rows_t, cols_t] = to_device(ids, torch.int32, self.device)

    def advance(self, q_len: int, rows: slice | None = None) -> None:
        """Record that every active sequence (or only `rows`) gained `q_len` tokens, once a step wrote them."""
        rows = rows or slice(0, self.batch)
        for b in self._seqs(rows):
            self._host_lens[b] += q_len
        self.lens[rows] += q_len

    def _seqs(self, rows: slice | None) -> range:
        return range(self.batch)[rows or slice(None)]

    def truncate(self, new_lens: list[int], spare_tokens: int = 0, lens_on_device: bool = False) -> None:
        """Roll sequences back to `new_lens` tokens. O(1) in tokens: only lengths and trailing pages change.

        Key bounds of a page cut in the middle stay a valid (looser) upper bound until the next write
        to that page recomputes them. spare_tokens: pages for this many tokens past each new length stay
        reserved (a step already queued writes there). lens_on_device: a queued kernel already set the device
        lengths to new_lens; only the host side changes (no copy that would wait behind it).
        """
        if len(new_lens) != self.batch:
            raise InvalidInputError(f"truncate got {len(new_lens)} lengths for a batch of {self.batch}")
        for b, n in enumerate(new_lens):
            if not 0 <= n <= self._host_lens[b]:
                raise InvalidInputError(f"cannot truncate sequence {b} from {self._host_lens[b]} to {n} tokens")
            self._host_lens[b] = n
            self._release_pages(b, -(-(n + spare_tokens) // self.page_size))
        if not lens_on_device:
            self.lens[: self.batch] = to_device(new_lens, torch.int32, self.device)

    def _release_pages(self, b: int, keep: int) -> None:
        while len(self._pages[b]) > keep:
            self._free_pages.append(self._pages[b].pop())

    # ---- per-step views (device side, graph friendly) ------------------------------------
    def step_view(self, q_len: int, rows: slice | None = None, static: bool = False) -> StepView:
        """Positions and write slots for `q_len` new tokens in every active sequence (or only `rows`),
        computed on the device. `static=True` leaves out host hints so the step can be graph-captured."""
        rows = rows or slice(0, self.batch)
        if not static:   # a step past the reserved pages would write through stale page-table entries
            for b in self._seqs(rows):
                if len(self._pages[b]) * self.page_size < self._host_lens[b] + q_len:
                    raise RuntimeError(f"sequence {b}: reserve({q_len}) must precede a step of {q_len} tokens")
        lens, page_table = self.lens[rows], self.page_table[rows]
        positions = lens.long()[:, None] + torch.arange(q_len, device=self.device)
        pages = torch.gather(page_table.long(), 1, positions // self.page_size)
        slots = (pages * self.page_size + positions % self.page_size).reshape(-1)
        max_kv_len = None if static else max(self._host_lens[b] for b in self._seqs(rows)) + q_len
        lens_after = lens + q_len
        view = StepView(positions, slots, lens_after, page_table, q_len, max_kv_len)
        view.attend_lens = torch.where(self.idle[rows], q_len, lens_after)
        return view

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, view: StepView) -> None:
        """Store new keys/values. k, v: [batch, q_len, kv_heads, head_dim]. (The model's GPU path writes through
        kernels/rope_kv.py, fused with the rotary embedding, and then calls `wrote`.)"""
        reference.write_kv(self.k[layer], self.v[layer], k, v, view.slots)
        self.wrote(layer, view)

    def wrote(self, layer: int, view: StepView) -> None:
        """Bookkeeping after the new tokens' K/V landed in their slots (by `write` or a fused kernel)."""
        if self.track_key_bounds:
            self._update_key_bounds(layer, view)

    def _update_key_bounds(self, layer: int, view: StepView) -> None:
        args = (self.k[layer], self.key_min[layer], self.key_max[layer], view.page_table, view.lens_after, view.q_len)
        if self.k.is_cuda:
            from .kernels.quest import update_key_bounds
            update_key_bounds(*args)
        else:
            reference.update_key_bounds(*args)

    def count_read(self, tokens_read: int) -> None:
        """Account KV bytes read by attention over all layers for `tokens_read` (sum over sequences)."""
        self.kv_bytes_read += tokens_read * self.bytes_per_token

    def gather(self, layer: int, b: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous K, V of one sequence: [kv_heads, length, head_dim] (reference paths, tests)."""
        length = self._host_lens[b] if length is None else length
        n_pages = -(-length // self.page_size)
        pages = self.page_table[b, :n_pages].long()
        k = self.k[layer][pages].reshape(-1, self.cfg.num_kv_heads, self.cfg.head_dim)[:length]
        v = self.v[layer][pages].reshape(-1, self.cfg.num_kv_heads, self.cfg.head_dim)[:length]
        return k.transpose(0, 1), v.transpose(0, 1)
