"""The DLRT / Cuttlefish studies under experiments/: their pure helpers, and
every study's runlocal variant end to end in a temp dir (Fashion-MNIST)."""

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.cuttlefish_stable_rank import run as cuttlefish
from experiments.dlrt_gap_vs_steps import run as gap_steps
from experiments.dlrt_lenet5_tau import run as lenet_tau
from experiments.dlrt_mlp_rank_dynamics import run as mlp_ranks
from experiments.dlrt_vs_factors import run as vs_factors
from lrtrain import factorizations as fz



def _rows(path):
  with open(path) as fh:
    return list(csv.DictReader(fh))


# --------------------------------------------------------------------------
# Pure helpers.
# --------------------------------------------------------------------------


def test_paper_accounting_fit_reproduces_published_eval_cr():
  fit = lenet_tau.paper_accounting()
  # The fitted formula matches all 8 published rows to their rounding, and
  # its dense reference is far larger than LeNet5's 431,080 parameters.
  assert fit["max_abs_err_pct"] < 0.1
  assert fit["D"] > 2 * 431080


def test_paper_accounting_recovers_a_synthetic_reference():
  D, H = 500000.0, 7000.0
  rows = []
  for r in [(10, 20, 60), (8, 12, 30), (4, 6, 10), (2, 2, 3)]:
    E = sum(lenet_tau.lowrank_cost(x, *lenet_tau.SHAPES[l])
            for x, l in zip(r, lenet_tau.LAYERS))
    rows.append({"rank_conv1": str(r[0]), "rank_conv2": str(r[1]),
                 "rank_fc1": str(r[2]), "eval_cr": str(100 * (1 - (E + H) / D))})
  fit = lenet_tau.paper_accounting(rows)
  np.testing.assert_allclose([fit["D"], fit["H"]], [D, H], rtol=1e-6)


def test_switch_step_rule():
  steps = np.array([25, 50, 75, 100, 125])
  sr = {"a": np.array([100.0, 60.0, 50.0, 49.0, 48.5]),
        "b": np.array([10.0, 9.0, 8.0, 7.9, 7.8])}
  # 75: a moved 17%; 100: a 2%, b 1.25% -> settled.
  assert cuttlefish.switch_step(steps, sr, 0.05) == 100
  # Never settled: the last measurement before the final step.
  assert cuttlefish.switch_step(steps, sr, 0.001, total=125) == 100
  # The final step itself is never chosen.
  assert cuttlefish.switch_step(steps, sr, 0.05, total=100) == 75


def test_to_lowrank_is_the_truncated_svd():
  key = jax.random.PRNGKey(0)
  params = {"fc1": {"kernel": jax.random.normal(key, (12, 8)),
                    "bias": jnp.zeros(8)},
            "conv1": {"kernel": jax.random.normal(key, (3, 3, 2, 5))},
            "head": {"kernel": jnp.ones((8, 3))}}
  out = cuttlefish.to_lowrank(params, {"fc1": 3, "conv1": 5})
  f = out["fc1"]["kernel"]
  assert isinstance(f, fz.LowRank) and int(f.rank) == 3
  s = np.linalg.svd(np.asarray(params["fc1"]["kernel"]).T, compute_uv=False)
  err = np.linalg.norm(np.asarray(fz.materialize(f) - params["fc1"]["kernel"].T))
  np.testing.assert_allclose(err, np.linalg.norm(s[3:]), rtol=1e-4)
  # Full rank of the (5, 18) conv matrix: exact.
  np.testing.assert_allclose(fz.materialize(out["conv1"]["kernel"]),
                             fz.as_matrix(params["conv1"]["kernel"]), atol=1e-4)
  assert out["head"]["kernel"] is params["head"]["kernel"]
  assert cuttlefish.factor_layers(params) == ["conv1", "fc1"]


def test_two_factor_keeps_w_and_freezes_the_identity_core():
  import optax  # pylint: disable=g-import-not-at-top
  f = fz.lowrank.init(jax.random.PRNGKey(1), 6, 5, 3, capacity=4)
  params = {"w": f}
  uv = vs_factors.to_two_factor(params)
  np.testing.assert_allclose(fz.materialize(uv["w"]), fz.materialize(f), atol=1e-5)
  np.testing.assert_allclose(uv["w"].S, np.diag([1.0, 1, 1, 0]), atol=0)
  integ = vs_factors.two_factor(optax.sgd(0.1))
  x, y = jax.random.normal(jax.random.PRNGKey(2), (7, 5)), jnp.ones((7, 6))

  def loss_fn(p, batch):
    return jnp.mean((fz.apply(p["w"], batch[0]) - batch[1]) ** 2), {}
  new, _, _ = integ.step(loss_fn, uv, integ.init(uv), (x, y))
  np.testing.assert_array_equal(new["w"].S, uv["w"].S)
  assert not np.allclose(new["w"].U, uv["w"].U)
  assert float(loss_fn(new, (x, y))[0]) < float(loss_fn(uv, (x, y))[0])


