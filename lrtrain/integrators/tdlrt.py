"""TDLRT: the rank-adaptive Tucker BUG integrator (and its order-2 case).

A Tucker kernel C = S x1 U1 x2 U2 x3 U3 x4 U4 (lrtrain.factorizations.tucker,
modes (out, in, kh, kw)) is trained by a basis-update & Galerkin step per
mode followed by a per-mode (HOSVD) truncation. One step:

  backward 1 at the current point -> g_S, g_U1..g_U4 (and every other leaf)
  for each moving mode i:
    Mat_i(S) = P_i diag(s_i) R_i^T (SVD)  ->  S_i = P_i diag(s_i), Q_i = R_i
    K_i = U_i S_i ;  g_K_i = g_U_i S_i^-T = g_U_i P_i diag(1 / s_i)   (guarded)
    K_i <- opt_K(K_i, g_K_i)
    adaptive: U^_i = orth[U_i | K_i] (2 r_i columns) ; fixed: U^_i = orth(K_i)
    M_i = U^_i^T U_i
  S^ = S x_i M_i                                     (Galerkin initial value)
  backward 2 at (S^, U^) -> g_S^ (and the non-factor parameters)
  S^ <- opt_S(S^, g_S^)
  adaptive, per moving mode i: P_i, s_i = svd(Mat_i(S^)); r_i = truncation
    rank of s_i (base.truncation_rank, clamped to [r_min, r_max]);
    U_i <- U^_i P_i[:, :r_i] ;  S <- S^ x_i P_i[:, :r_i]^T

Why g_K_i = g_U_i S_i^-T: with W_i the Kronecker product of the other
factors, Mat_i(C) = U_i Mat_i(S) W_i^T = K_i Q_i^T W_i^T, so
g_K_i = Mat_i(G) W_i Q_i while g_U_i = Mat_i(G) W_i Mat_i(S)^T = g_K_i S_i^T.
With the SVD choice of S_i the inverse is a division by singular values,
guarded by a relative cutoff (`rcond`); a zero singular value only loses a
direction that S cannot reach anyway. tests/integrators_tdlrt_test.py checks
the formula against the gradient of the explicit K-parametrisation.

Moving modes: the channel modes (out, in) always; the spatial modes (kh,
kw) only with `adapt_spatial=True`, otherwise their factors and ranks stay
as built (usually full, U = I). LowRank nodes in the same model (e.g.
fully connected layers) are the order-2 case of the same step (core S,
factors U, V, one shared rank; the truncation is the matrix SVD of
`base.truncate`), so one model trains with one integrator and two backward
passes. Non-factor parameters update in the second (core) sub-step, as in
DLRT. Other factor nodes (Lora) go through the core sub-step's optimizer
as plain parameters.

Factors live in fixed-capacity buffers (ranks as arrays, inactive columns
and core slices zero), so the whole step, truncation included, is one
compiled program; `resize` moves per-mode capacities between power-of-two
buckets on the host (`buckets.target_capacity`, need = 2 so augmentation
fits). With `transport=True` the optimizer moments of the core follow each
basis change (m <- m x_i M_i, then m <- m x_i P_i^T) and the moments of K_i
follow its column coordinates W_i Q_i from one step to the next.

References:
  Zangrando, Schotthoefer, Ceruti, Kusch, Tudisco, "Geometry-aware training
  of factorized layers in tensor Tucker format", NeurIPS 2024.
  Ceruti, Lubich, Walach, "Time integration of tree tensor networks", SIAM
  J. Numer. Anal. 2021 (the Tucker BUG).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrtrain import factorizations as fz
from lrtrain.factorizations import tucker as tk
from lrtrain.integrators import base
from lrtrain.integrators import buckets
from lrtrain.integrators import linalg
from lrtrain.integrators import transport as tr

RCOND = 1e-4


# --------------------------------------------------------------------------
# Generic views: a LowRank is the order-2 Tucker (core S, factors U, V).
# --------------------------------------------------------------------------


def _handled(x) -> bool:
  return isinstance(x, (fz.LowRank, fz.Tucker))


def view(x):
  """(core, [U_i], ranks (N,) int32) of a LowRank (N = 2) or Tucker (N = 4)."""
  if isinstance(x, fz.LowRank):
    return x.S, [x.U, x.V], jnp.stack([x.rank, x.rank]).astype(jnp.int32)
  return x.core, list(x.factors), x.ranks.astype(jnp.int32)


def rebuild(x, core, Us, ranks):
  """Inverse of `view`: a node of x's type (LowRank keeps its W0)."""
  if isinstance(x, fz.LowRank):
    return fz.LowRank(Us[0], core, Us[1], jnp.asarray(ranks[0], jnp.int32),
                      x.W0)
  return fz.Tucker(core, *Us, jnp.asarray(ranks, jnp.int32))


