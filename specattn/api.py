"""The Python API, mirroring `specattn generate`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .cache import DEFAULT_PAGE_SIZE, PagedKVCache
from .decoding.ar import GenerationParams, GenerationResult, generate_ar
from .decoding.sampling import SamplingParams
from .errors import DeviceError, InvalidInputError
from .loader import DEFAULT_MODEL, load_model, load_tokenizer, parse_dtype

# method -> the self-speculative selection policy it drafts with (None: plain AR decoding).
METHODS = {
    "ar": None,
    "specattn-y": "verification-guided",   # SpecAttn-Y, ours: pages ranked by the verification's page mass
    "vegas": "vegas",                      # SpecAttn-Y v2 (Vegas) recipe: token level, two rows, head-shared
    "magicdec": "streaming",               # MagicDec: StreamingLLM drafting (sinks + recent window)
    "quest": "quest",                      # Quest-style drafting: per-step page bounds from key min/max
    "selfspec-full": "full",               # control: drafting with the full cache, acceptance 100% (greedy)
}

# Page sizes the attention kernels tile (a tile holds whole pages). 64: SpecAttn-Y's exact page mass is then as cheap
# as the 64-key block mass (paged_attention.BLOCK_PATH_MIN_PAGE), at a coarser selection.
PAGE_SIZES = (16, 32, 64)


@dataclass(frozen=True)
class SpeculationParams:
    budget: float = 256          # KV budget of a draft step: tokens, or a fraction of the context if < 1
    gamma: int = 4               # draft tokens per verification
    dense_layers: tuple[int, ...] = ()    # layers drafting with the full cache (none: sparse layer 0 kept acceptance)
    mass_tokens: int | None = None         # specattn-y: verification mass per page (None) or per block of keys
    adaptive_gamma: bool = False           # gamma is then the most drafts per round, fewer when they get rejected
    mass_every: int = 1                    # specattn-y: a verification's mass every k-th round (the rest skip it)
    page_size: int = DEFAULT_PAGE_SIZE     # KV cache page (tokens): what page lists select and page mass sums

    def __post_init__(self):
        if not self.budget > 0:
            raise InvalidInputError(f"KV budget {self.budget} must be > 0 (tokens, or a fraction below 1)")
        if self.gamma <= 0:
            raise InvalidInputError(f"gamma (draft tokens per verification) must be > 0, got {self.gamma}")
        if self.mass_every < 1:
            raise InvalidInputError(f"mass every {self.mass_every} rounds: must be at least 1")
        if self.page_size not in PAGE_SIZES:
            raise InvalidInputError(f"page size {self.page_size} is not supported; choose one of "
                                    f"{', '.join(map(str, PAGE_SIZES))} tokens")


def make_policy(method: str, spec: SpeculationParams, num_layers: int):
    from .selection import POLICIES
    kind = METHODS[method]
    if kind == "full":
        return POLICIES["full"]()
    if any(not 0 <= layer < num_layers for layer in spec.dense_layers):
        raise InvalidInputError(f"dense layers {spec.dense_layers} must be within 0..{num_layers - 1}")
    if kind == "vegas":   # --budget below 1: Vegas's ratio (floor 256 tokens); otherwise the floor, ratio 0.05
        ratio, floor = (spec.budget, 256) if spec.budget < 1 else (0.05, int(spec.budget))
        return POLICIES["vegas"](ratio, floor, dense_layers=spec.dense_layers)
    if kind == "verification-guided":
        return POLICIES[kind](spec.budget, dense_layers=spec.dense_layers, mass_tokens=spec.mass_tokens,
                              mass_every=spec.mass_every)
    return POLICIES[kind](spec.budget, dense_layers=spec.dense_layers)


def method_variant(name: str) -> tuple[str, dict]:
    """'specattn-y/blk64/r2' -> ('specattn-y', {'mass_tokens': 64, 'mass_every': 2}): SpecAttn-Y's variants as
    `specattn bench` and the benchmarks name them (/blk<N>: verification mass per block of N keys; /r<K>: the mass
    of every K-th round). A name without suffixes -> (name, {})."""
    base, *suffixes = name.split("/")
    overrides = {}
    for suffix in suffixes:
        key = "mass_tokens" if suffix.startswith("blk") else "mass_every" if suffix.startswith("r") else None
        digits = suffix.removeprefix("blk") if key == "mass_tokens" else suffix[1:]
        if key is None or not digits.isdigit() or key in overrides or base != "specattn-y":
            raise InvalidInputError(f"cannot read method {name!r}: only specattn-y takes suffixes, /blk<N> "
                                    "(mass per N-key block) and /r<K> (mass every K-th round), e.g. specattn-y/blk64")
        overrides[key] = int(digits)
    return base, overrides


DRAFT_METHODS = ("draft-spec", "specattn-s")   # need a draft model: lossless, and SpecAttn-S's sparse verification


def check_request(method: str, max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Reject bad request values before anything is loaded."""
    if method_variant(method)[0] not in METHODS and method != "auto" and method not in DRAFT_METHODS:
        raise InvalidInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}, auto, "
                                f"{', '.join(DRAFT_METHODS)}")
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
        from .distributed import init_tensor_parallel
        tp = init_tensor_parallel()          # under torchrun: this rank's share of every layer
        m = load_model(model, str(dev), dt, attention_backend, progress and (tp is None or tp.rank == 0), tp)
        return cls(m, load_tokenizer(model), dev, dt)

    def encode(self, text: str) -> list[int]:
        if not text:
            raise InvalidInputError("the prompt is empty; give some text")
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def make_cache(self, batch: int, max_seq_len: int, track_key_bounds: bool = False,
                   page_size: int = DEFAULT_PAGE_SIZE) -> PagedKVCache:
        return PagedKVCache(self.model.cfg, batch, max_seq_len, dtype=self.dtype, device=self.device,
                            track_key_bounds=track_key_bounds, page_size=page_size)

    def generate(self, prompts: list[str] | str, max_new_tokens: int = 64, method: str = "ar",
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop_at_eos: bool = True, use_cuda_graph: bool = True,
                 spec: SpeculationParams | None = None, draft: Session | None = None,
                 sparse=None) -> tuple[list[str], GenerationResult]:
        """Continue each prompt. Returns the decoded continuations and the raw result (tokens, stats).
        `method`: one of METHODS; self-speculative methods take `spec` (budget, gamma, dense layers)."""
        check_request(method, max_new_tokens, temperature, top_p)
        method, overrides = method_variant(method)          # specattn-y/blk64 -> specattn-y, mass_tokens 64
        spec = dataclasses.replace(spec or SpeculationParams(), **overrides)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [self.encode(p) for p in prompts]
        params = GenerationParams(
            max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature, top_p, seed),
            stop_token_ids=self.model.cfg.eos_token_ids if stop_at_eos else (), use_cuda_graph=use_cuda_graph)
        from .decoding.runner import capture_seconds
        from .distributed import check_ranks_agree
        check_ranks_agree(self.model.tp, "the request (prompts, method, sampling, speculation settings)",
                          (ids, method, params, spec))
        captured_before = capture_seconds()
        if method in DRAFT_METHODS:
            result = self._generate_with_draft(method, ids, params, spec, draft, sparse)
        elif method == "auto":
            from .auto import generate_auto
            result = generate_auto(self.model, ids, params, spec)
        elif METHODS[method] is None:
            cache = self.make_cache(len(ids), max(len(i) for i in ids) + max_new_tokens, page_size=spec.page_size)
            result = generate_ar(self.model, cache, ids, params)
        else:
            from .decoding.self_speculative import cache_tokens_needed, generate_self_speculative
            policy = make_policy(method, spec, self.model.cfg.num_layers)
            cache = self.make_cache(len(ids), cache_tokens_needed(max(len(i) for i in ids), max_new_tokens, spec.gamma),
                                    track_key_bounds=policy.needs_key_bounds, page_size=spec.page_size)
            result = generate_self_speculative(self.model, cache, ids, params, policy, spec.gamma,
                                               adaptive_gamma=spec.adaptive_gamma)
        result.stats["graph_capture_s"] = capture_seconds() - captured_before     # in total_s, once per shape
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
        return texts, result

    def _generate_with_draft(self, method: str, ids: list[list[int]], params: GenerationParams,
                             spec: SpeculationParams, draft: Session | None, sparse) -> GenerationResult:
        """draft-spec: lossless draft-model speculation; specattn-s: the same with `sparse` (a
        SparseVerification) pruning the verifier's KV reads."""
        from .decoding.draft_speculative import generate_draft_speculative
        from .decoding.self_speculative import cache_tokens_needed
        from .loader import check_same_tokenizer
        if draft is None:
            raise InvalidInputError(f"--method {method} needs a draft model (--draft)")
        if method == "specattn-s" and sparse is None:
            raise InvalidInputError("specattn-s needs its layer map and p (a SparseVerification)")
        check_same_tokenizer(draft.tokenizer, self.tokenizer, "draft", "verifier")
        need = cache_tokens_needed(max(len(i) for i in ids), params.max_new_tokens, spec.gamma)
        caches = (self.make_cache(len(ids), need, page_size=spec.page_size),
                  draft.make_cache(len(ids), need, page_size=spec.page_size))
        return generate_draft_speculative(self.model, draft.model, *caches, ids, params, spec.gamma,
                                          sparse if method == "specattn-s" else None)
