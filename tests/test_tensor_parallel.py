"""Tensor parallelism on CPU: 2 processes over gloo give the single-process logits and tokens."""
import os
import socket
import sys

import pytest
import torch

from specattn.cache import PagedKVCache
from specattn.config import ModelConfig
from specattn.decoding.ar import GenerationParams, generate_ar
from specattn.decoding.sampling import SamplingParams
from specattn.decoding.self_speculative import generate_self_speculative
from specattn.distributed import TensorParallel, check_divisible, shard_slice
from specattn.errors import InvalidInputError
from specattn.loader import load_model
from specattn.selection import VerificationGuidedPolicy

from .conftest import logits_through_cache

PROMPTS = [[5, 9, 14, 3, 3, 8, 21, 40, 2, 11] * 4, [7, 1, 60, 12, 9] * 5]


def run_everything(model) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(0, 101, (2, 33))
    cache = lambda: PagedKVCache(model.cfg, 2, 100, page_size=8)  # noqa: E731
    return {
        "logits": logits_through_cache(model, ids),
        "ar": generate_ar(model, cache(), PROMPTS, GenerationParams(24)).tokens,
        "sampled": generate_ar(model, cache(), PROMPTS, GenerationParams(24, SamplingParams(1.0, seed=3))).tokens,
        "spec": generate_self_speculative(model, cache(), PROMPTS, GenerationParams(24),
                                          VerificationGuidedPolicy(16, dense_layers=(0,)), 3).tokens,
        "kv_heads": model.cfg.num_kv_heads,
    }


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


def _worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    torch.set_num_threads(1)
    tp = _join(rank, world, port)
    result = run_everything(load_model(folder, progress=False, tp=tp))
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    _leave()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("tp")
    hf.save_pretrained(folder)
    return str(folder)


def test_two_gloo_ranks_match_one_process(checkpoint, tmp_path):
    _spawn_two(_worker, checkpoint, str(tmp_path))
    single = run_everything(load_model(checkpoint, progress=False))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in ranks:
        assert res["kv_heads"] == 1                                   # each rank owns one of the two KV heads
        assert (res["logits"] - single["logits"]).abs().max().item() < 1e-4
        assert res["ar"] == single["ar"] and res["spec"] == single["spec"]
    assert ranks[0]["sampled"] == ranks[1]["sampled"]                # ranks stay in lockstep when sampling
    assert single["spec"] == single["ar"]


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

        def next(self, context):
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
