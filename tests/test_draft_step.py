"""kernels.draft_step (a sparse draft step's blocks in one persistent launch) against the model's own blocks.

In the interpreter each phase of each layer is its own launch (the grid barrier needs a GPU), so these check
the phases' arithmetic: q/k/v with rotation and cache write, attention over page lists split any way, the merge
inside the output product, SwiGLU and the down product, for several program counts."""
import copy
import functools

import pytest
import torch

from specattn.cache import PagedKVCache
from specattn.config import ModelConfig
from specattn.decoding.ar import GenerationParams, generate_ar
from specattn.decoding.self_speculative import generate_self_speculative
from specattn.kernels import draft_step
from specattn.selection import PageSelection, StreamingPolicy, VerificationGuidedPolicy

from .conftest import random_model

PAGE = 16


def small_config(qkv_bias=False, head_dim=32):
    # intermediate 80 and hidden 96: neither a multiple of the kernel's 16- and 64-wide tiles
    return ModelConfig("llama", vocab_size=64, hidden_size=96, intermediate_size=80, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=head_dim, qkv_bias=qkv_bias)


def prefilled(cfg, dtype, lens, seed=0):
    """A random model (norms folded) and a cache holding prompts of these lengths, one more token reserved."""
    model = random_model(cfg, seed=seed, std=0.15).to(dtype)
    model.fold_norms()
    cache = PagedKVCache(cfg, len(lens), max(lens) + 8, page_size=PAGE, dtype=dtype)
    cache.reset(len(lens))
    gen = torch.Generator().manual_seed(seed)
    for b, n in enumerate(lens):
        rows = slice(b, b + 1)
        cache.reserve(n, rows=rows)
        ids = torch.randint(0, cfg.vocab_size, (1, n), generator=gen)
        model(ids, cache, cache.step_view(n, rows=rows))
        cache.advance(n, rows=rows)
    cache.reserve(1)
    return model, cache


def random_lists(cfg, lens, keep=0.5, seed=1):
    """Per (layer, sequence, KV head): a random subset of the pages that will hold the new token's context, the
    page of the new token always in; ascending, -1 padded."""
    gen = torch.Generator().manual_seed(seed)
    width = max(n // PAGE + 1 for n in lens)
    pages = torch.full((cfg.num_layers, len(lens), cfg.num_kv_heads, width), -1, dtype=torch.int32)
    counts = torch.zeros(cfg.num_layers, len(lens), cfg.num_kv_heads, dtype=torch.int32)
    for layer in range(cfg.num_layers):
        for b, n in enumerate(lens):
            last = n // PAGE                      # the new token (position n) lands here
            for h in range(cfg.num_kv_heads):
                chosen = [p for p in range(last) if torch.rand((), generator=gen).item() < keep] + [last]
                pages[layer, b, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
                counts[layer, b, h] = len(chosen)
    return PageSelection(pages, counts)


def one_step(model, cache, selection, tokens, use_kernel, monkeypatch=None, **options):
    """One draft step through the model, its blocks as the kernel (with these draft_blocks options) or not."""
    if options:
        monkeypatch.setattr(draft_step, "draft_blocks", functools.partial(draft_step.draft_blocks, **options))
    view = cache.step_view(1)
    view.selection = selection
    model.draft_step_kernel = use_kernel
    return model(tokens, cache, view), view


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype,bias,splits,keys,programs", [
    (torch.float32, False, 1, 128, 4), (torch.float32, True, 2, 32, 3), (torch.float32, False, 4, 16, 7),
    (torch.bfloat16, False, None, 128, 5)])
def test_one_launch_draft_step_matches_the_models_blocks(dtype, bias, splits, keys, programs, monkeypatch):
    """keys: an attention tile's keys (16: a page a tile, so each of 4 splits of a 5-page list has pages)."""
    cfg = small_config(qkv_bias=bias)
    lens = [37, 70, 16]                           # 16: the new token opens a fresh page
    model, cache = prefilled(cfg, dtype, lens)
    selection = random_lists(cfg, lens)
    tokens = torch.tensor([[3], [17], [60]])
    ref_cache = copy.deepcopy(cache)
    ref, view = one_step(model, ref_cache, selection, tokens, use_kernel=False)
    assert draft_step.unsupported(model, view, torch.empty(1, dtype=dtype)) is None
    got, _ = one_step(model, cache, selection, tokens, True, monkeypatch,
                      tiling=draft_step.DraftTiling(splits=splits, block_keys=keys), programs=programs)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert relative_error(got, ref) < tol
    slots = view.slots
    for pool, ref_pool in ((cache.k, ref_cache.k), (cache.v, ref_cache.v)):
        new = pool.flatten(1, 2)[:, slots]        # [layers, batch, kv_heads, dim] at the new tokens' slots
        assert relative_error(new, ref_pool.flatten(1, 2)[:, slots]) < tol
        assert new.abs().sum() > 0


