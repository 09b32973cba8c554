"""Cuttlefish on LeNet5 and the 784-wide MLP: when does the stable rank settle,
and does switching to low rank there beat low rank from the start?

  python -m experiments.cuttlefish_stable_rank.run [--runlocal] [--dataset=mnist]
      [--scale 1.0] [--threshold 0.05]
      [--workdir runs/cuttlefish_stable_rank] [--out .../results]

Per model:
  1. full-rank training with stable ranks every `interval` steps and a
     checkpoint at each (lrtrain's runner: <workdir>/<model>/diag);
  2. switch step t*: the first measurement t >= 2 intervals at which every
     factorizable layer's stable rank changed by less than `threshold`
     (relative) over the last interval; the last measurement if none does;
  3. ranks r_l = ceil(scale * stable_rank_l(t*)), clamped to [1, min(n, m)];
  4. four trainings with the same loop (`experiments.common.train_with`), timed
     without compilation:
       full     dense, T steps;
       switch   dense params at t* -> truncated SVD at r_l -> plain optax on
                U, S, V (lrtrain 'factors') for T - t* steps;
       scratch  the dense init -> truncated SVD at r_l -> 'factors', T steps;
     and the switch's wall time = t* dense steps at the full run's speed +
     its low-rank loop.
Writes results/stable_rank.csv, results/switch.csv, results/comparison.csv
and results/stable_rank.png.

References:
  Wang et al., "Cuttlefish: Low-rank model training without all the
  tuning", MLSys 2023.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common as U
from lrtrain import config_utils as cu
from lrtrain import factorizations as fz

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")
MODELS = ("lenet5", "mlp")


def factor_layers(params) -> list[str]:
  """Dense kernels Cuttlefish would factorize: all but the head."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  out = []
  for path, _ in leaves:
    p = fz.path_str(path)
    if p.endswith("/kernel") and not p.startswith("head"):
      out.append(p[:-len("/kernel")])
  return out


def switch_step(steps, sr: dict[str, np.ndarray], threshold: float,
                total: int = 0) -> int:
  """First measurement (>= the 2nd interval, before the last step `total`)
  where every layer's relative stable-rank change over one interval is below
  threshold; else the last such measurement.

  Args:
    steps: (k,) measurement steps, ascending.
    sr: layer -> (k,) stable ranks at those steps.
    threshold: relative change, e.g. 0.05.
    total: the run's last step (never a switch point; 0 = no limit).

  Returns:
    The switch step t*.
  """
  steps = [s for s in steps if s < total] if total else list(steps)
  for i in range(1, len(steps)):
    rel = max(abs(v[i] - v[i - 1]) / max(abs(v[i - 1]), 1e-12) for v in sr.values())
    if rel < threshold and i >= 2:
      return int(steps[i])
  return int(steps[-1])


def to_lowrank(params, ranks: dict[str, int]):
  """Replace the named dense kernels by their truncated SVD U S V^T."""
  def fix(path, x):
    name = fz.path_str(path)
    layer = name[:-len("/kernel")] if name.endswith("/kernel") else name
    if layer not in ranks:
      return x
    W = fz.as_matrix(jnp.asarray(x))
    return fz.lowrank.from_dense(W, int(ranks[layer]))
  return jax.tree_util.tree_map_with_path(fix, params)


def restore_params(workdir: str, like, step: int):
  """Params of the runner's checkpoint at `step`."""
  from lrtrain import checkpoint as ck  # pylint: disable=g-import-not-at-top
  c = ck.Checkpoints(os.path.join(workdir, "checkpoints"), 1000)
  try:
    meta, leaves = c.restore_leaves(step)
  finally:
    c.close()
  return ck.rebuild(like, leaves["params"], meta["groups"]["params"]["paths"],
                    "params")


