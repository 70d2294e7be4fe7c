"""SpecAttn-S: layer alignment, top-p key sets, draft-model speculation (lossless and approximate)."""
import pytest
import torch

from specattn.alignment import LayerMap, align_layers, kl_matrix, monotone_map, save_heatmap
from specattn.cache import PagedKVCache
from specattn.config import ModelConfig
from specattn.decoding.ar import GenerationParams, generate_ar
from specattn.decoding.draft_speculative import SparseVerification, generate_draft_speculative
from specattn.decoding.sampling import SamplingParams
from specattn.errors import InvalidInputError
from specattn.evaluation.sparse_ppl import sparse_perplexity_study, topp_key_mask

from .conftest import random_model

TARGET = ModelConfig("LlamaForCausalLM", 97, 64, 128, 4, 4, 2, 16, max_positions=512)
DRAFT = ModelConfig("LlamaForCausalLM", 97, 32, 64, 3, 2, 1, 16, max_positions=512)


def test_layer_map_finds_planted_identical_layers():
    """A 3-layer draft that copies the verifier's first three layers (its last MLP scrambled, which cannot change
    that layer's attention): verifier layers 0-2 have KL ~0 to draft layers 0-2 and both maps pick them."""
    torch.manual_seed(0)
    target = random_model(TARGET, std=0.3)
    shallow = ModelConfig("LlamaForCausalLM", 97, 64, 128, 3, 4, 2, 16, max_positions=512)
    draft = random_model(shallow, std=0.3)
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if not k.startswith("blocks.3.")})
    for p in (*draft.blocks[2].gate_up.parameters(), *draft.blocks[2].down.parameters()):
        p.data.normal_(0, 0.3)
    tokens = torch.randint(0, 97, (96,), generator=torch.Generator().manual_seed(1)).tolist()
    for mode in ("closest", "monotone"):
        lm = align_layers(draft, target, tokens, mode)
        kl = torch.tensor(lm.kl)
        assert lm.draft_layer[:3] == [0, 1, 2]
        assert kl[2, 2] < 1e-4 < min(kl[2, 0], kl[2, 1])


def test_monotone_map_is_the_cheapest_non_decreasing_map():
    cost = torch.tensor([[0.0, 5, 5], [5, 5, 0], [5, 0, 5], [5, 5, 0]])
    assert monotone_map(cost) in ([0, 1, 1, 2], [0, 2, 2, 2])        # both cost 5; closest would be [0,2,1,2]
    best = sum(cost[j, i] for j, i in enumerate(monotone_map(cost)))
    import itertools
    brute = min(sum(cost[j, m[j]] for j in range(4)) for m in itertools.product(range(3), repeat=4)
                if all(a <= b for a, b in zip(m, m[1:], strict=False)))
    assert best == brute


def test_kl_matrix_is_zero_on_identical_attention_and_positive_elsewhere():
    a = torch.softmax(torch.randn(2, 40, 40).tril() * 3 + torch.triu(torch.full((40, 40), -1e9), 1), -1)
    kl = kl_matrix(a, a.flip(0))
    assert kl[0, 1].abs() < 1e-5 and kl[0, 0] > 1e-3


