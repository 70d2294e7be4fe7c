"""Shared pieces of the GPU benchmarks: environment record, copy bandwidth, random models, timing."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from specattn.cache import PagedKVCache
from specattn.config import ModelConfig
from specattn.evaluation.results import environment  # noqa: F401  (re-exported for the benchmarks)
from specattn.model import Transformer

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
# ../shared does not travel to the GPU machine: scripts/stage_default_model.sh copies the books to .data/.
GUTENBERG = next((p for p in (REPO / ".data" / "gutenberg", REPO.parent / "shared" / "data" / "gutenberg")
                  if p.is_dir()), REPO.parent / "shared" / "data" / "gutenberg")

LLAMA3_8B = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                        rope_theta=500000.0, max_positions=131072)

# The default real model's shape (SmolLM2-135M), for per-step costs with random weights (no model to carry).
SMOLLM2_135M = ModelConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                           rope_theta=100000.0, tie_embeddings=True, max_positions=8192)

# The real SpecAttn-S pair's shapes (Qwen2.5-Coder 0.5B drafting for 1.5B), for per-step costs without carrying it.
QWEN25_05B = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, tie_embeddings=True, qkv_bias=True, max_positions=32768)
QWEN25_15B = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, tie_embeddings=True, qkv_bias=True, max_positions=32768)
SHAPES = {"8b": LLAMA3_8B, "smol": SMOLLM2_135M, "qwen0.5b": QWEN25_05B, "qwen1.5b": QWEN25_15B}


def median_ms(fn, warmup: int = 5, reps: int = 30) -> float:
    """Median wall time of fn() in ms, timed with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_ms(fn, calls: int = 20, reps: int = 10) -> float:
    """Device time of one fn() call in ms: `calls` calls captured in one CUDA graph, median over replays.
    Events around single eager calls would time host launch overhead for kernels of a few microseconds."""
    fn()                                            # compile / autotune outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms(graph.replay, warmup=2, reps=reps) / calls


def replay_us(fn, calls: int = 20) -> float:
    """Device time of one call in us: fn(i) for i < calls captured in one CUDA graph (fn(i) can rotate buffers
    by i so that each call reads from HBM), median of 7 replays."""
    fn(0)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return sorted(times)[3]


def cuda_kernel_totals(prof) -> dict[str, list]:
    """torch.profiler result -> {kernel name: [calls, device us]} over everything profiled."""
    per_kernel = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[ev.name][0] += 1
            per_kernel[ev.name][1] += ev.device_time
    return per_kernel


def profile_kernels(fn, calls: int) -> dict[str, list]:
    """cuda_kernel_totals of `calls` calls of fn under torch.profiler (divide by `calls` for one call's share)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return cuda_kernel_totals(prof)


def first_difference(a: list[int], b: list[int]) -> int:
    """The first position where two token lists differ; the shorter length if one is a prefix of the other."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def parse_dense_layers(text: str) -> tuple[int, ...]:
    """--dense-layers: '0' or '0,1' -> the layers drafting with the full cache; 'none' -> ()."""
    return () if text == "none" else tuple(int(x) for x in text.split(","))


def gemv_projections(spec: str) -> tuple[str, ...]:
    """'qkv+rope+o+down' -> model.GEMV_PROJECTIONS for it; 'none' -> () (every product on cuBLAS)."""
    return () if spec == "none" else tuple(spec.split("+"))


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    return 2 * nbytes / ms / 1e6


def random_model(cfg: ModelConfig, dtype=torch.bfloat16, device: str = "cuda") -> Transformer:
    """A model of `cfg`'s shape with random weights (std 0.02), for per-step costs only (device cpu: smoke tests)."""
    with torch.device(device):
        model = Transformer(cfg, "auto", device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    return model.eval()


def context_cache(cfg: ModelConfig, batch: int, context: int, new_tokens: int = 1, dtype=torch.bfloat16,
                  spare: int = 16) -> PagedKVCache:
    """A GPU cache whose `batch` sequences hold `context` tokens of random K/V ("already written": random K/V cost
    the same to read), with pages reserved for `new_tokens` more; `spare` tokens of capacity past the context."""
    cache = PagedKVCache(cfg, batch, context + spare, dtype=dtype, device="cuda")
    cache.k.normal_()
    cache.v.normal_()
    cache.reset(batch)
    cache.reserve(context)
    cache.advance(context)
    cache.reserve(new_tokens)
    return cache


def weight_bytes_per_step(model: Transformer, batch: int) -> int:
    """Bytes of weights one decode step reads: every matrix once, only `batch` rows of an untied embedding."""
    seen, total = set(), 0
    for _name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    if not model.cfg.tie_embeddings:
        e = model.embed.weight
        total -= e.numel() * e.element_size() - batch * e.shape[1] * e.element_size()
    return total


def gutenberg_tokens(tokenizer, book: str = "pg2554.txt", max_chars: int = 600_000) -> list[int]:
    text = (GUTENBERG / book).read_text(encoding="utf-8")[:max_chars]
    return tokenizer(text, add_special_tokens=False)["input_ids"]
