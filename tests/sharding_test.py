"""Data parallel over 4 forced CPU devices gives the same losses as 1."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = """
import jax, json, sys
from lrtrain import sweep, train
c = sweep.load_config_module('configs/digits.py').get_config('runlocal')
c.train.batch_size = 16
c.train.num_steps = 4
c.diagnostics.enabled = False
s = train.train_and_evaluate(c, sys.argv[1])
print(json.dumps({'devices': jax.device_count(), 'acc': s['test/accuracy']}))
"""


def run(workdir, devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}")
  env["JAX_PLATFORMS"] = "cpu"
  r = subprocess.run([sys.executable, "-c", CODE, workdir], capture_output=True,
                     text=True, cwd=ROOT, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    rows = [json.loads(l) for l in fh]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
  return out, losses, evals


@pytest.mark.tier2
def test_four_devices_match_one(tmp_path):
  one, l1, e1 = run(str(tmp_path / "one"), 1)
  four, l4, e4 = run(str(tmp_path / "four"), 4)
  assert one["devices"] == 1 and four["devices"] == 4
  assert len(l1) == len(l4) == 4
  assert l4 == pytest.approx(l1, abs=1e-5)
  assert e4 == pytest.approx(e1, abs=1e-5)
  assert four["acc"] == pytest.approx(one["acc"], abs=1e-6)


def test_batch_must_divide_devices(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  r = subprocess.run([sys.executable, "-m", "lrtrain.main", "--config",
                      "configs/digits.py:runlocal", "--workdir", str(tmp_path),
                      "--config.train.batch_size=10"], capture_output=True,
                     text=True, cwd=ROOT, env=env)
  assert r.returncode == 1
  assert "error: train.batch_size=10 must be divisible by the number of " \
         "devices (4)" in r.stderr
