#!/usr/bin/env bash
# On nvidia-h200-x2: the tensor-parallel benchmark, TP=2 (8B- and 70B-shaped) then the one-GPU 8B baseline,
# merged into $OUT/tp.json. NVLink multicast stays off (the device docs say why).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export SPECATTN_TP_ALL_REDUCE=${SPECATTN_TP_ALL_REDUCE:-one-shot}   # times it beside NCCL (the default) in tp.py
export PYTHONPATH=$PWD:${PYTHONPATH:-}
[ -z "${SPECATTN_COMMIT:-}" ] && [ -f .commit ] && export SPECATTN_COMMIT=$(cat .commit)
nvidia-smi topo -m 2>&1 | head -4
# TP_ONLY_8B=1: only the 8B shape (folded and unfolded block paths), for a short A/B run
# TP_VARIANTS=8b|70b: only that shape's batch-1 8K cell, block path and small-step kernel variants (no TP=1 part)
if [ -n "${TP_VARIANTS:-}" ]; then
  timeout "${TP2_LIMIT:-400}" python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/tp.py \
    --profile --variants "$TP_VARIANTS" --out "$OUT/tp2_variants.json" 2>&1 | grep -v -i warn | grep "^{" \
    | python3 -c "import json,sys
for line in sys.stdin:
    r = json.loads(line); print(r['model'], round(r['step_ms'], 3), [(k['kernel'][:40], round(k['us'])) for k in r.get('profile', {}).get('top', [])[:8]])"
  exit 0
fi
timeout "${TP2_LIMIT:-400}" python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/tp.py \
  --profile ${TP_ONLY_8B:+--only-8b} --out "$OUT/tp2.json" 2>&1 | grep -v -i warn | tail -16
timeout "${TP1_LIMIT:-150}" python3 benchmarks/tp.py --out "$OUT/tp1.json" 2>&1 | grep -v -i warn | tail -6
python3 benchmarks/tp.py --merge "$OUT/tp1.json" "$OUT/tp2.json" --out "$OUT/tp.json" 2>&1 | tail -30
