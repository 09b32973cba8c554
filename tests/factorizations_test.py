"""Tests of the pure-functional factorizations (LowRank, Lora, Tucker, conv)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrtrain import factorizations as fz
from lrtrain.factorizations import conv, lora, lowrank, tucker



def _rank_r(key, n, m, r):
  a, b = jax.random.split(key)
  return jax.random.normal(a, (n, r)) @ jax.random.normal(b, (r, m)) / np.sqrt(r)


def _orthonormal_cols(M, r):
  G = np.asarray(M[:, :r].T @ M[:, :r])
  np.testing.assert_allclose(G, np.eye(r), atol=1e-5)


@pytest.mark.parametrize("n,m,r,cap", [(12, 9, 3, None), (7, 15, 4, 6), (10, 10, 10, None)])
def test_lowrank_from_dense_recovers_rank_r(n, m, r, cap):
  W = _rank_r(jax.random.PRNGKey(0), n, m, r)
  f = lowrank.from_dense(W, r, capacity=cap)
  np.testing.assert_allclose(fz.materialize(f), W, atol=1e-5)
  assert f.U.shape == (n, cap or r) and f.V.shape == (m, cap or r)
  assert int(f.rank) == r
  _orthonormal_cols(f.U, r)
  _orthonormal_cols(f.V, r)
  # inactive columns are zero (the buffer invariant)
  if cap and cap > r:
    assert float(jnp.abs(f.U[:, r:]).max()) == 0.0
    assert float(jnp.abs(f.S[r:, :]).max()) == 0.0


def test_lowrank_truncation_is_best_approximation():
  W = jax.random.normal(jax.random.PRNGKey(1), (10, 8))
  s = np.linalg.svd(np.asarray(W), compute_uv=False)
  f = lowrank.from_dense(W, 3)
  err = np.linalg.norm(np.asarray(fz.materialize(f) - W))
  np.testing.assert_allclose(err, np.sqrt((s[3:] ** 2).sum()), rtol=1e-4)


def test_lowrank_init_invariants():
  f = lowrank.init(jax.random.PRNGKey(2), 9, 13, 3, capacity=5, scale=2.0)
  _orthonormal_cols(f.U, 3)
  _orthonormal_cols(f.V, 3)
  s = np.diag(np.asarray(f.S))
  assert np.all(s[:3] > 0) and np.all(s[3:] == 0)
  assert np.all(np.diff(s[:3]) <= 0)
  np.testing.assert_array_equal(np.asarray(f.S), np.diag(s))
  flat = lowrank.init(jax.random.PRNGKey(2), 9, 13, 3, capacity=5, scale=2.0,
                      spectrum="flat")
  np.testing.assert_array_equal(np.diag(np.asarray(flat.S)), [2, 2, 2, 0, 0])
  with pytest.raises(ValueError, match="spectrum"):
    lowrank.init(jax.random.PRNGKey(2), 9, 13, 3, spectrum="uniform")


@pytest.mark.parametrize("frozen_base", [False, True])
def test_lowrank_apply_equals_materialize_matmul(frozen_base):
  W = jax.random.normal(jax.random.PRNGKey(3), (6, 11))
  f = lowrank.from_dense(W, 4, capacity=5, frozen_base=frozen_base)
  if frozen_base:
    f = fz.LowRank(f.U, f.S + 0.3 * jnp.eye(5) * lowrank.column_mask(4, 5), f.V, f.rank, f.W0)
  x = jax.random.normal(jax.random.PRNGKey(4), (3, 2, 11))
  np.testing.assert_allclose(fz.apply(f, x), x @ fz.materialize(f).T, atol=1e-5)
  np.testing.assert_allclose(jax.jit(fz.apply)(f, x), fz.apply(f, x), atol=1e-6)


def _factored_loss(USV, x):
  U, S, V = USV
  return jnp.sum(jnp.tanh(lowrank.apply(lowrank.LowRank(U, S, V, 6), x)))


def _plain_loss(USV, x):
  U, S, V = USV
  return jnp.sum(jnp.tanh(((x @ V) @ S.T) @ U.T))


def test_factor_products_keep_values_and_derivatives():
  """`times` / `times_t` (through `apply`) give the plain products' values
  and derivatives: reverse mode, forward mode in the factors and the input,
  forward over reverse (Hessian-vector products), under vmap and with
  leading batch axes; `batch_contract` equals a^T b."""
  f = lowrank.init(jax.random.PRNGKey(0), 40, 30, 6, capacity=8)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 30))
  f = (f.U, f.S, f.V)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(jax.jit(_factored_loss)(f, x),
                                jax.jit(_plain_loss)(f, x))
  got = jax.jit(jax.grad(_factored_loss, argnums=(0, 1)))(f, x)
  want = jax.jit(jax.grad(_plain_loss, argnums=(0, 1)))(f, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    close(a, b)
  df = jax.tree.map(lambda a: jax.random.normal(jax.random.PRNGKey(3), a.shape), f)
  dx = jax.random.normal(jax.random.PRNGKey(4), x.shape)
  t1 = jax.jvp(_factored_loss, (f, x), (df, dx))[1]
  t2 = jax.jvp(_plain_loss, (f, x), (df, dx))[1]
  close(t1, t2)
  hvp = lambda loss: jax.jvp(jax.grad(loss), (f, x), (df, dx))[1]
  for a, b in zip(hvp(_factored_loss), hvp(_plain_loss)):
    close(a, b)
  xs = jnp.stack([x, 2 * x])
  gv = jax.jit(jax.vmap(jax.grad(_factored_loss), in_axes=(None, 0)))(f, xs)
  close(gv[2][1], jax.grad(_plain_loss)(f, 2 * x)[2])
  x3 = x.reshape(4, 4, 30)                 # leading axes (tokens)
  for a, b in zip(jax.grad(_factored_loss)(f, x3), jax.grad(_plain_loss)(f, x)):
    close(a, b)
  g = jax.random.normal(jax.random.PRNGKey(5), (16, 5))
  close(lowrank.batch_contract(x, g), x.T @ g)


def test_factor_gradient_is_a_row_major_short_product():
  """On the CPU the gradients of x @ V and z @ U^T with respect to the
  factors (d, k) are (k, d) products contracting the second axis of their
  left operand (the form XLA's CPU backend runs in its fast dot library),
  never a product contracting the first axis of a left operand, which is
  what the plain form compiles to (and factors wider than REORIENT_MAX_K
  keep)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the reorientation is CPU-only")
  d, b, k = 96, 32, 8
  x = jnp.ones((b, d))
  V = jnp.ones((d, k))
  z = jnp.ones((b, k))

  def weight_gradient(fn, W):
    hlo = jax.jit(jax.grad(lambda W: jnp.sum(jnp.tanh(fn(W))))
                  ).lower(W).compile().as_text()
    (line,) = [ln for ln in hlo.splitlines() if " dot(" in ln and any(
        f"f32[{a},{c}]" in ln.split("=")[1][:20] for a, c in ((k, d), (d, k)))]
    return line

  for fn in (lambda V: lowrank.times(x, V), lambda V: lowrank.times_t(z, V)):
    line = weight_gradient(fn, V)
    assert f"f32[{k},{d}]" in line and "lhs_contracting_dims={1}" in line, line
  for fn in (lambda V: x @ V, lambda V: z @ V.T):
    assert "lhs_contracting_dims={0}" in weight_gradient(fn, V)
  k = lowrank.REORIENT_MAX_K + 8           # wider factors: the plain form
  V, z = jnp.ones((d, k)), jnp.ones((b, k))
  for fn in (lambda V: lowrank.times(x, V), lambda V: lowrank.times_t(z, V)):
    assert "lhs_contracting_dims={0}" in weight_gradient(fn, V)


def test_frozen_base_starts_at_w0():
  W = jax.random.normal(jax.random.PRNGKey(5), (6, 8))
  f = lowrank.from_dense(W, 2, frozen_base=True)
  np.testing.assert_allclose(fz.materialize(f), W, atol=1e-6)
  assert int(fz.num_params(f, train=True)) == 2 * (6 + 8) + 4
  assert int(fz.num_params(f, train=False)) == 48


@pytest.mark.parametrize("n,m,r", [(20, 30, 4), (5, 5, 5), (64, 8, 1)])
def test_lowrank_num_params_analytic(n, m, r):
  f = lowrank.init(jax.random.PRNGKey(0), n, m, r, capacity=min(n, m))
  assert int(fz.num_params(f)) == r * (n + m) + r * r
  assert fz.dense_num_params(f) == n * m


def test_lowrank_resize_keeps_matrix():
  W = _rank_r(jax.random.PRNGKey(6), 9, 7, 2)
  f = lowrank.from_dense(W, 2, capacity=4)
  for c in (2, 3, 7):
    g = lowrank.resize(f, c)
    assert g.capacity == c
    np.testing.assert_allclose(fz.materialize(g), W, atol=1e-5)
  with pytest.raises(ValueError, match="capacity"):
    lowrank.resize(f, 1)


def test_lowrank_bad_shapes_raise():
  with pytest.raises(ValueError, match="2-D"):
    lowrank.from_dense(jnp.ones((2, 3, 4)), 1)
  with pytest.raises(ValueError, match=r"rank 5 must be in \[1, min\(n, m\)\]"):
    lowrank.from_dense(jnp.ones((4, 6)), 5)
  with pytest.raises(ValueError, match="capacity"):
    lowrank.init(jax.random.PRNGKey(0), 4, 6, 2, capacity=5)
  with pytest.raises(ValueError, match="rank 0"):
    lowrank.init(jax.random.PRNGKey(0), 4, 6, 0)


def test_bucket_capacity():
  assert lowrank.bucket_capacity(3, 100) == 8
  assert lowrank.bucket_capacity(4, 100) == 8
  assert lowrank.bucket_capacity(5, 100) == 16
  assert lowrank.bucket_capacity(40, 50) == 50
  assert lowrank.bucket_capacity(1, 100) == 2


def test_lora_zero_b_equals_w0_and_apply():
  W0 = jax.random.normal(jax.random.PRNGKey(7), (8, 5))
  f = lora.init(jax.random.PRNGKey(8), W0, 3, alpha=6.0)
  x = jax.random.normal(jax.random.PRNGKey(9), (4, 5))
  np.testing.assert_array_equal(np.asarray(fz.materialize(f)), np.asarray(W0))
  np.testing.assert_allclose(fz.apply(f, x), x @ W0.T, atol=1e-5)
  assert float(f.scale) == pytest.approx(2.0)
  g = fz.Lora(W0, f.A, jax.random.normal(jax.random.PRNGKey(10), (8, 3)), f.scale)
  np.testing.assert_allclose(fz.apply(g, x), x @ fz.materialize(g).T, atol=1e-5)
  np.testing.assert_allclose(fz.materialize(g), W0 + 2.0 * g.B @ g.A, atol=1e-5)


def test_lora_merge_unmerge_round_trip():
  W0 = jax.random.normal(jax.random.PRNGKey(11), (7, 9))
  f = lora.init(jax.random.PRNGKey(12), W0, 2, rank_stabilised=True, alpha=4.0)
  f = fz.Lora(W0, f.A, jax.random.normal(jax.random.PRNGKey(13), (7, 2)), f.scale)
  assert float(f.scale) == pytest.approx(4.0 / np.sqrt(2))
  merged = lora.merge(f)
  assert float(jnp.abs(merged - W0).max()) > 1e-3
  np.testing.assert_allclose(lora.unmerge(merged, f), W0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.matrix_rank(np.asarray(merged - W0)), 2)


def test_lora_num_params_and_errors():
  f = lora.init(jax.random.PRNGKey(0), jnp.zeros((10, 6)), 4)
  assert int(fz.num_params(f)) == 4 * 16
  assert int(fz.num_params(f, train=False)) == 60
  with pytest.raises(ValueError, match="rank 7"):
    lora.init(jax.random.PRNGKey(0), jnp.zeros((10, 6)), 7)
  with pytest.raises(ValueError, match="2-D"):
    lora.init(jax.random.PRNGKey(0), jnp.zeros((10,)), 1)


def _lax_conv(x, k, strides, padding):
  return jax.lax.conv_general_dilated(x, k, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("strides,padding", [((1, 1), "VALID"), ((2, 1), "SAME")])
def test_conv2d_im2col_equals_lax(strides, padding):
  x = jax.random.normal(jax.random.PRNGKey(14), (2, 9, 8, 3))
  k = jax.random.normal(jax.random.PRNGKey(15), (3, 2, 3, 5))
  ref = _lax_conv(x, k, strides, padding)
  np.testing.assert_allclose(conv.conv2d(x, k, strides, padding, "im2col"), ref, atol=1e-4)
  np.testing.assert_allclose(conv.conv2d(x, k, strides, padding, "xla"), ref, atol=1e-4)


def test_lowrank_conv_via_im2col_equals_dense_conv():
  kh, kw, c_in, c_out, r = 3, 3, 4, 6, 3
  W = _rank_r(jax.random.PRNGKey(16), c_out, kh * kw * c_in, r)
  kernel = lowrank.matrix_to_conv_kernel(W, kh, kw)
  np.testing.assert_allclose(lowrank.conv_kernel_to_matrix(kernel), W)
  f = lowrank.from_dense(lowrank.conv_kernel_to_matrix(kernel), r)
  x = jax.random.normal(jax.random.PRNGKey(17), (2, 7, 7, c_in))
  y = fz.apply(f, conv.im2col(x, kh, kw, (1, 1), "SAME"))
  np.testing.assert_allclose(y, _lax_conv(x, kernel, (1, 1), "SAME"), atol=1e-4)
  np.testing.assert_allclose(fz.as_matrix(kernel), W, atol=1e-6)


def test_tucker_conv_equals_dense_conv():
  kernel = jax.random.normal(jax.random.PRNGKey(18), (3, 3, 5, 6))
  f = tucker.from_dense(kernel, (6, 5, 3, 3))  # full ranks: exact
  np.testing.assert_allclose(tucker.to_flax_kernel(f), kernel, atol=1e-4)
  x = jax.random.normal(jax.random.PRNGKey(19), (2, 8, 8, 5))
  for impl, strides, padding in (("im2col", (1, 1), "SAME"), ("xla", (2, 2), "VALID")):
    np.testing.assert_allclose(tucker.conv(f, x, strides, padding, impl),
                               _lax_conv(x, kernel, strides, padding), atol=1e-4)
  impl = "im2col"
  # a truncated Tucker kernel still convolves like its materialised kernel
  g = tucker.init(jax.random.PRNGKey(20), 6, 5, 3, 3, (2, 3, 3, 3), capacities=(4, 4, 3, 3))
  np.testing.assert_allclose(tucker.conv(g, x, (1, 1), "SAME", impl),
                             _lax_conv(x, tucker.to_flax_kernel(g), (1, 1), "SAME"), atol=1e-4)


def test_tucker_round_trip_and_params():
  # a kernel with multilinear ranks (2, 3, 3, 3) is recovered exactly
  core = jax.random.normal(jax.random.PRNGKey(21), (2, 3, 3, 3))
  U1 = lowrank.random_orthonormal(jax.random.PRNGKey(22), 7, 2)
  U2 = lowrank.random_orthonormal(jax.random.PRNGKey(23), 4, 3)
  C = tucker.mode_product(tucker.mode_product(core, U1, 0), U2, 1)
  kernel = jnp.transpose(C, (2, 3, 1, 0))
  f = tucker.from_dense(kernel, (2, 3, 3, 3), capacities=(3, 4, 3, 3))
  np.testing.assert_allclose(tucker.to_flax_kernel(f), kernel, atol=1e-5)
  for U, r in zip(f.factors, (2, 3, 3, 3)):
    _orthonormal_cols(U, r)
  assert int(fz.num_params(f)) == 2 * 3 * 3 * 3 + 7 * 2 + 4 * 3 + 3 * 3 + 3 * 3
  assert fz.dense_num_params(f) == 7 * 4 * 9
  np.testing.assert_allclose(fz.as_matrix(f), lowrank.conv_kernel_to_matrix(kernel), atol=1e-5)
  with pytest.raises(TypeError, match="tucker.conv"):
    fz.apply(f, jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="mode 1"):
    tucker.from_dense(kernel, (8, 3, 3, 3))
  with pytest.raises(ValueError, match="kh, kw, c_in, c_out"):
    tucker.from_dense(jnp.ones((3, 3, 4)), (1, 1, 1))


def test_conv_errors():
  with pytest.raises(ValueError, match="channels"):
    conv.conv2d(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 3, 4)))
  with pytest.raises(ValueError, match="does not fit"):
    conv.im2col(jnp.ones((1, 2, 2, 1)), 3, 3)
  with pytest.raises(ValueError, match="impl"):
    conv.conv2d(jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 3, 4)), impl="fft")
  with pytest.raises(ValueError, match="padding"):
    conv.im2col(jnp.ones((1, 5, 5, 1)), 3, 3, padding="FULL")
  with pytest.raises(ValueError, match="conv kernel"):
    lowrank.matrix_to_conv_kernel(jnp.ones((4, 10)), 3, 3)


def test_factor_paths_and_dispatch():
  params = {"a": {"kernel": lowrank.init(jax.random.PRNGKey(0), 4, 5, 2)},
            "b": {"kernel": jnp.ones((5, 4)), "bias": jnp.zeros(4)},
            "c": [lora.init(jax.random.PRNGKey(1), jnp.ones((3, 3)), 1)]}
  paths = dict(fz.factor_paths(params))
  assert sorted(paths) == ["a/kernel", "c/0"]
  assert fz.is_factor(paths["a/kernel"]) and not fz.is_factor(params["b"]["kernel"])
  np.testing.assert_array_equal(fz.as_matrix(params["b"]["kernel"]), jnp.ones((4, 5)))
  with pytest.raises(TypeError, match="not a factorization"):
    fz.materialize(jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="weight matrix"):
    fz.as_matrix(jnp.ones(3))
  # factor nodes are pytrees: tree_map keeps their type and int rank leaf
  doubled = jax.tree.map(lambda x: x * 2, params)
  assert isinstance(doubled["a"]["kernel"], fz.LowRank)
  assert doubled["a"]["kernel"].rank.dtype == jnp.int32