def test_the_kernel_reads_only_the_listed_pages():
    cfg = small_config()
    lens = [70, 50]
    model, cache = prefilled(cfg, torch.float32, lens)
    tokens = torch.tensor([[5], [9]])
    few = random_lists(cfg, lens, keep=0.0)       # the new token's page alone
    full = random_lists(cfg, lens, keep=1.0)
    got_few, _ = one_step(model, copy.deepcopy(cache), few, tokens, use_kernel=True)
    got_full, _ = one_step(model, copy.deepcopy(cache), full, tokens, use_kernel=True)
    ref_few, _ = one_step(model, copy.deepcopy(cache), few, tokens, use_kernel=False)
    assert relative_error(got_few, ref_few) < 1e-4
    assert relative_error(got_few, got_full) > 1e-3


def test_steps_the_kernel_does_not_cover_are_named():
    cfg = small_config()
    lens = [40]
    model, cache = prefilled(cfg, torch.float32, lens)
    selection = random_lists(cfg, lens)
    view = cache.step_view(1)
    x = torch.empty(1)
    assert "sparse" in draft_step.unsupported(model, view, x)          # dense step: no selection
    view.selection = PageSelection(selection.pages, selection.counts, dense_layers=frozenset({0}))
    assert "every layer" in draft_step.unsupported(model, view, x)
    view.selection = selection
    view.page_mass = torch.zeros(1)
    assert "measures" in draft_step.unsupported(model, view, x)
    view.page_mass = None
    unfolded = random_model(cfg)
    assert "folded" in draft_step.unsupported(unfolded, view, x)
    assert "cache" in draft_step.unsupported(model, view, x, PagedKVCache(cfg, 1, 64, dtype=torch.bfloat16))
    small_heads = random_model(small_config(head_dim=16))
    small_heads.fold_norms()
    assert "head_dim" in draft_step.unsupported(small_heads, view, x)


def test_a_grid_that_cannot_be_resident_at_once_is_refused():
    cfg = small_config()
    model, cache = prefilled(cfg, torch.float32, [40])
    view = cache.step_view(1)
    view.selection = random_lists(cfg, [40])
    x = torch.zeros(1, cfg.hidden_size)
    cos = sin = torch.zeros(1, 1, 1, cfg.head_dim)
    with pytest.raises(ValueError, match="resident"):
        draft_step.draft_blocks(model, x, cos, sin, cache, view, draft_step.DraftTiling(programs_per_sm=2))


def test_splits_give_every_program_work_up_to_four():
    assert draft_step.choose_splits(192, 132) == 1      # the default model's batch-64 draft: 64 x 3 lists
    assert draft_step.choose_splits(96, 132) == 2
    assert draft_step.choose_splits(3, 132) == 4


@pytest.mark.parametrize("make_policy", [lambda: VerificationGuidedPolicy(32, 16, 16), lambda: StreamingPolicy(32, 16)],
                         ids=["specattn-y", "magicdec"])
def test_self_speculation_with_one_launch_drafts_equals_ar(make_policy, monkeypatch):
    """Drafts through the kernel in the decoding loop: the tokens stay AR's (verification decides), and the drafts
    are the blocks' own (fp32): the same acceptance, round for round, as drafts through the model's blocks."""
    cfg = small_config()
    model = random_model(cfg, seed=3, std=0.15)
    model.fold_norms()
    torch.manual_seed(3)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (90, 61)]
    params = GenerationParams(max_new_tokens=12)
    ar = generate_ar(model, PagedKVCache(cfg, 2, 140), prompts, params).tokens
    launches = []
    blocks = draft_step.draft_blocks
    monkeypatch.setattr(draft_step, "draft_blocks", lambda *a, **kw: launches.append(1) or blocks(*a, **kw))
    runs = {}
    for use_kernel in (False, True):
        model.draft_step_kernel = use_kernel
        runs[use_kernel] = generate_self_speculative(model, PagedKVCache(cfg, 2, 140), prompts, params, make_policy(),
                                                     3)
    assert runs[True].tokens == ar and runs[True].stats["rounds"] > 1
    assert runs[True].stats["acceptance_per_position"] == runs[False].stats["acceptance_per_position"]
    assert len(launches) >= 3 * (runs[True].stats["rounds"] - 1)     # gamma draft steps a round
