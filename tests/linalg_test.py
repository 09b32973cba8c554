"""The matmul-path factorizations: orthonormality, agreement with
Householder QR and LAPACK's SVD, rank-deficient and zero blocks, masked
columns, float64, and orthonormality over 10,000 float32 steps."""

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrtrain import factorizations as fz
from lrtrain.factorizations import lowrank
from lrtrain.integrators import base, geolora, kls, linalg


def _orth_err(X, r):
  X = np.asarray(X, np.float64)[:, :r]
  return np.max(np.abs(X.T @ X - np.eye(r)))


def _random_orthonormal(key, n, r, C):
  Q = jnp.linalg.qr(jax.random.normal(key, (n, r)))[0]
  return jnp.pad(Q, ((0, 0), (0, C - r)))


@pytest.mark.parametrize("n,C,r", [(64, 16, 16), (200, 32, 20), (50, 8, 3)])
def test_orth_matches_householder_and_masks(n, C, r):
  X = jax.random.normal(jax.random.PRNGKey(0), (n, C))
  Q = linalg.orth(X, r)
  with linalg.implementation("lapack"):
    H = linalg.orth(X, r)
  assert _orth_err(Q, r) < 1e-5
  np.testing.assert_allclose(Q, H, atol=2e-5)
  assert r == C or float(jnp.max(jnp.abs(Q[:, r:]))) == 0.0


def test_orth_ill_conditioned_full_rank():
  """Condition 1e5 in float32 needs shifted passes; still orthonormal and
  the same basis as Householder's."""
  key = jax.random.PRNGKey(1)
  A = jnp.linalg.qr(jax.random.normal(key, (300, 12)))[0]
  B = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(2), (12, 12)))[0]
  X = (A * jnp.logspace(0, -5, 12)[None, :]) @ B
  Q = linalg.orth(X, 12)
  assert _orth_err(Q, 12) < 1e-5
  # Same span: the projection of X onto Q loses nothing.
  resid = X - Q @ (Q.T @ X)
  assert float(jnp.linalg.norm(resid)) < 1e-5 * float(jnp.linalg.norm(X))


@pytest.mark.parametrize("k", [linalg.HALVES_MIN_K, linalg.HALVES_MIN_K + 1])
def test_gram_and_triangular_product_by_halves(k):
  """From HALVES_MIN_K columns on (odd widths too): the Gram matrix is
  X^T X to rounding and exactly symmetric, the product with an upper
  triangular factor is X T to rounding, and a Cholesky QR of an
  ill-conditioned block that goes through them is orthonormal and spans
  the block."""
  n = 2 * k + 3
  X = jax.random.normal(jax.random.PRNGKey(0), (n, k))
  T = jnp.triu(jax.random.normal(jax.random.PRNGKey(1), (k, k)))
  G = np.asarray(linalg._gram(X))
  np.testing.assert_array_equal(G, G.T)
  X64, T64 = np.asarray(X, np.float64), np.asarray(T, np.float64)
  u = np.finfo(np.float32).eps          # the products' rounding bounds
  x, t = np.max(np.abs(X64)), np.max(np.abs(T64))
  assert np.max(np.abs(G - X64.T @ X64)) < n * u * x * x
  assert np.max(np.abs(linalg._times_upper(X, T) - X64 @ T64)) < k * u * x * t
  A = jnp.linalg.qr(X)[0]
  B = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(2), (k, k)))[0]
  Y = (A * jnp.logspace(0, -3, k)[None, :]) @ B
  Q = linalg.orth(Y, k)
  assert _orth_err(Q, k) < 1e-5
  resid = Y - Q @ (Q.T @ Y)
  assert float(jnp.linalg.norm(resid)) < 1e-5 * float(jnp.linalg.norm(Y))


def test_extend_keeps_U_exactly_and_spans_D():
  n, C, r = 100, 16, 6
  U = _random_orthonormal(jax.random.PRNGKey(0), n, r, C)
  D = jax.random.normal(jax.random.PRNGKey(1), (n, C)) * base.column_mask(r, C)
  Uh = linalg.extend(U, D, r)
  assert bool(jnp.all(Uh[:, :r] == U[:, :r]))
  assert _orth_err(Uh, 2 * r) < 1e-5
  assert float(jnp.max(jnp.abs(Uh[:, 2 * r:]))) == 0.0
  resid = D - Uh @ (Uh.T @ D)
  assert float(jnp.linalg.norm(resid)) < 1e-5 * float(jnp.linalg.norm(D))
  with linalg.implementation("lapack"):
    Hh = linalg.extend(U, D, r)
  # The new block agrees with Householder's on [U | D] to rounding.
  np.testing.assert_allclose(Uh, Hh, atol=3e-5)


