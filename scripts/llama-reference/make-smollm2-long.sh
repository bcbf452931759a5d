#!/usr/bin/env bash
# Makes tests/data/smollm2-135m/greedy-long.json with llama.cpp: three prompts of more than
# 1,000 tokens (the prompts of tests/data/gemma3-270m/greedy-long.json; the second one as a
# SmolLM2 ChatML turn with the file's default system message), 32 greedy steps each, with
# llama.cpp's top-5 logits per step. Not run by the tests or CI.
#
#   scripts/llama-reference/make-smollm2-long.sh LLAMA_SRC LLAMA_BUILD
#
# LLAMA_SRC is a llama.cpp tree (vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist, commit
# 0c1e570), LLAMA_BUILD a CMake build of it with shared libraries (its bin/ holds libllama.so).
set -euo pipefail
cd "$(dirname "$0")/../.."
src=$1
build=$2
model=$(tests/fetch-model.sh smollm2)
exe="$build/greedy_top5"
g++ -O2 -std=c++17 -I"$src/include" -I"$src/ggml/include" scripts/llama-reference/greedy_top5.cpp \
  -L"$build/bin" -lllama -lggml -lggml-base -Wl,-rpath,"$build/bin" -o "$exe"
python3 - <<'PY' > "$build/smollm2-long-prompts.json"
import json
cases = json.load(open("tests/data/gemma3-270m/greedy-long.json"))
chat = json.load(open("tests/data/smollm2-135m/greedy.json"))
system = next(c for c in chat if c["kind"] == "chat" and not c.get("system"))["prompt"]
system = system[: system.index("<|im_start|>user\n")]  # the default system turn, as rendered
essay, guide, diary = (c["prompt"] for c in cases)
question = guide.removeprefix("<start_of_turn>user\n").split("<end_of_turn>")[0]
prompts = [essay, f"{system}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", diary]
print(json.dumps(prompts))
PY
"$exe" "$model" 32 < "$build/smollm2-long-prompts.json" > tests/data/smollm2-135m/greedy-long.json
python3 -c "
import json; d = json.load(open('tests/data/smollm2-135m/greedy-long.json'))
print('prompts of', [len(c['prompt_ids']) for c in d], 'tokens')"
