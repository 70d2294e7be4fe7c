"""Tensor parallelism over torch.distributed (NCCL on GPUs, gloo on CPUs), launched with torchrun.

Each rank owns whole KV heads (and the query heads that read them), so its paged cache, page metadata, score
by-product and selected page lists are local; the MLP is split by intermediate columns. A block then needs two
all-reduces: after the attention output projection and after the MLP down projection. Embeddings, norms and
the output head are replicated, so every rank computes the same logits; tokens that come from random draws are
still taken from rank 0 (`broadcast`) so ranks cannot drift apart.

Weights are sliced at load time by name (`shard_slice`): from safetensors a rank reads only its slices.
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import InvalidInputError


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    world: int
    group: object = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        dist.all_reduce(x, group=self.group)
        return x

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
    return tp.all_reduce(x).div_(tp.world)


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
    return TensorParallel(dist.get_rank(), dist.get_world_size())


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


def local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The shape one rank holds: its share of heads and MLP width, everything else unchanged."""
    check_divisible(cfg, world)
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=cfg.num_kv_heads // world,
                               intermediate_size=cfg.intermediate_size // world)


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
    return None


def take_shard(name: str, tensor: torch.Tensor, cfg: ModelConfig, tp: TensorParallel | None) -> torch.Tensor:
    """Slice an in-memory tensor (GGUF path, or any full tensor) to this rank's share."""
    part = shard_slice(name, cfg, tp) if tp else None
    if part is None:
        return tensor
    dim, start, stop = part
    return tensor.narrow(dim, start, stop - start).contiguous()
