"""KLS / rank-adaptive BUG (DLRT): invariants, a matrix ODE, dense limit,
rank recovery, buckets and compile counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrtrain import factorizations as fz
from lrtrain import integrators
from lrtrain.factorizations import lowrank
from lrtrain.integrators import base, geolora, kls


def _mat_loss(p, b):
  """0.5 ||W - A||^2 for the single factor at 'w'."""
  return 0.5 * jnp.sum(jnp.square(fz.materialize(p["w"]) - b["A"])), {}


def _ortho_err(f):
  mask = base.column_mask(f.rank, f.capacity)
  err = lambda X: float(jnp.max(jnp.abs(X.T @ X - jnp.diag(mask))))
  return max(err(f.U.astype(jnp.float32)), err(f.V.astype(jnp.float32)))


@pytest.mark.parametrize("adaptive", [True, False])
def test_orthonormal_after_1000_random_steps(adaptive):
  n, m = 12, 9
  p = {"w": lowrank.init(jax.random.PRNGKey(0), n, m, 3)}
  integ = kls.make(optax.sgd(0.3, momentum=0.9), adaptive=adaptive, tau=0.3,
                   r_min=1, r_max=6)
  p, _, _ = integ.resize(p, None)
  st = integ.init(p)

  def body(carry, key):
    p, st = carry
    A = jax.random.normal(key, (n, m))
    p, st, aux = integ.step(_mat_loss, p, st, {"A": A})
    return (p, st), aux["rank/w"]

  (p, st), ranks = jax.jit(lambda c, k: jax.lax.scan(body, c, k))(
      (p, st), jax.random.split(jax.random.PRNGKey(1), 1000))
  assert _ortho_err(p["w"]) < 1e-5
  if adaptive:
    assert len(set(np.asarray(ranks).tolist())) > 1  # the rank did move
  # Inactive columns stay exactly zero.
  r = int(p["w"].rank)
  assert np.all(np.asarray(p["w"].U[:, r:]) == 0)
  assert np.all(np.asarray(p["w"].S[r:]) == 0)


def test_basis_change_alone_leaves_W_unchanged():
  n, m, r = 16, 12, 3
  f = lowrank.resize(lowrank.init(jax.random.PRNGKey(0), n, m, r), 8)
  D = jax.random.normal(jax.random.PRNGKey(1), (n, 8)) * base.column_mask(r, 8)
  E = jax.random.normal(jax.random.PRNGKey(2), (m, 8)) * base.column_mask(r, 8)
  Uh, Vh = base.augment(f.U, D, f.rank), base.augment(f.V, E, f.rank)
  assert _ortho_err(fz.LowRank(Uh, f.S, Vh, jnp.int32(2 * r))) < 1e-5
  S0 = (Uh.T @ f.U) @ f.S @ (f.V.T @ Vh)
  np.testing.assert_allclose(Uh @ S0 @ Vh.T, lowrank.materialize(f), atol=1e-5)

  # The same through a whole KLS step with a zero learning rate and tau = 0:
  # augmentation, Galerkin projection and truncation keep W.
  p = {"w": f}
  integ = kls.make(optax.sgd(0.0), tau=0.0, r_min=1)
  st = integ.init(p)
  A = jax.random.normal(jax.random.PRNGKey(3), (n, m))
  q, _, _ = jax.jit(lambda p, s: integ.step(_mat_loss, p, s, {"A": A}))(p, st)
  np.testing.assert_allclose(lowrank.materialize(q["w"]),
                             lowrank.materialize(f), atol=1e-5)


def _koch_lubich(n, r, h, t_end=1.0):
  """Y(t) from fixed-rank KLS on A(t) = exp(t W1) e^t D exp(t W2)^T, with the
  time derivative of A as the negative gradient (plain SGD, step h)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  skew = lambda k: (lambda X: (X - X.T) / 2)(jax.random.normal(k, (n, n)))
  W1, W2 = skew(k1), skew(k2)
  D = jnp.diag(2.0 ** -jnp.arange(1, n + 1, dtype=jnp.float32))
  E = jax.scipy.linalg.expm

  def A(t):
    return E(t * W1) @ (jnp.exp(t) * D) @ E(t * W2).T

  def A_dot(t):
    a = A(t)
    return W1 @ a + a + a @ W2.T

  integ = kls.make(optax.sgd(h), adaptive=False)
  p = {"w": lowrank.from_dense(A(0.0), r)}
  st = integ.init(p)
  lin = lambda p, b: (-jnp.sum(fz.materialize(p["w"]) * b["G"]), {})

  def body(carry, t):
    p, st = carry
    p, st, _ = integ.step(lin, p, st, {"G": A_dot(t)})
    return (p, st), None

  steps = int(round(t_end / h))
  (p, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, h * jnp.arange(steps)))(
      (p, st))
  At = A(t_end)
  best = float(jnp.linalg.norm(jnp.linalg.svd(At, compute_uv=False)[r:]))
  Y = lowrank.materialize(p["w"])
  return Y, float(jnp.linalg.norm(Y - At)), best


