"""Tests of the factorized Flax Dense and Conv layers."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrtrain import factorizations as fz
from lrtrain import layers
from lrtrain.factorizations import lowrank, tucker

KEY = jax.random.PRNGKey(0)


def _lax_conv(x, k, strides, padding):
  return jax.lax.conv_general_dilated(x, k, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_dense_plain_kernel_is_flax_layout():
  m = layers.Dense(7)
  x = jax.random.normal(KEY, (3, 5))
  p = m.init(KEY, x)["params"]
  assert p["kernel"].shape == (5, 7) and p["bias"].shape == (7,)
  np.testing.assert_allclose(m.apply({"params": p}, x), x @ p["kernel"] + p["bias"], atol=1e-6)


@pytest.mark.parametrize("kind,init", [("lowrank", "random"), ("lowrank", "svd"),
                                       ("lora", "random")])
def test_dense_factor_node_is_the_param(kind, init):
  spec = layers.FactorSpec(kind=kind, rank=3, capacity=5 if kind == "lowrank" else 0,
                           init=init)
  m = layers.Dense(6, factor=spec, name="fc")
  x = jax.random.normal(KEY, (4, 10))
  p = m.init(KEY, x)["params"]
  node = p["kernel"]
  assert fz.is_factor(node) and node.shape == (6, 10)
  if kind == "lowrank":
    assert node.capacity == 5 and int(node.rank) == 3
  b = p["bias"] + 0.5
  y = m.apply({"params": {"kernel": node, "bias": b}}, x)
  np.testing.assert_allclose(y, x @ fz.materialize(node).T + b, atol=1e-5)
  # integrators find the node without Flax
  assert [path for path, _ in fz.factor_paths(p)] == ["kernel"]


def test_dense_random_init_matches_dense_variance():
  """E||W||_F^2 of the 'random' LowRank init equals the dense init's (= n)."""
  n, m_in = 64, 256
  x = jnp.zeros((1, m_in))
  spec = layers.FactorSpec(kind="lowrank", rank=8)
  fro = []
  for i in range(20):
    p = layers.Dense(n, factor=spec).init(jax.random.PRNGKey(i), x)["params"]
    fro.append(float(jnp.sum(fz.materialize(p["kernel"]) ** 2)))
  dense = layers.Dense(n).init(KEY, x)["params"]["kernel"]
  np.testing.assert_allclose(np.mean(fro), n, rtol=0.25)
  np.testing.assert_allclose(float(jnp.sum(dense ** 2)), n, rtol=0.1)


def test_svd_init_is_truncated_dense_init():
  spec = layers.FactorSpec(kind="lowrank", rank=4, init="svd")
  p = layers.Dense(12, factor=spec).init(KEY, jnp.zeros((1, 20)))["params"]
  W = fz.materialize(p["kernel"])
  s = np.linalg.svd(np.asarray(W), compute_uv=False)
  assert np.all(s[4:] < 1e-5) and np.all(s[:4] > 1e-2)
  # singular values of a lecun_normal (12, 20) draw are O(1)
  assert 0.5 < s[0] < 3.0


def test_lora_dense_starts_at_base():
  spec = layers.FactorSpec(kind="lora", rank=2, alpha=4.0)
  p = layers.Dense(5, factor=spec).init(KEY, jnp.zeros((1, 8)))["params"]
  node = p["kernel"]
  assert isinstance(node, fz.Lora) and float(node.scale) == pytest.approx(2.0)
  np.testing.assert_array_equal(np.asarray(fz.materialize(node)), np.asarray(node.W0))


def test_rank_too_large_names_layer():
  spec = layers.FactorSpec(kind="lowrank", rank=9)
  with pytest.raises(ValueError, match=r"layer 'fc3': rank 9 .*min\(n, m\)"):
    layers.Dense(8, factor=spec, name="fc3").init(KEY, jnp.zeros((1, 20)))
  with pytest.raises(ValueError, match="Tucker factors only apply to conv"):
    layers.Dense(8, factor=layers.FactorSpec(kind="tucker")).init(KEY, jnp.zeros((1, 4)))
  with pytest.raises(ValueError, match="unknown factor kind"):
    layers.FactorSpec(kind="cp")
  with pytest.raises(ValueError, match="NHWC"):
    layers.Conv(4).init(KEY, jnp.zeros((2, 8, 3)))


def test_clip_rank_caps_each_layer_at_half_its_min_dim():
  spec = layers.FactorSpec(kind="lowrank", rank=250, clip_rank=True)
  x = jnp.zeros((1, 800))
  for n, want in ((500, 250), (20, 10), (3, 1)):
    node = layers.Dense(n, factor=spec).init(KEY, x)["params"]["kernel"]
    assert int(node.rank) == want and node.capacity == want
  small = layers.FactorSpec(kind="lowrank", rank=4, clip_rank=True)
  node = layers.Dense(500, factor=small).init(KEY, x)["params"]["kernel"]
  assert int(node.rank) == 4     # a request below the cap is kept
  with pytest.raises(ValueError, match=r"layer 'fc': rank 250"):
    layers.Dense(20, factor=dataclasses.replace(spec, clip_rank=False),
                 name="fc").init(KEY, x)


