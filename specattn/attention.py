"""The one attention interface the model calls. Backends: `reference` (plain PyTorch, any device)
and `triton` (paged flash-decoding kernel, GPU or TRITON_INTERPRET)."""
from __future__ import annotations

import os

import torch

from .cache import StepView
from .errors import DeviceError, InvalidInputError
from .kernels import reference

BACKENDS = ("auto", "reference", "triton")


def resolve_backend(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise InvalidInputError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":   # the interpreter is for testing kernels, far too slow to pick by default
        return "triton" if device.type == "cuda" else "reference"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise DeviceError("the triton attention backend needs a CUDA GPU (or TRITON_INTERPRET=1); "
                          "use --attention reference")
    return name


class Attention:
    """Callable: (q [batch, q_len, heads, dim], k_pages, v_pages, view, scale, layer) -> [batch, q_len, heads, dim].

    The view says what else a step wants: `view.selection` restricts each KV head to its page list (sparse
    drafting), `view.page_mass` receives the attention mass per page (verification), from the same pass.
    """

    def __init__(self, backend: str, device: torch.device):
        self.backend = resolve_backend(backend, device)

    def __call__(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                 view: StepView, scale: float, layer: int = 0) -> torch.Tensor:
        if recording_wanted(view, layer) or (view.key_masks is not None and layer in view.key_masks):
            return self._study(q, k_pages, v_pages, view, scale, layer)
        options = {}
        sel = view.selection
        if sel is not None and layer not in sel.dense_layers:
            pages, counts = sel.pages_for(layer, q, view, kernels=self.backend == "triton")
            options = {"selected_pages": pages, "selected_counts": counts, "token_level": sel.token_level}
        want_mass = (view.page_mass is not None and not options
                     and (view.mass_layers is None or layer in view.mass_layers))
        if want_mass:
            options["mass_tokens"] = view.mass_tokens
        want_scores = view.token_scores is not None
        # Idle sequences (outputs dropped) read only their new block, in dense attention only: a sparse list need
        # not hold those keys, and a row that sees no key at all would turn into NaN.
        lens = view.lens_after if "selected_pages" in options else view.attention_lens()
        if self.backend == "triton":
            from .kernels import paged_attention, token_scores
            fused_scores = want_scores and not options and not want_mass
            if "selected_pages" in options and sel.physical is not None:
                options["selected_physical"] = sel.physical[layer]
            per_step = want_mass and mass_per_step(view)
            if per_step:        # partials kept for one finishing launch after the last layer
                if view.step_mass is None:
                    view.step_mass = paged_attention.StepMass(view.page_mass.shape[0])
                options.update(step_mass=view.step_mass, layer=layer)
            elif want_mass:     # straight into this layer's slot of the buffer
                options["mass_out"] = view.page_mass[layer, : q.shape[0]]
            out = paged_attention.paged_attention(q, k_pages, v_pages, view.page_table, lens, scale,
                                                  max_kv_len=view.max_kv_len, page_mass=want_mass,
                                                  return_lse=fused_scores, plan_rows=view.active, **options)
            if want_mass:
                out, _ = out
            if per_step and layer == view.page_mass.shape[0] - 1:
                view.step_mass.finish(view.page_mass[:, : q.shape[0]], lens)
                view.step_mass = None
            if fused_scores:   # one more read of K, normalised with the verify pass's own log-sum-exp
                out, lse = out
                scores = token_scores.two_row_token_scores(q, k_pages, view.page_table, lens, lse, scale)
                view.token_scores[layer, :, : scores.shape[-1]] = scores
                want_scores = False
        else:
            out = reference.paged_attention(q, k_pages, v_pages, view.page_table, lens, scale,
                                            max_kv_len=view.max_kv_len, page_mass=want_mass, **options)
            if want_mass:
                out, mass = out
                view.page_mass[layer, :, :, : mass.shape[-1]] = mass
        if want_scores:
            scores = reference.two_row_token_scores(q, k_pages, view.page_table, lens, scale)
            view.token_scores[layer, :, : scores.shape[-1]] = scores
        return out

    def _study(self, q, k_pages, v_pages, view: StepView, scale: float, layer: int) -> torch.Tensor:
        mask = (view.key_masks or {}).get(layer)
        if callable(mask):
            mask = mask(layer, q, k_pages, view)
        out, probs = reference.attention_with_probs(q, k_pages, v_pages, view.page_table, view.attention_lens(), scale,
                                                    view.max_kv_len, mask)
        if recording_wanted(view, layer):
            view.attention_probs[layer] = probs
        return out


def mass_per_step(view: StepView) -> bool:
    """Whether a step's page mass is finished once after its last layer (paged_attention.StepMass) rather than
    once a layer: when every layer computes it the same way, as a verify step does."""
    from .kernels import paged_attention
    return (paged_attention.FINISH_MASS_PER_STEP and view.mass_layers is None and view.selection is None
            and view.attention_probs is None and view.key_masks is None)


def recording_wanted(view: StepView, layer: int) -> bool:
    return view.attention_probs is not None and (view.record_layers is None or layer in view.record_layers)
