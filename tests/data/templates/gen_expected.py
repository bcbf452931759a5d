#!/usr/bin/env python3
"""Writes expected.json: what Python's jinja2 renders for each template here, set up the way
transformers' apply_chat_template sets it up (ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, loopcontrols, raise_exception, strftime_now, tojson with ensure_ascii=False,
and the variables messages/tools/documents/add_generation_prompt/bos_token/eos_token), and
enable_thinking only where a case sets it (streamgen's --no-think; transformers passes nothing
unless asked, so Qwen3 thinks by default). strftime_now is fixed at 2024-07-26 12:00 UTC, as the
Rust tests fix it.

A system prompt goes in a system message; when the template raises or drops it, it is folded
into the user turn as "{system}\n\n{user}" (streamgen's rule, stated independently here).

Run: python3 tests/data/templates/gen_expected.py   (needs jinja2 >= 3.1)
"""
import json
import os
from datetime import datetime, timezone

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))
# The built-in templates' only copy (streamgen includes these files), by built-in name.
BUILTINS = os.path.join(HERE, "..", "..", "..", "src", "chat", "templates")
BUILTIN_FILES = {"gemma": "gemma3.jinja", "chatml": "chatml.jinja", "llama3": "llama3.jinja"}
FIXED = datetime(2024, 7, 26, 12, 0, 0, tzinfo=timezone.utc)

# (file, built-in name or None, bos_token, eos_token), tokens as each model's GGUF names them.
# A built-in's file is its llama.cpp name, kept in expected.json; it is read from BUILTINS.
TEMPLATES = [
    ("google-gemma-3-it.jinja", "gemma", "<bos>", "<eos>"),
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "chatml", "<|endoftext|>", "<|im_end|>"),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", "llama3", "<|begin_of_text|>", "<|eot_id|>"),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", None, "<|begin_of_text|>", "<|eot_id|>"),
    ("meta-llama-Llama-3.3-70B-Instruct.jinja", None, "<|begin_of_text|>", "<|eot_id|>"),
    ("google-gemma-2-2b-it.jinja", None, "<bos>", "<eos>"),
    ("Qwen-Qwen3-0.6B.jinja", None, "<|endoftext|>", "<|im_end|>"),
    ("microsoft-Phi-3.5-mini-instruct.jinja", None, "<s>", "<|endoftext|>"),
    ("ibm-granite-granite-3.3-2B-Instruct.jinja", None, "<|end_of_text|>", "<|end_of_text|>"),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", None, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ("Qwen-QwQ-32B.jinja", None, "<|endoftext|>", "<|im_end|>"),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", None, "<s>", "</s>"),
]

INPUTS = [
    ("user only", None, "What is the weather today?"),
    ("system and user", "You are a terse assistant. Answer in one word.", "What is 2+2?"),
    ("multi-line user", None, "  First line\nSecond line: café ☕\n\n\tindented third\n"),
]


def environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: FIXED.strftime(fmt)
    return env


# Templates also rendered with enable_thinking=False.
THINKING_SWITCH = ["Qwen-Qwen3-0.6B.jinja"]


def render(template, messages, bos, eos, thinking):
    extra = {} if thinking is None else {"enable_thinking": thinking}
    return template.render(messages=messages, tools=None, documents=None,
                           add_generation_prompt=True, bos_token=bos, eos_token=eos, **extra)


def render_prompt(template, system, user, bos, eos, thinking):
    alone = render(template, [{"role": "user", "content": user}], bos, eos, thinking)
    if system is None:
        return alone, False
    try:
        out = render(template, [{"role": "system", "content": system},
                                {"role": "user", "content": user}], bos, eos, thinking)
        if system.strip() in out and out != alone:
            return out, False
    except jinja2.exceptions.TemplateError:
        pass
    folded = [{"role": "user", "content": f"{system}\n\n{user}"}]
    return render(template, folded, bos, eos, thinking), True


def main():
    env = environment()
    cases = []
    for file, builtin, bos, eos in TEMPLATES:
        path = os.path.join(BUILTINS, BUILTIN_FILES[builtin]) if builtin else os.path.join(HERE, file)
        with open(path, encoding="utf-8") as f:
            template = env.from_string(f.read())
        for thinking in [None] + ([False] if file in THINKING_SWITCH else []):
            for label, system, user in INPUTS:
                expected, folded = render_prompt(template, system, user, bos, eos, thinking)
                cases.append({"template": file, "builtin": builtin, "input": label,
                              "bos_token": bos, "eos_token": eos, "system": system, "user": user,
                              "enable_thinking": thinking, "folded": folded,
                              "expected": expected})
    out = {"jinja2_version": jinja2.__version__,
           "fixed_time_unix": int(FIXED.timestamp()), "cases": cases}
    with open(os.path.join(HERE, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
