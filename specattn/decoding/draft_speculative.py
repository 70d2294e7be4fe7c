"""Draft-model speculative decoding, lossless, and SpecAttn-S's approximate verification on top of it.

One round: the draft model proposes gamma tokens with dense attention over its own cache; the verifier checks
them and one bonus token in a single pass; greedy matching or rejection sampling accepts a prefix; both caches
roll back in O(1). Lossless: greedy output equals the verifier's AR output token for token.

SpecAttn-S (`SparseVerification`): while drafting, the draft's head-averaged attention at the layers the layer
map names is recorded; per verifier layer, the union over the gamma draft steps of the top-p key sets of its
mapped draft layer is all the verifier attends to (the verified block itself stays visible; the first layers
stay dense), through the sparse attention kernel's token lists. That verification is approximate: the output
follows a sparse-attention verifier. On the GPU, lossless rounds and page-level SpecAttn-S rounds (pages chosen
from the draft's page mass, the attention kernel's by-product) run as CUDA graphs: the gamma draft steps in one,
the verify step in another. Token-level SpecAttn-S records the draft's attention through the reference path and
runs eagerly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cache import PagedKVCache, to_device
from ..distributed import mean_over_ranks
from ..errors import InvalidInputError
from ..evaluation.sparse_ppl import topp_key_mask
from ..model import Transformer
from ..selection import PageSelection, SelectionPolicy
from .acceptance import accept_greedy, accept_sampling
from .ar import GenerationParams, GenerationResult, _sync
from .runner import (
    StepRunner,
    capture_graph,
    check_prompts,
    idle_lists_shortened,
    planned_graph,
    prefill,
    prepare_graphs,
    tail_plan,
)
from .sampling import SamplingParams, agree, probabilities, sample
from .self_speculative import FullBatchRate, PhaseTimer, RoundLog, RoundSteps, cache_tokens_needed, draft_steps


@dataclass(frozen=True)
class SparseVerification:
    draft_layer: tuple[int, ...]        # layer map: verifier layer j reads draft layer draft_layer[j]'s attention
    p: float = 0.95
    dense_layers: tuple[int, ...] = (0, 1)
    page_level: bool = False            # choose pages from the draft's page mass (the kernel's by-product)
    key_steps: str = "all"              # draft steps whose attention chooses keys: all (the paper), first or last

    def __post_init__(self):
        if not 0 < self.p <= 1:
            raise InvalidInputError(f"top-p {self.p} must be in (0, 1]")
        if self.key_steps not in KEY_STEPS:
            raise InvalidInputError(f"key steps {self.key_steps!r}: choose one of {', '.join(KEY_STEPS)}")

    def steps(self, gamma: int) -> frozenset[int]:
        """The draft steps (0 .. gamma - 1) whose attention is recorded. Fewer steps: less of the draft's time
        goes to page mass and top-p, and the verifier's sets come from fewer queries."""
        return {"all": frozenset(range(gamma)), "first": frozenset({0}), "last": frozenset({gamma - 1})}[
            self.key_steps]


KEY_STEPS = ("all", "first", "last")


@torch.no_grad()
def generate_draft_speculative(target: Transformer, draft: Transformer, target_cache: PagedKVCache,
                               draft_cache: PagedKVCache, prompts: list[list[int]], params: GenerationParams,
                               gamma: int = 4, sparse: SparseVerification | None = None,
                               steps: dict | None = None) -> GenerationResult:
    """`steps`: the runner an earlier lossless run on the same models, caches, batch and sampling returned, so its
    graphs are not captured again."""
    _check_pair(target, draft, target_cache, draft_cache, gamma, sparse)
    need = cache_tokens_needed(0, params.max_new_tokens, gamma)
    check_prompts(target, target_cache, prompts, need)
    check_prompts(draft, draft_cache, prompts, need)
    device, sampling = target_cache.device, params.sampling
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    # Built before the prefill: building compiles the models' fused functions, which the prefill then uses.
    graphs = _round_graphs(steps, target, draft, target_cache, draft_cache, len(prompts), gamma, sampling, sparse,
                           params.use_cuda_graph)
    _sync(device)
    t0 = time.perf_counter()
    next_tok = sample(prefill(target, target_cache, prompts, params.prefill_chunk), sampling, generator)
    prefill(draft, draft_cache, prompts, params.prefill_chunk)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    rounds = _Rounds(target, draft, target_cache, draft_cache, gamma, sampling, sparse, graphs, generator,
                     RoundLog(next_tok.tolist(), params, gamma), prompts, next_tok)
    full_batch = FullBatchRate(time.perf_counter())
    while not rounds.log.finished():
        full_batch.round_begins(rounds.log)
        rounds.run()            # ends in the round's one sync
        full_batch.round_ends(rounds.log, time.perf_counter())
    _sync(device)
    return GenerationResult(rounds.log.tokens(), rounds.stats(time.perf_counter() - t0, prefill_s, full_batch),
                            graphs)