# --------------------------------------------------------------------------
# Studies end to end (runlocal).
# --------------------------------------------------------------------------


@pytest.mark.tier2
@pytest.mark.fashion_mnist
def test_lenet5_tau_runlocal(tmp_path):
  rows = lenet_tau.main(["--runlocal", "--workdir", str(tmp_path / "w"),
                         "--out", str(tmp_path / "r")])
  assert [r["tau"] for r in rows] == ["dense", "0.45"]
  table = _rows(tmp_path / "r" / "tau_sweep.csv")
  lr = table[1]
  assert 1 <= float(lr["rank_conv1_mean"]) <= 10
  assert 0 < float(lr["eval_cr_mean"]) < 100
  assert os.path.getsize(tmp_path / "r" / "tau_sweep.png") > 0
  # Resume: a second call finds every run finished and retrains nothing.
  before = os.path.getmtime(tmp_path / "w" / "tau=0.45,seed=0" / "summary.json")
  lenet_tau.main(["--runlocal", "--workdir", str(tmp_path / "w"),
                  "--out", str(tmp_path / "r")])
  assert os.path.getmtime(tmp_path / "w" / "tau=0.45,seed=0" / "summary.json") == before


@pytest.mark.tier2
@pytest.mark.fashion_mnist
def test_mlp_rank_dynamics_runlocal(tmp_path):
  rows = mlp_ranks.main(["--runlocal", "--workdir", str(tmp_path / "w"),
                         "--out", str(tmp_path / "r")])
  assert [r["tau"] for r in rows] == ["dense", "0.05"]
  assert [r["seeds"] for r in rows] == [1, 1]
  curves = _rows(tmp_path / "r" / "rank_curves.csv")
  assert {c["layer"] for c in curves} == set(mlp_ranks.LAYERS)
  assert {c["seed"] for c in curves} == {"0"}
  assert os.path.getsize(tmp_path / "r" / "rank_vs_step.png") > 0


@pytest.mark.tier2
@pytest.mark.fashion_mnist
def test_vs_factors_runlocal(tmp_path):
  rows = vs_factors.main(["--runlocal", "--workdir", str(tmp_path / "w"),
                          "--out", str(tmp_path / "r")])
  assert [r["method"] for r in rows] == list(vs_factors.RUNLOCAL_METHODS)
  curves = _rows(tmp_path / "r" / "curves.csv")
  assert {c["method"] for c in curves} == set(vs_factors.RUNLOCAL_METHODS)


def test_paper_gap_steps_and_sign():
  pg = gap_steps.paper_gap()
  assert [p["step"] for p in pg[:2]] == [391, 782]
  # the authors' DLRT run trails their dense run after every logged epoch
  assert all(p["gap"] > 2.0 for p in pg) and pg[0]["gap"] > 10.0


@pytest.mark.tier2
@pytest.mark.fashion_mnist
def test_gap_vs_steps_runlocal(tmp_path):
  final = gap_steps.main(["--runlocal", "--workdir", str(tmp_path / "w"),
                          "--out", str(tmp_path / "r")])
  assert final["steps"] == 3 and final["dlrt_eval_params"] < final["dense_params"]
  # rank 8 requested, clipped to 8 / 8 / 8 (conv1 cap 10) at most
  assert 1 <= final["rank_fc1"] <= 8
  curves = _rows(tmp_path / "r" / "curves.csv")
  assert [int(c["step"]) for c in curves] == [2, 3]
  for c in curves:
    gap = float(c["dense_val_acc"]) - float(c["dlrt_val_acc"])
    assert abs(gap - float(c["gap"])) < 1e-3
  assert os.path.getsize(tmp_path / "r" / "gap_vs_steps.png") > 0


@pytest.mark.tier2
@pytest.mark.fashion_mnist
def test_cuttlefish_runlocal_mlp(tmp_path):
  res = cuttlefish.main(["--runlocal", "--models", "mlp", "--workdir",
                         str(tmp_path / "w"), "--out", str(tmp_path / "r")])
  rows = res["mlp"]["rows"]
  assert [r["variant"] for r in rows] == ["full", "switch", "scratch"]
  assert rows[1]["params_eval"] < rows[0]["params_eval"]
  sw = _rows(tmp_path / "r" / "switch.csv")
  assert len(sw) == 4 and all(int(r["rank"]) >= 1 for r in sw)
