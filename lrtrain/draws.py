"""Random draws for initializers, generated flat and reshaped.

With `jax_threefry_partitionable` (jax's default), a draw of an n-D shape
builds its counters from one iota per axis, and XLA's CPU compiler takes
1.3-2.2 s for each such draw with axes like (16, 9), (4, 4, 9) or
(4, 4, 3, 3): a small VGG's init took 10.6 s to compile. A 1-D draw of the
same size costs no more than any tiny program (about 0.3 s) and has the
same distribution, so every initializer in lrtrain draws through this
module.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

# std of a standard normal truncated to [-2, 2].
_TRUNCATED_STD = 0.87962566103423978


def normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Standard normal draws of `shape`."""
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def truncated_normal(key: jax.Array, lower: float, upper: float,
                     shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Standard normal draws of `shape` truncated to [lower, upper]."""
  return jax.random.truncated_normal(key, lower, upper, (math.prod(shape),),
                                     dtype).reshape(shape)


def uniform(key: jax.Array, shape: Sequence[int], dtype=jnp.float32,
            minval: float = 0.0, maxval: float = 1.0) -> jax.Array:
  """Uniform draws of `shape` on [minval, maxval)."""
  return jax.random.uniform(key, (math.prod(shape),), dtype, minval,
                            maxval).reshape(shape)


def lecun_normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32,
                 fan_in: int | None = None) -> jax.Array:
  """Truncated normal with std 1 / sqrt(fan_in); fan_in defaults to the
  product of every axis but the last (Flax's kernel layout). A Flax
  initializer: `self.param("kernel", draws.lecun_normal, shape, dtype)`."""
  fan_in = math.prod(shape[:-1]) if fan_in is None else fan_in
  w = truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
  return (w / (_TRUNCATED_STD * math.sqrt(fan_in))).astype(dtype)