def _check_pair(target: Transformer, draft: Transformer, target_cache: PagedKVCache, draft_cache: PagedKVCache,
                gamma: int, sparse: SparseVerification | None) -> None:
    if gamma <= 0:
        raise InvalidInputError(f"gamma (draft tokens per round) must be > 0, got {gamma}")
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise InvalidInputError(f"draft vocabulary ({draft.cfg.vocab_size}) differs from the verifier's "
                                f"({target.cfg.vocab_size}); they must share a tokenizer")
    if sparse and len(sparse.draft_layer) != target.cfg.num_layers:
        raise InvalidInputError(f"the layer map has {len(sparse.draft_layer)} entries for a verifier of "
                                f"{target.cfg.num_layers} layers")
    if sparse and sparse.page_level and draft_cache.page_size != target_cache.page_size:
        raise InvalidInputError("page-level SpecAttn-S needs the draft and verifier caches to use the same page size")


class _Rounds:
    """One generation's rounds after the prefill: draft gamma tokens, verify them, accept a prefix, roll both caches
    back; plus what the statistics need (phase times, keys the verifier read)."""

    def __init__(self, target, draft, target_cache, draft_cache, gamma, sampling, sparse, graphs, generator, log,
                 prompts, next_tok):
        self.target, self.draft, self.target_cache, self.draft_cache = target, draft, target_cache, draft_cache
        self.gamma, self.sampling, self.sparse, self.graphs, self.generator = gamma, sampling, sparse, graphs, generator
        self.log, self.batch, self.device = log, len(prompts), target_cache.device
        self.next_tok = next_tok
        # The token before each sequence's end: the graph rounds' first draft step rewrites its K/V along with the
        # first token's, so a round whose drafts were all accepted needs no extra draft step for the last one.
        self.prev_tok = torch.tensor([p[-1] for p in prompts], device=self.device)
        self.timer = PhaseTimer(self.device)
        self.keys_read = torch.zeros((), dtype=torch.long, device=self.device)   # on the device: must not sync
        self.keys_dense = self.rounds = self.verify_tokens = self.draft_tokens = 0   # one layer's tokens, summed

    def run(self) -> None:
        gamma, batch = self.gamma, self.batch
        self.rounds += 1
        done = self.log.done()      # finished sequences step along: idle, their attention reads only the block
        for cache in (self.target_cache, self.draft_cache):
            cache.mark_idle(done)
        start_lens = self.target_cache.host_lens()
        # keys one verifier layer reads this round (finished, idle rows read only the block in dense layers: an
        # upper bound then, kept so the sparse layers' fraction compares like with like)
        block_tokens = sum(start_lens) + batch * (gamma + 1)
        self.verify_tokens += block_tokens
        self.draft_tokens += gamma * sum(start_lens) + batch * gamma * (gamma + 1) // 2   # step i reads len + i + 1
        active = done.count(False)      # a fixed batch's tail plans attention for these (runner.tail_plan)
        t = self.timer.start()
        drafts, draft_probs, recorded = self._draft(active)
        self.timer.stop("draft_s", t)
        t = self.timer.start()
        block = torch.cat([self.next_tok[:, None], drafts], dim=1)
        logits = self._verify(block, recorded, start_lens, block_tokens, active)
        if self.sampling.greedy:
            accepted, emitted = accept_greedy(drafts, logits)
        else:
            accepted, emitted = accept_sampling(drafts, draft_probs, probabilities(logits, self.sampling),
                                                self.generator)
            agree(accepted, self.target, self.sampling)
            agree(emitted, self.target, self.sampling)
        host = torch.cat([accepted[:, None], emitted], dim=1).tolist()     # the round's one sync
        accepted_list = [row[0] for row in host]
        keep = [n if d else n + 1 + a for n, a, d in zip(start_lens, accepted_list, done, strict=True)]
        if not self.graphs and any(a == gamma for a in accepted_list):
            _write_last_draft(self.draft, self.draft_cache, drafts[:, -1])      # the draft never saw its last token
        self.draft_cache.truncate(keep)
        self.target_cache.truncate(keep)
        self.timer.stop("verify_s", t)
        self.log.record(accepted_list, [row[1:] for row in host], done, gamma)
        done_dev = to_device(done, torch.bool, self.device)
        self.prev_tok = torch.where(done_dev, self.prev_tok, block.gather(1, accepted[:, None]).squeeze(1))
        self.next_tok = torch.where(done_dev, self.next_tok, emitted.gather(1, accepted[:, None]).squeeze(1))

    def _draft(self, active: int):
        """The round's drafts [batch, gamma], their distributions when sampling, and (eager token level) the
        draft's recorded attention."""
        if not self.graphs:
            return _draft(self.draft, self.draft_cache, self.next_tok, self.gamma, self.sampling, self.generator,
                          self.sparse)
        self.draft_cache.reserve(self.gamma + 1)
        drafts, draft_probs = self.graphs.draft_round(torch.stack([self.prev_tok, self.next_tok], dim=1),
                                                      self.generator, active)
        # The drafts' K/V were written at the positions they take; the last draft's slot counts too: it is
        # kept when every draft is accepted, and the next round's catch-up step writes its K/V.
        self.draft_cache.advance(self.gamma + 1)
        return drafts, draft_probs, None

    def _verify(self, block: torch.Tensor, recorded, start_lens: list[int], block_tokens: int,
                active: int) -> torch.Tensor:
        """The verifier's logits over the block (sparse for SpecAttn-S), counting the keys it read."""
        cache, cfg = self.target_cache, self.target.cfg
        cache.reserve(self.gamma + 1)
        if self.graphs:
            logits = self.graphs.verify(block, active)
            selection = self.graphs.selection() if self.sparse else None
        else:
            view = cache.step_view(self.gamma + 1)
            selection = _verifier_selection(self.sparse, recorded, start_lens, self.gamma, cfg, cache.page_size)
            view.selection = idle_lists_shortened(selection, cache)
            logits = self.target(block, cache, view, all_logits=True)
        if selection is not None:
            # keys loaded once for the whole verified block, per sequence and sparse layer (the KV heads share
            # one list); idle sequences' lists counted whole, like their dense keys, so the fraction compares
            # like with like
            self.keys_read += selection.tokens_selected(cache.page_size) // cfg.num_kv_heads
            self.keys_dense += block_tokens * _sparse_layers(selection, cfg)
        cache.advance(self.gamma + 1)
        return logits

    def stats(self, total: float, prefill_s: float, full_batch: FullBatchRate) -> dict:
        new = sum(len(t) for t in self.log.tokens())
        cfg = self.target.cfg
        decode_rate = (new - self.batch) / max(total - prefill_s, 1e-9)
        stats = {
            "method": "specattn-s" if self.sparse else "draft-spec", "gamma": self.gamma, "new_tokens": new,
            "total_s": total, "tokens_per_s": new / total, "prefill_s": prefill_s,
            "decode_tokens_per_s": decode_rate, "rounds": self.rounds,
            # as self-speculation reports it: the rate before the first sequence finished (continuous batching)
            "decode_tokens_per_s_steady": full_batch.rate(decode_rate), "full_batch_rounds": full_batch.rounds,
            **self.log.stats(),
            **{k: v for k, v in self.timer.totals().items() if k in ("draft_s", "verify_s")},   # select: in verify
        }
        layer_bytes = self.target_cache.bytes_per_token // cfg.num_layers
        stats["kv_bytes_read_verify"] = layer_bytes * (int(self.keys_read) + self.verify_tokens * cfg.num_layers
                                                       - (self.keys_dense if self.sparse else 0))
        stats["kv_bytes_read_draft"] = self.draft_tokens * self.draft_cache.bytes_per_token
        if self.sparse:
            stats["verifier_keys_read_fraction_sparse_layers"] = int(self.keys_read) / max(1, self.keys_dense)
        return stats


