"""Gradient stable rank and update-subspace overlap against numpy references."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrtrain import config_utils, train
from lrtrain import factorizations as fz
from lrtrain.diagnostics import GradientDiagnostics, layer_matrix
from lrtrain.diagnostics import gradients as gd
from lrtrain.layers import Conv, Dense, FactorSpec


def orth(rng, n, p):
  q, r = np.linalg.qr(rng.standard_normal((n, p)))
  return q * np.sign(np.diag(r))


def known(n, m, s, seed=0):
  """(n, m) matrix with singular values s, and its left vectors."""
  rng = np.random.default_rng(seed)
  U, V = orth(rng, n, len(s)), orth(rng, m, len(s))
  return U @ np.diag(s) @ V.T, U


def np_stable_rank(G):
  s = np.linalg.svd(np.asarray(G, np.float64), compute_uv=False)
  return (s ** 2).sum() / s[0] ** 2


def np_top_left(D, k):
  U, s, _ = np.linalg.svd(np.asarray(D, np.float64), full_matrices=False)
  return U[:, :k]


def np_overlap(X, Y):
  return float(np.sum((X.T @ Y) ** 2) / min(X.shape[1], Y.shape[1]))


# --- singular values: exact and by subspace iteration -------------------------

SPECTRUM = [5.0, 3.0, 2.0, 1.2, 0.8] + [0.3 * 0.8 ** i for i in range(35)]


@pytest.mark.parametrize("exact_limit", [256, 0])
def test_top_singular_matches_numpy(exact_limit):
  A, U = known(60, 40, SPECTRUM)
  s, Y = gd.top_singular(jnp.asarray(A, jnp.float32), 4,
                         exact_limit=exact_limit)
  np.testing.assert_allclose(s, SPECTRUM[:4], rtol=1e-4)
  # Left vectors up to sign: |cos| = 1 with numpy's.
  np.testing.assert_allclose(np.abs(np.sum(np.asarray(Y) * U[:, :4], 0)), 1.0,
                             atol=1e-4)
  s1, none = gd.top_singular(jnp.asarray(A, jnp.float32), 1, vectors=False,
                             exact_limit=exact_limit)
  assert none is None and s1.shape == (1,)
  # A Ritz value never exceeds the singular value it approximates.
  assert float(s1[0]) <= SPECTRUM[0] * (1 + 1e-6)


def test_subspace_iteration_stops_at_max_iters():
  """A spectrum without a gap: iteration stops after max_iters with a
  lower bound of s_1."""
  A, _ = known(50, 30, np.linspace(1.0, 0.99, 30))
  s, _ = gd.top_singular(jnp.asarray(A, jnp.float32), 1, vectors=False,
                         exact_limit=0, max_iters=2)
  assert 0.98 < float(s[0]) <= 1.0 + 1e-6


# --- the full-weight gradient --------------------------------------------------


def linear_loss(C):
  """loss = <W, C> for the layer 'fc': dL/dW = C whatever W's factors."""
  def loss_fn(params, batch):
    del batch
    W = fz.as_matrix(params["fc"]["kernel"])
    return jnp.sum(W * C), {}
  return loss_fn


@pytest.mark.parametrize("kind", ["dense", "lowrank", "lora"])
@pytest.mark.parametrize("exact_limit", [256, 4])
def test_stable_rank_of_constructed_gradient(kind, exact_limit):
  s = np.array([4.0, 2.0, 2.0, 1.0, 0.5, 0.1])
  C, _ = known(24, 16, s, seed=3)
  key = jax.random.key(0)
  node = {"dense": jax.random.normal(key, (16, 24)),   # Flax (in, out)
          "lowrank": fz.lowrank.init(key, 24, 16, 3, capacity=6),
          "lora": fz.lora.init(key, jax.random.normal(key, (24, 16)), 2)}[kind]
  out = GradientDiagnostics(linear_loss(jnp.asarray(C, jnp.float32)),
                            updates=False, exact_limit=exact_limit)(
                                {"fc": {"kernel": node}})
  assert set(out) == {"grad/fc/norm_frobenius", "grad/fc/norm_spectral",
                      "grad/fc/stable_rank"}
  want = (s ** 2).sum() / s[0] ** 2
  assert out["grad/fc/stable_rank"] == pytest.approx(want, rel=1e-4)
  assert out["grad/fc/norm_spectral"] == pytest.approx(4.0, rel=1e-5)
  assert out["grad/fc/norm_frobenius"] == pytest.approx(
      np.sqrt((s ** 2).sum()), rel=1e-5)


class Net(nn.Module):
  """A LowRank, a Lora and a dense layer; `dense` builds the same net with
  dense kernels (the reference)."""
  dense: bool = False

  @nn.compact
  def __call__(self, x):
    spec = lambda **kw: None if self.dense else FactorSpec(**kw)
    x = jnp.tanh(Dense(16, factor=spec(kind="lowrank", rank=3, capacity=6),
                       name="fc1")(x))
    x = jnp.tanh(Dense(12, factor=spec(kind="lora", rank=2), name="fc2")(x))
    return Dense(5, name="head")(x)


