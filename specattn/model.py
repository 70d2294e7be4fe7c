"""The Llama-family transformer (Llama, Mistral, Qwen2, SmolLM, TinyLlama), pure math over a paged cache.

`forward(tokens, cache, view)` appends the new tokens' K/V to the cache and returns logits. The model
knows nothing of sampling or KV selection; attention goes through `attention.Attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .cache import PagedKVCache, StepView
from .config import ModelConfig, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementation, then scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, q_len, heads, dim]; cos, sin: [batch, q_len, 1, dim]. Half-split (HF) layout."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv = nn.Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(q_dim, cfg.hidden_size, bias=False)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: PagedKVCache, view: StepView, attention: Attention):
        cfg = self.cfg
        b, t, _ = x.shape
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = self.qkv(self.attn_norm(x)).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = apply_rope(q.view(b, t, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.view(b, t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        cache.write(self.layer, k, v.view(b, t, cfg.num_kv_heads, cfg.head_dim), view)
        attn = attention(q, cache.k[self.layer], cache.v[self.layer], view, cfg.head_dim ** -0.5)
        x = x + self.o(attn.reshape(b, t, q_dim))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_backend: str = "auto", device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.attention = Attention(attention_backend, torch.device(device))
        inv_freq = torch.tensor(rope_inv_freq(cfg), dtype=torch.float32)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def set_attention_backend(self, backend: str) -> None:
        self.attention = Attention(backend, self.embed.weight.device)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, tokens: torch.Tensor, cache: PagedKVCache, view: StepView,
                all_logits: bool = False) -> torch.Tensor:
        """tokens: [batch, q_len] -> logits [batch, q_len or 1, vocab] (fp32).

        Writes the new tokens' K/V into the cache at `view.slots`; the caller advances the cache.
        """
        x = self.embed(tokens)
        cos, sin = self.rope(view.positions, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, cache, view, self.attention)
        if not all_logits:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()

    @torch.no_grad()
    def load_hf_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy weights named as in HF Llama/Qwen2 checkpoints, fusing q/k/v and gate/up."""
        from .loader import take_hf_weights
        take_hf_weights(self, tensors)
