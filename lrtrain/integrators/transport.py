"""Optimizer-state transport across basis changes.

When an integrator changes the basis a factor is expressed in (augmentation
S^0 = M S N^T, truncation S^1 -> P^T S^1 Q), the optimizer moments of that
factor still live in the old basis. Transport maps them with the same
matrices that map the parameter:

  first moments (momentum, Adam's mu):   m <- A m B^T
  second moments (fields named 'nu'):    v <- (A o A) v (B o B)^T  (o: elementwise)

The second-moment rule is the expected square of a mapped entry when the
signs of the entries are independent; the rule (A sqrt(v) B^T)^2 of
docs/design.md ("Moment transport") is available as second_rule='root' but lets
entries cancel under sign-mixing rotations (measured worse with Adam).

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
  efficient fine-tuning", ICLR 2025 (no transport in their code;
  docs/design.md, "Moment transport", derives the rule used here).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from lrtrain.factorizations import tucker as tk
from lrtrain.integrators import linalg

SECOND_MOMENT_FIELDS = ("nu",)
SECOND_RULES = ("squares", "squares_fresh", "squares_mean", "root")
# The default: measured best with Adam on rank-adaptive KLS (5 seeds on
# digits and on LeNet5 / Fashion-MNIST, experiments/transport_rules): new
# directions start from a fresh second moment instead of the one a
# discarded direction left at their index.
DEFAULT_RULE = "squares_fresh"


class Congruence(NamedTuple):
  """The linear map X -> A X B^T (A or B None means identity on that side).

  Attributes:
    A: (p, k) left matrix or None.
    B: (q, l) right matrix or None.
    padded: A and B are the first p / q rows of square maps (k x k, l x l)
      whose other rows are zero: the result keeps X's shape, zero beyond
      its first p rows / q columns (a truncation that keeps at most p of k
      directions maps with a p x k block, half the products of the k x k
      map when p = k / 2).
    inner: None, or a (traced) int j: A's and B's columns from j on are
      zero (a truncation's coordinates of the old basis, which span only
      its j active directions). Where j fits in the first half of the
      contracted axis the products read only that half of X and of the
      maps (half their work: the moments of an n x C factor whose old rank
      was at most C / 2); a branch decides inside the step.
  """
  A: jax.Array | None = None
  B: jax.Array | None = None
  padded: bool = False
  inner: Any = None

  def first(self, X: jax.Array) -> jax.Array:
    """Map a first moment (or the parameter itself)."""
    Y = X.astype(jnp.float32)
    A = None if self.A is None else self.A.astype(jnp.float32)
    B = None if self.B is None else self.B.astype(jnp.float32)
    if self.inner is None:
      Y = _congruence(Y, A, B, None)
    else:
      Y = _congruence_inner(Y, A, B, self.inner)
    if self.padded:
      Y = linalg.zero_pad(Y, X.shape)
    return Y.astype(X.dtype)

  def second(self, v: jax.Array, rule: str = DEFAULT_RULE) -> jax.Array:
    """Map a second moment (nonnegative result).

    rule 'squares': v <- (A o A) v (B o B)^T, the second moment of A x B^T
      for entries with independent signs; an orthogonal map keeps sum(v).
      Coordinates the map gives no mass (new directions) keep their old
      value; 'squares_fresh' starts them at 0 as a fresh optimizer would,
      'squares_mean' at the mean of the mapped coordinates.
    rule 'root': v <- (A sqrt(v) B^T)^2. Rotations mixing coordinates of
      opposite sign make entries of A sqrt(v) B^T cancel, so some v become
      tiny and Adam's next step there huge; measured worse (see tests).
    """
    return _second(v, rule, self.first,
                   lambda sq: Congruence(*sq, padded=self.padded,
                                         inner=self.inner).first,
                   (self.A, self.B), keep_unmapped=v.ndim == 2,
                   padded=self.padded)

  def then(self, other: "Congruence") -> "Congruence":
    """The composition `other` after `self` (one combined map; not for
    padded maps)."""
    if self.padded or other.padded:
      raise ValueError("Congruence.then: compose the square maps, not padded blocks")
    mul = lambda x, y: y if x is None else (x if y is None else x @ y)
    return Congruence(mul(other.A, self.A), mul(other.B, self.B))


def _congruence(Y, A, B, h):
  """A Y B^T (None: identity), contracting only the first h rows / columns
  of Y (all where h is None: the slices are then the whole arrays)."""
  if A is not None:
    Y = A[:, :h] @ Y[:h]
  if B is not None:
    Y = Y[:, :h] @ B[:, :h].T
  return Y


def _congruence_inner(Y, A, B, j):
  """`_congruence` for maps whose columns from j on are zero: on the first
  halves of the contracted axes where j fits there (a branch), else in
  full (also where the two sides contract axes of different or odd
  lengths)."""
  sizes = {m.shape[1] for m in (A, B) if m is not None}
  if len(sizes) != 1 or next(iter(sizes)) % 2:
    return _congruence(Y, A, B, None)
  h = next(iter(sizes)) // 2
  return linalg.cond(jnp.asarray(j) <= h,
                     lambda Y, A, B: _congruence(Y, A, B, h),
                     lambda Y, A, B: _congruence(Y, A, B, None), Y, A, B)


class ModeMaps:
  """Per-mode linear maps of an order-N tensor: X -> X x_1 A_1 ... x_N A_N
  (None = identity); `Congruence` is the order-2 case written as A X B^T.
  Tucker cores and their moments move with it."""

  def __init__(self, maps: Sequence[jax.Array | None]):
    self.maps = list(maps)

  def first(self, X: jax.Array) -> jax.Array:
    Y = X.astype(jnp.float32)
    for i, A in enumerate(self.maps):
      if A is not None:
        Y = tk.mode_product(Y, A.astype(jnp.float32), i)
    return Y.astype(X.dtype)

  def second(self, v: jax.Array, rule: str = DEFAULT_RULE) -> jax.Array:
    """As `Congruence.second`, mode by mode."""
    return _second(v, rule, self.first, lambda sq: ModeMaps(sq).first,
                   self.maps, keep_unmapped=True)


def _second(v, rule, first, first_of_squares, maps, *, keep_unmapped: bool,
            padded: bool = False):
  """A second moment under a linear map given mode-wise by `maps`.

  rule 'squares_fresh' (the default): the map with elementwise-squared
  matrices; coordinates the map gives no mass (new directions of an
  augmented basis: rows of a square A with sum(A^2) = 0) start at 0, as in
  a fresh optimizer, so Adam's first steps there are about lr: new
  directions grow quickly (measured best, experiments/transport_rules).
  rule 'squares': those coordinates keep the old second moment at their
  index (with `keep_unmapped`, and only where every map is square: one
  mode-wise map per axis of v), which belonged to a discarded direction;
  'squares_mean': they start at the mean of the coordinates the map
  reaches.
  rule 'root': (map of sqrt(v))^2.
  """
  v32 = v.astype(jnp.float32)
  if rule == "root":
    return jnp.square(first(jnp.sqrt(jnp.maximum(v32, 0.0)))).astype(v.dtype)
  sq = [None if A is None else jnp.square(A.astype(jnp.float32)) for A in maps]
  out = first_of_squares(sq)(v32)
  if rule == "squares_fresh":
    return out.astype(v.dtype)
  if keep_unmapped and all(A2 is None or padded or A2.shape[0] == A2.shape[1]
                          for A2 in sq):
    miss = jnp.zeros(v.shape, jnp.float32)
    for i, A2 in enumerate(sq):
      if A2 is not None:
        shape = [1] * v.ndim
        shape[i] = v.shape[i]
        # A padded block's missing rows reach nothing (row sum 0).
        mass = jnp.pad(A2.sum(1), (0, v.shape[i] - A2.shape[0]))
        miss = jnp.maximum(miss, jnp.clip(1.0 - mass, 0.0, 1.0).reshape(shape))
    if rule == "squares_mean":
      reached = 1.0 - miss
      fill = jnp.sum(out * reached) / jnp.maximum(jnp.sum(reached), 1.0)
    else:
      fill = v32
    out = out + miss * fill
  return out.astype(v.dtype)


def check_rule(rule: str, method: str) -> None:
  """Raises ValueError naming `method` for an unknown second-moment rule."""
  if rule not in SECOND_RULES:
    raise ValueError(f"{method}: transport_rule={rule!r} is not one of "
                     f"{', '.join(SECOND_RULES)}")


def _shapes(tree) -> list[tuple[int, ...]]:
  return [tuple(jnp.shape(x)) for x in jax.tree.leaves(tree)]


def transport(opt_state: Any, like: Any, maps: Sequence[Congruence | None],
              *, enabled: bool = True,
              second_moments: Sequence[str] = SECOND_MOMENT_FIELDS,
              second_rule: str = DEFAULT_RULE) -> Any:
  """Map every moment tree inside an optax state with per-leaf congruences.

  Args:
    opt_state: any optax state (nested NamedTuples / tuples / dicts).
    like: the tree the optimizer was initialised on (only its structure and
      leaf shapes are used).
    maps: one `Congruence` or None per leaf of `like`, in
      `jax.tree.leaves(like)` order.
    enabled: False returns `opt_state` unchanged (the on/off switch).
    second_moments: field names whose leaves are second moments.
    second_rule: one of SECOND_RULES (see `Congruence.second`).

  Returns:
    The state with the same structure, moments mapped.

  Raises:
    ValueError: `maps` does not have one entry per leaf of `like`, or an
      unknown second_rule.
  """
  check_rule(second_rule, "transport")
  if not enabled:
    return opt_state
  n = len(jax.tree.leaves(like))
  if len(maps) != n:
    raise ValueError(f"transport: {len(maps)} maps for {n} leaves")
  if all(m is None for m in maps):
    return opt_state

  def move(leaves, second):
    return [l if m is None else (m.second(l, second_rule) if second
                                 else m.first(l))
            for l, m in zip(leaves, maps)]

  return map_moment_trees(opt_state, like, move, second_moments)


def map_moment_trees(opt_state: Any, like: Any, fn: Callable[[list, bool], list],
                     second_moments: Sequence[str] = SECOND_MOMENT_FIELDS) -> Any:
  """The walk over an optax state's moment trees (module docstring): every
  subtree whose structure and leaf shapes equal those of `like` gets
  `fn(leaves, second)`, its leaves in `jax.tree.leaves(like)` order and
  `second` True under a field named in `second_moments`; fn returns the
  new leaves. Everything else (counts, hyperparameters) is kept.

  Args:
    opt_state: any optax state (nested NamedTuples / tuples / dicts).
    like: the tree the optimizer was initialised on (structure and shapes).
    fn: (leaves, second) -> leaves of the same shapes.
    second_moments: field names whose leaves are second moments.

  Returns:
    The state with the same structure, moment trees replaced.
  """
  like_def = jax.tree.structure(like)
  like_shapes = _shapes(like)

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
    return jax.tree.unflatten(like_def, fn(jax.tree.leaves(x), second))

  return jax.tree_util.tree_map_with_path(visit, opt_state, is_leaf=is_moment)
