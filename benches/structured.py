#!/usr/bin/env python3
"""Benchmark structured output (issue 26): what a JSON Schema costs, against llama.cpp's -j.

Not part of the test suite; never runs in CI. Standard library only (Python 3.11+, Linux).

For each model (default: Gemma 3 270M, whose vocabulary has 262k tokens, and SmolLM2-135M,
49k), greedy, 2 threads, the same raw prompt, runs alternating, medians:

  - decode tokens/s under three JSON Schemas, against unconstrained decode of as many tokens
    (`--ignore-eos`) of the same prompt, from streamgen's --json summary: `cities`, an array of
    at least 8 objects the prompt asks for (the model mostly follows it), `codes`, 24 strings
    like ABC-1234 (the grammar refuses most tokens the model would pick), and `tickets`, the
    records of a text extracted as objects (the answer copies spans of the prompt, where prompt
    lookup pays); a schema run's tokens include those the grammar forced, fed several per pass.
    Each schema also runs with --no-lookup, to show what speculation adds under it;
  - the time to the first token with the schema and without: the difference is the time to the
    first mask (compiling the schema and indexing the vocabulary), since the prompt is the same;
  - the same two decode figures for llama-completion (-j SCHEMA, and --ignore-eos without it),
    from its own timings; the llama.cpp build's structured output is its GBNF sampler unless it
    was configured with LLAMA_LLGUIDANCE (the script says which, from CMakeCache.txt);
  - --each-line over 32 lines with --json-schema against without it: lines/s (wall time).

  benches/structured.py [--models A,B] [--llama-bin DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "streamgen-test"
DEFAULT_MODELS = [CACHE / "gemma-3-270m-q4_k_m.gguf", CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"]

SCHEMA = {
    "type": "object",
    "properties": {
        "cities": {
            "type": "array",
            "minItems": 8,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                               "note": {"type": "string"}},
                "required": ["name", "country", "note"],
            },
        }
    },
    "required": ["cities"],
}
# A schema the model does not follow on its own: the grammar refuses most tokens it would pick,
# which is where llama.cpp's sampler masks the whole vocabulary.
CODES = {"type": "array", "minItems": 24,
         "items": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}
PROMPT = ("Here are eight famous cities, each with its country and a short note, as JSON with a "
          "\"cities\" list:\n")
# Extraction: the answer's values are copied from the text.
TICKETS = {
    "type": "object",
    "properties": {"tickets": {"type": "array", "items": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "email": {"type": "string"},
                       "opened": {"type": "string"}, "problem": {"type": "string"},
                       "priority": {"enum": ["low", "medium", "high"]}, "product": {"type": "string"},
                       "version": {"type": "string"}},
        "required": ["id", "name", "email", "opened", "problem", "priority", "product", "version"],
        "additionalProperties": False}}},
    "required": ["tickets"],
    "additionalProperties": False,
}
TICKETS_PROMPT = """Ticket 4411 was opened by Maria Gonzalez (maria.gonzalez@example.com) on 2024-03-18. \
She reports that the invoice export fails with error code E-2231 when the date range spans two \
fiscal years. Priority: high. Product: Billing Dashboard version 3.14.2.

Ticket 4412 was opened by Kenji Watanabe (kenji.w@example.org) on 2024-03-19. He reports that \
the password reset email never arrives for accounts created through single sign-on. Priority: \
medium. Product: Identity Portal version 2.8.0.

Ticket 4413 was opened by Aisha Okafor (a.okafor@example.net) on 2024-03-21. She reports that \
the mobile app crashes when a photo larger than 20 MB is attached to an expense report. \
Priority: low. Product: Expenses Mobile version 5.0.1.

