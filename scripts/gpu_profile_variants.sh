export PYTHONPATH=$PWD
P="python3 benchmarks/profile_step.py --context 8192"
for a in "--shape 8b --batch 1 --top 12" "--shape 8b --batch 1 --transpose o --top 6" "--shape 8b --batch 1 --transpose qkv,o,gate_up,down --top 6" "--shape 8b --batch 8 --top 4" "--shape 8b --batch 8 --transpose o --top 4" "--shape smol --batch 32 --top 4" "--shape smol --batch 32 --draft-budget 512 --top 14" "--shape smol --batch 32 --draft-budget 512 --transpose o --top 4" "--shape smol --batch 1 --draft-budget 512 --top 4"; do $P $a 2>&1 | grep -v -i warn | tail -n +1 | grep -v "^ *$" | grep -v "_warn_once"; done