def _sparse_layers(selection: PageSelection, cfg) -> int:
    return sum(j not in selection.dense_layers for j in range(cfg.num_layers))


def _round_graphs(steps, target, draft, target_cache, draft_cache, batch: int, gamma: int, sampling, sparse,
                  use_cuda_graph: bool):
    """The runner of this run's rounds: lossless ones and page-level SpecAttn-S ones run as graphs (eagerly on the
    CPU, same code); token-level SpecAttn-S (None here) records the draft's attention through the reference path."""
    if sparse is None:
        return _LosslessGraphs.reuse(steps, target, draft, target_cache, draft_cache, batch, gamma, sampling,
                                     use_cuda_graph)
    if sparse.page_level:
        return _PageSetGraphs.reuse(steps, target, draft, target_cache, draft_cache, batch, gamma, sampling, sparse,
                                    use_cuda_graph)
    return None


class _LosslessGraphs:
    """The step runners of a lossless round: the gamma dense draft steps as one graph (RoundSteps with the full
    policy), the verifier's step over gamma + 1 tokens, and the draft's single step that writes its last token when
    every draft was accepted. Eager where graphs are off (CPU)."""

    def __init__(self, target, draft, target_cache, draft_cache, batch: int, gamma: int, sampling: SamplingParams,
                 use_cuda_graph: bool):
        self.draft = RoundSteps(draft, draft_cache, SelectionPolicy(), batch, gamma, sampling, use_cuda_graph,
                                catch_up=True)
        self.verify = StepRunner(target, target_cache, use_cuda_graph)

    @classmethod
    def reuse(cls, steps, target, draft, target_cache, draft_cache, batch: int, gamma: int, sampling,
              use_cuda_graph: bool) -> _LosslessGraphs:
        fits = (isinstance(steps, cls) and steps.verify.model is target and steps.verify.cache is target_cache
                and steps.verify.use_graph == (use_cuda_graph and target_cache.device.type == "cuda")
                and steps.draft.fits(draft, draft_cache, steps.draft.policy, batch, gamma, sampling, catch_up=True))
        return steps if fits else cls(target, draft, target_cache, draft_cache, batch, gamma, sampling,
                                      use_cuda_graph)

    def draft_round(self, first_toks: torch.Tensor, generator: torch.Generator, active: int | None = None):
        return self.draft.draft(None, first_toks, generator, active)


