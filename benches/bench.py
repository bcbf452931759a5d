#!/usr/bin/env python3
"""Benchmark streamgen on the test model, optionally side by side with llama.cpp.

Not part of the test suite; never runs in CI. Standard library only (Python 3.11+).
See benches/README.md. For each prompt size (7, 128 and 1,024 tokens by default) it measures,
over --runs runs, and prints medians:

  - whole-process time to the first byte on stdout: from spawning the process to the first
    byte of generated text read from an unbuffered pipe (model load + prompt + first token);
  - prefill and decode tokens/s over 128 greedy tokens, from the line `streamgen --stats`
    prints on stderr (when the binary has no --stats: decode from the arrival times of stdout
    chunks after the first byte, prefill not measured);
  - peak RSS of the child, from os.wait4's rusage (ru_maxrss).

With a llama.cpp build (LLAMA_CPP_BIN or --llama-bin: a directory holding llama-completion,
llama-bench and llama-tokenize) it runs llama.cpp on the same model, prompts and thread count
in the same run, interleaved with streamgen's runs, and prints the ratios streamgen/llama.cpp.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path.home() / ".cache" / "streamgen-test" / "gemma-3-270m-q4_k_m.gguf"
DEFAULT_BIN = REPO / "target" / "release" / "streamgen"

# Deterministic natural text (written for this benchmark). Each prompt is a prefix of it; the
# prefix lengths below were chosen with llama-tokenize (llama.cpp 0c1e570) on the test model so
# that the prompt is exactly that many tokens, counting the BOS token the model adds.
CORPUS = """The old lighthouse stood on a low island of grey rock at the mouth of the bay, and for more than a hundred years its lamp had turned through every night of the year. The keeper who lived there in the last decades before the light was automated kept a journal, and the journal survives. It is not a dramatic book. Most of its entries record the weather, the ships that passed, the oil and wicks that arrived with the supply boat, and the small repairs that a building in the sea demands without end. Yet read from beginning to end it tells a quiet story about patience, routine and the strange companionship of a place that is never quite still.

Each morning the keeper wrote down the direction of the wind, the height of the swell and the colour of the sky. He noted when the gulls came back in spring and when the seals hauled out on the southern ledge. In winter he recorded storms that lasted for days, when spray reached the gallery windows and the whole tower hummed like a struck bell. He wrote that the sound did not frighten him after the first year, because he had learned that the walls were thicker at the base than a man is tall, and that the builders had set the stones so that each course locked into the one below.

The lamp itself needed constant care. Before electricity reached the island, the light came from a wick burning paraffin inside a great lens of polished glass prisms. The lens gathered the weak flame and bent it into a narrow beam that could be seen from twenty miles away. Soot on the glass would dim the beam, so the keeper cleaned the prisms every day with soft cloths and spirit, working from the top of the lens to the bottom in the same order each time. The clockwork that turned the lens had to be wound by hand every few hours, and the journal shows that he rarely slept for more than four hours at a stretch during the dark months.

Ships depended on the rhythm of the light as much as on its brightness. Every lighthouse on the coast had its own pattern of flashes, so that a navigator who saw a light in the distance could count the seconds between flashes and know exactly which headland lay ahead. This one showed two white flashes every fifteen seconds. When the clockwork failed one January night, the keeper turned the lens by hand for six hours until dawn, counting aloud to keep the timing true. His entry for that night is only three lines long and ends with a note that his arms were tired and that the fishing fleet had come home safely.

Supplies arrived by boat once a fortnight when the sea allowed it, and sometimes it did not allow it for a month or more. The keeper kept a garden in a walled yard behind the cottage, where he grew potatoes, cabbages, onions and a few hardy herbs in soil that earlier keepers had carried over from the mainland in sacks. He caught fish from the rocks and traded eggs from his hens with the crews of passing boats. In one long entry he describes the pleasure of the first new potatoes of the summer, boiled with salt and eaten with butter on the step of the cottage while the evening light turned the water gold.