def moving_modes(x, adapt_spatial: bool) -> tuple[bool, ...]:
  """Which modes get a basis update: both for LowRank; the channel modes
  (and the spatial ones if adapt_spatial) for Tucker."""
  if isinstance(x, fz.LowRank):
    return (True, True)
  return (True, True, adapt_spatial, adapt_spatial)


def core_mask(ranks, caps: Sequence[int]) -> jax.Array:
  """Ones on the active block of an order-N core with capacities caps."""
  out = jnp.ones((), jnp.float32)
  for i, c in enumerate(caps):
    shape = [1] * len(caps)
    shape[i] = c
    out = out * base.column_mask(ranks[i], c).reshape(shape)
  return out


def _mode_svd(core: jax.Array, i: int):
  """P (C_i, C_i), s (C_i,), R (prod others, C_i) with Mat_i(core) = P s R^T
  (the unfolding is zero-padded to at least C_i columns)."""
  M = tk.unfold(core.astype(jnp.float32), i)
  C, k = M.shape
  if k < C:
    M = linalg.zero_pad(M, (M.shape[0], C))
  P, s, Rt = linalg.svd(M, full_matrices=False)
  return P, s, Rt.T[:k]


def _inv(s: jax.Array, rcond: float) -> jax.Array:
  """1 / s where s > rcond * max(s), else 0."""
  ok = s > rcond * s[0]
  return jnp.where(ok, 1.0 / jnp.where(ok, s, 1.0), 0.0)


# --------------------------------------------------------------------------
# The pieces of one step, on one node (public for tests and reuse).
# --------------------------------------------------------------------------


def k_factors(x, gx, moving, rcond: float = RCOND):
  """K_i = U_i S_i and g_K_i = g_U_i S_i^-T for the moving modes.

  Args:
    x: LowRank or Tucker node.
    gx: its gradient (same type, from one backward pass).
    moving: per-mode flags (`moving_modes`).
    rcond: relative cutoff of the guarded inverse.

  Returns:
    (Ks, gKs, Rs): lists with an entry per mode (None where not moving);
    K_i, g_K_i are (d_i, C_i) with columns >= r_i zero; R_i (prod of the
    other capacities, C_i) are the column coordinates Q_i.
  """
  core, Us, r = view(x)
  # Only the factor gradients are read (the rank leaf may be float0).
  gUs = [gx.U, gx.V] if isinstance(gx, fz.LowRank) else list(gx.factors)
  caps = core.shape
  core = core.astype(jnp.float32) * core_mask(r, caps)
  Ks, gKs, Rs = [], [], []
  for i, mv in enumerate(moving):
    if not mv:
      Ks.append(None), gKs.append(None), Rs.append(None)
      continue
    P, s, R = _mode_svd(core, i)
    cm = base.column_mask(r[i], caps[i])
    U = Us[i].astype(jnp.float32)
    Ks.append((U @ P) * s * cm)
    gKs.append((gUs[i].astype(jnp.float32) @ P) * _inv(s, rcond) * cm)
    Rs.append(R)
  return Ks, gKs, Rs


