"""`--method auto`: picks the fastest measured candidate, caches the choice per shape, stays lossless."""
import json

import torch

from specattn.api import SpeculationParams
from specattn.auto import generate_auto
from specattn.cache import PagedKVCache
from specattn.config import ModelConfig
from specattn.decoding.ar import GenerationParams, generate_ar

from .conftest import random_model


def test_auto_probes_once_caches_the_fastest_and_matches_ar(tmp_path):
    cfg = ModelConfig("LlamaForCausalLM", 97, 64, 96, 2, 8, 2, 8, max_positions=1024)
    model = random_model(cfg, std=0.3)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (150, 120)]
    params = GenerationParams(max_new_tokens=40)
    ar = generate_ar(model, PagedKVCache(cfg, 2, 200), prompts, params).tokens
    path = tmp_path / "auto.json"
    spec = SpeculationParams(48, 3, (0,))
    first = generate_auto(model, prompts, params, spec, path)
    assert first.tokens == ar and first.stats["auto_probed"]
    speeds = first.stats["auto_probe_decode_tokens_per_s"]
    assert set(speeds) == {"ar", "magicdec", "specattn-y"}
    assert first.stats["auto_choice"] == max(speeds, key=speeds.get)
    second = generate_auto(model, prompts, params, spec, path)
    assert not second.stats["auto_probed"] and second.stats["auto_choice"] == first.stats["auto_choice"]
    assert second.tokens == ar
    assert len(json.loads(path.read_text())) == 1


def test_auto_never_speculates_when_the_budget_covers_the_prompt(tmp_path):
    cfg = ModelConfig("LlamaForCausalLM", 97, 64, 96, 2, 8, 2, 8, max_positions=1024)
    model = random_model(cfg, std=0.3)
    res = generate_auto(model, [[1, 2, 3, 4, 5, 6]], GenerationParams(max_new_tokens=8), SpeculationParams(256, 3),
                        tmp_path / "auto.json")
    assert res.stats["auto_choice"] == "ar" and list(res.stats["auto_probe_decode_tokens_per_s"]) == ["ar"]
