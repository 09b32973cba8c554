"""GeoLoRA / parallel BUG: one forward and one backward per step.

For every LowRank node W = U S V^T (+ frozen W0), from one backward pass at W:

  g_K = g_U S^-T ;  g_L = g_V S^-1       (guarded inverse; S = 0 -> I)
  (d_K, d_L, d_S) = opt(g_K, g_L, g_S)   (one optax state, with the other params)
  K1 = U S + d_K ;  L1 = V S^T + d_L ;  S1 = S + d_S
  U^ = [U | U_new], U_new = orth((I - U U^T) d_K) ;  V^ likewise
  S^ = [[ S1,          L1^T V_new ],
        [ U_new^T K1,  0          ]]     (2r x 2r, assembled directly;
                                          Galerkin form in `_core_step`)
  truncate S^ by SVD (base.truncation_rank) -> U = U^ P, V = V^ Q, S = diag(sigma)

With `basis_period` c > 0 the basis step runs every c + 1 iterations and
the steps in between are plain optimizer steps on S (and the other
parameters), as in the authors' fine-tuning runs. With `truncation_delay`
d (1 <= d <= c) the basis step is split as there: the augmenting step keeps
the 2r x 2r core whole (ranks 2r), the optimizer trains it for d steps and
the d-th truncates it (SVD of the trained core, U <- U P, V <- V Q, the
moments mapped); new directions then compete with trained, not
freshly-assembled, singular values. Works for training from
scratch and for fine-tuning (LowRank with W0 and S = 0 at start,
`lowrank.from_dense(W, r, frozen_base=True)`): the first step then only
moves S, since g_U = G V S^T = 0.

`as_transform` gives the same update as an optax GradientTransformation
for use inside `optax.chain` (capacities fixed there; use the Integrator's
`resize` between steps to move buckets).

References:
  Schotthoefer, Zangrando, Ceruti, Tudisco, Kusch, "GeoLoRA: Geometric
  integration for parameter efficient fine-tuning", ICLR 2025.
  Ceruti, Kusch, Lubich, "A parallel rank-adaptive integrator for dynamical
  low-rank approximation", SIAM J. Sci. Comput. 2024.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrtrain import factorizations as fz
from lrtrain.integrators import base
from lrtrain.integrators import buckets
from lrtrain.integrators import linalg
from lrtrain.integrators import transport as tr
from lrtrain.integrators.kls import aligned_maps


# GeoLoRA's second-moment transport rule ('' in make). Not the KLS default
# (transport.DEFAULT_RULE, fresh moments for new directions): with the
# authors' schedule (truncation 37 steps after augmentation) fresh moments
# give every new direction Adam steps of about lr for the whole window, all
# of them survive the truncation and the ranks double each cycle up to
# r_max (adapter setting of experiments/geolora_rank_convergence: 10 of
# the 13 runs measured reached r_max = 128 in a layer); 'squares' keeps
# the band of 9-16 ranks.
TRANSPORT_RULE = "squares"


def _is_lr(x) -> bool:
  return isinstance(x, fz.LowRank)


def opt_tree(params):
  """LowRank -> (K, L, S) = (U S, V S^T, S); other trainable leaves as they
  are; frozen leaves -> None. The tree the optimizer state lives on."""
  return jax.tree.map(
      lambda x: base.times_core(x.U, x.S, x.V) + (x.S,)
      if _is_lr(x) else base.trainable(x),
      params, is_leaf=fz.is_factor)


def grad_tree(params, grads):
  """Factor gradients (g_U, g_S, g_V) -> (g_K, g_L, g_S) per LowRank node."""
  def fix(p, g):
    if not _is_lr(p):
      return base.trainable(g) if fz.is_factor(p) else (
          None if not base.is_float(p) else g)
    return base.times_core_inverse(g.U, p.S, g.V, p.rank) + (g.S,)
  return jax.tree.map(fix, params, grads, is_leaf=fz.is_factor)


class GeoLoRAState(NamedTuple):
  """opt: optax state on `opt_tree`; count: () int32 steps taken."""
  opt: Any
  count: jax.Array


def _update(params, grads, opt_state, tx):
  """tx's (updates, state) from factor gradients: (g_K, g_L, g_S) on the
  tree `opt_tree(params)`."""
  return tx.update(grad_tree(params, grads), opt_state, opt_tree(params))


def _core_step(params, updated, state, *, adaptive, tau, r_min, r_max,
               transport, basis_period, truncation_delay=0,
               transport_rule=TRANSPORT_RULE):
  """New params and state from the optimizer's (updates, state) on
  `opt_tree(params)` (`_update`): the shared step."""
  like = opt_tree(params)
  upd, opt = updated
  moved = optax.apply_updates(like, upd)

  def plain(_):
    # S (and the other parameters) only; the basis stays.
    def fix(p, q, d):
      if _is_lr(p):
        cm = base.column_mask(p.rank, p.capacity, q[2].dtype)
        return dataclasses.replace(p, S=q[2] * cm[:, None] * cm[None, :])
      if fz.is_factor(p):
        return base.restore_frozen(p, q)
      return q if base.is_float(p) else p
    new = jax.tree.map(fix, params, moved, upd, is_leaf=lambda x: fz.is_factor(x)
                       or x is None)
    return new, opt

  def basis(augment, trunc):
    """The basis step: augment [U | U_new] (and the core), truncate the
    core by SVD, or both (the default schedule)."""
    def run(_):
      finals = {}

      def fix(i, p, q, d):
        if i is None:
          if fz.is_factor(p):
            return base.restore_frozen(p, q)
          return q if base.is_float(p) else p
        wd = linalg.work_dtype(p.U)
        C, r = p.capacity, p.rank
        cm = base.column_mask(r, C, wd)
        U, V = p.U.astype(wd), p.V.astype(wd)
        S1 = q[2].astype(wd) * cm[:, None] * cm[None, :]
        if augment:
          # U^ = [U | U_new]: U is kept as U^'s first block (linalg.extend),
          # so M = U^^T U = [I; 0] and N = V^^T V = [I; 0] exactly and the
          # Galerkin core
          #   S^ = U^^T [U S1 V^T + (I - U U^T) K1 V^T + U L1^T (I - V V^T)] V^
          # is the block matrix [[S1, L1^T V_new], [U_new^T K1, 0]].
          # U_new ⟂ U, so U_new^T K1 = U_new^T (U S + d_K) = U_new^T d_K:
          # the new block's coordinates of d_K, which the extension's
          # Cholesky passes leave as their triangular factors (the block
          # is the Q of d_K's projection off U); likewise V_new^T L1.
          # U^ and V^ stay factored (linalg.Extension): the truncation's
          # U^ P forms the new block's share of U in its own product.
          Uh, Tu = linalg.extend(U, d[0].astype(wd), r, factored=True,
                                 with_factor=True)
          Vh, Tv = linalg.extend(V, d[1].astype(wd), r, factored=True,
                                 with_factor=True)
          A = jnp.roll(linalg.zero_pad(Tu, (C, C)), r,
                       axis=0)                   # rows r..: U_new^T K1
          B = jnp.roll(linalg.zero_pad(Tv, (C, C)), r,
                       axis=0)                   # rows r..: V_new^T L1
          nm = 1.0 - cm
          S_hat = (S1 + (A * nm[:, None]) * cm[None, :]
                   + (B * nm[:, None] * cm[None, :]).T)
          r_hat = jnp.minimum(2 * r, C)
        else:          # truncation of the core trained since augmentation
          Uh, Vh, S_hat, r_hat = U, V, S1, r
        if trunc:
          lo, hi = base.rank_bounds(p, r_min, r_max)
          P, Q, S_new, r_new = base.truncate(S_hat, tau=tau, r_min=lo,
                                             r_max=hi, adaptive=adaptive,
                                             rank=r)
          # P, Q: (C, K), K <= C.
          U_new, S_new, V_new, P, Q = base.truncated_factors(
              Uh, Vh, P, Q, S_new, r_new)
          # P^T M = U_new^T U = P^T [I; 0]: the first r rows of P (M = I
          # on the active block without augmentation).
          PM, QN = (P * cm[:, None]).T, (Q * cm[:, None]).T
        else:          # augmented, the core kept whole until truncation
          U_new, V_new = linalg.formed(Uh, C), linalg.formed(Vh, C)
          S_new, r_new = S_hat, r_hat
          PM = QN = jnp.diag(cm)
          U_new, S_new, V_new = linalg.polish(U_new, S_new, V_new, r_new)
        finals[i] = (PM, QN, PM, QN)
        dt = p.dtype
        return fz.LowRank(U_new.astype(dt), S_new.astype(dt), V_new.astype(dt),
                          jnp.asarray(r_new, jnp.int32), p.W0)

      new = base.map_nodes(fix, _is_lr, params, moved, upd)
      # K = W V and L = W^T U follow V and U; S maps like S1: P^T M S1 N^T Q.
      # The maps' columns from the old rank on are zero (P's rows there are
      # masked): the products contract only the old active block.
      maps = aligned_maps(params, lambda i, p: (
          tr.Congruence(None, finals[i][3], padded=True, inner=p.rank),
          tr.Congruence(None, finals[i][2], padded=True, inner=p.rank),
          tr.Congruence(finals[i][0], finals[i][1], padded=True,
                        inner=p.rank)), others=True)
      return new, tr.transport(opt, like, maps, enabled=transport,
                               second_rule=transport_rule)
    return run

  if not basis_period:
    new, opt = basis(True, True)(None)
  else:
    phase = state.count % (basis_period + 1)
    if not truncation_delay:
      new, opt = jax.lax.cond(phase == 0, basis(True, True), plain, None)
    else:
      which = jnp.where(phase == 0, 1, jnp.where(phase == truncation_delay, 2, 0))
      new, opt = jax.lax.switch(which, [plain, basis(True, False),
                                        basis(False, True)], None)
  return new, GeoLoRAState(opt, state.count + 1)


def _check(tau, adaptive, basis_period, truncation_delay):
  if not 0.0 <= tau < 1.0:
    raise ValueError(f"geolora: tau must be in [0, 1), got {tau}")
  if basis_period < 0:
    raise ValueError(f"geolora: basis_period must be >= 0, got {basis_period}")
  if truncation_delay and not 0 < truncation_delay <= basis_period:
    raise ValueError(
        f"geolora: truncation_delay={truncation_delay} needs 0 < "
        f"truncation_delay <= basis_period (got basis_period={basis_period}): "
        "the delayed truncation falls between two augmentations")
  if truncation_delay and not adaptive:
    raise ValueError("geolora: truncation_delay needs adaptive=True (a fixed "
                     "rank is kept by truncating in the augmenting step)")


def in_window(count, basis_period: int, truncation_delay: int) -> bool:
  """The next step (number `count`) starts from an augmented basis not yet
  truncated: its ranks are the augmented 2r, not a truncated r."""
  return bool(truncation_delay) and (
      1 <= int(count) % (basis_period + 1) <= truncation_delay)


def make(tx: optax.GradientTransformation, *, adaptive: bool = True,
         tau: float = 0.1, r_min: int = 2, r_max: int = 0,
         transport: bool = True, transport_rule: str = "", basis_period: int = 0,
         truncation_delay: int = 0, weight_decay: float = 0.0
         ) -> base.Integrator:
  """The GeoLoRA / parallel BUG integrator (one backward pass per step).

  Args:
    tx: optax transformation for d_K, d_L, d_S and the non-factor params.
    adaptive: truncate by `tau`; else keep each layer's rank (fixed-rank
      parallel BUG, still augmenting to 2r inside the step).
    tau: relative truncation tolerance.
    r_min, r_max: rank clamps per layer (r_max = 0: floor(min(n, m) / 2)).
    transport: map optimizer moments across basis changes.
    transport_rule: second-moment rule, one of transport.SECOND_RULES;
      '' = `TRANSPORT_RULE`
      (`transport.Congruence.second`).
    basis_period: c > 0 runs the basis step every c + 1 steps only.
    truncation_delay: d in 1..c splits the basis step of `basis_period` c:
      the augmenting step keeps the whole 2r core (ranks 2r), the inner
      optimizer trains it for d steps, and the d-th truncates it (the
      schedule of the authors' fine-tuning runs, d = int(3 c / 4) there).
      0: augment and truncate in one step.
    weight_decay: L2 decay on K, L, S and non-factor params (never U, V).

  Returns:
    base.Integrator(init, step, resize).

  Raises:
    ValueError: tau outside [0, 1), or a truncation_delay the period does
      not hold.
  """
  _check(tau, adaptive, basis_period, truncation_delay)
  transport_rule = transport_rule or TRANSPORT_RULE
  tr.check_rule(transport_rule, "geolora")
  tx = base.with_weight_decay(tx, weight_decay)
  kw = dict(adaptive=adaptive, tau=tau, r_min=r_min, r_max=r_max,
            transport=transport, basis_period=basis_period,
            truncation_delay=truncation_delay, transport_rule=transport_rule)

  def init(params):
    base.require_nodes(params, (fz.LowRank,), "geolora")
    buckets.require_room(params, "geolora")
    return GeoLoRAState(tx.init(opt_tree(params)), jnp.zeros((), jnp.int32))

  # The rank a step leaves in a node: at most its r_max clamp (inside a
  # truncation window the ranks are the augmented 2r).
  bound = (None if not adaptive or truncation_delay
           else lambda p: base.rank_bounds(p, r_min, r_max)[1])

  def step(loss_fn, params, state, batch):
    # One forward + backward at the active width (r <= C / 2 after resize).
    like = opt_tree(params)

    def then(out, p):
      # g_U S^-T and g_V S^-1 at the pass's width (p: the params there),
      # padded to the buffers and updated inside the pass's branch: the
      # pads then fuse into the update's loops instead of being written
      # out as the branch's outputs (GeoLoRA at n = 4096, r = 64: paired
      # 0.953 and 0.978; 1024/64 0.987, 0.991; 4096/256 1.004).
      g = base.pad_to(grad_tree(p, out[1]), like)
      return out[0], tx.update(g, state.opt, like)

    (loss, aux), updated = base.at_active_width(
        lambda p: base.value_and_grad(loss_fn, base.stop_frozen(p), batch),
        params, bound, then=then)
    new, state = _core_step(params, updated, state, **kw)
    return new, state, {"loss": loss, **aux, **base.rank_aux(new)}

  def resize(params, state):
    # Inside a truncation window the ranks are the augmented 2r: the
    # buffers need no room beyond them until the truncation.
    augmented = (bool(truncation_delay) and state is not None and in_window(
        jax.device_get(state.count), basis_period, truncation_delay))
    plan = buckets.lowrank_plan(params, need=1 if augmented else 2)
    if not buckets.count_moves(plan):
      return params, state, False
    if state is None:                  # before init: the params alone
      return buckets.resize_lowrank(params, plan), None, True

    def per_node(i, p):
      if plan[i] is None:
        return (None, None, None)
      E = buckets.embedding(*plan[i])
      return (tr.Congruence(None, E), tr.Congruence(None, E),
              tr.Congruence(E, E))
    opt = buckets.resize_state(state.opt, opt_tree(params),
                               aligned_maps(params, per_node, others=True))
    return (buckets.resize_lowrank(params, plan),
            GeoLoRAState(opt, state.count), True)

  return base.Integrator(init, step, resize, fixed_shape=not adaptive)


# Orthonormality defect of an incoming basis above which as_transform warns:
# rounding drift stays below about 1e-5 (linalg.polish), a transformation
# that rescales or perturbs the update leaves defects of order its effect.
OFF_MANIFOLD = 1e-3


def _warn(path, defect):
  warnings.warn(
      f"geolora.as_transform: the basis of {path} is off the Stiefel "
      f"manifold (defect {float(defect):.3g}): a transformation after "
      "as_transform in the chain changed its update; as_transform must be "
      "the last transformation of the chain", RuntimeWarning, stacklevel=2)


def _warn_off_manifold(params) -> None:
  """A RuntimeWarning (from inside the compiled step, on the host) for every
  LowRank node whose U or V reaches `update` off the Stiefel manifold: the
  sign that a transformation chained after as_transform changed the
  update. Costs two matrix-vector products per basis."""
  for path, f in fz.factor_paths(params):
    if not _is_lr(f):
      continue
    d = jnp.maximum(linalg.defect_estimate(f.U.astype(jnp.float32), f.rank),
                    linalg.defect_estimate(f.V.astype(jnp.float32), f.rank))
    jax.lax.cond(d > OFF_MANIFOLD,
                 lambda d: jax.debug.callback(functools.partial(_warn, path), d),
                 lambda d: None, d)


def as_transform(tx: optax.GradientTransformation, **kwargs
                 ) -> optax.GradientTransformation:
  """GeoLoRA as an optax GradientTransformation.

  `update(grads, state, params)` returns updates with
  `optax.apply_updates(params, updates)` equal to the integrator's new params
  (int rank leaves included), so it composes inside an optax.chain, e.g.
  `optax.chain(optax.clip_by_global_norm(1.0), geolora.as_transform(tx))`
  on gradients from `base.value_and_grad` (float32 zeros for the int rank
  leaves; jax.grad's float0 leaves break optax's clipping). It must be the
  last transformation of the chain: one after it rescales the update
  U_new - U and leaves U off the Stiefel manifold, which the next `update`
  reports with a RuntimeWarning (`OFF_MANIFOLD`).
  Capacities are fixed inside a chain: bucket them beforehand (the
  Integrator's `resize`), with capacity >= 2r.

  Args:
    tx: inner optax transformation (as in `make`).
    **kwargs: the options of `make`.

  Raises:
    ValueError: params not given to update, or bad options.
  """
  integ = make(tx, **kwargs)  # validates the options
  del integ
  tx_in = base.with_weight_decay(tx, kwargs.pop("weight_decay", 0.0))
  kw = {k: kwargs.get(k, d) for k, d in
        dict(adaptive=True, tau=0.1, r_min=2, r_max=0, transport=True,
             basis_period=0, truncation_delay=0,
             transport_rule="").items()}
  kw["transport_rule"] = kw["transport_rule"] or TRANSPORT_RULE

  def init_fn(params):
    base.require_nodes(params, (fz.LowRank,), "geolora")
    return GeoLoRAState(tx_in.init(opt_tree(params)), jnp.zeros((), jnp.int32))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("geolora.as_transform needs params in update()")
    _warn_off_manifold(params)
    new, state = _core_step(params, _update(params, grads, state.opt, tx_in),
                            state, **kw)
    # Rank leaves move by a float32 difference (a small integer, exact):
    # the dtype of their gradients, so wrappers that pass either one on
    # (apply_if_finite, MultiSteps) see one type; apply_updates casts back.
    updates = jax.tree.map(
        lambda n, p: (n - p).astype(p.dtype if base.is_float(p) else jnp.float32),
        new, params)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)