def test_matrix_ode_error_at_best_approximation_level_and_converges():
  n, r = 16, 4
  Ys, errs = [], []
  for h in (0.02, 0.01, 0.005):
    Y, err, best = _koch_lubich(n, r, h)
    Ys.append(Y)
    errs.append(err)
    assert err < 3.0 * best, (h, err, best)
  # First-order convergence of the integrator: differences between
  # successive halvings shrink about twofold.
  d1 = float(jnp.linalg.norm(Ys[0] - Ys[1]))
  d2 = float(jnp.linalg.norm(Ys[1] - Ys[2]))
  assert d2 < 0.7 * d1, (d1, d2)


@pytest.mark.parametrize("adaptive", [True, False])
def test_full_rank_small_step_matches_dense_gradient_step(adaptive):
  # float64: in float32 the rounding of W (~1e-7 |W|) is already ~2% of a
  # step h G at h = 1e-3.
  with jax.enable_x64(True):
    _full_rank_step(adaptive)


def _full_rank_step(adaptive):
  n = 8
  key = jax.random.PRNGKey(0)
  f64 = jnp.float64
  W = jax.random.normal(key, (n, n), f64)
  X = jax.random.normal(jax.random.PRNGKey(1), (32, n), f64)
  T = jnp.tanh(jax.random.normal(jax.random.PRNGKey(2), (32, n), f64))

  def loss(p, b):
    w = p["w"]
    Wd = fz.materialize(w) if fz.is_factor(w) else w
    return jnp.mean(jnp.square(jnp.tanh(b["x"] @ Wd.T) - b["t"])), {}

  batch = {"x": X, "t": T}
  G = jax.grad(lambda w: loss({"w": w}, batch)[0])(W)
  for h in (1e-2, 1e-3):
    p = {"w": lowrank.from_dense(W, n)}
    integ = kls.make(optax.sgd(h), adaptive=adaptive, tau=0.0, r_min=n,
                     r_max=n)
    q, _, _ = integ.step(loss, p, integ.init(p), batch)
    dW = lowrank.materialize(q["w"]) - lowrank.materialize(p["w"])
    rel = float(jnp.linalg.norm(dW + h * G) / (h * jnp.linalg.norm(G)))
    assert rel < 30 * h, (h, rel)