@pytest.mark.parametrize("kind", ["zero", "rank2", "in_span_of_U"])
def test_extend_rank_deficient_blocks_get_orthonormal_completions(kind):
  """Rank >= batch makes the new block rank-deficient; a zero gradient
  makes it zero; neither may give NaN or a non-orthonormal basis."""
  n, C, r = 80, 16, 8
  U = _random_orthonormal(jax.random.PRNGKey(3), n, r, C)
  key = jax.random.PRNGKey(4)
  if kind == "zero":
    D = jnp.zeros((n, C))
  elif kind == "rank2":
    D = jax.random.normal(key, (n, 2)) @ jax.random.normal(key, (2, C))
  else:
    D = U @ jax.random.normal(key, (C, C))
  D = D * base.column_mask(r, C)
  Uh = linalg.extend(U, D, r)
  assert bool(jnp.all(jnp.isfinite(Uh)))
  assert bool(jnp.all(Uh[:, :r] == U[:, :r]))
  assert _orth_err(Uh, 2 * r) < 1e-5
  resid = D - Uh @ (Uh.T @ D)
  assert float(jnp.linalg.norm(resid)) <= 1e-5 * (1 + float(jnp.linalg.norm(D)))


def test_straight_line_path_is_taken_and_equals_the_general_one():
  """A full-rank block whose columns differ in scale (the first pass then
  leaves a Gram defect of a few 1e-2, as real K and L updates do) is done
  by the two straight-line passes, and they give the general algorithm's
  basis to rounding; a rank-deficient block is handed to the general one."""
  n, C, r = 400, 32, 16
  H = C // 2
  U = _random_orthonormal(jax.random.PRNGKey(11), n, r, C)
  key = jax.random.PRNGKey(12)
  D = (jax.random.normal(key, (n, C)) * jnp.logspace(0, -2.5, C)[None, :]
       @ jax.random.normal(jax.random.PRNGKey(13), (C, C)))
  D = D * base.column_mask(r, C)
  mask = base.column_mask(r, H)
  eps = float(jnp.finfo(jnp.float32).eps)
  X = D[:, :H] - U[:, :H] @ (U[:, :H].T @ D[:, :H])
  Q1, _, _ = linalg._cholesky_pass(X, mask, eps, always_shift=True)
  defect = float(jnp.max(jnp.abs(Q1.T @ Q1 - jnp.eye(H))))
  assert 1e-2 < defect <= linalg.NEAR, defect
  Q, ok = linalg._two_passes(U[:, :H], D[:, :H], mask, eps)
  assert bool(ok)
  Uh = linalg.extend(U, D, r)
  np.testing.assert_allclose(Uh, linalg._extend_robust(U, D, r), atol=2e-5)
  assert _orth_err(Uh, 2 * r) < 1e-5
  D2 = (jax.random.normal(key, (n, 2)) @ jax.random.normal(key, (2, C))
        ) * base.column_mask(r, C)
  _, ok = linalg._two_passes(U[:, :H], D2[:, :H], mask, eps)
  assert not bool(ok)


@pytest.mark.parametrize("case", ["common", "scaled", "rank2", "2r>C",
                                  "complete", "float64"])
def test_extend_factor_is_the_new_blocks_coordinates_of_D(case):
  """with_factor: T = block^T D on D's active columns, to rounding, on every
  path: the passes' triangular factors in the common case (full-rank and
  badly scaled blocks), the product where the general algorithm runs (a
  rank-deficient block, 2r > C) or where the block completes U to a basis
  of the whole space; columns from r on do not matter (inactive)."""
  with jax.enable_x64(case == "float64"):
    _check_extend_factor(case)


