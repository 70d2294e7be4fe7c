"""Tensor parallelism on CPU: 2 processes over gloo give the single-process logits and tokens."""
import dataclasses
import os
import socket
import sys

import pytest
import torch

from specattn.cache import PagedKVCache
from specattn.config import ModelConfig
from specattn.decoding.ar import GenerationParams, generate_ar
from specattn.decoding.draft_speculative import SparseVerification, generate_draft_speculative
from specattn.decoding.sampling import SamplingParams
from specattn.decoding.self_speculative import generate_self_speculative
from specattn.distributed import TensorParallel, check_divisible, local_config, shard_slice
from specattn.errors import InvalidInputError
from specattn.loader import load_model
from specattn.selection import QuestPolicy, StreamingPolicy, VegasPolicy, VerificationGuidedPolicy

from .conftest import logits_through_cache

PROMPTS = [[5, 9, 14, 3, 3, 8, 21, 40, 2, 11] * 4, [7, 1, 60, 12, 9] * 5]


def run_everything(model, draft) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(0, 101, (2, 33))
    cache = lambda m=model: PagedKVCache(m.cfg, 2, 100, page_size=8)  # noqa: E731
    greedy, sampled = GenerationParams(24), GenerationParams(24, SamplingParams(1.0, seed=3))
    vegas = generate_self_speculative(model, cache(), PROMPTS, greedy, VegasPolicy(0.1, min_tokens=8), 3)

    def with_draft(params, sparse=None):
        res = generate_draft_speculative(model, draft, cache(), cache(draft), PROMPTS, params, 3, sparse)
        return res.tokens, res.stats["mean_accepted_len"], res.stats.get("verifier_keys_read_fraction_sparse_layers")

    return {
        "logits": logits_through_cache(model, ids),
        "ar": generate_ar(model, cache(), PROMPTS, greedy).tokens,
        "sampled": generate_ar(model, cache(), PROMPTS, sampled).tokens,
        "spec": generate_self_speculative(model, cache(), PROMPTS, greedy,
                                          VerificationGuidedPolicy(16, dense_layers=(0,)), 3).tokens,
        "vegas": (vegas.tokens, vegas.stats["mean_accepted_len"]),
        "magicdec": generate_self_speculative(model, cache(), PROMPTS, greedy, StreamingPolicy(16, sink_tokens=8),
                                              3).tokens,
        "quest": generate_self_speculative(model, PagedKVCache(model.cfg, 2, 100, page_size=8, track_key_bounds=True),
                                           PROMPTS, greedy, QuestPolicy(16), 3).tokens,
        "draft_greedy": with_draft(greedy),
        "draft_sampled": with_draft(sampled),
        # SpecAttn-S: key sets from the draft's attention averaged over all its heads, so every rank's verifier
        # layers get the sets one process would (page level: the kernel's page mass; token level: recorded probs)
        "specattn_s_pages": with_draft(greedy, SparseVerification((0, 1), p=0.3, dense_layers=(0,), page_level=True)),
        "specattn_s_tokens": with_draft(greedy, SparseVerification((1, 1), p=0.6, dense_layers=(0,))),
        "kv_heads": model.cfg.num_kv_heads,
        "head_rows": model.lm_head.weight.shape[0],
    }


def run_folded(model) -> dict:
    """The same model with its norms folded and every small-step projection through kernels.gemv (what
    compile_steps makes of it on the GPU, tensor-parallel models included (model.TP_FOLDED)): under tensor
    parallelism the output and down products' partial sums are all-reduced before joining the residual stream."""
    import specattn.model
    model.fold_norms()
    for block in model.blocks:
        block.gemv_projections = ("qkv", "rope", "o", "gate_up", "swiglu", "down")
    torch.manual_seed(0)
    ids = torch.randint(0, 101, (2, 33))
    greedy = GenerationParams(24)
    assert specattn.model.TP_FOLDED
    return {"logits": logits_through_cache(model, ids),
            "ar": generate_ar(model, PagedKVCache(model.cfg, 2, 100, page_size=8), PROMPTS, greedy).tokens,
            "spec": generate_self_speculative(model, PagedKVCache(model.cfg, 2, 100, page_size=8), PROMPTS,
                                              greedy, VerificationGuidedPolicy(16, dense_layers=(0,)), 3).tokens}


