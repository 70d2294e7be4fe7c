"""Layer alignment for SpecAttn-S: which draft layer's attention stands in for each verifier layer.

Both models read the same calibration tokens; each layer's attention is averaged over its heads, and
KL(verifier layer j || draft layer i), averaged over query rows, scores every pair. The map gives every
verifier layer one draft layer (a draft layer may serve several): `monotone` keeps the chosen draft layer
non-decreasing with depth (the paper's dynamic program), `closest` takes the best draft layer per row.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .cache import PagedKVCache
from .errors import InvalidInputError
from .evaluation.results import write_json_atomic
from .model import Transformer

MODES = ("monotone", "closest")


@torch.no_grad()
def head_averaged_attention(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """[layers, T, T] fp32: row t is query t's attention over keys 0..t, averaged over all query heads."""
    dev = model.embed.weight.device
    cache = PagedKVCache(model.cfg, 1, len(tokens), dtype=model.embed.weight.dtype, device=dev)
    cache.reset(1)
    cache.reserve(len(tokens))
    view = cache.step_view(len(tokens))
    view.attention_probs = {}
    model(torch.tensor([tokens], device=dev), cache, view)
    return torch.stack([view.attention_probs[layer][0] for layer in range(model.cfg.num_layers)]).float()


def kl_matrix(target_attn: torch.Tensor, draft_attn: torch.Tensor, skip_rows: int = 16) -> torch.Tensor:
    """[target layers, draft layers]: mean over query rows >= skip_rows of KL(target row || draft row).
    The first rows see a handful of keys and say little about a layer, so they are left out."""
    if target_attn.shape[1:] != draft_attn.shape[1:]:
        raise InvalidInputError("draft and verifier attention cover different tokens; align on the same text")
    p = target_attn[:, skip_rows:].reshape(target_attn.shape[0], -1)
    log_q = draft_attn[:, skip_rows:].clamp(min=1e-12).log().reshape(draft_attn.shape[0], -1)
    entropy_term = (p * p.clamp(min=1e-12).log()).sum(-1)                      # sum p log p per target layer
    cross = p @ log_q.T                                                          # sum p log q per pair
    return (entropy_term[:, None] - cross) / (target_attn.shape[1] - skip_rows)


def closest_map(cost: torch.Tensor) -> list[int]:
    return cost.argmin(dim=1).tolist()


def monotone_map(cost: torch.Tensor) -> list[int]:
    """Non-decreasing draft layer per target layer with the least total cost (dynamic programming)."""
    n_target, n_draft = cost.shape
    total = cost[0].clone()
    choice = torch.zeros(n_target, n_draft, dtype=torch.long)
    for j in range(1, n_target):
        best_prefix, arg = torch.cummax(-total, dim=0)          # best predecessor i' <= i for every i
        choice[j] = arg
        total = cost[j] - best_prefix
    layer_map = [int(total.argmin())]
    for j in range(n_target - 1, 0, -1):
        layer_map.append(int(choice[j, layer_map[-1]]))
    return layer_map[::-1]


@dataclass
class LayerMap:
    draft_layer: list[int]          # draft_layer[j]: the draft layer whose attention guides verifier layer j
    mode: str
    kl: list[list[float]]           # [verifier layer][draft layer]
    calibration_tokens: int

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path, target_layers: int, draft_layers: int) -> LayerMap:
        try:
            data = json.loads(Path(path).read_text())
            lm = cls(**data)
        except (OSError, ValueError, TypeError) as e:
            raise InvalidInputError(f"cannot read layer map {path}: {e}; make one with `specattn layermap`") from e
        if len(lm.draft_layer) != target_layers or any(not 0 <= i < draft_layers for i in lm.draft_layer):
            raise InvalidInputError(f"layer map {path} is for another model pair ({len(lm.draft_layer)} verifier "
                                    f"layers); this pair has {target_layers} verifier and {draft_layers} draft layers")
        return lm


def align_layers(draft: Transformer, target: Transformer, tokens: list[int], mode: str = "monotone") -> LayerMap:
    if mode not in MODES:
        raise InvalidInputError(f"unknown layer-map mode {mode!r}; choose one of {', '.join(MODES)}")
    if len(tokens) < 64:
        raise InvalidInputError(f"calibration text has {len(tokens)} tokens; give at least 64")
    cost = kl_matrix(head_averaged_attention(target, tokens), head_averaged_attention(draft, tokens))
    chosen = monotone_map(cost) if mode == "monotone" else closest_map(cost)
    return LayerMap(chosen, mode, cost.tolist(), len(tokens))


def save_heatmap(layer_map: LayerMap, path: str | Path, title: str = "") -> None:
    """KL per (verifier layer, draft layer) with the chosen cells marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kl = torch.tensor(layer_map.kl)
    fig, ax = plt.subplots(figsize=(1 + 0.28 * kl.shape[1], 1 + 0.24 * kl.shape[0]))
    im = ax.imshow(kl.log10().numpy(), aspect="auto", cmap="viridis_r")
    ax.scatter(layer_map.draft_layer, range(kl.shape[0]), marker="x", color="red", s=30, label="chosen")
    ax.set_xlabel("draft layer")
    ax.set_ylabel("verifier layer")
    ax.set_title(title or f"log10 KL(verifier || draft), {layer_map.mode} map")
    fig.colorbar(im, ax=ax)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
