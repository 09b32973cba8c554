"""CondLR: fixed-rank training with (approximate) orthonormal constraints.

Every LowRank node W = U S V^T is trained at a fixed rank r on the Stiefel
manifolds of U and V, while the core S is kept well conditioned, so that
kappa(W) = kappa(S) stays below 1 + tau (or exactly 1). One step:

  G-grads g_U, g_S, g_V from one backward pass
  g_U <- c (I - U U^T) g_U ;  g_V <- c (I - V V^T) g_V ;  g_S unchanged
       c = 1 / a                           ("mean", a = ||S||_F^2 / r)
       c = (sigma_min(S) / sigma_max(S))^2  ("approx_orth")
  U, V, S (and every non-factor parameter) <- optax step
  U, V <- QR retraction (diag(R) > 0)
  "mean":        S <- sqrt(a) * polar(S)                          kappa(S) = 1
  "approx_orth": u diag(s) v^T = svd(S), mu = mean(s),
                 e = mu (kappa - 1) / (kappa + 1), kappa = 1 + tau,
                 S <- u diag(clip(s, mu - e, mu + e)) v^T          kappa(S) <= kappa

With c = 1 / a the U, V directions are exactly the projected gradient flow
dU = -(I - UU^T) G V S^-1 when S = sqrt(a) * orthogonal (docs/design.md,
"CondLR's step"), so the stiffness of S^-1 never appears. orth(S) is the polar
factor (the orthogonal matrix nearest to S), which keeps ||S||_F.

Factors live in fixed-capacity buffers: columns >= rank of U, V and the
part of S outside its leading r x r block are zero and stay zero (every
update is masked). The SVDs of S act on S + lambda (I - diag(mask)), a block
diagonal matrix whose inactive block lambda I is separated from the active
one, so the singular vectors of the active block never leak into the
inactive coordinates even when the active block is singular. Weight decay,
if any, acts on S and the non-factor parameters, never on U, V. Lora and
Tucker nodes in the same model are trained by the plain optax step (their
frozen leaves untouched).

References:
  Savostianova, Zangrando, Ceruti, Tudisco, "Robust low-rank training via
  approximate orthonormal constraints", NeurIPS 2023.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from lrtrain import factorizations as fz
from lrtrain import lapack
from lrtrain.integrators import base
from lrtrain.integrators import linalg

VARIANTS = ("mean", "approx_orth")

# Value of the inactive diagonal block in the masked SVDs (any positive
# number separates it from the active block; see module docstring).
_INACTIVE = 1.0


def condlr_rank(n: int, m: int, cr: float) -> int:
  """Rank r = ceil((1 - cr) * min(n, m)) for a compression ratio cr.

  Args:
    n, m: matrix shape.
    cr: compression ratio in [0, 1) (the paper uses 0.5 and 0.8).

  Returns:
    The rank, at least 1.

  Raises:
    ValueError: cr outside [0, 1).
  """
  if not 0.0 <= cr < 1.0:
    raise ValueError(f"condlr_rank: cr must be in [0, 1), got {cr}")
  # Round first: (1 - 0.8) * 100 = 20.000000000000004 must give 20, not 21.
  return max(1, math.ceil(round((1.0 - cr) * min(n, m), 9)))


def tangent_project(U: jax.Array, G: jax.Array, rank) -> jax.Array:
  """(I - U U^T) G on the active columns (columns >= rank zeroed).

  Args:
    U: (n, C) orthonormal active columns, zero inactive columns.
    G: (n, C) gradient with respect to U.
    rank: active rank.

  Returns:
    (n, C) projected gradient; U^T result = 0.
  """
  mask = base.column_mask(rank, U.shape[-1], G.dtype)
  return (G - U @ (U.T @ G)) * mask


def grad_scale(S: jax.Array, rank, variant: str) -> jax.Array:
  """The factor c that multiplies the projected U, V gradients.

  Args:
    S: (C, C) core, zero outside its active (rank, rank) block.
    rank: active rank r.
    variant: "mean" (c = r / ||S||_F^2) or "approx_orth"
      (c = (sigma_min / sigma_max)^2 of the active block).

  Returns:
    () float32 scale.
  """
  S32 = S.astype(jnp.float32)
  r = jnp.maximum(rank, 1).astype(jnp.float32)
  if variant == "mean":
    a = jnp.sum(jnp.square(S32)) / r
    return 1.0 / jnp.maximum(a, jnp.finfo(jnp.float32).tiny)
  # Squared singular values of the zero-padded core from the (cheaper)
  # symmetric eigensolver, ascending: the active ones are the top r. Only a
  # step-size factor depends on them, so the squaring's loss of relative
  # accuracy in tiny values does not matter.
  C = S.shape[-1]
  ev = jnp.maximum(lapack.eigvalsh(S32.T @ S32), 0.0)
  big = ev[-1]
  small = ev[C - jnp.clip(rank, 1, C)]
  return jnp.where(big > 0, small / jnp.where(big > 0, big, 1.0), 1.0)


# Smallest ratio sigma_min^2 / sigma_max^2 of the active core for which
# `condition_core` takes the eigenvectors of S^T S instead of the SVD.
EIGEN_ROUTE_MIN = 0.25


def condition_core(S: jax.Array, rank, variant: str, tau: float) -> jax.Array:
  """The S step of CondLR: make kappa(S) = 1 ("mean") or <= 1 + tau.

  The new core is a function of the old one, S' = S g(S^T S) with
  g(sigma^2) = sigma' / sigma for every singular value: sqrt(a) / sigma
  ("mean"), clip(sigma, mu - e, mu + e) / sigma ("approx_orth"). Where the
  active block is well conditioned (sigma_min^2 / sigma_max^2 >=
  `EIGEN_ROUTE_MIN`, every step after the first once the cores are
  conditioned) g comes from the symmetric eigensolver of S^T S (C = 256:
  4.7 ms against 7.8 for the SVD, one thread); its rounding error is then
  about u kappa^2 relative, and g is smooth, so (near-)equal values that
  leave the eigenvectors undetermined do not matter. Elsewhere the SVD.

  Args:
    S: (C, C) core, zero outside its active block.
    rank: active rank r.
    variant: "mean" or "approx_orth".
    tau: kappa = 1 + tau for "approx_orth".

  Returns:
    (C, C) conditioned core, zero outside its active block, same dtype.
  """
  C = S.shape[-1]
  m = base.column_mask(rank, C)
  r = jnp.maximum(rank, 1).astype(jnp.float32)
  Sm = S.astype(jnp.float32) * m[:, None] * m[None, :]

  def target(s, mu):
    """sigma' for the values s of a core whose active values average mu."""
    if variant == "mean":
      return jnp.full_like(s, jnp.sqrt(jnp.sum(jnp.square(Sm)) / r))
    e = mu * tau / (2.0 + tau)            # mu (kappa - 1) / (kappa + 1)
    return jnp.clip(s, mu - e, mu + e)

  # Ascending eigenvalues: the inactive block's zeros first, the active
  # values the top r.
  lam, W = lapack.eigh(Sm.T @ Sm)
  active = jnp.arange(C) >= C - jnp.clip(rank, 1, C)
  low = jnp.min(jnp.where(active, lam, jnp.inf))
  well = (low >= EIGEN_ROUTE_MIN * lam[-1]) & (lam[-1] > 0)

  def by_eigen(Sm, lam, W):
    s = jnp.where(active, jnp.sqrt(jnp.maximum(lam, 0.0)), 1.0)
    g = jnp.where(active, target(s, jnp.sum(jnp.where(active, s, 0.0)) / r)
                  / s, 0.0)
    return Sm @ ((W * g[None, :]) @ W.T)

  def by_svd(Sm, lam, W):
    # The inactive block replaced by _INACTIVE * I (module docstring): its
    # C - r values are _INACTIVE.
    u, s, vt = linalg.svd(Sm + jnp.diag((1.0 - m) * _INACTIVE))
    mu = (jnp.sum(s) - (C - r) * _INACTIVE) / r
    return (u * target(s, mu)[None, :]) @ vt

  S_new = linalg.cond(well, by_eigen, by_svd, Sm, lam, W)
  return (S_new * m[:, None] * m[None, :]).astype(S.dtype)


