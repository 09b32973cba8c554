"""Baselines through the common step contract: plain optax on the parameters.

  dense    dense kernels trained with `tx`
  factors  `tx` directly on the factors U, S, V of LowRank nodes (no
           manifold constraint: U, V drift off orthonormality; the DLRT
           paper's "vanilla" baseline)
  lora     `tx` on A and B of Lora nodes (W0 and the scale frozen)
  galore   GaLore: `tx` runs in a low-rank projection of each 2-D gradient
           (optax.contrib.scale_by_galore with `tx` as its base optimizer)

All of them touch only trainable float leaves (`base.trainable`): int rank
leaves and frozen bases never enter the optimizer state. The optional
weight decay acts through `base.decay_mask` (never U, V; K/L do not exist
here). One forward and one backward pass per step.

References:
  Hu et al., "LoRA: Low-rank adaptation of large language models", ICLR 2022.
  Zhao et al., "GaLore: Memory-efficient LLM training by gradient low-rank
  projection", ICML 2024.
"""

from __future__ import annotations

import optax
import optax.contrib

from lrtrain import factorizations as fz
from lrtrain.integrators import base

NAMES = ("dense", "factors", "lora", "galore")
# The factor nodes a name trains (the others train whatever the model has).
NEEDS = {"factors": (fz.LowRank, fz.Tucker), "lora": (fz.Lora,)}


# Options only the 'galore' name takes (`integrators.options`).
ONLY_FOR = {"galore_rank": "galore", "update_proj_gap": "galore",
            "galore_scale": "galore"}


def check_config(config, *, method: str) -> None:
  """GaLore wraps the optimizer's update; one that reads params cannot run
  in the projected space."""
  if method == "galore" and config.optimizer.name == "adamw":
    raise ValueError("integrator.name='galore' needs an optimizer without "
                     "params (sgd|momentum|adam); use optimizer.weight_decay "
                     "with adam instead of adamw")


def make(tx: optax.GradientTransformation, *, method: str = "dense",
         weight_decay: float = 0.0, galore_rank: int = 32,
         update_proj_gap: int = 200, galore_scale: float = 1.0) -> base.Integrator:
  """A plain-optax baseline.

  Args:
    tx: the optimizer. For 'galore' it must not need params (e.g.
      optax.adam, optax.sgd; not adamw - use `weight_decay`).
    method: one of NAMES (only changes how `tx` is wrapped for 'galore';
      which leaves train follows from the params themselves).
    weight_decay: L2 decay on the leaves `base.decay_mask` allows.
    galore_rank, update_proj_gap, galore_scale: GaLore projection rank,
      projector refresh period (steps) and update scale.

  Returns:
    base.Integrator(init, step, resize) with the identity resize.

  Raises:
    ValueError: unknown method.
  """
  if method not in NAMES:
    raise ValueError(f"plain: unknown method {method!r}; valid: {NAMES}")
  if method == "galore":
    # GaLore projects the gradient, runs tx in the projected space and
    # projects the update back; tx already carries sign and learning rate.
    tx = optax.contrib.scale_by_galore(
        rank=galore_rank, update_proj_gap=update_proj_gap, scale=galore_scale,
        base_optimizer=tx)
  tx = base.with_weight_decay(tx, weight_decay)

  def init(params):
    if method in NEEDS:
      base.require_nodes(params, NEEDS[method], method)
    return tx.init(base.trainable(params))

  def step(loss_fn, params, state, batch):
    (loss, aux), grads = base.value_and_grad(loss_fn, base.stop_frozen(params),
                                             batch)
    t = base.trainable(params)
    updates, state = tx.update(base.trainable(grads), state, t)
    new = base.restore_frozen(params, optax.apply_updates(t, updates))
    return new, state, {"loss": loss, **aux, **base.rank_aux(new)}

  return base.Integrator(init, step, base.no_resize, fixed_shape=True)

