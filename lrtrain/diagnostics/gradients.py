"""Gradient stable rank and update-subspace overlap of every layer.

Two measurements that low-rank pretraining studies lean on, for every layer
`find_layers` names (dense kernels and every factorization node):

  grad/<layer>/...    the gradient of the loss with respect to the layer's
                      full weight W (out, in), not its factors: the gradient
                      a dense layer in its place would get. Its stable rank
                      ||G||_F^2 / ||G||_2^2 says how many directions the
                      gradient really has (GaLore's premise: few).
  update/<layer>/...  the weight update over the last diagnostics period,
                      dW = W_t - W_prev, and the overlap of its top-k left
                      singular subspace with that of the period before
                      (ReLoRA's and GaLore's question: does the update keep
                      moving the same directions, or do they rotate?).

The full-weight gradient. The loss is differentiated once, on one batch,
with every layer replaced by a stand-in that the model applies as the dense
weight it represents: a dense kernel stays as it is, a matrix node (LowRank,
Lora, any node type added with `factorizations.register`) becomes a Lora node
with base W = materialize(node) and an empty adapter, a Tucker kernel a
Tucker node with the full kernel as core and identity factors. The gradient
reaching that W (or core) is dL/dW = sum_b g_b^T x_b, the layer's output
gradient times its input, the same for every kind of layer: for a Lora layer
it is the gradient that reaches W0 + s B A, for a LowRank one that of
U S V^T (+ W0), for GaLore's dense kernels the gradient GaLore projects.
The step's own factor gradients (s G A^T, G V S, ...) do not determine G, so
it costs one extra forward and backward pass on dense weights per
diagnostics call, never one per step.

Singular values. A matrix with min(n, m) <= `exact_limit` gets LAPACK's SVD.
A larger one gets block subspace iteration from a fixed Gaussian start
(k + 8 columns, QR between products) with Rayleigh-Ritz values, stopped when
no top-k value moved by more than `tol` s_1 in one iteration or after
`max_iters`; its s_1 is a Ritz value, never above the true one.

References:
  Zhao et al., "GaLore: memory-efficient LLM training by gradient low-rank
  projection", ICML 2024 (low stable rank of gradients).
  Lialin et al., "ReLoRA: high-rank training through low-rank updates",
  ICLR 2024.
  Hu et al., "LoRA: low-rank adaptation of large language models", ICLR 2022
  (the subspace similarity phi used for the overlap).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lrtrain import draws, lapack
from lrtrain import factorizations as fz
from lrtrain.diagnostics import core
from lrtrain.diagnostics import spectral as sp

# Extra columns of the subspace iteration beyond the k values wanted.
OVERSAMPLE = 8


def top_singular(A: jax.Array, k: int, *, vectors: bool = True,
                 exact_limit: int = 256, tol: float = 1e-4,
                 max_iters: int = 50):
  """The k largest singular values of A (n, m) and their left vectors.

  Args:
    A: (n, m) matrix.
    k: values wanted; k' = min(k, n, m) are returned.
    vectors: also return the left singular vectors.
    exact_limit: min(n, m) up to which LAPACK's SVD is used.
    tol: above it, subspace iteration stops when no top-k' Ritz value moves
      by more than tol * s_1 in one iteration.
    max_iters: at most this many iterations (each two products with A).

  Returns:
    (s (k',) descending, Y (n, k') or None).
  """
  n, m = A.shape
  p = min(n, m)
  kk = min(k, p)
  if p <= exact_limit:
    if not vectors:
      return lapack.svd(A, compute_uv=False)[:kk], None
    U, s, _ = lapack.svd(A, full_matrices=False)
    return s[:kk], U[:, :kk]
  q = min(kk + OVERSAMPLE, p)
  qr = lambda X: lapack.qr(X)[0]
  Q = qr(A @ draws.normal(jax.random.key(0), (m, q), A.dtype))

  def ritz(Q):
    """One iteration: Q (n, q) -> the next Q and the Ritz values, the
    singular values of A^T Q (the R of its QR)."""
    Z, R = lapack.qr(A.T @ Q)
    return qr(A @ Z), lapack.svd(R, compute_uv=False)

  def moving(carry):
    _, s, s_old, i = carry
    change = jnp.max(jnp.abs(s[:kk] - s_old[:kk]))
    return (i < max_iters) & ~(change <= tol * s[0])

  def body(carry):
    Q, s, _, i = carry
    Q, s_new = ritz(Q)
    return Q, s_new, s, i + 1

  Q, s = ritz(Q)
  Q, _, _, _ = jax.lax.while_loop(
      moving, body, (Q, s, jnp.full_like(s, jnp.inf), jnp.asarray(1)))
  Ub, s, _ = lapack.svd(Q.T @ A, full_matrices=False)
  return s[:kk], (Q @ Ub[:, :kk] if vectors else None)


def norm_metrics(fro2: jax.Array, s1: jax.Array) -> dict[str, jax.Array]:
  """norm_frobenius, norm_spectral and stable_rank ||A||_F^2 / s_1^2 (nan
  for a zero matrix) from ||A||_F^2 and s_1."""
  return {"norm_frobenius": jnp.sqrt(fro2), "norm_spectral": s1,
          "stable_rank": fro2 / (s1 * s1)}


def overlap(X: jax.Array, xmask: jax.Array, Y: jax.Array,
            ymask: jax.Array) -> jax.Array:
  """||X^T Y||_F^2 / min(i, j) of two orthonormal bases X (n, i'), Y (n, j')
  with i, j active columns (masks): 1 when one subspace contains the
  other, 0 when they are orthogonal, unchanged by a change of basis within
  either; nan when one is empty. The LoRA paper's phi
  (`spectral.subspace_similarity`)."""
  k = max(X.shape[1], Y.shape[1])
  return sp.subspace_similarity(X, xmask, Y, ymask, k)[0]


def _stand_in(x):
  """Layer x as the model is to apply it to use its dense weight: a dense
  kernel as it is; a Tucker kernel as a Tucker node with the full kernel
  (c_out, c_in, kh, kw) as core and identity factors; any matrix node as a
  Lora node with base materialize(x) (n, m) and an empty adapter (scale 0).
  Its shapes do not depend on x's ranks or capacities."""
  if not fz.is_factor(x):
    return x
  W = fz.materialize(x)
  if isinstance(x, fz.Tucker):
    eye = [jnp.eye(d, dtype=W.dtype) for d in W.shape]
    return fz.Tucker(W, *eye, jnp.asarray(W.shape, jnp.int32))
  n, m = W.shape
  return fz.Lora(W, jnp.zeros((1, m), W.dtype), jnp.zeros((n, 1), W.dtype),
                 jnp.zeros((), W.dtype))


