#!/usr/bin/env bash
# Here (CPU machine): copy gpt-fast's model.py, generate.py and tokenizer.py from a snapshot fetched with the
# library's `fetch github:pytorch-labs/gpt-fast` into .peers/gpt-fast (ignored by git; its code stays out of the
# repository) for benchmarks/gptfast_peer.py. A device call then carries ".peers".
set -euo pipefail
cd "$(dirname "$0")/.."
mirror=${1:-/work/.mirror/pytorch-labs+gpt-fast/repo}
grep -qx "/.peers/" .git/info/exclude 2>/dev/null || echo "/.peers/" >> .git/info/exclude
mkdir -p .peers/gpt-fast
for f in model.py generate.py tokenizer.py LICENSE; do
  git --git-dir="$mirror" show "HEAD:$f" > ".peers/gpt-fast/$f"
done
git --git-dir="$mirror" log -1 --format=%h > .peers/gpt-fast/COMMIT
ls -la .peers/gpt-fast