class ConvNet(nn.Module):
  """A Tucker conv, a LowRank conv (im2col) and a dense head."""
  dense: bool = False

  @nn.compact
  def __call__(self, x):
    spec = lambda **kw: None if self.dense else FactorSpec(**kw)
    x = jnp.tanh(Conv(4, factor=spec(kind="tucker", tucker_ranks=(2, 2)),
                      name="conv1")(x))
    x = jnp.tanh(Conv(5, factor=spec(kind="lowrank", rank=2), impl="im2col",
                      name="conv2")(x))
    return Dense(3, name="head")(x.mean(axis=(1, 2)))


def ce_loss(module):
  def loss_fn(params, batch):
    logits = module.apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean(), {}
  return loss_fn


def dense_kernel(node, like):
  """The Flax-layout dense kernel of a factor node (the reference's param);
  a dense kernel as it is."""
  if not fz.is_factor(node):
    return node
  if isinstance(node, fz.Tucker):
    return fz.tucker.to_flax_kernel(node)
  W = fz.materialize(node)
  if like.ndim == 4:
    return fz.lowrank.matrix_to_conv_kernel(W, *like.shape[:2])
  return W.T


@pytest.mark.parametrize("net,x_shape,classes", [
    (Net, (8, 10), 5), (ConvNet, (4, 6, 6, 3), 3)])
def test_full_weight_gradient_equals_dense_reference(net, x_shape, classes):
  kx, ky, kp = jax.random.split(jax.random.key(1), 3)
  batch = {"x": jax.random.normal(kx, x_shape),
           "y": jax.random.randint(ky, x_shape[:1], 0, classes)}
  params = net().init(kp, batch["x"])["params"]
  # A Lora with B != 0, so W differs from its base.
  params = jax.tree.map(
      lambda x: fz.Lora(x.W0, x.A, 0.3 * jnp.ones_like(x.B), x.scale)
      if isinstance(x, fz.Lora) else x, params, is_leaf=fz.is_factor)
  ref_params = net(dense=True).init(kp, batch["x"])["params"]
  ref_params = {name: {**ref_params[name], "kernel": dense_kernel(
      params[name]["kernel"], ref_params[name]["kernel"])}
                for name in ref_params}
  ref = jax.grad(lambda p: ce_loss(net(dense=True))(p, batch)[0])(ref_params)

  got = gd.full_weight_grads(ce_loss(net()), params, batch)
  metrics = GradientDiagnostics(ce_loss(net()), updates=False)(params, batch)
  assert set(got) == set(ref_params)
  for name in ref_params:
    G = np.asarray(layer_matrix(name, ref[name]["kernel"]))
    np.testing.assert_allclose(got[name], G, rtol=1e-4, atol=1e-6)
    assert metrics[f"grad/{name}/stable_rank"] == pytest.approx(
        np_stable_rank(G), rel=1e-4)


# --- subspace overlap ----------------------------------------------------------


def test_overlap_identical_orthogonal_and_basis_invariant():
  rng = np.random.default_rng(0)
  Q = orth(rng, 30, 12)
  X, Y = Q[:, :4], Q[:, 4:8]
  ones = jnp.ones(4, bool)
  ov = lambda A, B: float(gd.overlap(jnp.asarray(A, jnp.float32), ones,
                                     jnp.asarray(B, jnp.float32), ones))
  assert ov(X, X) == pytest.approx(1.0, abs=1e-6)
  assert ov(X, Y) == pytest.approx(0.0, abs=1e-6)
  # Half of Z in span(X): overlap 1/2, and a change of basis inside either
  # subspace changes nothing.
  Z = np.concatenate([X[:, :2], Y[:, :2]], axis=1)
  R1, R2 = orth(rng, 4, 4), orth(rng, 4, 4)
  assert ov(X, Z) == pytest.approx(0.5, abs=1e-6)
  assert ov(X @ R1, Z @ R2) == pytest.approx(0.5, abs=1e-6)
  assert ov(X @ R1, X @ R2) == pytest.approx(1.0, abs=1e-6)
  A, B = orth(rng, 30, 4), orth(rng, 30, 4)
  assert ov(A, B) == pytest.approx(np_overlap(A, B), abs=1e-6)
  # Masked (numerically absent) directions count for nothing; none at all:
  # no overlap defined.
  part = jnp.array([True, True, False, False])
  assert float(gd.overlap(jnp.asarray(X, jnp.float32), part,
                          jnp.asarray(Z, jnp.float32), part)) == pytest.approx(
                              1.0, abs=1e-6)
  none = jnp.zeros(4, bool)
  assert np.isnan(float(gd.overlap(jnp.asarray(X, jnp.float32), none,
                                   jnp.asarray(X, jnp.float32), ones)))


