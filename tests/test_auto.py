"""`--method auto`: cost-model switching between speculative rounds and dense steps; lossless whatever it picks."""
import json

import pytest
import torch

from specattn.api import SpeculationParams, make_policy
from specattn.auto import ByteModel, CostModel, generate_auto, geometric_tokens_per_round
from specattn.cache import PagedKVCache
from specattn.config import ModelConfig
from specattn.decoding.ar import GenerationParams, generate_ar
from specattn.decoding.self_speculative import cache_tokens_needed, generate_self_speculative
from specattn.evaluation.bench import _auto_summary

from .conftest import random_model

CFG = ModelConfig("LlamaForCausalLM", 97, 64, 96, 2, 8, 2, 8, max_positions=1024)
BYTES = ByteModel(weight_bytes=1000, kv_bytes_per_token=10, batch=1, budget=64, dense_fraction=0.0, gamma=4)


def known(step_s: float, round_s: float, tokens: float) -> dict:
    return {"round_s_per_byte": round_s / BYTES.round(1000), "tokens_per_round": tokens}


def controller(step_s: float, round_s: float, alpha: float) -> CostModel:
    """A controller that already knows a dense step and a round cost these seconds at context 1000."""
    return CostModel(4, BYTES, ("y",), {"step_s_per_byte": step_s / BYTES.step(1000),
                                        "arms": {"y": known(step_s, round_s, geometric_tokens_per_round(alpha, 4))}})


def test_controller_explores_each_policy_then_dense_steps_when_it_knows_nothing():
    c = CostModel(4, BYTES, ("y", "m"))
    assert c.needs_timing and c.next(500) == (4, "y")
    c.observe((4, "y"), [4], 0.01, captured=True)         # a capture round: acceptance counts, its time does not
    assert c.spec["y"].s_per_byte is None and c.next(500) == (4, "y")
    c.observe((4, "y"), [4], 0.05, captured=False)        # the graphs' first replay also uploads them: not timed
    assert c.spec["y"].s_per_byte is None and c.next(500) == (4, "y")
    c.observe((4, "y"), [4], 0.01, captured=False)
    assert c.spec["y"].s_per_byte == pytest.approx(0.01 / BYTES.round(500)) and c.next(500) == (4, "m")
    for _ in range(2):
        c.observe((4, "m"), [1], 0.01, captured=False)
    assert c.next(500) == 0
    c.observe(0, [], 0.01, captured=False, dense_steps=2)
    assert c.dense.s_per_byte == pytest.approx(0.005 / BYTES.step(500)) and not c.needs_timing
    assert c.next(500) == (4, "y")                        # same round cost as "m", more tokens per round
    assert c.rounds_run == {"y": 3, "m": 2}
    assert set(c.predicted) == {"dense", "y", "m"} and c.predicted["y"] > c.predicted["dense"]


def test_tokens_per_round_is_the_measured_mean_after_a_few_rounds():
    c = CostModel(4, BYTES, ("y",))
    for _ in range(30):
        c.observe((4, "y"), [4, 4, 0], 1.0, captured=False)       # 1 + 8/3 tokens per sequence and round
    assert c.spec["y"].tokens_per_round() == pytest.approx(1 + 8 / 3, rel=0.05)
    assert c.alpha() == pytest.approx(8 / 12)


def test_controller_speculates_when_it_pays_and_stops_when_drafts_get_rejected():
    c = controller(step_s=1.0, round_s=2.0, alpha=0.9)       # 4.1 tokens per round for the time of 2 steps
    assert c.next(1000) == (4, "y")
    for _ in range(10):                                     # every draft rejected: 1 token per round
        c.observe((4, "y"), [0, 0, 0, 0], 2.0, captured=False)
    assert c.alpha() < 0.2 and c.next(1000) == 0
    assert controller(step_s=1.0, round_s=6.0, alpha=0.9).next(1000) == 0      # drafting too slow to pay


