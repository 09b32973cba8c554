"""Intruder dimensions (Shuttleworth et al., 2024).

A left singular vector y_j of the current W_t (out, in) is an intruder iff
max_i |cos(y_j, x_i)| < eps over the left singular vectors x_i of the
reference W_0. We log the whole vector maxsim[:k] so that any eps can be
applied afterwards (`count_from_maxsim`).

Reference vectors with numerically zero singular values (a rank-deficient
W_0, e.g. a LowRank start) are arbitrary completions of the basis and are
excluded from the maximum.

References:
  Shuttleworth, Andreas, Torralba, Sharma, "LoRA vs full fine-tuning: an
  illusion of equivalence", arXiv:2410.21228, 2024.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lrtrain import lapack
from lrtrain.diagnostics import spectral as sp


def reference_basis(W0: jax.Array):
  """Left singular vectors X (n, p) of W_0 (n, m), their validity mask (p,)
  (s_i > max(n, m) eps s_1) and the singular values (p,)."""
  X, s, _ = lapack.svd(W0, full_matrices=False)
  return X, s > sp.default_rtol(W0.shape, W0.dtype) * s[0], s


def maxsim(X: jax.Array, xmask: jax.Array, Y: jax.Array, ymask: jax.Array,
           k: int) -> jax.Array:
  """max_i |x_i . y_j| for the first k columns y_j of Y.

  Args:
    X: (n, p) reference left singular vectors; xmask: (p,) valid columns.
    Y: (n, k') current top left singular vectors; ymask: (k',) active ones.
    k: output length; entries past k' or inactive are nan.

  Returns:
    (k,) maximum absolute cosines.
  """
  kk = min(k, Y.shape[1])
  Y = Y[:, :kk]
  # Columns of Y are unit vectors up to rounding; normalise so cosines are exact.
  Y = Y / jnp.maximum(jnp.linalg.norm(Y, axis=0, keepdims=True), 1e-30)
  sim = jnp.max(jnp.abs(X.T @ Y) * xmask[:, None], axis=0)
  sim = jnp.where(ymask[:kk], sim, jnp.nan)
  return jnp.full((k,), jnp.nan, sim.dtype).at[:kk].set(sim)


def count(ms: jax.Array, eps: float) -> jax.Array:
  """Number of intruders among the finite entries of maxsim."""
  return jnp.sum(jnp.where(jnp.isnan(ms), False, ms < eps)).astype(jnp.int32)


def count_from_maxsim(maxsim_vectors, eps, k: int | None = None) -> np.ndarray:
  """Host-side model count for one or many eps from logged maxsim vectors.

  Args:
    maxsim_vectors: iterable of (k,) vectors (one per examined matrix),
      nan for missing entries.
    eps: scalar or array of thresholds.
    k: use only the first k entries of each vector (default all).

  Returns:
    counts with the shape of eps: sum over matrices of #{maxsim_j < eps}.
  """
  eps = np.asarray(eps, np.float64)
  total = np.zeros(eps.shape, np.int64)
  for v in maxsim_vectors:
    v = np.asarray(v, np.float64).reshape(-1)
    v = v[:k] if k is not None else v
    v = v[np.isfinite(v)]
    total += (v[:, None] < eps.reshape(1, -1)).sum(0).reshape(eps.shape)
  return total
