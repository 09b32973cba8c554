"""The shared truncation rule and the SVD truncation of a core."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrtrain.integrators import base


def _tail(sigma, r):
  return float(np.linalg.norm(np.asarray(sigma)[r:]))


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("tau", [0.0, 0.05, 0.2, 0.5])
def test_tail_rule_minimal(seed, tau):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 24))
  sigma = np.sort(np.abs(rng.standard_normal(k)) ** rng.uniform(1, 4))[::-1]
  r = int(base.truncation_rank(jnp.asarray(sigma, jnp.float32), tau, 0, k))
  total = np.linalg.norm(sigma)
  assert _tail(sigma, r) <= tau * total * (1 + 1e-5) + 1e-7
  if r > 0:  # minimal: one fewer kept value breaks the rule
    assert _tail(sigma, r - 1) > tau * total * (1 - 1e-5)


def test_tail_counts_every_discarded_value():
  # ||(3, 4)|| = 5: with tau * ||sigma|| just above 5 both may go; a rule
  # that drops the last value from the tail would also cut at rank 1 for
  # a tolerance just above 3.
  sigma = jnp.array([12.0, 4.0, 3.0])
  total = float(jnp.linalg.norm(sigma))
  assert int(base.truncation_rank(sigma, 5.01 / total, 0, 3)) == 1
  assert int(base.truncation_rank(sigma, 4.99 / total, 0, 3)) == 2
  assert int(base.truncation_rank(sigma, 3.01 / total, 0, 3)) == 2


def test_rank_can_grow_to_full_augmented_size():
  sigma = jnp.ones((8,))
  assert int(base.truncation_rank(sigma, 0.1, 1, 8)) == 8


@pytest.mark.parametrize("r_min,r_max", [(3, 10), (1, 2), (5, 5)])
def test_clamps(r_min, r_max):
  for sigma in (jnp.zeros(12), jnp.ones(12), 2.0 ** -jnp.arange(12.0)):
    r = int(base.truncation_rank(sigma, 0.3, r_min, r_max))
    assert r_min <= r <= r_max


def test_truncate_core_factors():
  S = jax.random.normal(jax.random.PRNGKey(0), (10, 10))
  S = S.at[6:].set(0.0).at[:, 6:].set(0.0)
  P, Q, S_new, r = base.truncate(S, tau=0.2, r_min=1, r_max=8)
  r = int(r)
  sigma = np.linalg.svd(np.asarray(S), compute_uv=False)
  assert _tail(sigma, r) <= 0.2 * np.linalg.norm(sigma) * (1 + 1e-5)
  # P, Q have r_max columns (the most the rule can keep); S_new is
  # diagonal with P^T S Q as its top-left block, and the kept part of S is
  # P S_new Q^T.
  assert P.shape == Q.shape == (10, 8)
  np.testing.assert_allclose(P.T @ S @ Q, S_new[:8, :8], atol=1e-5)
  assert np.all(np.asarray(S_new)[8:] == 0)
  S_new = S_new[:8, :8]
  np.testing.assert_allclose(np.diag(S_new)[:r], sigma[:r], rtol=1e-5)
  assert np.all(np.asarray(S_new)[r:] == 0) and np.all(np.asarray(P)[:, r:] == 0)
  err = np.linalg.norm(np.asarray(S - P @ S_new @ Q.T))
  np.testing.assert_allclose(err, _tail(sigma, r), rtol=1e-4, atol=1e-5)


def test_rank_bounds_default():
  from lrtrain.factorizations import lowrank
  f = lowrank.init(jax.random.PRNGKey(0), 40, 30, 4)
  assert base.rank_bounds(f, 2, 0) == (2, 15)
  assert base.rank_bounds(f, 2, 100) == (2, 30)
  assert base.rank_bounds(f, 50, 10) == (10, 10)
