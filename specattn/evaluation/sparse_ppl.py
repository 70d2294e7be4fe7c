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


def keys_per_row(rows: torch.Tensor, budget: float) -> torch.Tensor:
    """Keys query `row` may read: a fraction of its visible keys (budget < 1) or a token count (budget >= 1)."""
    visible = rows + 1
    keys = torch.ceil(budget * visible) if budget < 1 else torch.full_like(visible, int(budget))
    return torch.minimum(keys, visible).clamp(min=1)


def streaming_key_mask(t: int, budget: float, device) -> torch.Tensor:
    """[T, T]: sinks + the most recent keys, keys_per_row(budget) keys per query."""
    q = torch.arange(t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    window = keys_per_row(q, budget) - SINK_TOKENS
    return ((k < SINK_TOKENS) | (k > q - window)) & (k <= q)


def quest_mask_fn(budget: float, page_size: int = 16, rows_per_chunk: int = 128):
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
            n_keep = (-(-keys_per_row(rows, budget) // page_size)).long()             # pages per row
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


@dataclass(frozen=True)
class MethodSpec:
    kind: str                      # dense, specattn-s, quest or streaming
    p: float | None = None         # specattn-s
    budget: float | None = None    # quest / streaming: tokens, or a fraction below 1; None: SpecAttn-S's share

    @property
    def name(self) -> str:
        if self.kind == "specattn-s":
            return f"specattn-s:p={self.p}"
        return self.kind if self.budget is None else f"{self.kind}:budget={self.budget:g}"


def parse_methods(text: str) -> list[MethodSpec]:
    """'dense,specattn-s:p=0.95,quest:budget=512,streaming' -> specs (a baseline without a budget gets the keys
    the first SpecAttn-S method kept)."""
    specs = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        kind, _, arg = item.partition(":")
        key, _, value = arg.partition("=")
        try:
            number = float(value) if value else None
        except ValueError:
            raise InvalidInputError(f"cannot read {item!r}: {value!r} is not a number") from None
        if kind == "dense" and not arg:
            specs.append(MethodSpec("dense"))
        elif kind == "specattn-s" and key == "p" and number is not None:
            if not 0 < number <= 1:
                raise InvalidInputError(f"{item}: p must be in (0, 1]")
            specs.append(MethodSpec(kind, p=number))
        elif kind in ("quest", "streaming") and (not arg or (key == "budget" and number is not None)):
            if number is not None and not number > 0:
                raise InvalidInputError(f"{item}: budget must be > 0 (tokens, or a fraction below 1)")
            specs.append(MethodSpec(kind, budget=number))
        else:
            raise InvalidInputError(f"unknown method {item!r}; use dense, specattn-s:p=P, quest[:budget=B] or "
                                    "streaming[:budget=B]")
    if any(s.kind in ("quest", "streaming") and s.budget is None for s in specs) and \
            not any(s.kind == "specattn-s" for s in specs):
        raise InvalidInputError("a quest or streaming method without a budget takes SpecAttn-S's; add a "
                                "specattn-s:p=P method or give budget=B")
    return specs


def masked_nll(model: Transformer, tokens: list[int], masks: dict, eval_from: int) -> tuple[float, float, float]:
    """(mean NLL, kept keys, visible keys summed over the masked layers) of one window whose layers read only the
    keys of their masks: [.., T, T] tensors, or callables computing one from the layer's own queries and keys."""
    t, kept = len(tokens), []

    def counted(mask):
        if not callable(mask):
            kept.append(_kept(mask, t, eval_from))
            return mask

        def computed(layer, q, k_pages, view):
            m = mask(layer, q, k_pages, view)
            kept.append(_kept(m, t, eval_from))
            return m
        return computed

    nll = _nll(model, tokens, {j: counted(m) for j, m in masks.items()}, eval_from)
    return nll, sum(k for k, _ in kept), sum(v for _, v in kept)


def _window_run(target, tokens, spec: MethodSpec, draft_attn, layer_map, sparse_layers, eval_from,
                matched_budget) -> tuple[float, float, float]:
    """(mean NLL, kept keys, visible keys) of one method on one window; keys over the sparse layers."""
    t = len(tokens)
    if spec.kind == "dense":
        return _nll(target, tokens, None, eval_from), 1.0, 1.0
    if spec.kind == "specattn-s":
        masks = {j: topp_key_mask(draft_attn[layer_map.draft_layer[j]], spec.p)[None, None] for j in sparse_layers}
        return masked_nll(target, tokens, masks, eval_from)
    budget = spec.budget if spec.budget is not None else matched_budget
    if spec.kind == "streaming":
        mask = streaming_key_mask(t, budget, target.embed.weight.device)[None, None]
        return masked_nll(target, tokens, dict.fromkeys(sparse_layers, mask), eval_from)
    return masked_nll(target, tokens, dict.fromkeys(sparse_layers, quest_mask_fn(budget)), eval_from)


@torch.no_grad()
def run_methods(target: Transformer, windows: list[list[int]], specs: list[MethodSpec],
                draft: Transformer | None = None, layer_map: LayerMap | None = None,
                dense_layers: tuple[int, ...] = (0, 1), eval_from: int | None = None, progress=None) -> list[SparseRun]:
    """Perplexity of each method over the windows (mean NLL over all evaluated positions of all windows)."""
    needs_draft = any(s.kind == "specattn-s" for s in specs)
    if needs_draft and (draft is None or layer_map is None):
        raise InvalidInputError("specattn-s methods need a draft model (--draft) and a layer map")
    t = len(windows[0])
    eval_from = t // 4 if eval_from is None else eval_from
    if not 0 <= eval_from < t - 1:
        raise InvalidInputError(f"evaluation start {eval_from} must be within the {t}-token window")
    n_layers = target.cfg.num_layers
    sparse_layers = [j for j in range(n_layers) if j not in dense_layers]
    reference = next((s for s in specs if s.kind == "specattn-s"), None)
    order = sorted(specs, key=lambda s: s != reference)                  # the reference first: it sets the budget
    totals = {s: [0.0, 0.0, 0.0] for s in specs}
    for w, tokens in enumerate(windows):
        draft_attn = head_averaged_attention(draft, tokens) if needs_draft else None
        matched = None
        for spec in order:
            nll, kept, visible = _window_run(target, tokens, spec, draft_attn, layer_map, sparse_layers, eval_from,
                                             matched)
            if spec is reference:
                matched = kept / visible
            for i, x in enumerate((nll, kept, visible)):
                totals[spec][i] += x
            if progress:
                progress(f"window {w + 1}/{len(windows)}: {spec.name}")
    runs = []
    for spec in specs:
        nll, kept, visible = totals[spec]
        frac_sparse = kept / visible if spec.kind != "dense" else 1.0
        frac_all = (frac_sparse * len(sparse_layers) + len(dense_layers)) / n_layers if spec.kind != "dense" else 1.0
        extra = {"budget_from": reference.name} if spec.kind in ("quest", "streaming") and spec.budget is None else {}
        runs.append(SparseRun(spec.name, math.exp(nll / len(windows)), frac_all, frac_sparse, extra))
    return runs


def sparse_perplexity_study(target: Transformer, draft: Transformer, layer_map: LayerMap, tokens: list[int],
                            ps: list[float], reference_p: float = 0.95, dense_layers: tuple[int, ...] = (0, 1),
                            eval_from: int | None = None, progress=None) -> list[SparseRun]:
    """Dense, SpecAttn-S at each p, and StreamingLLM and Quest with the keys SpecAttn-S kept at reference_p."""
    if all(abs(p - reference_p) > 1e-9 for p in ps):
        raise InvalidInputError(f"the reference p {reference_p} for the baselines' budget must be among {ps}")
    ordered = [reference_p] + [p for p in ps if abs(p - reference_p) > 1e-9]
    specs = [MethodSpec("dense")] + [MethodSpec("specattn-s", p=p) for p in ordered] + \
        [MethodSpec("streaming"), MethodSpec("quest")]
    runs = {r.name: r for r in run_methods(target, [tokens], specs, draft, layer_map, dense_layers, eval_from,
                                           progress)}
    names = ["dense"] + [MethodSpec("specattn-s", p=p).name for p in ps] + ["streaming", "quest"]
    return [runs[n] for n in names]
