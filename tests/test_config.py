import json
from pathlib import Path

import pytest

from utils.cli import build_parser
from utils.config import ConfigError, from_dict, overrides_from_flags, parse_bool, resolve

ROOT = Path(__file__).resolve().parents[1]

# The published implementation's own files, verbatim (their descriptions included).
ORIGINAL_CIFAR100_NAIVE = """{
  "exp_name": "naive",
  "project_name": "first",
  "seeds": 0,
  "description": "\u65b0\u7248",
  "save_features": false,
  "data": {"name": "Cifar100", "imb_type": "exp", "imb_factor": 0.01, "n_classes": 100, "batch_size": 64},
  "model": {"name": "ResNet34", "is_pretrained": false, "load_only_representation": false, "use_etf": false,
            "normalize_feature": false, "etf_norm_rate": 1, "logit_adjustment_tau": 0.0,
            "logit_normalization": false, "encoder_num_layers": 34},
  "optim": {"total_epoch_num": 320, "loss_type": "CE", "weight_decay": 0, "norm_type": "none", "base_lr": 0.01}
}"""


def test_every_bundled_json_loads():
    paths = sorted((ROOT / "jsons").glob("*/*.json"))
    assert len(paths) >= 15
    for path in paths:
        raw = json.loads(path.read_text())
        stage = raw["project_name"]
        with pytest.warns(UserWarning) if "encoder_num_layers" in raw["model"] else _nullcontext():
            cfg = resolve(stage, str(path), {})
        assert cfg.project_name == stage


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_paper_values_in_bundled_jsons():
    first = resolve("first", str(ROOT / "jsons/Cifar100/first.json"), {})
    assert (first.optim.total_epoch_num, first.optim.base_lr, first.data.batch_size) == (320, 0.01, 64)
    assert (first.optim.weight_decay, first.optim.features_regularization, first.model.use_etf) == (5e-3, 1e-2, True)
    second = resolve("second", str(ROOT / "jsons/Cifar100/second.json"), {})
    assert (second.model.logit_adjustment_tau, second.model.use_additive_logit_adjustment) == (0.65, False)
    assert resolve("second", str(ROOT / "jsons/Cifar10/second.json"), {}).model.logit_adjustment_tau == 1.6
    wb = resolve("second", str(ROOT / "jsons/Cifar100/wb_second.json"), {})
    assert (wb.optim.loss_type, wb.optim.cb_type, wb.optim.cb_beta) == ("CB", "softmax", 0.9999)
    assert (wb.optim.weight_decay, wb.optim.norm_type, wb.optim.norm_param) == (0.1, "maxnorm", 0.1)
    assert (wb.optim.total_epoch_num, wb.optim.base_lr) == (10, 0.01)


def test_original_file_loads_unchanged_with_legacy_warning(tmp_path):
    path = tmp_path / "naive.json"
    path.write_text(ORIGINAL_CIFAR100_NAIVE, encoding="utf-8")
    with pytest.warns(UserWarning, match="model.encoder_num_layers"):
        cfg = resolve("first", str(path), {})
    assert cfg.description == "\u65b0\u7248"
    assert cfg.optim.weight_decay == 0.0 and cfg.model.use_etf is False
    assert cfg.model.etf_norm_rate == 1.0 and isinstance(cfg.model.etf_norm_rate, float)


@pytest.mark.parametrize("raw, message", [
    ({"optim": {"weight_decai": 0.1}}, "unknown key 'optim.weight_decai' in section 'optim'; did you mean 'optim.weight_decay'?"),
    ({"lr": 0.1}, "unknown key 'lr' in the top level"),
    ({"model": {"use_etf": "yes"}}, "model.use_etf = 'yes' has the wrong type; expected true or false"),
    ({"data": {"batch_size": 6.5}}, "data.batch_size = 6.5 has the wrong type; expected an integer"),
    ({"optim": {"loss_type": "XE"}}, "optim.loss_type = 'XE' is not allowed; choose one of: CE, CB, FL, DR, NC"),
    ({"data": {"imb_factor": 0}}, "data.imb_factor = 0.0 must be > 0 (a number in (0, 1])"),
    ({"data": {"imb_factor": 1.5}}, "data.imb_factor = 1.5 must be <= 1 (a number in (0, 1])"),
    ({"data": {"batch_size": 0}}, "data.batch_size = 0 must be >= 1 (an integer in [1, 2**20])"),
    ({"optim": {"base_lr": -0.1}}, "optim.base_lr = -0.1 must be >= 0 (a number in [0, 100])"),
    ({"optim": {"weight_decay": -1}}, "optim.weight_decay = -1.0 must be >= 0 (a number in [0, 100])"),
    ({"data": "Cifar10"}, "data = 'Cifar10' has the wrong type; expected a JSON object"),
    ({"exp_name": "../../etc"}, "exp_name = '../../etc' is not allowed"),
    ({"model": {"dropout": 0.5}}, "model.dropout = 0.5 does not apply to ResNet34: the original's ResNets support only 0.0"),
])
def test_bad_values_name_key_value_and_allowed(raw, message):
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_json_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "exp_name": "x",\n  "seeds": ,\n}')
    with pytest.raises(ConfigError, match="malformed JSON at line 3, column 12"):
        resolve("first", str(path), {})


@pytest.mark.parametrize("text, value", [("true", True), ("False", False), ("1", True), ("0", False)])
def test_parse_bool(text, value):
    assert parse_bool(text) is value


def test_flags_override_json_and_false_means_false():
    path = str(ROOT / "jsons/Cifar100/first.json")
    args = build_parser("first").parse_args(
        ["--json_path", path, "--model_use_etf", "False", "--optim_weight_decay", "0.01", "--data_imb_factor", "0.1",
         "--exp_name", "mine", "--optim_weight_decay_target", "true,true,true"])
    cfg = resolve("first", path, overrides_from_flags(args))
    assert cfg.model.use_etf is False  # the original's type=bool would have made this True
    assert cfg.optim.weight_decay == 0.01 and cfg.data.imb_factor == 0.1 and cfg.exp_name == "mine"
    assert cfg.optim.weight_decay_target == [True, True, True]
    assert cfg.optim.features_regularization == 0.01  # untouched JSON value


def test_flag_with_bad_value_is_a_config_error():
    args = build_parser("first").parse_args(["--optim_base_lr", "fast"])
    with pytest.raises(ConfigError, match="--optim_base_lr 'fast'"):
        overrides_from_flags(args)


def test_stage_mismatch_is_refused():
    with pytest.raises(ConfigError, match="this is the second stage"):
        resolve("second", str(ROOT / "jsons/Cifar100/first.json"), {})


def test_args_json_round_trip(tmp_path):
    cfg = resolve("first", str(ROOT / "jsons/Cifar10/first.json"), {"seeds": 3})
    path = tmp_path / "args.json"
    path.write_text(json.dumps(cfg.to_dict()))
    again = resolve("first", str(path), {})
    assert again == cfg
    assert cfg.run_subdir() == Path("Cifar10/ResNet34/first/wd_5e-3_etf_f_1e-2/3")


def test_readme_config_table_is_current():
    import subprocess
    import sys
    table = subprocess.run([sys.executable, "-m", "utils.config"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert table in (ROOT / "README.md").read_text(encoding="utf-8"), "regenerate with python -m utils.config"
