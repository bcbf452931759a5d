#!/usr/bin/env python3
"""Decode after a long prompt, and the memory it takes, side by side with llama.cpp.

Not part of the test suite; never runs in CI. Standard library only (Python 3.11+).
See benches/README.md. The prompt is bench.py's corpus repeated up to --depth tokens (counted
by streamgen --count-tokens). Each round, alternating:

  - streamgen: `--raw -n N --ignore-eos --temperature 0 --stats --no-prompt-cache --no-lookup`,
    the prompt on stdin; decode tokens/s from --stats, peak RSS from os.wait4;
  - llama-bench `-p 0 -n N -d DEPTH -r 1` (decode of N tokens after DEPTH tokens in the
    context), and llama-completion on the same prompt for its peak RSS (context = prompt + N).

Medians over --runs rounds are printed. On Gemma 2/3 this is where the sliding-window layers'
rings show: attention on those layers spans the window only, and their cache holds the window.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import CORPUS, DEFAULT_BIN, DEFAULT_MODEL  # noqa: E402


def run(argv: list[str], stdin: bytes | None, timeout: float) -> tuple[str, int]:
    """Runs `argv`; returns its stderr and peak RSS in bytes."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        proc.stdin.write(stdin or b"")
        proc.stdin.close()
        _, status, rusage = os.wait4(proc.pid, 0)
        err.seek(0)
        text = err.read().decode(errors="replace")
        if status != 0:
            raise RuntimeError(f"{argv[0]} failed: {text[-400:]}")
        return text, rusage.ru_maxrss * 1024


def prompt_of(a: argparse.Namespace) -> str:
    """The longest whole-word prefix of the repeated corpus that is at most --depth tokens."""
    text = (CORPUS + "\n\n") * (a.depth // 900 + 2)
    words = text.split(" ")
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        out = subprocess.run([str(a.bin), "-m", str(a.model), "--raw", "--count-tokens"],
                             input=" ".join(words[:mid]), capture_output=True, text=True, check=True)
        if int(out.stdout.strip()) <= a.depth:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF file [default: %(default)s]")
    p.add_argument("--bin", type=Path, default=DEFAULT_BIN, help="streamgen binary [default: %(default)s]")
    p.add_argument("--llama-bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"),
                   help="directory with llama-bench and llama-completion (LLAMA_CPP_BIN)")
    p.add_argument("--depth", type=int, default=4000, help="prompt tokens [default: 4000]")
    p.add_argument("-n", "--tokens", type=int, default=128, help="tokens to generate [default: 128]")
    p.add_argument("--runs", type=int, default=3, help="rounds; medians are printed [default: 3]")
    p.add_argument("--threads", type=int, default=2, help="threads for both programs [default: 2]")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per process [default: 600]")
    a = p.parse_args()
    prompt = prompt_of(a)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(prompt)
    samples: dict[str, list[float]] = {"sg_decode": [], "sg_rss": [], "ll_decode": [], "ll_rss": []}
    for r in range(a.runs):
        err, rss = run([str(a.bin), "-m", str(a.model), "--raw", "-n", str(a.tokens), "--ignore-eos",
                        "--temperature", "0", "--stats", "--no-prompt-cache", "--no-lookup",
                        "--threads", str(a.threads)], prompt.encode(), a.timeout)
        m = re.search(r"prompt (\d+) tokens.*generated \d+ tokens, ([\d.]+) tok/s", err)
        if not m:
            raise RuntimeError(f"no --stats line: {err[-400:]}")
        samples["sg_decode"].append(float(m.group(2)))
        samples["sg_rss"].append(rss)
        print(f"round {r + 1}: streamgen {m.group(1)} prompt tokens, decode {m.group(2)} tok/s, "
              f"RSS {rss / 2**20:.0f} MiB", file=sys.stderr)
        if not a.llama_bin:
            continue
        out = subprocess.run([str(a.llama_bin / "llama-bench"), "-m", str(a.model), "-t", str(a.threads),
                              "-p", "0", "-n", str(a.tokens), "-d", str(a.depth), "-r", "1", "-o", "csv"],
                             capture_output=True, text=True, check=True, timeout=a.timeout)
        row = out.stdout.strip().splitlines()[-1].split(",")
        samples["ll_decode"].append(float(row[-2].strip('"')))
        _, rss = run([str(a.llama_bin / "llama-completion"), "-m", str(a.model), "-f", f.name, "-no-cnv",
                      "--no-display-prompt", "--temp", "0", "-t", str(a.threads), "-n", str(a.tokens),
                      "--ignore-eos", "-c", str(a.depth + a.tokens + 16), "--no-warmup"], None, a.timeout)
        samples["ll_rss"].append(rss)
        print(f"round {r + 1}: llama.cpp decode {samples['ll_decode'][-1]:.1f} tok/s, "
              f"RSS {rss / 2**20:.0f} MiB", file=sys.stderr)
    os.unlink(f.name)
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    print(f"model {a.model.name}, {a.depth}-token prompt, {a.tokens} tokens, {a.threads} threads, "
          f"{a.runs} rounds (medians)")
    print("| | decode tok/s | peak RSS MiB |\n|---|---:|---:|")
    print(f"| streamgen | {med['sg_decode']:.1f} | {med['sg_rss'] / 2**20:.0f} |")
    if "ll_decode" in med:
        print(f"| llama.cpp | {med['ll_decode']:.1f} | {med['ll_rss'] / 2**20:.0f} |")
        print(f"| ratio | {med['sg_decode'] / med['ll_decode']:.2f}x | {med['sg_rss'] / med['ll_rss']:.2f}x |")


if __name__ == "__main__":
    main()