def _is_lr(x) -> bool:
  return isinstance(x, fz.LowRank)


def make(tx: optax.GradientTransformation, *, variant: str = "approx_orth",
         kappa_tau: float = 0.1, weight_decay: float = 0.0) -> base.Integrator:
  """The CondLR integrator (fixed rank, conditioned cores).

  Args:
    tx: optax transformation for U, V, S and all non-factor parameters
      (the paper uses SGD with momentum).
    variant: "mean" (kappa(S) = 1) or "approx_orth" (kappa(S) <= 1 + tau).
    kappa_tau: tau in kappa = 1 + tau (the paper's kappa flag is 1.1 or 1.5).
    weight_decay: L2 decay added to the gradients of S and the non-factor
      parameters (never U, V).

  Returns:
    base.Integrator(init, step, resize); resize is the identity (fixed
    rank, capacity = rank is enough).

  Raises:
    ValueError: unknown variant or negative kappa_tau.

  References:
    Savostianova et al., "Robust low-rank training via approximate
    orthonormal constraints", NeurIPS 2023.
  """
  if variant not in VARIANTS:
    raise ValueError(f"condlr: variant must be one of {VARIANTS}, got "
                     f"{variant!r}")
  if kappa_tau < 0:
    raise ValueError(f"condlr: kappa_tau must be >= 0, got {kappa_tau}")
  tx = base.with_weight_decay(tx, weight_decay)   # after the projection

  def init(params):
    base.require_nodes(params, (fz.LowRank,), "condlr")
    return tx.init(base.trainable(params))

  def project(params, grads):
    """Tangent projection and scaling of the U, V gradients."""
    def fix(i, p, g):
      if i is None:
        return g
      c = grad_scale(p.S, p.rank, variant).astype(g.U.dtype)
      mask = base.column_mask(p.rank, p.capacity, g.S.dtype)
      return dataclasses.replace(
          g, U=c * tangent_project(p.U, g.U, p.rank),
          V=c * tangent_project(p.V, g.V, p.rank),
          S=g.S * mask[:, None] * mask[None, :])
    return base.map_nodes(fix, _is_lr, params, grads)

  def retract(i, p):
    """QR retraction of U, V and the conditioning of S."""
    if i is None:
      return p
    dt = p.dtype
    return dataclasses.replace(
        p, U=base.orth(p.U, p.rank, near=True).astype(dt),
        V=base.orth(p.V, p.rank, near=True).astype(dt),
        S=condition_core(p.S, p.rank, variant, kappa_tau))

  def step(loss_fn, params, state, batch):
    (loss, aux), grads = base.value_and_grad(loss_fn, params, batch)
    grads = project(params, grads)
    t = base.trainable(params)
    upd, state = tx.update(base.trainable(grads), state, t)
    stepped = base.restore_frozen(params, optax.apply_updates(t, upd))
    new_params = base.map_nodes(retract, _is_lr, stepped)
    return new_params, state, {"loss": loss, **aux,
                               **base.rank_aux(new_params)}

  return base.Integrator(init, step, base.no_resize, fixed_shape=True)
