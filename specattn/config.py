"""Model configuration, read from a Hugging Face `config.json` or GGUF metadata."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError, UnsupportedModelError

# HF architecture name -> whether q/k/v projections carry a bias.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}
# GGUF `general.architecture` -> HF architecture name.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # "linear" or "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    max_positions: int = 2048
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Tensor parallel: the output head's rows are split over this many ranks (distributed.local_config); each
    # rank computes its slice of the logits and they are gathered. 1 = every rank holds the whole head.
    vocab_shards: int = 1

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"{self.num_heads} query heads do not divide into {self.num_kv_heads} KV heads; "
                "check num_key_value_heads in the model config")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, per byte of element size."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, d: dict) -> ModelConfig:
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or d.get('model_type')!r}; "
                f"specattn runs {', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(d),
            rope_scaling=_rope_scaling(d),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_positions=d.get("max_position_embeddings", 2048),
            qkv_bias=SUPPORTED_ARCHITECTURES[arch] or bool(d.get("attention_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read model config {path}: {e}; pass a folder with a valid config.json") from e
        return cls.from_hf_dict(d)


def _rope_theta(d: dict) -> float:
    params = d.get("rope_parameters") or {}
    return float(d.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(d: dict) -> RopeScaling | None:
    # transformers 5 writes "rope_parameters"; older configs write "rope_scaling".
    s = d.get("rope_scaling") or d.get("rope_parameters")
    if not s:
        return None
    kind = s.get("rope_type") or s.get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(s["factor"]))
    if kind == "llama3":
        return RopeScaling("llama3", float(s["factor"]), float(s.get("low_freq_factor", 1.0)),
                           float(s.get("high_freq_factor", 4.0)),
                           int(s.get("original_max_position_embeddings", 8192)))
    raise UnsupportedModelError(f"unsupported rope scaling {kind!r}; specattn supports linear and llama3")


def rope_inv_freq(cfg: ModelConfig) -> list[float]:
    """Inverse frequencies of rotary embeddings, with the config's scaling applied."""
    dim = cfg.head_dim
    inv = [1.0 / (cfg.rope_theta ** (i / dim)) for i in range(0, dim, 2)]
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return [f / s.factor for f in inv]
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    low_wavelen = s.original_max_positions / s.low_freq_factor
    high_wavelen = s.original_max_positions / s.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_positions / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out