def study_model(model: str, workdir: str, *, runlocal: bool, dataset: str,
                scale: float, threshold: float) -> dict:
  """Steps 1-4 of the module docstring for one model."""
  from lrtrain import sweep, train  # pylint: disable=g-import-not-at-top
  mod = sweep.load_config_module(CONFIG)
  arg = ",".join(x for x in (f"model={model}", "runlocal" if runlocal else "",
                             "" if dataset == "fashion_mnist" else f"dataset={dataset}") if x)
  cfg = mod.get_config(arg)
  wd = os.path.join(workdir, model)
  diag_dir = os.path.join(wd, "diag")
  if not sweep.is_finished(diag_dir, cfg):
    train.train_and_evaluate(cfg, diag_dir)
  run = train.build_run(cfg)
  init = run.init_params
  layers = factor_layers(init)
  metrics = U.metrics(diag_dir)
  sr, steps = {}, None
  for l in layers:
    steps, sr[l] = U.series(metrics, f"spectral/{l}/stable_rank")
  t_star = switch_step(steps, sr, threshold, cfg.train.num_steps)
  i_star = int(np.searchsorted(steps, t_star))
  shapes = {l: fz.as_matrix(x).shape for l, x in
            ((p[:-len("/kernel")], v) for p, v in
             ((fz.path_str(pp), vv) for pp, vv in
              jax.tree_util.tree_flatten_with_path(init)[0]))
            if l in layers}
  ranks = {l: int(min(max(math.ceil(scale * sr[l][i_star]), 1), min(shapes[l])))
           for l in layers}
  T = cfg.train.num_steps
  full = U.train_with(cu.apply_overrides(cfg, {"diagnostics.enabled": False}),
                      os.path.join(wd, "full"))
  lr_cfg = cu.apply_overrides(cfg, {
      "model.factor.kind": "lowrank",
      "model.factor.conv_kind": "lowrank" if model == "lenet5" else "same",
      "model.factor.rank": 1, "integrator.name": "factors",
      "diagnostics.enabled": False})
  switched = restore_params(diag_dir, init, t_star)
  sw = U.train_with(cu.apply_overrides(lr_cfg, {"train.num_steps": T - t_star}),
                    os.path.join(wd, "switch"),
                    init_fn=lambda _: to_lowrank(switched, ranks),
                    start_step=t_star) if T > t_star else None
  scratch = U.train_with(lr_cfg, os.path.join(wd, "scratch"),
                         init_fn=lambda _: to_lowrank(init, ranks))
  dense_rate = _rate(full)
  rows = [{"model": model, "variant": "full", "test_acc": 100 * full["test/accuracy"],
           "params_eval": full["params/eval"], "steps_dense": T, "steps_lowrank": 0,
           "wall_s": T / dense_rate}]
  if sw is not None:
    rows.append({"model": model, "variant": "switch", "test_acc": 100 * sw["test/accuracy"],
                 "params_eval": sw["params/eval"], "steps_dense": t_star,
                 "steps_lowrank": T - t_star,
                 "wall_s": t_star / dense_rate + (T - t_star) / _rate(sw)})
  rows.append({"model": model, "variant": "scratch", "test_acc": 100 * scratch["test/accuracy"],
               "params_eval": scratch["params/eval"], "steps_dense": 0,
               "steps_lowrank": T, "wall_s": T / _rate(scratch)})
  for r in rows:
    r["size_ratio_vs_full"] = full["params/eval"] / r["params_eval"]
    r["speedup_vs_full"] = rows[0]["wall_s"] / r["wall_s"]
  sr_rows = [{"model": model, "layer": l, "step": int(s), "stable_rank": float(v)}
             for l in layers for s, v in zip(steps, sr[l])]
  sw_rows = [{"model": model, "layer": l, "t_switch": t_star, "scale": scale,
              "threshold": threshold, "stable_rank_at_switch": float(sr[l][i_star]),
              "rank": ranks[l], "shape": f"{shapes[l][0]}x{shapes[l][1]}"}
             for l in layers]
  return {"rows": rows, "sr_rows": sr_rows, "sw_rows": sw_rows, "t_star": t_star,
          "steps": steps, "sr": sr}


def _rate(summary: dict) -> float:
  """Steps/s after the compiling first step (all steps for a one-step run)."""
  return summary["time/steady_steps_per_sec"] or summary["time/steps_per_sec"]


def main(argv=None):
  p = U.parser("cuttlefish_stable_rank", __doc__)
  p.add_argument("--models", default="lenet5,mlp")
  p.add_argument("--scale", type=float, default=1.0, help="rank = ceil(scale * stable rank)")
  p.add_argument("--threshold", type=float, default=0.05,
                 help="relative stable-rank change per interval that counts as settled")
  a = U.parse_args("cuttlefish_stable_rank", argv, p=p)
  res = {m: study_model(m, a.workdir, runlocal=a.runlocal, dataset=a.dataset,
                        scale=a.scale, threshold=a.threshold)
         for m in a.models.split(",")}
  U.write_csv(os.path.join(a.results, "comparison.csv"),
              [r for v in res.values() for r in v["rows"]])
  U.write_csv(os.path.join(a.results, "stable_rank.csv"),
              [r for v in res.values() for r in v["sr_rows"]])
  U.write_csv(os.path.join(a.results, "switch.csv"),
              [r for v in res.values() for r in v["sw_rows"]])
  fig, ax = U.figure(1, len(res))
  for j, (m, v) in enumerate(res.items()):
    x = ax[0][j]
    for l, vals in v["sr"].items():
      x.plot(v["steps"], vals, "o-", ms=3, label=l)
    x.axvline(v["t_star"], color="k", ls="--", lw=1, label=f"switch t*={v['t_star']}")
    x.set_title(f"{m}: stable rank of full-rank training", fontsize=9)
    x.set_xlabel("step"); x.set_ylabel("stable rank"); x.set_yscale("log")
    x.legend(fontsize=7); x.grid(alpha=.3)
  U.save(fig, os.path.join(a.results, "stable_rank.png"))
  for v in res.values():
    for r in v["rows"]:
      print(r)
  return res


if __name__ == "__main__":
  main()