def test_update_keys_across_calls_match_numpy():
  """First call: no update keys; second: the update's norms; third on: the
  overlap with the previous update's top-k subspace."""
  rng = np.random.default_rng(2)
  k = 3
  Ws = [rng.standard_normal((20, 14)) for _ in range(3)]

  def params(W):        # a dense (in, out) kernel and a LowRank node
    return {"a": {"kernel": jnp.asarray(W.T, jnp.float32)},
            "b": {"kernel": fz.lowrank.from_dense(jnp.asarray(W, jnp.float32),
                                                  4, capacity=8)}}

  g = GradientDiagnostics(None, gradients=False, top_k=k)
  assert g(params(Ws[0])) == {}
  second = g(params(Ws[1]))
  third = g(params(Ws[2]))
  assert not any(key.endswith("/overlap") for key in second)
  for name in ("a", "b"):
    mats = [np.asarray(fz.as_matrix(params(W)[name]["kernel"]) if name == "b"
                       else W, np.float64) for W in Ws]
    D1, D2 = mats[1] - mats[0], mats[2] - mats[1]
    assert second[f"update/{name}/norm_frobenius"] == pytest.approx(
        np.linalg.norm(D1), rel=1e-5)
    assert third[f"update/{name}/stable_rank"] == pytest.approx(
        np_stable_rank(D2), rel=1e-4)
    assert third[f"update/{name}/overlap"] == pytest.approx(
        np_overlap(np_top_left(D1, k), np_top_left(D2, k)), abs=1e-4)


def test_one_metrics_program_across_capacity_changes():
  """A rank-adaptive method moving a capacity retraces only the small
  program that forms the dense weights."""
  C = jnp.asarray(known(20, 14, [3.0, 1.0], seed=4)[0], jnp.float32)
  g = GradientDiagnostics(linear_loss(C), top_k=3)
  for i, capacity in enumerate((6, 6, 4, 8)):
    node = fz.lowrank.init(jax.random.key(i), 20, 14, 3, capacity=capacity)
    out = g({"fc": {"kernel": node}})
    assert out["grad/fc/stable_rank"] == pytest.approx(1 + 1 / 9, rel=1e-4)
  assert "update/fc/overlap" in out
  assert g.num_traces == 1


def test_update_k_validated():
  c = config_utils.base_config()
  c.diagnostics.update_k = 0
  with pytest.raises(config_utils.ConfigError, match="diagnostics.update_k"):
    config_utils.validate(c)


# --- in a run ------------------------------------------------------------------


def digits_config(steps):
  """digits runlocal, diagnostics every 2 steps, checkpoints every 2, a
  constant learning rate (the same steps whatever num_steps)."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  c = digits.get_config("runlocal")
  c.train.num_steps, c.train.checkpoint_every = steps, 2
  c.optimizer.schedule = "constant"
  return c


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """Workdir of a 4-step run: diagnostics at steps 0, 2 and 4."""
  wd = str(tmp_path_factory.mktemp("full"))
  train.train_and_evaluate(digits_config(4), wd)
  return wd


def rows_of(wd):
  return [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]


def test_keys_in_metrics_at_diagnostics_cadence(full_run):
  rows = rows_of(full_run)
  steps = lambda key: sorted(r["step"] for r in rows if key in r)
  for layer in ("fc1", "fc2", "head"):
    for m in ("stable_rank", "norm_spectral", "norm_frobenius"):
      assert steps(f"grad/{layer}/{m}") == [0, 2, 4]
      assert steps(f"update/{layer}/{m}") == [2, 4]
    assert steps(f"update/{layer}/overlap") == [4]
    overlap = next(r for r in rows if f"update/{layer}/overlap" in r)
    assert 0.0 <= overlap[f"update/{layer}/overlap"] <= 1.0 + 1e-6
  # Step 0's gradient is the one of the first training batch at the
  # initial weights.
  run = train.build_run(digits_config(4))
  batch = next(train.train_batches(run, 0))
  G = gd.full_weight_grads(run.loss_fn, run.init_params,
                           jax.tree.map(jnp.asarray, batch))
  row0 = next(r for r in rows if "grad/fc1/stable_rank" in r)
  for layer in ("fc1", "fc2", "head"):
    assert row0[f"grad/{layer}/stable_rank"] == pytest.approx(
        np_stable_rank(G[layer]), rel=1e-4)


@pytest.mark.tier2     # a run and its resume end to end (9 s warm)
def test_resume_restarts_update_keys_and_keeps_grad_keys(full_run, tmp_path):
  """A run resumed at step 2 logs at step 4 the grad/ values of the
  uninterrupted run, and no update/ keys (their memory starts afresh)."""
  def at(wd, step):
    return {k: v for r in rows_of(wd) if r["step"] == step
            for k, v in r.items() if k.startswith(("grad/", "update/"))}

  part = str(tmp_path)
  train.train_and_evaluate(digits_config(2), part)
  train.train_and_evaluate(digits_config(4), part)
  want, got = at(full_run, 4), at(part, 4)
  assert "update/fc1/overlap" in want
  assert got == {k: v for k, v in want.items() if k.startswith("grad/")}
  assert at(part, 2) == at(full_run, 2)