def _spawn_two(worker, *args) -> None:
    """worker(rank, world, port, *args) in 2 processes that join one gloo group on a free local port."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, *args), nprocs=2, join=True)


def _join(rank: int, world: int, port: int):
    """Inside a spawned worker: torchrun's environment for this rank, then the process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from specattn.distributed import init_tensor_parallel
    return init_tensor_parallel()


def _leave() -> None:
    """End a spawned worker once its result is on disk. Both ranks meet first, then the process exits without
    interpreter teardown: gloo's worker threads can abort the process while torch is being finalised (seen once
    in CI as SIGABRT, 'terminate called without an active exception'), which would fail a test whose ranks
    already agreed."""
    import torch.distributed as dist
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, world: int, port: int, folders: tuple[str, str], out: str) -> None:
    torch.set_num_threads(1)
    tp = _join(rank, world, port)
    models = [load_model(f, progress=False, tp=tp) for f in folders]
    result = run_everything(*models)
    result["folded"] = run_folded(models[0])
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    _leave()


def _save_random_llama(folder, hidden: int, heads: int, seed: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=102, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=256))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _save_random_llama(tmp_path_factory.mktemp("tp"), 64, 4, 0)


@pytest.fixture(scope="module")
def draft_checkpoint(tmp_path_factory):
    """A smaller model of the same vocabulary and head size drafts for `checkpoint` (SpecAttn-S, draft-spec)."""
    return _save_random_llama(tmp_path_factory.mktemp("tp_draft"), 32, 2, 1)


def test_two_gloo_ranks_match_one_process(checkpoint, draft_checkpoint, tmp_path):
    folders = (checkpoint, draft_checkpoint)
    _spawn_two(_worker, folders, str(tmp_path))
    models = [load_model(f, progress=False) for f in folders]
    single = run_everything(*models)
    single["folded"] = run_folded(models[0])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in ranks:
        assert res["kv_heads"] == 1                                   # each rank owns one of the two KV heads
        assert res["head_rows"] == 51                                 # and half the output head's 102 rows
        assert (res["logits"] - single["logits"]).abs().max().item() < 1e-4
        assert res["ar"] == single["ar"] == res["spec"] == res["magicdec"] == res["quest"]
        for method in ("vegas", "draft_greedy", "specattn_s_pages", "specattn_s_tokens"):
            assert res[method] == single[method], method              # same tokens, acceptance and keys read
        folded = res["folded"]                                        # folded blocks, gemv, partial sums reduced
        assert (folded["logits"] - single["folded"]["logits"]).abs().max().item() < 1e-4
        assert (folded["logits"] - single["logits"]).abs().max().item() < 1e-4
        assert folded["ar"] == folded["spec"] == single["ar"]
    for method in ("sampled", "draft_sampled"):
        assert ranks[0][method] == ranks[1][method], method          # ranks stay in lockstep when sampling
    assert single["spec"] == single["ar"] == single["vegas"][0] == single["draft_greedy"][0]
    assert single["specattn_s_pages"][2] < 1 and single["specattn_s_tokens"][2] < 1   # the sets did prune


def test_heads_that_do_not_divide_are_a_clear_error():
    cfg = ModelConfig("LlamaForCausalLM", 101, 64, 96, 2, 4, 2, 16)
    with pytest.raises(InvalidInputError, match="do not divide by 3"):
        check_divisible(cfg, 3)


def test_shard_slices_cover_each_weight_once():
    cfg = ModelConfig("LlamaForCausalLM", 101, 64, 96, 2, 8, 4, 8)
    for name, size, dim in [("model.layers.0.self_attn.q_proj.weight", 64, 0),
                            ("model.layers.0.self_attn.k_proj.weight", 32, 0),
                            ("model.layers.0.self_attn.o_proj.weight", 64, 1),
                            ("model.layers.0.mlp.up_proj.weight", 96, 0),
                            ("model.layers.0.mlp.down_proj.weight", 96, 1)]:
        parts = [shard_slice(name, cfg, TensorParallel(r, 4)) for r in range(4)]
        assert all(p[0] == dim for p in parts)
        covered = sorted(i for _, a, b in parts for i in range(a, b))
        assert covered == list(range(size)), name
    assert shard_slice("model.norm.weight", cfg, TensorParallel(1, 4)) is None


