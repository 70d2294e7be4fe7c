"""Dense AR decoding: backends agree, batches equal single runs, sampling is seeded and correct, stops work."""
import pytest
import torch

from specattn.cache import PagedKVCache
from specattn.decoding.ar import GenerationParams, cut_at_stop, generate_ar
from specattn.decoding.runner import equal_length_runs
from specattn.decoding.sampling import SamplingParams, probabilities
from specattn.errors import ContextTooLongError, InvalidInputError

from .conftest import random_model


def run(model, prompts, **kw):
    cache = PagedKVCache(model.cfg, len(prompts), 200, page_size=8)
    return generate_ar(model, cache, prompts, GenerationParams(**kw))


def test_triton_backend_gives_the_same_tokens_as_reference(tiny_cfg):
    model = random_model(tiny_cfg)
    model.set_attention_backend("reference")
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (5, 40, 17)]
    ref = run(model, prompts, max_new_tokens=12, prefill_chunk=16).tokens
    model.set_attention_backend("triton")
    assert run(model, prompts, max_new_tokens=12, prefill_chunk=16).tokens == ref


def test_batch_equals_each_prompt_alone(tiny_cfg):
    model = random_model(tiny_cfg, seed=3)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (11, 11, 30, 4)]
    batched = run(model, prompts, max_new_tokens=20, prefill_chunk=7).tokens
    assert batched == [run(model, [p], max_new_tokens=20).tokens[0] for p in prompts]


def test_equal_length_runs_group_neighbours():
    prompts = [[1] * 3, [2] * 3, [3] * 5, [4] * 3]
    assert equal_length_runs(prompts, 2048) == [slice(0, 2), slice(2, 3), slice(3, 4)]


def test_sampling_is_reproducible_with_a_seed_and_varies_without(tiny_cfg):
    model = random_model(tiny_cfg, std=0.05)   # flat logits so samples differ
    prompt = [[1, 2, 3]]
    a = run(model, prompt, max_new_tokens=16, sampling=SamplingParams(1.0, 0.9, seed=7)).tokens
    b = run(model, prompt, max_new_tokens=16, sampling=SamplingParams(1.0, 0.9, seed=7)).tokens
    c = run(model, prompt, max_new_tokens=16, sampling=SamplingParams(1.0, 0.9, seed=8)).tokens
    assert a == b and a != c


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = probabilities(logits, SamplingParams(1.0, 0.8))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = probabilities(logits, SamplingParams(1.0, 0.81))
    assert (p > 0).sum() == 3


def test_nucleus_keeps_the_sorted_prefix_reaching_p():
    """nucleus (a threshold on the values, as the GPU kernel finds it) keeps what sorting would keep: the shortest
    top prefix whose mass reaches p, plus tokens tied with its last one."""
    from specattn.decoding.sampling import nucleus
    torch.manual_seed(3)
    probs = torch.softmax(torch.randn(6, 5000) * 3, -1)
    probs[0, :10] = probs[0, 0]                      # ties
    probs = probs / probs.sum(-1, keepdim=True)
    for p in (0.5, 0.9, 0.95):
        ordered, order = probs.sort(-1, descending=True)
        keep_sorted = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, (ordered.cumsum(-1) - ordered) < p)
        edge = torch.where(keep_sorted, probs, 2.0).min(-1, keepdim=True).values      # the last kept value
        kept = nucleus(probs, p) > 0
        assert torch.equal(kept, probs >= edge)
        assert ((probs * kept).sum(-1) >= p - 1e-5).all()
    assert torch.allclose(nucleus(probs, 0.9).sum(-1), torch.ones(6))