def test_layer_map_round_trip_and_heatmap(tmp_path):
    lm = LayerMap([0, 1, 1], "monotone", [[0.1, 0.2], [0.3, 0.1], [0.2, 0.05]], 128)
    lm.save(tmp_path / "m.json")
    assert LayerMap.load(tmp_path / "m.json", 3, 2).draft_layer == [0, 1, 1]
    with pytest.raises(InvalidInputError, match="another model pair"):
        LayerMap.load(tmp_path / "m.json", 4, 2)
    save_heatmap(lm, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_topp_key_mask_holds_mass_p_and_is_minimal():
    probs = torch.softmax(torch.randn(5, 300) * 2, -1)
    mask = topp_key_mask(probs, 0.9)
    kept = (probs * mask).sum(-1)
    assert (kept >= 0.9 - 1e-5).all()
    smallest_kept = torch.where(mask, probs, 2.0).min(-1).values
    assert ((kept - smallest_kept) < 0.9 + 1e-5).all()             # dropping the smallest falls below p
    assert topp_key_mask(probs, 1.0).all()


def _pair():
    torch.manual_seed(3)
    return random_model(TARGET, std=0.2), random_model(DRAFT, std=0.2)


def test_draft_speculation_is_lossless_under_greedy():
    target, draft = _pair()
    prompts = [[1, 5, 9, 2], [7, 3, 3, 8, 1, 4, 4], [2] * 30]
    params = GenerationParams(max_new_tokens=64)
    ar = generate_ar(target, PagedKVCache(TARGET, 3, 120, page_size=8), prompts, params).tokens
    for gamma in (1, 4):
        res = generate_draft_speculative(target, draft, PagedKVCache(TARGET, 3, 120, page_size=8),
                                         PagedKVCache(DRAFT, 3, 120, page_size=8), prompts, params, gamma)
        assert res.tokens == ar
        assert 1 <= res.stats["mean_accepted_len"] <= gamma + 1
        # the steady rate comes from the rounds before the first sequence finished, as in self-speculation
        assert res.stats["full_batch_rounds"] == min(res.stats["rounds_by_sequence"]) < res.stats["rounds"]
        assert res.stats["decode_tokens_per_s_steady"] > 0


def test_a_later_lossless_run_reuses_the_round_runners_and_sampling_stays_in_lockstep():
    target, draft = _pair()
    prompts = [[1, 5, 9, 2], [7, 3, 3, 8, 1, 4, 4]]
    caches = PagedKVCache(TARGET, 2, 120, page_size=8), PagedKVCache(DRAFT, 2, 120, page_size=8)
    for params in (GenerationParams(40), GenerationParams(40, SamplingParams(0.9, 1.0, 7))):
        first = generate_draft_speculative(target, draft, *caches, prompts, params, 3)
        again = generate_draft_speculative(target, draft, *caches, prompts, params, 3, steps=first.runner)
        assert again.runner is first.runner and again.tokens == first.tokens     # same seed, same tokens
    other = generate_draft_speculative(target, draft, *caches, prompts, GenerationParams(40), 2, steps=first.runner)
    assert other.runner is not first.runner                                         # another gamma: new runners


def test_draft_equal_to_target_accepts_everything_and_p1_sparse_is_dense():
    target, _ = _pair()
    prompts = [[1, 5, 9, 2, 6, 6, 1]]
    params = GenerationParams(max_new_tokens=24)
    ar = generate_ar(target, PagedKVCache(TARGET, 1, 80), prompts, params).tokens
    dense_map = SparseVerification(tuple(range(TARGET.num_layers)), p=1.0, dense_layers=(0,))
    res = generate_draft_speculative(target, target, PagedKVCache(TARGET, 1, 80), PagedKVCache(TARGET, 1, 80),
                                     prompts, params, 4, dense_map)
    assert res.tokens == ar
    assert res.stats["acceptance_rate"] == 1.0
    assert res.stats["verifier_keys_read_fraction_sparse_layers"] == 1.0
    lossless = generate_draft_speculative(target, target, PagedKVCache(TARGET, 1, 80), PagedKVCache(TARGET, 1, 80),
                                          prompts, params, 4)
    # Every draft accepted: each round's first draft step must have caught up on the last draft's K/V.
    assert lossless.tokens == ar and lossless.stats["acceptance_rate"] == 1.0
    # Each round reads the prompt so far plus the 5-token block, every layer; the draft reads len + 1..4.
    rounds, cache = lossless.stats["rounds"], PagedKVCache(TARGET, 1, 80)
    lens = [len(prompts[0]) + 5 * r for r in range(rounds)]
    assert lossless.stats["kv_bytes_read_verify"] == sum(n + 5 for n in lens) * cache.bytes_per_token
    assert lossless.stats["kv_bytes_read_draft"] == sum(4 * n + 10 for n in lens) * cache.bytes_per_token
    assert res.stats["kv_bytes_read_verify"] == lossless.stats["kv_bytes_read_verify"]   # p = 1 reads everything
    sparse = SparseVerification(tuple(range(TARGET.num_layers)), p=0.5, dense_layers=(0,))
    res = generate_draft_speculative(target, target, PagedKVCache(TARGET, 1, 80), PagedKVCache(TARGET, 1, 80),
                                     prompts, params, 4, sparse)
    assert res.stats["verifier_keys_read_fraction_sparse_layers"] < 0.9


def test_sampling_draft_speculation_runs_and_bad_pairs_are_clear_errors():
    target, draft = _pair()
    res = generate_draft_speculative(target, draft, PagedKVCache(TARGET, 2, 80), PagedKVCache(DRAFT, 2, 80),
                                     [[1, 2, 3], [4, 5]], GenerationParams(16, SamplingParams(0.8, 0.95, 1)), 3)
    assert [len(t) for t in res.tokens] == [16, 16]
    other = random_model(ModelConfig("LlamaForCausalLM", 50, 32, 64, 2, 2, 1, 16, max_positions=512))
    with pytest.raises(InvalidInputError, match="vocabulary"):
        generate_draft_speculative(target, other, PagedKVCache(TARGET, 1, 80), PagedKVCache(other.cfg, 1, 80),
                                   [[1, 2]], GenerationParams(4))
    with pytest.raises(InvalidInputError, match="layer map"):
        generate_draft_speculative(target, draft, PagedKVCache(TARGET, 1, 80), PagedKVCache(DRAFT, 1, 80),
                                   [[1, 2]], GenerationParams(4), 2, SparseVerification((0, 1)))


def test_sparse_perplexity_study_p1_equals_dense_and_budgets_match():
    target, draft = _pair()
    tokens = torch.randint(0, 97, (160,), generator=torch.Generator().manual_seed(2)).tolist()
    lm = align_layers(draft, target, tokens[:80])
    runs = {r.name: r for r in sparse_perplexity_study(target, draft, lm, tokens, [0.8, 1.0], 0.8, (0,), 40)}
    assert runs["specattn-s:p=1.0"].ppl == pytest.approx(runs["dense"].ppl, rel=1e-5)
    frac = runs["specattn-s:p=0.8"].keys_kept_fraction_sparse_layers
    assert frac < 0.95
    for name in ("quest", "streaming"):     # same budget, within page rounding
        assert abs(runs[name].keys_kept_fraction_sparse_layers - frac) < 0.12


def test_sparse_verification_through_the_triton_kernel_matches_the_reference():
    """The verifier's token lists go through the sparse kernel (interpreted here): same tokens as the reference."""
    target, draft = _pair()
    lm = SparseVerification((0, 1, 2, 2), p=0.6, dense_layers=(0,))
    prompts = [[1, 5, 9, 2, 6, 6, 1, 3] * 5, [4, 4, 8, 1] * 6]
    runs = []
    for backend in ("reference", "triton"):
        target.set_attention_backend(backend)
        runs.append(generate_draft_speculative(target, draft, PagedKVCache(TARGET, 2, 100),
                                               PagedKVCache(DRAFT, 2, 100), prompts, GenerationParams(12), 3, lm))
    target.set_attention_backend("reference")
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].stats["verifier_keys_read_fraction_sparse_layers"] < 1.0