Visitors were rare but not unknown. Inspectors came once a year to check the lamp, the stores and the logbooks, and they often stayed for a night when the weather turned. Scientists came to measure the tides and to count the birds that nested on the cliffs. Once a painter spent three weeks on the island, and the keeper wrote with some surprise that he had enjoyed the company more than he expected, although the painter talked a great deal and never learned to close the door against the wind.

Over the years the journal records changes that reached even this remote place. A radio arrived, and with it weather forecasts and news from the wider world. Then came a diesel generator and electric light, which ended the long nights of winding and trimming but brought a new noise and a new kind of maintenance. The keeper wrote that he missed the soft yellow flame, but that he did not miss carrying cans of paraffin up one hundred and twelve steps.

In the final year the authorities announced that the light would run itself, watched by sensors and checked by a technician who would visit by helicopter. The keeper's last entries are calm. He lists the tools he is leaving behind and where each one is kept, so that whoever comes next will find them. He thanks the island, in a sentence that seems almost embarrassed to be written down, for keeping him company. On the last page he records the wind, the swell and the colour of the sky, exactly as he had done on the first day, and then he closes the book.

The lighthouse still stands, and the light still turns. People who read the journal today often say that they expected loneliness and found contentment instead. The keeper did not describe his life as heroic or sad. He described it as work that needed doing, done carefully, in a place he had come to love.

Visitors who climb the tower on open days can still see the brass fittings he polished, the worn treads of the stair and the small desk by the window where he wrote, and many of them stand there longer than they meant to."""

# prompt tokens (with BOS) -> characters of CORPUS for the Gemma test model; other models' prefix
# lengths are found by counting tokens (see prompt_chars). 256 is the prefill target size.
PROMPT_CHARS = {7: 29, 128: 617, 256: 1229, 1024: 4982}


def prompt_chars(a: argparse.Namespace, size: int) -> int:
    """The longest prefix of CORPUS (at a word boundary) that is at most `size` tokens for the
    model, counted by llama-tokenize when given, else by streamgen itself (--verbose-prompt)."""
    if a.model.resolve() == DEFAULT_MODEL.resolve():
        return PROMPT_CHARS[size]
    ends = [i for i, c in enumerate(CORPUS) if c == " "] + [len(CORPUS)]
    lo, hi = 0, len(ends) - 1
    while lo < hi:  # the largest end whose prefix has at most `size` tokens
        mid = (lo + hi + 1) // 2
        n = count_tokens(a, CORPUS[: ends[mid]]) or streamgen_count_tokens(a, CORPUS[: ends[mid]])
        if n <= size:
            lo = mid
        else:
            hi = mid - 1
    return ends[lo]


def streamgen_count_tokens(a: argparse.Namespace, text: str) -> int:
    """Prompt tokens as streamgen counts them (with BOS where the model adds one)."""
    argv = [str(a.bin), "-m", str(a.model), "--raw", "--verbose-prompt", "-n", "1", "--temperature", "0", text]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    m = re.search(r"prompt token ids \((\d+)\)", proc.stderr)
    if not m:
        raise RuntimeError(f"cannot count tokens with streamgen: {proc.stderr.strip()[-300:]}")
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------
# Running one process


@dataclass
class Run:
    """One process run: what it printed and when, and what it cost."""

    ttfb: float  # seconds from spawn to the first byte of generated text
    total: float  # seconds from spawn to exit
    maxrss: int  # bytes
    chunks: list[tuple[float, int]]  # (seconds since spawn, bytes) per read of stdout
    stdout: bytes
    stderr: str
    stats: dict = field(default_factory=dict)  # parsed timings; str "finish" for streamgen

    def stream_decode_tps(self, n_generated: int) -> float | None:
        """Decode tokens/s seen on stdout: the tokens after the first over the time from the first
        byte to the last. Only the end points count, so reads that merge tokens do not matter."""
        if len(self.chunks) < 2 or n_generated < 2:
            return None
        span = self.chunks[-1][0] - self.ttfb
        return (n_generated - 1) / span if span > 0 else None


def run_process(argv: list[str], timeout: float, skip_prefix: bytes = b"") -> Run:
    """Spawns argv with stdout on an unbuffered pipe and stderr in a file; times the first byte
    of stdout that comes after `skip_prefix` (a prompt echo), if stdout starts with it."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, bufsize=0)
        fd = proc.stdout.fileno()
        chunks: list[tuple[float, int]] = []
        data = bytearray()
        deadline = t0 + timeout
        timed_out = False
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                timed_out = True
                proc.kill()
                break
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            buf = os.read(fd, 1 << 16)
            now = time.perf_counter()
            if not buf:
                break
            chunks.append((now - t0, len(buf)))
            data += buf
        # Reap the child ourselves to get its rusage; tell Popen it is gone.
        _, status, rusage = os.wait4(proc.pid, 0)
        total = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    if timed_out:
        raise Timeout(f"{Path(argv[0]).name} took longer than {timeout:.0f} s (--timeout); killed it")
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        raise BenchError(f"{' '.join(argv[:3])} ... exited with {proc.returncode}:\n{tail}")
    if not chunks:
        raise BenchError(f"{Path(argv[0]).name} printed nothing on stdout")
    # The first byte after the echo: the chunk holding byte len(skip_prefix).
    start = len(skip_prefix) if skip_prefix and bytes(data).startswith(skip_prefix) else 0
    if start >= len(data):
        raise BenchError(f"{Path(argv[0]).name} printed only its prompt")
    seen = 0
    ttfb = chunks[0][0]
    for t, n in chunks:
        if seen + n > start:
            ttfb = t
            break
        seen += n
    # ru_maxrss is in KiB on Linux.
    return Run(ttfb, total, rusage.ru_maxrss * 1024, chunks, bytes(data), stderr)


