"""The Llama-family transformer (Llama, Mistral, Qwen2, SmolLM, TinyLlama), pure math over a paged cache.

`forward(tokens, cache, view)` appends the new tokens' K/V to the cache and returns logits. The model
knows nothing of sampling or KV selection; attention goes through `attention.Attention`.

The pointwise-heavy parts of a block (norms, rotary, SiLU, residuals) are pure functions of tensors so
that, on the GPU, `torch.compile` can fuse each into a few kernels: for small models, kernel count and
Python overhead rather than bytes set the time of a step. The same functions run eagerly on CPU.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .cache import PagedKVCache, StepView
from .config import ModelConfig, rope_inv_freq
from .errors import InvalidInputError
from .kernels.reference import rms_scale, unnormed_projection

STEP_MAX_Q_LEN = 16  # decode and verify steps; longer blocks are prefill chunks
COLUMN_MAJOR_WEIGHTS = True   # on the GPU (compile_steps): see Transformer.store_weights_column_major
# On the GPU (compile_steps): fold each block's norm weights into the projections after them (Transformer.fold_norms),
# so a block runs 8 launches instead of 10 (Block.forward_folded). Tensor-parallel blocks too (TP_FOLDED), small-step
# products by kernels.gemv included, with the output and down products' partial sums all-reduced before each joins
# the residual stream; False keeps their unfolded path (Block.forward, exact on folded weights: norm weights of
# one). 2 H200s, 8B shape at TP=2, same run (results/tp_folded_ab.json): b1 8K 3.81 -> 3.66 ms, b1 32K 4.12 -> 3.98,
# b16 8K 5.96 -> 5.92.
FOLD_NORMS = True
TP_FOLDED = True
# On the GPU (compile_steps), with folded norms: steps of at most gemv.MAX_ROWS rows compute these projections with
# kernels.gemv (launched early with PDL, no split-K reduction) instead of cuBLAS; their weights stay row-major.
# "rope" (with "qkv"): the q/k/v product also applies the rotary embedding and writes the cache (Block.queries);
# "swiglu" (with "gate_up"): the gate/up product also applies the norm's 1 / rms and SwiGLU.
GEMV_PROJECTIONS: tuple[str, ...] = ("qkv", "rope", "o", "gate_up", "swiglu", "down")
# ... but gate/up products wider than this stay with cuBLAS (compile_steps drops "gate_up" and "swiglu" for such
# models, whose gate/up weight then stays column-major): H200 round-robin step times at batch 1 with "gate_up" +
# "swiglu" against without (results/profile_swiglu_*_b1.json): default model (3,072 columns) 643 vs 681 us,
# 8B shape (28,672) 5,012 vs 4,622 us.
GEMV_MAX_GATE_UP = 8192
# Steps of at most this many rows use them: 2 (FMA sums; 4-row products were slower than cuBLAS, tune_gemv_pdl.json).
# Above gemv.MAX_ROWS they run on tensor cores (gemv.row_blocks), slower than cuBLAS in the default model's batch-64
# steps on the H200 (results/profile_small_gemm_*_b64.json, round-robin: draft 1,589 vs 1,431 us, verify 4 x 5 rows
# 5,084 vs 4,793 us), so unused by default; with tiles swept per shape too (H100, profile_dot_gemm_draft_b64.json:
# draft step 1,542 vs 1,254 us). Environment SPECATTN_GEMV_MAX_ROWS sets it for a whole benchmark run (with
# SPECATTN_GEMV_DOT_TILINGS: gemv.load_dot_tilings).
GEMV_MAX_ROWS_DEFAULT = 2
GEMV_MAX_ROWS = int(os.environ.get("SPECATTN_GEMV_MAX_ROWS", GEMV_MAX_ROWS_DEFAULT))
# torch.compile mode of the decode/verify step functions: None (default) or "max-autotune-no-cudagraphs" (Triton
# GEMM templates with the norm / SwiGLU fused around them; our own CUDA graphs wrap the step, so never a mode
# with Inductor's cudagraphs). benchmarks/profile_step.py --compile-modes times both in one run; the environment
# variable SPECATTN_STEP_COMPILE_MODE sets it for a whole benchmark run.
STEP_COMPILE_MODE: str | None = os.environ.get("SPECATTN_STEP_COMPILE_MODE") or None
STEP_COMPILE_MODES = (None, "max-autotune-no-cudagraphs")
# Sparse draft steps run all blocks as one persistent kernel (kernels.draft_step) where it supports them (each model's
# draft_step_kernel; environment SPECATTN_DRAFT_STEP_KERNEL=1 for a whole run). Off: slower on the H100 (b64 draft
# step 2,928 vs 1,263 us at its first tiling, the blocks alone 1,853 us at its best;
# results/profile_draft_kernel_b64.json).
DRAFT_STEP_KERNEL = os.environ.get("SPECATTN_DRAFT_STEP_KERNEL") == "1"


def small_step_projections(cfg: ModelConfig) -> tuple[str, ...]:
    """GEMV_PROJECTIONS less what stays with cuBLAS for this (rank's) shape: gate/up products wider than
    GEMV_MAX_GATE_UP. (A 70B rank at TP=2 lost with its output and down products on kernels.gemv, 23.10 vs 21.45 ms
    a step, until gemv.choose_tiling got tiles for outputs of 8,192 columns: then 20.64 vs 20.73 ms with them on
    cuBLAS; results/tp2_70b_variants*.json.)"""
    wide = 2 * cfg.intermediate_size > GEMV_MAX_GATE_UP
    return tuple(name for name in GEMV_PROJECTIONS if not (wide and name in ("gate_up", "swiglu")))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 like the reference implementation, then scale in the model dtype.
    return weight * (x.float() * rms_scale(x, eps)).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, q_len, heads, dim]; cos, sin: [batch, q_len, 1, dim]. Half-split (HF) layout."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions: [batch, q_len] -> cos, sin: [batch, q_len, 1, head_dim] in `dtype`."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attention_inputs(x, mlp_out, norm_w, eps: float, qkv_w, qkv_b):
    """The previous block's MLP output joins the residual stream here (not at the end of that block), so the add
    fuses with this norm: x, mlp_out: [batch, q_len, hidden] (mlp_out None for the first block) -> the residual
    stream x and the fused q/k/v projection [batch, q_len, (heads + 2 kv_heads) * head_dim]."""
    if mlp_out is not None:
        x = x + mlp_out
    return x, F.linear(rms_norm(x, norm_w, eps), qkv_w, qkv_b)


def attention_output_and_mlp(x, attn, o_w, norm_w, eps: float, gate_up_w, down_w):
    """Residual + output projection, then the SwiGLU MLP. attn: [b, t, heads * dim]. Returns the residual stream
    and the MLP output, which the next block (or the final norm) adds."""
    return residual_and_mlp(x, F.linear(attn, o_w), norm_w, eps, gate_up_w, down_w)


def residual_and_mlp(x, attn_out, norm_w, eps: float, gate_up_w, down_w):
    """The part of attention_output_and_mlp after the output projection. Tensor parallel runs it on its own, as
    attn_out is the all-reduced sum of the ranks' partial projections (the MLP output is then a partial sum)."""
    x = x + attn_out
    gate, up = F.linear(rms_norm(x, norm_w, eps), gate_up_w).chunk(2, dim=-1)
    return x, F.linear(F.silu(gate) * up, down_w)


def final_logits(x, mlp_out, norm_w, eps: float, head_w):
    """mlp_out: the last block's MLP output, or None when the blocks added it to x already (folded norms)."""
    if mlp_out is not None:
        x = x + mlp_out
    return head_product(rms_norm(x, norm_w, eps), head_w)


# The output head's product written in fp32 on CUDA (bf16/fp16 operands, fp32 accumulation either way): logits
# rounded to bf16 tie or swap near-tied argmaxes whenever two steps round differently (one bf16 step is 0.0625 at
# logits of 8-16). divergence_qwen_b64.json: every greedy departure from AR examined was such a tie.
FP32_LOGITS = True


def head_product(h: torch.Tensor, head_w: torch.Tensor) -> torch.Tensor:
    """h [..., hidden] -> fp32 logits [..., vocab]."""
    if FP32_LOGITS and h.is_cuda and h.dtype in (torch.bfloat16, torch.float16):
        flat = torch.mm(h.reshape(-1, h.shape[-1]), head_w.t(), out_dtype=torch.float32)
        return flat.view(*h.shape[:-1], head_w.shape[0])
    return F.linear(h, head_w).float()


def rotate_and_store(qkv: torch.Tensor, cos, sin, cache: PagedKVCache, layer: int, view: StepView, heads: int,
                     kv_heads: int, norm_of: torch.Tensor | None = None, eps: float = 0.0,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding of q and k; k and v go to the cache. Returns q [batch, q_len, heads, head_dim]. On the GPU
    one Triton kernel does it all (three kernels otherwise). norm_of: qkv projects these rows before their RMSNorm
    (weight folded into the projection; bias not yet added): scale each row by its 1 / rms, then add bias."""
    if cache.device.type == "cuda" and qkv.dtype == cache.dtype:
        from .kernels.rope_kv import rope_and_write_kv
        q = rope_and_write_kv(qkv, cos, sin, cache.k[layer], cache.v[layer], view.slots, heads, kv_heads,
                              norm_of, eps, bias)
        cache.wrote(layer, view)
        return q
    if norm_of is not None:
        qkv = unnormed_projection(qkv, norm_of, eps, bias).to(qkv.dtype)
    b, t, width = qkv.shape
    dim = width // (heads + 2 * kv_heads)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q = apply_rope(q.reshape(b, t, heads, dim), cos, sin)
    cache.write(layer, apply_rope(k.reshape(b, t, kv_heads, dim), cos, sin), v.reshape(b, t, kv_heads, dim), view)
    return q


def swiglu_of_unnormed(gate_up: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """silu(gate) * up of the gate/up projection of rows x before their (folded) RMSNorm: one kernel on the GPU."""
    if gate_up.is_cuda:
        from .kernels.swiglu import swiglu_rms
    else:
        from .kernels.reference import swiglu_rms
    return swiglu_rms(gate_up, x, eps)


EAGER = {"rope_tables": rope_tables, "attention_inputs": attention_inputs,
         "attention_output_and_mlp": attention_output_and_mlp, "residual_and_mlp": residual_and_mlp,
         "final_logits": final_logits}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


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

    all_reduce = None    # tensor parallel: sums this rank's partial projections over ranks
    gemv_projections: tuple[str, ...] = ()   # Transformer.compile_steps: see GEMV_PROJECTIONS

    def project(self, name: str, rows: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """rows [n, in] @ the named projection's weight.T -> [n, out], or added in place into `into` [n, out]."""
        weight = getattr(self, name).weight
        if self.small_gemv(name, rows):
            from .kernels.gemv import gemv
            return gemv(rows, weight, out=into, add=into)
        return F.linear(rows, weight) if into is None else into.addmm_(rows, weight.t())

    def small_gemv(self, name: str, rows: torch.Tensor) -> bool:
        """Whether the named projection of these rows runs as kernels.gemv (see GEMV_PROJECTIONS)."""
        return name in self.gemv_projections and rows.shape[0] <= GEMV_MAX_ROWS

    def forward(self, x, mlp_out, cos, sin, cache: PagedKVCache, view: StepView, attention: Attention, fns: dict):
        """(residual stream, previous block's MLP output or None) -> the same pair after this block."""
        cfg = self.cfg
        b, t, _ = x.shape
        x, qkv = fns["attention_inputs"](x, mlp_out, self.attn_norm.weight, cfg.rms_norm_eps, self.qkv.weight,
                                         self.qkv.bias)
        q = rotate_and_store(qkv, cos, sin, cache, self.layer, view, cfg.num_heads, cfg.num_kv_heads)
        attn = attention(q, cache.k[self.layer], cache.v[self.layer], view, cfg.head_dim ** -0.5, self.layer)
        if self.all_reduce is None:
            return fns["attention_output_and_mlp"](x, attn.reshape(b, t, -1), self.o.weight, self.mlp_norm.weight,
                                                   cfg.rms_norm_eps, self.gate_up.weight, self.down.weight)
        # Tensor parallel: this rank's heads and MLP columns give partial sums of each projection back to the
        # hidden size; an all-reduce completes each before its residual add.
        attn_out = self.all_reduce(F.linear(attn.reshape(b, t, -1), self.o.weight))
        x, mlp_out = fns["residual_and_mlp"](x, attn_out, self.mlp_norm.weight, cfg.rms_norm_eps,
                                             self.gate_up.weight, self.down.weight)
        return x, self.all_reduce(mlp_out)

    def fused_rope(self, rows: torch.Tensor) -> bool:
        """Whether the q/k/v product of these rows also rotates and writes the cache ("rope"); on tensor cores
        (more than gemv.MAX_ROWS rows) a program takes 8 rotation pairs, so head_dim must be a multiple of 16."""
        from .kernels.gemv import MAX_ROWS
        return ("rope" in self.gemv_projections and self.small_gemv("qkv", rows)
                and (rows.shape[0] <= MAX_ROWS or self.cfg.head_dim % 16 == 0))

    def queries(self, x, cos, sin, cache: PagedKVCache, view: StepView) -> torch.Tensor:
        """Folded blocks: q of the new rows x [batch, q_len, hidden] (the residual stream), their k and v rotated
        into the cache. With "rope" in gemv_projections a small step does it in one kernel with the product."""
        cfg = self.cfg
        b, t, hidden = x.shape
        stream = x.view(b * t, hidden)
        if self.fused_rope(stream) and x.dtype == cache.dtype:
            from .kernels.rope_kv import project_rope_and_write_kv
            q = project_rope_and_write_kv(x, self.qkv.weight, cos, sin, cache.k[self.layer], cache.v[self.layer],
                                          view.slots, cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps,
                                          self.qkv.bias)
            cache.wrote(self.layer, view)
            return q
        return rotate_and_store(self.project("qkv", stream).view(b, t, -1), cos, sin, cache, self.layer, view,
                                cfg.num_heads, cfg.num_kv_heads, norm_of=x, eps=cfg.rms_norm_eps, bias=self.qkv.bias)

    def forward_folded(self, x, cos, sin, cache: PagedKVCache, view: StepView, attention: Attention):
        """`forward` once Transformer.fold_norms has moved each norm's weight into the projection after it: the
        projections read the residual stream x itself, each row's 1 / rms scales their outputs in the kernels that
        read them next (rotary + cache write, SwiGLU), and the output and down projections are added into the stream
        (cuBLAS addmm_ with beta 1, or kernels.gemv), so no kernel is left for a residual add or a norm: 8 calls
        instead of 10 with cuBLAS; at 1-2 rows (GEMV_PROJECTIONS) 7 kernels, 6 where the gate/up product applies
        SwiGLU itself, none of them a split-K reduction. Returns x."""
        cfg = self.cfg
        b, t, hidden = x.shape
        stream = x.view(b * t, hidden)
        q = self.queries(x, cos, sin, cache, view)
        attn = attention(q, cache.k[self.layer], cache.v[self.layer], view, cfg.head_dim ** -0.5, self.layer)
        self.add_projection("o", attn.reshape(b * t, -1), stream)
        if "swiglu" in self.gemv_projections and self.small_gemv("gate_up", stream):
            from .kernels.swiglu import project_swiglu_rms
            act = project_swiglu_rms(stream, self.gate_up.weight, cfg.rms_norm_eps)
        else:
            act = swiglu_of_unnormed(self.project("gate_up", stream), stream, cfg.rms_norm_eps)
        self.add_projection("down", act, stream)
        return x

    def add_projection(self, name: str, rows: torch.Tensor, stream: torch.Tensor) -> None:
        """stream += rows @ weight.T, in place. Tensor parallel: this rank's product is a partial sum (its heads'
        or MLP columns' share), completed by the all-reduce before it joins the replicated residual stream."""
        if self.all_reduce is None:
            self.project(name, rows, into=stream)
        else:
            stream.add_(self.all_reduce(self.project(name, rows)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_backend: str = "auto", device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size // cfg.vocab_shards, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.attention = Attention(attention_backend, torch.device(device))
        inv_freq = torch.tensor(rope_inv_freq(cfg), dtype=torch.float32)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Replaced by compiled versions on the GPU (see `compile_steps`).
        self.step_fns = self.prefill_fns = EAGER
        self.norms_folded = False  # see fold_norms
        self.draft_step_kernel = DRAFT_STEP_KERNEL
        # Inference only: with grad-enabled weights a compiled step called outside no_grad would trace autograd,
        # which the fp32-logits product (torch.mm with out_dtype) does not support (profile_step.py failed so).
        self.requires_grad_(False)

    tp = None            # distributed.TensorParallel when this model is one rank's shard

    def set_tensor_parallel(self, tp) -> None:
        self.tp = tp
        for block in self.blocks:
            block.all_reduce = tp.all_reduce if tp else None

    def set_attention_backend(self, backend: str) -> None:
        self.attention = Attention(backend, self.embed.weight.device)

    def store_weights_column_major(self, keep_row_major: tuple[str, ...] = ()) -> None:
        """Keep each block's projection weights (but those named in keep_row_major) as the transposed view of a
        contiguous transpose (same values, same shape). F.linear then hands cuBLAS the other operand layout, for
        which it picks GEMV kernels that fill the H100 better at decode shapes (8B-shaped model, batch 1: step
        6.65 -> 6.47 ms)."""
        for block in self.blocks:
            for name in ("qkv", "o", "gate_up", "down"):
                linear = getattr(block, name)
                if name in keep_row_major:
                    linear.weight.data = linear.weight.data.contiguous()
                elif linear.weight.is_contiguous():
                    linear.weight.data = linear.weight.data.t().contiguous().t()

    @torch.no_grad()
    def fold_norms(self) -> None:
        """Multiply each block's attention and MLP norm weights into the q/k/v and gate/up projections' input
        columns and set those norm weights to one: the same model (the final norm stays), whose projections can
        read the residual stream directly (Block.forward_folded). Exported weights (loader.hf_state_dict) remain
        a valid checkpoint of it. In bf16 the folded products are rounded once more."""
        if self.norms_folded:
            return
        for block in self.blocks:
            for linear, norm in ((block.qkv, block.attn_norm), (block.gate_up, block.mlp_norm)):
                w = linear.weight
                w.copy_((w.float() * norm.weight.float()[None, :]).to(w.dtype))
                norm.weight.fill_(1.0)
        self.norms_folded = True

    def compile_steps(self) -> None:
        """Fuse the pointwise parts of every forward with torch.compile (GPU). Decode/verify steps compile
        once per (batch, q_len) for the fastest kernels; prefill chunks share one dynamic-shape version."""
        import torch._dynamo
        if STEP_COMPILE_MODE not in STEP_COMPILE_MODES:
            raise InvalidInputError(f"step compile mode {STEP_COMPILE_MODE!r} is not supported; set "
                                    f"SPECATTN_STEP_COMPILE_MODE to one of {STEP_COMPILE_MODES[1:]} or unset it "
                                    "(STEP_COMPILE_MODE)")
        gemv_projections = small_step_projections(self.cfg) if FOLD_NORMS and (self.tp is None or TP_FOLDED) else ()
        if COLUMN_MAJOR_WEIGHTS:
            self.store_weights_column_major(keep_row_major=gemv_projections)
        if FOLD_NORMS:
            self.fold_norms()
        for block in self.blocks:
            block.gemv_projections = gemv_projections
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.step_fns = {name: torch.compile(fn, dynamic=False, fullgraph=True, mode=STEP_COMPILE_MODE)
                         for name, fn in EAGER.items()}
        self.prefill_fns = {name: torch.compile(fn, dynamic=True, fullgraph=True) for name, fn in EAGER.items()}

    def blocks_in_one_launch(self, x, cos, sin, cache: PagedKVCache, view: StepView) -> bool:
        """Run every block on x [batch, 1, hidden] in place as kernels.draft_step's one persistent launch, if it
        supports this step (a sparse draft step); returns whether it did."""
        from .kernels import draft_step
        if draft_step.unsupported(self, view, x, cache) is not None:
            return False
        draft_step.draft_blocks(self, x.view(-1, x.shape[-1]), cos, sin, cache, view)
        return True

    def forward(self, tokens: torch.Tensor, cache: PagedKVCache, view: StepView,
                all_logits: bool = False) -> torch.Tensor:
        """tokens: [batch, q_len] -> logits [batch, q_len or 1, vocab] (fp32).

        Writes the new tokens' K/V into the cache at `view.slots`; the caller advances the cache.
        """
        fns = self.step_fns if view.q_len <= STEP_MAX_Q_LEN else self.prefill_fns
        x, mlp_out = self.embed(tokens), None
        cos, sin = fns["rope_tables"](view.positions, self.inv_freq, x.dtype)
        folded = self.norms_folded and (self.tp is None or TP_FOLDED)
        if not (folded and self.draft_step_kernel and self.blocks_in_one_launch(x, cos, sin, cache, view)):
            for block in self.blocks:
                if folded:
                    x = block.forward_folded(x, cos, sin, cache, view, self.attention)
                else:
                    x, mlp_out = block(x, mlp_out, cos, sin, cache, view, self.attention, fns)
        if not all_logits:
            x, mlp_out = x[:, -1:], None if mlp_out is None else mlp_out[:, -1:]
        logits = fns["final_logits"](x, mlp_out, self.norm.weight, self.cfg.rms_norm_eps, self.lm_head.weight)
        if self.cfg.vocab_shards > 1:        # this rank's slice of the vocabulary -> all of it, on every rank
            logits = self.tp.all_gather_last(logits)
        return logits
