"""Sweep expansion, naming, running (sequential, resumable, vmapped seeds)
and aggregation."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lrtrain import config_utils as cu
from lrtrain import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_product_zip_chain_and_names():
  a = cu.sweep("integrator.tau", [0.1, 0.2])
  b = cu.sweep("seed", [0, 1, 2])
  p = cu.product(a, b)
  assert len(p) == 6 and p[0] == {"integrator.tau": 0.1, "seed": 0}
  z = cu.zip_(a, cu.sweep("optimizer.learning_rate", [1e-3, 2e-3]))
  assert z == [{"integrator.tau": 0.1, "optimizer.learning_rate": 1e-3},
               {"integrator.tau": 0.2, "optimizer.learning_rate": 2e-3}]
  with pytest.raises(ValueError):
    cu.zip_(a, b)
  assert cu.chain(a, b) == a + b
  assert cu.run_name(p[0]) == "tau=0.1,seed=0"
  assert cu.run_name({"model.factor.rank": 8, "integrator.r_max": 4}) == "rank=8,r_max=4"
  assert cu.run_name({"a.rank": 1, "b.rank": 2}) == "a.rank=1,b.rank=2"


def test_parse_arg_types():
  a = cu.parse_arg("tau=0.2,runlocal,rank=8,widths=64+32", tau=0.1,
                   runlocal=False, rank=4, widths=(16,), name="x")
  assert a.tau == 0.2 and a.runlocal is True and a.rank == 8
  assert a.widths == (64, 32) and a.name == "x"


def test_derived_fields_follow_overrides():
  mod = sweep.load_config_module(os.path.join(ROOT, "configs/digits.py"))
  c = cu.apply_overrides(mod.get_config(), {"train.num_steps": 1200})
  assert c.train.eval_every == 200 and c.train.checkpoint_every == 600


SWEEP_FILE = """
import importlib.util, os
from lrtrain import config_utils as cu
spec = importlib.util.spec_from_file_location('d', {digits!r})
d = importlib.util.module_from_spec(spec); spec.loader.exec_module(d)
def get_config(arg=None):
  c = d.get_config('runlocal')
  c.diagnostics.enabled = False
  c.optimizer.schedule = 'constant'
  return c
def get_sweep(arg=None):
  if arg == 'seeds':
    return cu.product(cu.sweep('integrator.name', ['factors']),
                      cu.sweep('integrator.adaptive', [False]),
                      cu.sweep('seed', [0, 1]))
  return cu.sweep('integrator.tau', [0.1, 0.3])
