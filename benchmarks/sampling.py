"""Top-p for sampling on the GPU: the sort of the vocabulary (the way `decoding.sampling.probabilities` worked
until 2026-11-29) against the sorting-free threshold kernel it uses now (`kernels.topp`), over the row shapes a
sampled run meets: a draft or AR step (batch rows) and a verification (batch x (gamma + 1) rows), at the default
model's vocabulary (49,152) and Llama 3's (128,256). Device times from CUDA graphs.

Usage: python benchmarks/sampling.py [out.json]   (writes results/sampling.json by default)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment, graph_ms  # noqa: E402
from specattn.decoding.sampling import nucleus  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402
from specattn.kernels import topp  # noqa: E402

TOP_P, TEMPERATURE = 0.95, 0.6
SHAPES = [(1, 49152), (32, 49152), (64, 49152), (160, 49152), (320, 49152), (1, 128256), (8, 128256),
          (40, 128256)]


def sorted_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The sort-based top-p this replaces (same set up to ties at the edge)."""
    ordered, order = probs.sort(dim=-1, descending=True)
    ordered = ordered * ((ordered.cumsum(-1) - ordered) < top_p)
    out = torch.zeros_like(probs).scatter_(-1, order, ordered)
    return out / out.sum(-1, keepdim=True)


def main() -> None:
    rows = []
    for batch, vocab in SHAPES:
        logits = torch.randn(batch, vocab, device="cuda") * 3
        probs = torch.softmax(logits / TEMPERATURE, -1)
        row = {"rows": batch, "vocab": vocab, "sort_us": 1e3 * graph_ms(lambda: sorted_nucleus(probs, TOP_P)),
               "threshold_us": 1e3 * graph_ms(lambda: nucleus(probs, TOP_P))}
        for warps in (4, 8, 16):
            row[f"threshold_kernel_us_{warps}_warps"] = 1e3 * graph_ms(
                lambda warps=warps: topp._thresholds(probs, False, TOP_P, 0, num_warps=warps))
        a, b = sorted_nucleus(probs, TOP_P), nucleus(probs, TOP_P)
        row["kept_differs"] = int(((a > 0) != (b > 0)).sum())
        row["max_abs_diff"] = (a - b).abs().max().item()
        row["speedup"] = row["sort_us"] / row["threshold_us"]
        rows.append(row)
        print(f"{batch:4d} x {vocab:6d}  sort {row['sort_us']:8.1f} us  threshold {row['threshold_us']:7.1f} us  "
              f"x{row['speedup']:5.2f}  kernel by warps " + " ".join(
                  f"{w}:{row[f'threshold_kernel_us_{w}_warps']:.1f}" for w in (4, 8, 16))
              + f"  kept differs {row['kept_differs']}", flush=True)
    out = {**environment(), "config": {"top_p": TOP_P, "temperature": TEMPERATURE}, "rows": rows}
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    write_json_atomic(paths[0] if paths else RESULTS / "sampling.json", out)


if __name__ == "__main__":
    main()
