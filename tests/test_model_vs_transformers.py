"""Our runtime against transformers' implementation on small random configs (fp32)."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from specattn.cache import PagedKVCache
from specattn.decoding.ar import GenerationParams, generate_ar
from specattn.loader import load_model

from .conftest import logits_through_cache

SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)
CONFIGS = {
    "llama-gqa": (LlamaForCausalLM, LlamaConfig(**SMALL, num_attention_heads=8, num_key_value_heads=2,
                                                 rope_theta=500.0)),
    "llama3-rope-scaling-tied": (LlamaForCausalLM, LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "llama-linear-rope-mha": (LlamaForCausalLM, LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=4,
                                                             rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2-bias-untied": (Qwen2ForCausalLM, Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=2,
                                                        tie_word_embeddings=False)),
    "mistral": (MistralForCausalLM, MistralConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2,
                                                  sliding_window=None)),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    cls, cfg = CONFIGS[request.param]
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    with torch.no_grad():  # larger weights than HF's init so logits are far from uniform
        for p in hf.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp(request.param)
    # A small shard size forces a sharded checkpoint with an index file.
    hf.save_pretrained(folder, max_shard_size="100KB" if request.param == "llama-gqa" else "10GB")
    return hf, load_model(str(folder), progress=False)


def test_sharded_checkpoint_was_written(pair):
    hf, ours = pair
    sharded = (ours.cfg.num_heads, ours.cfg.num_kv_heads) == (8, 2)    # only llama-gqa is saved in shards
    assert (ours.source.path / "model.safetensors.index.json").is_file() == sharded


def test_prefill_logits_match(pair):
    hf, ours = pair
    ids = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
    out = logits_through_cache(ours, ids)
    assert (out - ref).abs().max().item() < 1e-4


def step_by_step_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """A 7-token prefill chunk, then one token at a time, through a cache of 4-token pages (many page crossings)."""
    cache = PagedKVCache(model.cfg, 1, 64, page_size=4)
    cache.reset(1)
    cache.reserve(7)
    rows = [model(ids[:, :7], cache, cache.step_view(7), all_logits=True)[0]]
    cache.advance(7)
    for t in range(7, ids.shape[1]):
        cache.reserve(1)
        rows.append(model(ids[:, t:t + 1], cache, cache.step_view(1), all_logits=True)[0])
        cache.advance(1)
    return torch.cat(rows)


def test_step_by_step_decode_through_paged_cache_matches(pair):
    hf, ours = pair
    ids = torch.randint(0, 101, (1, 30))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    assert (step_by_step_logits(ours, ids) - ref).abs().max().item() < 1e-4


def test_folded_norms_keep_the_logits(pair):
    """fold_norms (done on the GPU before steps are compiled) moves the norm weights into the q/k/v and gate/up
    projections; the blocks then run forward_folded. Same logits as transformers, prefill and step by step, and
    the exported folded weights are a checkpoint transformers runs to the same logits."""
    from specattn.loader import hf_state_dict
    hf, ours = pair
    folded = copy.deepcopy(ours)
    folded.fold_norms()
    assert folded.norms_folded and all(torch.equal(b.mlp_norm.weight, torch.ones_like(b.mlp_norm.weight))
                                       for b in folded.blocks)
    assert not torch.allclose(folded.blocks[0].qkv.weight, ours.blocks[0].qkv.weight)
    ids = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (logits_through_cache(folded, ids) - ref).abs().max().item() < 1e-4
    assert (step_by_step_logits(folded, ids[:1, :30]) - ref[0, :30]).abs().max().item() < 1e-4
    refolded = copy.deepcopy(hf)
    refolded.load_state_dict(hf_state_dict(folded), strict=False)
    with torch.no_grad():
        assert (refolded(ids).logits - ref).abs().max().item() < 1e-4


def test_gemv_projections_keep_the_logits(pair):
    """Folded blocks with every projection of a small step through kernels.gemv (the q/k/v product rotating and
    writing the cache itself, the gate/up product applying SwiGLU, the o and down products added into the residual
    stream in place) give transformers' logits step by step; prefill rows stay on F.linear (GEMV_MAX_ROWS)."""
    hf, ours = pair
    folded = copy.deepcopy(ours)
    folded.fold_norms()
    for block in folded.blocks:
        block.gemv_projections = ("qkv", "rope", "o", "gate_up", "swiglu", "down")
    ids = torch.randint(0, 101, (1, 24))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    assert (step_by_step_logits(folded, ids) - ref).abs().max().item() < 1e-4


def test_tensor_core_products_keep_the_logits(pair, monkeypatch):
    """The same kernels on blocks of rows above gemv.MAX_ROWS (tensor-core tiles; 2 x 37 prefill rows, so more than
    one block) give transformers' logits: what raising model.GEMV_MAX_ROWS would run."""
    import specattn.model
    hf, ours = pair
    folded = copy.deepcopy(ours)
    folded.fold_norms()
    for block in folded.blocks:
        block.gemv_projections = ("qkv", "rope", "o", "gate_up", "swiglu", "down")
    monkeypatch.setattr(specattn.model, "GEMV_MAX_ROWS", 1024)
    ids = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (logits_through_cache(folded, ids) - ref).abs().max().item() < 1e-4


def test_greedy_generation_identical(pair):
    hf, ours = pair
    prompt = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32, pad_token_id=0)
    cache = PagedKVCache(ours.cfg, 1, 64)
    got = generate_ar(ours, cache, prompt.tolist(), GenerationParams(max_new_tokens=32)).tokens[0]
    assert got == ref[0, 9:].tolist()


def test_hf_state_dict_gives_transformers_our_exact_weights(pair):
    """Our weights exported with HF names (q/k/v, gate/up split again) reproduce the HF model's state exactly."""
    from specattn.loader import hf_state_dict
    hf, ours = pair
    exported = hf_state_dict(ours)
    reference = hf.state_dict()
    for name, tensor in reference.items():
        if "rotary" in name:
            continue
        assert torch.equal(exported[name], tensor), name
