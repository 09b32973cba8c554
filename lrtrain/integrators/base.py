"""The common step contract, the shared truncation rule and tree helpers.

Every method is an `Integrator(init, step, resize)`:

  params, _, _ = integrator.resize(params, None)    # buckets, before init
  state = integrator.init(params)
  params, state, aux = integrator.step(loss_fn, params, state, batch)   # jittable
  params, state, changed = integrator.resize(params, state)             # host side

`loss_fn(params, batch) -> (loss, aux_dict)`. `aux` returned by `step`
holds "loss" (the loss at the start of the step), the entries of the loss's
aux dict, and "rank/<path>" for every factor node. `resize` moves capacity
buckets of rank-adaptive methods (a new shape, hence one recompile); it is
the identity for fixed-shape methods. With state None (before `init`) it
buckets the params alone; the rank-adaptive methods' `init` refuses a node
with too little room to augment.

Integrators know nothing about Flax: they walk the params pytree and act on
factorization nodes (`lrtrain.factorizations.is_factor`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.extend import core as jcore

from lrtrain import factorizations as fz
from lrtrain import lapack
from lrtrain.integrators import linalg

Params = Any
State = Any
Batch = Any
LossFn = Callable[[Params, Batch], tuple[jax.Array, dict]]


class Integrator(NamedTuple):
  """A training method with the common step contract (module docstring)."""
  init: Callable[[Params], State]
  step: Callable[[LossFn, Params, State, Batch], tuple[Params, State, dict]]
  resize: Callable[[Params, State], tuple[Params, State, bool]]
  # True: after the first `resize` no parameter shape ever changes, so the
  # runner may skip `resize` (and vmap the step over seeds).
  fixed_shape: bool = False


def no_resize(params, state):
  """`resize` of fixed-shape methods."""
  return params, state, False


# The model.factor kind that gives each factor node type, for the fix.
_KIND_OF = {"LowRank": "lowrank", "Tucker": "tucker", "Lora": "lora",
            "SLTrain": "sltrain"}


def require_nodes(params: Params, kinds: tuple[type, ...], method: str) -> None:
  """Refuse params without a factor node the method trains: it would run
  as a plain optimizer on other layers and truncate (or adapt) nothing.
  Every method that trains factor nodes calls it from its `init`, so the
  runner and library users get the same check.

  Raises:
    ValueError: naming the method, the model's layers with their kinds,
      and the config fields to change.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=fz.is_factor)[0]
  if any(isinstance(x, kinds) for _, x in leaves):
    return
  layers = []
  for path, x in leaves:
    name = fz.path_str(path).removesuffix("/kernel")
    if fz.is_factor(x):
      layers.append(f"{name}: {_KIND_OF.get(type(x).__name__, type(x).__name__)}")
    elif is_float(x) and x.ndim >= 2:
      layers.append(f"{name}: dense")
  want = [_KIND_OF.get(k.__name__, k.__name__) for k in kinds]
  fix = f"--config.model.factor.kind={want[0]}"
  if "tucker" in want:
    fix += " or --config.model.factor.conv_kind=tucker"
  elif want[0] == "lowrank":
    fix += " (model.factor.conv_kind for convolutions)"
  has = {l.rsplit(": ", 1)[1] for l in layers}
  alternative = ("kls" if "lowrank" in has else "lora" if "lora" in has
                 else "sltrain" if "sltrain" in has else "dense")
  raise ValueError(
      f"integrator.name={method!r} trains {'/'.join(want)} layers and the "
      f"model has none ({', '.join(layers) or 'no layers'}); set {fix}, or "
      f"use --config.integrator.name={alternative}")


