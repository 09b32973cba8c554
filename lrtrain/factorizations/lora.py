"""Lora: frozen W0 + scale * B A (Hu et al., 2021; rsLoRA: Kalajdzievski, 2023).

Orientation: W0 is (n, m) = (out, in); A is (r, m), B is (n, r); an input
x (..., m) maps to x W^T (..., n). B starts at zero, so a fresh adapter
leaves the layer equal to W0. scale = alpha / r, or alpha / sqrt(r) with
rank-stabilised scaling.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lrtrain import draws
from lrtrain.factorizations import lowrank


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Lora:
  """W = W0 + scale * B A.

  Attributes:
    W0: (n, m) frozen base weight.
    A: (r, m) down projection (random at init).
    B: (n, r) up projection (zero at init).
    scale: () scalar alpha / r or alpha / sqrt(r), frozen.
  """
  W0: jax.Array
  A: jax.Array
  B: jax.Array
  scale: jax.Array

  @property
  def shape(self) -> tuple[int, int]:
    return self.W0.shape

  @property
  def rank(self) -> int:
    return self.A.shape[0]


def lora_scale(alpha: float, rank: int, rank_stabilised: bool = False) -> float:
  """alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA)."""
  return alpha / (math.sqrt(rank) if rank_stabilised else rank)


def init(key: jax.Array, W0: jax.Array, rank: int, *, alpha: float | None = None,
         rank_stabilised: bool = False) -> Lora:
  """Adapter on a frozen (n, m) base W0.

  Args:
    key: PRNG key for A.
    W0: (n, m) frozen base weight.
    rank: adapter rank r.
    alpha: scaling numerator; defaults to r (scale 1 for plain LoRA).
    rank_stabilised: use alpha / sqrt(r).

  Raises:
    ValueError: W0 not 2-D or rank outside [1, min(n, m)].
  """
  if W0.ndim != 2:
    raise ValueError(f"Lora: expected a 2-D (n, m) base weight, got {W0.shape}")
  n, m = W0.shape
  if not 1 <= rank <= min(n, m):
    raise ValueError(f"Lora: rank {rank} must be in [1, min(n, m)] = "
                     f"[1, {min(n, m)}] for a ({n}, {m}) weight")
  alpha = float(rank) if alpha is None else float(alpha)
  B = jnp.zeros((n, rank), W0.dtype)
  scale = jnp.asarray(lora_scale(alpha, rank, rank_stabilised), W0.dtype)
  return Lora(W0, init_A(key, rank, m, W0.dtype), B, scale)


def init_A(key: jax.Array, rank: int, m: int, dtype=jnp.float32) -> jax.Array:
  """A fresh (r, m) down projection: uniform with the Kaiming-like bound
  1/sqrt(m), as in the reference LoRA (drawn in float32, then cast)."""
  A = draws.uniform(key, (rank, m), jnp.float32, -1.0, 1.0) / math.sqrt(m)
  return A.astype(dtype)


def from_dense(W: jax.Array, rank: int, **kw) -> Lora:
  """A fresh adapter on W (alias of init with a fixed key)."""
  return init(jax.random.PRNGKey(0), W, rank, **kw)


def delta(f: Lora) -> jax.Array:
  """The (n, m) update scale * B A."""
  return f.scale * (f.B @ f.A)


def materialize(f: Lora) -> jax.Array:
  """Merged (n, m) weight W0 + scale * B A."""
  return f.W0 + delta(f)


merge = materialize


def unmerge(W: jax.Array, f: Lora) -> jax.Array:
  """Recover the base from a merged weight: W - scale * B A."""
  return W - delta(f)


def apply(f: Lora, x: jax.Array) -> jax.Array:
  """x (..., m) -> x W0^T + scale (x A^T) B^T, never forming B A (B through
  `lowrank.times_t`; A's gradient g^T x is already a (r, m) product)."""
  return x @ f.W0.T + f.scale * lowrank.times_t(x @ f.A.T, f.B)


def num_params(f: Lora, train: bool = True) -> jax.Array:
  """Train: r (n + m) (A and B); eval: n * m (the merged weight)."""
  n, m = f.shape
  return jnp.asarray(f.rank * (n + m) if train else n * m, jnp.int32)