class BenchError(Exception):
    pass


class Timeout(BenchError):
    """One run hung or crawled (a loaded machine): skipped, not fatal."""


# ---------------------------------------------------------------------------------------------
# streamgen


STATS_RES = {
    "prompt_tokens": r"prompt\D{0,3}(\d+)\s*tok",
    "prefill_tps": r"prompt[^;\n]*?([\d.]+)\s*tok(?:ens)?/s",
    "gen_tokens": r"generated\D{0,3}(\d+)\s*tok",
    "decode_tps": r"generated[^;\n]*?([\d.]+)\s*tok(?:ens)?/s",
    "first_token_s": r"first[ _-]token\D{0,3}([\d.]+)\s*(m?s)",
    "load_s": r"load\D{0,3}([\d.]+)\s*(m?s)",
}


def parse_stats(stderr: str) -> dict:
    """Reads `--stats` leniently: the last stderr line naming both `prompt` and `generated`,
    e.g. `prompt 7 tokens, 512.3 tok/s; generated 128 tokens, 41.2 tok/s; first token 0.31 s;
    load 0.12 s`. Missing fields are left out."""
    lines = [l for l in stderr.splitlines() if "prompt" in l.lower() and "generated" in l.lower()]
    if not lines:
        return {}
    line = lines[-1].lower()
    out: dict = {}
    for key, pattern in STATS_RES.items():
        m = re.search(pattern, line)
        if not m:
            continue
        value = float(m.group(1))
        if m.lastindex and m.lastindex >= 2 and m.group(2) == "ms":
            value /= 1000
        out[key] = value
    if m := re.search(r"finish\W{0,3}([a-z_]+)", line):
        out["finish"] = m.group(1)
    return out


def streamgen_has_stats(binary: Path) -> bool:
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30).stdout
    return "--stats" in help_text


