"""Whether cuBLAS adds a product into the residual stream in place (addmm_, beta 1) as fast as it computes the
plain product (F.linear), at the projections of the default model's draft/verify steps and the 8B batch-1 step:
the premise of folded norms (model.Transformer.fold_norms), which drop the separate residual-add kernels.
Device times from CUDA graphs. Usage: python benchmarks/addmm_inplace.py [out.json] (default results/addmm_inplace.json)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment, graph_ms  # noqa: E402
from specattn.evaluation.results import write_json_atomic  # noqa: E402

# name: (rows, in features, out features)
SHAPES = {"smol_o_b64": (64, 576, 576), "smol_down_b64": (64, 1536, 576), "smol_o_b32": (32, 576, 576),
          "smol_down_b32": (32, 1536, 576), "smol_o_verify_b64": (320, 576, 576), "8b_o_b1": (1, 4096, 4096),
          "8b_down_b1": (1, 14336, 4096), "8b_down_b8": (8, 14336, 4096)}


def main() -> None:
    rows = []
    for name, (m, k, n) in SHAPES.items():
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).t().contiguous().t()   # column-major, as stored
        x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        row = {"shape": name, "rows": m, "in": k, "out": n,
               "linear_us": 1e3 * graph_ms(lambda: F.linear(a, w)),
               "linear_then_add_us": 1e3 * graph_ms(lambda: x + F.linear(a, w)),
               "addmm_inplace_us": 1e3 * graph_ms(lambda: x.addmm_(a, w.t()))}
        rows.append(row)
        print(f"{name:18s} linear {row['linear_us']:6.2f}  linear + add {row['linear_then_add_us']:6.2f}  "
              f"addmm_ {row['addmm_inplace_us']:6.2f} µs", flush=True)
    paths = [p for p in sys.argv[1:] if not p.startswith("--")]
    write_json_atomic(paths[0] if paths else RESULTS / "addmm_inplace.json", {**environment(), "rows": rows})


if __name__ == "__main__":
    main()
