"""Micro-batches (each its own cache and stream): outputs equal the plain loops'."""
import pytest
import torch

from specattn.cache import PagedKVCache
from specattn.config import ModelConfig
from specattn.decoding.ar import GenerationParams, generate_ar
from specattn.decoding.micro_batches import (
    generate_ar_micro_batches,
    generate_self_speculative_micro_batches,
    micro_batch_caches,
    micro_batch_rows,
)
from specattn.decoding.sampling import SamplingParams
from specattn.decoding.self_speculative import generate_self_speculative
from specattn.errors import InvalidInputError
from specattn.selection import QuestPolicy, StreamingPolicy, VegasPolicy, VerificationGuidedPolicy

from .conftest import random_model

POLICIES = {
    "streaming": lambda: StreamingPolicy(48),
    "verification-guided": lambda: VerificationGuidedPolicy(64),
    "quest": lambda: QuestPolicy(48),
    "vegas": lambda: VegasPolicy(0.05, 32),
}


@pytest.fixture(scope="module")
def model_and_prompts():
    cfg = ModelConfig("LlamaForCausalLM", 97, 64, 96, 2, 8, 2, 8, max_positions=1024)
    model = random_model(cfg, std=0.3)
    torch.manual_seed(2)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (150, 90, 201, 120, 77)]
    ar = generate_ar(model, PagedKVCache(cfg, 5, 400), prompts, GenerationParams(max_new_tokens=48)).tokens
    return model, prompts, ar


def test_rows_split_consecutively_with_sizes_within_one():
    assert micro_batch_rows(5, 2) == [slice(0, 3), slice(3, 5)]
    assert micro_batch_rows(4, 4) == [slice(i, i + 1) for i in range(4)]
    with pytest.raises(InvalidInputError, match="at least as many prompts"):
        micro_batch_rows(2, 3)
    with pytest.raises(InvalidInputError, match="at least 1"):
        micro_batch_rows(2, 0)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_ar_in_micro_batches_equals_ar(model_and_prompts, parts):
    model, prompts, ar = model_and_prompts
    caches = micro_batch_caches(model, prompts, parts, 400)
    res = generate_ar_micro_batches(model, caches, prompts, GenerationParams(max_new_tokens=48))
    assert res.tokens == ar
    assert res.stats["micro_batches"] == parts and len(res.runner) == parts
    again = generate_ar_micro_batches(model, caches, prompts, GenerationParams(max_new_tokens=48), res.runner)
    assert again.tokens == ar


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_self_speculation_in_two_micro_batches_equals_ar(model_and_prompts, name):
    model, prompts, ar = model_and_prompts
    policy = POLICIES[name]()
    caches = micro_batch_caches(model, prompts, 2, 400, track_key_bounds=policy.needs_key_bounds)
    res = generate_self_speculative_micro_batches(model, caches, prompts, GenerationParams(max_new_tokens=48),
                                                  policy, gamma=4)
    assert res.tokens == ar
    assert res.stats["micro_batches"] == 2 and 1 < res.stats["mean_accepted_len"] <= 5


def test_streaming_in_micro_batches_accepts_what_the_whole_batch_does(model_and_prompts):
    """Streaming lists depend on each sequence alone, so the rounds are the plain loop's. (Ranked policies give
    every sequence of a batch as many pages as its most-forced sequence needs, so their lists can differ by a page
    once the batch is split.)"""
    model, prompts, _ = model_and_prompts
    params = GenerationParams(max_new_tokens=48)
    res = generate_self_speculative_micro_batches(model, micro_batch_caches(model, prompts, 2, 400), prompts,
                                                  params, StreamingPolicy(48), gamma=4)
    plain = generate_self_speculative(model, PagedKVCache(model.cfg, 5, 400), prompts, params, StreamingPolicy(48),
                                      gamma=4)
    assert res.stats["rounds_by_sequence"] == plain.stats["rounds_by_sequence"]
    assert res.stats["mean_accepted_len"] == pytest.approx(plain.stats["mean_accepted_len"], abs=1e-12)
    # a micro-batch whose sequences all have their tokens stops; in one batch they keep stepping, idle
    assert res.stats["kv_bytes_read_draft"] < plain.stats["kv_bytes_read_draft"]


def test_sampling_in_micro_batches_is_reproducible_and_gets_every_token(model_and_prompts):
    model, prompts, _ = model_and_prompts
    params = GenerationParams(max_new_tokens=32, sampling=SamplingParams(0.8, 0.95, seed=3))
    runs = [generate_self_speculative_micro_batches(model, micro_batch_caches(model, prompts, 2, 400), prompts,
                                                    params, VerificationGuidedPolicy(64)).tokens for _ in range(2)]
    assert runs[0] == runs[1]
    assert [len(t) for t in runs[0]] == [32] * len(prompts)


def test_micro_batch_errors(model_and_prompts):
    model, prompts, _ = model_and_prompts
    with pytest.raises(InvalidInputError, match="gamma"):
        generate_self_speculative_micro_batches(model, micro_batch_caches(model, prompts, 2, 400), prompts,
                                                GenerationParams(max_new_tokens=8), StreamingPolicy(48), gamma=0)
    with pytest.raises(InvalidInputError, match="at least one KV cache"):
        generate_ar_micro_batches(model, [], prompts, GenerationParams(max_new_tokens=8))


def test_selfspec_benchmark_micro_batch_suffix(model_and_prompts, monkeypatch):
    """benchmarks/selfspec.py's "+mb2": AR and a speculative method in two micro-batches, AR's tokens, the steady
    figure of AR in micro-batches its own tokens/s, and the summary's AR the faster of the two."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import selfspec
    model, _, _ = model_and_prompts
    monkeypatch.setattr(selfspec, "DEVICE", "cpu")
    torch.manual_seed(4)
    text = torch.randint(0, 97, (700,)).tolist()
    rows = []
    selfspec.real_model_rows(model, text, [(3, 260)], [64], 4, 24, SamplingParams(),
                             ["ar+mb2", "magicdec+mb2", "specattn-y/blk64+mb2"], rows.append)
    assert [(r["method"], r["budget"]) for r in rows] == [("ar", None), ("ar+mb2", None), ("magicdec+mb2", 64),
                                                          ("specattn-y/blk64+mb2", 64)]
    assert all(r["same_tokens_as_ar"] for r in rows)
    steady = selfspec.derive_steady(rows[1])
    assert steady["decode_tokens_per_s_steady"] == steady["decode_tokens_per_s"]
    summary = selfspec.summarize(rows)
    ar = max(r["decode_tokens_per_s"] for r in rows[:2])
    y = rows[3]["decode_tokens_per_s"]
    assert summary["specattn_y_over_ar"] == round(y / ar, 3)
