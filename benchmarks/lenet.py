"""LeNet5 at batch 128 on Fashion-MNIST shapes (28 x 28 x 1, 10 classes).

Methods: dense, KLS rank-adaptive (tau 0.1), GeoLoRA (tau 0.1), CondLR
(approx_orth), the factored ones at the DLRT paper's ranks 10 / 25 / 250; each with the im2col and the XLA conv
routine, so the conv implementation choice is measured, not assumed. The
comparisons with PyTorch use `DEFAULT`, the routine a single run gets.
Random inputs of the real shapes: timing does not depend on the pixels.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax

from benchmarks import common
from lrtrain import factorizations as fz
from lrtrain import integrators, models
from lrtrain.factorizations import conv
from lrtrain.integrators import base, linalg

BATCH = 128
DEFAULT = conv.resolve("auto")   # outside vmapped seeds: "xla"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def loss_and_batch(model):
  """(loss_fn, batch): the softmax cross-entropy of `model` and a random
  batch of the real shapes."""
  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean(), {}

  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  batch = {"x": jax.random.normal(kx, (BATCH, 28, 28, 1)),
           "y": jax.random.randint(ky, (BATCH,), 0, 10)}
  return loss_fn, batch


def make_step(method: str, impl: str):
  """(step, params, state, batch): the jitted step (params and state
  donated) and what it takes."""
  model, params, integ = build(method, impl)
  params, _, _ = integ.resize(params, None)
  state = integ.init(params)
  loss_fn, batch = loss_and_batch(model)
  step = jax.jit(lambda p, s, b: integ.step(loss_fn, p, s, b)[:2],
                 donate_argnums=(0, 1))
  return step, params, state, batch


def bench(method: str, impl: str, *, steps: int, repeats: int) -> dict:
  step, params, state, batch = make_step(method, impl)
  res = common.time_steps(lambda c: step(c[0], c[1], batch), (params, state),
                          steps=steps, repeats=repeats)
  res.pop("carry")
  return dict(method=method, impl=impl, **res)


def critical_path(impl: str = DEFAULT, *, steps: int = 20,
                  repeats: int = 3) -> dict:
  """A lower bound on the rank-adaptive steps (KLS and GeoLoRA, ranks held
  at the caps) from the parts of a step that must run one after the other,
  each timed alone with the whole machine (jitted, median ms):

    forward    the loss at the active width (the step's pass begins with it);
    extension  the basis extension of the widest layer (fc1: 500 x 800 at
               rank 250 in capacity 500), the longer of its two sides (the
               step can run the two side by side; `linalg.extend` of the
               layer's bases by random directions);
    truncation that layer's core truncation (`base.truncate` of a 500 x 500
               core: the eigensolver, the kept left vectors).

  The extension needs fc1's gradient, hence the forward pass, and the
  truncation needs the extended core, so no step of either method runs
  below `bound` = forward + extension + truncation. The rest of the step
  (the backward pass, `pass` = forward + backward is timed too, the new
  bases, the moment maps, the smaller layers) can overlap that chain only
  where it does not depend on it: the convolutions' backward pass beside
  the single-threaded eigensolver, for instance.
  """
  model, params, integ = build("geolora", impl)
  params, _, _ = integ.resize(params, None)
  loss_fn, batch = loss_and_batch(model)
  timed = lambda fn, *a: common.time_call(fn, *a, steps=steps,
                                          repeats=repeats)
  out = dict(impl=impl)
  out["forward"] = timed(lambda p: loss_fn(base.half_width(p), batch)[0],
                         params)
  out["pass"] = timed(lambda p: base.value_and_grad(
      loss_fn, base.half_width(p), batch), params)
  nodes = [x for x in jax.tree.leaves(params, is_leaf=fz.is_factor)
           if isinstance(x, fz.LowRank)]
  node = max(nodes, key=lambda x: x.capacity * sum(x.shape))
  C, r = node.capacity, node.rank
  sides = []
  for i, Ub in enumerate((node.U, node.V)):
    D = jax.random.normal(jax.random.PRNGKey(2 + i), Ub.shape, Ub.dtype)
    sides.append(timed(lambda U, D, r: linalg.extend(U, D, r, with_block=True),
                       Ub, D, r))
  out["extension"] = max(sides)
  lo, hi = base.rank_bounds(node, HELD, 0)
  core = jax.random.normal(jax.random.PRNGKey(4), (C, C), node.S.dtype)
  out["truncation"] = timed(lambda S: base.truncate(S, tau=0.1, r_min=lo,
                                                    r_max=hi), core)
  out["bound"] = out["forward"] + out["extension"] + out["truncation"]
  out["layer"] = f"{node.shape[0]} x {node.shape[1]}, rank {int(r)}, C {C}"
  return out


def one_core(methods=("kls_adaptive", "geolora"), impl: str = DEFAULT, *,
             steps: int = 20, repeats: int = 3) -> dict:
  """ms per step of each method with the process pinned to one CPU (a
  subprocess: XLA's CPU client sizes its thread pool from the CPUs the
  process may use when it starts): the step's work in CPU time. On c
  CPUs no step runs below 1 / c of it; {} where the platform cannot pin a
  process (no os.sched_setaffinity)."""
  if not hasattr(os, "sched_setaffinity"):
    return {}
  code = ("import json, os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
          "from benchmarks import lenet; print(json.dumps({m: lenet.bench("
          f"m, {impl!r}, steps={steps}, repeats={repeats})['ms'] for m in "
          f"{tuple(methods)!r}}}))")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, env=env, cwd=ROOT, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


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
