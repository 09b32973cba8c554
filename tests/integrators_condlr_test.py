"""Tests for lrtrain.integrators.condlr (CondLR)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrtrain import factorizations as fz
from lrtrain.factorizations import lowrank
from lrtrain.integrators import base, condlr


def _kappa(S, r):
  s = np.linalg.svd(np.asarray(S, np.float64)[:r, :r], compute_uv=False)
  return s[0] / s[-1]


def _orth_err(U, r):
  U = np.asarray(U, np.float64)
  return np.abs(U[:, :r].T @ U[:, :r] - np.eye(r)).max()


def _problem(key, n=12, m=10, r_true=3, num=64):
  """Regression y = x W*^T with a rank-r_true teacher."""
  k1, k2, k3 = jax.random.split(key, 3)
  W = (jax.random.normal(k1, (n, r_true)) @ jax.random.normal(k2, (r_true, m))
       / np.sqrt(m))
  x = jax.random.normal(k3, (num, m))
  return {"x": x, "y": x @ W.T}


def _loss(params, batch):
  y = fz.apply(params["w"], batch["x"]) + params["b"]
  return jnp.mean(jnp.sum(jnp.square(y - batch["y"]), -1)), {}


def _params(key, n=12, m=10, rank=4, capacity=None):
  return {"w": lowrank.init(key, n, m, rank, capacity=capacity),
          "b": jnp.zeros((n,))}


def _run(integ, params, batch, steps):
  state = integ.init(params)
  step = jax.jit(functools.partial(integ.step, _loss))
  hist = []
  for _ in range(steps):
    params, state, aux = step(params, state, batch)
    hist.append((params, float(aux["loss"])))
  return params, hist


def test_condlr_rank():
  assert condlr.condlr_rank(100, 200, 0.8) == 20
  assert condlr.condlr_rank(100, 200, 0.5) == 50
  assert condlr.condlr_rank(10, 7, 0.5) == 4     # ceil(3.5)
  assert condlr.condlr_rank(3, 3, 0.99) == 1
  with pytest.raises(ValueError):
    condlr.condlr_rank(3, 3, 1.0)


def test_bad_variant():
  with pytest.raises(ValueError):
    condlr.make(optax.sgd(0.1), variant="nope")


def test_tangent_projection_orthogonal_to_U():
  key = jax.random.PRNGKey(0)
  U = lowrank.random_orthonormal(key, 9, 5) * lowrank.column_mask(3, 5)
  G = jax.random.normal(jax.random.PRNGKey(1), (9, 5))
  P = condlr.tangent_project(U, G, 3)
  np.testing.assert_allclose(U.T @ P, 0.0, atol=1e-6)
  np.testing.assert_allclose(P[:, 3:], 0.0)
  # Idempotent, and the part removed lies in span(U).
  np.testing.assert_allclose(condlr.tangent_project(U, P, 3), P, atol=1e-6)
  removed = G[:, :3] - P[:, :3]
  np.testing.assert_allclose(U @ (U.T @ removed), removed, atol=1e-5)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_approx_orth_kappa_bound_every_step(tau):
  key = jax.random.PRNGKey(2)
  batch = _problem(key)
  params = _params(jax.random.PRNGKey(3))
  integ = condlr.make(optax.sgd(0.05, momentum=0.9), variant="approx_orth",
                      kappa_tau=tau)
  _, hist = _run(integ, params, batch, 60)
  for p, _ in hist:
    assert _kappa(p["w"].S, 4) <= 1 + tau + 1e-4


def test_condition_core_math():
  S = jnp.diag(jnp.array([10.0, 1.0, 0.1, 0.0]))
  S = S.at[0, 1].set(2.0)
  for tau in (0.0, 0.2):
    T = condlr.condition_core(S, 3, "approx_orth", tau)
    assert _kappa(T, 3) <= 1 + tau + 1e-4
    np.testing.assert_allclose(T[3], 0.0)
    np.testing.assert_allclose(T[:, 3], 0.0)
  # Clipping puts the singular values in [mu - e, mu + e] (mu the old mean)
  # and keeps the singular vectors.
  T = condlr.condition_core(S, 3, "approx_orth", 0.5)
  s_old = np.linalg.svd(np.asarray(S)[:3, :3], compute_uv=False)
  u_old = np.linalg.svd(np.asarray(S)[:3, :3])[0]
  s_new = np.linalg.svd(np.asarray(T)[:3, :3], compute_uv=False)
  u_new = np.linalg.svd(np.asarray(T)[:3, :3])[0]
  mu = s_old.mean()
  e = mu * 0.5 / 2.5
  assert np.all(s_new >= mu - e - 1e-4) and np.all(s_new <= mu + e + 1e-4)
  np.testing.assert_allclose(s_new.max(), mu + e, rtol=1e-4)
  np.testing.assert_allclose(np.abs(u_new[:, 0] @ u_old[:, 0]), 1.0, atol=1e-4)
  # A singular active block stays inside the active block.
  Z = jnp.zeros((4, 4)).at[0, 0].set(1.0)
  T = condlr.condition_core(Z, 2, "approx_orth", 0.1)
  np.testing.assert_allclose(T[2:], 0.0, atol=1e-6)
  np.testing.assert_allclose(T[:, 2:], 0.0, atol=1e-6)
  assert _kappa(T, 2) <= 1.1 + 1e-4


def test_mean_variant_kappa_one_and_norm():
  S = jnp.array([[3.0, 1.0, 0.0], [0.5, 0.2, 0.0], [0.0, 0.0, 0.0]])
  T = condlr.condition_core(S, 2, "mean", 0.0)
  np.testing.assert_allclose(_kappa(T, 2), 1.0, atol=1e-4)
  np.testing.assert_allclose(jnp.linalg.norm(T), jnp.linalg.norm(S), rtol=1e-5)
  batch = _problem(jax.random.PRNGKey(4))
  integ = condlr.make(optax.sgd(0.05, momentum=0.9), variant="mean")
  _, hist = _run(integ, _params(jax.random.PRNGKey(5)), batch, 30)
  for p, _ in hist:
    assert abs(_kappa(p["w"].S, 4) - 1.0) <= 1e-4


def test_orthonormal_after_1000_steps_float32():
  batch = _problem(jax.random.PRNGKey(6), n=8, m=6, num=32)
  params = _params(jax.random.PRNGKey(7), n=8, m=6, rank=3)
  integ = condlr.make(optax.sgd(0.05, momentum=0.9), variant="approx_orth",
                      kappa_tau=0.1)
  state = integ.init(params)
  step = jax.jit(functools.partial(integ.step, _loss))

  def body(carry, _):
    p, s = carry
    p, s, _ = step(p, s, batch)
    return (p, s), None
  (params, _), _ = jax.lax.scan(body, (params, state), None, length=1000)
  w = params["w"]
  assert w.U.dtype == jnp.float32
  assert _orth_err(w.U, 3) < 1e-5
  assert _orth_err(w.V, 3) < 1e-5
  assert _kappa(w.S, 3) <= 1.1 + 1e-4


def test_loss_decreases_and_inactive_columns_stay_zero():
  batch = _problem(jax.random.PRNGKey(8))
  # capacity 6 > rank 4: the inactive buffer part must stay exactly zero.
  params = _params(jax.random.PRNGKey(9), capacity=6)
  integ = condlr.make(optax.sgd(0.02, momentum=0.9), variant="approx_orth",
                      kappa_tau=0.5, weight_decay=1e-4)
  final, hist = _run(integ, params, batch, 300)
  losses = [l for _, l in hist]
  assert losses[-1] < 0.3 * losses[0]
  w = final["w"]
  np.testing.assert_array_equal(np.asarray(w.U[:, 4:]), 0.0)
  np.testing.assert_array_equal(np.asarray(w.V[:, 4:]), 0.0)
  np.testing.assert_array_equal(np.asarray(w.S[4:]), 0.0)
  np.testing.assert_array_equal(np.asarray(w.S[:, 4:]), 0.0)
  assert int(w.rank) == 4
  assert _orth_err(w.U, 4) < 1e-5


def test_grad_scale_variants():
  S = jnp.diag(jnp.array([2.0, 1.0, 0.0]))
  np.testing.assert_allclose(condlr.grad_scale(S, 2, "mean"), 2 / 5.0,
                             rtol=1e-6)
  np.testing.assert_allclose(condlr.grad_scale(S, 2, "approx_orth"), 0.25,
                             rtol=1e-6)


def test_weight_decay_never_touches_U_V():
  # With a zero loss gradient and decay on, only S (and the bias) decay;
  # U, V stay exactly where the retraction puts them.
  params = _params(jax.random.PRNGKey(10))
  params["b"] = jnp.ones_like(params["b"])
  params["w"] = fz.LowRank(params["w"].U, jnp.diag(jnp.array([1.0, .9, .8, .7])),
                           params["w"].V, params["w"].rank)
  zero_loss = lambda p, b: (0.0 * jnp.sum(p["b"]) + 0.0 * jnp.sum(p["w"].S),
                            {})
  integ = condlr.make(optax.sgd(0.1), variant="approx_orth", kappa_tau=10.0,
                      weight_decay=0.5)
  new, _, _ = integ.step(zero_loss, params, integ.init(params), None)
  np.testing.assert_allclose(new["w"].U, params["w"].U, atol=1e-6)
  np.testing.assert_allclose(new["w"].V, params["w"].V, atol=1e-6)
  np.testing.assert_allclose(new["b"], 0.95 * params["b"], rtol=1e-6)
  np.testing.assert_allclose(new["w"].S, 0.95 * params["w"].S, rtol=1e-5,
                             atol=1e-6)


def test_registry_and_single_compile():
  from lrtrain import integrators
  integ = integrators.build("condlr", optax.adam(1e-2), variant="mean",
                            kappa_tau=0.1)
  batch = _problem(jax.random.PRNGKey(11))
  params = _params(jax.random.PRNGKey(12))
  state = integ.init(params)
  traces = []

  def loss(p, b):
    traces.append(1)
    return _loss(p, b)
  step = jax.jit(functools.partial(integ.step, loss))
  for _ in range(3):
    params, state, aux = step(params, state, batch)
  assert len(traces) == 1
  assert int(aux["rank/w"]) == 4
  assert integ.resize(params, state)[2] is False


@pytest.mark.parametrize("variant", ["approx_orth", "mean"])
@pytest.mark.parametrize("C,r", [(8, 8), (32, 20)])
def test_condition_core_eigen_route_matches_the_svd(variant, C, r, monkeypatch):
  """A well-conditioned active core (kappa ~ 1.5, the steps after the
  first) goes through the eigensolver of S^T S: the same conditioned core
  as the SVD route to float32 rounding, zero outside the active block."""
  key1, key2 = jax.random.split(jax.random.PRNGKey(7))
  A = jnp.linalg.qr(jax.random.normal(key1, (r, r)))[0]
  B = jnp.linalg.qr(jax.random.normal(key2, (r, r)))[0]
  S = jnp.zeros((C, C)).at[:r, :r].set((A * jnp.linspace(2.0, 3.0, r)) @ B.T)
  T = condlr.condition_core(S, r, variant, 0.1)
  monkeypatch.setattr(condlr, "EIGEN_ROUTE_MIN", float("inf"))  # SVD only
  T_svd = condlr.condition_core(S, r, variant, 0.1)
  np.testing.assert_allclose(T, T_svd, atol=2e-5 * float(jnp.max(jnp.abs(S))))
  assert float(jnp.sum(jnp.abs(T[r:])) + jnp.sum(jnp.abs(T[:, r:]))) == 0.0
  assert _kappa(T, r) <= (1.0 if variant == "mean" else 1.1) + 1e-4


@pytest.mark.parametrize("variant", ["approx_orth", "mean"])
def test_orthonormal_after_10000_float32_steps(variant):
  """The retraction's one-pass route (U + dU nearly orthonormal) and the
  eigensolver route of the core, 10,000 steps on noisy batches with an
  inactive column: U, V orthonormal to 1e-5, kappa(S) held, the inactive
  part exactly zero."""
  batch = _problem(jax.random.PRNGKey(6), n=8, m=6, num=32)
  params = _params(jax.random.PRNGKey(7), n=8, m=6, rank=3, capacity=4)
  integ = condlr.make(optax.sgd(0.05, momentum=0.9), variant=variant,
                      kappa_tau=0.1)
  state = integ.init(params)
  step = functools.partial(integ.step, _loss)

  def body(carry, key):
    p, s = carry
    noisy = dict(batch, y=batch["y"] + 0.3 * jax.random.normal(
        key, batch["y"].shape))
    p, s, _ = step(p, s, noisy)
    return (p, s), None

  (params, _), _ = jax.jit(lambda c, k: jax.lax.scan(body, c, k))(
      (params, state), jax.random.split(jax.random.PRNGKey(8), 10_000))
  w = params["w"]
  assert _orth_err(w.U, 3) < 1e-5 and _orth_err(w.V, 3) < 1e-5
  assert _kappa(w.S, 3) <= (1.0 if variant == "mean" else 1.1) + 1e-4
  assert float(jnp.sum(jnp.abs(w.U[:, 3:])) + jnp.sum(jnp.abs(w.S[3:]))
               + jnp.sum(jnp.abs(w.S[:, 3:]))) == 0.0
