#!/usr/bin/env bash
# On the GPU machine. `bash scripts/gpu_setup.sh part00` stores the first half of the default model;
# `source scripts/gpu_setup.sh part01` joins it with the second, checks the md5, installs the carried
# wheels and sets SPECATTN_DEFAULT_GGUF and PYTHONPATH for the benchmark that follows.
set -e
mkdir -p /root/m
if [ "${1:-}" = "part00" ]; then
  cp .models/smol.part00 /root/m/
  echo "stored part00 ($(stat -c %s /root/m/smol.part00) bytes)"
else
  if [ ! -f /root/m/smol.gguf ]; then
    cat /root/m/smol.part00 .models/smol.part01 > /root/m/smol.gguf
  fi
  if ! echo "a1231443440b107ff29f02bdb38c9d0a  /root/m/smol.gguf" | md5sum -c -; then
    # A cold machine lost part00 (it stays warm 30 s): run the part00 call again, then this one.
    rm -f /root/m/smol.gguf
    echo "the default model is incomplete on this machine: rerun 'bash scripts/gpu_setup.sh part00' first" >&2
    return 1 2>/dev/null || exit 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
  export SPECATTN_DEFAULT_GGUF=/root/m/smol.gguf
  # the commit results report: carry ".commit" (written here by .git/hooks/post-commit, see benchmarks/NOTES.md)
  [ -z "${SPECATTN_COMMIT:-}" ] && [ -f .commit ] && export SPECATTN_COMMIT=$(cat .commit)
  export PYTHONUNBUFFERED=1
fi
set +e