def basis_step(x, Ks, moving, *, adaptive: bool = True):
  """Augmented (or rotated) bases and the Galerkin core S^ = S x_i M_i.

  Args:
    x: LowRank or Tucker node.
    Ks: per-mode K_i after the optimizer step (None where not moving).
    moving: per-mode flags.
    adaptive: orth[U_i | K_i] (up to 2 r_i columns) instead of orth(K_i).

  Returns:
    (x_aug, Ms): the node in the new bases with ranks min(2 r_i, C_i)
    (adaptive) and the per-mode M_i = U^_i^T U_i (None where not moving).
    Where span(U^_i) contains span(U_i) the kernel is unchanged.
  """
  core, Us, r = view(x)
  caps = core.shape
  dt = core.dtype
  Uh, Ms, rh = [], [], []
  for i, mv in enumerate(moving):
    if not mv:
      Uh.append(Us[i]), Ms.append(None), rh.append(r[i])
      continue
    K = Ks[i] * base.column_mask(r[i], caps[i])
    if adaptive:
      U_new = base.augment(Us[i], K, r[i])
      rh.append(jnp.minimum(2 * r[i], caps[i]))
    else:
      U_new = base.orth(K, r[i])
      rh.append(r[i])
    Ms.append(U_new.T @ Us[i].astype(jnp.float32))
    Uh.append(U_new.astype(Us[i].dtype))
  S0 = tr.ModeMaps(Ms).first(core.astype(jnp.float32) * core_mask(r, caps))
  rh = jnp.stack([jnp.asarray(v, jnp.int32) for v in rh])
  return rebuild(x, S0.astype(dt), Uh, rh), Ms