def streamgen_argv(a: argparse.Namespace, prompt: str, n: int, stats: bool) -> list[str]:
    argv = [str(a.bin), "-m", str(a.model), "--raw", "--temperature", "0", "-n", str(n)]
    argv += ["--threads", str(a.threads)]
    if stats:
        argv.append("--stats")
    if stats and a.no_prompt_cache:
        # Every run computes its whole prompt, as llama.cpp's do: the prompt cache (on by default
        # since issue 29) would serve the repeated prompts from disk.
        argv.append("--no-prompt-cache")
    if a.no_lookup:
        # Plain decoding, as llama-bench's tg runs: prompt lookup (on by default when greedy)
        # would copy from prompts that repeat themselves.
        argv.append("--no-lookup")
    return argv + [prompt]


# ---------------------------------------------------------------------------------------------
# llama.cpp


def llama_completion_argv(a: argparse.Namespace, prompt_file: Path, n: int, n_prompt: int) -> list[str]:
    argv = [str(a.llama_bin / "llama-completion"), "-m", str(a.model), "-f", str(prompt_file)]
    argv += ["-n", str(n), "--temp", "0", "-t", str(a.threads), "-no-cnv", "--no-display-prompt"]
    argv += ["--color", "off", "--simple-io"]
    if not a.llama_warmup:
        argv.append("--no-warmup")
    if not a.llama_full_ctx:
        # Like llama-simple: a context just big enough for prompt + answer (llama.cpp rounds it up
        # to a multiple of 256), rather than the model's 32k, which costs RSS for nothing here.
        argv += ["--ctx-size", str(n_prompt + n)]
    return argv


def parse_llama_perf(stderr: str) -> dict[str, float]:
    """llama-completion's own timings (common_perf_print lines) on stderr."""
    out: dict[str, float] = {}
    m = re.search(r"load time\s*=\s*([\d.]+)\s*ms", stderr)
    if m:
        out["load_s"] = float(m.group(1)) / 1000
    m = re.search(r"prompt eval time\s*=.*?/\s*(\d+)\s*tokens.*?([\d.]+)\s*tokens per second", stderr)
    if m:
        out["prompt_tokens"], out["prefill_tps"] = float(m.group(1)), float(m.group(2))
    m = re.search(r"\n[^\n]*?\beval time\s*=.*?/\s*(\d+)\s*runs.*?([\d.]+)\s*tokens per second", stderr)
    if m:
        # `runs` are decode steps after the first token, which came from the prompt pass.
        out["gen_tokens"], out["decode_tps"] = float(m.group(1)) + 1, float(m.group(2))
    return out


