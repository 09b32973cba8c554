"""LowRank: W = U S V^T (+ optional frozen base W0) in fixed-capacity buffers.

Orientation: W is (n, m) = (out, in); an input x (..., m) maps to x W^T (..., n).
Axis legend: n = out features, m = in features, C = capacity (buffer columns),
r = active rank (an int32 array leaf, r <= C).

Invariant kept by every function here and by the integrators: columns j >= r
of U and V are zero and S is zero outside its leading r x r block, so the
inactive part of the buffers contributes nothing to W and rank changes inside
one capacity never change array shapes (no retrace).

Conv kernels (kh, kw, c_in, c_out) are handled as the matrix
(c_out, kh * kw * c_in); see `conv_kernel_to_matrix`.

References:
  Schotthoefer et al., "Low-rank lottery tickets", NeurIPS 2022 (DLRT).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from lrtrain import draws, lapack


class FactorShape:
  """shape (n, m), capacity C and dtype of a node holding U (n, C), V (m, C)."""

  @property
  def shape(self) -> tuple[int, int]:
    return (self.U.shape[-2], self.V.shape[-2])

  @property
  def capacity(self) -> int:
    return self.U.shape[-1]

  @property
  def dtype(self):
    return self.U.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank(FactorShape):
  """Factored weight W = U S V^T + W0.

  Attributes:
    U: (n, C) orthonormal active columns, zero inactive columns.
    S: (C, C) core, zero outside the leading (r, r) block.
    V: (m, C) orthonormal active columns, zero inactive columns.
    rank: () int32, the active rank r.
    W0: optional (n, m) frozen base weight (fine-tuning an adapter); None for
      training from scratch.
  """
  U: jax.Array
  S: jax.Array
  V: jax.Array
  rank: jax.Array
  W0: jax.Array | None = None


def _check_rank(n: int, m: int, rank: int, capacity: int | None,
                what: str = "LowRank") -> int:
  if n < 1 or m < 1:
    raise ValueError(f"{what}: impossible shape ({n}, {m})")
  if not 1 <= rank <= min(n, m):
    raise ValueError(
        f"{what}: rank {rank} must be in [1, min(n, m)] = [1, {min(n, m)}] "
        f"for a ({n}, {m}) weight")
  capacity = rank if capacity is None else capacity
  if not rank <= capacity <= min(n, m):
    raise ValueError(
        f"{what}: capacity {capacity} must be in [rank, min(n, m)] = "
        f"[{rank}, {min(n, m)}]")
  return capacity


def column_mask(rank: jax.Array, capacity: int, dtype=jnp.float32) -> jax.Array:
  """(C,) mask with ones on the first `rank` entries."""
  return (jnp.arange(capacity) < rank).astype(dtype)


def random_orthonormal(key: jax.Array, n: int, r: int, dtype=jnp.float32):
  """(n, r) matrix with orthonormal columns (QR of a Gaussian, sign-fixed)."""
  q, rr = lapack.qr(draws.normal(key, (n, r)))
  q = q * jnp.sign(jnp.diagonal(rr))[None, :]
  return q.astype(dtype)


SPECTRA = ("halfnormal", "flat")


def init(key: jax.Array, n: int, m: int, rank: int, *,
         capacity: int | None = None, scale: float = 1.0,
         spectrum: str = "halfnormal", dtype=jnp.float32) -> LowRank:
  """Random orthonormal U, V and S = scale * diag(s).

  s is sorted |N(0, 1)| draws (spectrum 'halfnormal') or all ones
  ('flat', an orthogonal init of rank r). Both have E s_i^2 = 1.

  Args:
    key: PRNG key.
    n: out features.
    m: in features.
    rank: initial active rank.
    capacity: buffer columns (>= rank); defaults to rank.
    scale: multiplies the singular values.
    spectrum: 'halfnormal' or 'flat'.
    dtype: factor dtype.

  Raises:
    ValueError: impossible shape, rank or capacity, or unknown spectrum.
  """
  if spectrum not in SPECTRA:
    raise ValueError(f"LowRank.init: spectrum must be one of {SPECTRA}, got "
                     f"{spectrum!r}")
  capacity = _check_rank(n, m, rank, capacity)
  ku, kv, ks = jax.random.split(key, 3)
  mask = column_mask(rank, capacity)
  U = random_orthonormal(ku, n, capacity) * mask
  V = random_orthonormal(kv, m, capacity) * mask
  if spectrum == "flat":
    s = jnp.full((capacity,), scale, jnp.float32)
  else:
    s = jnp.sort(jnp.abs(jax.random.normal(ks, (capacity,))))[::-1] * scale
  S = jnp.diag(s * mask)
  return LowRank(U.astype(dtype), S.astype(dtype), V.astype(dtype),
                 jnp.asarray(rank, jnp.int32))


def from_dense(W: jax.Array, rank: int, *, capacity: int | None = None,
               frozen_base: bool = False) -> LowRank:
  """Truncated SVD of a dense (n, m) matrix.

  Args:
    W: (n, m) matrix in (out, in) orientation.
    rank: kept rank.
    capacity: buffer columns (>= rank); defaults to rank.
    frozen_base: if True, W becomes the frozen base W0 and the factors start
      as a zero adapter (S = 0) on the top-`rank` singular subspaces of W;
      this is the GeoLoRA fine-tuning start.

  Raises:
    ValueError: W is not 2-D, or impossible rank/capacity.
  """
  if W.ndim != 2:
    raise ValueError(f"LowRank.from_dense: expected a 2-D (n, m) matrix, got "
                     f"shape {W.shape}")
  n, m = W.shape
  capacity = _check_rank(n, m, rank, capacity)
  u, s, vt = lapack.svd(W.astype(jnp.float32), full_matrices=False)
  k = min(capacity, s.shape[0])
  mask = column_mask(rank, capacity)
  U = jnp.zeros((n, capacity)).at[:, :k].set(u[:, :k]) * mask
  V = jnp.zeros((m, capacity)).at[:, :k].set(vt[:k].T) * mask
  s = jnp.zeros((capacity,)).at[:k].set(s[:k]) * mask
  if frozen_base:
    return LowRank(U.astype(W.dtype), jnp.zeros((capacity, capacity), W.dtype),
                   V.astype(W.dtype), jnp.asarray(rank, jnp.int32), W)
  return LowRank(U.astype(W.dtype), jnp.diag(s).astype(W.dtype),
                 V.astype(W.dtype), jnp.asarray(rank, jnp.int32))


def materialize(f: LowRank) -> jax.Array:
  """The dense (n, m) matrix U S V^T (+ W0)."""
  W = f.U @ f.S @ f.V.T
  return W if f.W0 is None else W + f.W0


# Weight gradients in the orientation XLA's CPU backend multiplies fast.
#
# The gradient of x @ W for a factor W (d, k), k << d, contracts the batch:
# x^T g (d, k). XLA's CPU backend runs a product whose left operand is
# contracted over its rows outside its fast dot library (YNNPACK), and
# algebraic simplification folds any transposition of an operand back into
# the product's dimension numbers. An optimization barrier stops the fold,
# so the gradient is formed as g^T (k, B), a transposition of the short
# operand, times x (B, d): a row-major (k, d) product, transposed after.
# Batch 256, 2 cores, float32, jitted alone: d = 4096, k = 64 2.38 ms as
# x^T g, 0.84 ms this way; k = 256 4.41 -> 3.97 ms. In whole training
# steps the gain holds for factors of at most `REORIENT_MAX_K` columns
# (below); at k = 256 the CondLR step was 5-8% slower and the others
# unchanged, so wider factors keep the plain form.

# Widest factor whose gradient products are reoriented.
REORIENT_MAX_K = 64


def _reoriented(k: int) -> bool:
  """Whether products with a factor of k columns are reoriented (traced on
  the CPU, k <= REORIENT_MAX_K)."""
  return lapack.on_cpu() and k <= REORIENT_MAX_K


def _t(a: jax.Array) -> jax.Array:
  return jnp.swapaxes(a, -1, -2)


def _kept(a: jax.Array) -> jax.Array:
  """a, read through its transposition held as an array: the barrier on
  a^T keeps XLA from folding the transposition into the product that
  reads the result (and, by the barrier's transpose rule, likewise for the
  cotangent in reverse mode)."""
  return _t(jax.lax.optimization_barrier(_t(a)))


def _flat(a: jax.Array) -> jax.Array:
  return a.reshape(-1, a.shape[-1])


def sum_terms(terms, like):
  """The sum of a JVP's tangent terms, zeros like `like` where none."""
  return sum(terms) if terms else jnp.zeros_like(like)


