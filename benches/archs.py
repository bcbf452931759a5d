#!/usr/bin/env python3
"""Decode speed per model family on random-weight models of Qwen2.5-0.5B's size, against llama.cpp.

Not part of the test suite; never runs in CI. Standard library only (Python 3.11+). See
benches/README.md. For each architecture and format it writes the model with
`benches/synthetic_models.rs --half-billion` (24 layers, 896 wide, 14/2 heads, FFN 4,864,
151,936 embedding rows, the family's switches), then, interleaved, runs

  - llama.cpp: `llama-bench -p 0 -n N -t THREADS -r RUNS` (tg N, the median of its samples);
  - streamgen: `--raw --temperature 0 -n N --stats` on a one-word prompt, RUNS times; decode
    tokens/s from its --stats line (the median), checking that it generated N tokens;

prints a table of both and their ratio, and deletes the model. The models are random, so the
text is noise; the arithmetic per token is the real family's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared helpers: stats parsing, machine description)

REPO = Path(__file__).resolve().parent.parent
ARCHS = ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "granite"]
FORMATS = ["q4_k_m", "q8_0"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"), required=not os.environ.get("LLAMA_CPP_BIN"),
                   help="directory with llama-bench (or LLAMA_CPP_BIN)")
    p.add_argument("--bin", type=Path, default=REPO / "target" / "release" / "streamgen")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("-n", type=int, default=128, help="tokens to generate")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dir", type=Path, help="where to write the models (default: a temporary directory)")
    return p.parse_args()


def write_model(arch: str, fmt: str, directory: Path) -> Path:
    out = subprocess.run(
        ["cargo", "bench", "--quiet", "--bench", "synthetic_models", "--", str(directory), "--half-billion", arch, fmt],
        cwd=REPO, check=True, capture_output=True, text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def llama_tg(a: argparse.Namespace, model: Path) -> float:
    argv = [str(a.llama_bin / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(a.n), "-t", str(a.threads),
            "-r", str(a.runs), "-o", "json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed on {model.name}: {proc.stderr[-400:]}")
    return statistics.median(json.loads(proc.stdout)[0]["samples_ts"])


def streamgen_decode(a: argparse.Namespace, model: Path) -> tuple[float, int]:
    rates, counts = [], []
    for _ in range(a.runs):
        argv = [str(a.bin), "-m", str(model), "--raw", "--temperature", "0", "-n", str(a.n), "--stats",
                "--threads", str(a.threads), "Hello"]
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            raise RuntimeError(f"streamgen failed on {model.name}: {proc.stderr[-400:]}")
        stats = bench.parse_stats(proc.stderr)
        rates.append(stats["decode_tps"])
        counts.append(int(stats.get("gen_tokens", 0)))
    return statistics.median(rates), min(counts)


def main() -> int:
    a = parse_args()
    if not a.bin.is_file():
        print(f"no streamgen binary at {a.bin}: cargo build --release first", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        for arch in a.archs.split(","):
            for fmt in a.formats.split(","):
                print(f"  {arch} {fmt}: writing ...", file=sys.stderr, flush=True)
                model = write_model(arch, fmt, Path(tmp))
                size = model.stat().st_size
                # llama.cpp first, then streamgen, so the page cache treats both alike.
                llama = llama_tg(a, model)
                ours, count = streamgen_decode(a, model)
                model.unlink()
                rows.append((arch, fmt, size, ours, llama, count))
                print(f"  {arch} {fmt}: streamgen {ours:.1f} tok/s, llama.cpp {llama:.1f} tok/s, ratio {ours / llama:.2f}",
                      file=sys.stderr, flush=True)
    print(f"# Decode tok/s, random-weight 0.5B models, {a.threads} threads, -n {a.n}, median of {a.runs}")
    print(f"# {bench.cpu_name()}; streamgen {bench.git_rev()}; llama.cpp {llama_version(a)}")
    print()
    print("| family | format | file MiB | streamgen tok/s | llama.cpp tok/s (tg) | ratio | tokens |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for arch, fmt, size, ours, llama, count in rows:
        print(f"| {arch} | {fmt} | {size / 2**20:.0f} | {ours:.1f} | {llama:.1f} | {ours / llama:.2f} | {count} |")
    return 0


def llama_version(a: argparse.Namespace) -> str:
    return bench.llama_version(a)


if __name__ == "__main__":
    sys.exit(main())