def mode_bounds(x, moving, r_min: int, r_max: int) -> list[tuple[int, int]]:
  """Static (lo, hi) rank clamps per mode. r_max = 0 means floor(d_i / 2)
  for channel modes (and LowRank: floor(min(n, m) / 2)) and d_i for
  spatial modes; everything is capped by d_i."""
  if isinstance(x, fz.LowRank):
    b = base.rank_bounds(x, r_min, r_max)
    return [b, b]
  out = []
  for i, d in enumerate(x.shape):
    hi = (d // 2 if i < 2 else d) if not r_max else min(int(r_max), d)
    hi = max(hi, 1)
    out.append((max(1, min(int(r_min), hi)), hi))
  return out


def truncate_node(x, moving, bounds, *, tau: float):
  """Per-mode truncation of an augmented node by the shared rule.

  Args:
    x: LowRank or Tucker node (after the core step, augmented ranks).
    moving: per-mode flags (only these modes truncate).
    bounds: per-mode (lo, hi) clamps (`mode_bounds`); hi is also capped by
      the capacity.
    tau: relative tolerance: r_i is the smallest rank with
      ||s_i[r_i:]|| <= tau ||s_i||, s_i the singular values of Mat_i(S).

  Returns:
    (x_new, Ps): the truncated node and the per-mode P_i (C_i, C_i), columns
    >= r_i zero (None where not moving); S_new = S x_i P_i^T.
  """
  core, Us, r = view(x)
  caps = core.shape
  dt = core.dtype
  S = core.astype(jnp.float32) * core_mask(r, caps)
  if isinstance(x, fz.LowRank):
    lo, hi = bounds[0]
    P, Q, S_new, r_new = base.truncate(S, tau=tau, r_min=min(lo, caps[0]),
                                       r_max=min(hi, caps[0]))
    Ps = [base.pad_columns(P, caps[0]), base.pad_columns(Q, caps[1])]
    rn = jnp.stack([r_new, r_new])
  else:
    Ps, rn = [], []
    for i, mv in enumerate(moving):
      if not mv:
        Ps.append(None), rn.append(r[i])
        continue
      P, s, _ = _mode_svd(S, i)
      lo, hi = bounds[i]
      ri = base.truncation_rank(s, tau, min(lo, caps[i]), min(hi, caps[i]))
      Ps.append(P * base.column_mask(ri, caps[i]))
      rn.append(ri)
    rn = jnp.stack([jnp.asarray(v, jnp.int32) for v in rn])
    S_new = tr.ModeMaps([None if P is None else P.T for P in Ps]).first(S)
  Us_new = [U if P is None else (U.astype(jnp.float32) @ P).astype(U.dtype)
            for U, P in zip(Us, Ps)]
  # Bound the rounding drift of the factors (they stay the first blocks of
  # the next augmented bases): U_i = U_i' R_i, S <- S x_i R_i.
  Rs, moved = [], []
  for i, (U, P) in enumerate(zip(Us_new, Ps)):
    if P is None:
      Rs.append(None)
      continue
    U2, R, ran = linalg.polish_basis(U, rn[i], with_flag=True)
    Us_new[i] = U2.astype(U.dtype)
    Rs.append(R.astype(jnp.float32))
    moved.append(ran)
  # The mode products with R only in the steps where a pass ran (R = I
  # otherwise), as in `linalg.polish`.
  modes = [i for i, R in enumerate(Rs) if R is not None]

  def apply(S, *Rk):
    maps = [None] * len(Rs)
    for i, R in zip(modes, Rk):
      maps[i] = R
    return tr.ModeMaps(maps).first(S)

  S_new = S_new.astype(jnp.float32)
  if modes:
    S_new = linalg.cond(jnp.any(jnp.stack(moved)), apply, lambda S, *Rk: S,
                        S_new, *[Rs[i] for i in modes])
  return rebuild(x, S_new.astype(dt), Us_new, rn), Ps


def _k_coordinate_map(R_old, R_new, Us_old, Us_new, i: int, caps):
  """B_new^T B_old for the K_i column coordinates B = (other factors) R."""
  others = [j for j in range(len(caps)) if j != i]
  T = R_old.reshape(*[caps[j] for j in others], caps[i])
  for a, j in enumerate(others):
    N = Us_new[j].astype(jnp.float32).T @ Us_old[j].astype(jnp.float32)
    T = tk.mode_product(T, N, a)
  return R_new.T @ T.reshape(-1, caps[i])


# --------------------------------------------------------------------------
# Trees the two optimizers act on.
# --------------------------------------------------------------------------


class _Opaque:
  """A pytree leaf holding anything (keeps maps aligned with tree leaves)."""

  def __init__(self, v):
    self.v = v


def s_tree(params):
  """Handled nodes -> core; other trainable leaves as they are."""
  return base.trainable(jax.tree.map(
      lambda x: view(x)[0] if _handled(x) else x, params,
      is_leaf=fz.is_factor))


def _merge_s(params, st):
  def fix(p, s):
    if _handled(p):
      core, Us, r = view(p)
      return rebuild(p, s, Us, r)
    if fz.is_factor(p):
      return base.restore_frozen(p, s)
    return p if s is None else s
  return jax.tree.map(fix, params, st,
                      is_leaf=lambda x: fz.is_factor(x) or x is None)


def _s_maps(params, per_node):
  """One map per leaf of `s_tree`: per_node(i) for the i-th node's core."""
  def fn(i, x):
    if i is not None:
      return _Opaque(per_node(i))
    return jax.tree.map(lambda _: _Opaque(None), base.trainable(x))
  return [o.v for o in jax.tree.leaves(base.map_nodes(fn, _handled, params))]


def _k_maps(params, moving_of, per_mode):
  """One map per leaf of the K tree: per_mode(i, mode)."""
  def fn(i, x):
    if i is None:
      return None
    return tuple(_Opaque(per_mode(i, j)) if mv else None
                 for j, mv in enumerate(moving_of(x)))
  return [o.v for o in jax.tree.leaves(base.map_nodes(fn, _handled, params))]


class TDLRTState(NamedTuple):
  """k: optax state of the K sub-steps (tree: node -> tuple of K_i / None);
  s: optax state of the core sub-step and the non-factor parameters."""
  k: Any
  s: Any


def make(tx: optax.GradientTransformation, *, adaptive: bool = True,
         tau: float = 0.1, r_min: int = 2, r_max: int = 0,
         adapt_spatial: bool = False, transport: bool = True,
         weight_decay: float = 0.0,
         k_tx: optax.GradientTransformation | None = None,
         rcond: float = RCOND) -> base.Integrator:
  """The Tucker BUG integrator (TDLRT) for Tucker and LowRank nodes.

  Costs two forward + two backward passes per step, SVDs of the mode
  unfoldings of the cores and QRs of d_i x 2 r_i matrices.

  Args:
    tx: optax transformation for the core sub-step and all non-factor
      parameters (and for the K_i unless `k_tx` is given).
    adaptive: augment to 2 r_i and truncate by `tau`; else fixed ranks.
    tau: relative truncation tolerance per mode.
    r_min, r_max: per-mode rank clamps (r_max = 0: see `mode_bounds`).
    adapt_spatial: also update / truncate the spatial modes of Tucker nodes.
    transport: map optimizer moments across basis changes.
    weight_decay: L2 decay on cores and non-factor parameters (never on
      the orthonormal factors, never on K).
    k_tx: a separate optimizer for the K sub-steps.
    rcond: relative cutoff of the guarded S_i^-1.

  Returns:
    base.Integrator(init, step, resize).

  Raises:
    ValueError: tau outside [0, 1).

  References:
    Zangrando et al., "Geometry-aware training of factorized layers in
    tensor Tucker format", NeurIPS 2024.
  """
  if not 0.0 <= tau < 1.0:
    raise ValueError(f"tdlrt: tau must be in [0, 1), got {tau}")
  tx_k = tx if k_tx is None else k_tx
  # Decay on cores and non-factor leaves (base.decay_mask), never the U_i.
  tx_s = base.with_weight_decay(tx, weight_decay)
  moving_of = lambda x: moving_modes(x, adapt_spatial)

  def k_like(params):
    def fn(i, x):
      if i is None:
        return None
      _, Us, _ = view(x)
      return tuple(jnp.zeros(U.shape, jnp.float32) if mv else None
                   for U, mv in zip(Us, moving_of(x)))
    return base.map_nodes(fn, _handled, params)

  def init(params):
    base.require_nodes(params, (fz.LowRank, fz.Tucker), "tdlrt")
    return TDLRTState(tx_k.init(k_like(params)), tx_s.init(s_tree(params)))

  def step(loss_fn, params, state, batch):
    nodes = [x for x in jax.tree.leaves(params, is_leaf=fz.is_factor)
             if _handled(x)]
    # --- Backward 1: factor gradients -> K_i and their gradients. ---
    (loss, aux), g = base.value_and_grad(loss_fn, params, batch)
    gnodes = [x for x in jax.tree.leaves(g, is_leaf=fz.is_factor)
              if _handled(x)]
    kinfo = [k_factors(x, gx, moving_of(x), rcond)
             for x, gx in zip(nodes, gnodes)]
    pick = lambda idx: (lambda i, x: None if i is None else tuple(
        kinfo[i][idx][j] if mv else None
        for j, mv in enumerate(moving_of(x))))
    K0 = base.map_nodes(pick(0), _handled, params)
    gK = base.map_nodes(pick(1), _handled, params)
    upd, k_state = tx_k.update(gK, state.k, K0)
    K1 = optax.apply_updates(K0, upd)
    # Regroup the K leaves per node (leaf order = node order, then modes).
    k_leaves = iter(jax.tree.leaves(K1))
    K1_nodes = [[next(k_leaves) if mv else None for mv in moving_of(x)]
                for x in nodes]

    # --- Basis update and Galerkin initial value. ---
    augs = [basis_step(x, k, moving_of(x), adaptive=adaptive)
            for x, k in zip(nodes, K1_nodes)]
    it = iter(augs)
    aug = jax.tree.map(lambda x: next(it)[0] if _handled(x) else x, params,
                       is_leaf=fz.is_factor)
    s_state = tr.transport(state.s, s_tree(params),
                           _s_maps(params, lambda i: tr.ModeMaps(augs[i][1])),
                           enabled=transport)

    # --- Backward 2: core (and non-factor) sub-step. ---
    s0 = s_tree(aug)
    (_, _), g_s = jax.value_and_grad(
        lambda st: loss_fn(_merge_s(aug, st), batch), has_aux=True)(s0)
    upd, s_state = tx_s.update(g_s, s_state, s0)
    s1 = optax.apply_updates(s0, upd)
    stepped = _merge_s(aug, s1)

    # --- Truncation. ---
    snodes = [x for x in jax.tree.leaves(stepped, is_leaf=fz.is_factor)
              if _handled(x)]
    if adaptive:
      outs = [truncate_node(q, moving_of(p), mode_bounds(p, moving_of(p),
                                                         r_min, r_max),
                            tau=tau)
              for p, q in zip(nodes, snodes)]
      s_state = tr.transport(
          s_state, s0, _s_maps(params, lambda i: tr.ModeMaps(
              [None if P is None else P.T for P in outs[i][1]])),
          enabled=transport)
      finals = [o[0] for o in outs]
    else:
      finals = []
      for q in snodes:
        core, Us, r = view(q)
        finals.append(rebuild(q, (core * core_mask(r, core.shape)).astype(
            core.dtype), Us, r))
    it = iter(finals)
    new_params = jax.tree.map(lambda x: next(it) if _handled(x) else x,
                              stepped, is_leaf=fz.is_factor)

    # --- K moments follow the K_i column coordinates. ---
    if transport:
      def kmap(i, j):
        old_core, old_Us, _ = view(nodes[i])
        new_core, new_Us, new_r = view(finals[i])
        caps = old_core.shape
        _, _, R_new = _mode_svd(new_core.astype(jnp.float32)
                                * core_mask(new_r, caps), j)
        B = _k_coordinate_map(kinfo[i][2][j], R_new, old_Us, new_Us, j, caps)
        return tr.Congruence(None, B)
      k_state = tr.transport(k_state, K0, _k_maps(params, moving_of, kmap))

    out = {"loss": loss, **aux, **base.rank_aux(new_params)}
    return new_params, TDLRTState(k_state, s_state), out

  def resize(params, state):
    if not adaptive:
      return params, state, False
    plans = []
    for x in jax.tree.leaves(params, is_leaf=fz.is_factor):
      if not _handled(x):
        continue
      core, Us, r = view(x)
      r = np.asarray(r)
      plan = []
      for i, (U, mv) in enumerate(zip(Us, moving_of(x))):
        C = core.shape[i]
        limit = min(x.shape) if isinstance(x, fz.LowRank) else U.shape[0]
        new = buckets.target_capacity(int(r[i]), C, limit, 2) if mv else C
        plan.append(None if new == C else buckets.embedding(C, new))
      plans.append(plan)
    if not any(E is not None for plan in plans for E in plan):
      return params, state, False
    if state is not None:              # None: before init, the params alone
      k = tr.transport(state.k, k_like(params), _k_maps(
          params, moving_of,
          lambda i, j: None if plans[i][j] is None else tr.Congruence(
              None, plans[i][j])))
      s = tr.transport(state.s, s_tree(params),
                       _s_maps(params, lambda i: tr.ModeMaps(plans[i])))
      state = TDLRTState(k, s)

    it = iter(plans)

    def fix(x):
      if not _handled(x):
        return x
      plan = next(it)
      core, Us, r = view(x)
      core = tr.ModeMaps(plan).first(core)
      Us = [U if E is None else (U.astype(jnp.float32) @ E.T).astype(U.dtype)
            for U, E in zip(Us, plan)]
      return rebuild(x, core, Us, r)
    return jax.tree.map(fix, params, is_leaf=fz.is_factor), state, True

  return base.Integrator(init, step, resize, fixed_shape=not adaptive)
