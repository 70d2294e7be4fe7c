"""Tensor parallelism over torch.distributed (NCCL on GPUs, gloo on CPUs), launched with torchrun.

Each rank owns whole KV heads (and the query heads that read them), so its paged cache, page metadata, score
by-product and selected page lists are local; the MLP is split by intermediate columns. A block then needs two
all-reduces: after the attention output projection and after the MLP down projection. Embeddings, norms and
the final norm are replicated. An untied output head whose vocabulary divides by the ranks is split by rows
(`ModelConfig.vocab_shards`): each rank reads its slice of the head and the logit slices are gathered, so every
rank holds the same logits; tokens that come from random draws are still taken from rank 0 (`broadcast`) so ranks
cannot drift apart.

On GPUs a decode step's all-reduces are small (batch x hidden) and latency-bound: with SPECATTN_TP_ALL_REDUCE=one-shot
`OneShotAllReduce` does each in one kernel over symmetric memory (every rank reads its peers' partial sums over
NVLink) instead of NCCL's protocol; larger ones, the default and CPU (gloo) runs go through `torch.distributed`.

Weights are sliced at load time by name (`shard_slice`): from safetensors a rank reads only its slices.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import zlib
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import InvalidInputError

# "one-shot": small all-reduces over symmetric memory where it sets up (else NCCL). Not the default: on 2 H200s
# (benchmarks/results/tp.json) its kernel took 7.1 µs a call in the 8B step, yet whole steps were no faster than
# with NCCL's (3.86 vs 3.94 ms at b1 8K, 4.57 vs 4.41 at b1 32K, 6.20 vs 6.02 at b16 8K).
ALL_REDUCE_MODES = ("nccl", "one-shot")


class OneShotAllReduce:
    """Sums a small tensor over the ranks in one kernel (torch's symm_mem one_shot_all_reduce_copy): each rank
    copies its partial sum into its own slot of a symmetric buffer that its peers can address, all meet at a
    barrier held in device memory, then each reads every slot over NVLink and sums. No host work per call, so it
    captures into CUDA graphs like any kernel. One buffer serves every call: the kernel's closing barrier keeps a
    rank from overwriting its slot while a peer still reads it."""

    DTYPES = (torch.bfloat16, torch.float32)     # what the op is built for

    def __init__(self, group_name: str, device: torch.device, max_bytes: int = 2 << 20):
        import torch.distributed._symmetric_memory as symm_mem
        self.group_name, self.max_bytes = group_name, max_bytes
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, group_name)

    def fits(self, x: torch.Tensor) -> bool:
        return (x.dtype in self.DTYPES and x.is_contiguous() and x.numel() * x.element_size() <= self.max_bytes
                and (x.numel() * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.buffer.view(x.dtype)[: x.numel()].view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy(slot, x, "sum", self.group_name)


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    world: int
    group: object = None
    one_shot: OneShotAllReduce | None = None   # small all-reduces on GPUs (None: all go through NCCL / gloo)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (in place, or a new tensor from the one-shot path: use the returned one)."""
        if self.one_shot is not None and self.one_shot.fits(x):
            return self.one_shot(x)
        import torch.distributed as dist
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x joined along the last dimension, in rank order (the vocabulary-split logits)."""
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's values on every rank (in place)."""
        import torch.distributed as dist
        dist.broadcast(x, 0, group=self.group)
        return x


def mean_over_ranks(tp: TensorParallel | None, x: torch.Tensor) -> torch.Tensor:
    """x averaged over the ranks, in place: a quantity averaged over this rank's heads becomes the average over
    all heads (every rank owns as many), as selection shared by all heads (Vegas, SpecAttn-S) needs. No-op for
    one process."""
    if tp is None:
        return x
    mean = tp.all_reduce(x).div_(tp.world)
    if mean is not x:
        x.copy_(mean)
    return x


def init_tensor_parallel() -> TensorParallel | None:
    """From torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist
    if not dist.is_available():
        raise InvalidInputError("this torch build has no torch.distributed; tensor parallelism needs it")
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available()
        if use_nccl and not dist.is_nccl_available():
            raise InvalidInputError("CUDA is visible but NCCL is not available in this torch build")
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_nccl else "gloo")
    one_shot = None
    if dist.get_backend() == "nccl":
        one_shot = one_shot_all_reduce(os.environ.get("SPECATTN_TP_ALL_REDUCE", "nccl"))
    return TensorParallel(dist.get_rank(), dist.get_world_size(), one_shot=one_shot)


def one_shot_all_reduce(mode: str, device: torch.device | None = None) -> OneShotAllReduce | None:
    """The symmetric-memory all-reduce for the default group, or None for NCCL only: when `mode` asks for
    it ("nccl") or when this machine cannot map its peers' memory (every rank must come to the same answer, so
    a failure on any rank means NCCL on all). device: this rank's GPU (default: the current one)."""
    import torch.distributed as dist
    if mode not in ALL_REDUCE_MODES:
        raise InvalidInputError(f"SPECATTN_TP_ALL_REDUCE={mode!r} is not one of {', '.join(ALL_REDUCE_MODES)}")
    if mode == "nccl":
        return None
    device = device or torch.device("cuda", torch.cuda.current_device())
    one_shot, error = None, ""
    try:
        one_shot = OneShotAllReduce(dist.group.WORLD.group_name, device)
    except Exception as e:  # noqa: BLE001 - any failure to set up means: use NCCL
        error = _one_line(e)
    if _all_ranks(one_shot is not None, device):
        # One sum before trusting it (an unsupported world size shows here, not inside a captured graph); only
        # once every rank has a buffer, since the kernel waits for all of them.
        world = dist.get_world_size()
        try:
            total = one_shot(torch.full((8,), float(dist.get_rank() + 1), device=device))
            if not bool((total == world * (world + 1) / 2).all()):
                error = "a test sum came out wrong"
        except Exception as e:  # noqa: BLE001
            error = _one_line(e)
        if _all_ranks(not error, device):
            return one_shot
    if error:
        print(f"specattn: symmetric-memory all-reduce unavailable ({error}); using NCCL", file=sys.stderr)
    return None