def stand_ins(params):
  """params with every layer replaced by its `_stand_in`."""
  return jax.tree.map(_stand_in, params, is_leaf=fz.is_factor)


def _weight(x) -> jax.Array:
  """The dense weight of a stand-in."""
  if not fz.is_factor(x):
    return x
  return x.core if isinstance(x, fz.Tucker) else x.W0


def _with_weight(x, W: jax.Array):
  """The stand-in x with the dense weight W."""
  if not fz.is_factor(x):
    return W
  if isinstance(x, fz.Tucker):
    return dataclasses.replace(x, core=W)
  return dataclasses.replace(x, W0=W)


def _matrix(name: str, x, a: jax.Array) -> jax.Array:
  """An array shaped like stand-in x's weight (the weight or its gradient)
  as the layer's (out, in) float32 matrix: `layer_matrix`'s views, a
  Tucker kernel's conv matrix (as `factorizations.as_matrix`)."""
  if isinstance(x, fz.Tucker):
    a = fz.lowrank.conv_kernel_to_matrix(jnp.transpose(a, (2, 3, 1, 0)))
  elif not fz.is_factor(x):
    a = core.layer_matrix(name, a)
  return a.astype(jnp.float32)


def _layers(stand):
  """(names, leaves, treedef) of a stand-in tree; name None: no layer."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      stand, is_leaf=fz.is_factor)
  names = [core.layer_name(fz.path_str(path), x) for path, x in leaves]
  return names, [x for _, x in leaves], treedef


def _stand_in_grads(loss_fn: Callable, stand, batch) -> dict[str, jax.Array]:
  """{layer: dL/dW (out, in)} of a stand-in tree, W each layer's weight."""
  names, xs, treedef = _layers(stand)
  weights = {n: _weight(x) for n, x in zip(names, xs) if n is not None}

  def loss(weights):
    p = [x if n is None else _with_weight(x, weights[n])
         for n, x in zip(names, xs)]
    return loss_fn(jax.tree.unflatten(treedef, p), batch)[0]

  g = jax.grad(loss)(weights)
  return {n: _matrix(n, x, g[n]) for n, x in zip(names, xs) if n is not None}


def full_weight_grads(loss_fn: Callable, params, batch) -> dict[str, jax.Array]:
  """{layer: dL/dW (out, in), float32}: the gradient of loss_fn(params,
  batch)[0] with respect to every layer's full weight (module docstring)."""
  return _stand_in_grads(loss_fn, stand_ins(params), batch)


def _stand_in_matrices(stand) -> dict[str, jax.Array]:
  """{layer: W (out, in)} of a stand-in tree."""
  names, xs, _ = _layers(stand)
  return {n: _matrix(n, x, _weight(x)) for n, x in zip(names, xs)
          if n is not None}


def _by_shape(mats: dict[str, jax.Array]) -> list[list[str]]:
  """Layer names grouped by matrix shape (each group one vmapped call)."""
  groups = defaultdict(list)
  for name, M in mats.items():
    groups[M.shape].append(name)
  return list(groups.values())


