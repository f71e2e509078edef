"""The allowed values of single keys: numeric ranges, choices, names, paths and devices.

Every numeric field names its range in its ``check`` metadata (utils/config/schema.py); a
value outside it is one ConfigError naming the key, the value and the whole range, as the
README's config table ("allowed") shows it.
"""
from __future__ import annotations

import dataclasses
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Optional

from utils.config.schema import key_of
from utils.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of allowed values, and how messages and the README show it."""
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    high_shown: str = ""  # the upper bound as written for a reader ("2**20"); default: the number

    def __contains__(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def text(self, integer: bool) -> str:
        kind = "integer" if integer else "number"
        high = self.high_shown or _num(self.high)
        return f"{kind} in {'(' if self.low_open else '['}{_num(self.low)}, {high}{')' if self.high_open else ']'}"

    def violation(self, value, integer: bool) -> str:
        """'must be >= 1 (an integer in [1, 2**20])': the side it missed, then the whole range."""
        if value < self.low or (self.low_open and value == self.low):
            side = f"must be {'>' if self.low_open else '>='} {_num(self.low)}"
        else:
            side = f"must be {'<' if self.high_open else '<='} {self.high_shown or _num(self.high)}"
        return f"{side} ({'an' if integer else 'a'} {self.text(integer)})"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e6 else f"{x:g}"


INT64_MAX = 2 ** 63 - 1

# Every numeric key's allowed values, by the name its field gives in ``check``.  The bounds keep
# what consumes a value working: C longs (threads, seeds), allocations (batch sizes, MLP widths),
# divisions (ratios), float32 (rates that round to 0, exponents that overflow), runs that end.
RANGES = {
    "ge0": Range(0, INT64_MAX, high_shown="2**63 - 1"),
    "gt0": Range(0, 1e6, low_open=True),
    "ge1": Range(1, INT64_MAX, high_shown="2**63 - 1"),
    "ge2": Range(2, INT64_MAX, high_shown="2**63 - 1"),
    "unit_open0": Range(0, 1, low_open=True),
    "unit_closed": Range(0, 1),
    "seed": Range(0, 2 ** 32 - 1, high_shown="2**32 - 1"),
    "threads": Range(0, 4096),
    "classes": Range(2, 100_000),
    "batch": Range(1, 2 ** 20, high_shown="2**20"),
    "batch0": Range(0, 2 ** 20, high_shown="2**20"),
    "workers": Range(0, 256),
    "epochs": Range(0, 100_000),
    "seconds": Range(0, 1e9),
    "ratio": Range(1e-4, 1e4),           # divides: 1 - (r-1) i / ((K-1) r)
    "tau": Range(0, 100),
    "eps": Range(1e-12, 1),
    "init": Range(-1000, 1000),
    "init_std": Range(0, 1000),
    "layers": Range(1, 64),
    "width": Range(1, 16_384),
    "lr": Range(0, 100),
    "momentum": Range(0, 1, high_open=True),  # 1 never forgets a gradient, > 1 diverges
    "gamma": Range(0, 20),
    "weight": Range(0, 100),
    "norm": Range(0, 1e4),               # narrowed by norm_type (utils/config/rules.py)
}

# Text keys: names and paths must be writable as they are; free text (description) is anything.
TEXT_RULES = {"name": "a plain folder name", "path": "a path", "device": "auto, cpu, cuda or cuda:N"}
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]{1,4})?")


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + "..." + text[-10:]


def check_field(section: str, f: dataclasses.Field, value: Any) -> None:
    key = key_of(section, f.name)
    choices = f.metadata.get("choices")
    if choices is not None and value is not None and value not in choices:
        allowed = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{key} = {short(value)} is not allowed; choose one of: {allowed}")
    rule = f.metadata.get("check")
    if rule is None or value is None:
        return
    if rule in TEXT_RULES:
        check_text(key, value, rule)
    elif value not in RANGES[rule]:
        raise ConfigError(f"{key} = {short(value)} {RANGES[rule].violation(value, isinstance(value, int))}")


def unencodable(text: str) -> Optional[str]:
    """The first character that cannot be written as UTF-8 (a lone surrogate), as U+XXXX; else None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return f"U+{ord(text[exc.start]):04X}"


def has_control_character(text: str) -> bool:
    """A newline, tab, escape... (Unicode category Cc): legal in a Linux path, never meant in one."""
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def check_text(key: str, value: str, rule: str) -> None:
    bad = unencodable(value)
    if bad is not None:
        raise ConfigError(f"{key} = {short(value)} contains {bad}, a lone surrogate that cannot be written to a "
                          f"file name or a log; give {TEXT_RULES[rule]} in valid Unicode")
    if "\x00" in value:
        raise ConfigError(f"{key} = {short(value)} contains a NUL character; give {TEXT_RULES[rule]}")
    if rule == "path" and has_control_character(value):
        raise ConfigError(f"{key} = {short(value)} contains a control character; give {TEXT_RULES[rule]}")
    if rule == "name":
        check_exp_name(value)
    elif rule == "device" and not DEVICE_PATTERN.fullmatch(value):
        raise ConfigError(f"device = {short(value)} is not allowed; choose auto, cpu, cuda or cuda:N "
                          "(N = the index of a visible GPU, e.g. cuda:0)")



def check_exp_name(name: str) -> None:
    # a leading '.' would hide the runs (the report skips hidden folders, where --overwrite keeps an old copy)
    bad = (not name.strip() or name.startswith((".", "~")) or "/" in name or "\\" in name
           or name != name.strip() or any(ord(ch) < 32 or ord(ch) == 127 for ch in name)
           or len(name.encode("utf-8")) > 200)
    if bad:
        raise ConfigError(f"exp_name = {short(name)} is not allowed; use a plain folder name "
                          "(no '/', '\\', control characters, leading '.' or '~', leading or trailing spaces; at most "
                          "200 bytes): "
                          "it becomes a folder under exp/")
