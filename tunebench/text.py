"""The one place that turns tunebench's values into text: configs, trial counts, durations, speedups, tables and JSON.

`tunebench show`, `report`, `tune`, `check` and `bench` all print through these, so a config or a count reads the same
everywhere. Imports nothing heavy (no torch), so the commands that only list rows stay fast.
"""
from __future__ import annotations

import json
import math
import re
import sys
from datetime import timedelta

MAX_JSON_CHARS = 64 * 1024      # a config, shape or record read from a database or a file: far more than any needs
MAX_JSON_DEPTH = 32             # nesting; Python's json recurses once per level, and a deep value ends in RecursionError
CLIP_CHARS = 200                # of an untrusted value quoted in a message


# -- untrusted text in: JSON bounded before parsing


def loads_bounded(text, what: str = "JSON"):
    """json.loads(text) of text no one vouches for (a database row, a file, an argument): ValueError, before any
    parsing, when it is longer than MAX_JSON_CHARS or nests deeper than MAX_JSON_DEPTH, so that a hostile value costs
    a scan, not a RecursionError or the memory of a huge object. ``what`` names it in the message."""
    if not isinstance(text, (str, bytes, bytearray)):
        raise TypeError(f"{what} must be text, got {type(text).__name__}")
    if len(text) > MAX_JSON_CHARS:
        raise ValueError(f"{what} is {len(text)} characters long, over the {MAX_JSON_CHARS} read")
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{what} nests {depth} levels deep, over the {MAX_JSON_DEPTH} read")
    return json.loads(text)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"?', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest bracket nesting of JSON text, brackets inside strings not counted (an upper bound for text that is
    not valid JSON)."""
    depth = deepest = 0
    for bracket in _BRACKET.findall(_JSON_STRING.sub("", text)):
        depth = depth + 1 if bracket in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


# -- untrusted text out: escaped and cut


_BIDI = {0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069}


def printable(value) -> str:
    """str(value) with terminal control characters (C0, DEL, C1, bidi overrides) escaped as \\n, \\xNN or \\uNNNN,
    so that a string read from a database cannot move the cursor, recolour, retitle the terminal it is printed on or
    forge a line of output."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(_escape(c) for c in text)


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    n = ord(c)
    if not (n < 0x20 or 0x7F <= n < 0xA0 or n in _BIDI):
        return c
    return _NAMED.get(c) or (f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}")


def clip(value, limit: int = CLIP_CHARS) -> str:
    """printable(value) cut to ``limit`` characters ('...' and the full length said), for quoting an untrusted value
    in a message: a 20 MB config is not echoed whole."""
    text = printable(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# -- tunebench's values out


def format_config(config: dict | None) -> str:
    """'BLOCK_M=64 BLOCK_N=32 num_warps=4' in the config's own order; '-' for no config."""
    return "-" if config is None else " ".join(f"{k}={v}" for k, v in config.items())


def format_counts(counts: dict[str, int]) -> str:
    """'ok 20, incorrect 1' in the store's STATUSES order; statuses it does not know come last; 'no trials' when all
    are zero. (Every caller has counts from the store, so importing it here costs nothing more.)"""
    from .store import STATUSES
    order = list(STATUSES) + sorted(set(counts) - set(STATUSES))
    return ", ".join(f"{s} {counts[s]}" for s in order if counts.get(s)) or "no trials"


def format_duration(d: timedelta | float | None) -> str:
    """'42 s', '3.5 min' or '2.1 h' (a timedelta or seconds); '-' for None."""
    if d is None:
        return "-"
    s = d.total_seconds() if isinstance(d, timedelta) else float(d)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def format_speedup(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_number(x, spec: str, none: str = "-") -> str:
    """format(x, spec), or `none` for None and non-finite floats."""
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def table(header: list[str], rows: list[list], *, right: tuple[int, ...] = (), indent: str = "",
          markdown: bool = False) -> str:
    """The one table printer. Plain text: columns padded to their widest cell, a dashed rule under the header, the
    columns whose indices are in `right` right-aligned (numbers). markdown=True: a GitHub table instead."""
    cells = [[printable(c) for c in row] for row in [header] + rows]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    lines = [line(row).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(indent + x for x in lines)


def jsonable(x):
    """x with non-finite floats as None (JSON has no NaN) and timedeltas as seconds, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, timedelta):
        return x.total_seconds()
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    return x


def print_json(command: str, doc: dict, stream=None) -> None:
    """One JSON document on stdout: {"tunebench": version, "command": command, ...doc}. The shape of each command's
    document is in its --help (and README's "Machine-readable output")."""
    from . import __version__
    out = {"tunebench": __version__, "command": command, **jsonable(doc)}
    print(json.dumps(out, indent=1, allow_nan=False), file=stream or sys.stdout, flush=True)
