"""Perplexity of a verifier whose attention is restricted per query, SpecAttn-S against its baselines.

One window of text is run as a single prefill so every query's key set is explicit:
- `dense`: every visible key.
- `specattn-s:p`: the draft model reads the same window; for verifier layer j the keys holding mass >= p of
  the mapped draft layer's head-averaged attention (sorting-free top-p threshold), shared by the heads.
- `quest`: per query and KV head, the pages whose key min/max bound q.k highest, plus the query's own page.
- `streaming`: attention sinks plus the most recent keys.
Quest and streaming get the KV budget SpecAttn-S used at a reference p (the same fraction of visible keys per
query). Layers in `dense_layers` stay dense for every method (the paper keeps the first two).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..alignment import LayerMap, head_averaged_attention
from ..cache import PagedKVCache
from ..errors import InvalidInputError
from ..model import Transformer

SINK_TOKENS = 16


def topp_key_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """probs [..., T, L] -> bool mask of the smallest top set of each row holding mass >= p (ties kept)."""
    if not 0 < p <= 1:
        raise InvalidInputError(f"top-p {p} must be in (0, 1]")
    if probs.is_cuda:
        from ..kernels.topp import topp_threshold
    else:
        from ..kernels.reference import topp_threshold
    theta = topp_threshold(probs.reshape(-1, probs.shape[-1]).contiguous(), p).view(probs.shape[:-1])
    return (probs >= theta[..., None]) & (probs > 0) if p < 1 else probs > 0


def streaming_key_mask(t: int, frac: float, device) -> torch.Tensor:
    """[1, 1, T, T]: sinks + the most recent keys, ceil(frac x visible) keys per query."""
    q = torch.arange(t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    budget = torch.ceil(frac * (q + 1)).clamp(min=1)
    window = budget - SINK_TOKENS
    return ((k < SINK_TOKENS) | (k > q - window)) & (k <= q)


def quest_mask_fn(frac: float, page_size: int = 16, rows_per_chunk: int = 128):
    """A key_masks entry computing Quest's page choice from the layer's own queries and keys."""

    def mask(layer: int, q: torch.Tensor, k_pages: torch.Tensor, view) -> torch.Tensor:
        from ..kernels.reference import gather_pages
        batch, t, heads, dim = q.shape
        kv_heads = k_pages.shape[2]
        k = gather_pages(k_pages, view.page_table, t).float()                   # [b, hkv, T, d]
        pages = -(-t // page_size)
        padded = F.pad(k, (0, 0, 0, pages * page_size - t))
        # Bounds over each page's keys; a query's own (partial) page is always kept, so padding never matters.
        kmax = padded.view(batch, kv_heads, pages, page_size, dim).amax(3)
        kmin = padded.view(batch, kv_heads, pages, page_size, dim).amin(3)
        out = torch.zeros(batch, kv_heads, t, t, dtype=torch.bool, device=q.device)
        qg = q.float().view(batch, t, kv_heads, heads // kv_heads, dim)
        for lo in range(0, t, rows_per_chunk):
            rows = torch.arange(lo, min(t, lo + rows_per_chunk), device=q.device)
            qc = qg[:, rows].permute(0, 2, 1, 3, 4)[..., None, :]                    # [b, hkv, r, g, 1, d]
            bound = torch.maximum(qc * kmax[:, :, None, None], qc * kmin[:, :, None, None]).sum(-1).amax(3)
            own = rows // page_size                                                # [r]
            page_idx = torch.arange(pages, device=q.device)
            bound = bound.masked_fill(page_idx[None, None, None, :] > own[None, None, :, None], float("-inf"))
            bound = bound.masked_fill(page_idx[None, None, None, :] == own[None, None, :, None], float("inf"))
            n_keep = torch.ceil(frac * (rows + 1) / page_size).clamp(min=1).long()   # pages per row
            rank = bound.argsort(dim=-1, descending=True).argsort(dim=-1)
            keep_page = rank < n_keep[None, None, :, None]
            out[:, :, rows] = keep_page.repeat_interleave(page_size, dim=-1)[..., :t]
        return out

    return mask


@dataclass
class SparseRun:
    name: str
    ppl: float
    keys_kept_fraction: float             # attended / visible keys over the evaluated rows, all layers
    keys_kept_fraction_sparse_layers: float
    extra: dict = field(default_factory=dict)


def _nll(model: Transformer, tokens: list[int], key_masks: dict | None, eval_from: int) -> float:
    dev = model.embed.weight.device
    cache = PagedKVCache(model.cfg, 1, len(tokens), dtype=model.embed.weight.dtype, device=dev)
    cache.reset(1)
    cache.reserve(len(tokens))
    view = cache.step_view(len(tokens))
    view.key_masks = key_masks or {}
    view.attention_probs = None
    ids = torch.tensor([tokens], device=dev)
    logits = model(ids, cache, view, all_logits=True)[0]
    return F.cross_entropy(logits[eval_from:-1].float(), ids[0, eval_from + 1:], reduction="mean").item()


def _kept(mask: torch.Tensor, t: int, eval_from: int) -> tuple[float, float]:
    """(kept, visible) keys over rows >= eval_from of a [.., T, T] mask (own token counted as kept)."""
    rows = torch.arange(eval_from, t, device=mask.device)
    causal = torch.arange(t, device=mask.device)[None, :] <= rows[:, None]
    own = torch.arange(t, device=mask.device)[None, :] == rows[:, None]
    m = (mask[..., eval_from:, :] & causal) | own
    heads = m.shape[:-2].numel()
    return m.sum().item() / heads, causal.sum().item()


@torch.no_grad()
def sparse_perplexity_study(target: Transformer, draft: Transformer, layer_map: LayerMap, tokens: list[int],
                            ps: list[float], reference_p: float = 0.95, dense_layers: tuple[int, ...] = (0, 1),
                            eval_from: int | None = None, progress=None) -> list[SparseRun]:
    t = len(tokens)
    eval_from = t // 4 if eval_from is None else eval_from
    if not 0 <= eval_from < t - 1:
        raise InvalidInputError(f"evaluation start {eval_from} must be within the {t}-token window")
    n_layers = target.cfg.num_layers
    sparse_layers = [j for j in range(n_layers) if j not in dense_layers]
    runs = [SparseRun("dense", math.exp(_nll(target, tokens, None, eval_from)), 1.0, 1.0)]
    step = progress or (lambda name: None)
    step("dense")
    draft_attn = head_averaged_attention(draft, tokens)                       # [draft layers, T, T]
    frac_at_ref = None
    for p in ps:
        masks = {j: topp_key_mask(draft_attn[layer_map.draft_layer[j]], p)[None, None] for j in sparse_layers}
        kept = [_kept(m, t, eval_from) for m in masks.values()]
        frac_sparse = sum(k for k, _ in kept) / sum(v for _, v in kept)
        frac_all = (frac_sparse * len(sparse_layers) + len(dense_layers)) / n_layers
        runs.append(SparseRun(f"specattn-s:p={p}", math.exp(_nll(target, tokens, masks, eval_from)),
                              frac_all, frac_sparse))
        if abs(p - reference_p) < 1e-9:
            frac_at_ref = frac_sparse
        step(f"specattn-s p={p}")
    if frac_at_ref is None:
        raise InvalidInputError(f"the reference p {reference_p} for the baselines' budget must be among {ps}")
    same = {"budget_from": f"specattn-s:p={reference_p}"}
    stream = streaming_key_mask(t, frac_at_ref, draft_attn.device)[None, None]
    k_s, v_s = _kept(stream, t, eval_from)
    runs.append(SparseRun("streaming", math.exp(_nll(target, tokens, dict.fromkeys(sparse_layers, stream),
                                                      eval_from)),
                          (k_s / v_s * len(sparse_layers) + len(dense_layers)) / n_layers, k_s / v_s, same))
    step("streaming")
    quest = quest_mask_fn(frac_at_ref)
    kept_q = []

    def quest_counting(layer, q, k_pages, view):
        m = quest(layer, q, k_pages, view)
        kept_q.append(_kept(m, t, eval_from))
        return m

    ppl_q = math.exp(_nll(target, tokens, dict.fromkeys(sparse_layers, quest_counting), eval_from))
    frac_q = sum(k for k, _ in kept_q) / sum(v for _, v in kept_q)
    runs.append(SparseRun("quest", ppl_q, (frac_q * len(sparse_layers) + len(dense_layers)) / n_layers, frac_q, same))
    step("quest")
    return runs