def test_controller_switches_as_the_context_grows():
    # KV-heavy shape: a dense step reads the whole context, a draft only its budget. Time ~ bytes, so the same
    # per-byte costs predict dense decoding at a short context and speculation at a long one.
    heavy = ByteModel(weight_bytes=10_000, kv_bytes_per_token=100, batch=8, budget=64, dense_fraction=0.0, gamma=4)
    c = CostModel(4, heavy, ("y",), {"step_s_per_byte": 1e-9,
                                     "arms": {"y": {"round_s_per_byte": 1e-9, "tokens_per_round": 1.9}}})
    assert c.next(16) == 0
    assert c.next(16_000) == (4, "y")
    dense, spec = c.rates(16_000)
    assert spec["y"] > dense


def test_a_fixed_batchs_stragglers_finish_with_dense_steps(monkeypatch):
    """The default model's shape at batch 64, 8K (bytes in kB): with the whole batch generating, rounds pay (drafts
    read a 512-token budget, dense steps the whole context). With one sequence left, the others idle and read only
    their new tokens, a dense step reads the weights and one context while a round still drafts the budget for every
    row: dense steps."""
    import specattn.auto
    monkeypatch.setattr(specattn.auto, "TAIL_AWARE", True)         # off by default: see auto.TAIL_AWARE
    smol = ByteModel(weight_bytes=270_000, kv_bytes_per_token=23, batch=64, budget=512, dense_fraction=1 / 30,
                     gamma=4)
    assert smol.step(8000, active=1) < smol.step(8000) / 20
    assert smol.round(8000, active=1) > smol.round(8000) / 5
    c = CostModel(4, smol, ("y",), {"step_s_per_byte": 1e-9,
                                    "arms": {"y": {"round_s_per_byte": 1e-9, "tokens_per_round": 4.5}}})
    assert c.next(8000, active=64) == (4, "y")
    assert c.next(8000, active=1) == 0
    # times measured while most of the batch idles (fixed costs weigh more per byte) leave what was learned alone
    c.observe(0, [], 1.0, captured=False, dense_steps=4)
    c.observe((4, "y"), [1], 1.0, captured=False)
    c.observe((4, "y"), [1], 1.0, captured=False)
    assert c.dense.s_per_byte == 1e-9 and c.spec["y"].s_per_byte == 1e-9
    assert [d[2] for d in c.decisions] == ["y", "dense"] and c.decisions[1][0] == 1     # the trace of decisions
    monkeypatch.setattr(specattn.auto, "TAIL_AWARE", False)
    assert c.next(8000, active=1) == (4, "y")                    # the default decides for the whole batch


def test_tokens_per_round_follow_the_recent_rounds_and_the_cache_keeps_the_runs_mean(monkeypatch):
    import specattn.auto
    monkeypatch.setattr(specattn.auto, "TOKENS_DECAY", 0.8)        # default 1: the plain mean
    c = CostModel(4, BYTES, ("y",))
    for accepted in [4] * 20 + [0] * 20:             # the sequences left at the end accept nothing
        c.observe((4, "y"), [accepted], 1.0, captured=False)
    assert c.spec["y"].tokens_per_round() < 1.1
    assert c.state()["arms"]["y"]["tokens_per_round"] == pytest.approx((20 * 5 + 20 * 1) / 40)


def test_controller_looks_again_after_long_dense_stretches_near_break_even():
    c = controller(step_s=1.0, round_s=2.4, alpha=0.6)      # 2.3 tokens per round for the time of 2.4 steps
    dense, spec = c.rates(1000)
    assert 0.9 * dense <= spec["y"] < dense
    assert c.next(1000) == 0
    c.observe(0, [], 16.0, captured=False, dense_steps=16)
    assert c.next(1000) == 0
    for _ in range(4):
        c.observe(0, [], 16.0, captured=False, dense_steps=16)
    assert c.next(1000) == (4, "y")


