"""lrtrain.lapack: the namesakes' results, and no batched LAPACK call."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrtrain import lapack


def _x(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _spd(a):
  return jnp.swapaxes(a, -1, -2) @ a + jnp.eye(a.shape[-1])


CASES = {
    "svd": (lambda a: lapack.svd(a, full_matrices=False),
            lambda a: jnp.linalg.svd(a, full_matrices=False)),
    "svdvals": (lambda a: lapack.svd(a, compute_uv=False),
                lambda a: jnp.linalg.svd(a, compute_uv=False)),
    "qr": (lapack.qr, jnp.linalg.qr),
    "cholesky": (lambda a: lapack.cholesky(_spd(a)),
                 lambda a: jnp.linalg.cholesky(_spd(a))),
    "eigh": (lambda a: lapack.eigh(_spd(a)), lambda a: jnp.linalg.eigh(_spd(a))),
    "eigvalsh": (lambda a: lapack.eigvalsh(_spd(a)),
                 lambda a: jnp.linalg.eigvalsh(_spd(a))),
}


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), a, b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_jnp_plain_leading_axes_and_vmapped(name):
  ours, ref = CASES[name]
  x = _x((3, 4, 6, 5))
  want = ref(x)
  _close(jax.jit(ours)(x), want)                       # leading axes
  _close(jax.jit(jax.vmap(jax.vmap(ours)))(x), want)   # nested vmap
  _close(jax.jit(jax.vmap(ours, in_axes=1, out_axes=1))(x), want)
  _close(jax.jit(ours)(x[0, 0]), ref(x[0, 0]))         # one matrix


def test_more_matrices_than_unrolled():
  x = _x((lapack.UNROLL * 3 + 1, 6, 5))
  _close(jax.jit(jax.vmap(lapack.qr))(x), jnp.linalg.qr(x))


def test_solve_triangular_with_batched_right_hand_side():
  L = jnp.linalg.cholesky(_spd(_x((5, 5))))
  B = _x((7, 5, 4), 1)
  got = jax.jit(jax.vmap(lambda b: lapack.solve_triangular(L, b, lower=True)))(B)
  np.testing.assert_allclose(L @ got, B, atol=1e-4)


def test_forward_mode_derivative():
  x = _x((6, 5))
  t = _x((6, 5), 1)
  f = lambda a: lapack.svd(a, compute_uv=False)
  g = lambda a: jnp.linalg.svd(a, compute_uv=False)
  _close(jax.jvp(f, (x,), (t,)), jax.jvp(g, (x,), (t,)))


def test_no_custom_call_sees_a_batch():
  """Every LAPACK custom call in a vmapped program is on one matrix."""
  f = jax.vmap(lambda a: lapack.svd(lapack.qr(a)[0].T @ a))
  hlo = jax.jit(f).lower(_x((4, 8, 6))).as_text()
  calls = re.findall(r"stablehlo.custom_call @(\w+).*?\((tensor<[^>]*>)", hlo)
  assert calls, "no custom calls found: the check would be vacuous"
  for target, operand in calls:
    dims = operand[len("tensor<"):].split("x")[:-1]
    assert len(dims) == 2, (target, operand)


def test_every_factorization_in_the_package_goes_through_lapack():
  import pathlib
  root = pathlib.Path(lapack.__file__).parent
  pattern = re.compile(r"jnp\.linalg\.(svd|qr|cholesky|eigh|eigvalsh)\(|"
                       r"scipy\.linalg\.solve_triangular\(")
  offenders = [f"{p.relative_to(root)}:{i + 1}"
               for p in root.rglob("*.py") if p.name != "lapack.py"
               for i, line in enumerate(p.read_text().splitlines())
               if pattern.search(line)]
  assert not offenders, offenders


def test_solve_triangular_broadcasts_a_single_factor():
  """A 2-D factor against a stack of right-hand sides (leading axes on b
  only) is still solved one matrix at a time."""
  L = jnp.linalg.cholesky(_spd(_x((5, 5))))
  B = _x((3, 5, 4), 1)
  got = jax.jit(lambda b: lapack.solve_triangular(L, b, lower=True))(B)
  np.testing.assert_allclose(L @ got, B, atol=1e-4)
  hlo = jax.jit(lambda b: lapack.solve_triangular(L, b, lower=True)).lower(B).as_text()
  calls = re.findall(r"stablehlo.custom_call @(\w+).*?\((tensor<[^>]*>)", hlo)
  assert calls, "no custom calls found: the check would be vacuous"
  for _, operand in calls:
    assert len(operand[len("tensor<"):].split("x")[:-1]) == 2, operand
