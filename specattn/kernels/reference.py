"""Plain-PyTorch references for the kernels. Slow, obvious, and the CPU fallback."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_pages(pages: torch.Tensor, page_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """pages: [num_pages, page_size, kv_heads, dim]; page_table: [batch, max_pages] ->
    [batch, kv_heads, num_tokens, dim] (tokens past a sequence's length are garbage; mask them)."""
    page_size = pages.shape[1]
    n_pages = -(-num_tokens // page_size)
    out = pages[page_table[:, :n_pages].long()]                     # [b, n, ps, h, d]
    out = out.reshape(out.shape[0], -1, *pages.shape[2:])[:, :num_tokens]
    return out.transpose(1, 2)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Store new K/V rows at flat `slots` of one layer's pools [pages, page_size, kv_heads, dim]."""
    heads, dim = k_pool.shape[2], k_pool.shape[3]
    k_pool.view(-1, heads, dim).index_copy_(0, slots, k.reshape(-1, heads, dim).to(k_pool.dtype))
    v_pool.view(-1, heads, dim).index_copy_(0, slots, v.reshape(-1, heads, dim).to(v_pool.dtype))


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / rms of each row of x [..., hidden], fp32 [..., 1]: what RMSNorm multiplies a row by before its weight."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def unnormed_projection(proj: torch.Tensor, norm_of: torch.Tensor, eps: float,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32: the projection `proj` of rows `norm_of` taken before their RMSNorm (weight folded into the
    projection) made whole: scaled by each row's 1 / rms, then `bias` added."""
    scaled = proj.float() * rms_scale(norm_of, eps)
    return scaled if bias is None else scaled + bias.float()


def rope_and_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor,
                      v_pool: torch.Tensor, slots: torch.Tensor, heads: int, kv_heads: int,
                      norm_of: torch.Tensor | None = None, eps: float = 0.0,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate q and k of the fused projection qkv [batch, q_len, (heads + 2 kv_heads) * dim], store k and v at
    `slots`, return q [batch, q_len, heads, dim]. The rotation is computed in fp32 and rounded once.
    norm_of [batch, q_len, hidden]: qkv is the projection of these rows before their RMSNorm (whose weight is
    folded into the projection), so it is first scaled by each row's 1 / rms, then `bias` is added."""
    b, t, width = qkv.shape
    dim, dtype = width // (heads + 2 * kv_heads), qkv.dtype
    if norm_of is not None:
        qkv = unnormed_projection(qkv, norm_of, eps, bias)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)

    def rotate(x, n):
        x = x.reshape(b, t, n, dim).float()
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos.float() + torch.cat((-x2, x1), dim=-1) * sin.float()

    write_kv(k_pool, v_pool, rotate(k, kv_heads), v.reshape(b, t, kv_heads, dim), slots)
    return rotate(q, heads).to(dtype)


def swiglu_rms(gate_up: torch.Tensor, norm_of: torch.Tensor, eps: float) -> torch.Tensor:
    """silu(gate) * up of the gate/up projection [..., 2 * inter] of rows `norm_of` [..., hidden] taken before
    their RMSNorm (its weight folded into the projection): both halves are first scaled by the row's 1 / rms."""
    gate, up = unnormed_projection(gate_up, norm_of, eps).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    page_table: torch.Tensor, lens_after: torch.Tensor, scale: float,
                    max_kv_len: int | None = None, page_mass: bool = False,
                    selected_pages: torch.Tensor | None = None, selected_counts: torch.Tensor | None = None,
                    token_level: bool = False, mass_tokens: int | None = None):
    """Attention of new queries over the paged cache, causal inside the new block.

    q: [batch, q_len, heads, dim]; the q_len new tokens are the last q_len of each sequence, so query t
    of sequence b sees keys 0 .. lens_after[b] - q_len + t. Returns [batch, q_len, heads, dim].
    `max_kv_len` bounds how much of the page table is gathered (default: all of it).
    Sparse (selected_pages [batch, kv_heads, K] logical pages, -1 padded; selected_counts [batch, kv_heads])
    and page_mass (also return [batch, kv_heads, pages] softmax mass per page): see the Triton kernel.
    """
    if page_mass or selected_pages is not None:
        res = _explicit_attention(q, k_pages, v_pages, page_table, lens_after, scale, page_mass,
                                  selected_pages, selected_counts, token_level)
        if page_mass and mass_tokens and mass_tokens > k_pages.shape[1]:
            return res[0], block_mass(res[1], mass_tokens // k_pages.shape[1], lens_after, k_pages.shape[1])
        return res
    batch, q_len, heads, dim = q.shape
    kv_len = max_kv_len or page_table.shape[1] * k_pages.shape[1]
    k = gather_pages(k_pages, page_table, kv_len)
    v = gather_pages(v_pages, page_table, kv_len)
    key_pos = torch.arange(kv_len, device=q.device)
    query_pos = lens_after.long()[:, None] - q_len + torch.arange(q_len, device=q.device)   # [b, t]
    mask = key_pos[None, None, :] <= query_pos[:, :, None]                                 # [b, t, kv]
    group = heads // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype),
                                         attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)


