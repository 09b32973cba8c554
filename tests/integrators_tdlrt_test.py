"""Tests for lrtrain.integrators.tdlrt (Tucker BUG)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrtrain import factorizations as fz
from lrtrain.factorizations import lowrank, tucker
from lrtrain.integrators import base, tdlrt

CH = (True, True, False, False)


def _orth_err(U, r):
  U = np.asarray(U, np.float64)[:, :int(r)]
  return np.abs(U.T @ U - np.eye(U.shape[1])).max()


def _tucker(key, shape=(6, 5, 3, 3), ranks=(3, 2, 3, 3), caps=(4, 4, 3, 3)):
  return tucker.init(key, *shape, ranks, capacities=caps)


def test_k_gradient_matches_explicit_k_parametrisation():
  f = _tucker(jax.random.PRNGKey(0))
  A = jax.random.normal(jax.random.PRNGKey(1), f.shape)
  B = jax.random.uniform(jax.random.PRNGKey(2), f.shape)
  loss_C = lambda C: jnp.sum(A * C) + 0.5 * jnp.sum(B * C * C * C)
  core, Us, r = tdlrt.view(f)
  caps = core.shape

  @jax.jit
  def compute(f):
    g = jax.grad(lambda t: loss_C(tucker.materialize(t)), allow_int=True)(f)
    Ks, gKs, Rs = tdlrt.k_factors(f, g, (True,) * 4)
    kernels, exacts = [], []
    for i in range(4):
      others = [caps[j] for j in range(4) if j != i]
      # Kernel as a function of K_i: Mat_i(C) = K_i R_i^T W_i^T.
      core_k = jnp.moveaxis(Rs[i].T.reshape(caps[i], *others), 0, i)

      def kernel(K, i=i, core_k=core_k):
        factors = list(f.factors)
        factors[i] = K
        return tucker.materialize(fz.Tucker(core_k, *factors, f.ranks))
      kernels.append(kernel(Ks[i]))
      exacts.append(jax.grad(lambda K, kernel=kernel: loss_C(kernel(K)))(
          Ks[i]))
    return gKs, kernels, exacts

  gKs, kernels, exacts = compute(f)
  for i in range(4):
    # The parametrisation reproduces the kernel at K_i ...
    np.testing.assert_allclose(kernels[i], tucker.materialize(f), atol=1e-5)
    # ... and its exact gradient equals g_U S^-T on the active columns.
    exact = exacts[i]
    ri = int(r[i])
    np.testing.assert_allclose(gKs[i][:, :ri], exact[:, :ri], rtol=1e-3,
                               atol=1e-4)
    np.testing.assert_array_equal(np.asarray(gKs[i][:, ri:]), 0.0)


@pytest.mark.parametrize("adaptive", [True, False])
def test_basis_change_alone_keeps_kernel(adaptive):
  f = _tucker(jax.random.PRNGKey(3))
  if adaptive:
    Ks = [jax.random.normal(jax.random.PRNGKey(4 + i), U.shape)
          for i, U in enumerate(f.factors)]
  else:
    # orth(K) with K = U S_i spans U when S_i is nonsingular.
    g0 = jax.tree.map(jnp.zeros_like, f)
    Ks = tdlrt.k_factors(f, g0, (True,) * 4)[0]
  aug, Ms = tdlrt.basis_step(f, Ks, (True,) * 4, adaptive=adaptive)
  np.testing.assert_allclose(tucker.materialize(aug), tucker.materialize(f),
                             atol=1e-5)
  for U, r in zip(aug.factors, aug.ranks):
    assert _orth_err(U, r) < 1e-5
  if adaptive:
    np.testing.assert_array_equal(np.asarray(aug.ranks), [4, 4, 3, 3])
  # Order 2: a LowRank node through the same step.
  w = lowrank.init(jax.random.PRNGKey(9), 7, 9, 2, capacity=4)
  Ks = [jax.random.normal(jax.random.PRNGKey(10), (7, 4)),
        jax.random.normal(jax.random.PRNGKey(11), (9, 4))]
  aug, _ = tdlrt.basis_step(w, Ks, (True, True), adaptive=True)
  np.testing.assert_allclose(fz.materialize(aug), fz.materialize(w),
                             atol=1e-5)
  assert int(aug.rank) == 4


def _np_trunc_rank(s, tau, lo, hi):
  tail = np.sqrt(np.cumsum(np.square(s)[::-1])[::-1])
  r = int(np.sum(tail > tau * tail[0]))
  return int(np.clip(r, lo, hi))


@pytest.mark.parametrize("tau,bounds", [(0.2, (1, 6)), (0.05, (1, 6)),
                                        (0.2, (1, 2)), (0.2, (5, 6))])
def test_per_mode_truncation_rule(tau, bounds):
  shape, caps = (8, 7, 3, 3), (6, 6, 3, 3)
  # Core with decaying mode spectra.
  k = jax.random.PRNGKey(12)
  core = jax.random.normal(k, caps)
  core = core * (0.5 ** jnp.arange(6))[:, None, None, None]
  core = core * (0.6 ** jnp.arange(6))[None, :, None, None]
  Us = [lowrank.random_orthonormal(jax.random.PRNGKey(13 + i), d, c)
        for i, (d, c) in enumerate(zip(shape, caps))]
  f = fz.Tucker(core, *Us, jnp.array(caps, jnp.int32))
  new, Ps = tdlrt.truncate_node(f, CH, [bounds] * 2 + [(3, 3)] * 2, tau=tau)
  S = np.asarray(core, np.float64)
  for i in range(2):
    s = np.linalg.svd(np.moveaxis(S, i, 0).reshape(caps[i], -1),
                      compute_uv=False)
    assert int(new.ranks[i]) == _np_trunc_rank(s, tau, *bounds)
    assert _orth_err(new.factors[i], new.ranks[i]) < 1e-5
    np.testing.assert_array_equal(
        np.asarray(new.factors[i][:, int(new.ranks[i]):]), 0.0)
  np.testing.assert_array_equal(np.asarray(new.ranks[2:]), [3, 3])
  if bounds == (1, 6):
    # HOSVD bound: ||C - C_trunc||^2 <= sum_i tail_i^2 <= 2 tau^2 ||S||^2.
    err = np.linalg.norm(np.asarray(tucker.materialize(new))
                         - np.asarray(tucker.materialize(f)))
    assert err <= np.sqrt(2) * tau * np.linalg.norm(S) * (1 + 1e-4)


# ---------------------------------------------------------------------------
# Training: a conv (Tucker) + fc (LowRank) model.
# ---------------------------------------------------------------------------


def _conv(kernel, x):
  if isinstance(kernel, fz.Tucker):
    return tucker.conv(kernel, x)
  return fz.conv.conv2d(x, kernel)


def _teacher_problem(key, c_in=6, c_out=8, ranks=(3, 2, 3, 3), num=24, hw=6):
  k1, k2 = jax.random.split(key)
  T = tucker.init(k1, c_out, c_in, 3, 3, ranks)
  T = fz.Tucker(T.core / jnp.linalg.norm(T.core) * 3.0, *T.factors, T.ranks)
  x = jax.random.normal(k2, (num, hw, hw, c_in))
  return T, {"x": x, "y": tucker.conv(T, x)}


def _conv_loss(params, batch):
  y = _conv(params["conv"], batch["x"]) + params["b"]
  return jnp.mean(jnp.sum(jnp.square(y - batch["y"]), -1)), {}


@pytest.mark.tier2
def test_tucker_regression_recovers_teacher_ranks():
  teacher, batch = _teacher_problem(jax.random.PRNGKey(20))
  params = {"conv": tucker.init(jax.random.PRNGKey(21), 8, 6, 3, 3,
                                (1, 1, 3, 3)),
            "b": jnp.zeros((8,))}
  integ = tdlrt.make(optax.sgd(0.05, momentum=0.9), tau=0.02, r_min=1)
  state = integ.init(params)
  params, state, changed = integ.resize(params, state)
  assert changed and params["conv"].core.shape[:2] == (2, 2)
  step = jax.jit(functools.partial(integ.step, _conv_loss))
  losses = []
  for t in range(150):
    params, state, aux = step(params, state, batch)
    losses.append(float(aux["loss"]))
    if t % 10 == 9:
      params, state, _ = integ.resize(params, state)
  ranks = np.asarray(params["conv"].ranks)
  assert abs(ranks[0] - 3) <= 1 and abs(ranks[1] - 2) <= 1, ranks
  assert losses[-1] < 1e-4 * losses[0], (losses[0], losses[-1])
  rel = (np.linalg.norm(tucker.materialize(params["conv"])
                        - tucker.materialize(teacher))
         / np.linalg.norm(tucker.materialize(teacher)))
  assert rel < 0.01


def _mixed_params(key):
  k1, k2 = jax.random.split(key)
  return {"conv": tucker.init(k1, 8, 6, 3, 3, (3, 3, 3, 3),
                              capacities=(6, 6, 3, 3)),
          "fc": lowrank.init(k2, 5, 8, 3, capacity=4),
          "b": jnp.zeros((5,))}


def _mixed_loss(params, batch):
  h = jnp.tanh(_conv(params["conv"], batch["x"])).mean(axis=(1, 2))
  y = fz.apply(params["fc"], h) + params["b"]
  return jnp.mean(jnp.sum(jnp.square(y - batch["t"]), -1)), {"y": y}


def _mixed_batch(key):
  """Inputs and the outputs of a teacher with the same architecture."""
  k1, k2 = jax.random.split(key)
  x = jax.random.normal(k1, (16, 5, 5, 6))
  teacher = _mixed_params(k2)
  w = teacher["fc"]
  teacher["fc"] = fz.LowRank(w.U, 5.0 * w.S, w.V, w.rank)
  t = _mixed_loss(teacher, {"x": x, "t": 0.0})[1]["y"]
  return {"x": x, "t": t}


def test_orthonormal_after_many_steps_and_one_compile():
  params = _mixed_params(jax.random.PRNGKey(30))
  batch = _mixed_batch(jax.random.PRNGKey(31))
  integ = tdlrt.make(optax.adam(3e-3), tau=0.05, weight_decay=1e-4)
  state = integ.init(params)
  traces = []

  def loss(p, b):
    traces.append(1)
    return _mixed_loss(p, b)
  step = jax.jit(functools.partial(integ.step, loss))

  def body(carry, _):
    p, s = carry
    p, s, aux = step(p, s, batch)
    return (p, s), aux["loss"]
  (params, state), losses = jax.lax.scan(body, (params, state), None,
                                         length=400)
  assert losses[-1] < 0.5 * losses[0]
  f = params["conv"]
  for U, r in zip(f.factors, f.ranks):
    assert _orth_err(U, r) < 1e-5
    np.testing.assert_array_equal(np.asarray(U[:, int(r):]), 0.0)
  np.testing.assert_array_equal(np.asarray(f.ranks[2:]), [3, 3])
  cm = tdlrt.core_mask(f.ranks, f.core.shape)
  np.testing.assert_array_equal(np.asarray(f.core * (1 - cm)), 0.0)
  w = params["fc"]
  assert _orth_err(w.U, w.rank) < 1e-5 and _orth_err(w.V, w.rank) < 1e-5
  # Traced twice at most: once for the step, once under scan.
  assert len(traces) <= 4


def test_zero_gradient_step_keeps_kernels():
  params = _mixed_params(jax.random.PRNGKey(32))
  const = lambda p, b: (0.0 * _mixed_loss(p, b)[0], {})  # zero gradients
  # r_max = 4: the default floor(min(n, m) / 2) = 2 of the 5 x 8 fc layer
  # would truncate its rank 3.
  integ = tdlrt.make(optax.sgd(0.1, momentum=0.9), tau=0.0, r_max=4)
  new, _, aux = jax.jit(functools.partial(integ.step, const))(
      params, integ.init(params), _mixed_batch(jax.random.PRNGKey(33)))
  np.testing.assert_allclose(tucker.materialize(new["conv"]),
                             tucker.materialize(params["conv"]), atol=1e-5)
  np.testing.assert_allclose(fz.materialize(new["fc"]),
                             fz.materialize(params["fc"]), atol=1e-5)
  assert "rank/conv" in aux and "rank/fc" in aux


def test_fixed_rank_and_adapt_spatial():
  params = _mixed_params(jax.random.PRNGKey(34))
  batch = _mixed_batch(jax.random.PRNGKey(35))
  integ = tdlrt.make(optax.sgd(0.05), adaptive=False)
  state = integ.init(params)
  step = jax.jit(functools.partial(integ.step, _mixed_loss))
  l0 = None
  for _ in range(30):
    params, state, aux = step(params, state, batch)
    l0 = l0 or float(aux["loss"])
  assert float(aux["loss"]) < l0
  np.testing.assert_array_equal(np.asarray(params["conv"].ranks), [3] * 4)
  assert integ.resize(params, state)[2] is False
  # Spatial modes adapt too: with a large tau they shrink below 3.
  params = _mixed_params(jax.random.PRNGKey(36))
  integ = tdlrt.make(optax.sgd(0.01), tau=0.6, r_min=1, adapt_spatial=True)
  new, _, _ = jax.jit(functools.partial(integ.step, _mixed_loss))(
      params, integ.init(params), batch)
  assert int(new["conv"].ranks[2]) < 3


def test_resize_buckets_and_state():
  params = {"conv": tucker.init(jax.random.PRNGKey(40), 16, 12, 3, 3,
                                (3, 2, 3, 3)),
            "fc": lowrank.init(jax.random.PRNGKey(41), 5, 16, 3),
            "b": jnp.zeros((5,))}
  integ = tdlrt.make(optax.adam(1e-3))
  state = integ.init(params)
  K0 = [tucker.materialize(params["conv"]), fz.materialize(params["fc"])]
  params, state, changed = integ.resize(params, state)
  assert changed
  assert params["conv"].core.shape == (8, 4, 3, 3)
  assert params["fc"].capacity == 5     # bucket(3) = 8, capped at min(5, 16)
  np.testing.assert_allclose(tucker.materialize(params["conv"]), K0[0],
                             atol=1e-6)
  np.testing.assert_allclose(fz.materialize(params["fc"]), K0[1], atol=1e-6)
  # The resized state fits: a step runs and a second resize is a no-op.
  conv_only = lambda p, b: (jnp.sum(jnp.square(
      tucker.conv(p["conv"], b))) + jnp.sum(jnp.square(
          fz.apply(p["fc"], jnp.ones((2, 16))))), {})
  x = jax.random.normal(jax.random.PRNGKey(42), (2, 5, 5, 12))
  params, state, _ = jax.jit(functools.partial(integ.step, conv_only))(
      params, state, x)
  assert integ.resize(params, state)[2] is False


def test_registry():
  from lrtrain import integrators
  integ = integrators.build("tdlrt", optax.sgd(0.1), tau=0.1)
  assert isinstance(integ, base.Integrator)
  with pytest.raises(ValueError, match="unknown option"):
    integrators.build("tdlrt", optax.sgd(0.1), tau=0.1, variant="mean")
  with pytest.raises(ValueError):
    tdlrt.make(optax.sgd(0.1), tau=1.5)
