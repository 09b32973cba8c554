"""Random draws for initializers, generated flat and reshaped.

With `jax_threefry_partitionable` (jax's default), a draw of an n-D shape
builds its counters from one iota per axis, and XLA's CPU compiler takes
1-2 s for each such draw whose axes are not powers of two ((16, 9),
(3, 3, 1, 32)): a model init with a dozen layers took 10 s to compile. A
1-D draw of the same size compiles in a few milliseconds and has the same
distribution, so every initializer in lrtrain draws through this module.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

# std of a standard normal truncated to [-2, 2].
_TRUNCATED_STD = 0.87962566103423978


def _size(shape: Sequence[int]) -> int:
  return math.prod(shape)


def normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Standard normal draws of `shape`."""
  return jax.random.normal(key, (_size(shape),), dtype).reshape(shape)


def truncated_normal(key: jax.Array, lower: float, upper: float,
                     shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Standard normal draws of `shape` truncated to [lower, upper]."""
  return jax.random.truncated_normal(key, lower, upper, (_size(shape),),
                                     dtype).reshape(shape)


def uniform(key: jax.Array, shape: Sequence[int], dtype=jnp.float32,
            minval: float = 0.0, maxval: float = 1.0) -> jax.Array:
  """Uniform draws of `shape` on [minval, maxval)."""
  return jax.random.uniform(key, (_size(shape),), dtype, minval,
                            maxval).reshape(shape)


def lecun_normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32,
                 fan_in: int | None = None) -> jax.Array:
  """Truncated normal with std 1 / sqrt(fan_in); fan_in defaults to the
  product of every axis but the last (Flax's kernel layout). A Flax
  initializer: `self.param("kernel", draws.lecun_normal, shape, dtype)`."""
  fan_in = _size(shape[:-1]) if fan_in is None else fan_in
  w = truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
  return (w / (_TRUNCATED_STD * math.sqrt(fan_in))).astype(dtype)
