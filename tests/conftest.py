import os
from pathlib import Path

import torch

# Without a GPU, Triton kernels run in Triton's interpreter. `@triton.jit` reads this when a kernel
# module is imported, so it is set here, before any test imports specattn.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from specattn.config import ModelConfig  # noqa: E402
from specattn.model import Transformer  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
GUTENBERG = SHARED / "data" / "gutenberg"


def random_model(cfg: ModelConfig, seed: int = 0, std: float = 0.3) -> Transformer:
    """A small model with random weights, large enough (std) that logits are far from uniform."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, std)
    return model


def logits_through_cache(model: Transformer, ids: torch.Tensor, page_size: int = 16) -> torch.Tensor:
    """ids: [batch, n] -> logits [batch, n, vocab] from one prefill forward through a fresh paged cache."""
    from specattn.cache import PagedKVCache
    cache = PagedKVCache(model.cfg, ids.shape[0], ids.shape[1], page_size=page_size)
    cache.reset(ids.shape[0])
    cache.reserve(ids.shape[1])
    return model(ids, cache, cache.step_view(ids.shape[1]), all_logits=True)


@pytest.fixture
def tiny_cfg():
    return ModelConfig("LlamaForCausalLM", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                       num_heads=8, num_kv_heads=2, head_dim=8, max_positions=512)


@pytest.fixture(scope="session")
def default_model():
    from specattn.loader import load_model, load_tokenizer
    return load_model("smollm2-135m", progress=False), load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def prose():
    """A paragraph of English prose from a public-domain book (Crime and Punishment, pg2554)."""
    path = GUTENBERG / "pg2554.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found (../shared/data is beside the checkout in CI)")
    return path.read_text(encoding="utf-8")[20000:26000]

