"""Run the transport-rule comparison and write its results.

  python -m experiments.transport_rules.run [--runlocal]

Training: the sweep of config.py (four variants x five seeds) for each task
(workdir/<task>/<run>); finished runs are skipped.

Outputs (results/): runs.csv (one row per task, variant and seed: test
accuracy and loss, final train loss, final ranks, compression),
comparison.csv (per task and variant: mean and standard deviation over
seeds), accuracy.png (test accuracy per variant, every seed and the mean).
"""

from __future__ import annotations

import os

import numpy as np

from experiments import common as gc
from experiments.transport_rules import config as study_config
from lrtrain import sweep as sweep_lib

STUDY = "transport_rules"
TASKS = ("digits", "lenet5")


def train(spec: str, workdir: str) -> None:
  tasks = TASKS[:1] if "runlocal" in spec else TASKS
  for task in tasks:
    sweep_lib.run_all(gc.with_args(spec, f"task={task}"), os.path.join(workdir, task))


def _variant(cfg) -> str:
  return cfg.integrator.transport_rule if cfg.integrator.transport else "off"


def report(workdir: str, results: str) -> dict[str, str]:
  rows = []
  for task in TASKS:
    for d in gc.finished_runs(os.path.join(workdir, task)):
      cfg, s, m = (gc.load_config(d), gc.read_json(os.path.join(d, "summary.json")),
                   gc.metrics(d))
      _, loss = gc.series(m, "train/loss")
      rows.append({"task": task, "variant": _variant(cfg), "seed": int(cfg.seed),
                   "test_accuracy": s["test/accuracy"], "test_loss": s["test/loss"],
                   "final_train_loss": float(loss[-1]) if len(loss) else None,
                   "compression": s["params/compression"],
                   "final_ranks": " ".join(f"{k[5:]}:{v}" for k, v in s["ranks"].items()),
                   "steps": s["steps"]})
  order = study_config.VARIANTS
  rows.sort(key=lambda r: (TASKS.index(r["task"]), order.index(r["variant"]), r["seed"]))
  out = {"runs": gc.write_csv(os.path.join(results, "runs.csv"), rows)}

  comp = []
  for task in TASKS:
    for v in order:
      sel = [r for r in rows if r["task"] == task and r["variant"] == v]
      if not sel:
        continue
      acc = np.array([r["test_accuracy"] for r in sel], float)
      tl = np.array([r["test_loss"] for r in sel], float)
      cr = np.array([r["compression"] for r in sel], float)
      comp.append({"task": task, "variant": v, "seeds": len(sel),
                   "test_accuracy_mean": acc.mean(), "test_accuracy_std": acc.std(ddof=1) if len(sel) > 1 else 0.0,
                   "test_loss_mean": tl.mean(), "test_loss_std": tl.std(ddof=1) if len(sel) > 1 else 0.0,
                   "compression_mean": cr.mean()})
  out["comparison"] = gc.write_csv(os.path.join(results, "comparison.csv"), comp)

  tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
  fig, ax = gc.figure(1, max(len(tasks), 1), (5, 4))
  for j, task in enumerate(tasks):
    a = ax[0, j]
    for i, v in enumerate(order):
      acc = [r["test_accuracy"] for r in rows if r["task"] == task and r["variant"] == v]
      if acc:
        a.plot([i] * len(acc), acc, "o", color="C0", alpha=0.5, ms=4)
        a.plot([i - 0.25, i + 0.25], [np.mean(acc)] * 2, color="k", lw=2)
    a.set_xticks(range(len(order)))
    a.set_xticklabels(order, rotation=20, fontsize=8)
    a.set_ylabel("test accuracy")
    a.set_title(f"{task}: KLS adaptive, Adam (dots: seeds, bar: mean)", fontsize=9)
  out["accuracy_png"] = gc.save(fig, os.path.join(results, "accuracy.png"))
  return out


main = gc.cli(STUDY, report, doc=__doc__, train=train,
              note="digits and lenet5 sweeps")


if __name__ == "__main__":
  main()