def _scores_by_kv_head(q, k_pages, v_pages, page_table, lens_after, scale, kv_len):
    """fp32 scores [b, hkv, g, t, L] (query heads grouped under their KV head), values [b, hkv, L, d] and the
    causal mask [b, 1, t, L] of the new rows over the first kv_len keys."""
    batch, q_len, heads, dim = q.shape
    kv_heads = k_pages.shape[2]
    k = gather_pages(k_pages, page_table, kv_len).float()
    v = gather_pages(v_pages, page_table, kv_len).float()
    qg = q.float().view(batch, q_len, kv_heads, heads // kv_heads, dim).permute(0, 2, 3, 1, 4)
    scores = torch.einsum("bhgtd,bhld->bhgtl", qg, k) * scale
    key_pos = torch.arange(kv_len, device=q.device)
    query_pos = lens_after.long()[:, None] - q_len + torch.arange(q_len, device=q.device)
    return scores, v, (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]


def _explicit_attention(q, k_pages, v_pages, page_table, lens_after, scale, page_mass, selected_pages,
                        selected_counts, token_level=False):
    """The same attention with explicit probabilities, for the page-mass by-product and sparse pages."""
    batch, q_len, heads, dim = q.shape
    page_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    kv_len = page_table.shape[1] * page_size
    scores, v, causal = _scores_by_kv_head(q, k_pages, v_pages, page_table, lens_after, scale, kv_len)
    allowed = causal[:, :, None]                                                    # [b, 1, 1, t, L]
    if selected_pages is not None:
        n_sel = selected_pages.shape[2]
        valid = torch.arange(n_sel, device=q.device) < selected_counts[..., None]  # [b, hkv, K]
        # scatter_add, not scatter: padding entries point at item 0 too and must not overwrite it.
        items = kv_len if token_level else page_table.shape[1]
        chosen = torch.zeros(batch, kv_heads, items, dtype=torch.int32, device=q.device)
        chosen.scatter_add_(2, torch.where(valid, selected_pages.long(), 0), valid.int())
        chosen = chosen > 0
        if not token_level:
            chosen = chosen.repeat_interleave(page_size, dim=2)
        allowed = allowed & chosen[:, :, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = torch.einsum("bhgtl,bhld->bhgtd", probs, v).permute(0, 3, 1, 2, 4).reshape(q.shape).to(q.dtype)
    if not page_mass:
        return out
    mass = probs.sum(dim=(2, 3)).view(batch, kv_heads, -1, page_size).sum(-1)     # [b, hkv, pages]
    if selected_pages is not None:
        mass = torch.where(valid, torch.gather(mass, 2, torch.where(valid, selected_pages.long(), 0)), 0.0)
    return out, mass


def topp_threshold(weights: torch.Tensor, p: float) -> torch.Tensor:
    """weights: [..., n] >= 0 -> the smallest value of the shortest top set holding mass >= p * sum."""
    if p >= 1.0:
        return torch.zeros(weights.shape[:-1], dtype=torch.float32, device=weights.device)
    ordered, _ = weights.float().sort(dim=-1, descending=True)
    mass = ordered.cumsum(-1)
    idx = torch.searchsorted(mass, (p * mass[..., -1:]).contiguous()).clamp(max=weights.shape[-1] - 1)
    return ordered.gather(-1, idx).squeeze(-1)


def topk_threshold(weights: torch.Tensor, k: int) -> torch.Tensor:
    """weights: [..., n] -> the k-th largest value."""
    return weights.float().topk(k, dim=-1).values[..., -1]


def touched_pages(page_table: torch.Tensor, lens_after: torch.Tensor, q_len: int, page_size: int):
    """(logical, physical) pages [batch, n] that a step of q_len new tokens wrote into, the last repeated to fill n."""
    first = (lens_after.long() - q_len) // page_size
    n_touch = (q_len + page_size - 1) // page_size + 1
    last = (lens_after.long() - 1) // page_size
    logical = torch.minimum(first[:, None] + torch.arange(n_touch, device=page_table.device), last[:, None])
    return logical, torch.gather(page_table.long(), 1, logical)


def update_key_bounds(k_pool: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, page_table: torch.Tensor,
                      lens_after: torch.Tensor, q_len: int) -> None:
    """Channel-wise min and max of the valid keys of every page a step wrote, recomputed from the page (so a page
    truncated and written again gets exact bounds back). k_pool: [pages, page_size, kv_heads, dim] (one layer);
    key_min/max: [pages, kv_heads, dim]."""
    ps = k_pool.shape[1]
    logical, pages = touched_pages(page_table, lens_after, q_len, ps)
    keys = k_pool[pages]                                                    # [b, n, ps, h, d]
    token_pos = logical[..., None] * ps + torch.arange(ps, device=k_pool.device)
    valid = (token_pos < lens_after.long()[:, None, None])[..., None, None]
    big = torch.finfo(keys.dtype).max
    key_min[pages.reshape(-1)] = torch.where(valid, keys, big).amin(dim=2).flatten(0, 1)
    key_max[pages.reshape(-1)] = torch.where(valid, keys, -big).amax(dim=2).flatten(0, 1)


def quest_page_scores(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, page_table: torch.Tensor,
                      lens: torch.Tensor, page_size: int = 16) -> torch.Tensor:
    """Upper bound of q.k per page (sum_d max(q kmax, q kmin)), max over the query heads of a KV head.
    q: [batch, heads, dim]; key_min/max: [pages, kv_heads, dim] -> [batch, kv_heads, max_pages]."""
    batch, heads, dim = q.shape
    kv_heads = key_min.shape[1]
    kmin = key_min[page_table.long()].float()                       # [b, max_pages, hkv, d]
    kmax = key_max[page_table.long()].float()
    qg = q.float().view(batch, 1, kv_heads, heads // kv_heads, dim)
    bound = torch.maximum(qg * kmax[:, :, :, None], qg * kmin[:, :, :, None]).sum(-1).amax(-1)   # [b, p, hkv]
    n_pages = (lens.long() + page_size - 1) // page_size
    past = torch.arange(page_table.shape[1], device=q.device)[None, :] >= n_pages[:, None]
    return bound.masked_fill(past[:, :, None], float("-inf")).transpose(1, 2)


def two_row_token_scores(q: torch.Tensor, k_pages: torch.Tensor, page_table: torch.Tensor, lens_after: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Vegas's selection scores: softmax weights of the first and the last new row, averaged over all query
    heads and both rows. q: [batch, q_len, heads, dim] -> [batch, page_table.shape[1] * page_size] fp32."""
    batch, q_len, heads, dim = q.shape
    kv_len = page_table.shape[1] * k_pages.shape[1]
    kv_heads = k_pages.shape[2]
    k = gather_pages(k_pages, page_table, kv_len).float()                      # [b, hkv, L, d]
    rows = torch.arange(2, device=q.device) * (q_len - 1)          # first and last (no host tensor: graphs)
    qr = torch.stack([q[:, 0], q[:, -1]], dim=1).float().view(batch, 2, kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("brhgd,bhld->brhgl", qr, k) * scale
    query_pos = lens_after.long()[:, None] - q_len + rows                      # [b, 2]
    visible = torch.arange(kv_len, device=q.device)[None, None, :] <= query_pos[:, :, None]
    probs = torch.softmax(scores.masked_fill(~visible[:, :, None, None], float("-inf")), dim=-1)
    return probs.mean(dim=(1, 2, 3))


def attention_with_probs(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
                         lens_after: torch.Tensor, scale: float, max_kv_len: int | None = None,
                         key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit attention for studies (layer alignment, draft-guided sparsity, perplexity under sparse masks).

    key_mask: [batch, 1 or kv_heads, q_len, kv_len] bool, keys each query may attend to (the causal mask
    still applies; a query always keeps its own token). Returns the output and the attention probabilities
    averaged over all query heads: [batch, q_len, kv_len] fp32.
    """
    batch, q_len, heads, dim = q.shape
    kv_len = max_kv_len or page_table.shape[1] * k_pages.shape[1]
    scores, v, allowed = _scores_by_kv_head(q, k_pages, v_pages, page_table, lens_after, scale, kv_len)
    if key_mask is not None:
        key_pos = torch.arange(kv_len, device=q.device)
        query_pos = lens_after.long()[:, None] - q_len + torch.arange(q_len, device=q.device)
        own = key_pos[None, None, :] == query_pos[:, :, None]
        allowed = allowed & (key_mask[..., :kv_len] | own[:, None])
    probs = torch.softmax(scores.masked_fill(~allowed[:, :, None], float("-inf")), dim=-1)
    out = torch.einsum("bhgtl,bhld->bhgtd", probs, v).permute(0, 3, 1, 2, 4).reshape(q.shape).to(q.dtype)
    return out, probs.mean(dim=(1, 2))


def block_mass(mass: torch.Tensor, pages_per_block: int, lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Page mass [b, hkv, pages] -> each existing page gets its block's total / the block's existing pages."""
    b, h, pages = mass.shape
    n_pages = (lens.long() + page_size - 1) // page_size                                  # [b]
    page = torch.arange(pages, device=mass.device)
    block = page // pages_per_block
    in_block = (n_pages[:, None] - block[None, :] * pages_per_block).clamp(max=pages_per_block)   # [b, pages]
    padded = F.pad(mass, (0, -pages % pages_per_block))
    per_block = padded.view(b, h, -1, pages_per_block).sum(-1)                          # [b, h, blocks]
    spread = per_block[:, :, block] / in_block.clamp(min=1)[:, None]
    return torch.where((page[None, :] < n_pages[:, None])[:, None], spread, 0.0)
