"""Forward steps over the paged cache: chunked prefill, and decode/verify steps that run as CUDA
graphs on the GPU so that kernel-launch overhead does not dominate small models."""
from __future__ import annotations

import dataclasses
import time

import torch

from ..cache import PagedKVCache
from ..errors import ContextTooLongError, InvalidInputError
from ..model import EAGER, Transformer
from ..selection import PageSelection

DEFAULT_PREFILL_CHUNK = 2048      # prompt tokens per sequence per prefill forward
MAX_PREFILL_TOKENS = 32768        # tokens per prefill forward over all sequences: bounds activation memory


# A fixed batch waits for its slowest sequence. Once most sequences have their tokens they idle and their verify
# attention reads only the new block, but its splits were planned for the whole batch: a few long sequences then
# stream their whole context through a few programs while most SMs wait (Qwen2.5-1.5B, batch 64 x 32K: 3 splits per
# (sequence, KV head), so 4 sequences left run on 24 programs: 16.0 ms a verify step against 5.7 ms planned for
# them, H100). With TAIL_PLANS the tail's verify steps plan for the sequences left (tail_plan), and idle sequences'
# draft lists shrink to one entry (idle_lists_shortened). Draft-model speculation
# plans its verify steps and the draft model's dense steps the same way.
TAIL_PLANS = True


