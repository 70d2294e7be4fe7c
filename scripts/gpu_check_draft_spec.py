"""GPU check of the graph-captured draft-model loops on small random models (no checkpoint needed): lossless
greedy output equals AR's token for token (fp32), a second run reuses the first run's graphs, sampling runs;
page-level SpecAttn-S with p = 1 equals AR with the target as its own draft, and with p = 0.9 reads fewer keys.
Usage on the GPU machine: PYTHONPATH=. python3 scripts/gpu_check_draft_spec.py"""
import time

import torch

from specattn.cache import PagedKVCache
from specattn.config import ModelConfig
from specattn.decoding.ar import GenerationParams, generate_ar
from specattn.decoding.draft_speculative import SparseVerification, generate_draft_speculative
from specattn.decoding.sampling import SamplingParams
from specattn.model import Transformer


def random_model(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = Transformer(cfg, "auto", "cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.1)
    return model.eval()


target = random_model(ModelConfig("LlamaForCausalLM", 1000, 256, 512, 4, 8, 2, 32, max_positions=2048), 0)
draft = random_model(ModelConfig("LlamaForCausalLM", 1000, 128, 256, 2, 4, 1, 32, max_positions=2048), 1)
torch.manual_seed(2)
prompts = [torch.randint(0, 1000, (n,)).tolist() for n in (300, 257)]
params = GenerationParams(max_new_tokens=48)
ar = generate_ar(target, PagedKVCache(target.cfg, 2, 400, device="cuda"), prompts, params).tokens
caches = PagedKVCache(target.cfg, 2, 400, device="cuda"), PagedKVCache(draft.cfg, 2, 400, device="cuda")
t0 = time.perf_counter()
first = generate_draft_speculative(target, draft, *caches, prompts, params, 4)
t1 = time.perf_counter()
again = generate_draft_speculative(target, draft, *caches, prompts, params, 4, steps=first.runner)
t2 = time.perf_counter()
sampled = generate_draft_speculative(target, draft, *caches, prompts, GenerationParams(48, SamplingParams(0.8)), 4)
print({"greedy_equals_ar": first.tokens == ar, "second_run_equals_ar": again.tokens == ar,
       "graphs_reused": again.runner is first.runner, "draft_graphs": first.runner.draft.graph_count(),
       "first_run_s": round(t1 - t0, 2), "second_run_s": round(t2 - t1, 3),
       "mean_accepted_len": round(again.stats["mean_accepted_len"], 2),
       "sampled_lengths": [len(t) for t in sampled.tokens]})

same = PagedKVCache(target.cfg, 2, 400, device="cuda"), PagedKVCache(target.cfg, 2, 400, device="cuda")
layers = tuple(range(target.cfg.num_layers))
dense = generate_draft_speculative(target, target, *same, prompts, params, 4,
                                   SparseVerification(layers, 1.0, (0,), page_level=True))
pruned = generate_draft_speculative(target, draft, *caches, prompts, params, 4,
                                    SparseVerification((0, 1, 1, 1), 0.9, (0,), page_level=True))
print({"specattn_s_p1_equals_ar": dense.tokens == ar, "p1_acceptance": dense.stats["acceptance_rate"],
       "p09_keys_read": round(pruned.stats["verifier_keys_read_fraction_sparse_layers"], 3),
       "p09_rounds_s": round(pruned.stats["draft_s"] + pruned.stats["verify_s"], 4),
       "p09_rounds": pruned.stats["rounds"]})
