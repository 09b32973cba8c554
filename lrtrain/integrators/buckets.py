"""Capacity buckets: host-side resizing of factor buffers for adaptive methods.

Rank-adaptive integrators keep the rank r as an array inside buffers of a
fixed capacity C, so rank changes never change shapes. Augmentation to 2r
must fit inside the buffer, so C >= 2r is needed before a step. `resize`
moves a buffer between power-of-two buckets only when needed:

  grow    when need * r > C        ->  C = bucket(r)   (smallest 2^k >= need * r)
  shrink  when need * r <= C / 4   ->  C = bucket(r)   (hysteresis: no ping-pong)

capped at the layer's limit min(n, m). A run therefore compiles 1 + (number
of bucket moves) times, and the step cost follows the active rank within a
factor of 8. Optimizer moments are padded / cropped with the same embedding
(a congruence, so `transport.transport` does it).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lrtrain import factorizations as fz
from lrtrain.factorizations import lowrank
from lrtrain.integrators import transport as transport_lib

SHRINK_RATIO = 4


def bucket(rank: int, limit: int, need: int = 2) -> int:
  """Smallest power of two >= need * rank (at least need), capped at limit."""
  want = max(need * int(rank), need, 1)
  return int(min(limit, 1 << math.ceil(math.log2(want))))


def target_capacity(rank: int, capacity: int, limit: int, need: int = 2) -> int:
  """The capacity a buffer should have for its active rank (with hysteresis).

  Args:
    rank: active rank r.
    capacity: current capacity C.
    limit: largest possible capacity (min(n, m) of the layer, or the mode
      size for a Tucker factor).
    need: capacity per unit of rank needed by the step (2 for methods that
      augment to 2r, 1 for fixed-rank methods).

  Returns:
    The new capacity (== capacity when no move is needed). Never below rank.
  """
  rank, capacity, limit = int(rank), int(capacity), int(limit)
  if need * rank > capacity and capacity < limit:
    return max(bucket(rank, limit, need), rank)
  if need * rank * SHRINK_RATIO <= capacity:
    return max(bucket(rank, limit, need), rank)
  return capacity


def embedding(old: int, new: int, dtype=jnp.float32) -> jax.Array:
  """(new, old) matrix that pads (new > old) or crops (new < old) a
  coordinate axis: E x keeps the common leading entries."""
  return jnp.eye(new, old, dtype=dtype)


def lowrank_plan(params: Any, need: int = 2) -> list[tuple[int, int] | None]:
  """(old C, new C) per LowRank node (in `fz.factor_paths` order over LowRank
  nodes only), or None where no move is needed. Reads ranks on the host."""
  out = []
  for _, f in fz.factor_paths(params):
    if not isinstance(f, fz.LowRank):
      continue
    r = int(np.asarray(f.rank))
    C = f.capacity
    new = target_capacity(r, C, min(f.shape), need)
    out.append(None if new == C else (C, new))
  return out


def require_room(params: Any, method: str) -> None:
  """Refuse LowRank nodes that a rank-adaptive step cannot augment: rank
  above half the capacity where a larger bucket exists (the step would add
  fewer than r new directions, none at capacity = rank). Reads ranks on the
  host; traced params (`jax.eval_shape`, inside jit) are not checked.

  Raises:
    ValueError: naming the layer and how to bucket the buffers.
  """
  for path, f in fz.factor_paths(params):
    if not isinstance(f, fz.LowRank) or isinstance(f.rank, jax.core.Tracer):
      continue
    r, C = int(np.asarray(f.rank)), f.capacity
    if target_capacity(r, C, min(f.shape), need=2) > C:
      raise ValueError(
          f"{method}: layer {path!r} has rank {r} in capacity {C}, too little "
          f"room to augment (needs {min(2 * r, min(f.shape))}); bucket the "
          "buffers first: params, _, _ = integrator.resize(params, None), "
          "then integrator.init(params)")


def resize_lowrank(params: Any, plan: Sequence[tuple[int, int] | None]) -> Any:
  """Apply a `lowrank_plan`: every LowRank node with a move gets the new
  capacity (active columns kept, the rest zero)."""
  it = iter(plan)

  def fix(x):
    if not isinstance(x, fz.LowRank):
      return x
    move = next(it)
    return x if move is None else lowrank.resize(x, move[1])

  return jax.tree.map(fix, params, is_leaf=fz.is_factor)


def resize_state(opt_state: Any, like: Any,
                 leaf_maps: Sequence[transport_lib.Congruence | None]) -> Any:
  """Pad/crop optimizer moments of the tree `like` (old shapes) with the
  given per-leaf embeddings; always on (shapes must follow the params)."""
  return transport_lib.transport(opt_state, like, leaf_maps, enabled=True)


def count_moves(plan: Sequence[Any]) -> int:
  """Number of buffers that move bucket in a plan."""
  return sum(m is not None for m in plan)