def test_flat_init_is_scaled_orthogonal():
  spec = layers.FactorSpec(kind="lowrank", rank=8, init="flat")
  p = layers.Dense(64, factor=spec).init(KEY, jnp.zeros((1, 256)))["params"]
  s = np.linalg.svd(np.asarray(fz.materialize(p["kernel"])), compute_uv=False)
  # eight equal singular values with sum of squares n = 64 (the dense init's E)
  np.testing.assert_allclose(s[:8], np.sqrt(64 / 8), rtol=1e-5)
  assert np.all(s[8:] < 1e-5)


def test_capacity_capped_at_min_dim():
  spec = layers.FactorSpec(kind="lowrank", rank=2, capacity=64)
  p = layers.Dense(6, factor=spec).init(KEY, jnp.zeros((1, 5)))["params"]
  assert p["kernel"].capacity == 5


@pytest.mark.parametrize("kind,impl,strides,padding", [
    ("dense", "im2col", (1, 1), "SAME"),
    ("lowrank", "im2col", (2, 2), "VALID"),
    ("lowrank", "xla", (1, 1), "SAME"),
    ("lora", "im2col", (1, 1), "VALID"),
    ("tucker", "im2col", (1, 2), "SAME"),
])
def test_conv_equals_dense_lax_conv(kind, impl, strides, padding):
  spec = None if kind == "dense" else layers.FactorSpec(
      kind=kind, rank=5, tucker_ranks=(4, 2))
  m = layers.Conv(6, (3, 3), strides=strides, padding=padding, factor=spec, impl=impl)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, 3))
  p = m.init(KEY, x)["params"]
  k = p["kernel"]
  if kind == "dense":
    kernel = k
  elif kind == "tucker":
    assert isinstance(k, fz.Tucker) and tuple(int(r) for r in k.ranks) == (4, 2, 3, 3)
    kernel = tucker.to_flax_kernel(k)
  else:
    assert k.shape == (6, 27)
    kernel = lowrank.matrix_to_conv_kernel(fz.materialize(k), 3, 3)
  if kind == "lora":  # a non-zero adapter, so the adapter path is exercised
    k = fz.Lora(k.W0, k.A, jax.random.normal(KEY, k.B.shape), k.scale)
    kernel = lowrank.matrix_to_conv_kernel(fz.materialize(k), 3, 3)
    p = {**p, "kernel": k}
  y = m.apply({"params": p}, x)
  np.testing.assert_allclose(y, _lax_conv(x, kernel, strides, padding) + p["bias"], atol=1e-4)


def test_conv_tucker_rank_error_names_layer():
  spec = layers.FactorSpec(kind="tucker", tucker_ranks=(4, 4))
  with pytest.raises(ValueError, match=r"layer 'conv1': Tucker r_in = 4"):
    layers.Conv(8, (3, 3), factor=spec, name="conv1").init(KEY, jnp.zeros((1, 6, 6, 1)))


def test_conv_tucker_random_init_scale():
  spec = layers.FactorSpec(kind="tucker", tucker_ranks=(8, 8))
  p = layers.Conv(16, (3, 3), factor=spec).init(KEY, jnp.zeros((1, 5, 5, 16)))["params"]
  # ||C||_F^2 = c_out, the expectation under the dense lecun_normal init
  np.testing.assert_allclose(float(jnp.sum(tucker.materialize(p["kernel"]) ** 2)), 16,
                             rtol=1e-4)


def test_layers_jit_and_grad_through_factors():
  spec = layers.FactorSpec(kind="lowrank", rank=2, capacity=4)
  m = layers.Dense(3, factor=spec)
  x = jax.random.normal(KEY, (5, 4))
  p = m.init(KEY, x)["params"]
  loss = lambda p: jnp.sum(m.apply({"params": p}, x) ** 2)
  g = jax.grad(loss, allow_int=True)(p)
  assert isinstance(g["kernel"], fz.LowRank)
  assert float(jnp.abs(g["kernel"].S).sum()) > 0
  np.testing.assert_allclose(jax.jit(loss)(p), loss(p), rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 24, 24, 3), (2, 7, 7, 4), (1, 5, 6, 2)])
def test_max_pool_2x2_matches_reduce_window(shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  want = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
  np.testing.assert_array_equal(layers.max_pool_2x2(x), want)
  # Gradients agree too (no ties with continuous inputs).
  g1 = jax.grad(lambda v: (layers.max_pool_2x2(v) ** 2).sum())(x)
  g2 = jax.grad(lambda v: (nn.max_pool(v, (2, 2), strides=(2, 2),
                                       padding="VALID") ** 2).sum())(x)
  np.testing.assert_allclose(g1, g2, atol=1e-6)