def test_sampled_frequencies_follow_the_distribution(tiny_cfg):
    """First sampled token over many seeds ~ softmax(logits / T): a chi-square-style bound."""
    model = random_model(tiny_cfg, std=0.05)
    cache = PagedKVCache(model.cfg, 1, 32)
    from specattn.decoding.runner import prefill
    logits = prefill(model, cache, [[5, 6, 7]])
    probs = probabilities(logits, SamplingParams(0.7))[0]
    counts = torch.zeros(97)
    n = 3000
    batch_prompts = [[5, 6, 7]] * 100
    for seed in range(n // 100):
        toks = run(model, batch_prompts, max_new_tokens=1, sampling=SamplingParams(0.7, seed=seed)).tokens
        for t in toks:
            counts[t[0]] += 1
    expected = probs * n
    keep = expected > 5
    chi2 = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum().item()
    assert chi2 < 2 * keep.sum().item() + 30     # mean ~ dof; far above for a wrong distribution


def test_stop_tokens_cut_output(tiny_cfg):
    model = random_model(tiny_cfg)
    free = run(model, [[1, 2, 3]], max_new_tokens=40).tokens[0]
    stop = free[5]
    got = run(model, [[1, 2, 3]], max_new_tokens=40, stop_token_ids=(stop,)).tokens[0]
    assert got == cut_at_stop(free, (stop,)) and got[-1] == stop and len(got) <= 6


def test_a_stopped_sequence_goes_idle_without_changing_the_others(tiny_cfg):
    """After its stop token a sequence's attention reads only its new token (cache.mark_idle_on_device): the
    other sequences of the batch must still get the tokens they get alone, and the next run starts with none
    idle."""
    model = random_model(tiny_cfg)
    first, second = [1, 2, 3], [9, 8, 7, 6]
    free = run(model, [first], max_new_tokens=30).tokens[0]
    stop = free[3]
    alone = run(model, [second], max_new_tokens=30, stop_token_ids=(stop,)).tokens[0]
    assert stop not in alone and len(alone) == 30       # (this model and these prompts) the second never stops
    cache = PagedKVCache(model.cfg, 2, 64)
    params = GenerationParams(max_new_tokens=30, stop_token_ids=(stop,))
    both = generate_ar(model, cache, [first, second], params).tokens
    assert cache.idle.tolist() == [True, False]                    # the first stopped after 4 tokens: idle
    assert both == [cut_at_stop(free, (stop,)), alone]
    generate_ar(model, cache, [second, first], GenerationParams(max_new_tokens=2))
    assert not cache.idle.any()


def test_bad_requests_are_clear_errors(tiny_cfg):
    model = random_model(tiny_cfg)
    with pytest.raises(InvalidInputError, match="empty"):
        run(model, [[]], max_new_tokens=4)
    with pytest.raises(ContextTooLongError, match="positions"):
        run(model, [[1] * 500], max_new_tokens=20)
    with pytest.raises(ContextTooLongError, match="KV cache holds"):
        run(model, [[1] * 190], max_new_tokens=20)
    with pytest.raises(InvalidInputError, match="max new tokens"):
        GenerationParams(max_new_tokens=0)
    with pytest.raises(InvalidInputError, match="top-p"):
        SamplingParams(1.0, 1.5)
    with pytest.raises(InvalidInputError, match="temperature"):
        SamplingParams(-1.0)


def test_inverse_cdf_draws_follow_the_distribution_and_skip_zero_tokens():
    """The graph-friendly sampler: chi-square against the distribution; tokens of probability 0 never drawn,
    also at the edges u -> 0 and u = 1."""
    from specattn.decoding.sampling import sample_inverse_cdf
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    n = 20000
    u = 1 - torch.rand(n, generator=torch.Generator().manual_seed(1))
    draws = sample_inverse_cdf(probs.expand(n, -1), u)
    counts = torch.bincount(draws, minlength=6).float()
    assert counts[[0, 2, 5]].sum() == 0
    expected = probs * n
    keep = expected > 0
    chi2 = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum().item()
    assert chi2 < 13.8                            # 2 degrees of freedom, p = 0.001
    edges = sample_inverse_cdf(probs.expand(2, -1), torch.tensor([1e-9, 1.0]))
    assert edges.tolist() == [1, 4]


def test_compiling_the_steps_folds_the_norms_into_the_projections(tiny_cfg):
    """What the GPU runs (compile_steps): the folded blocks (forward_folded), whose logits the transformers tests
    check; the same tokens as the model before folding."""
    from specattn.model import EAGER, Transformer
    torch.manual_seed(0)
    model = Transformer(tiny_cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.attn_norm.weight.uniform_(0.5, 1.5)
            block.mlp_norm.weight.uniform_(0.5, 1.5)
    before = run(model, [[5, 6, 7]], max_new_tokens=12).tokens
    model.compile_steps()
    assert model.norms_folded
    model.step_fns = model.prefill_fns = EAGER         # eager again: the compiled functions are for the GPU
    assert run(model, [[5, 6, 7]], max_new_tokens=12).tokens == before


def test_small_step_kernels_by_shape(tiny_cfg):
    """Which products of a small step compile_steps hands to kernels.gemv: all for small shapes; cuBLAS keeps
    gate/up past GEMV_MAX_GATE_UP columns (8B: 28,672; a 70B rank at TP=2: 28,672)."""
    import dataclasses

    from specattn.model import GEMV_PROJECTIONS, small_step_projections
    assert small_step_projections(tiny_cfg) == GEMV_PROJECTIONS
    llama8b_rank = dataclasses.replace(tiny_cfg, hidden_size=4096, intermediate_size=14336 // 2)
    assert small_step_projections(llama8b_rank) == ("qkv", "rope", "o", "down")
    llama70b_rank = dataclasses.replace(tiny_cfg, hidden_size=8192, intermediate_size=28672 // 2)
    assert small_step_projections(llama70b_rank) == ("qkv", "rope", "o", "down")


def test_folded_weights_through_the_unfolded_blocks_are_the_same_model(tiny_cfg):
    """Tensor-parallel blocks keep the unfolded code (norm, then projection) after fold_norms: with norm weights of
    one and the weights folded into the projections it must compute the same logits."""
    import copy

    from specattn.model import Transformer

    from .conftest import logits_through_cache
    torch.manual_seed(1)
    model = Transformer(tiny_cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.attn_norm.weight.uniform_(-1.5, 1.5)
            block.mlp_norm.weight.uniform_(-1.5, 1.5)
    folded = copy.deepcopy(model)
    folded.fold_norms()
    folded.norms_folded = False                     # as a tensor-parallel rank runs it: the unfolded block code
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 21))
    want = logits_through_cache(model, ids)
    assert (logits_through_cache(folded, ids) - want).abs().max().item() < 1e-4


def test_a_step_compile_mode_with_inductors_own_cuda_graphs_is_refused(tiny_cfg, monkeypatch):
    """Our steps are captured as CUDA graphs already; a compile mode that captures its own would nest them."""
    import specattn.model
    from specattn.model import Transformer
    monkeypatch.setattr(specattn.model, "STEP_COMPILE_MODE", "reduce-overhead")
    with pytest.raises(InvalidInputError, match="STEP_COMPILE_MODE"):
        Transformer(tiny_cfg).compile_steps()
