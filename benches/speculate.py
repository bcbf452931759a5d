#!/usr/bin/env python3
"""Speculative decoding on the work a filter does: edits that copy their input, and free-form
questions where nothing can be copied.

Not part of the test suite; never runs in CI. Standard library only (Python 3.11+), Linux.

For each model, task and mode (plain: --no-lookup; lookup: the default; draft: --draft-model,
for the models given one) it runs `streamgen -m MODEL --raw --temperature 0 -n N --json
--no-prompt-cache PROMPT`, over --runs rounds with the modes alternating, and prints medians of
decode tokens/s (the summary's decode_tokens_per_second: tokens after the first over the time
after the first), the speedup over plain, and the proposed and accepted counts. It also checks
that every mode wrote the same answer (speculation must not change the output) and says so.

The prompt is the task's material, a blank line and the instruction, in the model's chat format
written out (ChatML for the Qwen and SmolLM2 models; Gemma 3 270M is a base model and gets the
plain text and "Answer:"), so that llama.cpp can be given exactly the same text.

With --llama-bin DIR (a llama.cpp build's bin folder; LLAMA_CPP_BIN too) each round also runs,
on the same prompt file, greedy, the same -n, threads and --draft-max: `llama-completion` (plain),
`llama-lookup` (its n-gram speculation) and, for a model with a draft, `llama-speculative-simple`
with the same draft; their decode tokens/s are what they print ("eval time" for
llama-completion; "decoded N tokens in S seconds" for the others, which counts from the first
token after the prompt). The line then gives streamgen's best mode against llama-completion and
against llama.cpp's best speculative program.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamgen-test"
MODELS = {
    "gemma3": CACHE / "gemma-3-270m-q4_k_m.gguf",
    "smollm2": CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen0.5b": CACHE / "qwen2.5-coder-0.5b-instruct.gguf",
    "qwen1.5b": CACHE / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
}
# The draft for each target that has one (same vocabulary).
DRAFTS = {"qwen1.5b": "qwen0.5b"}

TYPOS = """Teh quick brown fox jumsp over the lazy dog. It was a brigth cold day in Apirl, and the
clocks were striking thirteen. Winston Smith, his chin nuzzled into his breast in an effort to
escape the vile wind, slipped quikcly through the glass doors of Victory Mansions, though not
quickly enough to prevent a swirl of gritty dust from entering along with him. The hallway
smelt of boiled cabbage and old rag mats. At one end of it a coloured poster, too large for
indoor display, had been tacked to the wall."""

JSON = """{"name": "streamgen", "version": "0.1.0", "license": "MIT",
 "authors": [{"name": "Ada", "email": "ada@example.com"}, {"name": "Linus", "email": "linus@example.com"}],
 "dependencies": {"clap": "4", "anyhow": "1", "serde": {"version": "1", "features": ["derive"]}},
 "features": {"default": ["cli"], "cli": [], "server": ["dep:tokio"]},
 "targets": [{"kind": "bin", "path": "src/main.rs"}, {"kind": "lib", "path": "src/lib.rs"}]}"""

CODE = '''def parse_line(line):
    parts = line.strip().split(",")
    return {"name": parts[0], "age": int(parts[1]), "city": parts[2]}


def load(path):
    with open(path) as f:
        return [parse_line(l) for l in f if l.strip()]


def oldest(people):
    return max(people, key=lambda p: p["age"])


def by_city(people):
    cities = {}
    for p in people:
        cities.setdefault(p["city"], []).append(p)
    return cities
'''

C_FRENCH = """/* Calcule la somme des éléments du tableau. */
int somme(const int *t, int n) {
    int s = 0; /* le total */
    for (int i = 0; i < n; i++) {
        s += t[i]; /* ajoute l'élément courant */
    }
    return s; /* renvoie le total */
}

/* Renvoie l'indice du plus grand élément, ou -1 si le tableau est vide. */
int indice_max(const int *t, int n) {
    if (n == 0) return -1; /* tableau vide */
    int m = 0;
    for (int i = 1; i < n; i++) {
        if (t[i] > t[m]) m = i; /* nouveau maximum */
    }
    return m;
}
"""

# (name, instruction, material); an empty material is a free-form question.
TASKS = [
    ("typos", "Fix the spelling mistakes in this text. Reply with the corrected text only.", TYPOS),
    ("json-yaml", "Convert this JSON to YAML. Reply with the YAML only.", JSON),
    ("docstrings", "Add a one-line docstring to each function. Reply with the code only.", CODE),
    ("comments", "Translate the comments of this C code to English. Reply with the code only.", C_FRENCH),
    ("free-hash", "Explain in a paragraph what a hash table is and when to use one.", ""),
    ("free-story", "Write a short story about a lighthouse keeper.", ""),
]


def chat_prompt(model: str, instruction: str, material: str) -> str:
    """The prompt as streamgen's chat template would render it (material first), written out."""
    user = f"{material.rstrip()}\n\n{instruction}" if material else instruction
    if model == "gemma3":
        # A base model: it continues text, and after the instruction alone it often just ends.
        return user + "\n\nAnswer:\n"
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


