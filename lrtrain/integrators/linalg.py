"""Orthogonalization and core SVDs on the matmul path.

The rank-adaptive steps orthonormalize an augmented basis [U | D] and take
the SVD of a small core every step. LAPACK's Householder QR and SVD are
BLAS-2 bound and (on a CPU) single-threaded; here both go through matrix
products, Cholesky factorizations of small Gram matrices and symmetric
eigensolvers of small matrices:

  extend(U, D, r)   [U | Q] with U kept as it is: the new block D is
                    projected off U twice (block Gram-Schmidt with
                    reorthogonalization) and orthonormalized by shifted
                    Cholesky QR, repeated until its Gram matrix is the
                    identity to working precision.
  orth(X, r)        the same for X alone (retractions, fixed-rank bases);
                    one unshifted pass where the caller expects X
                    nearly orthonormal (a retraction's U + dU).
  core_svd(S, tau)  P, sigma, Q of a (C, C) core: from the eigenvectors
                    of S^T S (left vectors S Q orthonormalized, only for
                    the kept columns) from C = EIGH_MIN_C on where the
                    truncation rule allows it, else LAPACK's SVD.

Robustness, all decided inside the jitted program:
  * inactive (masked) columns get a unit diagonal in the Gram matrix, so
    they stay zero and cost nothing in the factorization;
  * the first pass's Gram matrix is shifted so the Cholesky factorization
    succeeds for any finite input; the passes repeat while the Gram matrix
    of their input is off the identity by more than `NEAR` (at most
    `MAX_PASSES`), and the last one, on a nearly orthonormal input, is
    unshifted (a Gram defect d leaves an orthonormality error of about
    u (1 + d) / (1 - d) after an unshifted pass);
  * the common case (a full-rank block) runs without the loop: a shifted
    pass, an unshifted one and, where that one's input was off by more
    than `NEAR`, a third; one branch hands every other case to the general
    algorithm;
  * a rank-deficient new block (rank >= batch, a zero gradient), which the
    first pass finds as a column with nothing left above the shift, is
    Householder-QR'd after its projection off U (n x k, a quarter of the
    QR of [U | D]) and the passes project the completions off U; where
    that does not converge (a completion inside span(U)), Householder QR
    of [U | D] runs instead. Both are branches (`cond`): they cost nothing
    when not taken.

Precision: float64 inputs are factorized in float64, everything else in
float32.

`implementation("lapack")` (a context manager, read at trace time) switches
every call back to Householder QR and LAPACK's SVD, for comparisons.

The eigenvector route of `core_svd` squares the singular values, so it is
used only where that cannot change the truncation rule: it needs
tau^2 >= GRAM_TAU2 * C * u (u the unit roundoff of the working precision;
tau >= 0.035 for C = 128 in float32, any tau >= 1e-6 in float64). Below
that bound the LAPACK SVD runs. Its error: singular values to u ||S||^2 / sigma_i, and
the truncated core P diag(sigma) Q^T differs from the SVD's by
O(u kappa ||S||) with kappa = sigma_1 / sigma_r (tests check the bound).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lrtrain import lapack

IMPLS = ("matmul", "lapack")
MAX_PASSES = 5
# Gram defect below which a Cholesky pass runs unshifted and counts as the
# last: after a shifted first pass, real K / L blocks leave defects of a few
# 1e-2, and an unshifted pass from there is orthonormal to about 1.7 u.
NEAR = 0.25
GRAM_TAU2 = 64.0
# Smallest Cholesky pivot, in units of u times the largest Gram diagonal
# entry, for which `_first_pass` skips the shift: the pass then leaves a
# Gram defect of about 6-9 u / pivot (measured at n x k = 1024 x 128 to
# 4096 x 256, condition 1e2 - 3e3), at most ~0.14 < NEAR.
UNSHIFTED_PIVOT = 64.0
# Block width from which `_first_pass` factors the shifted Gram matrix
# inside a branch, only when the guarded factor is not used.
SHIFT_BRANCH_K = 64
_impl = ["matmul"]
_rows = [None]        # (mesh, axis) whose axis splits the tall factors' rows


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
  """Trace the factorizations inside this block with `name` ('matmul' or
  'lapack'). Only programs traced inside the block are affected."""
  if name not in IMPLS:
    raise ValueError(f"linalg implementation must be one of {IMPLS}, got {name!r}")
  _impl.append(name)
  try:
    yield
  finally:
    _impl.pop()


def current() -> str:
  """The implementation in force ('matmul' unless `implementation` says)."""
  return _impl[-1]


@contextlib.contextmanager
def row_sharded(mesh, axis: str = "model") -> Iterator[None]:
  """Trace the factorizations inside this block for tall factors whose rows
  are split over `mesh`'s `axis` (lrtrain/sharding.py): Householder QR then
  runs as TSQR (`qr_rows`), which gathers k x k triangles, not the factor.
  A mesh whose axis has size 1 changes nothing."""
  _rows.append((mesh, axis) if mesh is not None and mesh.shape[axis] > 1 else None)
  try:
    yield
  finally:
    _rows.pop()


def qr_rows(X: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Reduced QR of a tall X (n, k) (LAPACK's Householder QR).

  Inside `row_sharded(mesh, axis)`, with p devices on the axis and n / p >=
  k rows per device, as TSQR (Demmel et al., "Communication-optimal
  parallel and sequential QR and LU factorizations", 2012): each device
  factors its row block X_i = Q_i R_i, the p triangles are gathered and
  stacked, [R_1; ...; R_p] = Z R, and device i's rows of Q are Q_i Z_i (Z_i
  its k x k block of Z). Q is orthonormal and X = Q R as with one QR; only
  p k x k triangles move between devices.
  """
  ctx = _rows[-1]
  n, k = X.shape
  if ctx is None:
    return lapack.qr(X)
  mesh, axis = ctx
  p = mesh.shape[axis]
  if n % p or n // p < k:
    return lapack.qr(X)

  def local(Xi):
    Qi, Ri = lapack.qr(Xi)
    Z, R = lapack.qr(lax.all_gather(Ri, axis).reshape(p * k, k))
    Zi = lax.dynamic_slice_in_dim(Z, lax.axis_index(axis) * k, k)
    return Qi @ Zi, R

  spec = jax.sharding.PartitionSpec(axis, None)
  return jax.shard_map(local, mesh=mesh, in_specs=spec,
                       out_specs=(spec, jax.sharding.PartitionSpec()),
                       check_vma=False)(X)


