"""End-to-end runlocal variants of the GeoLoRA, CondLR, intruder and TDLRT
studies (experiments/*/run.py): train in a temp dir, then check the
results files they promise and the numbers in them."""

import csv
import math
import os

import numpy as np
import pytest

from experiments import common as gc
from experiments.condlr_robustness import run as condlr_run
from experiments.geolora_rank_convergence import run as geolora_run
from experiments.intruder_dimensions import run as intruder_run
from experiments.tdlrt_tucker import run as tdlrt_run
from experiments.transport_rules import run as transport_run



def _rows(path):
  with open(path) as fh:
    return list(csv.DictReader(fh))


def _run(module, tmp_path):
  out = module.main(["--runlocal", "--workdir", str(tmp_path / "w"),
                     "--results", str(tmp_path / "r")])
  for p in out.values():
    assert os.path.getsize(p) > 0, p
  return out


@pytest.mark.tier2
def test_geolora_runlocal(tmp_path):
  out = _run(geolora_run, tmp_path)
  rows = _rows(out["summary"])
  assert {(r["setting"], r["method"]) for r in rows} == {
      ("adapter", "geolora"), ("scratch", "geolora"), ("scratch", "kls")}
  for r in rows:
    assert 0.0 <= float(r["test_accuracy"]) <= 1.0
    assert int(r["final_trainable_params"]) > 0
  # The adapter runs start from the pretrained run's weights with the
  # schedule: two cycles of 51 steps, ranks logged at the end of each.
  ad = [r for r in rows if r["setting"] == "adapter"]
  assert [(r["truncation_delay"], r["steps"]) for r in ad] == [("37", "102")]
  assert os.path.exists(tmp_path / "w" / "pretrain" / "summary.json")
  curve = _rows(out["params_csv"])
  assert {int(r["step"]) for r in curve if r["setting"] == "scratch"} >= {2, 4}
  assert {int(r["step"]) for r in curve if r["setting"] == "adapter"} >= {51, 102}
  # A resumed call skips the finished runs and rebuilds the same table.
  again = geolora_run.main(["--runlocal", "--workdir", str(tmp_path / "w"),
                            "--results", str(tmp_path / "r2")])
  assert _rows(again["summary"]) == rows


@pytest.mark.tier2
@pytest.mark.fashion_mnist
def test_condlr_runlocal(tmp_path):
  out = _run(condlr_run, tmp_path)
  fg = _rows(out["fgsm_csv"])
  assert [float(r["eps"]) for r in fg] == [0.0, 0.05]
  assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in fg)
  # eps = 0 through the [0, 1] pixel wrapper = clean accuracy on the
  # standardised inputs (64 examples: allow one rounding flip).
  assert abs(float(fg[0]["accuracy"]) - float(fg[0]["clean_standardised"])) <= 1 / 64
  kap = _rows(out["kappa_csv"])[0]
  # approx_orth with tau = 0.1 keeps kappa(S) <= 1.1 (log10 1.1 = 0.0414).
  for layer in condlr_run.LAYERS:
    assert float(kap[f"{layer}_kappa_log10_final"]) <= math.log10(1.1) + 1e-3
  summ = _rows(out["summary_csv"])[0]
  assert summ["ranks"] == "conv1:4 conv2:10 fc1:100"   # ceil(0.2 min(n, m))


def test_condlr_per_layer_ranks():
  import jax
  from lrtrain import models
  from lrtrain import config_utils as cu
  cfg = cu.base_config().model
  cfg.name, cfg.widths, cfg.factor.kind, cfg.factor.rank = "mlp", (40, 30), "lowrank", 4
  m = models.build(cfg, num_classes=10, input_shape=(8, 8, 1))
  p = models.init_params(m, jax.random.key(0), (8, 8, 1))
  q = condlr_run.with_ranks(p, 0.5, 0)
  # ceil(0.5 min(n, m)): fc1 (40, 64) -> 20, fc2 (30, 40) -> 15.
  assert condlr_run.per_layer_ranks(q, 0.5) == {"fc1": 20, "fc2": 15}
  assert int(q["fc1"]["kernel"].rank) == 20
  U = np.asarray(q["fc2"]["kernel"].U)
  np.testing.assert_allclose(U.T @ U, np.eye(U.shape[1]), atol=1e-5)
  y = m.apply({"params": q}, np.zeros((2, 8, 8, 1), np.float32))
  assert y.shape == (2, 10)


@pytest.mark.tier2
@pytest.mark.fashion_mnist
def test_intruders_runlocal(tmp_path):
  out = _run(intruder_run, tmp_path)
  rows = _rows(out["methods"])
  assert {r["method"] for r in rows} == {"LoRA r=1", "full FT"}
  eps_rows = _rows(out["count_vs_eps_csv"])
  for m in ("LoRA r=1", "full FT"):
    c = [int(r["count"]) for r in eps_rows if r["method"] == m]
    assert c == sorted(c)                 # more intruders as eps grows
    assert c[-1] <= 2 * 4                 # k = 4 per matrix, 2 matrices


def test_intruder_helpers():
  from lrtrain import data as data_lib
  x = np.arange(10, dtype=np.float32)[:, None]
  y = np.arange(10, dtype=np.int32)
  full = data_lib.Dataset("t", "classification", 10, (1,),
                          {s: (x, y) for s in ("train", "validation", "test")})
  b = intruder_run.task_dataset(full, (5, 6, 7, 8, 9))
  assert b.splits["test"][1].tolist() == [5, 6, 7, 8, 9]
  ms = np.array([[0.9, 0.3, np.nan], [0.2, 0.6, 0.1]])
  assert intruder_run.count(ms, 0.5, 3) == 3
  assert intruder_run.count(ms, 0.5, 1) == 1
  assert intruder_run.spearman([1, 2, 3, 4], [10, 20, 25, 40]) == pytest.approx(1.0)


@pytest.mark.tier2
def test_tdlrt_runlocal(tmp_path):
  out = _run(tdlrt_run, tmp_path)
  rows = _rows(out["summary"])
  assert len(rows) == 1 and rows[0]["family"] == "tucker (TDLRT)"
  r = rows[0]
  assert 0 < int(r["conv_params"]) < int(r["conv_params_dense"])
  assert float(r["conv_compression"]) == pytest.approx(
      1 - int(r["conv_params"]) / int(r["conv_params_dense"]), abs=1e-5)
  for c in tdlrt_run.CONVS:
    r_out, r_in = map(int, r[f"{c}_rank"].split())
    assert 1 <= r_out and 1 <= r_in


def test_write_csv_and_series(tmp_path):
  p = gc.write_csv(str(tmp_path / "a.csv"), [{"a": 1, "b": 0.5}, {"a": 2, "c": [1, 2]}])
  assert _rows(p) == [{"a": "1", "b": "0.5", "c": ""}, {"a": "2", "b": "", "c": "1 2"}]
  st, v = gc.series([{"step": 1, "x": 2.0}, {"step": 2}, {"step": 3, "x": 4.0}], "x")
  assert st.tolist() == [1, 3] and v.tolist() == [2.0, 4.0]


@pytest.mark.tier2
def test_transport_rules_runlocal(tmp_path):
  out = _run(transport_run, tmp_path)
  comp = _rows(out["comparison"])
  assert [r["variant"] for r in comp] == ["off", "squares", "squares_fresh",
                                          "squares_mean"]
  assert all(r["seeds"] == "2" for r in comp)
  runs = _rows(out["runs"])
  assert len(runs) == 8 and all(0 <= float(r["test_accuracy"]) <= 1 for r in runs)
