"""specattn: speculative decoding with sparse attention for long-context LLM inference."""
from .api import Session
from .cache import PagedKVCache
from .config import ModelConfig
from .decoding.ar import GenerationParams, GenerationResult, generate_ar
from .decoding.sampling import SamplingParams
from .errors import SpecAttnError
from .loader import load_model, load_tokenizer

__all__ = ["Session", "PagedKVCache", "ModelConfig", "GenerationParams", "GenerationResult", "generate_ar",
           "SamplingParams", "SpecAttnError", "load_model", "load_tokenizer"]
__version__ = "0.1.0"