def work_dtype(*xs) -> jnp.dtype:
  """float64 if any input is float64, else float32."""
  if any(getattr(x, "dtype", None) == jnp.float64 for x in xs if x is not None):
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def zero_pad(X: jax.Array, shape) -> jax.Array:
  """X zero-padded at the end of each axis to `shape`.

  Written as an update of a zero array: XLA's CPU backend runs that as one
  loop fusion split over its threads, where a standalone pad runs on one
  (n x C factor buffers: 4096 x 64 -> 4096 x 128 0.16 vs 0.63 ms, 800 x 250
  -> 800 x 500 0.11 vs 0.25 ms).
  """
  X = jnp.asarray(X)
  shape = tuple(shape)
  if X.shape == shape:
    return X
  return jnp.zeros(shape, X.dtype).at[tuple(slice(0, s) for s in X.shape)].set(X)


def column_mask(r, C: int, dtype=jnp.float32) -> jax.Array:
  """(C,) ones on the first r entries (r may be traced)."""
  return (jnp.arange(C) < r).astype(dtype)


def cond(pred, true_fn, false_fn, *operands):
  """lax.cond(pred, true_fn, false_fn, *operands) that stays a branch under
  jax.vmap with a batched `pred`.

  vmap turns lax.cond with a batched predicate into both branches and a
  select; for a fallback taken once in thousands of steps (or a pass run
  only when rounding has drifted) that doubles the vmapped step. Here the
  vmapped form runs one branch for the whole batch when every element
  agrees, and both with a select only when they differ. The branches must
  take everything batched as `operands` (closed-over values must not be
  vmapped: jax rejects them).
  """

  @jax.custom_batching.custom_vmap
  def branch(pred, *ops):
    return lax.cond(pred, true_fn, false_fn, *ops)

  @branch.def_vmap
  def rule(axis_size, in_batched, pred, *ops):
    ops = jax.tree.map(
        lambda x, b: x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x)),
        ops, tuple(in_batched[1:]))
    on_all_true = lambda *o: jax.vmap(true_fn)(*o)
    on_all_false = lambda *o: jax.vmap(false_fn)(*o)
    if not in_batched[0]:
      out = lax.cond(pred, on_all_true, on_all_false, *ops)
    else:
      def mixed(*o):
        return jax.tree.map(
            lambda a, b: jnp.where(
                jnp.reshape(pred, pred.shape + (1,) * (a.ndim - 1)), a, b),
            on_all_true(*o), on_all_false(*o))
      some = lambda *o: lax.cond(jnp.any(pred), mixed, on_all_false, *o)
      out = lax.cond(jnp.all(pred), on_all_true, some, *ops)
    return out, jax.tree.map(lambda _: True, out)

  return branch(pred, *operands)


def walsh(n: int, k: int, dtype) -> jax.Array:
  """(n, k) columns of a Walsh-Hadamard matrix (columns 1..k), unit norm.

  Entry (i, j) is (-1)^popcount(i & (j + 1)) / sqrt(n): spread over all
  rows, mutually orthogonal when n is a power of two, and never aligned
  with coordinate axes (which an identity-like basis may contain). Formed
  when traced (a constant of the compiled step: computed inside it, the
  500 x 250 block of LeNet5's fc1 cost 0.45 ms a step)."""
  i = np.arange(n, dtype=np.int64)[:, None]
  j = np.arange(1, k + 1, dtype=np.int64)[None, :]
  parity = (np.bitwise_count(i & j) & 1).astype(np.float64)
  return jnp.asarray((1.0 - 2.0 * parity) / np.sqrt(n), dtype)


# Narrowest block whose Gram matrix and triangular product go by halves
# (three block products of k / 2 instead of one of k: a quarter fewer
# FLOPs, at the smaller products' rate). Whole steps, alternated step by
# step (2 cores): k = 256, n = 4096: fixed-rank KLS 5%, adaptive KLS 5%,
# GeoLoRA 2%, CondLR 1% faster; n = 1024: 4%, 2%, 5%, 0.5%; k = 128 (fixed-
# rank KLS, n = 4096) 3% slower, LeNet5's k = 250 unchanged.
HALVES_MIN_K = 256


def _gram(X):
  """X^T X; from HALVES_MIN_K columns on by halves, the upper right block
  taken from the lower left (three of the four block products)."""
  k = X.shape[-1]
  if k < HALVES_MIN_K:
    return X.T @ X
  h = k // 2
  X1, X2 = X[:, :h], X[:, h:]
  G11, G21, G22 = X1.T @ X1, X2.T @ X1, X2.T @ X2
  return jnp.block([[G11, G21.T], [G21, G22]])


def _times_upper(X, T):
  """X T for an upper-triangular T (k, k); from HALVES_MIN_K columns on
  by halves (three of the four block products)."""
  k = X.shape[-1]
  if k < HALVES_MIN_K:
    return X @ T
  h = k // 2
  X1, X2 = X[:, :h], X[:, h:]
  return jnp.concatenate([X1 @ T[:h, :h], X1 @ T[:h, h:] + X2 @ T[h:, h:]],
                         axis=-1)


def _masked_gram(X, mask):
  """X^T X on the active block (mask, 0 / 1, marks X's active columns),
  zero elsewhere whatever the inactive columns hold."""
  return jnp.where((mask[:, None] * mask[None, :]) > 0, _gram(X), 0.0)


def _project(U, X):
  """X - U (U^T X); U None means no projection."""
  return X if U is None else X - U @ (U.T @ X)


def _cholesky(G):
  """L and L^-1 of G = L L^T (applying the inverse as a product measured
  faster than a solve against the n-row block)."""
  L = lapack.cholesky(G)
  return L, lower_inverse(L)


# Block size below which `lower_inverse` runs one triangular solve.
TRI_LEAF = 64


