"""Spectra of dense and factored layers, and the metrics derived from them.

Every weight is analysed as an (out, in) = (n, m) matrix (see
`lrtrain.diagnostics.layer_matrix`). Factored layers never form W: their
spectra come from small cores after a QR of the factors, which is exact
whether or not the factors are orthonormal (the plain-optax 'factors'
integrator does not keep them so):

  U S V^T = Q_U (R_U S R_V^T) Q_V^T        spectrum = svdvals(R_U S R_V^T)
  B A     = Q_B (R_B R_A^T) Q_A^T          (QR of B and A^T), O((n + m) r^2)
  Tucker  = (core x_i R_i) x_i Q_i         mode unfoldings of the small core

Axis legend: n = out, m = in, p = min(n, m), C = buffer capacity, r = active
rank, k = top-k, L = length of a spectrum vector. A spectrum is a descending
vector `s` (L,) with a prefix mask `active` (L,): buffers have fixed
capacity, so the inactive singular values are zero and are excluded from
s_min, the condition number and the effective rank.

References:
  Roy & Vetterli, "The effective rank: a measure of effective
  dimensionality", EUSIPCO 2007.
  Hu et al., "LoRA: Low-rank adaptation of large language models", ICLR 2022
  (subspace similarity, eq. 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lrtrain import lapack
from lrtrain.factorizations import Lora, LowRank, Tucker, tucker as tucker_lib


def default_rtol(shape: tuple[int, ...], dtype) -> float:
  """max(n, m) eps(dtype): singular values at or below this times s_1 are
  numerically zero (the rule of `jnp.linalg.matrix_rank`)."""
  return max(shape) * float(jnp.finfo(dtype).eps)


def spectrum_metrics(s: jax.Array, active: jax.Array, shape: tuple[int, int],
                     rtol: float | None = None) -> dict[str, jax.Array]:
  """Norms and ranks of a spectrum (docs/diagnostics.md, "Keys").

  Args:
    s: (L,) singular values, descending.
    active: (L,) bool prefix mask of the active singular values.
    shape: (n, m) of the matrix the spectrum belongs to (for the rtol rule).
    rtol: numerical-rank tolerance relative to s_1; default
      max(n, m) * eps(dtype), as `jnp.linalg.matrix_rank`.

  Returns:
    norm_spectral s_1, norm_frobenius sqrt(sum s^2), norm_nuclear sum s,
    stable_rank sum s^2 / s_1^2, effective_rank exp(H(s / sum s)),
    numerical_rank #{s_i > rtol s_1}, kappa_log10 log10(s_1 / s_min) with
    s_min the smallest active value (inf if it is zero, nan if s = 0).
  """
  s = jnp.where(active, s, 0.0)
  if rtol is None:
    rtol = default_rtol(shape, s.dtype)
  s1 = s[0]
  sq = jnp.sum(s * s)
  nuc = jnp.sum(s)
  p = s / nuc
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  s_min = jnp.min(jnp.where(active, s, jnp.inf))
  return {
      "norm_spectral": s1,
      "norm_frobenius": jnp.sqrt(sq),
      "norm_nuclear": nuc,
      "stable_rank": sq / (s1 * s1),
      "effective_rank": jnp.where(nuc > 0, jnp.exp(entropy), jnp.nan),
      "numerical_rank": jnp.sum(s > rtol * s1).astype(jnp.int32),
      "kappa_log10": jnp.log10(s1) - jnp.log10(s_min),
  }


def pad_top(s: jax.Array, k: int, p: int, fill_missing=jnp.nan) -> jax.Array:
  """First k entries of s, zero-padded up to p (a rank-deficient matrix has
  zero singular values there) and `fill_missing` beyond p (no such value)."""
  out = jnp.zeros((k,), s.dtype).at[:min(k, s.shape[0])].set(s[:k])
  if p < k:
    out = out.at[p:].set(fill_missing)
  return out


def active_mask(length: int, rank) -> jax.Array:
  """(length,) bool prefix mask j < rank."""
  return jnp.arange(length) < rank


def _qr(x: jax.Array):
  return lapack.qr(x, mode="reduced")


def dense_spectrum(W: jax.Array, vectors: bool):
  """s (p,) of an (n, m) matrix and, if asked, its left vectors (n, p)."""
  if vectors:
    U, s, _ = lapack.svd(W, full_matrices=False)
    return s, U
  return lapack.svd(W, compute_uv=False), None


def lowrank_core(f: LowRank):
  """Q_U (n, C), the core R_U S R_V^T (C, C) and Q_V (m, C) of U S V^T."""
  Qu, Ru = _qr(f.U)
  Qv, Rv = _qr(f.V)
  return Qu, Ru @ f.S @ Rv.T, Qv


def lowrank_spectrum(f: LowRank, vectors: bool):
  """Spectrum (C,), active mask and left vectors (n, C) of U S V^T.

  With a frozen base W0 this is the spectrum of the update U S V^T.
  """
  Qu, M, _ = lowrank_core(f)
  active = active_mask(f.capacity, f.rank)
  if vectors:
    P, s, _ = lapack.svd(M)
    return s, active, Qu @ P
  return lapack.svd(M, compute_uv=False), active, None


def kappa_S_log10(f: LowRank) -> jax.Array:
  """log10 kappa of the active (r, r) block of S (CondLR's constraint)."""
  s = lapack.svd(f.S, compute_uv=False)
  active = active_mask(f.capacity, f.rank)
  return jnp.log10(s[0]) - jnp.log10(jnp.min(jnp.where(active, s, jnp.inf)))


def lora_core(f: Lora):
  """Q_B (n, r), the core scale R_B R_A^T (r, r) and Q_A (m, r) of scale B A."""
  Qb, Rb = _qr(f.B)
  Qa, Ra = _qr(f.A.T)
  return Qb, f.scale * (Rb @ Ra.T), Qa


def lora_spectrum(f: Lora) -> jax.Array:
  """Singular values (r,) of the update scale * B A by the QR trick."""
  return lapack.svd(lora_core(f)[1], compute_uv=False)


def tucker_small_core(f: Tucker):
  """Orthonormal Q_i of every mode and the core x_i R_i."""
  Qs, core = [], f.core
  for i, U in enumerate(f.factors):
    Q, R = _qr(U)
    Qs.append(Q)
    core = tucker_lib.mode_product(core, R, i)
  return Qs, core


def tucker_spectra(f: Tucker, vectors: bool):
  """Mode-1 (output) spectrum (C1,), its active mask, left vectors (c_out, C1)
  and the four mode-unfolding spectra, each padded with zeros to the mode size.

  The mode-1 unfolding of the (c_out, c_in, kh, kw) kernel is a column
  permutation of the conv matrix (c_out, kh*kw*c_in), so its spectrum and
  left vectors are those of the layer.
  """
  Qs, core = tucker_small_core(f)
  modes = []
  for i, d in enumerate(f.shape):
    si = lapack.svd(tucker_lib.unfold(core, i), compute_uv=False)
    modes.append(jnp.zeros((d,), si.dtype).at[:min(d, si.shape[0])].set(si[:d]))
  X1 = tucker_lib.unfold(core, 0)
  active = active_mask(min(X1.shape), f.ranks[0])
  if vectors:
    P, s, _ = lapack.svd(X1, full_matrices=False)
    return s, active, Qs[0] @ P, modes
  s = lapack.svd(X1, compute_uv=False)
  return s, active, None, modes


def adapter_top_left(W0: jax.Array, Qb: jax.Array, K: jax.Array, Qa: jax.Array,
                     seed: jax.Array, k: int, power_iters: int = 2):
  """Top-k left singular vectors and values of W0 + Qb K Qa^T without an SVD
  of the (n, m) matrix.

  Randomised range finding seeded with the reference's leading left vectors
  and the update's column space: the top singular subspace of W0 + update lies close to span(seed, Qb);
  `power_iters` subspace iterations sharpen it, then a Rayleigh-Ritz SVD of
  the (l, m) projection Q^T W gives the vectors. Cost O(n m l) per iteration
  with l = seed columns + r.

  Args:
    W0: (n, m) base.
    Qb: (n, r) update column basis; K: (r, r) core; Qa: (m, r) row basis.
    seed: (n, q) starting vectors (leading left vectors of the reference).
    k: number of vectors returned.
    power_iters: subspace iterations.

  Returns:
    (s (k',), Y (n, k')) with k' = min(k, l, m).
  """
  mv = lambda X: W0 @ X + Qb @ (K @ (Qa.T @ X))
  rmv = lambda Y: W0.T @ Y + Qa @ (K.T @ (Qb.T @ Y))
  Q = _qr(jnp.concatenate([seed, Qb], axis=1))[0]
  for _ in range(power_iters):
    Q = _qr(mv(_qr(rmv(Q))[0]))[0]
  Ub, s, _ = lapack.svd(rmv(Q).T, full_matrices=False)
  kk = min(k, s.shape[0])
  return s[:kk], Q @ Ub[:, :kk]


def subspace_similarity(X: jax.Array, xmask: jax.Array, Y: jax.Array,
                        ymask: jax.Array, k: int):
  """LoRA-paper phi and principal-angle cosines of two top-k subspaces.

  phi = ||X_k^T Y_k||_F^2 / min(i, j), cos(theta) = svdvals(X_k^T Y_k), with
  i, j the numbers of active columns of X_k (n, i) and Y_k (n, j).

  Returns:
    (phi (), cos (k,) padded with nan).
  """
  kx, ky = min(k, X.shape[1]), min(k, Y.shape[1])
  Xk = X[:, :kx] * xmask[:kx]
  Yk = Y[:, :ky] * ymask[:ky]
  G = Xk.T @ Yk
  denom = jnp.minimum(jnp.sum(xmask[:kx]), jnp.sum(ymask[:ky]))
  phi = jnp.sum(G * G) / denom
  cos = lapack.svd(G, compute_uv=False)
  cos = jnp.clip(cos, 0.0, 1.0)
  out = jnp.full((k,), jnp.nan, cos.dtype).at[:cos.shape[0]].set(cos)
  # Angles exist only between active directions.
  return phi, jnp.where(jnp.arange(k) < denom, out, jnp.nan)
