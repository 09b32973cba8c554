"""GeoLoRA / parallel BUG: invariants, dense limit, rank recovery, the
optax-transform form, basis period and adapter fine-tuning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrtrain import factorizations as fz
from lrtrain.factorizations import lowrank
from lrtrain.integrators import base, geolora


def _ortho_err(f):
  mask = base.column_mask(f.rank, f.capacity)
  err = lambda X: float(jnp.max(jnp.abs(X.T @ X - jnp.diag(mask))))
  return max(err(f.U.astype(jnp.float32)), err(f.V.astype(jnp.float32)))


def _mat_loss(p, b):
  return 0.5 * jnp.sum(jnp.square(fz.materialize(p["w"]) - b["A"])), {}


def _reg_loss(p, b):
  y = fz.apply(p["w"], b["x"])
  return 0.5 * jnp.mean(jnp.sum(jnp.square(y - b["y"]), -1)), {}


def _teacher_problem(n=32, m=24, seed=0, base_W=None):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  Ut = lowrank.random_orthonormal(k1, n, 5)
  Vt = lowrank.random_orthonormal(k2, m, 5)
  W_star = Ut @ jnp.diag(jnp.array([4.0, 3.5, 3.0, 2.5, 2.0])) @ Vt.T
  if base_W is not None:
    W_star = W_star + base_W
  X = jax.random.normal(k3, (256, m))
  return {"x": X, "y": X @ W_star.T}


def _run(integ, p, batch, steps, resize_every=25):
  p, _, _ = integ.resize(p, None)
  st = integ.init(p)
  step = jax.jit(lambda p, s: integ.step(_reg_loss, p, s, batch))
  for i in range(steps):
    p, st, aux = step(p, st)
    if (i + 1) % resize_every == 0:
      p, st, _ = integ.resize(p, st)
  return p, st, aux


@pytest.mark.parametrize("adaptive", [True, False])
def test_orthonormal_after_1000_random_steps(adaptive):
  n, m = 12, 9
  p = {"w": lowrank.init(jax.random.PRNGKey(0), n, m, 3)}
  integ = geolora.make(optax.sgd(0.3, momentum=0.9), adaptive=adaptive,
                       tau=0.3, r_min=1, r_max=6)
  p, _, _ = integ.resize(p, None)
  st = integ.init(p)

  def body(carry, key):
    p, st = carry
    p, st, aux = integ.step(_mat_loss, p, st,
                            {"A": jax.random.normal(key, (n, m))})
    return (p, st), aux["rank/w"]

  (p, _), ranks = jax.jit(lambda c, k: jax.lax.scan(body, c, k))(
      (p, st), jax.random.split(jax.random.PRNGKey(1), 1000))
  assert _ortho_err(p["w"]) < 1e-5
  # Fixed rank never moves; the adaptive rank does on random targets.
  assert (len(set(np.asarray(ranks).tolist())) > 1) == adaptive


def test_zero_step_basis_change_leaves_W_unchanged():
  f = lowrank.resize(lowrank.init(jax.random.PRNGKey(0), 16, 12, 3), 8)
  p = {"w": f}
  integ = geolora.make(optax.sgd(0.0), tau=0.0, r_min=1)
  A = jax.random.normal(jax.random.PRNGKey(3), (16, 12))
  q, _, _ = jax.jit(lambda p, s: integ.step(_mat_loss, p, s, {"A": A}))(
      p, integ.init(p))
  np.testing.assert_allclose(lowrank.materialize(q["w"]),
                             lowrank.materialize(f), atol=1e-5)


EPS32 = float(jnp.finfo(jnp.float32).eps)


def test_full_rank_small_step_matches_dense_gradient_step():
  n = 8
  W = jax.random.normal(jax.random.PRNGKey(0), (n, n))
  X = jax.random.normal(jax.random.PRNGKey(1), (32, n))
  T = jnp.tanh(jax.random.normal(jax.random.PRNGKey(2), (32, n)))

  def loss(p, b):
    w = p["w"]
    Wd = fz.materialize(w) if fz.is_factor(w) else w
    return jnp.mean(jnp.square(jnp.tanh(b["x"] @ Wd.T) - b["t"])), {}

  batch = {"x": X, "t": T}
  G = jax.grad(lambda w: loss({"w": w}, batch)[0])(W)
  for h in (1e-2, 1e-3):
    p = {"w": lowrank.from_dense(W, n)}
    integ = geolora.make(optax.sgd(h), tau=0.0, r_min=n, r_max=n)
    q, _, _ = integ.step(loss, p, integ.init(p), batch)
    dW = lowrank.materialize(q["w"]) - W
    err = float(jnp.linalg.norm(dW + h * G))
    # First order: the gap is O(h^2) ||G||, plus float32 roundoff of the
    # factor round trip (~eps ||W||, independent of h: with ||G|| = 0.17
    # and ||W|| = 7.7 that floor is ~6e-6, i.e. 3.5% of h ||G|| at
    # h = 1e-3). A wrong direction would leave a gap of order h ||G||.
    bound = 30 * h * h * float(jnp.linalg.norm(G)) + 20 * EPS32 * float(
        jnp.linalg.norm(W))
    assert err < bound < 0.5 * h * float(jnp.linalg.norm(G)), (h, err, bound)


@pytest.mark.parametrize("r0", [2, 30])
def test_rank_adaptive_recovers_teacher_rank(r0):
  batch = _teacher_problem()
  p = {"w": lowrank.init(jax.random.PRNGKey(1), 32, 24, min(r0, 24),
                         scale=0.1)}
  integ = geolora.make(optax.sgd(0.3), tau=0.02, r_min=1, r_max=24)
  p, _, aux = _run(integ, p, batch, 300)
  assert abs(int(p["w"].rank) - 5) <= 1
  assert float(aux["loss"]) < 1e-3
  assert _ortho_err(p["w"]) < 1e-5


def test_adapter_finetuning_from_zero_core():
  W0 = jax.random.normal(jax.random.PRNGKey(5), (32, 24))
  batch = _teacher_problem(base_W=W0)
  p = {"w": lowrank.from_dense(W0, 4, frozen_base=True)}
  integ = geolora.make(optax.sgd(0.05), tau=0.02, r_min=1)
  p, _, aux = _run(integ, p, batch, 300)
  np.testing.assert_array_equal(p["w"].W0, W0)
  assert float(aux["loss"]) < 0.05 * float(_reg_loss(
      {"w": lowrank.from_dense(W0, 4, frozen_base=True)}, batch)[0])
  assert abs(int(p["w"].rank) - 5) <= 1


def test_as_transform_in_chain_matches_step():
  batch = _teacher_problem()
  p = {"w": lowrank.resize(lowrank.init(jax.random.PRNGKey(1), 32, 24, 3), 8),
       "b": jnp.zeros(32)}
  loss = lambda p, b: (_reg_loss(p, b)[0] + jnp.sum(jnp.square(p["b"] - 1)),
                       {})
  integ = geolora.make(optax.adam(1e-2), tau=0.05, r_min=1)
  chain = optax.chain(optax.masked(optax.clip_by_global_norm(1e6),
                                   base.float_mask),
                      geolora.as_transform(optax.adam(1e-2), tau=0.05, r_min=1))
  st, cst = integ.init(p), chain.init(p)
  q = p
  for _ in range(3):
    p, st, _ = integ.step(loss, p, st, batch)
    (_, _), g = base.value_and_grad(loss, q, batch)
    upd, cst = jax.jit(chain.update)(g, cst, q)
    q = optax.apply_updates(q, upd)
  assert int(q["w"].rank) == int(p["w"].rank)
  np.testing.assert_allclose(lowrank.materialize(q["w"]),
                             lowrank.materialize(p["w"]), atol=1e-4)
  np.testing.assert_allclose(q["b"], p["b"], atol=1e-5)


def test_basis_period_keeps_basis_between_basis_steps():
  batch = _teacher_problem()
  p = {"w": lowrank.resize(lowrank.init(jax.random.PRNGKey(1), 32, 24, 3), 8)}
  integ = geolora.make(optax.sgd(0.1), tau=0.02, r_min=1, basis_period=2)
  st = integ.init(p)
  step = jax.jit(lambda p, s: integ.step(_reg_loss, p, s, batch))
  moved = []
  for _ in range(6):
    q, st, _ = step(p, st)
    moved.append(not np.allclose(q["w"].U, p["w"].U))
    assert _ortho_err(q["w"]) < 1e-5
    p = q
  assert moved == [True, False, False, True, False, False]


def test_guarded_inverse():
  S = jnp.diag(jnp.array([2.0, 0.5, 0.0, 0.0]))
  np.testing.assert_allclose(base.guarded_inverse(S, 2),
                             jnp.diag(jnp.array([0.5, 2.0, 0.0, 0.0])))
  np.testing.assert_allclose(base.guarded_inverse(jnp.zeros((4, 4)), 2),
                             jnp.diag(jnp.array([1.0, 1.0, 0.0, 0.0])))


def test_guarded_inverse_diagonal_path_matches_svd_path():
  # A diagonal core takes the entrywise branch; a rotated copy of it takes
  # the SVD branch. Both must agree with the pseudo-inverse.
  d = jnp.array([3.0, -1.5, 1e-9, 0.0])
  Q = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(3), (4, 4)))[0]
  S_diag, S_rot = jnp.diag(d), Q @ jnp.diag(d) @ Q.T
  want = jnp.diag(jnp.array([1 / 3.0, -1 / 1.5, 0.0, 0.0]))
  np.testing.assert_allclose(base.guarded_inverse(S_diag, 4), want, atol=1e-6)
  np.testing.assert_allclose(base.guarded_inverse(S_rot, 4), Q @ want @ Q.T,
                             atol=1e-5)


def test_gradient_scalings_by_the_inverse_core():
  """(X S^+T, Y S^+) from `times_core_inverse` (one branch: column scalings
  for a diagonal core) equal the products with `guarded_inverse` for a
  diagonal core with a dropped value, an all-zero core and a general one."""
  ks = jax.random.split(jax.random.PRNGKey(5), 3)
  X = jax.random.normal(ks[0], (7, 4))
  Y = jax.random.normal(ks[1], (5, 4))
  Q = jnp.linalg.qr(jax.random.normal(ks[2], (4, 4)))[0]
  d = jnp.diag(jnp.array([3.0, -1.5, 1e-9, 0.0]))
  for S, r in ((d, 3), (jnp.zeros((4, 4)), 2), (Q @ d @ Q.T, 4)):
    A, B = jax.jit(base.times_core_inverse)(X, S, Y, r)
    Sinv = base.guarded_inverse(S, r)
    np.testing.assert_allclose(A, X @ Sinv.T, atol=1e-5)
    np.testing.assert_allclose(B, Y @ Sinv, atol=1e-5)


def test_guarded_inverse_of_a_general_core_in_the_first_half():
  """A non-diagonal core whose active block fits in C / 2 (what a polish
  of a core with zero values leaves) is inverted on that block: the
  pseudo-inverse, zero outside it."""
  C, r = 8, 3
  A = jax.random.normal(jax.random.PRNGKey(4), (r, r)) + 3 * jnp.eye(r)
  S = jnp.zeros((C, C)).at[:r, :r].set(A)
  want = np.zeros((C, C))
  want[:r, :r] = np.linalg.inv(np.asarray(A, np.float64))
  np.testing.assert_allclose(base.guarded_inverse(S, r), want, atol=1e-5)
  np.testing.assert_allclose(jax.jit(base.guarded_inverse)(S, r), want,
                             atol=1e-5)


def test_as_transform_warns_when_a_later_transformation_moves_the_basis():
  """as_transform must be last: optax.scale after it halves U_new - U and
  leaves U off the Stiefel manifold, which the next update reports; the
  chain with as_transform last stays silent."""
  import warnings
  batch = _teacher_problem()
  p = {"w": lowrank.resize(lowrank.init(jax.random.PRNGKey(1), 32, 24, 3), 8)}

  def run(chain):
    q, cst = p, chain.init(p)
    upd_fn = jax.jit(chain.update)
    with warnings.catch_warnings(record=True) as seen:
      warnings.simplefilter("always")
      for _ in range(3):
        (_, _), g = base.value_and_grad(_reg_loss, q, batch)
        upd, cst = upd_fn(g, cst, q)
        q = optax.apply_updates(q, upd)
      jax.effects_barrier()
    return q, [w for w in seen if "Stiefel" in str(w.message)]

  q, seen = run(optax.chain(geolora.as_transform(optax.sgd(0.1), tau=0.05,
                                                 r_min=1)))
  assert not seen and _ortho_err(q["w"]) < 1e-5
  q, seen = run(optax.chain(geolora.as_transform(optax.sgd(0.1), tau=0.05,
                                                 r_min=1), optax.scale(0.5)))
  assert seen and "w" in str(seen[0].message)
  assert _ortho_err(q["w"]) > 1e-3


def test_truncation_delay_schedule_augments_trains_then_truncates():
  """basis_period 4, delay 2: step 0 augments to 2r and keeps the core
  whole, steps 1-2 train it in the augmented basis (U fixed), step 2
  truncates it by SVD (with tau = 0 an exact rotation: W equals the plain
  step's U S1 V^T), steps 3-4 are plain, step 5 augments again."""
  n, m, r, lr = 16, 12, 3, 0.1
  A = jax.random.normal(jax.random.PRNGKey(3), (n, m))
  p = {"w": lowrank.resize(lowrank.init(jax.random.PRNGKey(0), n, m, r), 8)}
  integ = geolora.make(optax.sgd(lr), tau=0.0, r_min=1, basis_period=4,
                       truncation_delay=2)
  st = integ.init(p)
  step = jax.jit(lambda p, s: integ.step(_mat_loss, p, s, {"A": A}))
  ranks, moved = [], []
  for k in range(6):
    q, st, _ = step(p, st)
    f, g = p["w"], q["w"]
    ranks.append(int(g.rank))
    moved.append(not np.allclose(g.U, f.U))
    assert _ortho_err(g) < 1e-5
    if k == 2:
      # S1 = S - lr U^T (W - A) V on the augmented block, then rotated.
      W = lowrank.materialize(f)
      S1 = f.S - lr * f.U.T @ (W - A) @ f.V
      np.testing.assert_allclose(lowrank.materialize(g), f.U @ S1 @ f.V.T,
                                 atol=1e-5)
      S = np.asarray(g.S)
      np.testing.assert_allclose(S, np.diag(np.diag(S)), atol=1e-6)
    p = q
  assert ranks[:3] == [6, 6, 6] and ranks[3:5] == [ranks[2]] * 2
  assert ranks[5] == min(2 * ranks[4], 8)
  assert moved == [True, False, True, False, False, True]


def test_truncation_delay_lets_an_adapter_grow_from_rank_two():
  """Adapter fine-tuning (W0 frozen, S = 0) towards a rank-5 update with
  tau 0.15: with the truncation delayed after augmentation the new
  directions are trained before they compete, and the rank reaches the
  target's 5 from r0 = 2 (truncating in the augmenting step, a fresh
  direction's O(lr) singular value is always in the tail here)."""
  W0 = jax.random.normal(jax.random.PRNGKey(5), (32, 24))
  batch = _teacher_problem(base_W=W0)
  p = {"w": lowrank.from_dense(W0, 2, frozen_base=True)}
  start = float(_reg_loss(p, batch)[0])
  integ = geolora.make(optax.adam(1e-2), tau=0.15, r_min=1, basis_period=10,
                       truncation_delay=7)
  p, _, aux = _run(integ, p, batch, 396, resize_every=1)
  # Steps 0..395: augmentations at 0, 11, .., 385, truncations 7 steps
  # after each (the last at 392), plain steps 393-395.
  assert int(p["w"].rank) == 5
  assert float(aux["loss"]) < 0.01 * start
  np.testing.assert_array_equal(p["w"].W0, W0)
  assert _ortho_err(p["w"]) < 1e-5


@pytest.mark.parametrize("kw", [dict(truncation_delay=3),
                                dict(basis_period=2, truncation_delay=3),
                                dict(basis_period=4, truncation_delay=2,
                                     adaptive=False)])
def test_truncation_delay_outside_the_period_is_refused(kw):
  with pytest.raises(ValueError, match="truncation_delay"):
    geolora.make(optax.sgd(0.1), **kw)


@pytest.mark.parametrize("rank", [3, 5])
def test_update_inside_the_pass_branch_matches_the_transform(rank):
  """The step scales the factor gradients and runs the optimizer inside
  the half-width pass's branch (`base.at_active_width`'s `then`, with the
  half-width core); `as_transform` takes full-width gradients from outside
  and updates after. Both agree to rounding in float64, for a rank in the
  first half of the buffer (the half-width branch) and above it (rank 5 in
  capacity 8: the full-width branch), with Adam (not linear in the
  gradient), a non-diagonal core (a random S) and a dense layer beside."""
  with jax.enable_x64(True):
    f64 = jnp.float64
    ks = jax.random.split(jax.random.PRNGKey(3), 6)
    def fc(r):
      f = lowrank.resize(lowrank.init(ks[0], 16, 12, r, dtype=f64), 8)
      m = (jnp.arange(8) < r).astype(f64)
      S = f.S + 0.3 * jax.random.normal(ks[5], (8, 8), f64) * m[:, None] * m
      return fz.LowRank(f.U, S, f.V, f.rank, f.W0)
    p = {"fc": fc(rank), "out": jax.random.normal(ks[1], (16, 3), f64)}

    def loss(q, b):
      h = jnp.tanh(fz.apply(q["fc"], b["x"]))
      return jnp.mean(jnp.square(h @ q["out"] - b["y"])), {}

    b = {"x": jax.random.normal(ks[2], (6, 12), f64),
         "y": jax.random.normal(ks[3], (6, 3), f64)}
    kw = dict(tau=0.2, r_min=1, r_max=4)
    integ = geolora.make(optax.adam(0.05), **kw)
    tx = geolora.as_transform(optax.adam(0.05), **kw)
    st0 = integ.init({**p, "fc": fc(3)})     # same shapes, room for init
    step = jax.jit(lambda q, s: integ.step(loss, q, s, b)[:2])

    @jax.jit
    def transform(q, s):
      _, g = base.value_and_grad(loss, q, b)
      u, s = tx.update(g, s, q)
      return optax.apply_updates(q, u), s

    q1, s1, q2, s2 = p, st0, p, st0
    for _ in range(3):
      q1, s1 = step(q1, s1)
      q2, s2 = transform(q2, s2)
    for a, c in zip(jax.tree.leaves((q1, s1)), jax.tree.leaves((q2, s2))):
      np.testing.assert_allclose(a, c, rtol=1e-9, atol=1e-11)