def lower_inverse(L: jax.Array) -> jax.Array:
  """L^-1 of a lower-triangular L (k, k), blocked: [[A, 0], [B, D]]^-1 =
  [[A^-1, 0], [-D^-1 B A^-1, D^-1]], halves recursively down to `TRI_LEAF`
  columns, which one triangular solve inverts. XLA's CPU triangular solve
  runs below the matmul rate: k = 250 / 500 took 0.63 / 3.5 ms as one
  solve, 0.37 / 1.3 ms blocked (2 cores)."""
  k = L.shape[-1]
  if k <= TRI_LEAF:
    return lapack.solve_triangular(L, jnp.eye(k, dtype=L.dtype), lower=True)
  h = k // 2
  A = lower_inverse(L[:h, :h])
  D = lower_inverse(L[h:, h:])
  B = -(D @ (L[h:, :h] @ A))
  return jnp.block([[A, jnp.zeros((h, k - h), L.dtype)], [B, D]])


def _shifted_factor(G, shift, mask):
  """L^-1 for L L^T = G + shift I on the active block (a unit diagonal on
  inactive columns), the squared pivots diag(L)^2 of the active columns
  (inf elsewhere), and R = L^T on the active block, zero elsewhere (the
  pass's triangular factor: X = Q R on the active columns)."""
  L, Linv = _cholesky(G + jnp.diag(shift * mask + (1.0 - mask)))
  return (Linv, jnp.where(mask > 0, jnp.square(jnp.diagonal(L)), jnp.inf),
          L.T * (mask[:, None] * mask[None, :]))


def _cholesky_pass(X, mask, eps, always_shift=False, never_shift=False,
                   G=None, with_factor=False, factored=False):
  """One Cholesky QR pass: X = Q R with R^T R = X^T X + s I.

  The shift s = u (n + k) max_i ||x_i||^2 makes the factorization succeed
  for any input; it is applied to the first pass (always_shift) and to any
  input whose Gram matrix is off the identity by more than `NEAR`, and not to
  nearly orthonormal inputs (it would leave a defect of s in Q^T Q).
  never_shift: no shift whatever the input (the pass after a shifted pass
  that found full rank: its input then has condition below about sqrt(11)).

  Returns (Q, off, weak): Q with inactive columns zero, `off` the largest
  entry of |X^T X - I| on the active block (how far X was from
  orthonormal), and `weak`, whether some column had no more than the shift
  left after elimination (numerically rank-deficient, or condition above
  about 1 / sqrt(0.1 s / max ||x_i||^2)). G: X's masked Gram matrix where
  the caller has it. with_factor: also return R (k, k), upper triangular,
  with X = Q R on the active columns (zero outside the active block).
  factored: Q is returned unformed, as the pair (X, F) with Q = X F (F
  upper triangular, (k, k)).
  """
  k = X.shape[-1]
  G = _masked_gram(X, mask) if G is None else G
  off = jnp.max(jnp.abs(G - jnp.diag(mask).astype(G.dtype)))
  scale = jnp.max(jnp.diagonal(G))
  n = X.shape[0]
  shift = eps * (n + k) * scale
  if never_shift:
    shift = jnp.zeros_like(shift)
  elif not always_shift:
    shift = jnp.where(off > NEAR, shift, 0.0)
  Linv, d2, R = _shifted_factor(G, shift, mask)
  F = Linv.T * mask[None, :]                 # the mask on the k x k factor
  Q = (X, F) if factored else _times_upper(X, F)
  if never_shift:
    # Unshifted, on the output of a shifted pass: the pivots bound its
    # smallest Gram eigenvalue, sigma_min^2 / (sigma_min^2 + s) for the
    # original block, resolved here to about sqrt(k) u (the shifted pass's
    # own pivots resolve sigma_min^2 only to about sqrt(k) / (n + k) of s).
    # NaN pivots (a failed factorization) count as weak.
    weak = ~jnp.all(d2 > pivot_floor(X.dtype))
  else:
    weak = jnp.any(d2 <= 1.1 * shift)
  return (Q, off, weak, R) if with_factor else (Q, off, weak)


def pivot_floor(dtype) -> float:
  """Smallest Cholesky pivot of an unshifted pass after a shifted one that
  counts as full rank: sqrt(u) / 4 (1e-4 in float32). Its input then has
  condition below 2 u^(-1/4), so the pass leaves a Gram defect of at most
  about 4 sqrt(u), and one more unshifted pass is orthonormal to rounding.
  Measured against the original block X (n, k): full rank means
  sigma_min / sigma_max above about sqrt(pivot_floor u (n + k)), condition
  up to ~4e3 at n = 4096, k = 256 in float32."""
  return float(jnp.finfo(dtype).eps) ** 0.5 / 4


def _first_pass(X, mask, eps, G=None, with_factor=False):
  """The first Cholesky QR pass of `_two_passes`, shifted only where it
  must be: the Gram matrix is factored twice (k x k work), with a guard
  shift of u max_i ||x_i||^2 and with the full shift of `_cholesky_pass`;
  the guarded factor is used where its pivots are all above
  `UNSHIFTED_PIVOT` u times the scale (condition of X up to about 3e3 in
  float32), and its Q is then off the identity by less than `NEAR`, so one
  more pass finishes. The shifted factor leaves Q with condition up to
  1 / sqrt(u (n + k)) (44 at n + k = 4352 in float32), far from orthonormal,
  and needs two more (the third pass of `_two_passes`).
  G: X's masked Gram matrix where the caller has it.
  Returns Q (inactive columns zero); with_factor also R, X = Q R on the
  active columns (`_shifted_factor`)."""
  n, k = X.shape
  G = _masked_gram(X, mask) if G is None else G
  scale = jnp.max(jnp.diagonal(G))
  Lg_inv, d2, Rg = _shifted_factor(G, eps * scale, mask)
  plain = jnp.all(d2 >= UNSHIFTED_PIVOT * eps * scale)   # False on NaN
  # (Everything a branch reads is an operand: under jax.vmap the mask and
  # scale are batched, and `cond` rejects batched closed-over values.)
  shifted = lambda G, Lg_inv, Rg, scale, mask: _shifted_factor(
      G, eps * (n + k) * scale, mask)[::2]
  if k >= SHIFT_BRANCH_K:
    # The shifted factor only where it is used (a branch costs less than a
    # k x k factorization and triangular inverse from here on).
    Linv, R = cond(plain, lambda G, Lg_inv, Rg, scale, mask: (Lg_inv, Rg),
                   shifted, G, Lg_inv, Rg, scale, mask)
  else:
    Ls_inv, Rs = shifted(G, Lg_inv, Rg, scale, mask)
    Linv, R = jnp.where(plain, Lg_inv, Ls_inv), jnp.where(plain, Rg, Rs)
  Q = _times_upper(X, Linv.T * mask[None, :])
  return (Q, R) if with_factor else Q