def test_page_level_sparse_verification_from_the_drafts_page_mass():
    """Pages chosen from the draft's page mass (the kernel by-product): p = 1 keeps every page (== AR tokens with a
    perfect draft), p < 1 reads fewer keys, and the interpreted kernels agree with the reference."""
    target, draft = _pair()
    prompts = [[1, 5, 9, 2, 6, 6, 1, 3] * 8, [4, 4, 8, 1] * 12]
    params = GenerationParams(12)
    ar = generate_ar(target, PagedKVCache(TARGET, 2, 100), prompts, params).tokens
    full = SparseVerification(tuple(range(TARGET.num_layers)), p=1.0, dense_layers=(0,), page_level=True)
    res = generate_draft_speculative(target, target, PagedKVCache(TARGET, 2, 100), PagedKVCache(TARGET, 2, 100),
                                     prompts, params, 3, full)
    assert res.tokens == ar and res.stats["acceptance_rate"] == 1.0
    lm = SparseVerification((0, 1, 2, 2), p=0.5, dense_layers=(0,), page_level=True)
    runs = []
    for backend in ("reference", "triton"):
        target.set_attention_backend(backend)
        draft.set_attention_backend(backend)
        runs.append(generate_draft_speculative(target, draft, PagedKVCache(TARGET, 2, 100),
                                               PagedKVCache(DRAFT, 2, 100), prompts, params, 3, lm))
    target.set_attention_backend("reference")
    draft.set_attention_backend("reference")
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].stats["verifier_keys_read_fraction_sparse_layers"] < 1.0