def _check_extend_factor(case):
  n, C, r, dtype = 200, 16, 6, jnp.float32
  if case == "2r>C":
    r = 11
  if case == "complete":
    n, C, r = 32, 32, 16
  if case == "float64":
    dtype = jnp.float64
  key = jax.random.PRNGKey(21)
  U = _random_orthonormal(key, n, r, C).astype(dtype)
  D = jax.random.normal(jax.random.PRNGKey(22), (n, C), dtype)
  if case == "scaled":
    D = D * jnp.logspace(0, -2.5, C, dtype=dtype)[None, :] @ jax.random.normal(
        jax.random.PRNGKey(23), (C, C), dtype)
  if case == "rank2":
    D = jax.random.normal(key, (n, 2), dtype) @ jax.random.normal(
        jax.random.PRNGKey(24), (2, C), dtype)
  D = D + 3.0 * U @ jax.random.normal(jax.random.PRNGKey(25), (C, C), dtype)
  D = D * base.column_mask(r, C, dtype)
  Uh, block, T = linalg.extend(U, D, r, with_block=True, with_factor=True)
  assert T.shape == (C // 2, C) and T.dtype == dtype
  ref = np.asarray(block, np.float64).T @ np.asarray(D, np.float64)
  tol = (1e-5 if dtype == jnp.float32 else 1e-12) * np.abs(ref).max()
  np.testing.assert_allclose(np.asarray(T)[:, :r], ref[:, :r], atol=tol)
  # The plain call's basis is the same.
  np.testing.assert_array_equal(Uh, linalg.extend(U, D, r))
  with pytest.raises(ValueError, match="with_factor needs with_block"):
    linalg.extend(U, D, r, with_factor=True)
  # The factored form stands for the same basis and gives the same factor:
  # formed, and in a product with a (C, K) matrix (every row of P used).
  E, T2 = linalg.extend(U, D, r, factored=True, with_factor=True)
  assert isinstance(E, linalg.Extension)
  np.testing.assert_allclose(T2, T, rtol=0, atol=tol)
  scale = 2e-6 if dtype == jnp.float32 else 1e-14
  np.testing.assert_allclose(linalg.formed(E, C), Uh, rtol=0, atol=scale)
  P = jax.random.normal(jax.random.PRNGKey(26), (C, 5), dtype)
  np.testing.assert_allclose(linalg.times(E, P), Uh @ P, rtol=0,
                             atol=10 * scale * float(jnp.abs(P).max()))


def test_extend_when_2r_exceeds_capacity():
  n, C, r = 60, 8, 6
  U = _random_orthonormal(jax.random.PRNGKey(5), n, r, C)
  D = jax.random.normal(jax.random.PRNGKey(6), (n, C)) * base.column_mask(r, C)
  Uh = linalg.extend(U, D, r)
  assert _orth_err(Uh, C) < 1e-5
  assert bool(jnp.all(Uh[:, :r] == U[:, :r]))
  # The two new columns span the first two directions of D off U.
  D2 = D[:, :2] - U @ (U.T @ D[:, :2])
  resid = D2 - Uh[:, r:] @ (Uh[:, r:].T @ D2)
  assert float(jnp.linalg.norm(resid)) < 1e-5 * float(jnp.linalg.norm(D2))


def test_extend_to_a_complete_basis_ignores_the_blocks_conditioning():
  """2r = n = C: the new block completes U to an orthogonal n x n matrix,
  also for a new block of rank far below r (a gradient of rank < batch),
  on the common path (no Householder fallback needed)."""
  n = C = 64
  r = 32
  U = _random_orthonormal(jax.random.PRNGKey(12), n, r, C)
  low = jax.random.normal(jax.random.PRNGKey(13), (n, 3)) @ jax.random.normal(
      jax.random.PRNGKey(14), (3, C))
  for D in (low, jnp.zeros((n, C))):
    Uh, block = linalg.extend(U, D, r, with_block=True)
    assert _orth_err(Uh, C) < 1e-5
    assert bool(jnp.all(Uh[:, :r] == U[:, :r]))
    np.testing.assert_array_equal(block[:, :r], Uh[:, r:])
  # The common path's passes fail on the low-rank block itself and succeed
  # on the fixed columns `extend` puts in its place.
  mask = base.column_mask(r, C // 2, jnp.float32)
  eps = float(jnp.finfo(jnp.float32).eps)
  _, ok_low = linalg._two_passes(U[:, :r], low[:, :r], mask, eps)
  _, ok_walsh = linalg._two_passes(U[:, :r], linalg.walsh(n, r, jnp.float32),
                                   mask, eps)
  assert not bool(ok_low) and bool(ok_walsh)


def test_core_svd_eigen_route_error_bound():
  """Values within u ||S||^2 / sigma_i of the SVD's; the truncated core
  within C u kappa ||S|| of the SVD's truncation; P and Q orthonormal."""
  C, k = 32, 10
  key = jax.random.PRNGKey(7)
  A = jnp.linalg.qr(jax.random.normal(key, (C, C)))[0]
  B = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(8), (C, C)))[0]
  s = jnp.concatenate([jnp.logspace(0, -2, k), 1e-4 * jnp.ones(C - k)])
  S = (A * s) @ B.T
  assert linalg.gram_route(C, 0.1, jnp.float32)
  P, sig, Q = linalg.core_svd(S, 0.1, route="eigh")
  u = float(jnp.finfo(jnp.float32).eps)
  ref = np.linalg.svd(np.asarray(S, np.float64), compute_uv=False)
  assert np.all(np.abs(np.asarray(sig) - ref) <= 4 * C * u / np.maximum(ref, 1e-3) + 1e-6)
  assert _orth_err(P, C) < 1e-5 and _orth_err(Q, C) < 1e-5
  trunc = (P[:, :k] * sig[:k]) @ Q[:, :k].T
  Pr, sr, Qrt = np.linalg.svd(np.asarray(S, np.float64))
  ref_trunc = (Pr[:, :k] * sr[:k]) @ Qrt[:k]
  kappa = float(ref[0] / ref[k - 1])
  assert np.linalg.norm(np.asarray(trunc) - ref_trunc, 2) <= C * u * kappa * ref[0]


def test_core_svd_small_tau_uses_lapack_svd():
  """Where squaring the values could move the rank (tau^2 near C u), the
  route is LAPACK's SVD."""
  assert not linalg.gram_route(128, 1e-3, jnp.float32)
  assert linalg.gram_route(128, 1e-3, jnp.float64)
  S = jnp.diag(jnp.array([1.0, 1e-3, 0.5e-3, 0.0]))
  P, sig, Q = linalg.core_svd(S, 1e-3, route="eigh")
  np.testing.assert_allclose(sig, [1.0, 1e-3, 0.5e-3, 0.0], atol=1e-7)


