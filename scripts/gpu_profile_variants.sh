#!/usr/bin/env bash
# On the GPU machine: per-kernel profiles of decode, verify and sparse draft steps (random weights, no model
# needed), with projection weights column-major (default) and row-major. Prints one block per variant.
export PYTHONPATH=$PWD:${PYTHONPATH:-}
P="python3 benchmarks/profile_step.py --context 8192"
for a in "--shape 8b --batch 1 --top 12" "--shape 8b --batch 1 --row-major --top 3" \
         "--shape smol --batch 32 --top 4" "--shape smol --batch 32 --row-major --top 3" \
         "--shape smol --batch 64 --q-len 5 --top 4" "--shape smol --batch 64 --q-len 5 --row-major --top 3" \
         "--shape smol --batch 32 --draft-budget 512 --top 12" "--shape smol --batch 1 --draft-budget 512 --top 3"; do
  $P $a 2>&1 | grep -v -i "warn" | grep -v "^ *$"
done
