"""Optimizer-state transport across basis changes.

When an integrator changes the basis a factor is expressed in (augmentation
S^0 = M S N^T, truncation S^1 -> P^T S^1 Q), the optimizer moments of that
factor still live in the old basis. Transport maps them with the same
matrices that map the parameter:

  first moments (momentum, Adam's mu):   m <- A m B^T
  second moments (fields named 'nu'):    v <- (A sqrt(v) B^T)^2  (elementwise)

so that momentum keeps pointing the same way in weight space and Adam's
scale estimates follow their coordinates. Without transport the moments of
a rotated S are applied to the wrong coordinates.

The walk is generic over optax states: every subtree of the state whose tree
structure and leaf shapes equal those of the tree the optimizer was
initialised on (`like`) is a moment tree, and its leaves are mapped with
`maps` (aligned with `jax.tree.leaves(like)`; None = leave unchanged).
Counts, schedules' step counters, and states of other shapes are untouched.

References:
  Schotthoefer et al., "GeoLoRA: Geometric integration for parameter
  efficient fine-tuning", ICLR 2025 (no transport in their code; section 2
  of INTEGRATORS.md derives the rule used here).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

SECOND_MOMENT_FIELDS = ("nu",)


class Congruence(NamedTuple):
  """The linear map X -> A X B^T (A or B None means identity on that side).

  Attributes:
    A: (p, k) left matrix or None.
    B: (q, l) right matrix or None.
  """
  A: jax.Array | None = None
  B: jax.Array | None = None

  def first(self, X: jax.Array) -> jax.Array:
    """Map a first moment (or the parameter itself)."""
    Y = X.astype(jnp.float32)
    if self.A is not None:
      Y = self.A.astype(jnp.float32) @ Y
    if self.B is not None:
      Y = Y @ self.B.astype(jnp.float32).T
    return Y.astype(X.dtype)

  def second(self, v: jax.Array) -> jax.Array:
    """Map a second moment: (A sqrt(v) B^T)^2 keeps it nonnegative."""
    root = jnp.sqrt(jnp.maximum(v.astype(jnp.float32), 0.0))
    return jnp.square(self.first(root)).astype(v.dtype)

  def then(self, other: "Congruence") -> "Congruence":
    """The composition `other` after `self` (one combined map)."""
    mul = lambda x, y: y if x is None else (x if y is None else x @ y)
    return Congruence(mul(other.A, self.A), mul(other.B, self.B))


def _shapes(tree) -> list[tuple[int, ...]]:
  return [tuple(jnp.shape(x)) for x in jax.tree.leaves(tree)]


def transport(opt_state: Any, like: Any, maps: Sequence[Congruence | None],
              *, enabled: bool = True,
              second_moments: Sequence[str] = SECOND_MOMENT_FIELDS) -> Any:
  """Map every moment tree inside an optax state with per-leaf congruences.

  Args:
    opt_state: any optax state (nested NamedTuples / tuples / dicts).
    like: the tree the optimizer was initialised on (only its structure and
      leaf shapes are used).
    maps: one `Congruence` or None per leaf of `like`, in
      `jax.tree.leaves(like)` order.
    enabled: False returns `opt_state` unchanged (the on/off switch).
    second_moments: field names whose leaves are second moments.

  Returns:
    The state with the same structure, moments mapped.

  Raises:
    ValueError: `maps` does not have one entry per leaf of `like`.
  """
  if not enabled:
    return opt_state
  like_def = jax.tree.structure(like)
  like_shapes = _shapes(like)
  if len(maps) != len(like_shapes):
    raise ValueError(f"transport: {len(maps)} maps for {len(like_shapes)} leaves")
  if all(m is None for m in maps):
    return opt_state

  def is_moment(x) -> bool:
    try:
      return (jax.tree.structure(x) == like_def
              and _shapes(x) == like_shapes)
    except Exception:  # exotic leaves that cannot be flattened
      return False

  def visit(path, x):
    if not is_moment(x):
      return x
    names = {getattr(k, "name", getattr(k, "key", None)) for k in path}
    second = any(n in names for n in second_moments)
    leaves = jax.tree.leaves(x)
    new = [l if m is None else (m.second(l) if second else m.first(l))
           for l, m in zip(leaves, maps)]
    return jax.tree.unflatten(like_def, new)

  return jax.tree_util.tree_map_with_path(visit, opt_state, is_leaf=is_moment)
