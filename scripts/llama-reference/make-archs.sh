#!/usr/bin/env bash
# Makes tests/data/archs/NAME.json with llama.cpp: for every synthetic model of
# streamgen::synthetic::cases() (random weights, one per architecture, switch combination and
# weight format), llama.cpp's tokenization of synthetic::PROMPT, its 24 greedy tokens after it
# and its top-5 logits at every step, plus the sha256 of the model file it ran (the tests write
# the same file and check that hash first). Not run by the tests or CI.
#
#   scripts/llama-reference/make-archs.sh LLAMA_SRC LLAMA_BUILD
#
# LLAMA_SRC is a llama.cpp tree (vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist, commit
# 0c1e570), LLAMA_BUILD a CMake build of it with shared libraries (its bin/ holds libllama.so),
# configured as DEVELOPERS.md says (AVX-512, no AMX).
set -euo pipefail
cd "$(dirname "$0")/../.."
src=$1
build=$2
exe="$build/greedy_top5"
g++ -O2 -std=c++17 -I"$src/include" -I"$src/ggml/include" scripts/llama-reference/greedy_top5.cpp \
  -L"$build/bin" -lllama -lggml -lggml-base -Wl,-rpath,"$build/bin" -o "$exe"
models=$(mktemp -d)
trap 'rm -rf "$models"' EXIT
cargo bench --quiet --bench synthetic_models -- "$models" > "$models/list.txt"
mkdir -p tests/data/archs
while read -r model; do
  name=$(basename "$model" .gguf)
  "$exe" "$model" 24 < "$models/prompts.json" > "$models/$name.json" 2> "$models/$name.log" || {
    tail -5 "$models/$name.log" >&2
    exit 1
  }
  python3 - "$model" "$models/$name.json" "tests/data/archs/$name.json" <<'PY'
import hashlib, json, sys
model, raw, out = sys.argv[1:]
cases = json.load(open(raw))
sha = hashlib.sha256(open(model, "rb").read()).hexdigest()
json.dump({"model_sha256": sha, "cases": cases}, open(out, "w"), indent=1)
open(out, "a").write("\n")
PY
  echo "$name"
done < "$models/list.txt"
