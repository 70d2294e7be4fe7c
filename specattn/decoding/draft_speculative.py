"""Draft-model speculative decoding, lossless, and SpecAttn-S's approximate verification on top of it.

One round: the draft model proposes gamma tokens with dense attention over its own cache; the verifier checks
them and one bonus token in a single pass; greedy matching or rejection sampling accepts a prefix; both caches
roll back in O(1). Lossless: greedy output equals the verifier's AR output token for token.

SpecAttn-S (`SparseVerification`): while drafting, the draft's head-averaged attention at the layers the layer
map names is recorded; per verifier layer, the union over the gamma draft steps of the top-p key sets of its
mapped draft layer is all the verifier attends to (the verified block itself stays visible; the first layers
stay dense), through the sparse attention kernel's token lists. That verification is approximate: the output
follows a sparse-attention verifier. Lossless rounds run as CUDA graphs on the GPU (the gamma draft steps in one
graph, the verify step in another); SpecAttn-S rounds run eagerly and record the draft's attention through the
reference path (graphs and kernel-side draft scores for them are not built yet).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cache import PagedKVCache, to_device
from ..errors import InvalidInputError
from ..evaluation.sparse_ppl import topp_key_mask
from ..model import Transformer
from ..selection import PageSelection, SelectionPolicy
from .acceptance import accept_greedy, accept_sampling
from .ar import GenerationParams, GenerationResult, _sync
from .runner import StepRunner, check_prompts, prefill
from .sampling import SamplingParams, probabilities, sample
from .self_speculative import PhaseTimer, RoundLog, RoundSteps, cache_tokens_needed


@dataclass(frozen=True)
class SparseVerification:
    draft_layer: tuple[int, ...]        # layer map: verifier layer j reads draft layer draft_layer[j]'s attention
    p: float = 0.95
    dense_layers: tuple[int, ...] = (0, 1)
    page_level: bool = False            # choose pages from the draft's page mass (the kernel's by-product)

    def __post_init__(self):
        if not 0 < self.p <= 1:
            raise InvalidInputError(f"top-p {self.p} must be in (0, 1]")


@torch.no_grad()
def generate_draft_speculative(target: Transformer, draft: Transformer, target_cache: PagedKVCache,
                               draft_cache: PagedKVCache, prompts: list[list[int]], params: GenerationParams,
                               gamma: int = 4, sparse: SparseVerification | None = None,
                               steps: dict | None = None) -> GenerationResult:
    """`steps`: the runner an earlier lossless run on the same models, caches, batch and sampling returned, so its
    graphs are not captured again."""
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
    need = cache_tokens_needed(0, params.max_new_tokens, gamma)
    check_prompts(target, target_cache, prompts, need)
    check_prompts(draft, draft_cache, prompts, need)
    device, batch, sampling = target_cache.device, len(prompts), params.sampling
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    # Built before the prefill: building compiles the models' fused functions, which the prefill then uses.
    graphs = None if sparse else _LosslessGraphs.reuse(steps, target, draft, target_cache, draft_cache, batch, gamma,
                                                       sampling, params.use_cuda_graph)
    _sync(device)
    t0 = time.perf_counter()
    next_tok = sample(prefill(target, target_cache, prompts, params.prefill_chunk), sampling, generator)
    prefill(draft, draft_cache, prompts, params.prefill_chunk)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    log = RoundLog(next_tok.tolist(), params, gamma)
    timer = PhaseTimer(device)
    keys_read = torch.zeros((), dtype=torch.long, device=device)     # on the device: counting must not sync
    keys_dense = rounds = 0
    while not log.finished():
        rounds += 1
        start_lens = target_cache.host_lens()
        t = timer.start()
        if graphs:
            draft_cache.reserve(gamma + 1)
            drafts, draft_probs = graphs.draft.draft(None, next_tok, generator)
            draft_cache.advance(gamma)              # the drafts' K/V were written at the positions they take
        else:
            drafts, draft_probs, recorded = _draft(draft, draft_cache, next_tok, gamma, sampling, generator, sparse)
        timer.stop("draft_s", t)

        t = timer.start()
        target_cache.reserve(gamma + 1)
        block = torch.cat([next_tok[:, None], drafts], dim=1)
        if graphs:
            logits = graphs.verify(block)
        else:
            view = target_cache.step_view(gamma + 1)
            view.selection = _verifier_selection(sparse, recorded, start_lens, gamma, target.cfg,
                                                 target_cache.page_size)
            # keys loaded once for the whole verified block, per sequence and sparse layer (the KV heads share
            # one list)
            keys_read += view.selection.tokens_selected(target_cache.page_size) // target.cfg.num_kv_heads
            sparse_layers = sum(j not in view.selection.dense_layers for j in range(target.cfg.num_layers))
            keys_dense += (sum(start_lens) + batch * (gamma + 1)) * sparse_layers
            logits = target(block, target_cache, view, all_logits=True)
        target_cache.advance(gamma + 1)
        if sampling.greedy:
            accepted, emitted = accept_greedy(drafts, logits)
        else:
            accepted, emitted = accept_sampling(drafts, draft_probs, probabilities(logits, sampling), generator)
        host = torch.cat([accepted[:, None], emitted], dim=1).tolist()     # the round's one sync
        accepted_list = [row[0] for row in host]
        done = log.done()
        keep = [n if d else n + 1 + a for n, a, d in zip(start_lens, accepted_list, done, strict=True)]
        if any(a == gamma for a in accepted_list):
            _write_last_draft(draft, draft_cache, drafts[:, -1], graphs)   # the draft never saw its last token
        draft_cache.truncate(keep)
        target_cache.truncate(keep)
        timer.stop("verify_s", t)

        log.record(accepted_list, [row[1:] for row in host], done, gamma)
        next_tok = torch.where(to_device(done, torch.bool, device), next_tok,
                               emitted.gather(1, accepted[:, None]).squeeze(1))
    _sync(device)
    total = time.perf_counter() - t0
    tokens = log.tokens()
    new = sum(len(t) for t in tokens)
    stats = {
        "method": "specattn-s" if sparse else "draft-spec", "gamma": gamma, "new_tokens": new, "total_s": total,
        "tokens_per_s": new / total, "prefill_s": prefill_s,
        "decode_tokens_per_s": (new - batch) / max(total - prefill_s, 1e-9), "rounds": rounds, **log.stats(),
        **{k: v for k, v in timer.totals().items() if k in ("draft_s", "verify_s")},   # selection is part of verify
    }
    if sparse:
        stats["verifier_keys_read_fraction_sparse_layers"] = int(keys_read) / max(1, keys_dense)
    return GenerationResult(tokens, stats, graphs)


class _LosslessGraphs:
    """The step runners of a lossless round: the gamma dense draft steps as one graph (RoundSteps with the full
    policy), the verifier's step over gamma + 1 tokens, and the draft's single step that writes its last token when
    every draft was accepted. Eager where graphs are off (CPU)."""

    def __init__(self, target, draft, target_cache, draft_cache, batch: int, gamma: int, sampling: SamplingParams,
                 use_cuda_graph: bool):
        self.draft = RoundSteps(draft, draft_cache, SelectionPolicy(), batch, gamma, sampling, use_cuda_graph)
        self.verify = StepRunner(target, target_cache, use_cuda_graph)
        self.last = StepRunner(draft, draft_cache, use_cuda_graph)

    @classmethod
    def reuse(cls, steps, target, draft, target_cache, draft_cache, batch: int, gamma: int, sampling,
              use_cuda_graph: bool) -> _LosslessGraphs:
        fits = (isinstance(steps, cls) and steps.verify.model is target and steps.verify.cache is target_cache
                and steps.verify.use_graph == (use_cuda_graph and target_cache.device.type == "cuda")
                and steps.draft.fits(draft, draft_cache, steps.draft.policy, batch, gamma, sampling))
        return steps if fits else cls(target, draft, target_cache, draft_cache, batch, gamma, sampling,
                                      use_cuda_graph)


def _draft(draft: Transformer, cache: PagedKVCache, first_tok: torch.Tensor, gamma: int, sampling, generator,
           sparse: SparseVerification | None):
    """gamma dense draft steps. Returns drafts [batch, gamma], their distributions when sampling, and (SpecAttn-S)
    the head-averaged attention of each step per recorded draft layer: {layer: [[batch, 1, kv_len], ...]}."""
    cache.reserve(gamma + 1)
    wanted = set(sparse.draft_layer) if sparse else set()
    recorded = {layer: [] for layer in wanted}
    drafts, probs_list, tok = [], [], first_tok
    for _ in range(gamma):
        view = cache.step_view(1)
        if wanted and sparse.page_level:    # mass per page from the attention pass itself
            view.page_mass = torch.zeros(draft.cfg.num_layers, cache.batch, draft.cfg.num_kv_heads,
                                         cache.max_pages_per_seq, device=cache.device)
        elif wanted:
            view.attention_probs, view.record_layers = {}, frozenset(wanted)
        logits = draft(tok[:, None], cache, view)[:, -1]
        cache.advance(1)
        for layer in wanted:
            if sparse.page_level:            # [batch, 1, pages], a distribution: summed over heads / heads
                recorded[layer].append(view.page_mass[layer].sum(1, keepdim=True) / draft.cfg.num_heads)
            else:
                recorded[layer].append(view.attention_probs[layer])
        if sampling.greedy:
            tok = logits.argmax(-1)
        else:
            probs = probabilities(logits, sampling)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            probs_list.append(probs)
        drafts.append(tok)
    return torch.stack(drafts, 1), (torch.stack(probs_list, 1) if probs_list else None), recorded


def _write_last_draft(draft: Transformer, cache: PagedKVCache, last: torch.Tensor,
                      graphs: _LosslessGraphs | None) -> None:
    cache.reserve(1)
    if graphs:
        graphs.last(last[:, None])
    else:
        draft(last[:, None], cache, cache.step_view(1))
    cache.advance(1)


def _verifier_selection(sparse: SparseVerification, recorded: dict, start_lens: list[int], gamma: int,
                        cfg, page_size: int) -> PageSelection:
    """Lists for the verify step: per verifier layer, the union over draft steps of the mapped draft layer's top-p
    keys (or pages) plus the verified block itself, shared by the layer's KV heads (sparse kernel). Dense layers
    get the same lists but the kernel ignores them."""
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
