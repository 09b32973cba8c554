"""SLTrain: W = scale * B A + S with S sparse on a fixed random support.

Orientation: W is (n, m) = (out, in); B is (n, r), A is (r, m); an input
x (..., m) maps to x W^T (..., n). S has nnz = max(1, floor(density n m))
entries at the flat row-major positions `index` (i * m + j, sorted,
distinct), drawn uniformly once at init and never changed: only B, A and
the nnz `values` train. `index` is an int32 leaf, so the optimizers (which
see float leaves only, `integrators.base.trainable`) never touch it, and
`scale` is a frozen float like a Lora's.

Initialisation follows the authors' implementation: B = 0 and A, like
LoRA's A, uniform on +-1/sqrt(m) (PyTorch's kaiming_uniform with
a = sqrt(5) on an (r, m) weight); the sparse values uniform on
+-1/sqrt(m) as well. A fresh layer is therefore W = S, and B A grows from
zero. scale = alpha / r (`lora.lora_scale`; the authors' LLaMA runs use
alpha = 32 at r = 128 (60M) and alpha = 16 at r = 256 (130M), scales 1/4
and 1/16; `model.factor.alpha` sets it, 0 meaning scale 1).

How the sparse part is applied: S is scattered into a dense (n, m) buffer,
added to scale * B A, and the layer is one matmul x W^T. Autodiff of that
scatter gives dL/dvalues = (dL/dW) at the support, dL/dB = scale dL/dW A^T
and dL/dA = scale B^T dL/dW, the paper's backward (its custom backward
recomputes W to avoid storing it; here XLA keeps the (n, m) buffer for the
backward pass, the size of one dense weight per layer during a step and
nothing between steps). Measured at n = m = 1024, r = 64, density 0.03,
batch 256, float32, on one CPU core (median of 15 jitted calls):

  route                                         forward   forward+backward
  scatter S into B A, one matmul (used)          4.8 ms        10.2 ms
  the same under jax.checkpoint (no residual)    4.8 ms        13.0 ms
  x A^T B^T + x S_dense^T (two products)         8.6 ms        16.8 ms
  x A^T B^T + gather x on S's columns,
    segment-sum into S's rows                    9.9 ms        73.9 ms
  x A^T B^T + jax.experimental.sparse BCOO      22.9 ms        60.6 ms

The gather / scatter-add routes do batch x nnz (8M here) indexed memory
operations each way, which cost more on the CPU than the dense product's
b n m multiply-adds; their backward is the slow part.

References:
  Han et al., "SLTrain: a sparse plus low-rank approach for parameter and
  memory efficient pretraining", NeurIPS 2024.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lrtrain import draws
from lrtrain.factorizations import lora

DEFAULT_DENSITY = 0.03


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SLTrain:
  """W = scale * B A + S, S = scatter(values at index) into (n, m).

  Attributes:
    B: (n, r) up factor (zero at init).
    A: (r, m) down factor.
    values: (nnz,) the entries of S on its support.
    index: (nnz,) int32 flat positions i * m + j of the support (sorted,
      distinct), fixed at init.
    scale: () alpha / r, frozen.
  """
  B: jax.Array
  A: jax.Array
  values: jax.Array
  index: jax.Array
  scale: jax.Array

  @property
  def shape(self) -> tuple[int, int]:
    return (self.B.shape[-2], self.A.shape[-1])

  @property
  def rank(self) -> int:
    return self.A.shape[-2]

  @property
  def nnz(self) -> int:
    return self.values.shape[-1]

  @property
  def dtype(self):
    return self.B.dtype


def support_size(n: int, m: int, density: float) -> int:
  """nnz of an (n, m) layer: floor(density n m), at least one entry."""
  return max(1, int(density * n * m))


def init(key: jax.Array, n: int, m: int, rank: int, *,
         density: float = DEFAULT_DENSITY, alpha: float | None = None,
         rank_stabilised: bool = False, dtype=jnp.float32) -> SLTrain:
  """A fresh SLTrain node (module docstring: the paper's initialisation).

  Args:
    key: PRNG key (support, A and the sparse values).
    n: out features.
    m: in features.
    rank: r.
    density: fraction of the n m entries in the support, in (0, 1).
    alpha: scale numerator; defaults to r (scale 1).
    rank_stabilised: scale alpha / sqrt(r) instead of alpha / r.
    dtype: dtype of B, A, values and scale.

  Raises:
    ValueError: impossible shape or rank, density outside (0, 1), or a
      layer too large for int32 flat indices.
  """
  if n < 1 or m < 1:
    raise ValueError(f"SLTrain: impossible shape ({n}, {m})")
  if not 1 <= rank <= min(n, m):
    raise ValueError(f"SLTrain: rank {rank} must be in [1, min(n, m)] = "
                     f"[1, {min(n, m)}] for a ({n}, {m}) weight")
  if not 0.0 < density < 1.0:
    raise ValueError(f"SLTrain: density {density} must be in (0, 1)")
  if n * m >= 2 ** 31:
    raise ValueError(f"SLTrain: a ({n}, {m}) weight has more entries than "
                     "int32 support indices address")
  nnz = support_size(n, m, density)
  ks, ka, kv = jax.random.split(key, 3)
  # A uniform subset of nnz distinct positions, sorted (row-major order).
  index = jnp.sort(jax.random.permutation(ks, n * m)[:nnz]).astype(jnp.int32)
  bound = 1.0 / math.sqrt(m)
  A = draws.uniform(ka, (rank, m), jnp.float32, -bound, bound)
  values = draws.uniform(kv, (nnz,), jnp.float32, -bound, bound)
  alpha = float(rank) if alpha is None else float(alpha)
  scale = lora.lora_scale(alpha, rank, rank_stabilised)
  return SLTrain(jnp.zeros((n, rank), dtype), A.astype(dtype),
                 values.astype(dtype), index, jnp.asarray(scale, dtype))


def sparse_dense(f: SLTrain) -> jax.Array:
  """S as a dense (n, m) matrix (zero off the support)."""
  n, m = f.shape
  flat = jnp.zeros((n * m,), f.values.dtype).at[f.index].set(
      f.values, indices_are_sorted=True, unique_indices=True)
  return flat.reshape(n, m)


def materialize(f: SLTrain) -> jax.Array:
  """The dense (n, m) weight scale * B A + S."""
  return f.scale * (f.B @ f.A) + sparse_dense(f)


def apply(f: SLTrain, x: jax.Array) -> jax.Array:
  """x (..., m) -> x W^T (..., n): W formed, one matmul (module docstring)."""
  return x @ materialize(f).T


def num_params(f: SLTrain, train: bool = True) -> jax.Array:
  """r (n + m) + nnz in training and deployed alike (the factored form is
  what is kept; the int32 support indices are not parameters)."""
  del train
  n, m = f.shape
  return jnp.asarray(f.rank * (n + m) + f.nnz, jnp.int32)
