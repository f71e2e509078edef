"""Generated JSON documents fed to the config loader: it returns a valid config or raises
ConfigError (the project's own error, printed as one line with exit code 2), never anything
else (no TypeError, OverflowError, RecursionError...)."""
import json
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils.config import SECTIONS, Config, ConfigError, from_dict, resolve

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = sorted((ROOT / "jsons").glob("*/*.json"))

TOP_KEYS = [f.name for f in fields(Config) if f.name not in SECTIONS]
SECTION_KEYS = {name: [f.name for f in fields(cls)] for name, cls in SECTIONS.items()}
CHOICES = sorted({str(c) for cls in (Config, *SECTIONS.values()) for f in fields(cls)
                  for c in f.metadata.get("choices", ())})

# Leaves: every JSON type, with the edge values that break naive loaders.
edge_numbers = st.sampled_from([0, -1, 1, 2, 0.5, 1.5, -0.0, 1e-300, 1e308, 2 ** 31, 2 ** 32, 2 ** 63, 10 ** 40,
                                10 ** 400, float("inf"), float("-inf"), float("nan")])
leaves = (st.none() | st.booleans() | st.integers() | st.floats() | edge_numbers
          | st.text(max_size=12) | st.sampled_from(CHOICES + ["", "..", "../x", "a/b", "\x00", "~", "x" * 300]))
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def section(draw, name):
    keys = draw(st.lists(st.sampled_from(SECTION_KEYS[name]) | st.text(max_size=10), max_size=6))
    return {k: draw(json_values) for k in keys}


@st.composite
def documents(draw):
    """Config-shaped objects: real keys (and typos), sections, any values."""
    doc = {}
    for key in draw(st.lists(st.sampled_from(TOP_KEYS) | st.text(max_size=10), max_size=5)):
        doc[key] = draw(json_values)
    for name in draw(st.lists(st.sampled_from(list(SECTIONS)), max_size=3, unique=True)):
        doc[name] = draw(section(name) | json_values)
    if draw(st.booleans()):
        doc["project_name"] = draw(st.sampled_from(["first", "second"]))
    return doc


@st.composite
def damaged_text(draw):
    """A bundled JSON file cut, spliced or sprinkled with characters."""
    text = draw(st.sampled_from(BUNDLED)).read_text(encoding="utf-8")
    how = draw(st.sampled_from(["cut", "insert", "replace"]))
    at = draw(st.integers(0, len(text)))
    if how == "cut":
        return text[:at]
    junk = draw(st.text(min_size=1, max_size=5))
    return text[:at] + junk + text[at + (len(junk) if how == "replace" else 0):]


def _check(cfg: Config) -> None:
    """A config the loader returns is a valid one: it survives its own round trip."""
    assert isinstance(cfg, Config)
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.fixture(scope="module")
def doc_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "doc.json"


def _load_text(path: Path, text: str, stage: str) -> None:
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-key warnings are allowed
        try:
            cfg = resolve(stage, str(path), {})
        except ConfigError as exc:
            assert str(exc) and "\n" not in str(exc)
            return
    _check(cfg)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(doc=documents() | json_values)
def test_from_dict_returns_valid_config_or_config_error(doc):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cfg = from_dict(doc)
        except ConfigError as exc:
            assert str(exc) and "\n" not in str(exc)
            return
    _check(cfg)


@FUZZ
@given(doc=documents(), stage=st.sampled_from(["first", "second"]), allow_nan=st.booleans())
def test_json_documents_through_the_file_loader(doc_path, doc, stage, allow_nan):
    try:
        text = json.dumps(doc, allow_nan=allow_nan, ensure_ascii=False)
    except ValueError:  # NaN/inf with allow_nan=False: not JSON at all, nothing to feed
        return
    _load_text(doc_path, text, stage)


@FUZZ
@given(text=damaged_text() | st.text(max_size=60), stage=st.sampled_from(["first", "second"]))
def test_damaged_and_arbitrary_text(doc_path, text, stage):
    _load_text(doc_path, text, stage)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"seeds": ' + "9" * 5000 + "}",
                                  '{"optim": {"base_lr": 1' + "0" * 400 + "}}", "\ufeff{}", ""])
def test_pathological_documents(doc_path, text):
    _load_text(doc_path, text, "first")


# ---------------------------------------------------------------------------
# Flag values: the command line as first.py / second.py parse it, short of running anything
# ---------------------------------------------------------------------------

def _flags(stage: str) -> list[str]:
    from utils.cli import build_parser
    return sorted({o for a in build_parser(stage)._actions for o in a.option_strings
                   if o.startswith("--") and o not in ("--help", "--json_path")})


FLAG_TEXT = (st.text(max_size=12) | st.sampled_from(
    ["", " ", "0", "-1", "1", "2", "1e3", "1e-45", "nan", "inf", "-inf", "1" * 30, "9" * 5000, "true", "False",
     "null", "none", "[", "[1,2]", "[true,false,true]", ",", "0:1:5", "0:1:100000000", "cuda:0", "mps", "a\udcffb",
     "../x", "\x00", "é" * 150, "1_000", "0x10", " 3 "]) | st.integers().map(str) | st.floats().map(str))


@st.composite
def command_lines(draw, stage):
    argv = []
    for flag in draw(st.lists(st.sampled_from(_flags(stage)) | st.text(min_size=1, max_size=8), max_size=6)):
        argv.append(flag)
        for _ in range(draw(st.integers(0, 2))):
            argv.append(draw(FLAG_TEXT))
    return argv


@FUZZ
@given(data=st.data(), stage=st.sampled_from(["first", "second"]))
def test_flag_values_give_configs_or_one_line_errors(data, stage):
    """Any flags and values: valid configs (one per seed) or a one-line ConfigError/RunDirError,
    never another exception, never argparse's usage text and exit."""
    from utils.cli import configs_from_command_line
    from utils.errors import UserError
    argv = data.draw(command_lines(stage))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _, configs = configs_from_command_line(stage, argv)
        except UserError as exc:
            assert str(exc) and "\n" not in str(exc), argv
            return
        for cfg in configs:
            _check(cfg)
