"""Run the GeoLoRA rank-convergence study and write its results.

  python -m experiments.geolora_rank_convergence.run [--runlocal]

Training: the dense model of the adapter setting (workdir/pretrain), the
adapter sweep from it (workdir/adapter/<run>), the from-scratch sweep
(workdir/scratch/<run>); finished runs are skipped.

Outputs (results/): summary.csv (one row per setting, method, initial rank
r0 and seed: final ranks, final trainable parameters, test accuracy, wall
time), spread.csv (per setting and method: smallest and largest final
trainable-parameter count over r0, and their ratio), params_vs_step.csv /
params_vs_step.png (trainable parameters over training, one panel per
setting, every r0), ranks_vs_step.png (rank of each hidden layer).
"""

from __future__ import annotations

import os

from experiments import common as gc
from lrtrain import sweep as sweep_lib

STUDY = "geolora_rank_convergence"
SETTINGS = ("adapter", "scratch")


def train(spec: str, workdir: str) -> None:
  """Pretrain, then the adapter and the from-scratch sweeps."""
  pre_dir = os.path.abspath(os.path.join(workdir, "pretrain"))
  pre = gc.with_args(spec, "setting=adapter,stage=pretrain")
  for _, cfg, _ in sweep_lib.expand(pre):
    gc.train_with(cfg, pre_dir)
  sweep_lib.run_all(gc.with_args(spec, f"setting=adapter,init_from={pre_dir}"),
                    os.path.join(workdir, "adapter"))
  sweep_lib.run_all(gc.with_args(spec, "setting=scratch"),
                    os.path.join(workdir, "scratch"))


def _runs(workdir: str):
  """(setting, run dir) of every finished run."""
  return [(s, d) for s in SETTINGS
          for d in gc.finished_runs(os.path.join(workdir, s))]


def report(workdir: str, results: str) -> dict[str, str]:
  """results/*.csv and *.png from the finished runs under workdir."""
  rows, curves = [], []
  for setting, d in _runs(workdir):
    cfg, s, m = gc.load_config(d), gc.read_json(os.path.join(d, "summary.json")), gc.metrics(d)
    steps, p = gc.series(m, "params/train")
    rank_keys = sorted({k for r in m for k in r if k.startswith("rank/")})
    ranks = {k: gc.series(m, k) for k in rank_keys}
    name, r0, seed = cfg.integrator.name, int(cfg.model.factor.rank), int(cfg.seed)
    curves.append((setting, name, r0, seed, steps, p, ranks))
    rows.append({"setting": setting, "method": name, "r0": r0, "seed": seed,
                 "final_ranks": " ".join(f"{k[5:]}:{v}" for k, v in s["ranks"].items()),
                 "final_trainable_params": s["params/train"],
                 "first_logged_trainable_params": p[0] if len(p) else None,
                 "test_accuracy": s["test/accuracy"],
                 "tau": cfg.integrator.tau,
                 "basis_period": cfg.integrator.basis_period,
                 "truncation_delay": cfg.integrator.truncation_delay,
                 "wall_s": s["time/wall_s"], "steps": s["steps"]})
  rows.sort(key=lambda r: (SETTINGS.index(r["setting"]), r["method"], r["r0"], r["seed"]))
  out = {"summary": gc.write_csv(os.path.join(results, "summary.csv"), rows)}

  spread = []
  for setting in SETTINGS:
    for method in sorted({r["method"] for r in rows if r["setting"] == setting}):
      finals = [r["final_trainable_params"] for r in rows
                if r["setting"] == setting and r["method"] == method]
      if len({r["r0"] for r in rows if r["setting"] == setting
              and r["method"] == method}) < 2:
        continue
      spread.append({"setting": setting, "method": method, "runs": len(finals),
                     "min_final_trainable_params": min(finals),
                     "max_final_trainable_params": max(finals),
                     "max_over_min": max(finals) / max(min(finals), 1)})
  out["spread"] = gc.write_csv(os.path.join(results, "spread.csv"), spread)

  long = [{"setting": st, "method": n, "r0": r0, "seed": sd, "step": int(t),
           "params_train": float(v)}
          for st, n, r0, sd, steps, p, _ in curves for t, v in zip(steps, p)]
  out["params_csv"] = gc.write_csv(os.path.join(results, "params_vs_step.csv"), long)

  order = sorted(curves, key=lambda c: (c[1], c[2], c[3]))
  colors = {r0: f"C{i}" for i, r0 in enumerate(sorted({c[2] for c in curves}))}
  fig, ax = gc.figure(1, len(SETTINGS), (6.5, 4.5))
  for j, setting in enumerate(SETTINGS):
    a = ax[0, j]
    for st, n, r0, sd, steps, p, _ in order:
      if st == setting and len(p):
        a.plot(steps, p, ls="-" if n == "geolora" else "--", color=colors[r0],
               alpha=1.0 if sd == 0 else 0.45,
               label=f"{n} r0={r0}" if sd == 0 else None)
    a.set_xlabel("step")
    a.set_ylabel("trainable parameters")
    a.set_yscale("log")
    a.set_title({"adapter": "adapters on a pretrained MLP (W0 frozen, S = 0)\n"
                            "augment every 51 steps, truncate 37 later, tau 0.15",
                 "scratch": "from scratch (U S V^T)\n"
                            "basis step every 2nd step, tau 0.3"}[setting],
                fontsize=9)
    a.legend(fontsize=7, ncol=2)
  fig.suptitle("GeoLoRA: trainable parameters from every initial rank r0 "
               "(faint: further seeds)", fontsize=10)
  out["params_png"] = gc.save(fig, os.path.join(results, "params_vs_step.png"))

  layers = sorted({k for c in curves for k in c[6]})
  fig, ax = gc.figure(len(SETTINGS), max(len(layers), 1), (5, 3.8))
  for i, setting in enumerate(SETTINGS):
    for j, k in enumerate(layers):
      a = ax[i, j]
      for st, n, r0, sd, _, _, ranks in order:
        if st == setting and sd == 0 and k in ranks:
          a.step(*ranks[k], where="post", ls="-" if n == "geolora" else "--",
                 color=colors[r0], label=f"{n} r0={r0}")
      a.set_title(f"{setting}: {k}", fontsize=9)
      a.set_xlabel("step")
      a.set_ylabel("rank")
      a.set_yscale("log", base=2)
      a.legend(fontsize=6, ncol=2)
  out["ranks_png"] = gc.save(fig, os.path.join(results, "ranks_vs_step.png"))
  return out


main = gc.cli(STUDY, report, doc=__doc__, train=train,
              note="pretrain + adapter sweep + scratch sweep")


if __name__ == "__main__":
  main()