def test_output_head_is_split_only_when_untied_and_divisible():
    cfg = ModelConfig("LlamaForCausalLM", 100, 64, 96, 2, 8, 4, 8)
    parts = [shard_slice("lm_head.weight", cfg, TensorParallel(r, 4)) for r in range(4)]
    assert parts == [(0, 0, 25), (0, 25, 50), (0, 50, 75), (0, 75, 100)]
    assert local_config(cfg, 4).vocab_shards == 4
    for other in (dataclasses.replace(cfg, vocab_size=101), dataclasses.replace(cfg, tie_embeddings=True)):
        assert shard_slice("lm_head.weight", other, TensorParallel(1, 4)) is None
        assert local_config(other, 4).vocab_shards == 1


def _agree_worker(rank: int, world: int, port: int, out: str) -> None:

    from specattn.distributed import check_ranks_agree
    tp = _join(rank, world, port)
    outcome = []
    check_ranks_agree(tp, "the budget", 512)                          # the same everywhere: passes
    try:
        check_ranks_agree(tp, "the budget", 512 if rank == 0 else 256)
        outcome.append("passed")
    except InvalidInputError as e:
        outcome.append(str(e))
    with open(os.path.join(out, f"agree{rank}.txt"), "w") as f:
        f.write(outcome[0])
    _leave()


def test_ranks_that_disagree_all_get_the_same_clear_error(tmp_path):
    _spawn_two(_agree_worker, str(tmp_path))
    messages = [(tmp_path / f"agree{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1] and "ranks disagree on the budget" in messages[0]


def _decide_worker(rank: int, world: int, port: int, out: str) -> None:

    from specattn.auto import RankZeroDecides

    class Opinionated:                 # each rank's own cost model would choose differently
        gamma, needs_timing = 4, False

        def next(self, context, active=None):
            return [0, (4, "magicdec"), (4, "specattn-y")][(rank + int(context)) % 3]

    tp = _join(rank, world, port)
    decider = RankZeroDecides(Opinionated(), tp, ("specattn-y", "magicdec"), torch.device("cpu"))
    with open(os.path.join(out, f"decide{rank}.txt"), "w") as f:
        f.write(repr([decider.next(c) for c in range(6)]))
    _leave()


def test_auto_under_tensor_parallelism_runs_rank_zeros_choices_on_every_rank(tmp_path):
    _spawn_two(_decide_worker, str(tmp_path))
    choices = [(tmp_path / f"decide{r}.txt").read_text() for r in range(2)]
    assert choices[0] == choices[1] == repr([0, (4, "magicdec"), (4, "specattn-y")] * 2)


def test_unknown_all_reduce_mode_is_a_clear_error():
    from specattn.distributed import one_shot_all_reduce
    with pytest.raises(InvalidInputError, match="SPECATTN_TP_ALL_REDUCE='fast' is not one of nccl, one-shot"):
        one_shot_all_reduce("fast")
    assert one_shot_all_reduce("nccl") is None


def _one_shot_worker(rank: int, world: int, port: int, out: str, trouble: str) -> None:
    """Sets up the one-shot all-reduce with a stand-in for the symmetric-memory kernel (gloo underneath), which
    fails in the way `trouble` names on rank 1 only."""
    import specattn.distributed as d
    tp = _join(rank, world, port)

    class StandIn:
        def __init__(self, group_name, device):
            if trouble == "setup" and rank == 1:
                raise RuntimeError("cannot map the peer's memory\nmore detail")

        def __call__(self, x):
            import torch.distributed as dist
            total = x.clone()
            dist.all_reduce(total, group=tp.group)
            return total + 1 if trouble == "wrong-sum" and rank == 1 else total

    d.OneShotAllReduce = StandIn
    chosen = d.one_shot_all_reduce("one-shot", torch.device("cpu"))
    with open(os.path.join(out, f"one_shot{rank}.txt"), "w") as f:
        f.write(type(chosen).__name__)
    _leave()


@pytest.mark.parametrize("trouble", ["none", "setup", "wrong-sum"])
def test_one_shot_all_reduce_is_used_only_when_every_rank_has_it_working(trouble, tmp_path):
    _spawn_two(_one_shot_worker, str(tmp_path), trouble)
    chosen = [(tmp_path / f"one_shot{r}.txt").read_text() for r in range(2)]
    assert chosen == (["StandIn"] * 2 if trouble == "none" else ["NoneType"] * 2)
