"""Cost of the spectral diagnostics relative to training, at a log period of 100.

For each model (LeNet5 and the transformer, dense and factored) this times a
jitted plain-optax SGD train step on a batch of 128 and one jitted
diagnostics call (every metric, intruders against the initial weights,
heavy-tail fits), and reports

  overhead = t_diagnostics / (100 * t_step)

i.e. the fraction of training time spent on diagnostics when they run every
100 steps (target <= 3%). Results are printed and written to
benchmarks/results/diagnostics_overhead.json.

  python benchmarks/diagnostics_overhead.py            # all cases (~2-5 min, 2-core CPU)
  python benchmarks/diagnostics_overhead.py --quick    # fewer repeats (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import block, time_steps  # noqa: E402
from lrtrain import models  # noqa: E402
from lrtrain.diagnostics import Diagnostics  # noqa: E402
from lrtrain.integrators.base import value_and_grad  # noqa: E402

PERIOD = 100
BATCH = 128
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "diagnostics_overhead.json")


def model_config(name: str, kind: str, rank: int) -> ml_collections.ConfigDict:
  """The default model config with the benchmark's model and factor kind."""
  c = models.default_model_config()
  c.name = name
  c.factor.kind = kind
  c.factor.rank = rank
  c.d_model = 128
  c.num_heads = 4
  c.num_layers = 2
  c.mlp_dim = 256
  c.max_len = 64
  return c


# (label, model name, factor kind, rank, input shape per example, classes, task)
CASES = [
    ("lenet5/dense", "lenet5", "dense", 4, (28, 28, 1), 10, "classification"),
    ("lenet5/lowrank", "lenet5", "lowrank", 4, (28, 28, 1), 10, "classification"),
    ("transformer/dense", "transformer", "dense", 8, (64,), 96, "lm"),
    ("transformer/lora", "transformer", "lora", 8, (64,), 96, "lm"),
]


def make_batch(input_shape, num_classes, task, key):
  kx, ky = jax.random.split(key)
  if task == "lm":
    x = jax.random.randint(kx, (BATCH,) + tuple(input_shape), 0, num_classes)
    return {"x": x, "y": jnp.roll(x, -1, axis=1)}
  x = jax.random.normal(kx, (BATCH,) + tuple(input_shape))
  return {"x": x, "y": jax.random.randint(ky, (BATCH,), 0, num_classes)}


def run_case(label, name, kind, rank, input_shape, num_classes, task, *,
             steps, repeats):
  cfg = model_config(name, kind, rank)
  module = models.build(cfg, num_classes=num_classes, input_shape=input_shape)
  batch = make_batch(input_shape, num_classes, task, jax.random.PRNGKey(1))
  params = module.init(jax.random.PRNGKey(0), batch["x"][:1], train=False)["params"]

  def loss_fn(p, b):
    logits = module.apply({"params": p}, b["x"], train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()
    return loss, {}

  tx = optax.sgd(1e-3)
  is_float = lambda x: jnp.issubdtype(x.dtype, jnp.floating)

  @jax.jit
  def step(carry):
    p, s = carry
    _, g = value_and_grad(loss_fn, p, batch)
    g = jax.tree.map(lambda gi, pi: gi if is_float(pi) else jnp.zeros_like(pi,
                                                                          jnp.float32),
                     g, p)
    u, s = tx.update(g, s, p)
    # Integer leaves (active ranks) are left as they are.
    p = jax.tree.map(lambda pi, ui: pi + ui.astype(pi.dtype) if is_float(pi) else pi,
                     p, u)
    return p, s

  train = time_steps(step, (params, tx.init(params)), steps=steps, repeats=repeats)
  params = train["carry"][0]

  t0 = time.perf_counter()
  diag = Diagnostics(params)
  ref_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  metrics = diag(params)
  first_s = time.perf_counter() - t0
  # Host conversion included: that is what the runner pays per log step.
  d = time_steps(lambda c: (diag(params), c)[1], 0, steps=max(3, steps // 4),
                 repeats=repeats)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  out = {
      "case": label, "model": name, "factor": kind, "rank": rank,
      "num_param_leaves_size": n_params,
      "num_layers_examined": len(diag.examined),
      "num_metric_keys": len(metrics),
      "train_step_ms": train["ms"], "train_step_ms_min": train["ms_min"],
      "train_step_ms_max": train["ms_max"],
      "diagnostics_ms": d["ms"], "diagnostics_ms_min": d["ms_min"],
      "diagnostics_ms_max": d["ms_max"],
      "diagnostics_first_call_s": first_s, "reference_svd_s": ref_s,
      "overhead_fraction": d["ms"] / (PERIOD * train["ms"]),
  }
  block(metrics)
  return out


def measure(quick: bool = False, cases=()) -> list[dict]:
  """Overhead rows for every case (or the labels in `cases`)."""
  steps, repeats = (3, 1) if quick else (30, 3)
  rows = []
  for case in CASES:
    if cases and case[0] not in cases:
      continue
    r = run_case(*case, steps=steps, repeats=repeats)
    rows.append(r)
    print(f"{r['case']:20s} step {r['train_step_ms']:8.2f} ms   diagnostics "
          f"{r['diagnostics_ms']:8.2f} ms   overhead at period {PERIOD}: "
          f"{100 * r['overhead_fraction']:.2f}%  (target <= 3%)", flush=True)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="fewer timed steps")
  ap.add_argument("--out", default=RESULTS)
  ap.add_argument("--cases", default="", help="comma-separated case labels")
  args = ap.parse_args(argv)
  rows = measure(args.quick, set(filter(None, args.cases.split(","))))
  result = {
      "period": PERIOD, "batch": BATCH, "target_fraction": 0.03,
      "device": str(jax.devices()[0]), "backend": jax.default_backend(),
      "jax": jax.__version__, "platform": platform.platform(),
      "cpu_count": os.cpu_count(), "cases": rows,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(result, fh, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
