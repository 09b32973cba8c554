"""Bad input: one clear error naming the problem, non-zero exit, nothing
written to an existing workdir's checkpoints."""

import os
import subprocess
import sys

import pytest

from lrtrain import config_utils, sweep, train
from lrtrain.data import DatasetError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(arg="runlocal"):
  return sweep.load_config_module(os.path.join(ROOT, "configs/digits.py")).get_config(arg)


def main(*args):
  return subprocess.run([sys.executable, "-m", "lrtrain.main", *args],
                        capture_output=True, text=True, cwd=ROOT)


def error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith(("error:", "FATAL"))]


def test_unknown_override_field_cli(tmp_path):
  r = main("--config", "configs/digits.py:runlocal", "--workdir", str(tmp_path),
           "--config.model.factor.rnak=4")
  assert r.returncode != 0
  assert "rnak" in r.stderr and len(error_lines(r.stderr)) == 1
  assert error_lines(r.stderr)[0].startswith("error: --config.model.factor.rnak:")
  assert not os.listdir(tmp_path)


def test_wrong_type_cli(tmp_path):
  r = main("--config", "configs/digits.py:runlocal", "--workdir", str(tmp_path),
           "--config.train.batch_size=abc")
  assert r.returncode != 0 and "batch_size" in r.stderr
  assert len(error_lines(r.stderr)) == 1


def test_tau_out_of_range_cli(tmp_path):
  r = main("--config", "configs/digits.py:runlocal", "--workdir", str(tmp_path),
           "--config.integrator.tau=1.5")
  assert r.returncode == 1
  assert error_lines(r.stderr) == [
      "error: integrator.tau=1.5 must be in [0, 1)"]
  assert not os.listdir(tmp_path)


def test_unknown_config_argument():
  with pytest.raises(config_utils.ConfigError, match="unknown config argument 'tua'"):
    cfg("tua=0.1")
  with pytest.raises(config_utils.ConfigError, match="expected float"):
    cfg("tau=abc")


@pytest.mark.parametrize("field,value,match", [
    ("integrator.tau", -0.1, "integrator.tau"),
    ("integrator.tau", 1.0, "integrator.tau"),
    ("integrator.name", "klss", "unknown method"),
    ("model.name", "resnet", "unknown model"),
    ("data.name", "imagenet", "unknown dataset"),
    ("optimizer.name", "lion", "unknown optimizer"),
    ("train.batch_size", 0, "batch_size"),
    ("train.batch_size", 5000, "exceeds the .* training examples"),
    ("data.max_train", -1, "data.max_train=-1 must be >= 0"),
    ("seed", -1, "seed=-1 must be a non-negative integer"),
])
def test_validate(field, value, match, tmp_path):
  c = config_utils.apply_overrides(cfg(), {field: value})
  with pytest.raises(config_utils.ConfigError, match=match):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_override_unknown_and_wrong_type():
  with pytest.raises(config_utils.ConfigError, match="no field 'model.factor.rnak'"):
    config_utils.apply_overrides(cfg(), {"model.factor.rnak": 3})
  with pytest.raises(config_utils.ConfigError, match="wrong type"):
    config_utils.apply_overrides(cfg(), {"train.num_steps": "many"})


def test_rank_larger_than_layer(tmp_path):
  c = config_utils.apply_overrides(cfg(), {"model.factor.rank": 100})
  with pytest.raises(ValueError, match="fc1"):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("method", ["kls", "geolora", "condlr", "tdlrt"])
@pytest.mark.parametrize("kind", ["lora", "dense"])
def test_factor_method_without_factor_layers(method, kind, tmp_path):
  """A low-rank method on a model with no LowRank layer is refused before
  the workdir (it used to exit 0, truncating nothing)."""
  c = config_utils.apply_overrides(cfg(), {"integrator.name": method,
                                           "model.factor.kind": kind})
  with pytest.raises(ValueError, match=f"integrator.name='{method}' trains"):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_missing_dataset_files(tmp_path):
  c = config_utils.apply_overrides(cfg(), {"data.name": "cifar10",
                                           "data.dir": str(tmp_path / "none")})
  with pytest.raises(DatasetError):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_sweep_over_missing_key(tmp_path):
  mod = tmp_path / "bad_sweep.py"
  mod.write_text(
      "from lrtrain import config_utils as cu\n"
      "def get_config(arg=None):\n"
      "  c = cu.base_config(); cu.shrink_for_local(c); return c\n"
      "def get_sweep(arg=None):\n"
      "  return cu.sweep('integrator.taux', [0.1, 0.2])\n")
  with pytest.raises(config_utils.ConfigError, match="integrator.taux"):
    sweep.expand(str(mod))


def test_workdir_of_other_config_refused(tmp_path):
  wd = str(tmp_path)
  train.train_and_evaluate(cfg(), wd)
  ck = sorted(os.listdir(os.path.join(wd, "checkpoints")))
  other = config_utils.apply_overrides(cfg(), {"integrator.tau": 0.2})
  with pytest.raises(train.WorkdirError, match="different config"):
    train.train_and_evaluate(other, wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ck
  other = config_utils.apply_overrides(other, {"overwrite": True})
  s = train.train_and_evaluate(other, wd)
  assert s["steps"] == 3


def test_batch_not_divisible_by_devices():
  with pytest.raises(config_utils.ConfigError, match="divisible"):
    config_utils.check_batch(10, 4)