class _PageSetGraphs:
    """Page-level SpecAttn-S rounds as two graphs (eager on the CPU, same code). The draft graph runs the gamma
    draft steps and ORs, per mapped draft layer, the top-p pages of each step's head-averaged attention (the
    attention kernel's page mass) into a page set; the verify graph turns the sets and the verified block into
    the sparse kernel's page lists, from device lengths alone, and runs the verify step over them."""

    def __init__(self, target, draft, target_cache, draft_cache, batch: int, gamma: int, sampling: SamplingParams,
                 sparse: SparseVerification, use_cuda_graph: bool):
        self.target, self.draft, self.target_cache, self.draft_cache = target, draft, target_cache, draft_cache
        self.batch, self.gamma, self.sampling, self.sparse = batch, gamma, sampling, sparse
        self.use_graph = prepare_graphs(target, target_cache, use_cuda_graph)
        prepare_graphs(draft, draft_cache, use_cuda_graph)
        # Draft layers whose attention some sparse verifier layer uses: only these measure page mass.
        self.layers = sorted({d for j, d in enumerate(sparse.draft_layer) if j not in sparse.dense_layers}) or [0]
        dev, cfg = draft_cache.device, draft.cfg
        # Index tensors live on the device before capture: a graph may not copy from host memory.
        self.layer_index = torch.tensor(self.layers, device=dev)
        self.pick = set_rows_per_target_layer(sparse, self.layers, dev)
        self.mass = torch.zeros(cfg.num_layers, batch, cfg.num_kv_heads, draft_cache.max_pages_per_seq, device=dev)
        self.sets = torch.zeros(len(self.layers), batch, target_cache.max_pages_per_seq, dtype=torch.bool,
                                device=dev)
        self.first_tok = torch.zeros(batch, 2, dtype=torch.long, device=dev)      # catch-up pairs (draft_steps)
        self.uniforms = torch.ones(batch, gamma, device=dev)
        self.verify_in = torch.zeros(batch, gamma + 1, dtype=torch.long, device=dev)
        self._draft_graphs: dict[int | None, tuple] = {}     # by tail plan (runner.tail_plan; None: whole batch)
        self._verify_graphs: dict[int | None, tuple] = {}
        self._selection = None

    @classmethod
    def reuse(cls, steps, target, draft, target_cache, draft_cache, batch: int, gamma: int, sampling, sparse,
              use_cuda_graph: bool) -> _PageSetGraphs:
        fits = (isinstance(steps, cls) and steps.target is target and steps.draft is draft
                and steps.target_cache is target_cache and steps.draft_cache is draft_cache
                and (steps.batch, steps.gamma, steps.sampling, steps.sparse) == (batch, gamma, sampling, sparse)
                and steps.use_graph == (use_cuda_graph and target_cache.device.type == "cuda"))
        return steps if fits else cls(target, draft, target_cache, draft_cache, batch, gamma, sampling, sparse,
                                      use_cuda_graph)

    def draft_round(self, first_toks: torch.Tensor, generator: torch.Generator, active: int | None = None):
        uniforms = None if self.sampling.greedy else 1 - torch.rand(self.uniforms.shape, device=first_toks.device,
                                                                    generator=generator)
        plan = tail_plan(active, self.batch)
        if not self.use_graph:
            return self._draft_body(first_toks, uniforms, plan)
        graph, out = planned_graph(self._draft_graphs, lambda p: p, plan, active, self.batch,
                                   lambda p: capture_graph(lambda: self._draft_body(self.first_tok, self.uniforms, p)))
        self.first_tok.copy_(first_toks)
        if uniforms is not None:
            self.uniforms.copy_(uniforms)
        graph.replay()
        return out

    def _draft_body(self, first, uniforms, plan: int | None = None):
        self.sets.zero_()
        heads, p = self.draft.cfg.num_heads, self.sparse.p
        return draft_steps(self.draft, self.draft_cache, None, first, self.gamma, self.sampling, uniforms, None,
                           page_mass=self.mass, mass_layers=frozenset(self.layers),
                           after_step=lambda: add_topp_pages(self.sets, self._mean_mass(heads), p),
                           mass_steps=self.sparse.steps(self.gamma), plan=plan)

    def _mean_mass(self, heads: int) -> torch.Tensor:
        """Each mapped draft layer's page mass averaged over all its query heads (over the ranks too, so every rank
        of a tensor-parallel draft picks the pages one process would): [mapped layers, batch, pages]."""
        return mean_over_ranks(self.draft.tp, self.mass[self.layer_index].sum(2) / heads)

    def verify(self, block: torch.Tensor, active: int | None = None) -> torch.Tensor:
        plan = tail_plan(active, self.batch)
        if not self.use_graph:
            logits, self._selection = self._verify_body(block, plan)
            return logits
        graph, (logits, self._selection) = planned_graph(
            self._verify_graphs, lambda p: p, plan, active, self.batch,
            lambda p: capture_graph(lambda: self._verify_body(self.verify_in, p)))
        self.verify_in.copy_(block)
        graph.replay()
        return logits

    def _verify_body(self, block, plan: int | None = None):
        """plan: the tail plan of the dense layers' attention (the sparse layers read page lists)."""
        cache = self.target_cache
        view = cache.step_view(self.gamma + 1, static=True)
        view.active = plan
        selection = page_set_selection(self.sets, cache.lens[: self.batch], self.gamma, self.sparse, self.pick,
                                       self.target.cfg, cache.page_size)
        view.selection = idle_lists_shortened(selection, cache)
        return self.target(block, cache, view, all_logits=True), selection

    def selection(self) -> PageSelection:
        """The page lists of the last verify step (idle sequences' whole: the step read one entry of them)."""
        return self._selection


