"""ReLoRA: LoRA adapters merged into the base weight every k steps.

Every Lora node W = W0 + s B A (`lrtrain.factorizations.lora`) trains A and
B with the optimizer as plain LoRA does (`plain.py`'s 'lora' step). After
every `relora_period`-th step, inside the same jitted step (the step count
is part of the state, so a resumed run merges at the same steps):

  W0 <- W0 + s B A          (in float32; the layer's weight is unchanged)
  A  <- a fresh LoRA draw   (`lora.init_A`, key fold_in(fold_in(seed, j), i)
                             for restart j >= 1 and node i; the seed is
                             state, derived from the initial adapters)
  B  <- 0
  adapter moments: the `relora_prune` fraction of entries of smallest
  magnitude of every optimizer moment of A and B zeroed, per leaf (the
  paper's 99%; 1.0 is a full reset); other moments and counts are kept.

The sum of k-step updates of rank r reaches rank up to (restarts + 1) r
while each step trains r (n + m) parameters per layer. The paper restarts
the learning rate at every merge: `optimizer.schedule='jagged_cosine'`
(`optim.jagged`) with `optimizer.restart_period` equal to
`integrator.relora_period` (`check_config` refuses other periods).

References:
  Lialin, Muckatira, Shivagunde, Rumshisky, "ReLoRA: High-rank training
  through low-rank updates", ICLR 2024.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrtrain import factorizations as fz
from lrtrain.factorizations import lora
from lrtrain.integrators import base
from lrtrain.integrators import linalg
from lrtrain.integrators import plain
from lrtrain.integrators import transport


class ReLoRAState(NamedTuple):
  """opt: optax state on `base.trainable(params)` (plain LoRA's);
  count: () int32 steps taken; key: raw PRNG key data of the restart draws."""
  opt: Any
  count: jax.Array
  key: jax.Array


def _is_lora(x) -> bool:
  return isinstance(x, fz.Lora)


def _check_options(relora_period, relora_prune) -> None:
  if not (isinstance(relora_period, int) and relora_period >= 1):
    raise ValueError(f"relora: integrator.relora_period={relora_period!r} "
                     "must be an integer >= 1 (steps between merges)")
  if not 0.0 <= relora_prune <= 1.0:
    raise ValueError(f"relora: integrator.relora_prune={relora_prune} must "
                     "be in [0, 1] (fraction of adapter moments zeroed at a "
                     "merge; 1 = full reset)")


def check_config(config, *, method: str) -> None:
  """The option ranges, and the learning-rate restarts where the merges are.

  Raises:
    ValueError: naming the config fields.
  """
  del method
  i, o = config.integrator, config.optimizer
  _check_options(i.relora_period, i.relora_prune)
  if o.schedule == "jagged_cosine" and o.restart_period != i.relora_period:
    raise ValueError(
        f"optimizer.restart_period={o.restart_period} must equal "
        f"integrator.relora_period={i.relora_period}: the learning rate "
        "restarts where the adapters merge; set both to the same value")


def restart_seed(params) -> jax.Array:
  """Raw key data for the restart draws, from the bits of the initial A's
  (a uint32 sum, the same in any summation order): a model seed gives its
  own draws. `init` stores it, so a resumed run draws the same."""
  h = jnp.zeros((), jnp.uint32)
  for x in jax.tree.leaves(params, is_leaf=fz.is_factor):
    if _is_lora(x):
      bits = jax.lax.bitcast_convert_type(x.A.astype(jnp.float32), jnp.uint32)
      h = h + jnp.sum(bits, dtype=jnp.uint32)
  return jax.random.key_data(jax.random.fold_in(jax.random.key(0), h))


def merge(params, key: jax.Array, restart) -> Any:
  """Every Lora node merged and restarted: W0 + s B A as the new W0 (in
  float32, cast back), A a fresh `lora.init_A` draw, B = 0; the weight
  W0 + s B A of every layer is unchanged (up to W0's rounding).

  Args:
    params: the params pytree.
    key: raw key data (`restart_seed`).
    restart: () int restart index j (draws of node i use
      fold_in(fold_in(key, j), i)).

  Returns:
    params with every Lora node merged; other leaves as they are.
  """
  base_key = jax.random.fold_in(jax.random.wrap_key_data(key), restart)

  def fn(i, x):
    if i is None:
      return x
    W = lora.materialize(jax.tree.map(lambda a: a.astype(jnp.float32), x))
    A = lora.init_A(jax.random.fold_in(base_key, i), x.rank, x.shape[1],
                    x.A.dtype)
    return fz.Lora(W.astype(x.W0.dtype), A, jnp.zeros_like(x.B), x.scale)

  return base.map_nodes(fn, _is_lora, params)


def prune_smallest(x: jax.Array, fraction: float) -> jax.Array:
  """x with the round(fraction * size) entries of smallest magnitude set to
  0 (ties at the threshold too; the paper's magnitude pruning)."""
  k = int(round(fraction * x.size))
  if k <= 0:
    return x
  if k >= x.size:
    return jnp.zeros_like(x)
  a = jnp.abs(x.astype(jnp.float32))
  threshold = jnp.sort(a.ravel())[k - 1]
  return jnp.where(a > threshold, x, jnp.zeros_like(x))


def prune_adapter_moments(opt_state, params, fraction: float):
  """`prune_smallest` on every moment leaf of a Lora node's A and B in an
  optax state initialised on `base.trainable(params)` (the moment trees
  found by `transport.map_moment_trees`); other leaves kept."""
  like = base.trainable(params)
  adapter = []
  for x in jax.tree.leaves(like, is_leaf=fz.is_factor):
    adapter += [_is_lora(x)] * len(jax.tree.leaves(x))

  def prune(leaves, second):
    del second
    return [prune_smallest(l, fraction) if a else l
            for l, a in zip(leaves, adapter)]

  return transport.map_moment_trees(opt_state, like, prune)


def make(tx: optax.GradientTransformation, *, weight_decay: float = 0.0,
         relora_period: int = 200, relora_prune: float = 0.99
         ) -> base.Integrator:
  """ReLoRA on the Lora nodes of the params.

  Args:
    tx: the optimizer of A, B and the non-factor parameters.
    weight_decay: L2 decay on the leaves `base.decay_mask` allows.
    relora_period: steps between merges (k >= 1).
    relora_prune: fraction of each adapter moment leaf zeroed at a merge
      (by magnitude; 1.0 resets them).

  Returns:
    base.Integrator with the identity resize (shapes never change).

  Raises:
    ValueError: an option out of range.
  """
  _check_options(relora_period, relora_prune)
  inner = plain.make(tx, method="lora", weight_decay=weight_decay)

  def init(params):
    base.require_nodes(params, (fz.Lora,), "relora")
    return ReLoRAState(inner.init(params), jnp.zeros((), jnp.int32),
                       restart_seed(params))

  def restart(params, opt, key, count):
    return (merge(params, key, count // relora_period),
            prune_adapter_moments(opt, params, relora_prune))

  def keep(params, opt, key, count):
    del key, count
    return params, opt

  def step(loss_fn, params, state, batch):
    new, opt, aux = inner.step(loss_fn, params, state.opt, batch)
    count = state.count + 1
    new, opt = linalg.cond(count % relora_period == 0, restart, keep, new, opt,
                           state.key, count)
    return new, ReLoRAState(opt, count, state.key), aux

  return base.Integrator(init, step, base.no_resize, fixed_shape=True)
