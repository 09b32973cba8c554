"""Heavy-tailed self-regularisation metrics (WeightWatcher definitions).

The empirical spectral density is that of X = W^T W (no normalisation), so
the eigenvalues are lambda = s^2. A power law p(lambda) ~ lambda^-alpha is
fitted to the tail lambda >= lambda_min by maximum likelihood, with lambda_min
chosen by the smallest Kolmogorov-Smirnov distance (Clauset et al.). The
search over all candidates is one masked (N, N) computation, jittable and
vmappable.

References:
  Martin & Mahoney, "Implicit self-regularization in deep neural networks",
  JMLR 2021; Martin, Peng & Mahoney, "Predicting trends in the quality of
  state-of-the-art neural networks without access to training or testing
  data", Nature Communications 2021 (alpha_weighted).
  Clauset, Shalizi & Newman, "Power-law distributions in empirical data",
  SIAM Review 2009.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MIN_EIGENVALUES = 50   # WeightWatcher skips layers with fewer eigenvalues
EIG_FLOOR = 1e-5       # eigenvalues <= this are dropped before the fit


def powerlaw_alpha(lam: jax.Array, min_eigenvalues: int = MIN_EIGENVALUES,
                   floor: float = EIG_FLOOR) -> dict[str, jax.Array]:
  """Power-law exponent of an eigenvalue spectrum.

  For each candidate xmin = lambda_i (ascending order, n_i = #{j >= i}):
  alpha_i = 1 + n_i / (sum_{j >= i} ln lambda_j - n_i ln lambda_i) and
  D_i = max_{j >= i} |1 - (lambda_j / lambda_i)^(1 - alpha_i) - (j - i) / n_i|;
  the i with the smallest D_i is kept.

  Args:
    lam: (N,) eigenvalues in any order (zeros allowed).
    min_eigenvalues: fewer eigenvalues above `floor` give nan.
    floor: eigenvalues <= floor are dropped.

  Returns:
    alpha, alpha_weighted = alpha log10(lambda_max), log_spectral_norm =
    log10(lambda_max), xmin (the fitted lower cutoff), ks_distance.
  """
  lam = jnp.sort(lam.astype(jnp.float32))
  N = lam.shape[0]
  valid = lam > floor
  # Sorted ascending, the valid eigenvalues are a suffix: n_i = N - i.
  idx = jnp.arange(N)
  n_i = (N - idx).astype(lam.dtype)
  log_lam = jnp.log(jnp.where(valid, lam, 1.0))
  suffix = jnp.cumsum(log_lam[::-1])[::-1]
  denom = suffix - n_i * log_lam
  candidate = valid & (n_i >= 2) & (denom > 0)
  alpha = 1.0 + n_i / jnp.where(candidate, denom, 1.0)
  # ratio[i, j] = lambda_j / lambda_i for j >= i.
  upper = idx[None, :] >= idx[:, None]
  ratio = jnp.where(upper, jnp.exp(log_lam[None, :] - log_lam[:, None]), 1.0)
  cdf = 1.0 - ratio ** (1.0 - alpha[:, None])
  emp = (idx[None, :] - idx[:, None]).astype(lam.dtype) / n_i[:, None]
  D = jnp.max(jnp.where(upper, jnp.abs(cdf - emp), 0.0), axis=1)
  D = jnp.where(candidate, D, jnp.inf)
  best = jnp.argmin(D)
  enough = jnp.sum(valid) >= min_eigenvalues
  nan = jnp.asarray(jnp.nan, lam.dtype)
  a = jnp.where(enough, alpha[best], nan)
  log_max = jnp.log10(lam[-1])
  return {
      "alpha": a,
      "alpha_weighted": a * log_max,
      "log_spectral_norm": jnp.where(enough, log_max, nan),
      "xmin": jnp.where(enough, lam[best], nan),
      "ks_distance": jnp.where(enough, D[best], nan),
  }