def test_a_controller_that_always_chooses_dense_steps_reproduces_ar(tmp_path):
    class Dense:
        def next(self, context, active=None):
            return 0

        def observe(self, *args, **kwargs):
            pass

    model = random_model(CFG, std=0.3)
    torch.manual_seed(3)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (70, 41, 90)]
    params = GenerationParams(max_new_tokens=37)
    ar = generate_ar(model, PagedKVCache(CFG, 3, 200), prompts, params).tokens
    spec = SpeculationParams(32, 3, (0,))
    policy = make_policy("specattn-y", spec, CFG.num_layers)
    cache = PagedKVCache(CFG, 3, cache_tokens_needed(90, 37, 3) + 16)
    res = generate_self_speculative(model, cache, prompts, params, policy, 3, controller=Dense())
    assert res.tokens == ar
    assert res.stats["rounds"] == 0 and res.stats["dense_steps"] >= 36 and res.stats["ar_steps_s"] > 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_auto_matches_ar_and_caches_what_it_learned(tmp_path, temperature):
    from specattn.decoding.sampling import SamplingParams
    model = random_model(CFG, std=0.3)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (150, 120)]
    params = GenerationParams(max_new_tokens=40, sampling=SamplingParams(temperature, 1.0, 5))
    path = tmp_path / "auto.json"
    spec = SpeculationParams(48, 3, (0,))
    first = generate_auto(model, prompts, params, spec, path)
    assert not first.stats["auto_had_costs"]
    assert first.stats["rounds"] >= 1 and first.stats["dense_steps"] >= 1      # measured both kinds of step
    assert len(first.tokens) == 2 and all(len(t) == 40 for t in first.tokens)
    if temperature == 0.0:
        ar = generate_ar(model, PagedKVCache(CFG, 2, 200), prompts, params).tokens
        assert first.tokens == ar
    saved = json.loads(path.read_text())
    (key, state), = saved.items()
    assert "|b2|ctx<=256|budget48|g3|dense-0|" in key and state["step_s_per_byte"] > 0
    assert set(state["arms"]) == {"specattn-y", "magicdec"}
    assert all(a["round_s_per_byte"] > 0 and 1 <= a["tokens_per_round"] <= 4 for a in state["arms"].values())
    assert 0 <= first.stats["auto_alpha"] <= 1 and set(first.stats["auto_rounds_by_policy"]) == set(state["arms"])
    second = generate_auto(model, prompts, params, spec, path)
    assert second.stats["auto_had_costs"]
    if temperature == 0.0:
        assert second.tokens == first.tokens
    assert second.stats["rounds"] + second.stats["dense_steps"] > 0


def test_bench_summary_compares_auto_with_the_best_fixed_method_per_cell():
    rows = [{"method": "ar", "batch": 1, "context": 512, "decode_tokens_per_s": 100.0},
            {"method": "magicdec", "batch": 1, "context": 512, "decode_tokens_per_s": 90.0},
            {"method": "auto", "batch": 1, "context": 512, "decode_tokens_per_s": 99.0},
            {"method": "ar", "batch": 8, "context": 512, "decode_tokens_per_s": 400.0},
            {"method": "magicdec", "batch": 8, "context": 512, "decode_tokens_per_s": 600.0},
            {"method": "auto", "batch": 8, "context": 512, "decode_tokens_per_s": 570.0},
            {"batch": 64, "context": 512, "skipped": "does not fit"}]
    s = _auto_summary(rows)
    assert s["auto_over_best_fixed_min"] == pytest.approx(0.95)
    assert s["auto_over_ar_min"] == pytest.approx(0.99)


@pytest.mark.parametrize("needs_timing", [True, False])
def test_dense_chunk_timings_reach_the_controller_in_order_even_when_the_gpu_lags(monkeypatch, needs_timing):
    """On the GPU a dense chunk's events complete after the host moved on; simulate that with a timer that never
    reports completion: a controller that needs the timing gets it before its next decision, any other gets
    every observation by the end of the run."""
    from specattn.decoding import self_speculative

    monkeypatch.setattr(self_speculative.PhaseTimer, "complete", lambda self, end_mark: False)
    calls = []

    class Spy:
        def __init__(self):
            self.needs_timing = needs_timing

        def next(self, context, active=None):
            calls.append("next")
            return [3, 0][sum(c == "next" for c in calls) % 2]

        def observe(self, gamma, accepted, seconds, captured, dense_steps=0):
            calls.append(f"observe{gamma}")

    model = random_model(CFG, std=0.3)
    torch.manual_seed(4)
    prompts = [torch.randint(0, 97, (60,)).tolist()]
    params = GenerationParams(max_new_tokens=70)
    spec = SpeculationParams(32, 3, (0,))
    cache = PagedKVCache(CFG, 1, cache_tokens_needed(60, 70, 3))
    res = generate_self_speculative(model, cache, prompts, params, make_policy("specattn-y", spec, CFG.num_layers),
                                    3, controller=Spy())
    decisions = calls.count("next")
    assert calls.count("observe0") + calls.count("observe3") == decisions
    if needs_timing:
        assert all(a == "next" and b.startswith("observe") for a, b in zip(calls[::2], calls[1::2], strict=True))
    else:
        assert calls[-1].startswith("observe") and calls[1] == "next"      # observed late, all at the end
    assert res.tokens == generate_ar(model, PagedKVCache(CFG, 1, 200), prompts, params).tokens