def check_prompts(model: Transformer, cache: PagedKVCache, prompts: list[list[int]], new_tokens: int) -> None:
    """One-line errors for requests that cannot be served, before anything is written."""
    if not prompts:
        raise InvalidInputError("no prompts given")
    if len(prompts) > cache.max_batch:
        raise InvalidInputError(f"batch of {len(prompts)} prompts exceeds the cache's max batch {cache.max_batch}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InvalidInputError(f"prompt {i} is empty; give at least one token")
        need = len(p) + new_tokens
        if need > model.cfg.max_positions:
            raise ContextTooLongError(
                f"prompt {i} has {len(p)} tokens + {new_tokens} new > the model's {model.cfg.max_positions} "
                "positions; shorten the prompt or ask for fewer new tokens")
        if need > cache.max_pages_per_seq * cache.page_size:
            raise ContextTooLongError(
                f"prompt {i} needs {need} tokens but the KV cache holds {cache.max_pages_per_seq * cache.page_size} "
                "per sequence; build the cache with a larger max_seq_len")
    pages_needed = sum(-(-(len(p) + new_tokens) // cache.page_size) for p in prompts)
    if pages_needed > cache.num_pages:
        raise ContextTooLongError(f"the request needs {pages_needed} KV pages but the cache has {cache.num_pages}; "
                                  "use a smaller batch or a larger cache")


def equal_length_runs(prompts: list[list[int]], chunk: int) -> list[slice]:
    """Consecutive prompts of equal length, prefilled together; each run small enough that one forward
    holds at most MAX_PREFILL_TOKENS tokens."""
    max_rows = max(1, MAX_PREFILL_TOKENS // min(chunk, max(len(p) for p in prompts)))
    runs, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or len(prompts[i]) != len(prompts[start]) or i - start == max_rows:
            runs.append(slice(start, i))
            start = i
    return runs


@torch.no_grad()
def prefill(model: Transformer, cache: PagedKVCache, prompts: list[list[int]],
            chunk: int = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
    """Write every prompt into a freshly reset cache, `chunk` tokens per sequence at a time so memory
    stays bounded for long prompts. Returns the logits of each prompt's last token: [batch, vocab]."""
    cache.reset(len(prompts))
    last = []
    for rows in equal_length_runs(prompts, chunk):
        ids = torch.tensor(prompts[rows], dtype=torch.long, device=cache.device)
        n = ids.shape[1]
        for start in range(0, n, chunk):
            piece = ids[:, start:start + chunk]
            cache.reserve(piece.shape[1], rows)
            logits = model(piece, cache, cache.step_view(piece.shape[1], rows))
            cache.advance(piece.shape[1], rows)
            cache.count_read(piece.shape[0] * (start + piece.shape[1]))  # a chunk reads its whole prefix once
        last.append(logits[:, -1])
    return torch.cat(last)


def prepare_graphs(model: Transformer, cache: PagedKVCache, use_cuda_graph: bool) -> bool:
    """Whether steps on this cache run as CUDA graphs; if so, the model's fused functions are compiled now (call it
    before a run's prefill, so that the prefill of a later run does not pay their compilation)."""
    use_graph = use_cuda_graph and cache.device.type == "cuda"
    if use_graph and model.step_fns is EAGER:
        model.compile_steps()
    return use_graph


class StepRunner:
    """Runs `model` on q_len new tokens for every active sequence; returns logits [batch, q_len, vocab].

    On CUDA each (batch, q_len) is captured once as a graph and replayed: the graph reads lengths and
    page tables from the cache's device tensors, so it stays valid as sequences grow. The caller
    reserves pages before and advances the cache after each step. A caller that says how many sequences are
    still generating (`active`; the rest idle) gets a fixed batch's tail planned for them (tail_plan).
    """

    def __init__(self, model: Transformer, cache: PagedKVCache, use_cuda_graph: bool = True):
        self.model, self.cache = model, cache
        self.use_graph = prepare_graphs(model, cache, use_cuda_graph)
        # by (batch, q_len, tail plan: None for the whole batch)
        self._graphs: dict[tuple[int, int, int | None], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def ready(self, batch: int, q_len: int) -> bool:
        """Whether a step of this shape runs without capturing first."""
        return not self.use_graph or (batch, q_len, None) in self._graphs

    def graph_count(self) -> int:
        return len(self._graphs)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, active: int | None = None) -> torch.Tensor:
        batch, q_len = tokens.shape
        plan = tail_plan(active, batch)
        if not self.use_graph:
            view = self.cache.step_view(q_len)
            view.active = plan
            return self.model(tokens, self.cache, view, all_logits=True)
        graph, static_in, static_out = planned_graph(self._graphs, lambda p: (batch, q_len, p), plan, active, batch,
                                                     lambda p: self._capture(batch, q_len, p))
        static_in.copy_(tokens)
        graph.replay()
        return static_out

    def _capture(self, batch: int, q_len: int, plan: int | None):
        static_in = torch.zeros(batch, q_len, dtype=torch.long, device=self.cache.device)

        def step():
            view = self.cache.step_view(q_len, static=True)
            view.active = plan
            return self.model(static_in, self.cache, view, all_logits=True)

        graph, static_out = capture_graph(step)
        return graph, static_in, static_out


_capture_seconds = 0.0


def capture_seconds() -> float:
    """Wall seconds this process has spent in capture_graph (compiling the step functions included: their first
    calls are the warm-up runs): a one-time cost per shape, which a run's tokens/s can be read without."""
    return _capture_seconds


def capture_graph(step):
    """Capture step() as a CUDA graph. Returns (graph, step's output tensors, which each replay refills).

    Two warm-up runs on a side stream first compile the kernels; the cache writes they make land in slots past
    each sequence's length and are overwritten by the real steps."""
    global _capture_seconds
    torch.cuda.synchronize()
    start = time.perf_counter()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    torch.cuda.synchronize()
    _capture_seconds += time.perf_counter() - start
    return graph, out


def tail_plans(batch: int) -> list[int]:
    """Sequence counts a tail's verify graphs are planned for: batch / 4 and batch / 16 (where at least 1). Not
    fewer: every split writes its partial output, idle sequences' too, so a plan for one sequence of 64 (132 splits
    at the 1.5B's heads) wrote 260 MB of partials a layer and measured slower than the plan for 4 (H100)."""
    return sorted({p for p in (batch // 4, batch // 16) if p >= 1}, reverse=True) if TAIL_PLANS else []


def tail_plan(active: int | None, batch: int) -> int | None:
    """The smallest of tail_plans(batch) that holds `active` sequences, or None (plan for the whole batch) when
    more than a quarter of it is still generating or the count is unknown."""
    fitting = [p for p in tail_plans(batch) if active is not None and active <= p]
    return min(fitting) if fitting else None


def planned_graph(graphs: dict, key, plan: int | None, active: int | None, batch: int, capture) -> tuple:
    """graphs[key(plan)], captured (capture(plan)) if missing. A caller that counts active sequences gets every tail
    plan captured at once, in its first step (a warm-up's): a tail's graph captured when the tail comes would be
    paid for inside the timed rounds."""
    if key(plan) not in graphs:
        for p in (None, *tail_plans(batch)) if active is not None else (plan,):
            if key(p) not in graphs:
                graphs[key(p)] = capture(p)
    return graphs[key(plan)]


def idle_lists_shortened(selection, cache: PagedKVCache):
    """The selection with an idle sequence's page lists cut to their first entry (not to none: a row that sees no
    key turns into NaN). Its outputs are dropped, so a fixed batch's tail reads little for the sequences already
    done. Out of place: the policy may hand out the same lists again."""
    if type(selection) is not PageSelection or not TAIL_PLANS:
        return selection
    idle = cache.idle[: selection.counts.shape[1]].view(1, -1, 1)
    return dataclasses.replace(selection, counts=torch.where(idle, selection.counts.clamp(max=1), selection.counts))
