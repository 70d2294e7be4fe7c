"""Lossless acceptance of drafted tokens: greedy matching and speculative rejection sampling.

Contract (as FlashInfer's chain speculative sampling): given drafts [batch, gamma], the draft's
distributions q [batch, gamma, vocab] and the target's p [batch, gamma + 1, vocab] at the same positions
(p[:, i] predicts the token drafts[:, i] stands at; p[:, gamma] the bonus), return accepted counts
[batch] and emitted tokens [batch, gamma + 1] padded with -1: the accepted drafts, then one token from
the target (the residual distribution on a rejection, p[:, gamma] if all drafts were accepted).
"""
from __future__ import annotations

import torch


def accept_greedy(drafts: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts: [batch, gamma]; target_logits: [batch, gamma + 1, vocab]."""
    target = target_logits.argmax(-1)                                     # [batch, gamma + 1]
    matches = (drafts == target[:, :-1]).int()
    accepted = matches.cumprod(-1).sum(-1)                                # leading matches
    return accepted, _emit(drafts, accepted, target.gather(1, accepted[:, None]).squeeze(1))


def accept_sampling(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                    generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept draft i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw from
    normalise(max(0, p_i - q_i)). The emitted tokens are distributed exactly as the target's samples."""
    batch, gamma = drafts.shape
    p_d = p[:, :gamma].gather(-1, drafts[..., None]).squeeze(-1)
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(batch, gamma, device=drafts.device, generator=generator)
    ok = (u * q_d < p_d).int()                                            # u < p/q without dividing by 0
    accepted = ok.cumprod(-1).sum(-1)
    rows = torch.arange(batch, device=drafts.device)
    p_next = p[rows, accepted]                                            # [batch, vocab]
    q_next = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)[rows, accepted]   # zero past the drafts
    residual = (p_next - q_next).clamp(min=0)
    # All accepted: q_next is 0 and the residual is p itself. A zero residual (p == q) cannot be reached
    # by a rejection; fall back to p to stay well defined.
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, p_next, residual)
    last = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)
    return accepted, _emit(drafts, accepted, last)


def _emit(drafts: torch.Tensor, accepted: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    batch, gamma = drafts.shape
    pos = torch.arange(gamma + 1, device=drafts.device)[None, :]
    padded = torch.cat([drafts, torch.full_like(drafts[:, :1], -1)], dim=1)
    out = torch.where(pos < accepted[:, None], padded, -1)
    return torch.where(pos == accepted[:, None], last[:, None], out)