def _more_passes(U, Q, mask, eps, max_passes):
  """The passes after the first: project off U and Cholesky-QR until the
  input's Gram matrix is the identity to `NEAR` (the second pass always
  runs: it is the reorthogonalization), at most `max_passes` in all.
  Returns (Q, ok)."""
  Q, off, _ = _cholesky_pass(_project(U, Q), mask, eps)

  def cond(c):
    _, off, t = c
    return (off > NEAR) & (t < max_passes)

  def body(c):
    Q, _, t = c
    Q, off, _ = _cholesky_pass(_project(U, Q), mask, eps)
    return Q, off, t + 1

  Q, off, _ = lax.while_loop(cond, body, (Q, off, jnp.asarray(2)))
  # `off` is the defect of the last pass's input; its output is then
  # orthonormal to about u (1 + off) / (1 - off).
  return Q, jnp.all(jnp.isfinite(Q)) & (off <= NEAR)


def _orthonormalize(U, X, mask, dtype):
  """Orthonormal Q (n, k) with span(Q) = span(X) (active columns), Q ⟂ U.

  A full-rank X (condition up to ~1e4) needs two or three passes, and Q is
  then the Cholesky QR factor of X's projection, equal to Householder's to
  rounding.

  A numerically rank-deficient X (found by the first pass: rank >= batch, a
  zero gradient) is Householder-QR'd instead, after projection: the n x k
  QR spans X's directions off U and completes them with orthonormal
  columns, and the passes then project those off U too. Returns (Q, ok);
  ok is False where the passes did not converge (a completion inside
  span(U)), and the caller then runs Householder QR of [U | X].
  """
  eps = jnp.finfo(dtype).eps
  X = _project(U, X * mask[None, :])
  Q1, _, weak = _cholesky_pass(X, mask, eps, always_shift=True)

  def deficient(U, Q1, X, mask):
    k = jnp.sum(mask).astype(jnp.int32)
    return _more_passes(U, _householder(X, k), mask, eps, MAX_PASSES)

  return cond(weak, deficient,
              lambda U, Q1, X, mask: _more_passes(U, Q1, mask, eps, MAX_PASSES),
              U, Q1, X, mask)


def _householder(X, r):
  """Sign-fixed Householder QR basis of the first r columns of X."""
  Q, R = qr_rows(X)
  d = jnp.sign(jnp.diagonal(R))
  d = jnp.where(d == 0, 1.0, d)
  return Q * d[None, :] * column_mask(r, X.shape[-1], X.dtype)


def _two_passes(U, X, mask, eps, G=None, with_factor=False, factored=False):
  """The common case of `_orthonormalize` without its loop: a Cholesky QR
  pass shifted where the block's condition needs it (`_first_pass`) and an
  unshifted one, each after projecting off U, and a third unshifted pass
  where the second's input was off the identity by more than `NEAR` (after
  a shifted first pass).

  Returns (Q, ok). ok: the second pass found every pivot above
  `pivot_floor` (full rank) and the last pass's input was orthonormal to
  `NEAR`, so Q is orthonormal to working precision and spans X's
  projection off U; otherwise the caller runs the general algorithm. The general one
  (`_orthonormalize`: a loop, and a Householder branch for rank-deficient
  blocks) costs its branches and loop even when they do little; here the
  common case costs its products. G: X's masked Gram matrix where the
  caller has it (U None only). with_factor: also R = Q^T X' (k, k) for X'
  the projection of X off U (upper triangular, zero outside the active
  block), the product of the passes' factors: the first pass leaves
  X' = Q1 R1, the second Q1 - U U^T Q1 = Q2 R2, the third Q2 = Q R3, and
  Q ⟂ U, so Q^T X' = R3 R2 R1 to rounding (without a product with X').
  factored: Q is returned as the pair (B, F) of the last pass's input and
  inverse factor, Q = B F, the n x k product left to the caller
  (`Extension`).
  """
  # X's inactive columns need no zeroing: the passes read them only
  # through the masked Gram matrix and factor (mask a column prefix).
  X = _project(U, X)
  Q1, R1 = _first_pass(X, mask, eps, G, with_factor=True)
  # The second pass runs unshifted and decides the rank from its pivots
  # (`pivot_floor`): a block whose smallest singular value sank below the
  # shift leaves Q1 with a nearly singular Gram matrix. A third runs where
  # the second's input was far from orthonormal (an ill-conditioned block:
  # rank near the batch size leaves defects of 0.5 - 0.7 after the shifted
  # pass).
  Q, off, weak, R2 = _cholesky_pass(_project(U, Q1), mask, eps,
                                    never_shift=True, with_factor=True,
                                    factored=factored)
  R = R2 @ R1 if with_factor else None

  def third(Q, off, R, mask):
    Q = _times_upper(*Q) if factored else Q
    Q, off, _, R3 = _cholesky_pass(Q, mask, eps, never_shift=True,
                                   with_factor=True, factored=factored)
    return Q, off, None if R is None else R3 @ R

  Q, off, R = cond(off > NEAR, third, lambda Q, off, R, mask: (Q, off, R),
                   Q, off, R, mask)
  finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x))
                                for x in jax.tree.leaves(Q)]))
  ok = ~weak & (off <= NEAR) & finite
  return (Q, ok, R) if with_factor else (Q, ok)


def _orth_robust(X, r):
  """`orth` through `_orthonormalize`, Householder where that fails."""
  dtype = X.dtype
  mask = column_mask(r, X.shape[-1], dtype)
  Q, ok = _orthonormalize(None, X * mask[None, :], mask, dtype)
  return cond(ok, lambda Q, X, r: Q, lambda Q, X, r: _householder(X, r),
              Q, X * mask[None, :], r)