def is_float(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def value_and_grad(loss_fn: LossFn, params: Params, batch: Batch):
  """(loss, aux), grads with float leaves differentiated and other leaves
  (int ranks) given float32 zero gradients: a tree every optax
  transformation takes (jax.grad's float0 leaves break optax's clipping,
  int ones its rescaling); the integrators ignore those leaves."""
  (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True, allow_int=True)(
      params, batch)
  g = jax.tree.map(
      lambda gi, p: gi if is_float(p) else jnp.zeros(jnp.shape(p), jnp.float32),
      g, params)
  return (loss, aux), g


def rank_aux(params: Params) -> dict[str, jax.Array]:
  """{"rank/<path>": active rank} for every factor node (Tucker: its ranks)."""
  out = {}
  for path, f in fz.factor_paths(params):
    name = path[:-len("/kernel")] if path.endswith("/kernel") else path
    if isinstance(f, fz.LowRank):
      out[f"rank/{name}"] = f.rank
    elif isinstance(f, (fz.Lora, fz.SLTrain)):
      out[f"rank/{name}"] = jnp.asarray(f.rank, jnp.int32)
    elif isinstance(f, fz.Tucker):
      out[f"rank/{name}"] = f.ranks
  return out


def truncation_rank(sigma: jax.Array, tau: float | jax.Array, r_min,
                    r_max) -> jax.Array:
  """Smallest r with ||sigma[r:]||_2 <= tau * ||sigma||_2, clamped.

  This is the rule of DLRT / GeoLoRA / TDLRT with two quirks of the authors'
  code fixed: the tail norm includes every discarded singular value (their
  code drops the last one), and when only the full augmented set meets the
  rule the rank becomes that full size (their code falls back to the old r).

  Args:
    sigma: (k,) singular values in descending order (zeros allowed).
    tau: relative tolerance in [0, 1).
    r_min, r_max: clamps (ints or int arrays).

  Returns:
    () int32 rank in [r_min, r_max].
  """
  s2 = jnp.square(sigma.astype(linalg.work_dtype(sigma)))
  tail = jnp.cumsum(s2[::-1])[::-1]           # tail[j] = sum_{i >= j} s_i^2
  theta2 = jnp.square(tau) * tail[0]
  r = jnp.sum(tail > theta2).astype(jnp.int32)
  return jnp.clip(r, r_min, r_max).astype(jnp.int32)


def map_nodes(fn: Callable, is_node: Callable[[Any], bool], params: Params,
              *rest: Any) -> Any:
  """The integrators' one walk over factor nodes: params is flattened once
  at its factor nodes and leaves, each of `rest` is cut at the same places
  (its parts there may be any subtree: a (K, L, S) tuple, None), and

    fn(i, node, *parts)   for nodes with is_node(node), i counting them in
                          tree order (the index per-node lists use);
    fn(None, x, *parts)   for every other factor node or leaf.

  Returns params' structure holding fn's results."""
  leaves, treedef = jax.tree.flatten(params, is_leaf=fz.is_factor)
  parts = [treedef.flatten_up_to(t) for t in rest]
  out, i = [], 0
  for j, x in enumerate(leaves):
    args = [p[j] for p in parts]
    if is_node(x):
      out.append(fn(i, x, *args))
      i += 1
    else:
      out.append(fn(None, x, *args))
  return jax.tree.unflatten(treedef, out)


def split_tree(params: Params):
  """Replace factor nodes by None: the non-factor leaves (biases, norms,
  dense kernels), for the plain optax chain."""
  return jax.tree.map(lambda x: None if fz.is_factor(x) else x, params,
                      is_leaf=fz.is_factor)


def merge_tree(params: Params, others: Params) -> Params:
  """Put updated non-factor leaves back next to the (unchanged) factors."""
  return jax.tree.map(lambda p, o: p if fz.is_factor(p) else o, params, others,
                      is_leaf=lambda x: fz.is_factor(x) or x is None)


def frozen_mask(params: Params) -> Params:
  """True for leaves no optimizer may change: int leaves (ranks, an
  SLTrain's support), a Lora's W0 and scale, an SLTrain's scale, a
  LowRank's frozen base W0."""
  def node_mask(x):
    if isinstance(x, fz.Lora):
      return fz.Lora(True, False, False, True)
    if isinstance(x, fz.SLTrain):
      return fz.SLTrain(False, False, False, True, True)
    if isinstance(x, fz.LowRank):
      return fz.LowRank(False, False, False, True,
                        None if x.W0 is None else True)
    if isinstance(x, fz.Tucker):
      return fz.Tucker(False, False, False, False, False, True)
    return not is_float(x)
  return jax.tree.map(node_mask, params, is_leaf=fz.is_factor)


def decay_mask(params: Params) -> Params:
  """True where weight decay may act: float leaves that are neither frozen
  nor orthonormal factors (U, V of LowRank; U_i of Tucker)."""
  def node_mask(x):
    if isinstance(x, fz.Lora):
      return fz.Lora(False, True, True, False)
    if isinstance(x, fz.SLTrain):
      return fz.SLTrain(True, True, True, False, False)
    if isinstance(x, fz.LowRank):
      return fz.LowRank(False, True, False, False, None if x.W0 is None else False)
    if isinstance(x, fz.Tucker):
      return fz.Tucker(True, False, False, False, False, False)
    return is_float(x)
  return jax.tree.map(node_mask, params, is_leaf=fz.is_factor)


def masked_apply(tx: optax.GradientTransformation, params, grads, opt_state):
  """One optax update that leaves frozen leaves untouched."""
  updates, opt_state = tx.update(grads, opt_state, params)
  frozen = frozen_mask(params)
  updates = jax.tree.map(lambda u, f: jnp.zeros_like(u) if f else u, updates,
                         frozen)
  return optax.apply_updates(params, updates), opt_state


# --------------------------------------------------------------------------
# Trainable-leaf trees: optax only ever sees float leaves it may change, so
# int rank leaves and frozen bases never enter an optimizer state.
# --------------------------------------------------------------------------


def trainable(params: Params) -> Params:
  """params with frozen / non-float leaves replaced by None."""
  return jax.tree.map(lambda p, f: None if f else p, params,
                      frozen_mask(params))


def restore_frozen(params: Params, new: Params) -> Params:
  """Put the frozen leaves of `params` back into a `trainable` tree."""
  return jax.tree.map(lambda p, f, n: p if f else n, params,
                      frozen_mask(params), new,
                      is_leaf=lambda x: x is None)


def with_weight_decay(tx: optax.GradientTransformation,
                      weight_decay: float) -> optax.GradientTransformation:
  """tx preceded by L2 decay on the leaves `decay_mask` allows (never on
  orthonormal factors); identity wrapper when weight_decay == 0."""
  if not weight_decay:
    return tx
  return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                     tx)