def llama_bench(a: argparse.Namespace, sizes: list[int], n: int) -> dict[str, float]:
    """Median prefill tok/s per prompt size and median decode tok/s from llama-bench."""
    argv = [str(a.llama_bin / "llama-bench"), "-m", str(a.model), "-p", ",".join(map(str, sizes))]
    argv += ["-n", str(n), "-t", str(a.threads), "-r", str(a.runs), "-o", "json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=a.timeout * (len(sizes) + 1) * a.runs)
    if proc.returncode != 0:
        raise BenchError(f"llama-bench exited with {proc.returncode}:\n{proc.stderr[-500:]}")
    out: dict[str, float] = {}
    for test in json.loads(proc.stdout):
        tps = statistics.median(test["samples_ts"])
        if test["n_gen"] == 0:
            out[f"pp{test['n_prompt']}"] = tps
        elif test["n_prompt"] == 0:
            out[f"tg{test['n_gen']}"] = tps
    # Decode after each prompt size's context (`-d`, llama-bench's depth: the context is filled
    # untimed first), which is what streamgen's decode after the prompt is measured on.
    argv = [str(a.llama_bin / "llama-bench"), "-m", str(a.model), "-p", "0", "-n", str(n),
            "-d", ",".join(map(str, sizes)), "-t", str(a.threads), "-r", str(a.runs), "-o", "json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=a.timeout * (len(sizes) + 1) * a.runs)
    if proc.returncode != 0:
        raise BenchError(f"llama-bench -d exited with {proc.returncode}:\n{proc.stderr[-500:]}")
    for test in json.loads(proc.stdout):
        out[f"tg{test['n_gen']}@d{test.get('n_depth', 0)}"] = statistics.median(test["samples_ts"])
    return out


def llama_version(a: argparse.Namespace) -> str:
    proc = subprocess.run([str(a.llama_bin / "llama-bench"), "--version"], capture_output=True, text=True)
    m = re.search(r"commit (\w+)", proc.stdout + proc.stderr)
    return m.group(1) if m else "unknown"


def count_tokens(a: argparse.Namespace, text: str) -> int | None:
    """Tokens in `text` with BOS, by llama-tokenize, when a llama.cpp build is given."""
    if not a.llama_bin or not (a.llama_bin / "llama-tokenize").exists():
        return None
    argv = [str(a.llama_bin / "llama-tokenize"), "-m", str(a.model), "--stdin", "--ids", "--log-disable"]
    proc = subprocess.run(argv, input=text.encode(), capture_output=True, timeout=60)
    lines = proc.stdout.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        return None
    return len(json.loads(lines[-1]))


# ---------------------------------------------------------------------------------------------
# Reporting


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *map(line, rows)])


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def git_rev() -> str:
    proc = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF file [default: %(default)s]")
    p.add_argument("--bin", type=Path, default=DEFAULT_BIN, help="streamgen binary [default: %(default)s]")
    p.add_argument("--runs", type=int, default=5, help="runs per case; medians are printed [default: 5]")
    p.add_argument("--sizes", default="7,128,1024", help="prompt sizes in tokens, from 7,128,256,1024 [default: %(default)s]")
    p.add_argument("-n", "--tokens", type=int, default=128, help="tokens to generate [default: 128]")
    p.add_argument("--threads", type=int, default=2, help="threads for both programs [default: 2]")
    p.add_argument("--llama-bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"),
                   help="llama.cpp bin directory [default: $LLAMA_CPP_BIN; none: streamgen only]")
    p.add_argument("--llama-warmup", action="store_true",
                   help="let llama-completion do its warm-up decode (default: --no-warmup, its fastest first token)")
    p.add_argument("--llama-full-ctx", action="store_true",
                   help="give llama-completion the model's full context (default: prompt + tokens, as llama-simple does)")
    p.add_argument("--no-lookup", action="store_true",
                   help="pass --no-lookup to streamgen: plain decode, as llama-bench's tg128 (by default "
                        "greedy streamgen speculates from the prompt)")
    p.add_argument("--timeout", type=float, default=120, help="seconds allowed per process [default: 120]")
    p.add_argument("--json", type=Path, help="also write every sample to this file")
    a = p.parse_args()
    help_text = subprocess.run([a.bin, "--help"], capture_output=True, text=True, timeout=30).stdout
    a.no_prompt_cache = "--no-prompt-cache" in help_text
    try:
        a.sizes = [int(s) for s in a.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes: not a list of numbers: {a.sizes}")
    if bad := [s for s in a.sizes if s not in PROMPT_CHARS]:
        p.error(f"--sizes: no prompt of {bad} tokens; choose from {sorted(PROMPT_CHARS)}")
    if a.runs < 1:
        p.error("--runs must be at least 1")
    if not a.model.is_file():
        p.error(f"no model at {a.model}: run tests/fetch-model.sh (it prints the path) or pass --model")
    if not a.bin.is_file():
        p.error(f"no streamgen binary at {a.bin}: run `cargo build --release` or pass --bin")
    if a.llama_bin is not None:
        a.llama_bin = Path(a.llama_bin)
        missing = [t for t in ("llama-completion", "llama-bench") if not (a.llama_bin / t).is_file()]
        if missing:
            p.error(f"llama.cpp build {a.llama_bin} lacks {', '.join(missing)} (see benches/README.md)")
    return a


def main() -> int:
    a = parse_args()
    work = Path(tempfile.mkdtemp(prefix="streamgen-bench-"))
    try:
        # Run a private copy: a `cargo build` during the benchmark must not swap the binary mid-run.
        original = a.bin
        a.bin = Path(shutil.copy2(a.bin, work / "streamgen"))
        return run_benchmark(a, original, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_benchmark(a: argparse.Namespace, original: Path, work: Path) -> int:
    n = a.tokens
    stats = streamgen_has_stats(a.bin)
    model_size = a.model.stat().st_size
    llama = a.llama_bin is not None
    load_start = loadavg()
    t_start = time.perf_counter()

    digest = hashlib.sha256(a.bin.read_bytes()).hexdigest()[:12]
    built = time.strftime("%Y-%m-%d %H:%M", time.localtime(a.bin.stat().st_mtime))
    print(f"streamgen benchmark: {original} (sha256 {digest}, built {built}; repo {git_rev()})")
    print(f"model {a.model} ({model_size / 2**20:.1f} MiB); greedy, {n} tokens, {a.threads} threads; "
          f"{a.runs} runs per case, medians")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; load average at start {load_start}")
    if llama:
        print(f"llama.cpp {llama_version(a)} from {a.llama_bin}")
    sys.stdout.flush()

    prompts = {s: CORPUS[: prompt_chars(a, s)] for s in a.sizes}
    counted = {s: count_tokens(a, prompts[s]) for s in a.sizes}

    files = {}
    for s in a.sizes:
        files[s] = work / f"prompt-{s}.txt"
        files[s].write_text(prompts[s])

    # One untimed run of each program first, so every timed run finds the model in the page cache.
    run_process(streamgen_argv(a, prompts[a.sizes[0]], 1, False), a.timeout)
    if llama:
        run_process(llama_completion_argv(a, files[a.sizes[0]], 1, a.sizes[0]), a.timeout)

    samples: dict[int, dict[str, list[Run]]] = {s: {"streamgen": [], "llama": []} for s in a.sizes}
    timeouts: list[str] = []
    for s in a.sizes:
        for i in range(a.runs):
            # Interleaved, so that a change in the machine's load hits both programs alike.
            jobs = [("streamgen", streamgen_argv(a, prompts[s], n, stats), b"",
                     parse_stats if stats else lambda _: {})]
            if llama:
                jobs.append(("llama", llama_completion_argv(a, files[s], n, s), prompts[s].encode(), parse_llama_perf))
            for tool, argv, echo, parse in jobs:
                try:
                    r = run_process(argv, a.timeout, echo)
                except Timeout as e:
                    print(f"  warning: {e}; this run is left out", file=sys.stderr, flush=True)
                    timeouts.append(f"{tool} {s}")
                    continue
                r.stats = parse(r.stderr)
                samples[s][tool].append(r)
            print(f"  {s}-token prompt, run {i + 1}/{a.runs} done ({time.perf_counter() - t_start:.0f} s)",
                  file=sys.stderr, flush=True)
    if llama:
        print("  llama-bench ...", file=sys.stderr, flush=True)
    bench = llama_bench(a, a.sizes, n) if llama else {}

    # Medians per case.
    res: dict[int, dict[str, float | None]] = {}
    for s in a.sizes:
        sg, ll = samples[s]["streamgen"], samples[s]["llama"]
        sg_gen = [r.stats.get("gen_tokens", n) for r in sg]
        row: dict[str, float | None] = {
            "sg_ttfb": med([r.ttfb for r in sg]),
            "sg_prefill": med([r.stats.get("prefill_tps") for r in sg]),
            "sg_decode": med([r.stats.get("decode_tps") for r in sg]),
            "sg_stream_decode": med([r.stream_decode_tps(int(g)) for r, g in zip(sg, sg_gen)]),
            "sg_rss": med([r.maxrss for r in sg]),
            "sg_prompt_tokens": med([r.stats.get("prompt_tokens") for r in sg]),
            "sg_gen_tokens": med([r.stats.get("gen_tokens") for r in sg]),
            "sg_first_token_s": med([r.stats.get("first_token_s") for r in sg]),
            "sg_load_s": med([r.stats.get("load_s") for r in sg]),
            "sg_total": med([r.total for r in sg]),
        }
        if row["sg_decode"] is None:
            row["sg_decode"] = row["sg_stream_decode"]
        if llama:
            ll_gen = [r.stats.get("gen_tokens", n) for r in ll]
            row |= {
                "ll_ttfb": med([r.ttfb for r in ll]),
                "ll_prefill": bench.get(f"pp{s}"),
                "ll_decode": bench.get(f"tg{n}@d{s}"),
                "ll_decode_empty": bench.get(f"tg{n}"),
                "ll_rss": med([r.maxrss for r in ll]),
                "ll_cli_prefill": med([r.stats.get("prefill_tps") for r in ll]),
                "ll_cli_decode": med([r.stats.get("decode_tps") for r in ll]),
                "ll_stream_decode": med([r.stream_decode_tps(int(g)) for r, g in zip(ll, ll_gen)]),
                "ll_prompt_tokens": med([r.stats.get("prompt_tokens") for r in ll]),
                "ll_gen_tokens": med([r.stats.get("gen_tokens") for r in ll]),
                "ll_load_s": med([r.stats.get("load_s") for r in ll]),
                "ll_total": med([r.total for r in ll]),
            }
        res[s] = row

    mib = lambda b: None if b is None else b / 2**20
    print()
    print("Prompt sizes (tokens, with BOS): " + "; ".join(
        f"{s}: llama-tokenize {fmt(counted[s], 'd') if counted[s] else '-'}, "
        f"streamgen --stats {fmt(res[s]['sg_prompt_tokens'], '.0f')}"
        + (f", llama-completion {fmt(res[s].get('ll_prompt_tokens'), '.0f')}" if llama else "")
        for s in a.sizes))
    for s in a.sizes:
        seen = {counted[s], res[s]["sg_prompt_tokens"], res[s].get("ll_prompt_tokens")} - {None}
        if seen - {s}:
            print(f"warning: the {s}-token prompt was counted as {sorted(int(x) for x in seen)} tokens; the labels use {s}")
        gens = [r.stats.get("gen_tokens") for tool in samples[s].values() for r in tool]
        if any(g is not None and g != n for g in gens):
            print(f"warning: with the {s}-token prompt some runs generated {sorted({int(g) for g in gens if g})} "
                  f"tokens, not {n} (finish: {sorted({r.stats.get('finish', '?') for r in samples[s]['streamgen']})})")
    print()
    decode_note = "" if stats else " (~ from stdout timing: no --stats)"
    if llama:
        headers = ["prompt", "TTFB s sg", "llama", "ratio", "prefill tok/s sg", "llama", "ratio",
                   "decode tok/s sg", "llama", "ratio", "peak RSS MiB sg", "llama", "ratio", "RSS/model"]
        rows = []
        for s in a.sizes:
            r = res[s]
            rows.append([
                str(s),
                fmt(r["sg_ttfb"], ".3f"), fmt(r["ll_ttfb"], ".3f"), fmt(ratio(r["sg_ttfb"], r["ll_ttfb"]), ".2f"),
                fmt(r["sg_prefill"], ".1f"), fmt(r["ll_prefill"], ".1f"), fmt(ratio(r["sg_prefill"], r["ll_prefill"]), ".2f"),
                fmt(r["sg_decode"], ".1f"), fmt(r["ll_decode"], ".1f"), fmt(ratio(r["sg_decode"], r["ll_decode"]), ".2f"),
                fmt(mib(r["sg_rss"]), ".0f"), fmt(mib(r["ll_rss"]), ".0f"), fmt(ratio(r["sg_rss"], r["ll_rss"]), ".2f"),
                fmt(ratio(r["sg_rss"], model_size), ".2f"),
            ])
        print(f"streamgen (sg) vs llama.cpp, medians; ratio = sg/llama{decode_note}")
        print(table(headers, rows))
    else:
        headers = ["prompt", "TTFB s", "prefill tok/s", "decode tok/s", "peak RSS MiB", "RSS/model"]
        rows = [[str(s), fmt(res[s]["sg_ttfb"], ".3f"), fmt(res[s]["sg_prefill"], ".1f"),
                 fmt(res[s]["sg_decode"], ".1f"), fmt(mib(res[s]["sg_rss"]), ".0f"),
                 fmt(ratio(res[s]["sg_rss"], model_size), ".2f")] for s in a.sizes]
        print(f"streamgen, medians{decode_note}")
        print(table(headers, rows))

    # The parts behind the headline figures.
    print()
    headers = ["prompt", "sg load s", "sg first token s", "sg total s", "sg tokens", "sg decode (stdout)"]
    if llama:
        headers += ["llama load s", "llama total s", "llama tokens", "llama-completion prefill", "decode",
                    "decode (stdout)", f"llama-bench tg{n} (empty context)"]
    rows = []
    for s in a.sizes:
        r = res[s]
        row = [str(s), fmt(r["sg_load_s"], ".3f"), fmt(r["sg_first_token_s"], ".3f"), fmt(r["sg_total"], ".2f"),
               fmt(r["sg_gen_tokens"], ".0f"), fmt(r["sg_stream_decode"], ".1f")]
        if llama:
            row += [fmt(r["ll_load_s"], ".3f"), fmt(r["ll_total"], ".2f"), fmt(r["ll_gen_tokens"], ".0f"),
                    fmt(r["ll_cli_prefill"], ".1f"), fmt(r["ll_cli_decode"], ".1f"), fmt(r["ll_stream_decode"], ".1f"),
                    fmt(r["ll_decode_empty"], ".1f")]
        rows.append(row)
    print("Details, medians (tok/s unless marked s)")
    print(table(headers, rows))

    print()
    print("How: TTFB = spawn to first byte read from the child's unbuffered stdout pipe, on a warm page "
          "cache. Peak RSS = ru_maxrss from os.wait4 (includes mapped model pages that were touched).")
    print(f"streamgen: --raw --temperature 0 -n {n} --threads {a.threads}" + (" --no-lookup" if a.no_lookup else "")
          + (" --stats; prefill/decode from its --stats line." if stats else
             "; no --stats in this binary: prefill not measured, decode = (tokens - 1) / (last byte - first byte)"
             f" on stdout, assuming all {n} tokens were generated."))
    if llama:
        print(f"llama.cpp TTFB and RSS: llama-completion -no-cnv --no-display-prompt --temp 0 -t {a.threads} "
              f"-n {n} -f PROMPT" + ("" if a.llama_warmup else " --no-warmup")
              + ("" if a.llama_full_ctx else " -c PROMPT+N")
              + "; with --no-display-prompt it echoes no prompt, and the script would time the first byte "
              "after an echo if one appeared.")
        print(f"llama.cpp prefill/decode: llama-bench -p {','.join(map(str, a.sizes))} -n {n} -t {a.threads} "
              f"-r {a.runs}, and -p 0 -n {n} -d {','.join(map(str, a.sizes))} (medians of its samples; its decode "
              f"is tg{n} after a context of the prompt's size, as streamgen's follows the prompt; tg{n} from an "
              "empty context is in the details).")
    if timeouts:
        print(f"Left out after --timeout {a.timeout:.0f} s: " + ", ".join(f"{t}-token prompt" for t in timeouts))
    print(f"Load average at end {loadavg()} (start {load_start}); wall time {time.perf_counter() - t_start:.0f} s.")

    if a.json:
        dump = {
            "model": str(a.model), "model_size": model_size, "bin": str(original), "bin_sha256": digest, "runs": a.runs, "tokens": n,
            "threads": a.threads, "load_start": load_start, "load_end": loadavg(), "llama_bench": bench,
            "medians": res,
            "samples": {str(s): {tool: [{"ttfb": r.ttfb, "total": r.total, "maxrss": r.maxrss, "stats": r.stats}
                                        for r in runs] for tool, runs in samples[s].items()} for s in a.sizes},
        }
        a.json.write_text(json.dumps(dump, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
