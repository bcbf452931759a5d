#!/usr/bin/env python3
"""The prompt cache as a user meets it: a second question about a piped document, default flags.

Not part of the test suite; never runs in CI. Standard library only (Python 3.11+), Linux.

For each model and document size (about 1,000 and 4,000 tokens by default) it measures, over
--runs rounds, with a fresh cache per round, medians of:

  - first byte of the first question (cold cache) and of a second question about the same
    document (warm cache), from spawning the process to the first byte on stdout, and their
    ratio (goal: at most 0.1);
  - the whole first run with the cache on against --no-prompt-cache (goal: within 2%): what
    writing the cache costs a run that cannot profit from it yet.

`--store-sizes` measures the same on-against-off cost for short prompts, on the first model:
what decides the smallest prompt worth writing (src/prompt_cache.rs, MIN_STORE).

Every command is `streamgen -m MODEL -n N --temperature 0 --threads T QUESTION < document`,
with HOME pointing at a temporary folder, so the cache is the default one
(~/.cache/streamgen/prompts) and starts empty. The runs alternate so that a change in the
machine's load hits all cases alike; run it on a quiet machine and read the load it prints.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamgen-test"
MODELS = {
    "gemma3": CACHE / "gemma-3-270m-q4_k_m.gguf",
    "smollm2": CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen0.5b": CACHE / "qwen2.5-coder-0.5b-instruct.gguf",
    "qwen1.5b": CACHE / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
}
QUESTIONS = ["Summarize the text above in one sentence.", "Which names appear in the text above?"]


def document(tokens: int) -> str:
    """About `tokens` tokens of English prose: the repository's design notes, repeated as needed
    (about four bytes a token)."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    while len(text) < tokens * 4:
        text += "\n\n" + text
    return text[: tokens * 4]


def first_byte(cmd: list[str], stdin: str, home: str, timeout: float) -> tuple[float, float]:
    """Seconds to the first byte on stdout, and to the end of the process."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": home, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile() as f:
        f.write(stdin.encode())
        f.seek(0)
        start = time.perf_counter()
        p = subprocess.Popen(cmd, stdin=f, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        first = None
        assert p.stdout is not None
        while True:
            ready, _, _ = select.select([p.stdout], [], [], timeout)
            if not ready:
                p.kill()
                sys.exit(f"timed out: {' '.join(cmd)}")
            chunk = os.read(p.stdout.fileno(), 1 << 16)
            if chunk and first is None:
                first = time.perf_counter() - start
            if not chunk:
                break
        _, err = p.communicate()
        end = time.perf_counter() - start
        if p.returncode != 0:
            sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{err.decode(errors='replace')}")
    return (first if first is not None else end), end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "streamgen"))
    ap.add_argument("--models", default="qwen1.5b,gemma3,smollm2", help=f"of {', '.join(MODELS)}")
    ap.add_argument("--docs", default="1000,4000", help="document sizes, in tokens (about)")
    ap.add_argument("--store-sizes", default="", help="short prompt sizes for the write cost, e.g. 32,64,128")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("-n", "--tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()

    # A private copy, so a `cargo build` meanwhile cannot swap the binary.
    work = tempfile.mkdtemp(prefix="sg-bench-")
    binary = os.path.join(work, "streamgen")
    shutil.copy(args.bin, binary)
    print(f"# prompt cache benchmark: {binary} (copy of {args.bin})")
    print(f"# cpu: {cpu()}; load before: {os.getloadavg()}")

    def cmd(model: Path, question: str, *extra: str) -> list[str]:
        return [binary, "-m", str(model), "-n", str(args.tokens), "--temperature", "0",
                "--threads", str(args.threads), *extra, question]

    models = [m for m in args.models.split(",") if m]
    for name in models:
        model = MODELS[name]
        if not model.exists():
            sys.exit(f"{model} is missing: tests/fetch-model.sh {name}")
        # The model in the page cache before anything is timed.
        first_byte(cmd(model, "Hi", "--no-prompt-cache"), "", work, args.timeout)
        for size in [int(s) for s in args.docs.split(",") if s]:
            doc = document(size)
            cold, warm, on, off = [], [], [], []
            for _ in range(args.runs):
                home = tempfile.mkdtemp(dir=work)
                f, end = first_byte(cmd(model, QUESTIONS[0]), doc, home, args.timeout)
                cold.append(f)
                on.append(end)
                warm.append(first_byte(cmd(model, QUESTIONS[1]), doc, home, args.timeout)[0])
                off.append(first_byte(cmd(model, QUESTIONS[0], "--no-prompt-cache"), doc, home, args.timeout)[1])
                shutil.rmtree(home)
            c, w = statistics.median(cold), statistics.median(warm)
            a, b = statistics.median(on), statistics.median(off)
            print(f"{name} doc~{size}: first byte, first question {c:.3f} s, second {w:.3f} s, "
                  f"ratio {w / c:.3f}; first run cache on {a:.3f} s / off {b:.3f} s = {a / b:.3f}")
            print(f"  samples: cold {fmt(cold)} warm {fmt(warm)} on {fmt(on)} off {fmt(off)}")
    for size in [int(s) for s in args.store_sizes.split(",") if s]:
        model = MODELS[models[0]]
        doc = document(size)
        on, off = [], []
        for _ in range(args.runs):
            home = tempfile.mkdtemp(dir=work)
            on.append(first_byte(cmd(model, QUESTIONS[0]), doc, home, args.timeout)[1])
            off.append(first_byte(cmd(model, QUESTIONS[0], "--no-prompt-cache"), doc, home, args.timeout)[1])
            shutil.rmtree(home)
        a, b = statistics.median(on), statistics.median(off)
        print(f"{models[0]} prompt~{size}: whole run cache on {a:.3f} s / off {b:.3f} s = {a / b:.3f}")
        print(f"  samples: on {fmt(on)} off {fmt(off)}")
    print(f"# load after: {os.getloadavg()}")
    shutil.rmtree(work)


def fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