def _core(key, C, sigma):
  A = jnp.linalg.qr(jax.random.normal(key, (C, C)))[0]
  B = jnp.linalg.qr(jax.random.normal(jax.random.fold_in(key, 1), (C, C)))[0]
  return (A * sigma) @ B.T


def _truncate_both(S, **kw):
  """base.truncate by the default route and by LAPACK's SVD, with S_new cut
  to P's K columns."""
  cut = lambda P, Q, S_new, r: (P, Q, S_new[:P.shape[1], :P.shape[1]], r)
  out = jax.jit(lambda S: cut(*base.truncate(S, **kw)))(S)
  with linalg.implementation("lapack"):
    ref = jax.jit(lambda S: cut(*base.truncate(S, **kw)))(S)
  return out, ref


@pytest.mark.parametrize("C,shape", [(256, "settled"), (500, "settled"),
                                     (256, "decaying")])
def test_truncate_eigen_route_matches_svd(C, shape):
  """At C >= EIGH_MIN_C the truncation takes the eigenvectors of S^T S and
  forms only the kept left vectors: the same rank as LAPACK's SVD, values
  within C u ||S||^2 / sigma_i, the truncated core within C u kappa ||S||,
  orthonormal kept columns and zero columns after."""
  key = jax.random.PRNGKey(C)
  H = C // 2
  if shape == "settled":   # what a step leaves: a kept diagonal plus an update
    sig = jnp.concatenate([jnp.linspace(3.0, 0.5, H), jnp.zeros(C - H)])
    S = jnp.diag(sig) + 1e-2 * jax.random.normal(key, (C, C))
  else:
    S = _core(key, C, jnp.logspace(0, -3, C))
  assert C >= linalg.EIGH_MIN_C
  (P, Q, S_new, r), (Pr, Qr, Sr, rr) = _truncate_both(S, tau=0.1, r_min=1, r_max=H)
  assert int(r) == int(rr) and 1 < int(r) <= H
  r = int(r)
  u = float(jnp.finfo(jnp.float32).eps)
  sig, ref = np.diagonal(np.asarray(S_new))[:r], np.diagonal(np.asarray(Sr))[:r]
  assert np.all(np.abs(sig - ref) <= 4 * C * u * ref[0] ** 2 / ref + 1e-6)
  assert _orth_err(P, r) < 1e-5 and _orth_err(Q, r) < 1e-5
  assert float(jnp.max(jnp.abs(P[:, r:]))) == 0.0
  trunc = np.asarray(P @ S_new @ Q.T, np.float64)
  ref_trunc = np.asarray(Pr @ Sr @ Qr.T, np.float64)
  kappa = float(ref[0] / ref[-1])
  assert np.linalg.norm(trunc - ref_trunc, 2) <= C * u * kappa * ref[0]


@pytest.mark.parametrize("keep", ["past_numerical_rank", "past_half"])
def test_truncate_eigen_route_rank_forced(keep):
  """r_min above the core's numerical rank (zero values kept: their left
  vectors are an orthonormal completion) and a kept rank above C / 2 (all
  left vectors formed): P orthonormal on the kept columns, P S_new Q^T the
  SVD's truncation."""
  C = 256
  key = jax.random.PRNGKey(3)
  if keep == "past_numerical_rank":
    S = _core(key, C, jnp.concatenate([jnp.linspace(2.0, 1.0, 20),
                                       jnp.zeros(C - 20)]))
    r_keep = 40
  else:
    S = _core(key, C, jnp.linspace(2.0, 1.0, C))
    r_keep = 200
  (P, Q, S_new, r), (Pr, Qr, Sr, _) = _truncate_both(
      S, tau=0.1, r_min=r_keep, r_max=r_keep)
  assert int(r) == r_keep
  assert _orth_err(P, r_keep) < 1e-5 and _orth_err(Q, r_keep) < 1e-5
  np.testing.assert_allclose(P @ S_new @ Q.T, Pr @ Sr @ Qr.T, atol=1e-5)


def test_polish_restores_orthonormality_and_keeps_W():
  n, C, r = 40, 8, 5
  U = _random_orthonormal(jax.random.PRNGKey(9), n, r, C)
  V = _random_orthonormal(jax.random.PRNGKey(10), n, r, C)
  drift = 1e-4 * jax.random.normal(jax.random.PRNGKey(11), (n, C)) * base.column_mask(r, C)
  Ud = U + drift
  S = jnp.diag(jnp.arange(C, 0, -1.0) * base.column_mask(r, C))
  U2, S2, V2 = linalg.polish(Ud, S, V, r)
  assert _orth_err(U2, r) < 1e-5 and _orth_err(Ud, r) > 1e-5
  np.testing.assert_allclose(U2 @ S2 @ V2.T, Ud @ S @ V.T, atol=1e-5)
  # Already orthonormal factors are left exactly as they are.
  U3, S3, V3 = linalg.polish(U, S, V, r)
  assert bool(jnp.all(U3 == U)) and bool(jnp.all(S3 == S))


