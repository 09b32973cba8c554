"""Plain optax baselines: frozen leaves untouched, decay masked off U and V,
dense step equals optax's, GaLore through optax.contrib."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrtrain import factorizations as fz
from lrtrain import integrators
from lrtrain.factorizations import lora, lowrank


def _loss(p, b):
  w = p["w"]
  y = fz.apply(w, b["x"]) if fz.is_factor(w) else b["x"] @ w
  return jnp.mean(jnp.square(y + p["b"] - b["y"])), {}


def _batch():
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 6))
  return {"x": x, "y": jnp.sin(x @ jnp.ones((6, 8)))}


def test_dense_step_equals_optax():
  p = {"w": jax.random.normal(jax.random.PRNGKey(1), (6, 8)), "b": jnp.zeros(8)}
  tx = optax.adamw(1e-2, weight_decay=0.0)
  integ = integrators.build("dense", tx)
  q, _, aux = integ.step(_loss, p, integ.init(p), _batch())
  g = jax.grad(lambda p: _loss(p, _batch())[0])(p)
  upd, _ = tx.update(g, tx.init(p), p)
  ref = optax.apply_updates(p, upd)
  for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert float(aux["loss"]) == float(_loss(p, _batch())[0])


def test_factors_decay_never_touches_U_V_and_rank_kept():
  f = lowrank.init(jax.random.PRNGKey(1), 8, 6, 3)
  p = {"w": f, "b": jnp.zeros(8)}
  # Zero learning rate for the gradient, pure decay: only S and b may move.
  integ = integrators.build("factors", optax.sgd(1.0), weight_decay=0.5)
  zero = lambda p, b: (0.0 * _loss(p, b)[0], {})
  p = {"w": f, "b": jnp.ones(8)}
  q, st, _ = integ.step(zero, p, integ.init(p), _batch())
  np.testing.assert_array_equal(q["w"].U, f.U)
  np.testing.assert_array_equal(q["w"].V, f.V)
  np.testing.assert_allclose(q["w"].S, 0.5 * f.S, rtol=1e-6)
  np.testing.assert_allclose(q["b"], 0.5 * jnp.ones(8), rtol=1e-6)
  assert int(q["w"].rank) == 3
  assert all(x.dtype != jnp.int32 or x.ndim == 0 for x in jax.tree.leaves(st))


def test_factors_training_moves_U_off_the_manifold_but_lowers_loss():
  p = {"w": lowrank.init(jax.random.PRNGKey(1), 8, 6, 3), "b": jnp.zeros(8)}
  integ = integrators.build("factors", optax.sgd(0.1))
  st = integ.init(p)
  step = jax.jit(lambda p, s: integ.step(_loss, p, s, _batch()))
  l0 = float(_loss(p, _batch())[0])
  for _ in range(50):
    p, st, _ = step(p, st)
  assert float(_loss(p, _batch())[0]) < l0


def test_lora_trains_A_B_only():
  W0 = jax.random.normal(jax.random.PRNGKey(2), (8, 6))
  f = lora.init(jax.random.PRNGKey(3), W0, 2)
  p = {"w": f, "b": jnp.zeros(8)}
  integ = integrators.build("lora", optax.adam(1e-2), weight_decay=0.1)
  st = integ.init(p)
  step = jax.jit(lambda p, s: integ.step(_loss, p, s, _batch()))
  for _ in range(20):
    p, st, _ = step(p, st)
  np.testing.assert_array_equal(p["w"].W0, W0)
  np.testing.assert_array_equal(p["w"].scale, f.scale)
  assert float(jnp.abs(p["w"].B).max()) > 0
  assert not np.allclose(p["w"].A, f.A)


def test_galore_reuses_optax_contrib_and_learns():
  p = {"w": jax.random.normal(jax.random.PRNGKey(1), (6, 8)) * 0.1,
       "b": jnp.zeros(8)}
  integ = integrators.build("galore", optax.adam(1e-2), galore_rank=2,
                            update_proj_gap=10)
  st = integ.init(p)
  assert "GaLore" in type(jax.tree.leaves(
      st, is_leaf=lambda x: "GaLore" in type(x).__name__)[0]).__name__
  step = jax.jit(lambda p, s: integ.step(_loss, p, s, _batch()))
  l0 = float(_loss(p, _batch())[0])
  for _ in range(30):
    p, st, _ = step(p, st)
  assert float(_loss(p, _batch())[0]) < l0
