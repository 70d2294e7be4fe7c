"""The Python API, mirroring `specattn generate`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import PagedKVCache
from .decoding.ar import GenerationParams, GenerationResult, generate_ar
from .decoding.sampling import SamplingParams
from .errors import DeviceError, InvalidInputError
from .loader import DEFAULT_MODEL, load_model, load_tokenizer, parse_dtype

METHODS = ("ar",)


def check_request(method: str, max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Reject bad request values before anything is loaded."""
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    GenerationParams(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature, top_p))


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} needs a CUDA GPU and none is visible; use --device cpu")
    return dev


@dataclass
class Session:
    """A loaded model + tokenizer and a KV cache sized for one kind of request."""
    model: object
    tokenizer: object
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
             attention_backend: str = "auto", progress: bool = True) -> Session:
        dev = pick_device(device)
        dt = parse_dtype(dtype or ("bf16" if dev.type == "cuda" else "fp32"))
        if dev.type == "cpu" and dt == torch.float16:
            raise DeviceError("fp16 needs a GPU; use --dtype fp32 or bf16 on the CPU")
        m = load_model(model, str(dev), dt, attention_backend, progress)   # first: it validates the file
        return cls(m, load_tokenizer(model), dev, dt)

    def encode(self, text: str) -> list[int]:
        if not text:
            raise InvalidInputError("the prompt is empty; give some text")
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def make_cache(self, batch: int, max_seq_len: int, track_key_bounds: bool = False) -> PagedKVCache:
        return PagedKVCache(self.model.cfg, batch, max_seq_len, dtype=self.dtype, device=self.device,
                            track_key_bounds=track_key_bounds)

    def generate(self, prompts: list[str] | str, max_new_tokens: int = 64, method: str = "ar",
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop_at_eos: bool = True, use_cuda_graph: bool = True) -> tuple[list[str], GenerationResult]:
        """Continue each prompt. Returns the decoded continuations and the raw result (tokens, stats)."""
        check_request(method, max_new_tokens, temperature, top_p)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [self.encode(p) for p in prompts]
        params = GenerationParams(
            max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature, top_p, seed),
            stop_token_ids=self.model.cfg.eos_token_ids if stop_at_eos else (), use_cuda_graph=use_cuda_graph)
        cache = self.make_cache(len(ids), max(len(i) for i in ids) + max_new_tokens)
        result = generate_ar(self.model, cache, ids, params)
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
        return texts, result