"""


@pytest.fixture()
def sweep_file(tmp_path):
  p = tmp_path / "small.py"
  p.write_text(SWEEP_FILE.format(digits=os.path.join(ROOT, "configs/digits.py")))
  return str(p)


def test_all_then_skip_then_summarize(sweep_file, tmp_path):
  wd = str(tmp_path / "runs")
  dirs = sweep.run_all(sweep_file, wd)
  assert [os.path.basename(d) for d in dirs] == ["tau=0.1", "tau=0.3"]
  mtimes = [os.path.getmtime(os.path.join(d, "summary.json")) for d in dirs]
  sweep.run_all(sweep_file, wd)        # finished runs are skipped
  assert mtimes == [os.path.getmtime(os.path.join(d, "summary.json")) for d in dirs]
  r = subprocess.run([sys.executable, "-m", "lrtrain.sweep", "summarize",
                      "--workdir", wd], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "tau=0.1" in r.stdout and "tau=0.3" in r.stdout
  with open(os.path.join(wd, "summary.csv")) as fh:
    rows = list(csv.DictReader(fh))
  assert [row["run"] for row in rows] == ["tau=0.1", "tau=0.3"]
  assert all(0 <= float(row["test/accuracy"]) <= 1 for row in rows)
  assert os.path.getsize(os.path.join(wd, "summary.png")) > 1000


def test_list_and_index_cli(sweep_file, tmp_path):
  wd = str(tmp_path / "runs")
  r = subprocess.run([sys.executable, "-m", "lrtrain.sweep", "--config", sweep_file,
                      "--workdir", wd, "--list"], capture_output=True, text=True,
                     cwd=ROOT)
  assert r.returncode == 0
  assert r.stdout.split() == ["0", os.path.join(wd, "tau=0.1"),
                              "1", os.path.join(wd, "tau=0.3")]
  r = subprocess.run([sys.executable, "-m", "lrtrain.sweep", "--config", sweep_file,
                      "--workdir", wd, "--index", "5"], capture_output=True,
                     text=True, cwd=ROOT)
  assert r.returncode == 1 and "outside the sweep's 2 points" in r.stderr


@pytest.mark.tier2
def test_vmapped_seeds_match_sequential(sweep_file, tmp_path):
  from lrtrain import train
  pts = sweep.expand(sweep_file + ":seeds")
  assert train.fixed_shape(pts[0][1])
  vm = sweep.run_all(sweep_file + ":seeds", str(tmp_path / "vm"), vmap_seeds=True)
  seq = [str(tmp_path / "seq" / name) for name, _, _ in pts]
  for (_, c, _), d in zip(pts, seq):
    train.train_and_evaluate(c, d)

  def losses(d):
    with open(os.path.join(d, "metrics.jsonl")) as fh:
      return [json.loads(l)["train/loss"] for l in fh if '"train/loss"' in l]
  for a, b in zip(vm, seq):
    np.testing.assert_allclose(losses(a), losses(b), rtol=1e-4, atol=1e-5)
    with open(os.path.join(a, "summary.json")) as fh:
      sa = json.load(fh)
    with open(os.path.join(b, "summary.json")) as fh:
      sb = json.load(fh)
    assert sa["test/accuracy"] == pytest.approx(sb["test/accuracy"], abs=1e-3)
  assert losses(vm[0]) != losses(vm[1])   # the seeds really differ


def test_summarize_speed_relative_to_dense_on_the_same_model(tmp_path):
  def fake(name, integ, model, rate):
    d = tmp_path / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({
        "integrator": integ, "test/accuracy": 0.5, "params/compression": 0.1,
        "time/steady_steps_per_sec": rate}))
    (d / "config.json").write_text(json.dumps({"model": {"name": model}}))
  fake("a_dense", "dense", "mlp", 40.0)
  fake("b_kls", "kls", "mlp", 10.0)
  fake("c_dense", "dense", "lenet5", 8.0)
  fake("d_geo", "geolora", "lenet5", 6.0)
  fake("e_kls", "kls", "vgg", 3.0)            # no dense run on this model
  _, _, rows = sweep.summarize(str(tmp_path))
  rel = {r["run"]: r["time/vs_dense"] for r in rows}
  assert rel == {"a_dense": 1.0, "b_kls": 0.25, "c_dense": 1.0, "d_geo": 0.75,
                 "e_kls": None}


@pytest.mark.tier2
def test_keep_going_records_a_diverged_run_and_goes_on(sweep_file, tmp_path):
  wd = str(tmp_path / "runs")
  spec = sweep_file
  # lr 1e30 makes the first point blow up; the second trains normally.
  with open(spec, "a") as fh:
    fh.write("\n_orig = get_sweep\n"
             "def get_sweep(arg=None):\n"
             "  return [{'optimizer.learning_rate': 1e30}, {'integrator.tau': 0.3}]\n")
  from lrtrain import train
  with pytest.raises(train.DivergedError):
    sweep.run_all(spec, wd)
  dirs = sweep.run_all(spec, wd, keep_going=True)
  assert [os.path.basename(d) for d in sweep.failed_runs(dirs)] == ["learning_rate=1e+30"]
  with open(os.path.join(dirs[0], sweep.FAILED)) as fh:
    assert "non-finite" in json.load(fh)["error"]
  assert os.path.exists(os.path.join(dirs[1], "summary.json"))
  _, _, rows = sweep.summarize(wd)
  status = {r["run"]: r["status"] for r in rows}
  assert status["tau=0.3"] == "ok"
  assert status["learning_rate=1e+30"].startswith("diverged: non-finite")
  r = subprocess.run([sys.executable, "-m", "lrtrain.sweep", "--config", spec,
                      "--workdir", wd, "--all", "--keep_going"],
                     capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 1 and "diverged (see failed.json)" in r.stderr
