"""Run the GeoLoRA rank-convergence study and write its results.

  python -m experiments.geolora_rank_convergence.run [--runlocal]

Outputs (results/): summary.csv (one row per run: method, initial rank,
final ranks, trainable params, test accuracy, wall time, steps/s),
params_vs_step.csv / params_vs_step.png (trainable parameters over
training), ranks_vs_step.png (rank of each hidden layer over training).
"""

from __future__ import annotations

import os


from experiments import common as gc

STUDY = "geolora_rank_convergence"


def report(workdir: str, results: str) -> dict[str, str]:
  """results/*.csv and *.png from the finished runs under workdir."""
  runs = gc.finished_runs(workdir)
  rows, curves = [], []
  for d in runs:
    cfg, s, m = gc.load_config(d), gc.read_json(os.path.join(d, "summary.json")), gc.metrics(d)
    steps, p = gc.series(m, "params/train")
    rank_keys = sorted({k for r in m for k in r if k.startswith("rank/")})
    ranks = {k: gc.series(m, k) for k in rank_keys}
    name = cfg.integrator.name
    r0 = int(cfg.model.factor.rank)
    curves.append((name, r0, steps, p, ranks))
    rows.append({"method": name, "r0": r0,
                 "final_ranks": " ".join(f"{k[5:]}:{v}" for k, v in s["ranks"].items()),
                 "params_train_final": s["params/train"],
                 "params_train_first_logged": p[0] if len(p) else None,
                 "params_eval_final": s["params/eval"],
                 "compression": s["params/compression"],
                 "test_accuracy": s["test/accuracy"],
                 "wall_s": s["time/wall_s"], "steps_per_sec": s["time/steps_per_sec"],
                 "steps": s["steps"]})
  rows.sort(key=lambda r: (r["method"], r["r0"]))
  out = {"summary": gc.write_csv(os.path.join(results, "summary.csv"), rows)}

  long = [{"method": n, "r0": r0, "step": int(t), "params_train": float(v)}
          for n, r0, st, p, _ in curves for t, v in zip(st, p)]
  out["params_csv"] = gc.write_csv(os.path.join(results, "params_vs_step.csv"), long)

  fig, ax = gc.figure(1, 1, (7, 4.5))
  for n, r0, st, p, _ in sorted(curves, key=lambda c: (c[0], c[1])):
    ax[0, 0].plot(st, p, ls="-" if n == "geolora" else "--",
                  label=f"{n} r0={r0}")
  ax[0, 0].set_xlabel("step")
  ax[0, 0].set_ylabel("trainable parameters")
  ax[0, 0].set_yscale("log")
  ax[0, 0].set_title("trainable parameters vs step (tau from config)")
  ax[0, 0].legend(fontsize=7, ncol=2)
  out["params_png"] = gc.save(fig, os.path.join(results, "params_vs_step.png"))

  layers = sorted({k for c in curves for k in c[4]})
  fig, ax = gc.figure(1, max(len(layers), 1), (5, 4))
  for j, k in enumerate(layers):
    for n, r0, _, _, ranks in sorted(curves, key=lambda c: (c[0], c[1])):
      if k in ranks:
        ax[0, j].plot(*ranks[k], ls="-" if n == "geolora" else "--",
                      label=f"{n} r0={r0}")
    ax[0, j].set_title(k)
    ax[0, j].set_xlabel("step")
    ax[0, j].set_ylabel("rank")
    ax[0, j].legend(fontsize=6, ncol=2)
  out["ranks_png"] = gc.save(fig, os.path.join(results, "ranks_vs_step.png"))
  return out


main = gc.cli(STUDY, report, doc=__doc__)


if __name__ == "__main__":
  main()