# --------------------------------------------------------------------------
# BUG building blocks on fixed-capacity buffers (see factorizations.lowrank).
# --------------------------------------------------------------------------


column_mask = linalg.column_mask


def orth(X: jax.Array, r, *, near: bool = False) -> jax.Array:
  """Orthonormal basis of the first r columns of X (n, C), the Q of
  X = Q R with diag(R) > 0, columns >= r zeroed (`linalg.orth`; near: X
  is expected nearly orthonormal, a retraction's U + dU)."""
  return linalg.orth(X, r, near=near)


def augment(U: jax.Array, D: jax.Array, r, *, with_block: bool = False):
  """Orthonormal basis of span[U[:, :r] | D[:, :r]] inside C columns.

  U's r columns come first, unchanged (`linalg.extend`), then min(r, C - r)
  new orthonormal directions (the first ones of D when 2r > C, so span(U)
  is always kept); columns after are zero. Callers may then use
  U^^T U = [I; 0] without forming it.

  Args:
    U: (n, C) orthonormal active columns, zero after.
    D: (n, C) new directions (K1 or an update of K); columns >= r are
      ignored.
    r: active rank (int or traced int).

  Returns:
    (n, C) basis U^ with min(2r, C) active columns, in the working dtype
    (float64 for float64 inputs, else float32); with_block=True also the
    new block alone, (n, C // 2) with its columns first (`linalg.extend`).
  """
  return linalg.extend(U, D, r, with_block=with_block)


def truncate(S: jax.Array, *, tau, r_min, r_max, adaptive: bool = True,
             rank=None):
  """SVD truncation of a (C, C) core: the rank rule of `truncation_rank`.

  The SVD is `linalg.core_svd` (the eigenvectors of S^T S where the
  tolerance allows, LAPACK's SVD otherwise), which forms only the left
  vectors of the K = `kept_width` columns the rule can keep.

  Args:
    S: (C, C) augmented core (zero outside its active block).
    tau: relative tolerance.
    r_min, r_max: clamps (r_max is also capped at C).
    adaptive: if False the rank stays `rank` (fixed-rank parallel BUG).
    rank: the fixed rank (used when adaptive is False).

  Returns:
    (P, Q, S_new, r_new): P, Q (C, K) with columns >= r_new zeroed, so the
    new factors are U^ P, V^ Q padded to C columns, and S_new =
    diag(sigma[:r_new]) (C, C), the top-left block P^T S Q.
  """
  C = S.shape[-1]
  K = kept_width(C, r_max, adaptive)
  if adaptive:
    rule = lambda sigma: truncation_rank(sigma, tau, jnp.minimum(r_min, C),
                                         jnp.minimum(r_max, C))
  else:
    rule = lambda sigma: jnp.asarray(rank, jnp.int32)
  P, sigma, Q = linalg.core_svd(S, tau if adaptive else None, rank=rule,
                                width=K)
  r_new = rule(sigma)
  mask = column_mask(r_new, C, sigma.dtype)
  return (P * mask[:K], Q * mask[:K], jnp.diag(sigma * mask), r_new)