The three tickets above, as JSON with a "tickets" list:
"""
# name: (schema, prompt)
SCHEMAS = {"cities": (SCHEMA, PROMPT), "codes": (CODES, PROMPT), "tickets": (TICKETS, TICKETS_PROMPT)}
PROMPTS = {"cities": PROMPT, "tickets": TICKETS_PROMPT}
LINE_SCHEMA = {
    "type": "object",
    "properties": {"topic": {"type": "string"}, "sentiment": {"enum": ["positive", "negative", "neutral"]}},
    "required": ["topic", "sentiment"],
}
LINES = [f"{s} {t}" for s in ("I loved", "I hated", "I did not mind", "Nobody talks about")
         for t in ("the new bridge.", "the rain today.", "this film.", "the bus service.",
                   "the museum.", "the coffee here.", "the long queue.", "the concert.")]


def run(cmd: list[str], stdin: str = "", ok: tuple[int, ...] = (0,)) -> tuple[float, str, str]:
    """Wall seconds, stdout, stderr; a failure stops the benchmark (exit 1 is an answer cut
    short of its schema by -n, which the schema runs allow)."""
    start = time.monotonic()
    p = subprocess.run(cmd, input=stdin.encode(), capture_output=True)
    wall = time.monotonic() - start
    if p.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd[:3])}… failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
    return wall, p.stdout.decode(), p.stderr.decode()


def summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def llama_decode(stderr: str) -> tuple[float, float]:
    """llama-completion's decode tokens/s and generated tokens, from its own timings."""
    m = re.search(r"\n[^\n]*?\beval time\s*=.*?/\s*(\d+)\s*runs.*?([\d.]+)\s*tokens per second", stderr)
    if not m:
        raise SystemExit("no eval time in llama-completion's output")
    return float(m.group(2)), float(m.group(1)) + 1


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(str(m) for m in DEFAULT_MODELS))
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "streamgen"))
    ap.add_argument("--llama-bin", default=os.environ.get("LLAMA_CPP_BIN"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("-n", type=int, default=160, help="tokens per answer (the schema's answer ends earlier if complete)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    models = [Path(m) for m in a.models.split(",")]
    llama = Path(a.llama_bin) if a.llama_bin else None
    if llama:
        cache = llama.parent / "CMakeCache.txt"
        text = cache.read_text() if cache.is_file() else ""
        ll = re.search(r"LLAMA_LLGUIDANCE:BOOL=(\w+)", text)
        engine = "llguidance" if ll and ll.group(1) == "ON" else "its own GBNF sampler (LLAMA_LLGUIDANCE off)"
        print(f"llama.cpp: {llama}, structured output through {engine}")
    tmp = Path(tempfile.mkdtemp(prefix="sg-structured-"))
    common = ["--raw", "--temperature", "0", "-t", str(a.threads), "--no-prompt-cache", "--no-log", "--json"]
    for model in models:
        sg = [a.bin, "-m", str(model)] + common
        res: dict[str, list[float]] = {}
        add = lambda k, v: res.setdefault(k, []).append(v)  # noqa: E731
        files = {}
        for key, text in PROMPTS.items():
            files[text] = tmp / f"{key}.txt"
            files[text].write_text(text)
        base = lambda prompt: [  # noqa: E731
            str(llama / "llama-completion"), "-m", str(model), "-f", str(files[prompt]), "-n", str(a.n),
            "--temp", "0", "-t", str(a.threads), "-no-cnv", "--no-display-prompt", "--no-warmup",
            "--color", "off", "--simple-io", "--ctx-size", "1024"] if llama else []
        for r in range(a.runs):
            for name, (schema, prompt) in SCHEMAS.items():
                schema = json.dumps(schema)
                for lookup, key in (("--lookup", name), ("--no-lookup", f"{name}_nolookup")):
                    _, out, _ = run(sg + ["-n", str(a.n), lookup, "--json-schema", schema, prompt], ok=(0, 1))
                    s = summary(out)
                    add(f"sg_{key}_tps", s["decode_tokens_per_second"])
                    add(f"sg_{key}_tokens", s["generated_tokens"])
                    add(f"sg_{key}_ttft", s["time_to_first_token_seconds"])
                    add(f"sg_{key}_complete", 1.0 if s.get("complete") else 0.0)
                    text = "".join(json.loads(l).get("text", "") for l in out.strip().splitlines()[:-1])
                    if s.get("complete"):
                        json.loads(text)  # the answer is JSON
                if llama:
                    _, _, err = run(base(prompt) + ["-j", schema])
                    tps, toks = llama_decode(err)
                    add(f"ll_{name}_tps", tps)
                    add(f"ll_{name}_tokens", toks)
            for key, prompt in PROMPTS.items():
                _, out, _ = run(sg + ["-n", str(a.n), "--ignore-eos", prompt])
                s = summary(out)
                add(f"sg_plain_{key}_tps", s["decode_tokens_per_second"])
                add(f"sg_plain_{key}_ttft", s["time_to_first_token_seconds"])
                if llama:
                    _, _, err = run(base(prompt) + ["--ignore-eos"])
                    add(f"ll_plain_{key}_tps", llama_decode(err)[0])
            print(f"  {model.name} run {r + 1}/{a.runs} done", flush=True)
        # --each-line, 32 lines, an instruct model's template (not raw).
        each = [a.bin, "-m", str(model), "--temperature", "0", "-t", str(a.threads), "--no-prompt-cache",
                "--no-log", "--each-line", "-n", "48", "Give the topic and the sentiment of:"]
        for r in range(a.runs):
            wall, out, _ = run(each + ["--json-schema", json.dumps(LINE_SCHEMA)], "\n".join(LINES) + "\n", ok=(0, 1))
            assert len(out.splitlines()) == len(LINES)
            add("each_schema_lps", len(LINES) / wall)
            wall, out, _ = run(each, "\n".join(LINES) + "\n")
            add("each_plain_lps", len(LINES) / wall)
        m = {k: med(v) for k, v in res.items()}
        print(f"\n{model.name}: {a.runs} runs, medians")
        for key in PROMPTS:
            print(f"  decode without a schema, prompt '{key}': streamgen {m[f'sg_plain_{key}_tps']:.1f} tok/s"
                  + (f", llama.cpp {m[f'll_plain_{key}_tps']:.1f} tok/s" if llama else ""))
        for name, (_, prompt) in SCHEMAS.items():
            key = next(k for k, p in PROMPTS.items() if p == prompt)
            plain, ttft = m[f"sg_plain_{key}_tps"], m[f"sg_plain_{key}_ttft"]
            print(f"  schema '{name}': streamgen {m[f'sg_{name}_tps']:.1f} tok/s ({m[f'sg_{name}_tokens']:.0f} tokens, "
                  f"complete in {sum(res[f'sg_{name}_complete']):.0f}/{a.runs}; "
                  f"{m[f'sg_{name}_tps'] / plain:.3f} of plain), with --no-lookup "
                  f"{m[f'sg_{name}_nolookup_tps']:.1f} tok/s; first token "
                  f"{m[f'sg_{name}_ttft']:.3f} s against {ttft:.3f} s without a schema "
                  f"(time to the first mask ~{m[f'sg_{name}_ttft'] - ttft:+.3f} s)")
            if llama:
                print(f"    llama.cpp under -j {m[f'll_{name}_tps']:.1f} tok/s ({m[f'll_{name}_tokens']:.0f} tokens; "
                      f"{m[f'll_{name}_tps'] / m[f'll_plain_{key}_tps']:.3f} of its plain); "
                      f"streamgen / llama.cpp {m[f'sg_{name}_tps'] / m[f'll_{name}_tps']:.2f}x")
        print(f"  --each-line, 32 lines: {m['each_schema_lps']:.2f} lines/s with --json-schema, "
              f"{m['each_plain_lps']:.2f} without ({m['each_schema_lps'] / m['each_plain_lps']:.3f})")


if __name__ == "__main__":
    main()
