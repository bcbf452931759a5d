#!/usr/bin/env bash
# Fetches llama.cpp's golden tokenizer tests (vocabulary-only GGUF files `ggml-vocab-*.gguf` with
# `.inp` inputs and `.out` expected ids) from the llama-cpp-python 0.3.36 sdist on PyPI, which
# vendors llama.cpp commit 0c1e570, into a cache outside the repo, and prints the directory.
# Only the vocabulary files are unpacked; nothing of llama.cpp is built or committed.
set -euo pipefail

version=0.3.36
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
url="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-$version.tar.gz"
cache="${STREAMGEN_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/streamgen-test}"
dir="$cache/llama-vocab-$version"

if [ ! -f "$dir/.complete" ]; then
  mkdir -p "$cache"
  work=$(mktemp -d "$cache/fetch.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  echo "fetching llama.cpp's tokenizer tests (llama-cpp-python $version sdist) into $cache" >&2
  python3 - "$url" "$work/sdist.tar.gz" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=300) as r, open(sys.argv[2], "wb") as f:
    while chunk := r.read(1 << 20):
        f.write(chunk)
PY
  echo "$sha256  $work/sdist.tar.gz" | sha256sum --check --status ||
    { echo "fetch-vocab: sha256 mismatch for the llama-cpp-python sdist" >&2; exit 1; }
  mkdir "$work/out"
  tar -xzf "$work/sdist.tar.gz" -C "$work/out" --strip-components=4 --wildcards \
    "llama_cpp_python-$version/vendor/llama.cpp/models/ggml-vocab-*"
  touch "$work/out/.complete"
  rm -rf "$dir"
  mv "$work/out" "$dir"
fi
echo "$dir"