def _teacher_problem(n=32, m=24, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  Ut = lowrank.random_orthonormal(k1, n, 5)
  Vt = lowrank.random_orthonormal(k2, m, 5)
  W_star = Ut @ jnp.diag(jnp.array([4.0, 3.5, 3.0, 2.5, 2.0])) @ Vt.T
  X = jax.random.normal(k3, (256, m))
  return {"x": X, "y": X @ W_star.T}


def _reg_loss(p, b):
  y = fz.apply(p["w"], b["x"])
  return 0.5 * jnp.mean(jnp.sum(jnp.square(y - b["y"]), -1)), {}


def _run(integ, p, batch, steps, resize_every=25):
  p, _, _ = integ.resize(p, None)
  st = integ.init(p)
  step = jax.jit(lambda p, s: integ.step(_reg_loss, p, s, batch))
  caps = {p["w"].capacity}
  for i in range(steps):
    p, st, aux = step(p, st)
    if (i + 1) % resize_every == 0:
      p, st, _ = integ.resize(p, st)
      caps.add(p["w"].capacity)
  return p, st, aux, step, caps


@pytest.mark.parametrize("r0", [2, 30])
def test_rank_adaptive_recovers_teacher_rank(r0):
  batch = _teacher_problem()
  p = {"w": lowrank.init(jax.random.PRNGKey(1), 32, 24, min(r0, 24),
                         scale=0.1)}
  integ = kls.make(optax.sgd(0.3), tau=0.02, r_min=1, r_max=24)
  p, _, aux, _, _ = _run(integ, p, batch, 300)
  assert abs(int(p["w"].rank) - 5) <= 1
  assert float(aux["loss"]) < 1e-3
  assert _ortho_err(p["w"]) < 1e-5


def test_compiles_once_per_bucket():
  batch = _teacher_problem()
  p = {"w": lowrank.init(jax.random.PRNGKey(1), 32, 24, 2, scale=0.1)}
  integ = kls.make(optax.sgd(0.3), tau=0.02, r_min=1)
  p, _, _, step, caps = _run(integ, p, batch, 150, resize_every=10)
  assert len(caps) >= 2                  # the buffer moved bucket
  assert step._cache_size() == len(caps)  # one compile per capacity used


@pytest.mark.parametrize("opt", ["adam_cosine", "sgd_momentum"])
def test_transport_does_not_hurt(opt):
  batch = _teacher_problem()
  losses = {}
  for transport in (False, True):
    tx = (optax.adam(optax.cosine_decay_schedule(0.02, 300))
          if opt == "adam_cosine" else optax.sgd(0.1, momentum=0.9))
    p = {"w": lowrank.init(jax.random.PRNGKey(1), 32, 24, 8, scale=0.1)}
    integ = kls.make(tx, tau=0.02, r_min=1, transport=transport)
    p, _, aux, _, _ = _run(integ, p, batch, 300)
    losses[transport] = float(aux["loss"])
    assert abs(int(p["w"].rank) - 5) <= 1
  assert losses[True] <= 1.5 * losses[False] + 1e-8, losses


def test_state_has_separate_kl_and_s_optimizers():
  p = {"w": lowrank.init(jax.random.PRNGKey(0), 10, 8, 2), "b": jnp.ones(10)}
  integ = kls.make(optax.adam(1e-2))
  p, _, _ = integ.resize(p, None)
  st = integ.init(p)
  # Adam's step counters advance once per step in each sub-step.
  batch = {"x": jnp.ones((4, 8)), "y": jnp.zeros((4, 10))}
  loss = lambda p, b: (jnp.sum(jnp.square(fz.apply(p["w"], b["x"]) + p["b"]
                                          - b["y"])), {})
  _, st, _ = integ.step(loss, p, st, batch)
  counts = [int(x) for x in jax.tree.leaves(st) if x.dtype == jnp.int32]
  assert counts == [1, 1]


def test_bias_updates_in_s_step_and_frozen_base_untouched():
  W0 = jax.random.normal(jax.random.PRNGKey(0), (10, 8))
  p = {"w": lowrank.from_dense(W0, 2, frozen_base=True), "b": jnp.zeros(10)}
  integ = kls.make(optax.sgd(0.1), tau=0.0)
  p, _, _ = integ.resize(p, None)
  st = integ.init(p)
  batch = {"x": jax.random.normal(jax.random.PRNGKey(1), (16, 8)),
           "y": jnp.ones((16, 10))}
  loss = lambda p, b: (jnp.mean(jnp.square(fz.apply(p["w"], b["x"]) + p["b"]
                                           - b["y"])), {})
  q, _, aux = integ.step(loss, p, st, batch)
  assert float(jnp.abs(q["b"]).max()) > 0
  np.testing.assert_array_equal(q["w"].W0, W0)
  assert float(loss(q, batch)[0]) < float(aux["loss"])


def test_registry_builds_kls_and_rejects_unknown():
  assert isinstance(integrators.build("kls", optax.sgd(0.1)), base.Integrator)
  with pytest.raises(ValueError, match="valid names"):
    integrators.build("nope", optax.sgd(0.1))


@pytest.mark.parametrize("method", ["kls", "geolora"])
def test_init_refuses_a_node_without_room_and_resize_before_init_fixes_it(method):
  """A rank-adaptive step needs capacity >= 2r to augment; at capacity =
  rank it could add no direction, silently. init says so, naming the layer;
  resize(params, None) buckets the params before init."""
  p = {"enc": {"w": lowrank.init(jax.random.PRNGKey(0), 32, 24, 4)}}
  integ = kls.make(optax.sgd(0.1)) if method == "kls" else geolora.make(
      optax.sgd(0.1))
  with pytest.raises(ValueError, match="enc/w.*rank 4 in capacity 4.*resize"):
    integ.init(p)
  q, none, changed = integ.resize(p, None)
  assert changed and none is None and q["enc"]["w"].capacity >= 8
  integ.init(q)
  # Where no larger bucket exists (capacity = min(n, m)) there is no error.
  small = {"w": lowrank.init(jax.random.PRNGKey(0), 6, 4, 3, capacity=4)}
  integ.init(small)
  # Fixed-rank KLS never augments: capacity = rank is right for it.
  kls.make(optax.sgd(0.1), adaptive=False).init(p)


def test_kl_node_derivatives_equal_autodiff_of_the_general_expression():
  """The KL node's custom VJP against jax.grad of x [(K - U S) V^T + U L^T]^T
  + x W0^T written out, at K = U S, L = V S^T, in float64, with a batch of
  leading axes (as transformers apply it)."""
  with jax.enable_x64(True):
    n, m, r = 7, 5, 3
    f = lowrank.init(jax.random.PRNGKey(0), n, m, r, dtype=jnp.float64)
    S = f.S + 0.3 * jax.random.normal(jax.random.PRNGKey(1), (r, r), jnp.float64)
    W0 = jax.random.normal(jax.random.PRNGKey(2), (n, m), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, m), jnp.float64)
    c = jax.random.normal(jax.random.PRNGKey(4), (2, 4, n), jnp.float64)
    K, L = f.U @ S, f.V @ S.T

    def ours(K, L, x):
      node = kls.KLNode(f.U, S, f.V, f.rank, W0, K, L)
      return jnp.sum(jnp.sin(fz.apply(node, x)) * c)

    def general(K, L, x):
      W = (K - f.U @ S) @ f.V.T + f.U @ L.T + W0
      return jnp.sum(jnp.sin(x @ W.T) * c)

    np.testing.assert_allclose(ours(K, L, x), general(K, L, x), rtol=1e-13)
    for a, b in zip(jax.grad(ours, (0, 1, 2))(K, L, x),
                    jax.grad(general, (0, 1, 2))(K, L, x)):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def _mlp_loss(p, b):
  h = jnp.tanh(fz.apply(p["fc1"]["kernel"], b["x"]) + p["fc1"]["bias"])
  h = jnp.tanh(fz.apply(p["fc2"]["kernel"], h) + p["fc2"]["bias"])
  logits = h @ p["out"]
  return jnp.mean(jnp.sum(jnp.square(logits - b["y"]), -1)), {}


