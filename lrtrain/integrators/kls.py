"""DLRT: the KLS / rank-adaptive BUG integrator for LowRank layers.

One step for every LowRank node W = U S V^T (+ W0) at once:

  K0 = U S ;  L0 = V S^T
  g_K = G V ;  g_L = G^T U                       (backward pass 1, at W)
  K1 = opt_KL(K0, g_K) ;  L1 = opt_KL(L0, g_L)
  adaptive: U^ = orth[U | K1] (2r columns) ;  fixed: U^ = orth(K1)   (same for V)
  M = U^^T U ;  N = V^^T V ;  S^0 = M S N^T      (Galerkin initial value)
  g_S = U^^T G^ V^                               (backward pass 2, at U^ S^0 V^^T)
  S^1 = opt_S(S^0, g_S)        (non-factor parameters update here too)
  adaptive: P diag(sigma) Q^T = svd(S^1), r1 = truncation_rank(sigma),
            U = U^ P[:, :r1], V = V^ Q[:, :r1], S = diag(sigma[:r1])

Two backward passes instead of the paper's three: g_K and g_L are taken at
the same point W, so one backward through a node whose value is

  x V (K - U S)^T + (x L) U^T     (U, V, S constant; = x W^T at K = U S, L = V S^T)

gives both exactly (d/dK = G V, d/dL = G^T U, no S^-1). This is
mathematically identical to the three-pass scheme of the paper. At that
point the value is x V K^T, and a custom VJP (`_kl_product`) gives the
three derivatives in the products of a plain LowRank backward pass.

The truncation fixes two quirks of the reference code (see
`base.truncation_rank`): the tail norm includes every discarded value and
the rank may grow to the full augmented size 2r. Factors live in
fixed-capacity buffers (rank as an array, masked columns) so the whole step,
truncation included, is one compiled program; `resize` moves capacity
between power-of-two buckets on the host (`buckets`). K/L and S (+ other
parameters) have separate optimizer states so stateful optimizers count
their steps right; with `transport=True` the moments are mapped across each
basis change (`transport`).

References:
  Schotthoefer, Zangrando, Kusch, Ceruti, Tudisco, "Low-rank lottery tickets:
  finding efficient low-rank neural networks via matrix differential
  equations", NeurIPS 2022.
  Ceruti, Lubich, "An unconventional robust integrator for dynamical
  low-rank approximation", BIT 2022; Ceruti, Kusch, Lubich, "A rank-adaptive
  robust integrator for dynamical low-rank approximation", BIT 2022.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrtrain import factorizations as fz
from lrtrain.factorizations import lowrank
from lrtrain.integrators import base
from lrtrain.integrators import buckets
from lrtrain.integrators import linalg
from lrtrain.integrators import transport as tr


# --------------------------------------------------------------------------
# The K/L evaluation node.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KLNode(fz.lowrank.FactorShape):
  """LowRank layer evaluated as a function of K and L (U, S, V constant).

  Field order starts like LowRank (U, S, V, rank, W0) so code comparing
  leaf shapes pairwise with a LowRank (Flax's param shape check) accepts it.

  probes: None; for a node applied to an input, zeros (px, py, pa, pb)
  shaped like the layer's input x, its output, dY U and x V, through which
  the backward pass hands out those four (x, dY, dY U, x V:
  `_one_pass_core_gradient`); for a materialized node, (pw,) zeros shaped
  like W, which receives the loss's gradient G with respect to W; tag:
  the node's index.
  """
  U: jax.Array
  S: jax.Array
  V: jax.Array
  rank: jax.Array
  W0: jax.Array | None
  K: jax.Array
  L: jax.Array
  probes: tuple | None = None
  tag: int = -1


jax.tree_util.register_dataclass(
    KLNode, data_fields=["U", "S", "V", "rank", "W0", "K", "L", "probes"],
    meta_fields=["tag"])


@jax.custom_vjp
def _kl_product(x, U, S, V, K, L, probes):
  """x W^T for W = (K - U S) V^T + U L^T at the point the KL pass evaluates,
  K = U S and L = V S^T (`kl_tree`), where W = K V^T: x V K^T, two products
  of the active width. The backward pass gives the exact derivatives of the
  general expression at that point in four products (three at the active
  width and one of the core's size), the cost of a plain LowRank layer's
  backward pass:

    d/dK = G V = dY^T (x V) ;  d/dL = G^T U = x^T (dY U) ;
    d/dx = dY W = ((dY U) S) V^T.

  The general expression, evaluated as written, costs four products
  forward and six backward. probes (None, or zeros (px, pa, pb)) receive
  x, dY U and x V as their cotangents: values read out of the backward
  pass."""
  del probes
  return (x @ V) @ K.T


def _kl_product_fwd(x, U, S, V, K, L, probes):
  xV = x @ V
  return xV @ K.T, (x, xV, U, S, V, L, probes)


def _kl_product_bwd(res, dy):
  x, xV, U, S, V, L, probes = res
  a = dy @ U
  flat = lambda t: t.reshape(-1, t.shape[-1])
  g_K = lowrank.batch_contract(flat(dy), flat(xV))
  g_L = lowrank.batch_contract(flat(x), flat(a))
  dx = (a @ S) @ V.T
  zero = jnp.zeros_like
  return (dx.astype(x.dtype), zero(U), zero(S), zero(V), g_K,
          g_L.astype(L.dtype), None if probes is None else tuple(
              v.astype(p.dtype) for v, p in zip((x, a, xV), probes)))


_kl_product.defvjp(_kl_product_fwd, _kl_product_bwd)

# While not None: (tag, input ShapeDtypeStruct or None for a materialized
# use) of every KLNode use, recorded by `_single_inputs` at trace time.
_USES: list | None = None


def _kl_apply(f: KLNode, x: jax.Array) -> jax.Array:
  """x (..., m) -> x W^T with W = (K - U S) V^T + U L^T (+ W0), for
  K = U S and L = V S^T (`_kl_product`)."""
  if _USES is not None:
    _USES.append((f.tag, jax.ShapeDtypeStruct(x.shape, x.dtype)))
  px, py, pa, pb = f.probes or (None,) * 4
  y = _kl_product(x, f.U, f.S, f.V, f.K, f.L,
                  None if f.probes is None else (px, pa, pb))
  if py is not None:
    y = y + py
  return y if f.W0 is None else y + x @ f.W0.T


def _kl_materialize(f: KLNode) -> jax.Array:
  if _USES is not None:
    _USES.append((f.tag, None))
  W = (f.K - f.U @ f.S) @ f.V.T + f.U @ f.L.T
  if f.probes is not None:
    W = W + f.probes[0]
  return W if f.W0 is None else W + f.W0


fz.register(KLNode, types.SimpleNamespace(
    apply=_kl_apply, materialize=_kl_materialize,
    num_params=lambda f, train=True: fz.lowrank.num_params(
        fz.LowRank(f.U, f.S, f.V, f.rank, f.W0), train)))


def _kl_nodes(params, kl, probes=None):
  """LowRank node i -> KLNode with (K, L) = kl's i-th pair, probes[i] (or
  no probes) and tag i; everything else as it is."""
  def node(i, p, k):
    if i is None:
      return p
    return KLNode(p.U, p.S, p.V, p.rank, p.W0, k[0], k[1],
                  None if probes is None else probes[i], i)
  return base.map_nodes(node, _is_lr, params, kl)


def _single_inputs(loss_fn, params, batch):
  """Per LowRank node, in node order, its (input, output)
  ShapeDtypeStructs, or None where the loss materializes the node (as XLA's
  convolution routine does), when the loss uses every LowRank node exactly
  once (an MLP, a transformer, a conv net); None when a node is used twice
  or not at all. Traces the loss once abstractly."""
  global _USES
  nodes = _lr_nodes(params)
  if not nodes:
    return None

  _USES = []
  try:
    jax.eval_shape(lambda p: loss_fn(_kl_nodes(p, kl_tree(p)), batch), params)
    uses = _USES
  finally:
    _USES = None
  if sorted(t for t, _ in uses) != list(range(len(nodes))):
    return None
  x = dict(uses)
  return [None if x[i] is None else (
      x[i], jax.ShapeDtypeStruct(x[i].shape[:-1] + (n.shape[0],),
                                 jnp.result_type(x[i].dtype, n.U.dtype)))
          for i, n in enumerate(nodes)]


def _probes(inputs, node):
  """Zero probes for a node: (px, py, pa, pb) where `inputs` is its input x
  and output y (ShapeDtypeStructs) at the node's width in this pass, (pw,)
  shaped like W where it is None (a materialized node)."""
  if inputs is None:
    return (jnp.zeros(node.shape, node.dtype),)
  x, y = inputs
  lead, C = x.shape[:-1], node.capacity
  return (jnp.zeros(x.shape, x.dtype), jnp.zeros(y.shape, y.dtype),
          jnp.zeros(lead + (C,), jnp.result_type(y.dtype, node.U.dtype)),
          jnp.zeros(lead + (C,), jnp.result_type(x.dtype, node.V.dtype)))


def _one_pass_core_gradient(x, dy, a, b, Qb, Pb, r):
  """g_S = U^^T G V^ with G = dY^T x (summed over the batch): the S
  sub-step's gradient at U^ S^0 V^^T, which is the point the K/L pass
  evaluated (U, V are the first blocks of U^, V^ and S^0 = S), from that
  pass's layer input x, output cotangent dY, a = dY U and b = x V:
  (dY U^)^T (x V^) with dY U^ = [a | dY Q] and x V^ = [b | x P], the new
  blocks Q (Qb) and P (Pb) at columns r .. of U^, V^ (`linalg.extend`'s
  block). Two products at the new blocks' width per layer."""
  flat = lambda t: t.reshape(-1, t.shape[-1])
  wd = Qb.dtype
  C = a.shape[-1]

  def place(Z):          # Z (N, H) -> (N, C) with Z's columns at r ..
    return jnp.roll(linalg.zero_pad(Z, (Z.shape[0], C)), r, axis=1)

  A = flat(a).astype(wd) + place(flat(dy).astype(wd) @ Qb)
  B = flat(b).astype(wd) + place(flat(x).astype(wd) @ Pb)
  return A.T @ B


# --------------------------------------------------------------------------
# Trees the two optimizers act on.
# --------------------------------------------------------------------------


def _is_lr(x) -> bool:
  return isinstance(x, fz.LowRank)


def _lr_nodes(params) -> list:
  """The LowRank nodes of a params tree, in node (tag) order."""
  return [x for x in jax.tree.leaves(params, is_leaf=fz.is_factor) if _is_lr(x)]


def kl_tree(params):
  """LowRank nodes -> (K, L) = (U S, V S^T); everything else -> None."""
  return jax.tree.map(
      lambda x: base.times_core(x.U, x.S, x.V) if _is_lr(x) else None, params,
      is_leaf=fz.is_factor)


def s_tree(params):
  """LowRank nodes -> S; other trainable leaves as they are; frozen -> None."""
  return base.trainable(jax.tree.map(
      lambda x: x.S if _is_lr(x) else x, params, is_leaf=fz.is_factor))


def _merge_s(params, st):
  """Inverse of `s_tree`: new S into the nodes, new non-factor leaves."""
  def fix(p, s):
    if _is_lr(p):
      return dataclasses.replace(p, S=s)
    if fz.is_factor(p):
      return base.restore_frozen(p, s)
    return p if s is None else s
  return jax.tree.map(fix, params, st, is_leaf=lambda x: fz.is_factor(x)
                      or x is None)


class _Opaque:
  """A pytree leaf holding anything (keeps maps aligned with tree leaves)."""

  def __init__(self, v):
    self.v = v


def aligned_maps(params, per_node, *, others: bool):
  """One map per leaf of `kl_tree` (others=False) or `s_tree` (others=True):
  `per_node(i, node)` gives the tuple of maps of the i-th LowRank node."""
  def fix(i, x):
    if i is not None:
      return tuple(_Opaque(m) for m in per_node(i, x))
    if not others:
      return None
    return jax.tree.map(lambda _: _Opaque(None), base.trainable(x))
  tree = base.map_nodes(fix, _is_lr, params)
  return [o.v for o in jax.tree.leaves(tree)]


# --------------------------------------------------------------------------
# The integrator.
# --------------------------------------------------------------------------


class KLSState(NamedTuple):
  """kl: optax state of the K/L sub-step (tree `kl_tree`);
  s: optax state of the S sub-step and non-factor parameters (tree `s_tree`)."""
  kl: Any
  s: Any


def make(tx: optax.GradientTransformation, *, adaptive: bool = True,
         tau: float = 0.1, r_min: int = 2, r_max: int = 0,
         transport: bool = True, transport_rule: str = "", weight_decay: float = 0.0,
         kl_tx: optax.GradientTransformation | None = None) -> base.Integrator:
  """The KLS (fixed rank) or rank-adaptive BUG integrator (DLRT).

  Costs two forward + two backward passes per step (see module docstring).

  Args:
    tx: optax transformation for the S sub-step and all non-factor
      parameters (and for K, L unless `kl_tx` is given).
    adaptive: augment to 2r and truncate by `tau`; else fixed rank (no
      augmentation, capacity = rank suffices).
    tau: relative truncation tolerance (||sigma_tail|| <= tau ||sigma||).
    r_min, r_max: rank clamps per layer (r_max = 0: floor(min(n, m) / 2)).
    transport: map optimizer moments across basis changes.
    transport_rule: second-moment rule, one of transport.SECOND_RULES;
      '' = transport.DEFAULT_RULE
      (`transport.Congruence.second`).
    weight_decay: L2 decay on S and non-factor parameters (never U, V).
    kl_tx: a separate optimizer for the K/L sub-step.

  Returns:
    base.Integrator(init, step, resize).

  Raises:
    ValueError: tau outside [0, 1), an unknown transport_rule.
  """
  if not 0.0 <= tau < 1.0:
    raise ValueError(f"kls: tau must be in [0, 1), got {tau}")
  transport_rule = transport_rule or tr.DEFAULT_RULE
  tr.check_rule(transport_rule, "kls")
  tx_s = base.with_weight_decay(tx, weight_decay)
  tx_kl = tx if kl_tx is None else kl_tx
  # The rank a step leaves in a node: at most its r_max clamp.
  bound = (lambda p: base.rank_bounds(p, r_min, r_max)[1]) if adaptive else None

  def init(params):
    base.require_nodes(params, (fz.LowRank,), "kls")
    if adaptive:
      buckets.require_room(params, "kls")
    return KLSState(tx_kl.init(kl_tree(params)), tx_s.init(s_tree(params)))

  def step(loss_fn, params, state, batch):
    # --- K and L sub-steps: one backward pass through KLNode. ---
    # At the active width when r <= C / 2 (rank-adaptive, after resize).
    # Rank-adaptive with every node applied once to an input: the same pass
    # also gives the non-factor gradients and each node's input and output
    # cotangent, from which the S sub-step's gradient follows without a
    # second pass (`_one_pass_core_gradient`).
    inputs = _single_inputs(loss_fn, params, batch) if adaptive else None

    def kl_pass(view):
      kl0 = kl_tree(view)
      const = jax.lax.stop_gradient(view)

      def kl_loss(kl, st, probes):
        p = const if st is None else _merge_s(const, st)
        return loss_fn(_kl_nodes(p, kl, probes), batch)

      if inputs is None:
        (loss, aux), g = jax.value_and_grad(kl_loss, has_aux=True)(
            kl0, None, None)
        return ((loss, aux), g, None, None), kl0
      probes = [_probes(xy, node) for xy, node in zip(inputs, _lr_nodes(view))]
      (loss, aux), g = jax.value_and_grad(kl_loss, (0, 1, 2), has_aux=True)(
          kl0, s_tree(view), probes)
      return ((loss, aux),) + g, kl0

    # The K/L update runs inside the pass's branch at the buffers' width:
    # the half branch's pads of the gradients and of K0, L0 then fuse into
    # the update's loops instead of being written out as the branch's
    # outputs (adaptive KLS, paired, (n, r) = (4096, 64): 0.967, 0.966;
    # (1024, 64): 0.987, 0.988; (1024, 256): 0.987; (4096, 256): 1.004;
    # LeNet5: 1.005).
    full = jax.eval_shape(kl_pass, params)    # the outputs at full width

    def then(out, p):
      (loss_aux, g, g_s, g_p), k0 = out
      k0 = base.pad_to(k0, full[1])
      upd, st = tx_kl.update(base.pad_to(g, full[0][1]), state.kl, k0)
      return ((loss_aux, base.pad_to(g_s, full[0][2]),
               base.pad_to(g_p, full[0][3])),
              optax.apply_updates(k0, upd), st)

    ((loss, aux), g_st, g_probes), kl1, kl_state = base.at_active_width(
        kl_pass, params, bound, then=then)
    kl0 = full[1]                     # shapes, for the moment transport

    # --- Basis augmentation and Galerkin initial value. ---
    bases = {}

    def new_basis(i, p, k):
      C = p.capacity
      r = p.rank
      wd = linalg.work_dtype(p.U)
      # Columns >= r of K1, L1 are ignored by augment / orth (no mask here).
      K1, L1 = k[0].astype(wd), k[1].astype(wd)
      if adaptive:
        # U and V stay the first blocks of U^, V^: M = U^^T U = [I; 0] and
        # N likewise, so S^0 = M S N^T = S and the moments need no map.
        Uh, Qb = base.augment(p.U, K1, r, with_block=True)
        Vh, Pb = base.augment(p.V, L1, r, with_block=True)
        r_aug = jnp.minimum(2 * r, C)
        M = N = None
        S0 = p.S.astype(wd)
      else:
        Uh, Vh, r_aug = base.orth(K1, r), base.orth(L1, r), r
        M = Uh.T @ p.U.astype(wd)
        N = Vh.T @ p.V.astype(wd)
        S0 = M @ p.S.astype(wd) @ N.T
      bases[i] = (Uh, Vh, M, N, r_aug) + ((Qb, Pb, r) if adaptive else ())
      dt = p.dtype
      return fz.LowRank(Uh.astype(dt), S0.astype(dt), Vh.astype(dt),
                        r_aug.astype(jnp.int32), p.W0)

    aug = base.map_nodes(
        lambda i, p, k: p if i is None else new_basis(i, p, k), _is_lr,
        params, kl1)

    s_like = s_tree(params)
    s_state = tr.transport(
        state.s, s_like,
        aligned_maps(params, lambda i, p: (
            None if adaptive else tr.Congruence(bases[i][2], bases[i][3]),),
            others=True),
        enabled=transport, second_rule=transport_rule)

    # --- S sub-step (and non-factor parameters). ---
    s0 = s_tree(aug)
    if g_probes is None:               # backward pass 2
      def s_loss(st):
        return loss_fn(_merge_s(aug, st), batch)

      (_, _), g_s = jax.value_and_grad(s_loss, has_aux=True)(s0)
    else:
      def core_gradient(i, g):
        if len(g_probes[i]) == 1:    # materialized: G = dL/dW from its probe
          Uh, Vh = bases[i][:2]
          return (Uh.T @ (g_probes[i][0].astype(Uh.dtype) @ Vh)).astype(g.dtype)
        return _one_pass_core_gradient(*g_probes[i], *bases[i][5:]).astype(
            g.dtype)

      g_s = base.map_nodes(lambda i, p, g: g if i is None else core_gradient(
          i, g), _is_lr, params, g_st)
    upd, s_state = tx_s.update(g_s, s_state, s0)
    s1 = optax.apply_updates(s0, upd)
    stepped = _merge_s(aug, s1)

    # --- Truncation (adaptive) and moment transport. ---
    finals = {}

    def finish(i, p, q):
      Uh, Vh, M, N, r_aug = bases[i][:5]
      dt = q.dtype
      C = q.capacity
      wd = Uh.dtype
      am = base.column_mask(r_aug, C, wd)
      S1 = q.S.astype(wd) * am[:, None] * am[None, :]
      lo, hi = base.rank_bounds(q, r_min, r_max)
      if adaptive:
        # P, Q: (C, K), K the most columns the rule can keep (C / 2 in a
        # settled run): the products and maps below run at that width.
        P, Q, S_new, r_new = base.truncate(S1, tau=tau, r_min=lo, r_max=hi)
        U_new, S_new, V_new, P, Q = base.truncated_factors(
            Uh, Vh, P, Q, S_new, r_new)
        # U_new^T U = P^T U^^T U = P^T [I; 0]: P's first r rows.
        cm = base.column_mask(p.rank, C, wd)[:, None]
        to_old = ((P * cm).T, (Q * cm).T)
      else:
        P = Q = None
        S_new, r_new, U_new, V_new = S1, p.rank, Uh, Vh
        to_old = (M, N)
      finals[i] = (P, Q) + to_old
      return fz.LowRank(U_new.astype(dt), S_new.astype(dt), V_new.astype(dt),
                        jnp.asarray(r_new, jnp.int32), p.W0)

    new_params = base.map_nodes(
        lambda i, p, q: q if i is None else finish(i, p, q), _is_lr,
        params, stepped)

    if adaptive:
      s_state = tr.transport(
          s_state, s0,
          aligned_maps(params, lambda i, p: (tr.Congruence(
              finals[i][0].T, finals[i][1].T, padded=True),), others=True),
          enabled=transport, second_rule=transport_rule)
    # K = W V and L = W^T U: their column coordinates follow V and U.
    kl_state = tr.transport(
        kl_state, kl0,
        aligned_maps(params, lambda i, p: (
            tr.Congruence(None, finals[i][3], padded=True,
                          inner=p.rank if adaptive else None),
            tr.Congruence(None, finals[i][2], padded=True,
                          inner=p.rank if adaptive else None)),
            others=False),
        enabled=transport, second_rule=transport_rule)

    out = {"loss": loss, **aux, **base.rank_aux(new_params)}
    return new_params, KLSState(kl_state, s_state), out

  def resize(params, state):
    if not adaptive:
      return params, state, False
    plan = buckets.lowrank_plan(params, need=2)
    if not buckets.count_moves(plan):
      return params, state, False
    if state is None:                  # before init: the params alone
      return buckets.resize_lowrank(params, plan), None, True

    def emb(i, kind):
      move = plan[i]
      if move is None:
        return None
      E = buckets.embedding(*move)
      return tr.Congruence(E, E) if kind == "core" else tr.Congruence(None, E)

    kl = buckets.resize_state(
        state.kl, kl_tree(params),
        aligned_maps(params, lambda i, p: (emb(i, "cols"), emb(i, "cols")),
                     others=False))
    s = buckets.resize_state(
        state.s, s_tree(params),
        aligned_maps(params, lambda i, p: (emb(i, "core"),), others=True))
    return buckets.resize_lowrank(params, plan), KLSState(kl, s), True

  return base.Integrator(init, step, resize, fixed_shape=not adaptive)
