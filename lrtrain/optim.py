"""The optax optimizer of a run, built from `config.optimizer` in one place.

  sgd       plain SGD
  momentum  SGD with (heavy-ball) momentum
  adam      Adam
  adamw     Adam with decoupled weight decay

Schedules: constant, cosine (decay to 0 over the run), warmup_cosine (linear
warmup from 0, then cosine), jagged_cosine (warmup_cosine with warm
restarts every `restart_period` steps, each a linear ramp from 0 over
`restart_warmup` steps back to the cosine: ReLoRA's schedule, Lialin et
al., ICLR 2024). `clip_norm > 0` clips by global norm first.
Weight decay never touches orthonormal factors: adamw masks its decay with
`integrators.base.decay_mask`; for sgd/momentum/adam the (coupled, L2) decay
is handed to the integrator (`integrator_weight_decay`), which applies it
with the same mask to the sub-steps where it belongs (S and non-factor
parameters for DLRT, not K/L). The result is wrapped in
`optax.inject_hyperparams`, so the current learning rate is part of the
optimizer state and can be logged (`learning_rate`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lrtrain.integrators import base

NAMES = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "jagged_cosine")


def schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """The learning-rate schedule of `cfg` (an optimizer config) over a run.

  Raises:
    ValueError: unknown schedule name.
  """
  lr = float(cfg.learning_rate)
  steps = max(int(num_steps), 1)
  if cfg.schedule == "constant":
    return optax.constant_schedule(lr)
  if cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, decay_steps=steps)
  if cfg.schedule in ("warmup_cosine", "jagged_cosine"):
    warm = min(int(cfg.warmup_steps), steps - 1)
    envelope = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=max(warm, 0), decay_steps=steps)
    if cfg.schedule == "warmup_cosine":
      return envelope
    return jagged(envelope, int(cfg.restart_period), int(cfg.restart_warmup))
  raise ValueError(f"unknown schedule optimizer.schedule={cfg.schedule!r}")


def jagged(envelope: optax.Schedule, period: int,
           warmup: int) -> optax.Schedule:
  """`envelope` with warm restarts: at every step t = j * period (j >= 1)
  the rate drops to 0 and ramps linearly over `warmup` steps to the
  envelope's value at t + warmup, then follows the envelope again.

  Step t of the schedule is the rate of the (t + 1)-th update: with a
  restart after every `period`-th update (ReLoRA's merges), the first
  update after a restart gets rate 0.

  Args:
    envelope: the schedule between restarts (with the run's first warmup).
    period: steps between restarts (>= 1).
    warmup: steps of each restart's ramp (0: no ramp, the envelope only).

  Returns:
    An optax schedule (traceable in the step count).
  """
  def fn(count):
    t = jnp.asarray(count)
    since = t % period                  # steps since the last restart
    ramping = (t >= period) & (since < warmup)
    top = envelope(t - since + warmup)
    ramp = since.astype(jnp.float32) / max(warmup, 1) * top
    return jnp.where(ramping, ramp, envelope(t))
  return fn


def _chain(cfg, learning_rate, momentum, b1, b2, weight_decay):
  """The transformation for `inject_hyperparams` (hyperparams as args)."""
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  if cfg.name == "sgd":
    parts.append(optax.sgd(learning_rate))
  elif cfg.name == "momentum":
    parts.append(optax.sgd(learning_rate, momentum=momentum))
  elif cfg.name == "adam":
    parts.append(optax.adam(learning_rate, b1=b1, b2=b2))
  elif cfg.name == "adamw":
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2,
                             weight_decay=weight_decay, mask=base.decay_mask))
  else:
    raise ValueError(f"unknown optimizer optimizer.name={cfg.name!r}")
  return optax.chain(*parts) if len(parts) > 1 else parts[0]


def build(cfg: ml_collections.ConfigDict,
          num_steps: int) -> optax.GradientTransformation:
  """The optimizer of `cfg` (config.optimizer), learning rate injectable.

  Args:
    cfg: optimizer config (name, learning_rate, momentum, b1, b2,
      weight_decay, schedule, warmup_steps, restart_period, restart_warmup,
      clip_norm).
    num_steps: length of the run (for the decaying schedules).

  Returns:
    An `optax.inject_hyperparams` transformation; its state carries
    `hyperparams['learning_rate']`.

  Raises:
    ValueError: unknown optimizer or schedule.
  """
  lr = schedule(cfg, num_steps)
  make = optax.inject_hyperparams(
      lambda learning_rate, momentum, b1, b2, weight_decay: _chain(
          cfg, learning_rate, momentum, b1, b2, weight_decay))
  return make(learning_rate=lr, momentum=float(cfg.momentum), b1=float(cfg.b1),
              b2=float(cfg.b2), weight_decay=float(cfg.weight_decay))


def integrator_weight_decay(cfg: ml_collections.ConfigDict) -> float:
  """Coupled weight decay the integrator applies (0 for adamw, whose decay
  is decoupled inside the optimizer)."""
  return 0.0 if cfg.name == "adamw" else float(cfg.weight_decay)


def learning_rate(opt_state: Any) -> float | None:
  """The current learning rate in an (integrator) optimizer state: that of
  the first inject_hyperparams state found, or None."""
  def is_inject(x):
    return hasattr(x, "hyperparams") and isinstance(
        getattr(x, "hyperparams"), dict) and "learning_rate" in x.hyperparams

  for x in jax.tree.leaves(opt_state, is_leaf=is_inject):
    if is_inject(x):
      return x.hyperparams["learning_rate"]
  return None