def orth(X: jax.Array, r, *, near: bool = False) -> jax.Array:
  """Orthonormal basis of the first r columns of X (n, C), columns >= r zero.

  For a full-rank X this is the Q of X = Q R with diag(R) > 0 (the same Q
  as a sign-fixed Householder QR, to rounding). Returned in the working
  dtype (float64 for float64 X, else float32).

  near=True: X is expected to be nearly orthonormal (a retraction's
  U + dU). Where it is (||X^T X - I||_F <= `NEAR`: Gram eigenvalues in
  [0.75, 1.25]) one unshifted Cholesky QR pass, orthonormal to about
  u (1 + d) / (1 - d), is enough; a branch runs the passes of
  `_two_passes` for any other X (from the same Gram matrix). Without it
  the passes run unconditionally: a branch around them keeps XLA from
  running them beside the rest of the step (fixed-rank KLS, n = 4096,
  r = 256: 2-5% slower measured).
  """
  dtype = work_dtype(X)
  X = X.astype(dtype)
  C = X.shape[-1]
  if current() == "lapack":
    return _householder(X, r)
  mask = column_mask(r, C, dtype)
  eps = jnp.finfo(dtype).eps
  if near:
    G = _masked_gram(X, mask)

    def one(X, G, mask):
      Q, _, weak = _cholesky_pass(X, mask, eps, never_shift=True, G=G)
      return Q, ~weak & jnp.all(jnp.isfinite(Q))

    Q, ok = cond(jnp.sqrt(jnp.sum(jnp.square(G - jnp.diag(mask)))) <= NEAR,
                 one, lambda X, G, mask: _two_passes(None, X, mask, eps, G),
                 X, G, mask)
  else:
    Q, ok = _two_passes(None, X, mask, eps)
  return cond(~ok, lambda Q, X, r: _orth_robust(X, r), lambda Q, X, r: Q,
              Q, X, r)


class Extension(NamedTuple):
  """An extended basis U^ (n, C) left as a product (`extend`'s factored
  form): U^ P = [head | block] [P[:h]; factor P[at : at + b]] for head (n, h),
  block (n, b), factor (b, b) and the row offset `at`. In the common case
  head is U's first C / 2 columns (zero from r on), block the input of the
  last Cholesky pass and factor that pass's inverse factor, so the n x b
  product that forms the new block is never taken: the caller's product
  U^ P (a truncation's U^ P, K columns) applies it to P's rows at b x b x
  K cost."""
  head: jax.Array
  block: jax.Array
  factor: jax.Array
  at: jax.Array

  @classmethod
  def of(cls, Uh: jax.Array) -> "Extension":
    """A formed basis Uh as an Extension (no block)."""
    n = Uh.shape[0]
    return cls(Uh, jnp.zeros((n, 0), Uh.dtype), jnp.zeros((0, 0), Uh.dtype),
               jnp.zeros((), jnp.int32))


def times(X, P: jax.Array) -> jax.Array:
  """X P for a basis X (n, C) given as an array or an `Extension`."""
  if not isinstance(X, Extension):
    return X @ P
  h, b = X.head.shape[-1], X.block.shape[-1]
  if not b:
    return X.head @ P[:h]
  # One product over [head | block] rather than two and a sum (paired
  # GeoLoRA steps: LeNet5 0.965 and 0.974, n = 1024, r = 64 0.982,
  # 4096/256 0.993, 4096/64 1.013 and 1.014).
  rows = lax.dynamic_slice_in_dim(P, X.at, b, axis=0)
  return (jnp.concatenate([X.head, X.block], axis=1)
          @ jnp.concatenate([P[:h], X.factor @ rows], axis=0))


def formed(X, C: int) -> jax.Array:
  """The (n, C) basis an `Extension` stands for (an array as it is)."""
  if not isinstance(X, Extension):
    return X
  n, b = X.head.shape[0], X.block.shape[-1]
  out = zero_pad(X.head, (n, C))
  if b:
    out = lax.dynamic_update_slice(out, _times_upper(X.block, X.factor),
                                   (jnp.zeros((), jnp.int32), X.at))
  return out


