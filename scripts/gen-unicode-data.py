#!/usr/bin/env python3
"""Generates src/tokenizer/unicode_data.rs from llama.cpp's src/unicode-data.cpp.

The pre-tokenizers must classify code points exactly as llama.cpp does, so the table is taken
from llama.cpp's own generated file (itself made by its scripts/gen-unicode-data.py from
Python's unicodedata of the Unicode version it was run with) rather than from Python's or
Rust's tables, which may follow another Unicode version.

Usage: scripts/gen-unicode-data.py LLAMA_CPP/src/unicode-data.cpp [LLAMA_CPP_COMMIT] > src/tokenizer/unicode_data.rs
"""

import re
import sys

WHITESPACE = 0x0100


def main() -> None:
    src = open(sys.argv[1], encoding="utf-8").read()
    ranges_text = src.split("unicode_ranges_flags = {", 1)[1].split("};", 1)[0]
    ranges = [(int(a, 16), int(b, 16)) for a, b in re.findall(r"\{0x([0-9A-Fa-f]+), 0x([0-9A-Fa-f]+)\}", ranges_text)]
    assert ranges[0][0] == 0 and ranges[-1][0] == 0x110000, "unexpected range table bounds"
    ws_text = src.split("unicode_set_whitespace = {", 1)[1].split("}", 1)[0]
    whitespace = sorted(int(x, 16) for x in re.findall(r"0x([0-9A-Fa-f]+)", ws_text))

    # The contraction rules lower-case one character with llama.cpp's unicode_tolower; check
    # that only ASCII letters lower-case to the letters they test, so ASCII lowering is exact.
    lower_text = src.split("unicode_map_lowercase = {", 1)[1].split("};", 1)[0]
    for a, b in re.findall(r"\{0x([0-9A-Fa-f]+), 0x([0-9A-Fa-f]+)\}", lower_text):
        if chr(int(b, 16)) in "stmdrevl":
            assert int(a, 16) < 128, f"U+{a} lower-cases to {chr(int(b, 16))}"

    # Fold the whitespace set into the ranges: split ranges at each whitespace code point.
    points = {}
    for i in range(len(ranges) - 1):
        points[ranges[i][0]] = ranges[i][1]
    flags_at = lambda cpt: next(f for s, f in reversed(ranges) if s <= cpt)
    for cpt in whitespace:
        points[cpt] = flags_at(cpt) | WHITESPACE
        if cpt + 1 not in points:
            points[cpt + 1] = flags_at(cpt + 1)
    merged = []
    for start in sorted(points):
        if merged and merged[-1][1] == points[start]:
            continue
        merged.append((start, points[start]))

    commit = sys.argv[2] if len(sys.argv) > 2 else ""
    out = []
    out.append("//! Code point classes as llama.cpp's `unicode_cpt_flags_from_cpt` (generated, do not edit).")
    out.append("//!")
    out.append(f"//! Made by `scripts/gen-unicode-data.py` from llama.cpp's `src/unicode-data.cpp`{' (' + commit + ')' if commit else ''}:")
    out.append("//! its `unicode_ranges_flags` with its `unicode_set_whitespace` folded in as bit 0x0100.")
    out.append("")
    out.append("/// `(first code point, flags)`: the flags hold up to the next entry's first code point.")
    out.append("/// Flag bits are llama.cpp's: 0x01 undefined, 0x02 number, 0x04 letter, 0x08 separator,")
    out.append("/// 0x10 mark, 0x20 punctuation, 0x40 symbol, 0x80 control, 0x0100 whitespace.")
    out.append(f"pub(super) static RANGES: [(u32, u16); {len(merged)}] = [")
    line = "   "
    for start, flags in merged:
        item = f" (0x{start:X}, 0x{flags:X}),"
        if len(line) + len(item) > 100:
            out.append(line)
            line = "   "
        line += item
    out.append(line)
    out.append("];")
    out.append("")
    out.append("/// The flags of the ASCII range, for a lookup without a search (most text is mostly ASCII).")
    out.append("pub(super) static ASCII: [u16; 128] = [")
    ascii = [next(f for s, f in reversed(merged) if s <= c) for c in range(128)]
    for i in range(0, 128, 16):
        out.append("    " + " ".join(f"0x{f:X}," for f in ascii[i:i + 16]))
    out.append("];")
    print("\n".join(out))


if __name__ == "__main__":
    main()
