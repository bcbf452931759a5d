#!/usr/bin/env python3
"""Benchmark --each-line batching and --prompt-cache (issue: many prompts, one pass).

Not part of the test suite; never runs in CI. Standard library only (Python 3.11+, Linux).

  - 64 short questions, -n 32, greedy, 2 threads, --each-line at --parallel 1, 2, 4, 8, 15, 16,
    31 and the default (--parallel, comma-separated, changes the list; runs alternate):
    wall time, lines/s, aggregate generated tokens/s (tokens from the JSON summaries over the
    wall time of the whole run), and peak RSS; each against --parallel 1;
  - time to first byte of a ~1,000-token document with one question, with an empty
    --prompt-cache, then of the same document with another question (the prefix cached).

  benches/each_line.py [--model M] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path.home() / ".cache" / "streamgen-test" / "gemma-3-270m-q4_k_m.gguf"

SUBJECTS = ["the moon", "bread", "rivers", "a violin", "winter", "copper", "owls", "trains", "glass",
            "tea", "volcanoes", "paper", "bees", "clocks", "salt", "maps"]
FORMS = ["What is {}?", "Describe {} in one sentence.", "Name one fact about {}.", "Why does {} matter?"]


def questions(n: int) -> list[str]:
    out = [f.format(s) for f in FORMS for s in SUBJECTS]
    return out[:n]


def run(cmd: list[str], stdin: str | None = None) -> tuple[float, float, str, int]:
    """Wall seconds, seconds to the first stdout byte, stdout, peak RSS in KiB."""
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if stdin is not None:
        p.stdin.write(stdin.encode())
    p.stdin.close()
    first = p.stdout.read(1)
    t_first = time.monotonic() - start
    rest = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.monotonic() - start
    if status != 0:
        raise SystemExit(f"{cmd[0]} failed with status {status}")
    return wall, t_first, (first + rest).decode(), usage.ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "streamgen"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lines", type=int, default=64)
    ap.add_argument("--parallel", default="1,2,4,8,15,16,31,default",
                    help="comma-separated --parallel values; 'default' runs without the flag")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "streamgen"
        shutil.copy2(args.bin, exe)
        base = [str(exe), "-m", args.model, "-t", "2", "--temperature", "0", "-q"]
        text = "\n".join(questions(args.lines)) + "\n"
        print(f"load average {os.getloadavg()}")
        run(base + ["-n", "4", "warm up"])
        print(f"{args.lines} lines, -n 32, medians of {args.runs} runs")
        print("parallel | wall s | lines/s | generated tok/s | peak RSS MiB | lines/s vs 1")
        sizes = args.parallel.split(",")
        samples = {p: ([], [], []) for p in sizes}
        # Runs of the sizes alternate, so a drift in the machine's speed hits them all alike.
        for _ in range(args.runs):
            for parallel in sizes:
                flag = [] if parallel == "default" else ["--parallel", parallel]
                wall, _, out, maxrss = run(base + ["--each-line", "--json", "-n", "32"] + flag, text)
                summaries = [json.loads(l) for l in out.splitlines() if '"finish_reason"' in l]
                assert len(summaries) == args.lines, len(summaries)
                tokens = sum(s["generated_tokens"] for s in summaries)
                walls, rates, rss = samples[parallel]
                walls.append(wall)
                rates.append(tokens / wall)
                rss.append(maxrss / 1024)
        first = None
        for parallel in sizes:
            walls, rates, rss = samples[parallel]
            wall, rate = statistics.median(walls), statistics.median(rates)
            lines_s = args.lines / wall
            first = first or lines_s
            print(f"{parallel:>8} | {wall:6.2f} | {lines_s:7.2f} | {rate:15.1f} | {max(rss):12.0f} | {lines_s / first:.2f}x")

        doc = (REPO / "README.md").read_text()[:4200]
        print("prompt cache: first byte of a ~1,000-token document with a question")
        cold, warm = [], []
        for i in range(args.runs):
            with tempfile.TemporaryDirectory() as cache:
                cmd = base + ["--raw", "-n", "8", "--prompt-cache", cache]
                cold.append(run(cmd + [f"{doc}\nQuestion A{i}: what is this?"])[1])
                warm.append(run(cmd + [f"{doc}\nQuestion B{i}: who wrote it?"])[1])
        c, w = statistics.median(cold), statistics.median(warm)
        print(f"  empty cache {c:.3f} s, cached prefix {w:.3f} s: {w / c:.2f}x")
        print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