def test_page_sets_on_the_device_select_what_the_host_path_selects():
    """The graph-capturable page-level selection (sets ORed per draft step, lists from device lengths) against the
    host-side _verifier_selection on the same recorded page distributions."""
    from specattn.decoding.draft_speculative import (
        _verifier_selection,
        add_topp_pages,
        page_set_selection,
        set_rows_per_target_layer,
    )
    torch.manual_seed(3)
    sparse = SparseVerification((0, 1, 2, 2), p=0.7, dense_layers=(0,), page_level=True)
    layers, batch, pages, gamma, ps = [0, 1, 2], 3, 12, 3, 8
    start_lens = [37, 64, 71]
    recorded = {layer: [] for layer in layers}
    sets = torch.zeros(len(layers), batch, pages, dtype=torch.bool)
    for step in range(gamma):
        probs = torch.rand(len(layers), batch, pages) ** 4
        for b, n in enumerate(start_lens):                    # pages past the step's length hold no mass
            probs[:, b, -(-(n + step + 1) // ps):] = 0
        probs /= probs.sum(-1, keepdim=True)
        add_topp_pages(sets, probs, sparse.p)
        for i, layer in enumerate(layers):
            recorded[layer].append(probs[i][:, None])
    want = _verifier_selection(sparse, recorded, start_lens, gamma, TARGET, ps)
    pick = set_rows_per_target_layer(sparse, layers, 'cpu')
    got = page_set_selection(sets, torch.tensor(start_lens), gamma, sparse, pick, TARGET, ps)
    assert torch.equal(got.counts, want.counts) and got.dense_layers == want.dense_layers and not got.token_level
    for j in range(TARGET.num_layers):
        for b in range(batch):
            n = int(want.counts[j, b, 0])
            assert torch.equal(got.pages[j, b, :, :n], want.pages[j, b, :, :n])
            assert (got.pages[j, b, :, n:] == -1).all()


def test_page_level_runs_reuse_their_round_runners():
    target, draft = _pair()
    prompts = [[1, 5, 9, 2, 6, 6, 1, 3] * 8, [4, 4, 8, 1] * 12]
    lm = SparseVerification((0, 1, 2, 2), p=0.5, dense_layers=(0,), page_level=True)
    caches = PagedKVCache(TARGET, 2, 100), PagedKVCache(DRAFT, 2, 100)
    first = generate_draft_speculative(target, draft, *caches, prompts, GenerationParams(12), 3, lm)
    again = generate_draft_speculative(target, draft, *caches, prompts, GenerationParams(12), 3, lm, first.runner)
    assert again.runner is first.runner and again.tokens == first.tokens
    assert again.stats["verifier_keys_read_fraction_sparse_layers"] == first.stats[
        "verifier_keys_read_fraction_sparse_layers"] < 1.0


@pytest.mark.parametrize("page_level", [False, True], ids=["tokens", "pages"])
def test_keys_chosen_by_one_draft_step(page_level):
    """key_steps first / last: the verifier's keys come from one draft step's attention, a subset of the union
    over all steps (one round, same drafts); p = 1 still equals AR."""
    target, draft = _pair()
    prompts = [[1, 5, 9, 2, 6, 6, 1, 3] * 8, [4, 4, 8, 1] * 12]
    reads = {}
    for steps in ("all", "first", "last"):
        lm = SparseVerification((0, 1, 2, 2), p=0.5, dense_layers=(0,), page_level=page_level, key_steps=steps)
        res = generate_draft_speculative(target, draft, PagedKVCache(TARGET, 2, 100), PagedKVCache(DRAFT, 2, 100),
                                         prompts, GenerationParams(2), 3, lm)
        assert res.stats["rounds"] == 1
        reads[steps] = res.stats["verifier_keys_read_fraction_sparse_layers"]
    assert reads["first"] <= reads["all"] and reads["last"] <= reads["all"]
    assert min(reads["first"], reads["last"]) < reads["all"]
    ar = generate_ar(target, PagedKVCache(TARGET, 2, 100), prompts, GenerationParams(12)).tokens
    full = SparseVerification(tuple(range(TARGET.num_layers)), p=1.0, dense_layers=(0,), page_level=page_level,
                              key_steps="last")
    res = generate_draft_speculative(target, target, PagedKVCache(TARGET, 2, 100), PagedKVCache(TARGET, 2, 100),
                                     prompts, GenerationParams(12), 3, full)
    assert res.tokens == ar
    with pytest.raises(InvalidInputError, match="key steps"):
        SparseVerification((0, 1, 2, 2), key_steps="middle")


@pytest.mark.parametrize("page_level", [False, True], ids=["lossless", "specattn-s-pages"])
def test_a_fixed_batchs_tail_plans_the_draft_and_verify_attention_for_the_sequences_left(page_level, monkeypatch):
    """Draft-model speculation through the interpreted kernels: once one of four sequences is left generating, both
    the draft model's dense steps and the verifier's dense attention plan their splits for it (runner.tail_plan);
    lossless rounds keep AR's tokens, page-level SpecAttn-S rounds the reference's."""
    import copy

    from specattn.kernels import paged_attention
    target, _ = _pair()
    draft = copy.deepcopy(target)             # a near copy: acceptance varies between sequences
    torch.manual_seed(1)
    with torch.no_grad():
        for w in draft.parameters():
            w.add_(0.01 * torch.randn_like(w))
    torch.manual_seed(3)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (40, 23, 31, 36)]
    params = GenerationParams(max_new_tokens=24)
    sparse = SparseVerification((0, 1, 2, 3), p=0.8, dense_layers=(0,), page_level=True) if page_level else None

    def run(backend):
        for m in (target, draft):
            m.set_attention_backend(backend)
        try:
            return generate_draft_speculative(target, draft, PagedKVCache(TARGET, 4, 100),
                                              PagedKVCache(TARGET, 4, 100), prompts, params, 3, sparse)
        finally:
            for m in (target, draft):
                m.set_attention_backend("reference")
    expected = (run("reference") if page_level else
                generate_ar(target, PagedKVCache(TARGET, 4, 100), prompts, params)).tokens
    planned, running = [], ["verifier"]       # (which model, split rows) of every dense attention launch
    plan, draft_forward = paged_attention._plan_launch, draft.forward

    def spy(*a, **kw):
        planned.append((running[0], a[-1] if len(a) > 12 else kw.get("split_rows")))
        return plan(*a, **kw)

    def drafting(*a, **kw):
        running[0] = "draft"
        try:
            return draft_forward(*a, **kw)
        finally:
            running[0] = "verifier"
    lists, verify_forward = [], target.forward       # (idle rows, list lengths) of each sparse verify step

    def verifying(tokens, cache, view, *a, **kw):
        if view.selection is not None:
            lists.append((cache.idle[:4].clone(), view.selection.counts[1:].clone()))
        return verify_forward(tokens, cache, view, *a, **kw)
    monkeypatch.setattr(paged_attention, "_plan_launch", spy)
    monkeypatch.setattr(draft, "forward", drafting)
    monkeypatch.setattr(target, "forward", verifying)
    res = run("triton")
    assert res.tokens == expected
    rounds = sorted(res.stats["rounds_by_sequence"])
    assert rounds[-1] > rounds[-2]                  # the slowest sequence had rounds alone
    assert {("verifier", 1), ("draft", 1), ("verifier", None), ("draft", None)} <= set(planned)
    if page_level:              # idle sequences' sparse layers read one list entry; the others their whole sets
        tail = [(idle, counts) for idle, counts in lists if idle.any()]
        assert tail and all((counts[:, idle] == 1).all() and (counts[:, ~idle] > 1).all() for idle, counts in tail)