def _drifted_truncation(key, n, C, K, r, drift):
  """A truncation's factors U = U^ P, V = V^ Q (orthonormal U^, V^ and
  P, Q, plus drift on U's active columns) and its values."""
  ks = jax.random.split(key, 5)
  Uh = _random_orthonormal(ks[0], n, C, C)
  Vh = _random_orthonormal(ks[1], n + 5, C, C)
  mask = base.column_mask(r, K)
  P = jnp.linalg.qr(jax.random.normal(ks[2], (C, K)))[0] * mask
  Q = jnp.linalg.qr(jax.random.normal(ks[3], (C, K)))[0] * mask
  sigma = jnp.linspace(3.0, 0.5, K) * mask
  U = Uh @ P + drift * jax.random.normal(ks[4], (n, K)) * mask
  return Uh, Vh, U, Vh @ Q, sigma, P, Q


def test_polish_diagonal_keeps_W_and_a_diagonal_core():
  """A drifted truncation: orthonormal factors again, the core diagonal
  with sigma's order, W kept, U' = U^ P' on the coordinates handed back
  (the drift enters through U, so U^ P' matches it to the drift's
  size), inactive columns zero."""
  n, C, K, r = 60, 12, 8, 5
  Uh, Vh, U, V, sigma, P, Q = _drifted_truncation(jax.random.PRNGKey(3), n,
                                                  C, K, r, 1e-4)
  U2, S2, V2, P2, Q2 = jax.jit(linalg.polish_diagonal)(U, sigma, V, r, P, Q)
  assert _orth_err(U, r) > 1e-5
  assert _orth_err(U2, r) < 1e-5 and _orth_err(V2, r) < 1e-5
  S2 = np.asarray(S2)
  np.testing.assert_array_equal(S2, np.diag(np.diagonal(S2)))
  s2 = np.diagonal(S2)
  assert np.all(np.diff(s2[:r]) <= 0) and np.all(s2[r:] == 0)
  np.testing.assert_allclose(U2 @ S2 @ V2.T, U @ jnp.diag(sigma) @ V.T,
                             atol=2e-5)
  np.testing.assert_allclose(Uh @ P2, U2, atol=5e-4)
  np.testing.assert_allclose(Vh @ Q2, V2, atol=1e-5)
  assert not np.any(np.asarray(U2)[:, r:]) and not np.any(np.asarray(P2)[:, r:])
  # The rotation is near the identity: distinct values keep their vectors.
  assert np.max(np.abs(np.sum(np.asarray(U2)[:, :r] * np.asarray(U)[:, :r],
                              axis=0) - 1)) < 1e-3


def test_polish_diagonal_leaves_undrifted_factors_alone():
  Uh, Vh, U, V, sigma, P, Q = _drifted_truncation(jax.random.PRNGKey(4), 60,
                                                  12, 8, 5, 0.0)
  out = jax.jit(linalg.polish_diagonal)(U, sigma, V, 5, P, Q)
  for got, want in zip(out, (U, jnp.diag(sigma), V, P, Q)):
    assert bool(jnp.all(got == want))


def test_polish_diagonal_with_a_zero_value_polishes_triangular():
  """A zero among the active values (the SVD's vectors for it are
  arbitrary): the factors are polished as `polish` does, W kept, and the
  core is the triangular R_U S R_V^T."""
  n, C, K, r = 60, 12, 8, 5
  Uh, Vh, U, V, sigma, P, Q = _drifted_truncation(jax.random.PRNGKey(5), n,
                                                  C, K, r, 1e-4)
  sigma = sigma.at[r - 1].set(0.0)
  U2, S2, V2, P2, Q2 = jax.jit(linalg.polish_diagonal)(U, sigma, V, r, P, Q)
  U3, S3, V3 = linalg.polish(U, jnp.diag(sigma), V, r)
  np.testing.assert_allclose(S2, S3, atol=1e-6)
  np.testing.assert_allclose(U2, U3, atol=1e-6)
  assert _orth_err(U2, r) < 1e-5
  assert bool(jnp.all(P2 == P)) and bool(jnp.all(Q2 == Q))
  np.testing.assert_allclose(U2 @ S2 @ V2.T, U @ jnp.diag(sigma) @ V.T,
                             atol=2e-5)


def test_polish_diagonal_under_vmap_with_batched_ranks():
  """Seeds vmapped with different ranks, one drifted and one not: each
  element equals its unbatched polish."""
  a = _drifted_truncation(jax.random.PRNGKey(6), 40, 10, 6, 4, 1e-4)
  b = _drifted_truncation(jax.random.PRNGKey(7), 40, 10, 6, 4, 0.0)
  b = b[:4] + (b[4] * base.column_mask(3, 6),) + b[5:]
  stack = lambda i: jnp.stack([a[i], b[i]])
  rs = jnp.array([4, 3])
  got = jax.jit(jax.vmap(linalg.polish_diagonal))(
      stack(2), stack(4), stack(3), rs, stack(5), stack(6))
  for j, (x, r) in enumerate(((a, 4), (b, 3))):
    want = linalg.polish_diagonal(x[2], x[4], x[3], r, x[5], x[6])
    for g, w in zip(got, want):
      np.testing.assert_allclose(g[j], w, atol=1e-6)


