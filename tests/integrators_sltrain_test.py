"""SLTrain (W = scale B A + S, S on a fixed random support): the node
against a dense reference (forward and gradients in float64), the support
fixed and outside the optimizer, parameter counts, diagnostics of the
formed W, the factor policy, and a short training run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrtrain import config_utils as cu
from lrtrain import diagnostics
from lrtrain import factorizations as fz
from lrtrain import integrators, models
from lrtrain.factorizations import sltrain
from lrtrain.integrators import base

N, M, R = 12, 10, 3


def _node(key, dtype=jnp.float32, density=0.2, scale=0.5):
  """A node with every part nonzero (B is zero at init)."""
  f = sltrain.init(key, N, M, R, density=density, alpha=scale * R, dtype=dtype)
  kb, kv = jax.random.split(jax.random.fold_in(key, 1))
  B = jax.random.normal(kb, (N, R), dtype)
  values = jax.random.normal(kv, f.values.shape, dtype)
  return fz.SLTrain(B, f.A, values, f.index, f.scale)


def _dense_reference(f) -> np.ndarray:
  """scale B A + S, S built entry by entry from the support on the host."""
  B, A = np.asarray(f.B, np.float64), np.asarray(f.A, np.float64)
  S = np.zeros((N, M))
  for k, v in zip(np.asarray(f.index), np.asarray(f.values, np.float64)):
    S[k // M, k % M] = v
  return float(f.scale) * B @ A + S


def test_init_draws_the_papers_start():
  f = sltrain.init(jax.random.PRNGKey(0), 40, 30, 4, density=0.03, alpha=8.0)
  nnz = int(0.03 * 40 * 30)
  assert f.shape == (40, 30) and f.rank == 4 and f.nnz == nnz == 36
  idx = np.asarray(f.index)
  assert idx.dtype == np.int32
  assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < 40 * 30
  np.testing.assert_array_equal(f.B, 0.0)
  bound = 1 / np.sqrt(30)
  for x in (f.A, f.values):
    assert np.all(np.abs(np.asarray(x)) <= bound) and np.std(np.asarray(x)) > 0.3 * bound
  assert float(f.scale) == 2.0          # alpha / r
  # A fresh layer is its sparse part.
  np.testing.assert_allclose(fz.materialize(f), sltrain.sparse_dense(f))
  # The support is the key's: the same key draws it again, another differs.
  g = sltrain.init(jax.random.PRNGKey(0), 40, 30, 4, density=0.03)
  h = sltrain.init(jax.random.PRNGKey(1), 40, 30, 4, density=0.03)
  np.testing.assert_array_equal(g.index, f.index)
  assert not np.array_equal(h.index, f.index)


@pytest.mark.parametrize("density", [0.0, 1.0, -0.1])
def test_bad_density_is_refused(density):
  with pytest.raises(ValueError, match="density"):
    sltrain.init(jax.random.PRNGKey(0), N, M, R, density=density)
  c = cu.base_config()
  c.model.factor.kind = "sltrain"
  c.model.factor.sparse_density = density
  with pytest.raises(ValueError, match="model.factor.sparse_density"):
    models.build(c.model, num_classes=4, input_shape=(M,))


def test_bad_rank_is_refused():
  with pytest.raises(ValueError, match="rank 11"):
    sltrain.init(jax.random.PRNGKey(0), N, M, 11)


def test_forward_equals_dense_reference_float64():
  with jax.enable_x64(True):
    f = _node(jax.random.PRNGKey(3), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(4), (7, M), jnp.float64)
    W = _dense_reference(f)
    np.testing.assert_allclose(fz.materialize(f), W, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(fz.apply(f, x), np.asarray(x) @ W.T,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fz.as_matrix(f), W, rtol=1e-13, atol=1e-13)


def test_gradients_are_the_dense_gradient_restricted_float64():
  """dL/dvalues = dL/dW on the support, dL/dB = scale dL/dW A^T,
  dL/dA = scale B^T dL/dW, dL/dx as for the dense layer; the support and
  scale get the zero gradients of frozen leaves (base.value_and_grad)."""
  with jax.enable_x64(True):
    f = _node(jax.random.PRNGKey(5), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(6), (9, M), jnp.float64)
    t = jax.random.normal(jax.random.PRNGKey(7), (9, N), jnp.float64)
    dense_loss = lambda W, x: jnp.sum(jnp.sin(x @ W.T) * t)
    node_loss = lambda p, x: (jnp.sum(jnp.sin(fz.apply(p["w"], x)) * t), {})
    W = jnp.asarray(_dense_reference(f))
    G, gx_ref = jax.grad(dense_loss, argnums=(0, 1))(W, x)
    (_, _), g = base.value_and_grad(node_loss, {"w": f}, x)
    g = g["w"]
    G = np.asarray(G)
    B, A, s = np.asarray(f.B), np.asarray(f.A), float(f.scale)
    np.testing.assert_allclose(g.values, G.reshape(-1)[np.asarray(f.index)],
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g.B, s * G @ A.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g.A, s * B.T @ G, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(g.index, 0.0)
    gx = jax.grad(lambda x: node_loss({"w": f}, x)[0])(x)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-12, atol=1e-12)


def test_num_params():
  f = sltrain.init(jax.random.PRNGKey(0), 64, 48, 5, density=0.03)
  nnz = int(0.03 * 64 * 48)
  assert f.nnz == nnz
  assert int(fz.num_params(f)) == 5 * (64 + 48) + nnz
  assert int(fz.num_params(f, train=False)) == 5 * (64 + 48) + nnz
  assert fz.dense_num_params(f) == 64 * 48
  # A tiny layer keeps one sparse entry.
  assert sltrain.init(jax.random.PRNGKey(0), 4, 4, 1, density=0.01).nnz == 1


def _loss(p, b):
  return jnp.mean(jnp.square(fz.apply(p["w"], b["x"]) + p["b"] - b["y"])), {}


def _problem():
  """A teacher W* = B* A* + S* (rank R plus the student's support)."""
  f = _node(jax.random.PRNGKey(11))
  x = jax.random.normal(jax.random.PRNGKey(12), (64, M))
  return {"x": x, "y": x @ fz.materialize(f).T / 2}


def test_support_fixed_and_outside_the_optimizer():
  p = {"w": sltrain.init(jax.random.PRNGKey(0), N, M, R, density=0.2),
       "b": jnp.zeros(N)}
  integ = integrators.build("sltrain", optax.adam(1e-2))
  st = integ.init(p)
  # Adam's moments mirror B, A, values and the bias only: the support and
  # the scale are None in the optimizer's tree.
  mu = st[0].mu["w"]
  assert mu.index is None and mu.scale is None
  assert mu.values.shape == p["w"].values.shape
  nnz = p["w"].nnz
  assert not any(jnp.issubdtype(x.dtype, jnp.integer) and x.shape == (nnz,)
                 for x in jax.tree.leaves(st))
  step = jax.jit(lambda p, s: integ.step(_loss, p, s, _problem()))
  q, s = p, st
  for _ in range(5):
    q, s, aux = step(q, s)
  np.testing.assert_array_equal(q["w"].index, p["w"].index)
  assert q["w"].index.dtype == jnp.int32
  assert float(q["w"].scale) == float(p["w"].scale)
  assert not np.allclose(q["w"].values, p["w"].values)
  assert float(jnp.abs(q["w"].B).max()) > 0      # B leaves zero
  assert int(aux["rank/w"]) == R


def test_weight_decay_acts_on_factors_and_values_only():
  f = _node(jax.random.PRNGKey(2))
  p = {"w": f, "b": jnp.ones(N)}
  integ = integrators.build("sltrain", optax.sgd(1.0), weight_decay=0.5)
  zero = lambda p, b: (0.0 * _loss(p, b)[0], {})
  q, _, _ = integ.step(zero, p, integ.init(p), _problem())
  for name in ("B", "A", "values"):
    np.testing.assert_allclose(getattr(q["w"], name), 0.5 * getattr(f, name),
                               rtol=1e-6)
  np.testing.assert_array_equal(q["w"].index, f.index)
  assert float(q["w"].scale) == float(f.scale)


def test_short_training_run_reduces_the_loss():
  p = {"w": sltrain.init(jax.random.PRNGKey(0), N, M, R, density=0.2),
       "b": jnp.zeros(N)}
  integ = integrators.build("sltrain", optax.adam(3e-2))
  st = integ.init(p)
  batch = _problem()
  step = jax.jit(lambda p, s: integ.step(_loss, p, s, batch))
  l0 = float(_loss(p, batch)[0])
  for _ in range(150):
    p, st, _ = step(p, st)
  l1 = float(_loss(p, batch)[0])
  assert l1 < 0.1 * l0, (l0, l1)


def test_init_refuses_params_without_sltrain_nodes():
  integ = integrators.build("sltrain", optax.adam(1e-2))
  dense = {"w": jnp.zeros((M, N)), "b": jnp.zeros(N)}
  with pytest.raises(ValueError, match="model.factor.kind=sltrain"):
    integ.init(dense)
  lora = {"w": fz.lora.init(jax.random.PRNGKey(0), jnp.zeros((N, M)), 2)}
  with pytest.raises(ValueError, match="integrator.name='sltrain'"):
    integ.init(lora)
  # The other way round: 'lora' on an SLTrain model names the fix.
  with pytest.raises(ValueError, match="integrator.name=sltrain"):
    integrators.build("lora", optax.adam(1e-2)).init(
        {"w": sltrain.init(jax.random.PRNGKey(0), N, M, 2)})


def test_diagnostics_see_the_formed_weight():
  f = _node(jax.random.PRNGKey(8))
  out = diagnostics.Diagnostics(top_k=4)({"w": f, "b": jnp.zeros(N)})
  s = np.linalg.svd(_dense_reference(f), compute_uv=False)
  np.testing.assert_allclose(out["spectral/w/sv"], s[:4], rtol=1e-5)
  assert out["params/w/train"] == R * (N + M) + f.nnz


@pytest.mark.parametrize("name,shape", [("mlp", (M,)), ("transformer", (8,)),
                                        ("lenet5", (28, 28, 1))])
def test_policy_gives_every_model_sltrain_layers(name, shape):
  c = cu.base_config()
  c.model.name = name
  c.model.factor.kind = "sltrain"
  c.model.factor.rank = 2
  c.model.factor.alpha = 4.0
  c.model.factor.sparse_density = 0.05
  c.model.d_model, c.model.mlp_dim, c.model.max_len = 16, 32, 8
  module = models.build(c.model, num_classes=5, input_shape=shape)
  params = jax.eval_shape(lambda: models.init_params(
      module, jax.random.PRNGKey(0), shape))
  nodes = fz.factor_paths(params)
  assert nodes and all(isinstance(x, fz.SLTrain) for _, x in nodes)
  for _, x in nodes:
    n, m = x.shape
    assert x.rank == 2 and x.nnz == max(1, int(0.05 * n * m))
  dense = [p for p, x in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=fz.is_factor)[0]
           if fz.path_str(p).endswith("kernel") and not fz.is_factor(x)]
  assert all("head" in fz.path_str(p) for p in dense)
