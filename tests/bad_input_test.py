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


@pytest.mark.parametrize("method,kind", [
    (m, k) for m in ("kls", "geolora", "condlr", "tdlrt", "factors")
    for k in ("lora", "dense")] + [("lora", "lowrank"), ("lora", "dense")])
def test_factor_method_without_factor_layers(method, kind, tmp_path):
  """A method that trains factor nodes, on a model with none of its kind,
  is refused before the workdir, naming the layers' kinds and the fix (it
  used to exit 0, truncating or adapting nothing)."""
  c = config_utils.apply_overrides(cfg(), {"integrator.name": method,
                                           "model.factor.kind": kind})
  with pytest.raises(ValueError, match=f"integrator.name='{method}' trains") as e:
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert f"fc1: {kind}" in str(e.value) and "head: dense" in str(e.value)
  want = "lora" if method == "lora" else "lowrank"
  assert f"--config.model.factor.kind={want}" in str(e.value)
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


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"{os.getpid()} otherhost 2026-01-02T03:04:05\\n".encode(), 0)
print("held", flush=True)
time.sleep(120)
"""


def snapshot(wd):
  out = {}
  for root, _, files in os.walk(wd):
    for name in files:
      with open(os.path.join(root, name), "rb") as fh:
        out[os.path.relpath(os.path.join(root, name), wd)] = fh.read()
  return out


def test_workdir_in_use_refused(tmp_path):
  """A run on a workdir another live process has locked ends in one line
  naming the holder, before building anything, and changes no file."""
  from lrtrain import workdir
  wd = tmp_path / "w"
  train.train_and_evaluate(cfg(), str(wd))
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(wd / ".lock")],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    before = snapshot(wd)
    r = main("--config", "configs/digits.py:runlocal,tau=0.3", "--workdir",
             str(wd))
    assert r.returncode == 1
    assert error_lines(r.stderr) == [
        f"error: workdir {wd} is in use by pid {holder.pid} on host otherhost "
        "(since 2026-01-02 03:04:05); wait for it to finish or use another "
        "workdir"]
    assert "Traceback" not in r.stderr
    with pytest.raises(train.WorkdirError, match="in use"):
      workdir.Lock(str(wd)).acquire()     # the lock itself, not only the probe
    assert snapshot(wd) == before
  finally:
    holder.kill()
    holder.wait()


def test_stale_lock_file_does_not_block(tmp_path):
  """A .lock left by a killed run (no process holds it) is no obstacle."""
  wd = tmp_path / "w"
  wd.mkdir()
  (wd / ".lock").write_text("999999 gone 2026-01-02T03:04:05\n")
  s = train.train_and_evaluate(cfg(), str(wd))
  assert s["steps"] == 3
  pid = (wd / ".lock").read_text().split()[0]
  assert pid == str(os.getpid())       # the last holder, released at close
  train.train_and_evaluate(cfg(), str(wd))   # released: the rerun resumes


def test_unusable_workdir_refused_before_building(tmp_path, monkeypatch):
  """A workdir that is a file (or under one) ends in one line naming it,
  before data or model are built."""
  from lrtrain import data as data_lib
  f = tmp_path / "file"
  f.write_text("x")
  monkeypatch.setattr(data_lib, "load", lambda *a: pytest.fail("data loaded"))
  with pytest.raises(train.WorkdirError, match="is a file, not a directory"):
    train.train_and_evaluate(cfg(), str(f))
  with pytest.raises(train.WorkdirError, match=f"{f} is a file"):
    train.train_and_evaluate(cfg(), str(f / "sub"))
  r = main("--config", "configs/digits.py:runlocal", "--workdir", str(f))
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert error_lines(r.stderr) == [
      f"error: workdir {f} is a file, not a directory; pass a directory path "
      "to --workdir"]
  assert f.read_text() == "x"


def test_read_only_workdir_refused(tmp_path, monkeypatch):
  from lrtrain import workdir
  wd = tmp_path / "ro"
  wd.mkdir()
  # Simulated (root may write anywhere) ...
  monkeypatch.setattr(workdir.os, "access", lambda *a: False)
  with pytest.raises(train.WorkdirError, match="ro is not writable"):
    workdir.check(str(wd))
  with pytest.raises(train.WorkdirError, match="cannot be created"):
    workdir.check(str(wd / "new"))
  monkeypatch.undo()
  if os.geteuid() == 0:
    pytest.skip("root writes to read-only directories")
  wd.chmod(0o500)
  try:
    with pytest.raises(train.WorkdirError, match="not writable"):
      train.train_and_evaluate(cfg(), str(wd))
  finally:
    wd.chmod(0o700)


def test_batch_larger_than_train_split_cli(tmp_path):
  """(test_validate checks data.max_train=-1 and this in-process.)"""
  r = main("--config", "configs/digits.py", "--workdir", str(tmp_path / "w"),
           "--config.train.batch_size=5000")
  assert r.returncode == 1 and "Traceback" not in r.stderr
  lines = error_lines(r.stderr)
  assert len(lines) == 1
  assert lines[0].startswith("error: train.batch_size=5000 exceeds the 1238 ")
  assert not os.path.exists(tmp_path / "w")