def _mat_loss(p, b):
  return 0.5 * jnp.sum(jnp.square(fz.materialize(p["w"]) - b["A"])), {}


@pytest.mark.tier2
@pytest.mark.parametrize("method", ["kls", "geolora"])
def test_orthonormal_after_10000_float32_steps(method):
  n, m = 16, 12
  p = {"w": lowrank.init(jax.random.PRNGKey(0), n, m, 3)}
  mod = kls if method == "kls" else geolora
  integ = mod.make(optax.sgd(0.2, momentum=0.9), tau=0.3, r_min=1, r_max=6)
  p, _, _ = integ.resize(p, None)
  st = integ.init(p)
  target = jax.random.normal(jax.random.PRNGKey(2), (n, m))

  def body(carry, key):
    p, st = carry
    A = target + 0.3 * jax.random.normal(key, (n, m))
    p, st, aux = integ.step(_mat_loss, p, st, {"A": A})
    return (p, st), (aux["rank/w"], base.is_diagonal(p["w"].S))

  (p, st), (ranks, diagonal) = jax.jit(lambda c, k: jax.lax.scan(body, c, k))(
      (p, st), jax.random.split(jax.random.PRNGKey(1), 10_000))
  f = p["w"]
  r = int(f.rank)
  assert len(set(np.asarray(ranks).tolist())) >= 1
  assert _orth_err(f.U, r) < 1e-5 and _orth_err(f.V, r) < 1e-5
  assert bool(jnp.all(jnp.isfinite(f.S)))
  # Every truncation leaves a diagonal core, the polish passes included.
  assert bool(jnp.all(diagonal))


@pytest.mark.parametrize("method", ["kls", "geolora"])
def test_polish_passes_keep_the_core_diagonal_and_the_run(method, monkeypatch):
  """With the drift threshold so low that the polish pass runs in nearly
  every step, the core stays diagonal, the bases orthonormal, and the run
  (momentum SGD: the moments follow the polish's rotation) stays with the
  same run at the default threshold."""
  n, m = 16, 12
  target = jax.random.normal(jax.random.PRNGKey(2), (n, m))
  keys = jax.random.split(jax.random.PRNGKey(1), 40)

  def run():
    p = {"w": lowrank.init(jax.random.PRNGKey(0), n, m, 3)}
    mod = kls if method == "kls" else geolora
    integ = mod.make(optax.sgd(0.1, momentum=0.9), tau=0.05, r_min=1,
                     r_max=6)
    p, _, _ = integ.resize(p, None)
    st = integ.init(p)

    def body(carry, key):
      p, st = carry
      A = target + 0.1 * jax.random.normal(key, (n, m))
      p, st, aux = integ.step(_mat_loss, p, st, {"A": A})
      return (p, st), (base.is_diagonal(p["w"].S),
                       linalg.defect_estimate(p["w"].U, p["w"].rank))

    return jax.jit(lambda c, k: jax.lax.scan(body, c, k))((p, st), keys)

  (p0, _), _ = run()
  monkeypatch.setattr(linalg, "POLISH_TOL", 1e-3)
  (p1, _), (diagonal, defect) = run()
  assert bool(jnp.all(diagonal))
  f = p1["w"]
  assert int(f.rank) == int(p0["w"].rank)
  assert _orth_err(f.U, int(f.rank)) < 1e-5
  # The pass ran: the defect left after the steps is at rounding level.
  assert float(jnp.max(defect)) < 1e-5
  np.testing.assert_allclose(fz.materialize(f), fz.materialize(p0["w"]),
                             atol=1e-4)


