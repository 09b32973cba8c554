"""DLRT vs plain factor SGD at fixed rank 20 on LeNet5: accuracy vs step.

  python -m experiments.dlrt_vs_factors.run [--runlocal] [--dataset=mnist]
      [--workdir runs/dlrt_vs_factors] [--out experiments/dlrt_vs_factors/results]

Runs the three methods of config.py (and a diagnostic: SGD on U, S, V at
lr / 10) with `experiments.common.train_with` (one loop
for all three, so the curves are comparable), then writes
results/curves.csv (method, step, validation accuracy), results/final.csv
(test accuracy beside the paper's) and results/accuracy_vs_step.png.

The two-factor U V^T network has no node of its own in lrtrain; it is a
LowRank whose core is frozen to the identity: at init, U <- U S^(1/2),
V <- V S^(1/2), S <- I (same W), and the integrator below trains U and V
with plain optax and puts the identity core back after every update.

References:
  Schotthoefer et al., "Low-rank lottery tickets", NeurIPS 2022.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import jax.numpy as jnp

from experiments import common as U
from lrtrain import config_utils as cu
from lrtrain import factorizations as fz
from lrtrain import integrators
from lrtrain.integrators import base

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")
# The paper's three methods, then a diagnostic that is not in the paper:
# SGD on U, S, V at a tenth of the learning rate (does it only diverge?).
METHODS = ("kls", "factors", "uv", "factors_lr_div10")
RUNLOCAL_METHODS = ("kls", "uv")


def to_two_factor(params):
  """Every LowRank U S V^T (diagonal S) as (U S^1/2) I (V S^1/2): same W."""
  def fix(x):
    if not isinstance(x, fz.LowRank):
      return x
    s = jnp.sqrt(jnp.abs(jnp.diagonal(x.S)))
    mask = base.column_mask(x.rank, x.capacity, x.S.dtype)
    return dataclasses.replace(x, U=x.U * s[None, :], V=x.V * s[None, :],
                               S=jnp.diag(mask))
  return jax.tree.map(fix, params, is_leaf=fz.is_factor)


def two_factor(tx) -> base.Integrator:
  """Plain optax on U and V of U I V^T (the core stays the identity).

  Args:
    tx: the optax optimizer.

  Returns:
    An Integrator: lrtrain's 'factors' step, then each LowRank's core is
    reset to its value before the step (the identity set by
    `to_two_factor`).
  """
  inner = integrators.build("factors", tx)

  def step(loss_fn, params, state, batch):
    new, state, aux = inner.step(loss_fn, params, state, batch)
    new = jax.tree.map(
        lambda o, n: dataclasses.replace(n, S=o.S) if isinstance(n, fz.LowRank) else n,
        params, new, is_leaf=fz.is_factor)
    return new, state, aux
  return base.Integrator(inner.init, step, base.no_resize)


def run_all(workdir: str, *, runlocal: bool = False, dataset: str = "fashion_mnist"):
  """Train the three methods (resuming finished ones); {method: summary}."""
  from lrtrain import sweep  # pylint: disable=g-import-not-at-top
  from lrtrain import optim  # pylint: disable=g-import-not-at-top
  mod = sweep.load_config_module(CONFIG)
  extra = ",".join(x for x in ("runlocal" if runlocal else "",
                               "" if dataset == "fashion_mnist" else f"dataset={dataset}") if x)
  base_cfg = mod.get_config(extra or None)
  out = {}
  # runlocal: the DLRT step and the study-local two-factor integrator only
  # (lrtrain's own tests cover the 'factors' baseline).
  for method in (RUNLOCAL_METHODS if runlocal else METHODS):
    name = "kls" if method == "kls" else "factors"
    over = {"integrator.name": name}
    if method == "factors_lr_div10":
      over["optimizer.learning_rate"] = base_cfg.optimizer.learning_rate / 10
    cfg = cu.apply_overrides(base_cfg, over)
    integ, init = None, None
    if method == "uv":
      integ = two_factor(optim.build(cfg.optimizer, cfg.train.num_steps))
      init = lambda run: to_two_factor(run.init_params)
    out[method] = U.train_with(cfg, os.path.join(workdir, method),
                               integrator=integ, init_fn=init)
  return out


def summarize(workdir: str, out: str, summaries: dict) -> list[dict]:
  """curves.csv, final.csv and the figure."""
  pub = {r["method"]: r for r in U.published("dlrt_vs_vanilla.csv")}
  curves, final = [], []
  fig, ax = U.figure(1, 1)
  a = ax[0][0]
  labels = {"kls": "DLRT fixed-rank KLS", "factors": "SGD on U, S, V",
            "uv": "SGD on U V^T (S = I frozen)",
            "factors_lr_div10": "SGD on U, S, V, lr / 10 (diagnostic)"}
  for i, (m, s) in enumerate(summaries.items()):
    rows = U.metrics(os.path.join(workdir, m))
    st, acc = U.series(rows, "eval/accuracy")
    curves += [{"method": m, "step": int(x), "val_accuracy": float(y)}
               for x, y in zip(st, acc)]
    a.plot(st, 100 * acc, "o-", ms=3, color=f"C{i}", label=labels[m])
    p = pub["dlrt" if m == "kls" else "vanilla_uvt_sgd"]
    st_l, loss = U.series(rows, "train/loss")
    bad = st_l[~np.isfinite(loss)]
    # The frozen identity core of 'uv' is not trained: r^2 per layer less.
    core = sum(int(r) ** 2 for r in s["ranks"].values()) if m == "uv" else 0
    final.append({"method": m, "test_acc": 100 * s["test/accuracy"],
                  "diverged_at_logged_step": int(bad[0]) if len(bad) else "",
                  "params_train": s["params/train"] - core,
                  "train_loop_s": s["time/train_loop_s"], "steps": s["steps"],
                  "paper_method": p["method"], "paper_test_acc": p["test_acc"],
                  "paper_epochs": p["epochs"]})
  for key, ls in (("dlrt", "--"), ("vanilla_uvt_sgd", ":")):
    a.axhline(float(pub[key]["test_acc"]), color="gray", ls=ls, lw=1,
              label=f"paper {key} (MNIST, 10 epochs)")
  a.set_xlabel("step"); a.set_ylabel("validation accuracy %"); a.set_ylim(0, 100)
  a.legend(fontsize=8); a.grid(alpha=.3)
  U.save(fig, os.path.join(out, "accuracy_vs_step.png"))
  U.write_csv(os.path.join(out, "curves.csv"), curves)
  U.write_csv(os.path.join(out, "final.csv"), final)
  return final


def main(argv=None):
  a = U.parse_args("dlrt_vs_factors", argv, doc=__doc__)
  summaries = run_all(a.workdir, runlocal=a.runlocal, dataset=a.dataset)
  rows = summarize(a.workdir, a.results, summaries)
  for r in rows:
    print(r)
  return rows


if __name__ == "__main__":
  main()
