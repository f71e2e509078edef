"""Loading a config: one reader for every JSON file, each value typed, then validated.

:func:`resolve` is what the command lines call: the JSON (or, without one, the original's
flag defaults for the stage) with the flags given on top, typed field by field
(:func:`coerce`) and checked (utils/config/rules.py ``validate``).  Nothing downstream reads
raw dicts or asks whether a key exists; config text is parsed as JSON, never evaluated.
"""
from __future__ import annotations

import json
import math
import os
import stat
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

from utils.config.rules import validate
from utils.config.schema import LEGACY_KEYS, SECTIONS, STAGE_FLAG_DEFAULTS, Config, base_type, field_type, key_of
from utils.config.values import short
from utils.errors import ConfigError


MAX_JSON_BYTES = 1 << 20  # a config is a few kB; the limit keeps /dev/zero-like inputs from filling memory


def _refuse_duplicates(pairs: list) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def read_json_file(path: str | Path, label: str = "", error: type = ConfigError) -> Any:
    """The one reader of JSON files (configs, a stage-1 run's args.json, a run's results).

    Only a regular file is read (a FIFO, a device such as /dev/zero or a directory is refused
    before anything is read), at most MAX_JSON_BYTES of it, as UTF-8 (a byte-order mark is
    allowed); a key repeated in one object is refused by name, where ``json`` would silently
    keep the last.  Every problem is one line: ``error(f"{label}: ...")``.
    """
    path = Path(path)
    label = label or str(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then names what it is
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{label}: file not found") from None
    except (OSError, ValueError) as exc:
        raise error(f"{label}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device, FIFO or socket)"
            raise error(f"{label}: {kind}, not a JSON file")
        if info.st_size > MAX_JSON_BYTES:
            raise error(f"{label}: {info.st_size} bytes, more than the {MAX_JSON_BYTES} (1 MiB) a JSON file may have")
        with os.fdopen(fd, "rb") as fh:
            fd = -1
            data = fh.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise error(f"{label}: cannot read ({exc.strerror or exc})") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_JSON_BYTES:
        raise error(f"{label}: it grew beyond {MAX_JSON_BYTES} bytes while it was read (a JSON file may have 1 MiB)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{label}: cannot read (not UTF-8 text: byte {exc.start} is {data[exc.start]:#04x})") from None
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as exc:
        raise error(f"{label}: key {short(exc.key)} appears twice in one object (JSON keeps only the last, "
                    "silently); keep one") from None
    except json.JSONDecodeError as exc:
        raise error(f"{label}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit number, arrays nested thousands deep
        raise error(f"{label}: unreadable JSON ({type(exc).__name__}: {str(exc)[:80]})") from None


def load_json(path: str | Path) -> Any:
    """A --json_path config file (see read_json_file)."""
    return read_json_file(path, f"--json_path {str(path)!r}")


def coerce(value: Any, tp, key: str) -> Any:
    """Check a JSON value against a field type; return it normalised."""
    base, optional = base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} = null is not allowed; expected {base.__name__}")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {short(value)} has the wrong type; expected true or false")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {short(value)} has the wrong type; expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} = {short(value)} has the wrong type; expected an integer")
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {short(value)} has the wrong type; expected a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key} = {short(value)} must be a finite number")
        return number
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} = {short(value)} has the wrong type; expected a string")
    if base is list:
        if isinstance(value, list):
            return list(value)
        raise ConfigError(f"{key} = {short(value)} has the wrong type; expected a list")
    raise AssertionError(f"unhandled type for {key}: {tp}")  # pragma: no cover



def _build_section(cls, section: str, raw: dict, source: str):
    known = {f.name: f for f in fields(cls)}
    values = {}
    for name, value in raw.items():
        if name not in known:
            if (section, name) in LEGACY_KEYS:
                warnings.warn(f"{source}: ignoring legacy key {key_of(section, name)} (never read by the original either)",
                              stacklevel=3)
                continue
            raise ConfigError(_unknown_key_message(section, name, known))
        values[name] = coerce(value, field_type(cls, name), key_of(section, name))
    return cls(**values)


def _unknown_key_message(section: str, name: str, known) -> str:
    import difflib
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {key_of(section, close[0])!r}?" if close else ""
    where = f"section '{section}'" if section else "the top level"
    return f"unknown key {key_of(section, name)!r} in {where}{hint}"


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(raw: dict, source: str = "config") -> Config:
    """Build and validate a Config from a JSON-like dict (the original's layout)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    top_known = {f.name for f in fields(Config)} - set(SECTIONS)
    top_values = {}
    sections = {}
    for name, value in raw.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{name} = {short(value)} has the wrong type; expected a JSON object (section)")
            sections[name] = _build_section(SECTIONS[name], name, value, source)
        elif name in top_known:
            top_values[name] = coerce(value, field_type(Config, name), name)
        else:
            raise ConfigError(_unknown_key_message("", name, top_known | set(SECTIONS)))
    cfg = Config(**top_values, **sections)
    validate(cfg)
    return cfg


def resolve(stage: str, json_path: Optional[str], overrides: dict) -> Config:
    """JSON (or the original's flag defaults for this stage) + given flags -> validated Config."""
    if json_path:
        raw = load_json(json_path)
        source = str(json_path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{json_path}: the top level must be a JSON object {{...}}, not {type(raw).__name__}")
        if isinstance(raw, dict) and raw.get("project_name", stage) != stage:
            raise ConfigError(f"project_name = {short(raw.get('project_name'))} in {json_path}, "
                              f"but this is the {stage} stage ({stage}.py)")
    else:
        raw = STAGE_FLAG_DEFAULTS[stage]
        source = f"{stage}.py defaults"
    if overrides.get("project_name", stage) != stage:
        raise ConfigError(f"--project_name {short(overrides['project_name'])} does not match this script; "
                          f"{stage}.py always runs project_name {stage!r}")
    raw = merge(raw, overrides)
    raw = merge(raw, {"project_name": stage})
    return from_dict(raw, source)