def test_float64_stays_float64():
  """With x64 on, a float64 factor is augmented, truncated and stepped in
  float64 (orthonormal to 1e-12), not in float32."""
  code = textwrap.dedent("""
      import jax
      jax.config.update("jax_enable_x64", True)
      import jax.numpy as jnp, optax, numpy as np
      from lrtrain import factorizations as fz
      from lrtrain.factorizations import lowrank
      from lrtrain.integrators import kls, geolora
      key = jax.random.PRNGKey(0)
      A = jax.random.normal(key, (20, 15), jnp.float64)
      loss = lambda p, b: (0.5 * jnp.sum((fz.materialize(p["w"]) - b) ** 2), {})
      for mod in (kls, geolora):
        p = {"w": lowrank.init(key, 20, 15, 3, capacity=8, dtype=jnp.float64)}
        integ = mod.make(optax.sgd(0.1), tau=0.05, r_min=1, r_max=4)
        st = integ.init(p)
        step = jax.jit(lambda p, s: integ.step(loss, p, s, A)[:2])
        for _ in range(50):
          p, st = step(p, st)
        f = p["w"]
        assert f.U.dtype == jnp.float64, f.U.dtype
        r = int(f.rank)
        U = np.asarray(f.U)[:, :r]
        err = np.max(np.abs(U.T @ U - np.eye(r)))
        assert err < 1e-12, err
      print("ok")
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def _counting_branches():
  calls = {"true": 0, "false": 0}

  def branch(name, sign):
    def fn(x):
      jax.debug.callback(lambda: calls.__setitem__(name, calls[name] + 1))
      return sign * x
    return fn

  return calls, branch("true", 1.0), branch("false", -1.0)


@pytest.mark.parametrize("preds, runs", [
    ((True, True, True), {"true": True, "false": False}),
    ((False, False, False), {"true": False, "false": True}),
    ((True, False, True), {"true": True, "false": True}),
])
def test_cond_under_vmap_runs_a_branch_once_per_batch(preds, runs):
  """Batched predicate: one vmapped branch when all agree, both (and a
  select) only when they differ; values as lax.cond per element."""
  calls, t, f = _counting_branches()
  pred = jnp.asarray(preds)
  x = jnp.arange(6.0).reshape(3, 2) + 1.0
  got = jax.jit(jax.vmap(lambda p, x: linalg.cond(p, t, f, x)))(pred, x)
  jax.effects_barrier()
  want = jnp.where(pred[:, None], x, -x)
  np.testing.assert_array_equal(got, want)
  assert {k: v > 0 for k, v in calls.items()} == runs   # which branches ran
  # unbatched predicate, batched operand; and outside vmap
  calls.update(true=0, false=0)
  got = jax.jit(jax.vmap(lambda x: linalg.cond(True, t, f, x)))(x)
  jax.effects_barrier()
  np.testing.assert_array_equal(got, x)
  assert calls["true"] > 0 and calls["false"] == 0
  np.testing.assert_array_equal(jax.jit(lambda x: linalg.cond(False, t, f, x))(x), -x)


def test_fresh_wide_basis_is_not_repolished():
  """A basis orthonormal to working precision (Householder, 1024 x 512)
  passes the defect check: no pass, no triangular core, every step."""
  n, C = 1024, 512
  X = jax.jit(lambda k: linalg.orth(jax.random.normal(k, (n, C)), C))(
      jax.random.PRNGKey(3))
  X2, R = jax.jit(lambda X: linalg.polish_basis(X, C))(X)
  assert bool(jnp.all(X2 == X)) and bool(jnp.all(R == jnp.eye(C)))
  # ... while a drifted one is polished.
  Xd = X * (1.0 + 1e-4)
  _, R = jax.jit(lambda X: linalg.polish_basis(X, C))(Xd)
  assert not bool(jnp.all(R == jnp.eye(C)))


def test_svd_falls_back_where_divide_and_conquer_fails(monkeypatch):
  """float32 gesdd returned NaN for a finite, nearly singular 512 x 512
  GeoLoRA core; `linalg.svd` then takes LAPACK's QR-iteration SVD. Here the
  failure is forced (NaN from the first routine) and the fallback must give
  the SVD; a finite result is kept as it is."""
  from lrtrain import lapack
  S = jax.random.normal(jax.random.PRNGKey(9), (12, 12))
  S = S.at[:, -1].set(S[:, 0])            # exactly singular, like the core
  good = linalg.svd(S)
  np.testing.assert_allclose(good[1], np.linalg.svd(np.asarray(S), compute_uv=False),
                             rtol=1e-5, atol=1e-5)
  real = lapack.svd
  monkeypatch.setattr(lapack, "svd", lambda a, full_matrices=True: tuple(
      jnp.full_like(x, jnp.nan) for x in real(a, full_matrices=full_matrices)))
  P, s, Qt = jax.jit(linalg.svd)(S)
  assert bool(jnp.all(jnp.isfinite(P))) and bool(jnp.all(jnp.isfinite(Qt)))
  np.testing.assert_allclose(s, good[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose((P * s) @ Qt, S, atol=1e-5)


@pytest.mark.parametrize("cond", [30.0, 600.0, 3000.0])
def test_moderately_conditioned_blocks_stay_on_the_straight_line_path(cond):
  """Blocks of condition up to ~3e3 (a K = U S of a spread spectrum) are
  full rank for the straight-line passes: no fallback to Householder QR,
  orthonormal to float32 rounding and Householder's basis; at condition
  600 the first pass runs unshifted (two passes suffice)."""
  n, k = 1024, 64
  A = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(7), (n, k)))[0]
  B = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(8), (k, k)))[0]
  X = 3.0 * (A * jnp.logspace(0, -np.log10(cond), k)[None, :]) @ B
  mask = jnp.ones((k,))
  eps = float(jnp.finfo(jnp.float32).eps)
  Q, ok = linalg._two_passes(None, X, mask, eps)
  assert bool(ok)
  assert _orth_err(Q, k) < 2e-6
  with linalg.implementation("lapack"):
    H = linalg.orth(X, k)
  np.testing.assert_allclose(Q, H, atol=1e-3 * cond / 3000 + 2e-5)
  Q1 = linalg._first_pass(X, mask, eps)
  defect = float(jnp.max(jnp.abs(Q1.T @ Q1 - jnp.eye(k))))
  if cond <= 600:
    assert defect < linalg.NEAR          # unshifted: one more pass finishes


@pytest.mark.parametrize("k", [5, 64, 65, 250])
def test_lower_inverse_matches_a_triangular_solve(k):
  """The blocked inverse of a Cholesky factor is lower triangular and equals
  one triangular solve to float32 rounding (relative to its largest entry)."""
  X = jax.random.normal(jax.random.PRNGKey(k), (2 * k, k))
  L = jnp.linalg.cholesky(X.T @ X)
  inv = linalg.lower_inverse(L)
  ref = np.linalg.inv(np.asarray(L, np.float64))
  assert np.max(np.abs(np.asarray(inv) - ref)) <= 1e-5 * np.max(np.abs(ref))
  assert float(jnp.max(jnp.abs(jnp.triu(inv, 1)))) == 0.0


def test_vmapped_with_batched_ranks():
  """Under jax.vmap (seeds) the rank and mask are batched: the branches of
  the first pass (64+ columns), of the eigen route's left vectors and of
  GeoLoRA's S^-1 take them as operands, and each element equals its
  unbatched call."""
  X = jax.random.normal(jax.random.PRNGKey(20), (2, 300, 128))
  r = jnp.array([100, 128])
  Q = jax.jit(jax.vmap(linalg.orth))(X, r)
  for i in range(2):
    np.testing.assert_allclose(Q[i], linalg.orth(X[i], int(r[i])), atol=1e-5)
  S = jax.random.normal(jax.random.PRNGKey(21), (2, 8, 8))
  inv = jax.jit(jax.vmap(base.guarded_inverse))(S, jnp.array([3, 8]))
  for i, ri in enumerate((3, 8)):
    np.testing.assert_allclose(inv[i], base.guarded_inverse(S[i], ri), atol=1e-5)
  cores = jnp.stack([jnp.diag(jnp.linspace(2.0, 0.5, 256)) + 1e-2 * jax.random.normal(
      jax.random.PRNGKey(22 + i), (256, 256)) for i in range(2)])
  trunc = lambda S, lo: base.truncate(S, tau=0.1, r_min=lo, r_max=128)
  P, Qv, S_new, rn = jax.jit(jax.vmap(trunc))(cores, jnp.array([10, 128]))
  for i, lo in enumerate((10, 128)):
    ref = trunc(cores[i], lo)
    assert int(rn[i]) == int(ref[3])
    np.testing.assert_allclose(P[i] @ S_new[i][:128, :128] @ Qv[i].T,
                               ref[0] @ ref[2][:128, :128] @ ref[1].T, atol=1e-4)


def test_zero_pad_equals_pad():
  X = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  np.testing.assert_array_equal(linalg.zero_pad(X, (5, 7)),
                                jnp.pad(X, ((0, 0), (0, 4))))
  np.testing.assert_array_equal(linalg.zero_pad(X, (6, 3)),
                                jnp.pad(X, ((0, 1), (0, 0))))
  assert linalg.zero_pad(X, (5, 3)) is X
  v = jnp.arange(3.0)
  np.testing.assert_array_equal(linalg.zero_pad(v, (5,)), [0, 1, 2, 0, 0])


@pytest.mark.parametrize("scale", [1e-4, 3e-2, 0.1])
def test_orth_of_a_nearly_orthonormal_block(scale):
  """A retraction's U + dU (one Cholesky QR pass): orthonormal to rounding,
  Householder's basis, inactive columns zero."""
  n, C, r = 300, 24, 20
  U = _random_orthonormal(jax.random.PRNGKey(3), n, r, C)
  dU = scale * jax.random.normal(jax.random.PRNGKey(4), (n, C)) / np.sqrt(n)
  X = (U + dU) * base.column_mask(r, C)
  Q = jax.jit(functools.partial(linalg.orth, near=True), static_argnums=1)(
      X, r)
  with linalg.implementation("lapack"):
    H = linalg.orth(X, r)
  assert _orth_err(Q, r) < 2e-6
  np.testing.assert_allclose(Q, H, atol=5e-6)
  assert float(jnp.max(jnp.abs(Q[:, r:]))) == 0.0


def test_orth_of_dependent_columns_with_small_pairwise_overlaps():
  """Five unit columns summing to zero (pairwise overlaps -1/4, rank 4):
  entrywise the Gram matrix is near the identity, in norm it is not (the
  one-pass route's test reads the norm); the result is an orthonormal
  basis holding X's span."""
  n = 40
  E = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(5), (n, 5)))[0]
  X = E - jnp.mean(E, axis=1, keepdims=True)     # columns sum to zero
  X = X / jnp.linalg.norm(X, axis=0, keepdims=True)
  assert float(jnp.max(jnp.abs(X.T @ X - jnp.eye(5)))) <= linalg.NEAR + 1e-6
  Q = linalg.orth(X, 5, near=True)
  assert _orth_err(Q, 5) < 1e-5
  resid = X - Q @ (Q.T @ X)
  assert float(jnp.linalg.norm(resid)) < 1e-5 * float(jnp.linalg.norm(X))
