#!/usr/bin/env python3
"""First byte of a follow-up (`streamgen --cid`) with and without the reused prompt cache.

Not part of the test suite; never runs in CI. Standard library only (Python 3.11+). See
benches/README.md. For each model and each conversation size (about 250 and 1,000 tokens by
default) it:

  1. answers a first turn (a system prompt, a passage of the text in bench.py cut to the size,
     and a question; -n 32, greedy) with --prompt-cache, logging it in a private log;
  2. times follow-ups (`--cid ID --no-log 'And in one word?'`, -n 8) --runs times each way:
     - reused: with a fresh copy of the prompt cache as the first turn left it (so that each
       run finds the first turn's prompt, and not an earlier follow-up's);
     - scratch: with an empty prompt cache: the same prompt computed from nothing;
  3. prints medians of the whole-process time to the first byte of stdout (spawn to the first
     byte read from an unbuffered pipe: load, prompt, first token), of the same after loading
     (`--stats`' first token time minus its load time), the prompt tokens and how many were
     reused, and the ratio reused/scratch (issue 27's goal: at most 0.2 after 1,000 tokens).

The Gemma 3 test model is a base model without a chat template: it is run with
--chat-template gemma.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import CORPUS  # noqa: E402  (the same deterministic text as bench.py)

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamgen-test"
MODELS = {
    "gemma3": (CACHE / "gemma-3-270m-q4_k_m.gguf", ["--chat-template", "gemma"]),
    "smollm2": (CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf", []),
}
STATS = re.compile(r"prompt (\d+) tokens(?: \((\d+) reused\))?.*first token ([\d.]+) s; load ([\d.]+) s")


def run(argv: list[str], env: dict[str, str], timeout: float) -> dict:
    """Runs streamgen; the time to the first byte of stdout, and the --stats figures."""
    start = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert p.stdout is not None
    first = os.read(p.stdout.fileno(), 1)
    first_byte = time.perf_counter() - start if first else None
    _, err = p.communicate(timeout=timeout)
    if p.returncode != 0 or first_byte is None:
        raise SystemExit(f"conversation.py: {' '.join(argv)} failed ({p.returncode}):\n{err.decode(errors='replace')}")
    m = STATS.search(err.decode(errors="replace"))
    if not m:
        raise SystemExit(f"conversation.py: no --stats line in:\n{err.decode(errors='replace')}")
    return {
        "first_byte": first_byte,
        "after_load": float(m[3]) - float(m[4]),
        "prompt": int(m[1]),
        "reused": int(m[2] or 0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=REPO / "target" / "release" / "streamgen")
    ap.add_argument("--models", default="gemma3,smollm2", help="comma-separated: gemma3, smollm2")
    ap.add_argument("--sizes", default="250,1000", help="conversation sizes in tokens (approximate)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    if not a.bin.is_file():
        raise SystemExit(f"conversation.py: no binary at {a.bin}: cargo build --release")
    print(f"# streamgen follow-ups, {time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()}, runs {a.runs}")
    print("model    size  prompt  reused  first byte reused/scratch (s)  after load reused/scratch (s)  ratio")
    for name in a.models.split(","):
        path, extra = MODELS[name]
        if not path.is_file():
            raise SystemExit(f"conversation.py: {path} is missing: tests/fetch-model.sh {name}")
        for size in (int(s) for s in a.sizes.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                env = {"PATH": os.environ.get("PATH", ""), "HOME": str(work), "HF_HUB_OFFLINE": "1",
                       "STREAMGEN_LOGS": str(work / "logs.db")}
                base = [str(a.bin), "-m", str(path), *extra, "--temperature", "0", "--stats"]
                if a.threads:
                    base += ["--threads", str(a.threads)]
                # About 4.5 characters per token of this English text on both vocabularies.
                passage = CORPUS[: int(size * 4.5)]
                first = base + ["--prompt-cache", str(work / "cache"), "-s", "You answer briefly.", "-n", "32",
                                f"{passage}\n\nWhat is this text about?"]
                run(first, env, a.timeout)
                cid = subprocess.run([str(a.bin), "--logs", "1", "--json"], env=env, capture_output=True,
                                     check=True, text=True).stdout
                cid = re.search(r'"conversation":(\d+)', cid)[1]
                follow = ["--cid", cid, "--no-log", "-n", "8", "And in one word?"]
                reused, scratch = [], []
                for i in range(a.runs):
                    copy = work / f"cache-{i}"
                    shutil.copytree(work / "cache", copy)
                    reused.append(run(base + ["--prompt-cache", str(copy)] + follow, env, a.timeout))
                    scratch.append(run(base + ["--prompt-cache", str(work / f"empty-{i}")] + follow, env, a.timeout))
                med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
                ratio = med(reused, "after_load") / med(scratch, "after_load")
                print(f"{name:8} {size:5} {reused[0]['prompt']:7} {reused[0]['reused']:7}  "
                      f"{med(reused, 'first_byte'):8.3f} / {med(scratch, 'first_byte'):8.3f}              "
                      f"{med(reused, 'after_load'):8.3f} / {med(scratch, 'after_load'):8.3f}          {ratio:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