class GradientDiagnostics:
  """grad/<layer>/* and update/<layer>/* keys (docs/diagnostics.md).

  Usage (the runner's diagnostics hook calls it on the diagnostics cadence):
    gd = GradientDiagnostics(loss_fn)
    metrics = gd(params, batch)     # {key: float}

  The gradient is taken at `params` on `batch` (the runner passes the batch
  the next step trains on). The update keys need the weights of the
  previous call, kept here: the first call logs none, the second the
  update's norms, the third on also `overlap`. A new instance (a resumed
  run) starts over.

  Args:
    loss_fn: loss_fn(params, batch) -> (loss, aux).
    gradients: log grad/<layer>/norm_frobenius, norm_spectral, stable_rank.
    updates: log update/<layer>/norm_frobenius, norm_spectral, stable_rank
      and overlap.
    top_k: k of the update subspaces compared by `overlap`.
    exact_limit, tol, max_iters: the SVD / subspace iteration of
      `top_singular`.

  Raises:
    ValueError: top_k < 1.
  """

  def __init__(self, loss_fn: Callable, *, gradients: bool = True,
               updates: bool = True, top_k: int = 8, exact_limit: int = 256,
               tol: float = 1e-4, max_iters: int = 50):
    if top_k < 1:
      raise ValueError(f"diagnostics.update_k must be >= 1, got {top_k}")
    self.gradients, self.updates = bool(gradients), bool(updates)
    self.top_k = int(top_k)
    self._svd = dict(exact_limit=int(exact_limit), tol=float(tol),
                     max_iters=int(max_iters))
    self._loss_fn = loss_fn
    self._prev = None       # (weights, their update's bases) of the last call
    self._placement = None  # where that state lives
    self._calls = 0
    self.num_traces = 0     # of the metrics program (one per model)
    # The layers' dense stand-ins (a small program, traced again when a
    # rank-adaptive method moves a capacity), then one program for every
    # key on them, whose shapes never change.
    self._stand_ins = jax.jit(stand_ins)
    self._jit = jax.jit(self._compute)

  @property
  def needs_batch(self) -> bool:
    return self.gradients

  def __call__(self, params, batch=None) -> dict[str, Any]:
    """The metrics of this call on the host (Python floats)."""
    stand = self._stand_ins(params)
    if self._prev is None:
      # Zeros for the previous weights (the update keys of this call are
      # dropped below), placed with the params' devices; every later state
      # is put where these are, so the main program compiles once.
      self._prev = jax.jit(self._zero_state, keep_unused=True)(stand)
      self._placement = jax.tree.map(lambda x: x.sharding, self._prev)
    out, mats, bases = self._jit(stand, batch, *self._prev)
    self._prev = jax.device_put((mats, bases), self._placement)
    self._calls += 1

    def logged(key):   # an update needs one call before, an overlap two
      return (not key.startswith("update/") or self._calls > 2
              or (self._calls == 2 and not key.endswith("/overlap")))
    return {k: float(v) for k, v in jax.device_get(out).items() if logged(k)}

  # -- traced -----------------------------------------------------------------

  def _zero_state(self, stand):
    """(weights, bases) arguments of `_compute` before any call: zeros."""
    if not self.updates:
      return {}, {}
    mats = _stand_in_matrices(stand)
    k = {n: min(self.top_k, *M.shape) for n, M in mats.items()}
    return ({n: jnp.zeros_like(M) for n, M in mats.items()},
            {n: (jnp.zeros((M.shape[0], k[n]), M.dtype),
                 jnp.zeros(k[n], bool)) for n, M in mats.items()})

  def _compute(self, stand, batch, prev, bases):
    self.num_traces += 1
    out, mats, new_bases = {}, {}, {}
    if self.gradients:
      out.update(self._grad_metrics(stand, batch))
    if self.updates:
      res, mats, new_bases = self._update_metrics(stand, prev, bases)
      out.update(res)
    return out, mats, new_bases

  def _grad_metrics(self, stand, batch):
    grads = _stand_in_grads(self._loss_fn, stand, batch)
    out = {}
    for names in _by_shape(grads):
      G = jnp.stack([grads[n] for n in names])
      s, _ = jax.vmap(lambda A: top_singular(A, 1, vectors=False,
                                             **self._svd))(G)
      res = norm_metrics(jnp.sum(G * G, axis=(1, 2)), s[:, 0])
      for i, n in enumerate(names):
        for key, v in res.items():
          out[f"grad/{n}/{key}"] = v[i]
    return out

  def _update_metrics(self, stand, prev, bases):
    mats = _stand_in_matrices(stand)
    out, new_bases = {}, {}

    def one(D, X, xmask):
      s, Y = top_singular(D, self.top_k, **self._svd)
      ymask = s > sp.default_rtol(D.shape, D.dtype) * s[0]
      res = norm_metrics(jnp.sum(D * D), s[0])
      res["overlap"] = overlap(X, xmask, Y, ymask)
      return res, Y, ymask

    for names in _by_shape(mats):
      D = jnp.stack([mats[n] - prev[n] for n in names])
      X = jnp.stack([bases[n][0] for n in names])
      xmask = jnp.stack([bases[n][1] for n in names])
      res, Y, ymask = jax.vmap(one)(D, X, xmask)
      for i, n in enumerate(names):
        new_bases[n] = (Y[i], ymask[i])
        for key, v in res.items():
          out[f"update/{n}/{key}"] = v[i]
    return out, mats, new_bases

