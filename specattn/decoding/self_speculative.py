"""Self-speculative decoding: the model drafts with a sparse subset of its own KV cache and verifies the
drafts with the full cache in one pass (SpecAttn-Y / MagicDec-style drafting, by selection policy).

One round: select -> gamma sparse draft steps -> roll the drafts' K/V back (they were computed with sparse
attention) -> one dense verify pass over [last token, drafts] that rewrites them and, as a by-product,
gives the attention mass per page -> accept -> truncate to the accepted length -> feed the mass back to
the policy. Output equals dense AR decoding: token for token under greedy, in distribution when sampling.
"""
from __future__ import annotations

import time

import torch

from ..cache import PagedKVCache
from ..errors import InvalidInputError
from ..model import Transformer
from ..selection import SelectionPolicy
from .acceptance import accept_greedy, accept_sampling
from .ar import GenerationParams, GenerationResult, _sync, cut_at_stop
from .runner import check_prompts, prefill
from .sampling import probabilities, sample


def cache_tokens_needed(prompt_tokens: int, max_new_tokens: int, gamma: int) -> int:
    """Per-sequence cache capacity a run needs: a sequence that is done stops growing, but it can be done
    with up to gamma tokens to spare and still takes part in one more round of gamma + 1 tokens."""
    return prompt_tokens + max_new_tokens + 2 * gamma + 1


@torch.no_grad()
def generate_self_speculative(model: Transformer, cache: PagedKVCache, prompts: list[list[int]],
                              params: GenerationParams, policy: SelectionPolicy,
                              gamma: int = 4) -> GenerationResult:
    if gamma <= 0:
        raise InvalidInputError(f"gamma (draft tokens per round) must be > 0, got {gamma}")
    check_prompts(model, cache, prompts, cache_tokens_needed(0, params.max_new_tokens, gamma))
    device, batch = cache.device, len(prompts)
    sampling = params.sampling
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    timers = {"draft_s": 0.0, "verify_s": 0.0, "select_s": 0.0}
    _sync(device)
    t0 = time.perf_counter()
    next_tok = sample(prefill(model, cache, prompts, params.prefill_chunk), sampling, generator)
    out = [[t] for t in next_tok.tolist()]
    policy.reset(cache)
    accepted_hist, per_position = [], torch.zeros(gamma, dtype=torch.long)
    draft_bytes = rounds = 0
    while min(len(o) for o in out) < params.max_new_tokens:
        if params.stop_token_ids and all(any(t in params.stop_token_ids for t in o) for o in out):
            break
        rounds += 1
        start_lens = cache.host_lens()
        t = time.perf_counter()
        selection = policy.select(cache, gamma)
        timers["select_s"] += _lap(device, t)

        t = time.perf_counter()
        drafts_t, draft_probs = _draft(model, cache, selection, next_tok, gamma, sampling, generator)
        draft_bytes += _draft_bytes_read(cache, selection, start_lens, gamma)
        cache.truncate(start_lens)       # the drafts' K/V came from sparse attention: verification rewrites them
        timers["draft_s"] += _lap(device, t)

        t = time.perf_counter()
        cache.reserve(gamma + 1)         # truncate gave the drafts' trailing pages back
        view = cache.step_view(gamma + 1)
        if policy.wants_page_mass:
            view.page_mass = torch.zeros(model.cfg.num_layers, batch, model.cfg.num_kv_heads,
                                         cache.max_pages_per_seq, device=device)
        if policy.wants_token_scores:
            view.token_scores = torch.zeros(model.cfg.num_layers, batch, cache.max_pages_per_seq * cache.page_size,
                                            device=device)
        target_logits = model(torch.cat([next_tok[:, None], drafts_t], dim=1), cache, view, all_logits=True)
        cache.advance(gamma + 1)
        cache.count_read(sum(start_lens) + batch * (gamma + 1))
        if sampling.greedy:
            accepted, emitted = accept_greedy(drafts_t, target_logits)
        else:
            accepted, emitted = accept_sampling(drafts_t, draft_probs, probabilities(target_logits, sampling),
                                                generator)
        accepted_list = accepted.tolist()
        # Sequences that already have their tokens keep their length while the others catch up.
        done = [len(o) >= params.max_new_tokens for o in out]
        cache.truncate([n if d else n + 1 + a for n, a, d in zip(start_lens, accepted_list, done, strict=True)])
        if view.page_mass is not None:
            policy.observe(view.page_mass)
        if view.token_scores is not None:
            policy.observe_token_scores(view.token_scores, start_lens)
        timers["verify_s"] += _lap(device, t)

        for b, row in enumerate(emitted.tolist()):
            if not done[b]:
                out[b].extend(x for x in row if x >= 0)
        next_tok = torch.where(torch.tensor(done, device=device), next_tok,
                               emitted.gather(1, accepted[:, None]).squeeze(1))
        for a in (a for a, d in zip(accepted_list, done, strict=True) if not d):   # idle rounds do not count
            accepted_hist.append(a)
            per_position[:a] += 1
    _sync(device)
    total = time.perf_counter() - t0
    tokens = [cut_at_stop(o[: params.max_new_tokens], params.stop_token_ids) for o in out]
    new = sum(len(t) for t in tokens)
    return GenerationResult(tokens, {
        "method": f"self-spec:{policy.name}", "gamma": gamma, "new_tokens": new, "total_s": total,
        "tokens_per_s": new / total, "rounds": rounds,
        "mean_accepted_len": 1 + sum(accepted_hist) / max(1, len(accepted_hist)),   # incl. the bonus token
        "acceptance_rate": sum(accepted_hist) / max(1, len(accepted_hist) * gamma),
        "acceptance_per_position": (per_position.float() / max(1, len(accepted_hist))).tolist(),
        "kv_bytes_read_prefill_and_verify": cache.kv_bytes_read, "kv_bytes_read_draft": draft_bytes, **timers,
    })


def _draft(model: Transformer, cache: PagedKVCache, selection, first_tok: torch.Tensor, gamma: int,
           sampling, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """gamma sparse decode steps from first_tok: drafts [batch, gamma] and, when sampling, the draft's
    distributions [batch, gamma, vocab]. Leaves the drafts' K/V in the cache for the caller to roll back."""
    cache.reserve(gamma + 1)
    drafts, probs_list, tok = [], [], first_tok
    for _ in range(gamma):
        view = cache.step_view(1)
        view.selection = selection
        logits = model(tok[:, None], cache, view)[:, -1]
        cache.advance(1)
        if sampling.greedy:
            tok = logits.argmax(-1)
        else:
            probs = probabilities(logits, sampling)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            probs_list.append(probs)
        drafts.append(tok)
    return torch.stack(drafts, dim=1), (torch.stack(probs_list, dim=1) if probs_list else None)


def _lap(device: torch.device, start: float) -> float:
    _sync(device)
    return time.perf_counter() - start


def _draft_bytes_read(cache: PagedKVCache, selection, start_lens: list[int], gamma: int) -> int:
    """KV bytes the gamma draft steps read: the selected pages (counted whole) for sparse layers, every token
    so far for dense ones."""
    layer_bytes = cache.bytes_per_token // cache.cfg.num_layers          # one token, one layer, all KV heads
    dense_tokens = sum(n * gamma + gamma * (gamma + 1) // 2 for n in start_lens)   # over the gamma steps
    if selection is None:
        return dense_tokens * cache.bytes_per_token
    head_bytes = layer_bytes // cache.cfg.num_kv_heads
    sparse = selection.tokens_selected(cache.page_size) * head_bytes * gamma
    return dense_tokens * layer_bytes * len(selection.dense_layers) + sparse