@jax.custom_jvp
def _times(x, W):
  return x @ W


def _times_jvp(primals, tangents):
  # The factor's term is written so that its transpose (reverse mode) is
  # the (k, d) product of the cotangent's materialized transpose with x.
  x, W = primals
  dx, dW = tangents
  y = x @ W
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(dx @ W)
  if not isinstance(dW, SymbolicZero):
    t = _kept(_flat(x) @ _kept(dW))
    terms.append(t.reshape(y.shape))
  return y, sum_terms(terms, y)


_times.defjvp(_times_jvp, symbolic_zeros=True)


@jax.custom_jvp
def _times_t(z, W):
  return z @ _t(W)


def _times_t_jvp(primals, tangents):
  # z (B, k) is the short operand here: its materialized transpose times
  # the cotangent gives W's gradient as a (k, d) product.
  z, W = primals
  dz, dW = tangents
  y = z @ _t(W)
  terms = []
  if not isinstance(dz, SymbolicZero):
    terms.append(dz @ _t(W))
  if not isinstance(dW, SymbolicZero):
    zk = _kept(_flat(z))
    t = zk @ jax.lax.optimization_barrier(_t(dW))
    terms.append(t.reshape(y.shape))
  return y, sum_terms(terms, y)


_times_t.defjvp(_times_t_jvp, symbolic_zeros=True)