def extend(U: jax.Array, D: jax.Array, r, *, with_block: bool = False,
           with_factor: bool = False, factored: bool = False):
  """Orthonormal basis [U[:, :r] | Q] of span[U[:, :r] | D[:, :r]] in C
  columns, with the first r columns equal to U's exactly.

  Q has min(r, C - r) columns (the first ones of D when 2r > C), at columns
  r .. r + min(r, C - r) - 1; columns after are zero. U must be orthonormal
  on its first r columns and zero after.

  Exactness of U's block makes U^^T U = [I; 0] known without a product
  (callers use it), and the new block Q is orthogonal to U to working
  precision.

  with_block=True also returns the new block alone, (n, C // 2) with its
  columns first (products with it cost half of those with U^), so that
  U^[:, r + j] = block[:, j]. with_factor=True (with with_block) also
  returns T = block^T D (C // 2, C), the new directions' coordinates of
  D's columns: in the common case (r <= C / 2) the product of the
  Cholesky passes' triangular factors (`_two_passes`) in its first r
  columns, which is block^T D there to rounding since block ⟂ U, without
  an n-row product (columns from r on are then zero: D's inactive
  columns); formed as that product where the block does not come from
  D's projection.

  factored=True returns U^ as an `Extension` (with T where with_factor),
  for a caller that only multiplies U^ by a (C, K) matrix (`times`): the
  new block's last n x (C / 2) x (C / 2) product is then folded into that
  product's small factor (and U^ is never written out whole).

  The common case (r <= C / 2, which `resize` keeps, and a full-rank new
  block) runs without the general algorithm's loop on the first C / 2
  columns (`_two_passes`); anything else is decided by one branch that
  runs the general algorithm (`_extend_robust`). Where 2r = n, Q completes
  U to a basis of R^n whatever D is, and is formed from fixed columns
  (`walsh`) instead of D, whose projection may be ill-conditioned.
  """
  dtype = work_dtype(U, D)
  n, C = U.shape
  U = U.astype(dtype)
  D = D.astype(dtype)
  H = max(C // 2, 1)
  if factored and with_block:
    raise ValueError("extend: factored returns no block")
  if with_factor and not (with_block or factored):
    raise ValueError("extend: with_factor needs with_block or factored")
  if factored and (current() == "lapack" or C != 2 * H or n <= C):
    # Small or odd bases, LAPACK's path: formed, as an Extension.
    Uh, _, *T = extend(U, D, r, with_block=True, with_factor=with_factor)
    return (Extension.of(Uh), *T) if with_factor else Extension.of(Uh)
  if current() == "lapack" or C != 2 * H:
    Uh = (_householder_extend(U, D, r) if current() == "lapack"
          else _extend_robust(U, D, r))
    if not with_block:
      return Uh
    block = jnp.roll(Uh, -r, axis=1)[:, :H]
    return (Uh, block, block.T @ D) if with_factor else (Uh, block)
  Dh = D[:, :H]
  if n <= C:
    # Where 2r >= n the new block completes U to a basis of the whole
    # space: its span is span(U)'s complement whatever D is, and D's
    # projection there is often ill-conditioned (a gradient block of rank
    # near the batch size), which sends the passes to the general
    # algorithm. Fixed, well-spread columns (`walsh`) span the same
    # complement.
    Dh = jnp.where(2 * r >= n, walsh(n, H, dtype), Dh)
  Q, ok, *T = _two_passes(U[:, :H], Dh, column_mask(r, H, dtype),
                          jnp.finfo(dtype).eps, with_factor=with_factor,
                          factored=factored)
  T = T[0] if with_factor else None      # (None: no factor work at all)

  def general(Q, T, U, D, r):
    Uh = _extend_robust(U, D, r)
    block = jnp.roll(Uh, -r, axis=1)[:, :H]
    block = block * column_mask(jnp.minimum(r, C - r), H, dtype)[None, :]
    return Uh, block, None if T is None else block.T @ D

  if factored:
    def place_factored(Q, T, U, D, r):
      return Q + (jnp.asarray(r, jnp.int32),
                  None if T is None else zero_pad(T, (H, C)))

    def general_factored(Q, T, U, D, r):
      # U^ = [U's r columns | the new block | 0]: where r <= H the head
      # U[:, :H] holds U's columns and the block starts at r; where r > H
      # the head is U^'s first H columns and the rest starts at H.
      Uh, _, T = general(None, T, U, D, r)
      at = jnp.minimum(jnp.asarray(r, jnp.int32), H)
      return (lax.dynamic_slice_in_dim(Uh, at, H, axis=1),
              jnp.eye(H, dtype=dtype), at, T)

    B, F, at, T = cond(~ok | (r > H), general_factored, place_factored, Q,
                       T, U, D, r)
    E = Extension(U[:, :H], B, F, at)
    return (E, T) if with_factor else E

  def place(Q, T, U, D, r):
    # U's columns from r on are zero (the contract), so writing Q there is
    # U + [0 | Q | 0]: one pass over the block.
    r = jnp.asarray(r, jnp.int32)
    return (lax.dynamic_update_slice(U, Q, (jnp.zeros((), jnp.int32), r)), Q,
            None if T is None else zero_pad(T, (H, C)))

  Uh, Q, T = cond(~ok | (r > H), general, place, Q, T, U, D, r)
  if with_factor and n <= C:
    # The block may span fixed columns rather than D's projection.
    T = Q.T @ D
  if not with_block:
    return Uh
  return (Uh, Q, T) if with_factor else (Uh, Q)


def _extend_robust(U, D, r):
  """`extend` for any rank, in the working dtype; Householder QR of
  [U | D] where the passes do not converge."""
  dtype = U.dtype
  U = U * column_mask(r, U.shape[1], dtype)[None, :]
  n, C = U.shape
  H = max(C // 2, 1)
  k = jnp.minimum(r, C - r)              # new columns: always <= C // 2
  mask = column_mask(k, H, dtype)
  Dh = D[:, :H] * mask[None, :]
  if H >= 1 and C - H == H:
    # U's active columns fit in its first half when r <= C / 2: the
    # projections then cost half.
    Q, ok = cond(r <= H,
                 lambda U, Dh, mask: _orthonormalize(U[:, :H], Dh, mask, dtype),
                 lambda U, Dh, mask: _orthonormalize(U, Dh, mask, dtype),
                 U, Dh, mask)
  else:
    Q, ok = _orthonormalize(U, Dh, mask, dtype)
  Q = zero_pad(Q, (Q.shape[0], C))
  # Move the new block behind U's r columns.
  Uh = U + jnp.roll(Q, r, axis=1)
  return cond(ok, lambda Uh, U, D, r: Uh,
              lambda Uh, U, D, r: _householder_extend(U, D, r), Uh, U, D, r)


def _householder_extend(U, D, r):
  """Sign-fixed Householder QR of [U | D] (active columns gathered first),
  with U's block replaced by U itself: for an orthonormal U the QR's first
  block is U to rounding, so the new columns are orthogonal to it."""
  n, C = U.shape
  j = jnp.arange(C)
  src = jnp.where(j < r, j, C + j - r)
  X = jnp.take(jnp.concatenate([U, D], axis=1), src, axis=1) * column_mask(
      2 * r, C, U.dtype)
  Uh = _householder(X, jnp.minimum(2 * r, C))
  return jnp.where((j < r)[None, :], U, Uh)


def svd(S: jax.Array, full_matrices: bool = True):
  """(P, sigma, Q^T) of S by LAPACK's divide-and-conquer SVD, and by its QR
  iteration where that returns non-finite values for a finite S: float32
  gesdd fails on some nearly singular cores (a GeoLoRA 512 x 512 core with
  sigma_min / sigma_max ~ 1e-15 at step 121 of the width benchmark, n =
  1024, r = 256: "SLASCL parameter number 4 had an illegal value", NaN
  out; gesvd and gesdd of S^T were fine). Every SVD inside a step goes
  through here."""
  P, s, Qt = lapack.svd(S, full_matrices=full_matrices)
  failed = ~jnp.all(jnp.isfinite(s)) & jnp.all(jnp.isfinite(S))
  return cond(failed,
              lambda P, s, Qt, S: lapack.svd_qr(S, full_matrices=full_matrices),
              lambda P, s, Qt, S: (P, s, Qt), P, s, Qt, S)


def gram_route(C: int, tau, dtype) -> bool:
  """Whether `core_svd` may use the eigenvectors of S^T S for a (C, C) core
  truncated at `tau` (a Python float) in `dtype` (module docstring)."""
  if current() == "lapack":
    return False
  if tau is None:
    return True
  eps = float(jnp.finfo(dtype).eps)
  return float(tau) ** 2 >= GRAM_TAU2 * C * eps


# Smallest core for which route "auto" takes the eigenvectors of S^T S.
# Jitted alone (2 cores, float32, at most C / 2 kept) the eigenvector
# route wins from C = 256 on (C = 128 / 256 / 512: 1.37 / 4.4 / 19.5 ms
# against 1.3 / 6.2 / 29.9); inside the steps, where the layers' SVDs run
# one after another on one thread, it wins from C = 64 on (paired whole
# steps, eigenvectors against SVD at C = 128: GeoLoRA n = 1024 0.917-0.923,
# n = 4096 0.968, adaptive KLS n = 1024 0.916-0.921; C = 64: GeoLoRA
# 0.996, adaptive KLS 0.947) and loses below (LeNet5's C = 20 and 50
# conv cores: 1.022).
EIGH_MIN_C = 64


def core_svd(S: jax.Array, tau=None, route: str = "auto", rank=None,
             width: int | None = None):
  """P, sigma, Q (descending sigma) of a square core S = P diag(sigma) Q^T.

  Args:
    S: (C, C) core.
    tau: the truncation tolerance the values will be used with (a Python
      float), or None when no tolerance rule reads them (fixed rank).
      Decides whether the eigenvector route may run (`gram_route`).
    route: "svd" (LAPACK's divide-and-conquer SVD), "eigh" (eigenvectors
      of S^T S where `gram_route` allows, else the SVD) or "auto" (eigh
      for C >= `EIGH_MIN_C`, where it is the faster). LAPACK's SVD
      bidiagonalizes S (half its flops matrix-vector products) and then
      runs divide and conquer on both sides; the symmetric eigensolver of
      S^T S does one tridiagonalization and one side, and the left vectors
      of the kept columns come from products (500 x 500, 2 cores: SVD 26
      ms, eigh of the Gram matrix 13 ms).
    rank: optional function sigma -> r, the number of leading columns the
      caller keeps (at most `width`); P's columns from r on are then
      unspecified.
    width: the number of leading columns of P and Q returned (a Python
      int, default C): the eigh route forms only these left vectors.

  Returns:
    (P, sigma, Q) in the working dtype: P, Q (C, width), sigma (C,).
  """
  dtype = work_dtype(S)
  S = S.astype(dtype)
  C = S.shape[-1]
  width = C if width is None else int(width)
  use_eigh = {"svd": False, "eigh": True, "auto": C >= EIGH_MIN_C}[route]
  if not use_eigh or not gram_route(C, tau, dtype):
    P, sigma, Qt = svd(S)
    return P[:, :width], sigma, Qt[:width].T
  lam, W = lapack.eigh(S.T @ S)
  # Eigenvectors have arbitrary signs, which rounding differences (a fused
  # vs an unfused Gram product) flip: fix the largest entry positive.
  top = jnp.take_along_axis(W, jnp.argmax(jnp.abs(W), axis=0)[None, :], axis=0)
  W = W * jnp.where(top < 0, -1.0, 1.0).astype(W.dtype)
  # The values as the norms of S w_i, not the square roots of the
  # eigenvalues: those resolve sigma_i only to u ||S||^2 / sigma_i (a zero
  # value comes out near sqrt(C u) ||S||), the norms to about u ||S||, and
  # P_i sigma_i = S w_i then holds for every kept column.
  # Only the first `width` columns are formed; the values after them enter
  # the truncation rule only through their sum of squares, which the
  # eigenvalues give to u ||S||^2.
  W = W[:, ::-1]
  lam = lam[::-1]
  Y = S @ W[:, :width]
  head = jnp.sqrt(jnp.sum(jnp.square(Y), axis=0))
  order = jnp.argsort(-head)
  head, Wk, Y = head[order], W[:, :width][:, order], Y[:, order]
  sigma = jnp.concatenate([head, jnp.sqrt(jnp.maximum(lam[width:], 0.0))])
  r = width if rank is None else rank(sigma)
  return left_vectors(Y, head, r), sigma, Wk


def left_vectors(Y, sigma, r):
  """Orthonormal P (C, k) with P diag(sigma) = Y to rounding on its first
  r columns, zero after: Y = S Q for Q (C, k) with orthonormal right
  singular vectors, sigma the norms of Y's columns.

  Y has orthogonal columns; scaled to unit norm they are orthonormal up to
  about u sigma_1^2 / (sigma_i sigma_j). Where that defect is below `NEAR`
  one unshifted Cholesky QR pass finishes them (orthonormal to about
  u (1 + d) / (1 - d)); otherwise `orth` does (shifted passes, Householder
  for directions with sigma ~ 0, which get an orthonormal completion)."""
  tiny = jnp.finfo(Y.dtype).tiny
  Z = Y * jnp.where(sigma > tiny, 1.0 / jnp.maximum(sigma, tiny), 0.0)[None, :]
  mask = column_mask(r, Z.shape[-1], Z.dtype)
  P, off, _ = _cholesky_pass(Z, mask, jnp.finfo(Z.dtype).eps, never_shift=True)
  ok = (off <= NEAR) & jnp.all(jnp.isfinite(P))
  return cond(ok, lambda P, Z, r: P, lambda P, Z, r: orth(Z, r), P, Z, r)


POLISH_TOL = 64.0


def polish_tolerance(C: int, dtype) -> float:
  """The defect (row norm of X^T X - I) above which `polish_basis` runs a
  pass: POLISH_TOL u, times sqrt(C / 16) beyond 16 columns. A freshly
  orthonormalized basis of C columns already has a row defect of a few
  sqrt(C) u; a fixed threshold re-polished such bases every step (at
  C = 512, a pass per basis and step, and a triangular core after it).
  The kept block's defect then adds up from step to step like a random
  walk: GeoLoRA's truncated bases measured a median of about 5 sqrt(C) u
  (n = 1024 and 4096, K = 64), so 8 sqrt(C) u (POLISH_TOL 32) ran a pass
  in 11-17% of the layer-steps (LeNet5 too) and 16 sqrt(C) u in 2.5-4%
  (a pass costs about 1.4 ms a layer at n = 1024, K = 64)."""
  return POLISH_TOL * float(jnp.finfo(dtype).eps) * max(1.0, math.sqrt(C / 16))


def defect_estimate(X: jax.Array, r) -> jax.Array:
  """About max_i ||(X^T X - I)[i, :]|| on the first r columns, from two
  products with fixed probe vectors (2 n C flops each, no Gram matrix)."""
  dtype = X.dtype
  C = X.shape[-1]
  z = walsh(C, 2, dtype) * column_mask(r, C, dtype)[:, None]
  E = X.T @ (X @ z) - z
  return jnp.sqrt(jnp.asarray(C, dtype)) * jnp.max(jnp.abs(E))


def _polish_factor(X, mask):
  """The unshifted Cholesky QR factors of X's active columns: L with
  L L^T = X^T X (identity on inactive columns) and R^-1 = L^-T with its
  inactive columns zero, so that X R^-1 is the orthonormalized X."""
  L, Linv = _cholesky(_masked_gram(X, mask) + jnp.diag(1.0 - mask))
  return L, Linv.T * mask[None, :]


def polish_basis(X: jax.Array, r, *, with_flag: bool = False):
  """(X', R) with X = X' R, X' orthonormal on its first r columns: a
  Cholesky QR pass when rounding has drifted X (`defect_estimate` above
  `polish_tolerance`), else (X, I). The check costs two matrix-vector
  products; the pass runs (lax.cond) only when needed, which in float32 is
  every few steps to every few tens of steps (about one in six at C = 64
  in a settled run). with_flag: also return whether it ran."""
  dtype = work_dtype(X)
  X = X.astype(dtype)
  C = X.shape[-1]
  mask = column_mask(r, C, dtype)
  eye = jnp.eye(C, dtype=dtype)

  def do(X, mask):
    L, R_inv = _polish_factor(X, mask)
    X2 = _times_upper(X, R_inv)
    ok = jnp.all(jnp.isfinite(X2))
    return jnp.where(ok, X2, X), jnp.where(ok, L.T, eye)

  need = defect_estimate(X, r) > polish_tolerance(C, dtype)
  X, R = cond(need, do, lambda X, mask: (X, eye), X, mask)
  return (X, R, need) if with_flag else (X, R)


def polish(U: jax.Array, S: jax.Array, V: jax.Array, r):
  """Re-orthonormalize U and V where rounding has drifted them, keeping
  W = U S V^T: U' = U R_U^-1, V' = V R_V^-1, S' = R_U S R_V^T.

  Steps that keep an orthonormal U as the first block of the next basis
  accumulate its rounding errors; this bounds them at about
  `polish_tolerance` (`polish_basis`). S' is triangular rather than diagonal
  for the one step after a pass; optimizer moments are not mapped by R
  (the identity to that tolerance).

  Returns:
    (U', S', V') in the working dtype.
  """
  U, Ru, moved_u = polish_basis(U, r, with_flag=True)
  V, Rv, moved_v = polish_basis(V, r, with_flag=True)
  S = S.astype(U.dtype)
  # The two C x C products only in the steps that ran a pass.
  S = cond(moved_u | moved_v, lambda S, Ru, Rv: Ru @ S @ Rv.T,
           lambda S, Ru, Rv: S, S, Ru, Rv)
  return U, S, V


def polish_diagonal(U: jax.Array, sigma: jax.Array, V: jax.Array, r,
                    P: jax.Array, Q: jax.Array):
  """`polish` of truncated factors U diag(sigma) V^T that keeps the core
  diagonal: where rounding has drifted U or V, U = U' R_U and V = V' R_V
  (Cholesky QR), the small core R_U diag(sigma) R_V^T = A diag(sigma') B^T
  is re-diagonalized (an SVD of that K x K core, zero outside its active
  r x r block; the signs fixed so that A and B are near the identity) and
  the factors are U' A, sigma', V' B.
  W = U diag(sigma) V^T is kept to rounding.

  A triangular core (what `polish` leaves) sends the next step of the
  rank-adaptive methods down their general-core paths: the products
  K = U S and L = V S^T at n x C x C instead of column scalings, an SVD
  for the inverse of S. A diagonal one keeps them on the scalings.

  P, Q: the factors' coordinates in a larger basis (U = U^ P, V = V^ Q);
  they come back with the same change applied (U' A = U^ P R_U^-1 A),
  which is what a caller's moment maps need. Where no pass runs every
  output is its input. Where the active values are not all positive
  (sigma_r ~ 0: the SVD's vectors for zero values are arbitrary) the
  triangular polish of `polish` runs instead, its core returned in sigma's
  place as a (K, K) matrix: callers get a core, diagonal or not.

  Args:
    U, V: (n, K), (m, K) factors, columns >= r zero.
    sigma: (K,) values, zero from r on.
    r: active columns.
    P, Q: (C, K) coordinates.

  Returns:
    (U', S', V', P', Q') in the working dtype; S' (K, K).
  """
  dtype = work_dtype(U, V)
  U, V = U.astype(dtype), V.astype(dtype)
  sigma = sigma.astype(dtype)
  K = U.shape[-1]
  mask = column_mask(r, K, dtype)
  tol = polish_tolerance(K, dtype)
  need = (defect_estimate(U, r) > tol) | (defect_estimate(V, r) > tol)

  def run(U, sigma, V, P, Q, mask, r):
    Lu, Ru_inv = _polish_factor(U, mask)    # R_U = L_u^T
    Lv, Rv_inv = _polish_factor(V, mask)
    core = (Lu.T * sigma[None, :]) @ Lv   # R_U diag(sigma) R_V^T
    A, s, Bt = svd(core)
    B = Bt.T
    d = jnp.sign(jnp.diagonal(A))
    d = jnp.where(d == 0, 1.0, d) * mask
    A, B, s = A * d[None, :], B * d[None, :], s * mask
    Tu, Tv = Ru_inv @ A, Rv_inv @ B
    U2, V2 = U @ Tu, V @ Tv
    top = jnp.max(sigma)
    ok = (jnp.all(jnp.where(mask > 0, sigma > K * jnp.finfo(dtype).eps * top,
                            True))
          & jnp.all(jnp.isfinite(U2)) & jnp.all(jnp.isfinite(V2)))

    def triangular(U, sigma, V, P, Q, r, U2, s, V2, Tu, Tv):
      U3, S3, V3 = polish(U, jnp.diag(sigma), V, r)
      return U3, S3, V3, P, Q

    def diagonal(U, sigma, V, P, Q, r, U2, s, V2, Tu, Tv):
      return U2, jnp.diag(s), V2, P @ Tu, Q @ Tv

    return cond(ok, diagonal, triangular, U, sigma, V, P, Q, r, U2, s, V2,
                Tu, Tv)

  def keep(U, sigma, V, P, Q, mask, r):
    return U, jnp.diag(sigma), V, P, Q

  # (r is an operand: under jax.vmap it may be batched.)
  return cond(need, run, keep, U, sigma, V, P.astype(dtype), Q.astype(dtype),
              mask, jnp.asarray(r, jnp.int32))