def _all_ranks(ok: bool, device: torch.device) -> bool:
    """Whether `ok` holds on every rank (each rank learns the same answer)."""
    import torch.distributed as dist
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def finish_tensor_parallel(wait: bool = True) -> bool:
    """After a command: wait for the other ranks (unless this one failed alone, when they may never come), then
    close the process group. Returns whether there was one to close."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if wait:
        dist.barrier()
    dist.destroy_process_group()
    return True


def check_ranks_agree(tp: TensorParallel | None, what: str, value) -> None:
    """Every rank must serve the same request on the same model: one rank with another checkpoint or argument
    would deadlock in a collective or mix results. Compares a digest of `value` over the ranks; every rank raises
    the same one-line error on a mismatch."""
    if tp is None:
        return
    import torch.distributed as dist
    digest = zlib.crc32(repr(value).encode())
    device = "cuda" if dist.get_backend(tp.group) == "nccl" else "cpu"
    extremes = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=tp.group)     # [max digest, -min digest]
    if extremes[0].item() != digest or -extremes[1].item() != digest:
        raise InvalidInputError(f"tensor-parallel ranks disagree on {what}; start every rank with the same model "
                                "and arguments")


def check_divisible(cfg: ModelConfig, world: int) -> None:
    for what, n in (("query heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                    ("MLP width", cfg.intermediate_size)):
        if n % world:
            raise InvalidInputError(f"the model's {n} {what} do not divide by {world} ranks; use a tensor-parallel "
                                    "size that divides the KV heads")


def vocab_shards(cfg: ModelConfig, world: int) -> int:
    """Over how many ranks the output head is split: all of them for an untied head whose vocabulary divides
    by `world` (a tied head is the embedding, which every rank needs whole); otherwise 1 (replicated)."""
    return world if not cfg.tie_embeddings and cfg.vocab_size % world == 0 else 1


def local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The shape one rank holds: its share of heads, MLP width and (see vocab_shards) output head."""
    check_divisible(cfg, world)
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=cfg.num_kv_heads // world,
                               intermediate_size=cfg.intermediate_size // world,
                               vocab_shards=vocab_shards(cfg, world))


def shard_slice(name: str, cfg: ModelConfig, tp: TensorParallel) -> tuple[int, int, int] | None:
    """(dim, start, stop) of an HF-named tensor that rank `tp.rank` holds, or None for a replicated tensor."""
    r, w = tp.rank, tp.world
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim // w, cfg.num_kv_heads * cfg.head_dim // w
    mlp = cfg.intermediate_size // w
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return 0, r * q_rows, (r + 1) * q_rows
    if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias",
                      "self_attn.v_proj.weight", "self_attn.v_proj.bias")):
        return 0, r * kv_rows, (r + 1) * kv_rows
    if name.endswith("self_attn.o_proj.weight"):
        return 1, r * q_rows, (r + 1) * q_rows
    if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
        return 0, r * mlp, (r + 1) * mlp
    if name.endswith("mlp.down_proj.weight"):
        return 1, r * mlp, (r + 1) * mlp
    if name == "lm_head.weight" and vocab_shards(cfg, w) > 1:
        rows = cfg.vocab_size // w
        return 0, r * rows, (r + 1) * rows
    return None


def take_shard(name: str, tensor: torch.Tensor, cfg: ModelConfig, tp: TensorParallel | None) -> torch.Tensor:
    """Slice an in-memory tensor (GGUF path, or any full tensor) to this rank's share."""
    part = shard_slice(name, cfg, tp) if tp else None
    if part is None:
        return tensor
    dim, start, stop = part
    return tensor.narrow(dim, start, stop - start).contiguous()