def _mixed_loss(p, b):
  """_mlp_loss with fc2's W materialized (as XLA's convolution routine does)."""
  h = jnp.tanh(fz.apply(p["fc1"]["kernel"], b["x"]) + p["fc1"]["bias"])
  h = jnp.tanh(h @ fz.materialize(p["fc2"]["kernel"]).T + p["fc2"]["bias"])
  logits = h @ p["out"]
  return jnp.mean(jnp.sum(jnp.square(logits - b["y"]), -1)), {}


@pytest.mark.parametrize("opt,loss", [("sgd", _mlp_loss), ("adam", _mlp_loss),
                                      ("adam", _mixed_loss)])
def test_one_pass_step_equals_the_two_pass_step(opt, loss, monkeypatch):
  """Rank-adaptive, every node used once: the S sub-step's gradient comes
  from the K/L pass (layer inputs and output cotangents, or the gradient
  with respect to a materialized W) instead of a second backward pass; in
  float64 the steps agree to rounding, over steps that change ranks, with
  a (2, 3, m) batch of leading axes."""
  with jax.enable_x64(True):
    key = jax.random.PRNGKey(0)
    ks = jax.random.split(key, 6)
    f64 = jnp.float64
    p = {"fc1": {"kernel": lowrank.init(ks[0], 12, 9, 2, capacity=8, dtype=f64),
                 "bias": jnp.zeros((12,), f64)},
         "fc2": {"kernel": lowrank.init(ks[1], 10, 12, 4, capacity=8, dtype=f64),
                 "bias": 0.1 * jnp.ones((10,), f64)},
         "out": jax.random.normal(ks[2], (10, 4), f64)}
    tx = optax.sgd(0.05, momentum=0.9) if opt == "sgd" else optax.adam(1e-2)
    integ = kls.make(tx, adaptive=True, tau=0.4, r_min=1, r_max=4)
    batches = [{"x": jax.random.normal(k, (2, 3, 9), f64),
                "y": jax.random.normal(jax.random.fold_in(k, 1), (2, 3, 4), f64)}
               for k in jax.random.split(ks[3], 5)]
    assert kls._single_inputs(loss, p, batches[0]) is not None

    def run():
      q, st = p, integ.init(p)
      step = jax.jit(lambda q, st, b: integ.step(loss, q, st, b))
      ranks = [(2, 4)]
      for b in batches:
        q, st, aux = step(q, st, b)
        ranks.append(tuple(int(v) for k, v in sorted(aux.items())
                           if k.startswith("rank/")))
      return q, ranks

    one, ranks = run()
    monkeypatch.setattr(kls, "_single_inputs", lambda *a: None)
    two, ranks2 = run()
    assert ranks == ranks2 and len(set(ranks)) > 1, ranks
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


