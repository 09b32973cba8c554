"""The common step contract, the shared truncation rule and tree helpers.

Every method is an `Integrator(init, step, resize)`:

  state = integrator.init(params)
  params, state, aux = integrator.step(loss_fn, params, state, batch)   # jittable
  params, state, changed = integrator.resize(params, state)             # host side

`loss_fn(params, batch) -> (loss, aux_dict)`. `aux` returned by `step`
holds "loss" (the loss at the start of the step), the entries of the loss's
aux dict, and "rank/<path>" for every factor node. `resize` moves capacity
buckets of rank-adaptive methods (a new shape, hence one recompile); it is
the identity for fixed-shape methods.

Integrators know nothing about Flax: they walk the params pytree and act on
factorization nodes (`lrtrain.factorizations.is_factor`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrtrain import factorizations as fz

Params = Any
State = Any
Batch = Any
LossFn = Callable[[Params, Batch], tuple[jax.Array, dict]]


class Integrator(NamedTuple):
  """A training method with the common step contract (module docstring)."""
  init: Callable[[Params], State]
  step: Callable[[LossFn, Params, State, Batch], tuple[Params, State, dict]]
  resize: Callable[[Params, State], tuple[Params, State, bool]]


def no_resize(params, state):
  """`resize` of fixed-shape methods."""
  return params, state, False


def is_float(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def value_and_grad(loss_fn: LossFn, params: Params, batch: Batch):
  """(loss, aux), grads with float leaves differentiated and other leaves
  (int ranks) given zero gradients of their own dtype."""
  (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True, allow_int=True)(
      params, batch)
  g = jax.tree.map(
      lambda gi, p: jnp.zeros_like(p) if not is_float(p) else gi, g, params)
  return (loss, aux), g


def rank_aux(params: Params) -> dict[str, jax.Array]:
  """{"rank/<path>": active rank} for every LowRank/Lora/Tucker node."""
  out = {}
  for path, f in fz.factor_paths(params):
    name = path[:-len("/kernel")] if path.endswith("/kernel") else path
    if isinstance(f, fz.LowRank):
      out[f"rank/{name}"] = f.rank
    elif isinstance(f, fz.Lora):
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
  s2 = jnp.square(sigma.astype(jnp.float32))
  tail = jnp.cumsum(s2[::-1])[::-1]           # tail[j] = sum_{i >= j} s_i^2
  theta2 = jnp.square(tau) * tail[0]
  r = jnp.sum(tail > theta2).astype(jnp.int32)
  return jnp.clip(r, r_min, r_max).astype(jnp.int32)


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
  """True for leaves no optimizer may change: int leaves (ranks), a Lora's
  W0 and scale, a LowRank's frozen base W0."""
  def node_mask(x):
    if isinstance(x, fz.Lora):
      return fz.Lora(True, False, False, True)
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
