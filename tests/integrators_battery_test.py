"""The shared battery every registered integrator passes: jit, no
recompilation on the second call, dtype preservation, same result with and
without jit, checkpointable state, vmap over seeds. Methods whose module is
not available yet are skipped."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrtrain import factorizations as fz
from lrtrain import integrators
from lrtrain.factorizations import lora, lowrank, sltrain, tucker

N, M = 12, 10


def _params(name, key, dtype):
  """A small model for each method: one weight of the kind it trains + bias."""
  kw, kb = jax.random.split(key)
  if name == "tdlrt":
    w = tucker.init(kw, 6, 4, 3, 3, (3, 2, 3, 3), dtype=dtype)
  elif name in ("dense", "galore"):
    w = (jax.random.normal(kw, (M, N)) / 3).astype(dtype)
  elif name in ("lora", "relora"):
    w = lora.init(kw, jax.random.normal(kb, (N, M)).astype(dtype), 3)
  elif name == "sltrain":
    w = sltrain.init(kw, N, M, 3, density=0.2, dtype=dtype)
  else:
    w = lowrank.init(kw, N, M, 3, dtype=dtype)
  return {"w": w, "b": jnp.zeros((N if name != "tdlrt" else 6,), dtype)}


def _batch(name, key):
  if name == "tdlrt":
    x = jax.random.normal(key, (4, 7, 7, 4))
    return {"x": x, "y": jnp.ones((4, 5, 5, 6))}
  x = jax.random.normal(key, (16, M))
  return {"x": x, "y": jnp.tanh(x @ jnp.ones((M, N)) / 3)}


def _loss(p, b):
  w, x = p["w"], b["x"].astype(p["b"].dtype)
  if isinstance(w, fz.Tucker):
    y = tucker.conv(w, x)
  elif fz.is_factor(w):
    y = fz.apply(w, x)
  else:
    y = x @ w
  y = y + p["b"]
  return jnp.mean(jnp.square(y.astype(jnp.float32) - b["y"])), {}


def _build(name):
  try:
    integrators.module_for(name)
  except ModuleNotFoundError as e:
    pytest.skip(f"{name}: module not available ({e})")
  # relora merges after every step: each test goes through a merge.
  opts = dict(tau=0.1, r_min=1, galore_rank=2, relora_period=1)
  accepted = integrators.options(name)
  return integrators.build(name, optax.adam(1e-2),
                           **{k: v for k, v in opts.items() if k in accepted})


def test_unknown_option_is_an_error():
  with pytest.raises(ValueError, match="unknown option.*tua"):
    integrators.build("kls", optax.sgd(0.1), tua=0.1)
  with pytest.raises(ValueError, match="unknown option.*tau"):
    integrators.build("condlr", optax.sgd(0.1), tau=0.1)


def _setup(name, dtype=jnp.float32, seed=0):
  integ = _build(name)
  p = _params(name, jax.random.PRNGKey(seed), dtype)
  p, _, _ = integ.resize(p, None)
  st = integ.init(p)
  return integ, p, st, _batch(name, jax.random.PRNGKey(100))


NAMES = sorted(integrators.METHODS)


@functools.lru_cache(maxsize=None)
def _jitted(name, dtype=jnp.float32):
  """(integrator, jitted step, params, state, batch), compiled once per
  method and dtype and shared by the tests below (keeps the battery fast)."""
  integ, p, st, batch = _setup(name, dtype)
  step = jax.jit(lambda p, s, b: integ.step(_loss, p, s, b))
  return integ, step, p, st, batch


@pytest.mark.parametrize("name", NAMES)
def test_jit_no_recompile_and_same_as_eager(name):
  integ, step, p, st, batch = _jitted(name)
  p1, s1, aux1 = step(p, st, batch)
  p2, s2, aux2 = step(p1, s1, batch)
  assert step._cache_size() == 1
  assert float(aux2["loss"]) <= float(aux1["loss"]) * 1.5
  e1, es1, eaux = integ.step(_loss, p, st, batch)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(e1)):
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(aux1["loss"], eaux["loss"], rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_dtypes_preserved(name, dtype):
  integ, step, p, st, batch = _jitted(name, dtype)
  q, st2, _ = step(p, st, batch)
  q, st3, _ = step(q, st2, batch)
  assert jax.tree.map(lambda a: a.dtype, q) == jax.tree.map(lambda a: a.dtype, p)
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), st3)
          == jax.tree.map(lambda a: (a.shape, a.dtype), st))
  assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
             for x in jax.tree.leaves(q))


@pytest.mark.parametrize("name", NAMES)
def test_state_is_checkpointable(name):
  integ, step, p, st, batch = _jitted(name)
  leaves, treedef = jax.tree.flatten((p, st))
  assert all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves)
  # A host round trip (what a checkpoint does) gives the same next step.
  restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  restored = jax.tree.map(jnp.asarray, restored)
  a = step(p, st, batch)
  b = step(*restored, batch)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# The rank-adaptive ones compile a vmapped step each (15-20 s cold): second
# tier, beside tests/vmap_deadlock_test.py.
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.tier2) if n in ("kls", "geolora", "tdlrt")
    else n for n in NAMES])
def test_vmap_over_seeds(name):
  integ, _, _, _, batch = _jitted(name)
  seeds = jnp.arange(3)

  def one_bucketed(seed):
    p = _params(name, jax.random.PRNGKey(seed), jnp.float32)
    if isinstance(p["w"], fz.LowRank):  # fixed-capacity buffers for vmap
      p["w"] = lowrank.init(jax.random.PRNGKey(seed), N, M, 3, capacity=6)
    st = integ.init(p)
    p, st, aux = integ.step(_loss, p, st, batch)
    return p, aux["loss"]

  fn = one_bucketed
  pv, lv = jax.jit(jax.vmap(fn))(seeds)
  single = jax.jit(fn)
  for i in range(3):
    pi, li = single(seeds[i])
    np.testing.assert_allclose(lv[i], li, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(pv), jax.tree.leaves(pi)):
      np.testing.assert_allclose(np.asarray(a[i], np.float32),
                                 np.asarray(b, np.float32), atol=2e-4)


def test_unknown_method_lists_names():
  with pytest.raises(ValueError) as e:
    integrators.build("bug", optax.sgd(0.1))
  for name in integrators.METHODS:
    assert name in str(e.value)