def test_shared_nodes_take_the_two_pass_step():
  p = {"w": lowrank.init(jax.random.PRNGKey(0), 6, 5, 2, capacity=4)}
  b = {"A": jnp.zeros((6, 5)), "x": jnp.ones((3, 5))}
  assert kls._single_inputs(_mat_loss, p, b) == [None]   # materialized once
  both = lambda p, b: (_mat_loss(p, b)[0] + jnp.sum(fz.apply(p["w"], b["x"])), {})
  assert kls._single_inputs(both, p, b) is None
  twice = lambda p, b: (jnp.sum(fz.apply(p["w"], b["x"]))
                        + jnp.sum(fz.apply(p["w"], 2 * b["x"])), {})
  assert kls._single_inputs(twice, p, b) is None
  once = lambda p, b: (jnp.sum(fz.apply(p["w"], b["x"])), {})
  (x, y), = kls._single_inputs(once, p, b)
  assert x.shape == (3, 5) and y.shape == (3, 6)


@pytest.mark.parametrize("method", ["kls", "geolora"])
@pytest.mark.parametrize("rank", [3, 5])
def test_pass_at_half_width_without_a_branch(method, rank, monkeypatch):
  """With r_max <= C / 2 the forward + backward runs at half width outside
  a branch (`base.at_active_width` given the rank bound); a rank above
  C / 2 (rank 5 in capacity 8: a state no step of these settings leaves,
  which `init` refuses) takes the full-width pass. Both agree with the
  branching form to rounding in float64, with a convolution in the model
  (which keeps the branching form at full width on the CPU)."""
  with jax.enable_x64(True):
    f64 = jnp.float64
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    fc = lambda r: lowrank.resize(lowrank.init(ks[0], 16, 12, r, dtype=f64), 8)
    p = {"fc": fc(rank), "conv": jax.random.normal(ks[1], (3, 3, 1, 2), f64)}

    def loss(q, b):
      h = jax.lax.conv_general_dilated(
          b["img"], q["conv"], (1, 1), "SAME",
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = jnp.concatenate([b["x"], h.reshape(h.shape[0], -1)[:, :4]], 1)
      return jnp.mean(jnp.square(fz.apply(q["fc"], x) - b["y"])), {}

    b = {"x": jax.random.normal(ks[2], (6, 8), f64),
         "img": jax.random.normal(ks[3], (6, 4, 4, 1), f64),
         "y": jax.random.normal(ks[4], (6, 16), f64)}
    integ = integrators.build(method, optax.sgd(0.1, momentum=0.9), tau=0.2,
                              r_min=1, r_max=4)
    st0 = integ.init({**p, "fc": fc(3)})     # same shapes, room for init
    orig = base.at_active_width
    bounds = []

    def spy(fn, params, bound=None, then=None):
      bounds.append(bound)
      return orig(fn, params, bound, then)

    def run(at):
      monkeypatch.setattr(base, "at_active_width", at)
      q, s = p, st0
      step = jax.jit(lambda q, s: integ.step(loss, q, s, b))
      for _ in range(3):
        q, s, _ = step(q, s)
      return q

    new = run(spy)
    old = run(lambda fn, params, bound=None, then=None: orig(fn, params, None,
                                                            then))
    assert bounds and all(bd is not None for bd in bounds)
    assert int(new["fc"].rank) <= 4
    for a, c in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
      np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-12)