def test_auto_decodes_densely_when_the_budget_covers_a_prompt(tmp_path):
    model = random_model(CFG, std=0.3)
    prompts, params = [[1, 2, 3, 4, 5, 6]], GenerationParams(max_new_tokens=8)
    res = generate_auto(model, prompts, params, SpeculationParams(256, 3), tmp_path / "auto.json")
    assert res.stats["method"] == "auto" and res.stats["auto_speculative_rounds"] == 0
    assert res.tokens == generate_ar(model, PagedKVCache(CFG, 1, 64), prompts, params).tokens


def test_a_later_run_with_equal_but_new_policies_reuses_the_round_steps():
    """auto builds its policies afresh each call: the graphs captured by an earlier run must still serve (a new
    capture per run cost 4x the draft time of a fixed method on the GPU), and only for equal settings."""
    model = random_model(CFG, std=0.3)
    prompts = [torch.randint(0, 97, (120,)).tolist()]
    params = GenerationParams(max_new_tokens=12)
    cache = PagedKVCache(CFG, 1, cache_tokens_needed(120, 12, 3))
    policy = lambda budget: make_policy("specattn-y", SpeculationParams(budget, 3, (0,)), CFG.num_layers)  # noqa: E731
    first = generate_self_speculative(model, cache, prompts, params, policy(48), 3)
    (key, steps), = first.runner.items()
    again = policy(48)
    second = generate_self_speculative(model, cache, prompts, params, again, 3, first.runner)
    assert second.runner[key] is steps and steps.policy is again and second.tokens == first.tokens
    third = generate_self_speculative(model, cache, prompts, params, policy(32), 3, first.runner)
    assert third.runner[key] is not steps
    assert policy(48).settings() == again.settings() != policy(32).settings()


@pytest.mark.parametrize("rounds_first", [3, 8])
def test_dense_chunks_after_rounds_stay_within_a_tight_cache(rounds_first):
    """Rounds let some sequences get ahead; a dense chunk steps every sequence, so the ones ahead reach the end of
    a cache sized for the request (auto sizes it like AR's) and finish while the slowest still decodes. No later
    chunk or round may grow them past the cache, and the tokens stay AR's."""
    class RoundsDenseRounds:
        calls = 0

        def next(self, context, active=None):
            self.calls += 1
            return 0 if self.calls == rounds_first + 1 else 4      # rounds, one dense chunk, rounds again

        def observe(self, *args):
            pass

    model = random_model(CFG, std=0.1)
    torch.manual_seed(2)
    # Repetitive prompts accept nearly every draft, random ones few: the first get ahead of the others.
    prompts = [torch.randint(0, 97, (96,)).tolist() for _ in range(3)] + [[5, 9, 7] * 32] * 3
    params = GenerationParams(max_new_tokens=70)
    ar = generate_ar(model, PagedKVCache(CFG, 6, 200), prompts, params).tokens
    policy = make_policy("magicdec", SpeculationParams(16, 4, (0,)), CFG.num_layers)
    cache = PagedKVCache(CFG, 6, cache_tokens_needed(96, 70, 4), page_size=8)
    res = generate_self_speculative(model, cache, prompts, params, policy, 4, controller=RoundsDenseRounds())
    assert res.tokens == ar and res.stats["rounds"] > rounds_first and res.stats["dense_steps"] > 0