def add_topp_pages(sets: torch.Tensor, page_probs: torch.Tensor, p: float) -> None:
    """sets [layers, batch, pages] |= the smallest top set of pages holding mass >= p, per (layer, sequence), of
    page_probs [layers, batch, draft pages] (a draft step's head-averaged attention per page)."""
    width = min(sets.shape[-1], page_probs.shape[-1])
    sets[..., :width] |= topp_key_mask(page_probs, p)[..., :width]


def set_rows_per_target_layer(sparse: SparseVerification, layers: list[int], device) -> torch.Tensor:
    """For each verifier layer, the row of the page-set tensor (one row per draft layer in `layers`); dense verifier
    layers, whose draft layer may have no row, ignore theirs."""
    return torch.tensor([layers.index(d) if d in layers else 0 for d in sparse.draft_layer], device=device)


def page_set_selection(sets: torch.Tensor, lens: torch.Tensor, gamma: int, sparse: SparseVerification,
                       pick: torch.Tensor, cfg, page_size: int) -> PageSelection:
    """_verifier_selection at page level from device state alone (graph-capturable): per verifier layer, the page
    set of its mapped draft layer (row pick[layer] of `sets`) plus the pages of the verified block (from each
    sequence's length `lens`), as ascending page lists of the full page-table width, -1 padded, shared by the
    layer's KV heads."""
    pages_total = sets.shape[-1]
    first = lens.long()[:, None]
    position = torch.arange(pages_total, device=sets.device)[None, :]
    block = (position >= first // page_size) & (position <= (first + gamma) // page_size)
    keys = sets | block[None]                                                     # [mapped layers, batch, pages]
    ordered = torch.where(keys, position, pages_total).sort(dim=-1).values
    lists = torch.where(ordered == pages_total, -1, ordered).int()
    pages, counts = lists[pick], keys.sum(-1).int()[pick]                        # [target layers, batch, ...]
    heads = cfg.num_kv_heads
    return PageSelection(pages[:, :, None].expand(-1, -1, heads, -1).contiguous(),
                         counts[:, :, None].expand(-1, -1, heads).contiguous(),
                         frozenset(sparse.dense_layers), token_level=False)


def _draft(draft: Transformer, cache: PagedKVCache, first_tok: torch.Tensor, gamma: int, sampling, generator,
           sparse: SparseVerification):
    """gamma dense draft steps, eager, recording the head-averaged attention of each step per mapped draft layer
    through the reference path (token-level SpecAttn-S). Returns drafts [batch, gamma], their distributions when
    sampling, and {layer: [[batch, 1, kv_len], ...]}."""
    cache.reserve(gamma + 1)
    wanted = set(sparse.draft_layer)
    recorded = {layer: [] for layer in wanted}
    drafts, probs_list, tok = [], [], first_tok
    steps = sparse.steps(gamma)
    for i in range(gamma):
        view = cache.step_view(1)
        if i in steps:
            view.attention_probs, view.record_layers = {}, frozenset(wanted)
        logits = draft(tok[:, None], cache, view)[:, -1]
        cache.advance(1)
        if i in steps:
            for layer in wanted:
                recorded[layer].append(mean_over_ranks(draft.tp, view.attention_probs[layer]))
        if sampling.greedy:
            tok = logits.argmax(-1)
        else:
            probs = probabilities(logits, sampling)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            probs_list.append(probs)
        drafts.append(tok)
    return torch.stack(drafts, 1), (torch.stack(probs_list, 1) if probs_list else None), recorded


def _write_last_draft(draft: Transformer, cache: PagedKVCache, last: torch.Tensor) -> None:
    cache.reserve(1)
    draft(last[:, None], cache, cache.step_view(1))
    cache.advance(1)


def _verifier_selection(sparse: SparseVerification, recorded: dict, start_lens: list[int], gamma: int,
                        cfg, page_size: int) -> PageSelection:
    """Lists for the verify step: per verifier layer, the union over draft steps of the mapped draft layer's top-p
    keys (or pages) plus the verified block itself, shared by the layer's KV heads (sparse kernel). Dense layers
    get the same lists but the kernel ignores them. Host-side; the token-level loop uses it, and at page level it
    is the reference for page_set_selection."""
    unit = page_size if sparse.page_level else 1          # tokens per listed item
    kv_len = -(-(max(start_lens) + gamma + 1) // unit)
    device = next(iter(recorded.values()))[0].device
    first_new = to_device(start_lens, torch.long, device)[:, None]
    position = torch.arange(kv_len, device=device)[None, :]
    block = (position >= first_new // unit) & (position <= (first_new + gamma) // unit)    # the verified tokens
    lists = {}
    for layer, steps in recorded.items():
        keys = block.clone()
        for probs in steps:                                   # [batch, 1, items_i]
            chosen = topp_key_mask(probs[:, 0], sparse.p)[:, :kv_len]
            keys[:, : chosen.shape[-1]] |= chosen
        counts = keys.sum(-1)
        ordered = torch.where(keys, position, kv_len).sort(dim=-1).values     # full width: no sync for the max
        lists[layer] = (torch.where(ordered == kv_len, -1, ordered).int(), counts.int())
    width = max(t.shape[-1] for t, _ in lists.values())
    lists = {k: (F.pad(t, (0, width - t.shape[-1]), value=-1), c) for k, (t, c) in lists.items()}
    pages = torch.stack([lists[sparse.draft_layer[j]][0] for j in range(cfg.num_layers)])       # [L, b, K]
    counts = torch.stack([lists[sparse.draft_layer[j]][1] for j in range(cfg.num_layers)])      # [L, b]
    heads = cfg.num_kv_heads
    return PageSelection(pages[:, :, None].expand(-1, -1, heads, -1).contiguous(),
                         counts[:, :, None].expand(-1, -1, heads).contiguous(),
                         frozenset(sparse.dense_layers), token_level=unit == 1)