def truncated_factors(Uh, Vh, P: jax.Array, Q: jax.Array, S_new: jax.Array,
                      r_new):
  """The factors a truncation leaves, (U^ P, S_new, V^ Q) re-orthonormalized
  where rounding has drifted them (`linalg.polish_diagonal`: the core stays
  diagonal), in the working dtype, and the coordinates (P, Q) with that
  change applied, for the caller's moment maps (U = U^ P exactly as
  returned). They are formed and polished at P's width K (`kept_width`:
  C / 2 in a settled run, where the rounding check then reads half the
  columns and a pass costs a quarter) and padded to Uh's C columns after.
  Uh, Vh: (n, C), (m, C) arrays or `linalg.Extension`s.

  Returns:
    (U, S, V, P, Q): U, V (n, C), (m, C); S (C, C); P, Q (C, K).
  """
  C, K = P.shape
  U, S, V, P, Q = linalg.polish_diagonal(
      linalg.times(Uh, P), jnp.diagonal(S_new)[:K], linalg.times(Vh, Q),
      r_new, P, Q)
  return (pad_columns(U, C), linalg.zero_pad(S, (C, C)), pad_columns(V, C),
          P, Q)


def kept_width(C: int, r_max, adaptive: bool = True) -> int:
  """A static bound on the rank `truncate` keeps from a (C, C) core: r_max
  where it is a Python int and the rank rule applies, else C."""
  if adaptive and isinstance(r_max, int):
    return max(1, min(C, r_max))
  return C


def pad_columns(X: jax.Array, C: int) -> jax.Array:
  """X (n, K) padded with zero columns to (n, C)."""
  return linalg.zero_pad(X, X.shape[:-1] + (C,))


def rank_bounds(f, r_min: int, r_max: int) -> tuple[int, int]:
  """Per-layer clamps: r_max = 0 means floor(min(n, m) / 2); both capped at
  min(n, m) and r_min <= r_max."""
  limit = min(f.shape)
  hi = limit // 2 if not r_max else min(int(r_max), limit)
  hi = max(hi, 1)
  lo = max(1, min(int(r_min), hi))
  return lo, hi


def stop_frozen(params: Params) -> Params:
  """stop_gradient on frozen float leaves (a frozen W0 then costs no
  backward matmul)."""
  return jax.tree.map(
      lambda p, f: jax.lax.stop_gradient(p) if f and is_float(p) else p,
      params, frozen_mask(params))


def is_diagonal(S: jax.Array) -> jax.Array:
  """Whether S is diagonal (exactly: what every truncation leaves)."""
  return jnp.all(S == jnp.diag(jnp.diagonal(S)))


def _diagonal_pinv(d: jax.Array, r, rel_eps: float) -> jax.Array:
  """The pseudo-inverse of diag(d) as a vector: entries below rel_eps * max
  dropped; all-zero d (an adapter's start) gets ones on its first r."""
  a = jnp.abs(d)
  top = jnp.max(a)
  inv = jnp.where(a > rel_eps * top, 1.0 / jnp.where(a > 0, d, 1.0), 0.0)
  return jnp.where(top > 0, inv, column_mask(r, d.shape[-1], d.dtype))


