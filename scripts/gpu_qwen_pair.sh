#!/usr/bin/env bash
# Carry the SpecAttn-S pair (1.6 GB) to the GPU machine in parts that fit one device call (64 MiB with the tree).
#   here:            bash scripts/gpu_qwen_pair.sh split          # .models/qwen/parts/{draft,target}.partNN
#   each device call (back to back; the machine keeps files only while warm, 30 s after a call):
#                    carry [".models/qwen/parts/<one part>"], command: bash scripts/gpu_qwen_pair.sh store
#   last call:       source scripts/gpu_qwen_pair.sh join && python3 benchmarks/...   (md5-checked GGUFs in /root/q)
# "split target" / "join target": the verifier alone (19 parts), for self-speculation on it (SpecAttn-Y).
set -e
PARTS=.models/qwen/parts
case "${1:-}" in
  split)
    mkdir -p "$PARTS"
    for name in ${2:-draft target}; do
      split -b 58M -d ".models/qwen/$name.gguf" "$PARTS/$name.part"
    done
    ls "$PARTS" | wc -l | xargs echo "parts:" ;;
  store)
    mkdir -p /root/q
    for f in "$PARTS"/*.part*; do [ -f "$f" ] && cp "$f" /root/q/; done
    ls /root/q | wc -l | xargs echo "parts on this machine:" ;;
  join)
    want=${2:-draft target}
    for pair in "draft fa36a8a7b86e1a0355ecc8545f26e885" "target 136755df932e5b87db9bbc2bea00aba5"; do
      set -- $pair
      case " $want " in *" $1 "*) ;; *) continue ;; esac
      [ -f "/root/q/$1.gguf" ] || cat /root/q/"$1".part* > "/root/q/$1.gguf"
      if ! echo "$2  /root/q/$1.gguf" | md5sum -c -; then
        rm -f "/root/q/$1.gguf"
        echo "the $1 model is incomplete on this machine: store the missing parts again" >&2
        return 1 2>/dev/null || exit 1
      fi
    done
    [ -z "${SPECATTN_COMMIT:-}" ] && [ -f .commit ] && export SPECATTN_COMMIT=$(cat .commit)
    export SPECATTN_QWEN_DRAFT=/root/q/draft.gguf SPECATTN_QWEN_TARGET=/root/q/target.gguf ;;
  *) echo "usage: $0 split | store | join" >&2; exit 2 ;;
esac
set +e
