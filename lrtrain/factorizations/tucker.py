"""Tucker: conv kernel C = core x1 U1 x2 U2 x3 U3 x4 U4 (TDLRT).

Mode order (out, in, kh, kw): C (c_out, c_in, kh, kw); U1 (c_out, C1),
U2 (c_in, C2), U3 (kh, C3), U4 (kw, C4); core (C1, C2, C3, C4) with
capacities C_i and active ranks `ranks` (4,) int32. As for LowRank, the
inactive columns of each U_i and the inactive slices of the core are zero.
The spatial modes usually stay full (U3 = I, U4 = I).

References:
  Zangrando et al., "Geometry-aware training of factorized layers in tensor
  Tucker format", NeurIPS 2024.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from lrtrain import draws, lapack
from lrtrain.factorizations import conv as conv_lib
from lrtrain.factorizations.lowrank import column_mask, random_orthonormal


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tucker:
  """Tucker-factored conv kernel; see the module docstring for shapes."""
  core: jax.Array
  U1: jax.Array
  U2: jax.Array
  U3: jax.Array
  U4: jax.Array
  ranks: jax.Array

  @property
  def factors(self) -> tuple[jax.Array, ...]:
    return (self.U1, self.U2, self.U3, self.U4)

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """(c_out, c_in, kh, kw)."""
    return tuple(u.shape[0] for u in self.factors)

  @property
  def capacities(self) -> tuple[int, ...]:
    return self.core.shape


def mode_product(t: jax.Array, M: jax.Array, mode: int) -> jax.Array:
  """t x_mode M: contracts axis `mode` of t with the columns of M (rows out)."""
  t = jnp.moveaxis(t, mode, 0)
  out = jnp.tensordot(M, t, axes=(1, 0))
  return jnp.moveaxis(out, 0, mode)


def unfold(t: jax.Array, mode: int) -> jax.Array:
  """Mode-`mode` unfolding: (dim_mode, prod of the other dims)."""
  return jnp.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)


def core_mask(ranks: jax.Array, capacities: Sequence[int], dtype=jnp.float32):
  masks = [column_mask(ranks[i], c, dtype) for i, c in enumerate(capacities)]
  return (masks[0][:, None, None, None] * masks[1][None, :, None, None]
          * masks[2][None, None, :, None] * masks[3][None, None, None, :])


def _check(shape, ranks, capacities):
  if len(shape) != 4 or min(shape) < 1:
    raise ValueError(f"Tucker: expected a 4-D conv kernel shape, got {shape}")
  for i, (d, r, c) in enumerate(zip(shape, ranks, capacities)):
    if not 1 <= r <= c <= d:
      raise ValueError(f"Tucker: mode {i + 1} (size {d}) needs 1 <= rank {r} "
                       f"<= capacity {c} <= {d}")


def init(key: jax.Array, c_out: int, c_in: int, kh: int, kw: int,
         ranks: Sequence[int], *, capacities: Sequence[int] | None = None,
         dtype=jnp.float32) -> Tucker:
  """Random orthonormal factors and a Gaussian core scaled like a conv init.

  Raises:
    ValueError: impossible shapes, ranks or capacities.
  """
  shape = (c_out, c_in, kh, kw)
  capacities = tuple(ranks) if capacities is None else tuple(capacities)
  _check(shape, ranks, capacities)
  ranks = jnp.asarray(ranks, jnp.int32)
  keys = jax.random.split(key, 5)
  Us = [random_orthonormal(k, d, c) * column_mask(ranks[i], c)
        for i, (k, d, c) in enumerate(zip(keys[:4], shape, capacities))]
  fan_in = c_in * kh * kw
  core = draws.normal(keys[4], capacities) * (fan_in / max(
      1, capacities[1] * capacities[2] * capacities[3])) ** 0.5 / fan_in ** 0.5
  core = core * core_mask(ranks, capacities)
  return Tucker(core.astype(dtype), *(u.astype(dtype) for u in Us), ranks)


def from_dense(kernel: jax.Array, ranks: Sequence[int], *,
               capacities: Sequence[int] | None = None) -> Tucker:
  """Truncated HOSVD of a Flax conv kernel (kh, kw, c_in, c_out).

  Raises:
    ValueError: kernel not 4-D or impossible ranks/capacities.
  """
  if kernel.ndim != 4:
    raise ValueError(f"Tucker.from_dense: expected (kh, kw, c_in, c_out), got "
                     f"{kernel.shape}")
  C = jnp.transpose(kernel, (3, 2, 0, 1)).astype(jnp.float32)
  capacities = tuple(ranks) if capacities is None else tuple(capacities)
  _check(C.shape, ranks, capacities)
  r = jnp.asarray(ranks, jnp.int32)
  Us = []
  for i, c in enumerate(capacities):
    u = lapack.svd(unfold(C, i), full_matrices=False)[0]
    k = min(c, u.shape[1])
    U = jnp.zeros((C.shape[i], c)).at[:, :k].set(u[:, :k])
    Us.append(U * column_mask(r[i], c))
  core = C
  for i, U in enumerate(Us):
    core = mode_product(core, U.T, i)
  return Tucker(core.astype(kernel.dtype), *(u.astype(kernel.dtype) for u in Us), r)


def materialize(f: Tucker) -> jax.Array:
  """Full kernel in (c_out, c_in, kh, kw) mode order."""
  C = f.core
  for i, U in enumerate(f.factors):
    C = mode_product(C, U, i)
  return C


def to_flax_kernel(f: Tucker) -> jax.Array:
  """Full kernel in Flax layout (kh, kw, c_in, c_out)."""
  return jnp.transpose(materialize(f), (2, 3, 1, 0))


def conv(f: Tucker, x: jax.Array, strides=(1, 1), padding="VALID",
         impl: str = "auto") -> jax.Array:
  """NHWC conv: contract c_in with U2, small conv with the spatially expanded
  core (kh, kw, C2, C1), expand with U1 - never builds the full kernel."""
  z = x @ f.U2                                              # (b, h, w, C2)
  small = mode_product(mode_product(f.core, f.U3, 2), f.U4, 3)  # (C1, C2, kh, kw)
  y = conv_lib.conv2d(z, jnp.transpose(small, (2, 3, 1, 0)), strides, padding,
                      impl)                                  # (b, h', w', C1)
  return y @ f.U1.T


def num_params(f: Tucker, train: bool = True) -> jax.Array:
  """prod(r_i) + sum_i d_i r_i (core and factors), train and eval alike."""
  del train
  r = f.ranks
  return jnp.prod(r) + sum(d * r[i] for i, d in enumerate(f.shape))