def times_core_inverse(X: jax.Array, S: jax.Array, Y: jax.Array, r,
                       rel_eps: float = 1e-6):
  """(X S^+T, Y S^+) with S^+ = `guarded_inverse(S, r, rel_eps)`: column
  scalings when S is diagonal, under one check and one branch (GeoLoRA's
  gradient scalings g_U S^-T, g_V S^-1)."""
  S = S.astype(linalg.work_dtype(S))

  def scale(X, Y, S, r):
    inv = _diagonal_pinv(jnp.diagonal(S), r, rel_eps)[None, :]
    return X * inv.astype(X.dtype), Y * inv.astype(Y.dtype)

  def general(X, Y, S, r):
    Sinv = guarded_inverse(S, r, rel_eps)
    return X @ Sinv.T.astype(X.dtype), Y @ Sinv.astype(Y.dtype)

  return linalg.cond(is_diagonal(S), scale, general, X, Y, S, jnp.asarray(r))


def guarded_inverse(S: jax.Array, r, rel_eps: float = 1e-6) -> jax.Array:
  """Pseudo-inverse of a (C, C) core: singular values below rel_eps * max
  are dropped; an all-zero core (adapter start) gets the identity on its
  active r x r block.

  A diagonal core (what every truncation leaves) is inverted entrywise; the
  SVD runs only for a general core (lax.cond; GeoLoRA's augmenting step of
  a delayed truncation leaves one, and so does a polish of a core with
  zero values), which saves one C x C SVD per layer and step in GeoLoRA.
  Where the active block fits in C / 2 (r <= C / 2, a settled run) the SVD
  is of that block: an eighth of the C x C one's work.
  """
  C = S.shape[-1]
  H = C // 2
  S = S.astype(linalg.work_dtype(S))

  def pinv(S):
    A, s, Bt = linalg.svd(S)
    inv = jnp.where(s > rel_eps * s[0], 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
    return (Bt.T * inv[None, :]) @ A.T

  def half(S):
    return linalg.zero_pad(pinv(S[:H, :H]), (C, C))

  def general(S, r):      # not diagonal, so not all zero
    if H < 1:
      return pinv(S)
    return linalg.cond(r <= H, half, pinv, S)

  def diagonal(S, r):
    return jnp.diag(_diagonal_pinv(jnp.diagonal(S), r, rel_eps))

  # r is an operand, not closed over: under jax.vmap it is batched.
  return linalg.cond(is_diagonal(S), diagonal, general, S, jnp.asarray(r))


def float_mask(tree: Params) -> Params:
  """True on float leaves. optax transforms that mix leaves (e.g.
  clip_by_global_norm) fail on int rank leaves: wrap them as
  `optax.masked(optax.clip_by_global_norm(c), base.float_mask)`."""
  return jax.tree.map(is_float, tree)


# --------------------------------------------------------------------------
# Narrow passes: LowRank nodes at the width of their active rank.
# --------------------------------------------------------------------------


def times_core(X: jax.Array, S: jax.Array, Y: jax.Array):
  """(X S, Y S^T) (a factorization's K = U S and L = V S^T), as column
  scalings when S is diagonal (what every truncation leaves): n C instead
  of n C^2 work. One check and one branch for both (each branch costs
  XLA's CPU runtime a dispatch of its own)."""

  def scale(X, Y, S):
    d = jnp.diagonal(S)[None, :]
    return X * d.astype(X.dtype), Y * d.astype(Y.dtype)

  def product(X, Y, S):
    return X @ S.astype(X.dtype), Y @ S.T.astype(Y.dtype)

  return linalg.cond(is_diagonal(S), scale, product, X, Y, S)


def _is_lowrank(x) -> bool:
  return isinstance(x, fz.LowRank)


def half_width(params: Params) -> Params:
  """LowRank nodes cut to their first C // 2 columns (the whole active
  block when rank <= C // 2, which `resize` keeps at the start of a step
  of the rank-adaptive methods); other leaves as they are."""
  def cut(x):
    if not _is_lowrank(x):
      return x
    H = x.capacity // 2
    return fz.LowRank(x.U[:, :H], x.S[:H, :H], x.V[:, :H], x.rank, x.W0)
  return jax.tree.map(cut, params, is_leaf=fz.is_factor)


def pad_to(tree, like):
  """Every leaf of `tree` zero-padded (at the end of each axis) to the shape
  of the matching leaf of `like` (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda a, l: linalg.zero_pad(a, l.shape), tree, like)


def fits_half(params: Params):
  """Static: whether any LowRank node can be halved (capacity >= 2);
  traced: whether every LowRank node's rank is <= capacity // 2."""
  nodes = [x for x in jax.tree.leaves(params, is_leaf=fz.is_factor)
           if _is_lowrank(x)]
  if not nodes or any(x.capacity < 2 for x in nodes):
    return False, None
  ok = jnp.all(jnp.stack([x.rank <= x.capacity // 2 for x in nodes]))
  return True, ok


def _has_conv(jaxpr) -> bool:
  """Whether a jaxpr (or any jaxpr nested in its equations) convolves."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      return True
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        sub = getattr(sub, "jaxpr", sub)
        if isinstance(sub, jcore.Jaxpr) and _has_conv(sub):
          return True
  return False


def at_active_width(fn, params: Params, bound=None, then=None):
  """fn(params), computed on `half_width(params)` when every LowRank rank
  fits in half its capacity (the products of the pass then cost half) and
  zero-padded back to the full shapes; else on params itself. fn's outputs
  must depend on a node's columns >= rank only through zeros (true of
  losses and gradients: those columns are zero).

  On the CPU a pass with a convolution is not put inside a branch: XLA's
  CPU backend compiles a convolution there without its fast routine
  (10-14x slower for LeNet5's shapes, benchmarks/README.md). Such a pass
  runs at full width, unless bound(node), a static upper bound on the rank
  a step leaves in the node (the integrator's r_max clamp), fits in half
  the capacity for every node: then the half-width pass runs outside a
  branch and the full-width one only in a branch taken where a rank still
  exceeds half (a state a step of these settings does not leave, e.g. a
  checkpoint of a run with a larger r_max); LeNet5's adaptive KLS step at
  ranks 10 / 25 / 250: median 66.7 vs 71.7 ms alternated in one process.
  Without a convolution lax.cond picks one of the two passes (passing the
  half pass's outputs through a branch copies them: GeoLoRA at n = 4096,
  r = 64, median 81.1 with that form vs 79.6 ms with this one).

  then(out, p), where given, runs on fn's outputs inside each branch, with
  p the params at that branch's width, and returns the result at the full
  width (the half branch's outputs are then not padded here: `then` pads
  where it wants, e.g. right before an elementwise update that takes the
  pad into its own loop). Without it the result is fn's outputs, padded
  in the half branch.
  """
  padded = then is None
  if padded:
    then = lambda out, p: out
  static_ok, ok = fits_half(params)
  if not static_ok:
    return then(fn(params), params)
  full, out_like = jax.make_jaxpr(lambda p: then(fn(p), p),
                                  return_shape=True)(params)
  leaves = jax.tree.leaves(params)

  def half_out(out, p):
    # The half branch's outputs: fn's padded to the full shapes, or then's
    # (which pads where it wants).
    return pad_to(out, out_like) if padded else then(out, p)

  # fn's closure (a batch, possibly vmapped with the params) becomes
  # explicit operands: the branch then stays one under jax.vmap
  # (linalg.cond).
  def run(closed):
    return lambda consts, leaves: jcore.jaxpr_as_fun(
        jcore.ClosedJaxpr(closed.jaxpr, consts))(*leaves)

  if lapack.on_cpu() and _has_conv(full.jaxpr):
    nodes = [x for x in jax.tree.leaves(params, is_leaf=fz.is_factor)
             if _is_lowrank(x)]
    if bound is None or any(int(bound(x)) > x.capacity // 2 for x in nodes):
      return then(fn(params), params)
    halved = half_width(params)
    out = jax.tree.leaves(half_out(fn(halved), halved))
    out = linalg.cond(ok, lambda o, consts, leaves: list(o),
                      lambda o, consts, leaves: run(full)(consts, leaves),
                      out, full.consts, leaves)
    return jax.tree.unflatten(jax.tree.structure(out_like), out)
  # The half-width operands are cut outside the branch: the integrator's
  # own cuts of the same buffers (`linalg.extend`'s U[:, :C/2]) are then
  # the same operations, computed once (GeoLoRA at n = 4096, r = 64: six
  # n x C/2 copies fewer, paired 0.984).
  halved = half_width(params)
  half = jax.make_jaxpr(lambda p: half_out(fn(p), p))(halved)
  out = linalg.cond(ok, lambda c, l: run(half)(c[0], l[0]),
                    lambda c, l: run(full)(c[1], l[1]),
                    (half.consts, full.consts),
                    (jax.tree.leaves(halved), leaves))
  return jax.tree.unflatten(jax.tree.structure(out_like), out)