def llama_run(argv: list[str], timeout: float) -> dict:
    """A llama.cpp program's decode tokens/s (and drafted/accepted counts when it prints them)."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(argv)}\n{p.stderr[-2000:]}")
    err = p.stderr
    out: dict = {}
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", err)
    if m:
        out["tokens"], out["tps"] = int(m[1]), int(m[1]) / float(m[2])
    else:
        m = re.search(r"\n[^\n]*?\beval time\s*=.*?/\s*(\d+)\s*runs.*?([\d.]+)\s*tokens per second", err)
        if not m:
            sys.exit(f"no timings from {argv[0]}:\n{err[-2000:]}")
        out["tokens"], out["tps"] = int(m[1]) + 1, float(m[2])
    d = re.search(r"n_drafted\s*=\s*(\d+)", err)
    a = re.search(r"n_accept\s*=\s*(\d+)", err)
    if d and a:
        out["drafted"], out["accepted"] = int(d[1]), int(a[1])
    return out


def run(cmd: list[str], stdin: str, timeout: float) -> dict:
    p = subprocess.run(cmd, input=stdin.encode(), capture_output=True, timeout=timeout,
                       env={"PATH": os.environ.get("PATH", ""), "HOME": tempfile.gettempdir()})
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr.decode(errors='replace')}")
    lines = [json.loads(l) for l in p.stdout.decode().splitlines() if l.strip()]
    summary = lines[-1]
    summary["answer"] = "".join(l.get("text", "") for l in lines[:-1])
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "streamgen"))
    ap.add_argument("--models", default="qwen1.5b,smollm2,gemma3", help=f"of {', '.join(MODELS)}")
    ap.add_argument("--tasks", default=",".join(t[0] for t in TASKS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("-n", "--tokens", type=int, default=192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-max", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--llama-bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"),
                    help="llama.cpp's bin folder, to compare against (default: $LLAMA_CPP_BIN)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="sg-spec-")
    binary = os.path.join(work, "streamgen")
    shutil.copy(args.bin, binary)
    print(f"# speculative decoding benchmark: copy of {args.bin}; cpu {cpu()}; load {os.getloadavg()}")
    tasks = [t for t in TASKS if t[0] in args.tasks.split(",")]
    for name in [m for m in args.models.split(",") if m]:
        model = MODELS[name]
        base = [binary, "-m", str(model), "--raw", "--temperature", "0", "-n", str(args.tokens), "--json",
                "--no-prompt-cache", "--threads", str(args.threads), "--draft-max", str(args.draft_max)]
        modes = {"plain": ["--no-lookup"], "lookup": []}
        if name in DRAFTS:
            modes["draft"] = ["--draft-model", str(MODELS[DRAFTS[name]])]
        llama: dict[str, list[str]] = {}
        if args.llama_bin:
            common = ["-m", str(model), "-n", str(args.tokens), "--temp", "0", "-t", str(args.threads)]
            draft = ["--spec-draft-n-max", str(args.draft_max)]
            llama["llama-completion"] = [str(args.llama_bin / "llama-completion"), *common, "-no-cnv",
                                         "--no-display-prompt", "--simple-io"]
            llama["llama-lookup"] = [str(args.llama_bin / "llama-lookup"), *common, *draft]
            if name in DRAFTS:
                llama["llama-speculative-simple"] = [str(args.llama_bin / "llama-speculative-simple"), *common,
                                                     *draft, "--spec-type", "draft-simple",
                                                     "-md", str(MODELS[DRAFTS[name]])]
        run(base + ["--no-lookup", "Hi"], "", args.timeout)  # the model in the page cache
        for task, instruction, material in tasks:
            prompt = chat_prompt(name, instruction, material)
            prompt_file = Path(work) / "prompt.txt"
            prompt_file.write_text(prompt)
            samples: dict[str, list[dict]] = {m: [] for m in modes}
            theirs: dict[str, list[dict]] = {m: [] for m in llama}
            for _ in range(args.runs):
                for mode, extra in modes.items():
                    samples[mode].append(run(base + extra + [prompt], "", args.timeout))
                for prog, argv in llama.items():
                    theirs[prog].append(llama_run(argv + ["-f", str(prompt_file)], args.timeout))
            plain = statistics.median(s["decode_tokens_per_second"] for s in samples["plain"])
            n = samples["plain"][0]["generated_tokens"]
            if n < 2 or plain <= 0:
                print(f"{name} {task}: {n} token(s) generated, no decode speed to compare", flush=True)
                continue
            answers = {s["answer"] for ss in samples.values() for s in ss}
            same = "same answer" if len(answers) == 1 else f"{len(answers)} DIFFERENT answers"
            parts = []
            ours = {}
            for mode, ss in samples.items():
                tps = ours[mode] = statistics.median(s["decode_tokens_per_second"] for s in ss)
                acc = ""
                if "proposed_tokens" in ss[0]:
                    acc = f", {ss[0]['accepted_tokens']}/{ss[0]['proposed_tokens']} accepted"
                parts.append(f"{mode} {tps:.1f} tok/s ({tps / plain:.2f}x{acc})")
            print(f"{name} {task} ({n} tokens, {same}): " + "; ".join(parts), flush=True)
            if llama:
                rates = {p: statistics.median(r["tps"] for r in rs) for p, rs in theirs.items()}
                words = []
                for p, rs in theirs.items():
                    acc = f", {rs[0]['accepted']}/{rs[0]['drafted']} accepted" if "drafted" in rs[0] else ""
                    words.append(f"{p} {rates[p]:.1f} tok/s ({rs[0]['tokens']} tokens{acc})")
                best_ours = max(ours.values())
                best_spec = max(v for p, v in rates.items() if p != "llama-completion")
                print(f"  llama.cpp: " + "; ".join(words), flush=True)
                print(f"  streamgen's best {best_ours:.1f} tok/s: {best_ours / rates['llama-completion']:.2f}x "
                      f"llama-completion, {best_ours / best_spec:.2f}x llama.cpp's best speculative", flush=True)
    print(f"# load after: {os.getloadavg()}")
    shutil.rmtree(work)


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
