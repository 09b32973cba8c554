"""L_inf adversarial attacks (FGSM, PGD) and robust accuracy.

Axis legend: b = batch, ... = per-example input dims, k = classes.
Every attack takes `logits_fn(x_bx...) -> logits_bxk` and integer labels
y_b, maximises the summed cross-entropy (so each example's perturbation
depends only on its own gradient), and is jittable with eps traced.

References:
  Goodfellow, Shlens, Szegedy, "Explaining and harnessing adversarial
  examples", ICLR 2015 (FGSM).
  Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards deep learning models
  resistant to adversarial attacks", ICLR 2018 (PGD).
  Savostianova et al., "Robust low-rank training via approximate
  orthonormal constraints", NeurIPS 2023 (the evaluation protocol).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

LogitsFn = Callable[[jax.Array], jax.Array]

ATTACKS = ("fgsm", "pgd")


def loss_per_example(logits_fn: LogitsFn, x: jax.Array,
                     y: jax.Array) -> jax.Array:
  """(b,) softmax cross-entropy of the model at x against integer labels y."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_fn(x).astype(jnp.float32), y)


def _input_grad(logits_fn, x, y):
  return jax.grad(lambda z: jnp.sum(loss_per_example(logits_fn, z, y)))(x)


def _clip_range(x, clip_min, clip_max):
  if clip_min is None and clip_max is None:
    return x
  return jnp.clip(x, clip_min, clip_max)


def fgsm(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps, *,
         clip_min: float | None = None,
         clip_max: float | None = None) -> jax.Array:
  """Fast gradient sign method: x + eps * sign(grad_x loss), clipped.

  Args:
    logits_fn: x (b, ...) -> logits (b, k).
    x: (b, ...) clean inputs.
    y: (b,) integer labels.
    eps: L_inf budget (float or traced scalar).
    clip_min, clip_max: data range (None = unbounded on that side).

  Returns:
    (b, ...) adversarial inputs; ||x_adv - x||_inf = eps wherever the
    gradient is nonzero and clipping is inactive.
  """
  g = _input_grad(logits_fn, x, y)
  x_adv = x + jnp.asarray(eps, x.dtype) * jnp.sign(g)
  return _clip_range(x_adv, clip_min, clip_max)


def pgd(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps, *,
        steps: int = 10, step_size=None, random_start: bool = True,
        key: jax.Array | None = None, clip_min: float | None = None,
        clip_max: float | None = None) -> jax.Array:
  """Projected gradient descent (ascent on the loss) in the L_inf ball.

  Each iterate takes a signed-gradient step of `step_size`, is projected
  back onto the eps-ball around x and clipped to the data range.

  Args:
    logits_fn: x (b, ...) -> logits (b, k).
    x: (b, ...) clean inputs.
    y: (b,) integer labels.
    eps: L_inf budget.
    steps: number of iterations (static).
    step_size: per-step size; default 2.5 * eps / steps (Madry et al.).
    random_start: start from a uniform point in the eps-ball.
    key: PRNG key for the random start (default PRNGKey(0)).
    clip_min, clip_max: data range (None = unbounded on that side).

  Returns:
    (b, ...) adversarial inputs with ||x_adv - x||_inf <= eps.
  """
  eps = jnp.asarray(eps, x.dtype)
  alpha = 2.5 * eps / max(steps, 1) if step_size is None else jnp.asarray(
      step_size, x.dtype)
  if random_start:
    key = jax.random.PRNGKey(0) if key is None else key
    delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
    x0 = _clip_range(x + delta, clip_min, clip_max)
  else:
    x0 = x

  def body(_, xa):
    g = _input_grad(logits_fn, xa, y)
    xa = xa + alpha * jnp.sign(g)
    xa = x + jnp.clip(xa - x, -eps, eps)
    return _clip_range(xa, clip_min, clip_max)

  return jax.lax.fori_loop(0, steps, body, x0)


def attack(name: str, logits_fn: LogitsFn, x, y, eps, **kwargs) -> jax.Array:
  """Dispatch to `fgsm` or `pgd` by name.

  Raises:
    ValueError: unknown attack name.
  """
  if name == "fgsm":
    return fgsm(logits_fn, x, y, eps, **kwargs)
  if name == "pgd":
    return pgd(logits_fn, x, y, eps, **kwargs)
  raise ValueError(f"unknown attack {name!r}; valid: {ATTACKS}")


def _xy(batch: Any):
  if isinstance(batch, dict):
    return batch["x"], batch["y"]
  return batch[0], batch[1]


def robust_accuracy(logits_fn: LogitsFn, batches: Iterable[Any],
                    eps_list: Sequence[float], attack: str = "fgsm",
                    **attack_kwargs) -> dict[float, float]:
  """Accuracy under attack for every budget in eps_list, in one data pass.

  Args:
    logits_fn: x (b, ...) -> logits (b, k).
    batches: iterable of {'x', 'y'} dicts or (x, y) pairs (consumed once).
    eps_list: L_inf budgets; eps = 0 gives the clean accuracy.
    attack: "fgsm" or "pgd".
    **attack_kwargs: passed to the attack (clip_min, clip_max, steps, ...).

  Returns:
    {eps: accuracy in [0, 1]}.

  Raises:
    ValueError: unknown attack name or no data.
  """
  if attack not in ATTACKS:
    raise ValueError(f"unknown attack {attack!r}; valid: {ATTACKS}")
  run = globals()[attack]

  # eps is traced, so all budgets share one compiled program per shape.
  @jax.jit
  def correct(x, y, eps):
    x_adv = run(logits_fn, x, y, eps, **attack_kwargs)
    return jnp.sum(jnp.argmax(logits_fn(x_adv), -1) == y)

  eps_list = [float(e) for e in eps_list]
  hits = np.zeros(len(eps_list), np.int64)
  total = 0
  for batch in batches:
    x, y = _xy(batch)
    x, y = jnp.asarray(x), jnp.asarray(y)
    for i, e in enumerate(eps_list):
      hits[i] += int(correct(x, y, jnp.float32(e)))
    total += int(y.shape[0])
  if not total:
    raise ValueError("robust_accuracy: no examples in batches")
  return {e: float(h) / total for e, h in zip(eps_list, hits)}