def times(x: jax.Array, W: jax.Array) -> jax.Array:
  """x (..., d) @ W (d, k) for a factor W, with W's gradient formed in the
  fast orientation on the CPU (module comment above) where `_reoriented`;
  the plain product elsewhere. Values and derivatives (reverse, forward
  mode, vmap) are those of x @ W."""
  return _times(x, W) if _reoriented(W.shape[-1]) else x @ W


def times_t(z: jax.Array, W: jax.Array) -> jax.Array:
  """z (..., k) @ W^T for a factor W (d, k), as `times`."""
  return _times_t(z, W) if _reoriented(W.shape[-1]) else z @ _t(W)


def batch_contract(a: jax.Array, b: jax.Array) -> jax.Array:
  """a^T b (d, k) for a (B, d) and b (B, k), k << d, contracted over the
  batch B: as (b^T a)^T with b^T materialized where `_reoriented` (module
  comment above)."""
  if not _reoriented(b.shape[-1]):
    return a.T @ b
  bt = jax.lax.optimization_barrier(b.T)
  return jax.lax.optimization_barrier(bt @ a).T


def mix(f: LowRank, z: jax.Array) -> jax.Array:
  """z (..., C) in V's coordinates -> (z S^T) U^T (..., n): the rest of
  `apply` once x V is known (a factored convolution's channel mix)."""
  return times_t(z @ f.S.T, f.U)


def apply(f: LowRank, x: jax.Array) -> jax.Array:
  """x (..., m) -> x W^T (..., n) without forming W: ((x V) S^T) U^T (the
  factors' products through `times` and `times_t`)."""
  y = mix(f, times(x, f.V))
  return y if f.W0 is None else y + x @ f.W0.T


# A factored convolution runs as V's filters and then a channel mix (S^T
# U^T) where that costs at most this fraction of the formed kernel's
# convolution; per output pixel C (m + C + n) against n m multiply-adds
# for an (n, m) = (c_out, kh kw c_in) kernel of capacity C. LeNet5's conv2
# (50 x 500, C = 25: 0.56), forward and backward with the input gradient,
# 13.6 -> 10.4 ms; conv1 (20 x 25, C = 10: 0.92) 11.6 -> 15.1 ms.
CONV_FACTORED_MAX = 2 / 3


def convolve_through_factors(f) -> bool:
  """Static: whether a conv layer with LowRank kernel f (no frozen base)
  convolves with its factors (`CONV_FACTORED_MAX`) rather than with the
  formed kernel."""
  if not isinstance(f, LowRank) or f.W0 is not None:
    return False
  n, m = f.shape
  C = f.capacity
  return C * (m + C + n) <= CONV_FACTORED_MAX * n * m


def num_params(f: LowRank, train: bool = True) -> jax.Array:
  """r (n + m) + r^2 (the factors); the frozen base is not counted in train.

  For evaluation of an adapter (W0 present) the merged matrix is deployed,
  so the count is n * m.
  """
  n, m = f.shape
  r = f.rank
  if f.W0 is not None and not train:
    return jnp.asarray(n * m, jnp.int32)
  return r * (n + m) + r * r


def resize(f: LowRank, capacity: int) -> LowRank:
  """Host-side change of buffer capacity (a new shape: one recompile).

  Active columns are kept; capacity must be >= the active rank.
  """
  n, m = f.shape
  r = int(f.rank)
  if not r <= capacity <= min(n, m):
    raise ValueError(f"LowRank.resize: capacity {capacity} must be in "
                     f"[rank, min(n, m)] = [{r}, {min(n, m)}]")
  c = min(capacity, f.capacity)
  pad = lambda a, rows: jnp.zeros((rows, capacity), a.dtype).at[:, :c].set(a[:, :c])
  S = jnp.zeros((capacity, capacity), f.S.dtype).at[:c, :c].set(f.S[:c, :c])
  return LowRank(pad(f.U, n), S, pad(f.V, m), f.rank, f.W0)


def conv_kernel_to_matrix(kernel: jax.Array) -> jax.Array:
  """Flax conv kernel (kh, kw, c_in, c_out) -> (c_out, kh * kw * c_in)."""
  if kernel.ndim != 4:
    raise ValueError(f"expected a (kh, kw, c_in, c_out) kernel, got {kernel.shape}")
  return kernel.reshape(-1, kernel.shape[-1]).T


def matrix_to_conv_kernel(W: jax.Array, kh: int, kw: int) -> jax.Array:
  """(c_out, kh * kw * c_in) -> Flax conv kernel (kh, kw, c_in, c_out)."""
  c_out, k = W.shape
  if k % (kh * kw):
    raise ValueError(f"matrix of shape {W.shape} is not a {kh}x{kw} conv kernel")
  return W.T.reshape(kh, kw, k // (kh * kw), c_out)


def bucket_capacity(rank: int, limit: int) -> int:
  """Smallest power of two >= 2 * rank, capped at `limit` (= min(n, m)).

  Rank-adaptive integrators augment to 2r inside the buffer, so a capacity
  of at least 2r lets the rank double in one step without a reshape.
  """
  return min(limit, 1 << max(1, math.ceil(math.log2(max(2 * rank, 2)))))
