"""LeNet5 at batch 128 on Fashion-MNIST shapes (28 x 28 x 1, 10 classes).

Methods: dense, KLS rank-adaptive (tau 0.1), GeoLoRA (tau 0.1), CondLR
(approx_orth), the factored ones at the DLRT paper's ranks 10 / 25 / 250; each with the im2col and the XLA conv
routine, so the conv implementation choice is measured, not assumed. The
comparisons with PyTorch use `DEFAULT`, the routine a single run gets.
Random inputs of the real shapes: timing does not depend on the pixels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from benchmarks import common
from lrtrain import integrators, models
from lrtrain.factorizations import conv

BATCH = 128
DEFAULT = conv.resolve("auto")   # outside vmapped seeds: "xla"

# Ranks: the DLRT paper's caps for LeNet5, 10 / 25 / 250 (conv1, conv2,
# fc1): rank 250 requested with clip_rank, which caps each layer at
# floor(min(n, m) / 2). The adaptive methods run the whole augment /
# truncate step with the ranks held at the caps (r_min above every cap),
# the regime of a settled run; CondLR at the same ranks.
HELD = 10 ** 6
SETUPS = {
    "dense": dict(kind="dense", rank=0, integrator=("dense", {})),
    "kls_adaptive": dict(kind="lowrank", rank=250, integrator=(
        "kls", dict(adaptive=True, tau=0.1, r_min=HELD))),
    "geolora": dict(kind="lowrank", rank=250, integrator=(
        "geolora", dict(tau=0.1, r_min=HELD))),
    "condlr": dict(kind="lowrank", rank=250, integrator=(
        "condlr", dict(variant="approx_orth", kappa_tau=0.1))),
}


def build(method: str, impl: str):
  setup = SETUPS[method]
  cfg = models.default_model_config()
  cfg.name = "lenet5"
  cfg.conv_impl = impl
  cfg.factor.kind = setup["kind"]
  cfg.factor.rank = max(setup["rank"], 1)
  cfg.factor.clip_rank = True
  model = models.build(cfg, num_classes=10, input_shape=(28, 28, 1))
  x = jnp.zeros((BATCH, 28, 28, 1))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  name, kw = setup["integrator"]
  integ = integrators.build(name, optax.sgd(0.05, momentum=0.9), **kw)
  return model, params, integ


def make_step(method: str, impl: str):
  """(step, params, state, batch): the jitted step (params and state
  donated) and what it takes."""
  model, params, integ = build(method, impl)
  params, _, _ = integ.resize(params, None)
  state = integ.init(params)

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean(), {}

  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  batch = {"x": jax.random.normal(kx, (BATCH, 28, 28, 1)),
           "y": jax.random.randint(ky, (BATCH,), 0, 10)}
  step = jax.jit(lambda p, s, b: integ.step(loss_fn, p, s, b)[:2],
                 donate_argnums=(0, 1))
  return step, params, state, batch


def bench(method: str, impl: str, *, steps: int, repeats: int) -> dict:
  step, params, state, batch = make_step(method, impl)
  res = common.time_steps(lambda c: step(c[0], c[1], batch), (params, state),
                          steps=steps, repeats=repeats)
  res.pop("carry")
  return dict(method=method, impl=impl, **res)


def run(*, steps: int, repeats: int, impls=("xla", "im2col"), log=print,
        methods=tuple(SETUPS)):
  rows = []
  for impl in impls:
    dense_ms = None
    for method in methods:
      r = bench(method, impl, steps=steps, repeats=repeats)
      dense_ms = dense_ms or r["ms"]
      r["ratio"] = r["ms"] / dense_ms
      rows.append(r)
      log(f"lenet5 {impl:6s} {method:13s} {r['ms']:8.2f} ms  x{r['ratio']:.2f} dense")
  return rows
