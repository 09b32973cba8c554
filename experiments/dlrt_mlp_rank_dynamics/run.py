"""DLRT on the 784-wide MLP: rank vs step per layer and accuracy vs compression.

  python -m experiments.dlrt_mlp_rank_dynamics.run [--runlocal] [--dataset=mnist]
      [--workdir runs/dlrt_mlp_rank_dynamics] [--out .../results]

Writes results/accuracy_compression.csv (per tau, mean and std over seeds:
test accuracy, gap to dense, eval compression, final ranks of fc1..fc4 with
their range; the paper's row beside), results/rank_curves.csv (tau, seed,
layer, step, rank), results/rank_vs_step.png and
results/accuracy_vs_compression.png.

Compression: 1 - eval params / dense params with r (n + m) + r^2 per
factorized layer, biases and the dense head counted; at 784 x 784 this is
the accounting that reproduces the paper's approximate eval c.r. column.

References:
  Schotthoefer et al., "Low-rank lottery tickets", NeurIPS 2022.
"""

from __future__ import annotations

import os

import numpy as np

from experiments import common as U

LAYERS = ("fc1", "fc2", "fc3", "fc4")


def _tau_of(name: str) -> str:
  return "dense" if name.startswith("name=dense") else name.split(",")[0].split("=")[1]


def summarize(workdir: str, out: str) -> list[dict]:
  """Tables and figures from the finished runs (mean and std over seeds)."""
  groups: dict[str, list[dict]] = {}
  for name, r in U.read_runs(workdir).items():
    groups.setdefault(_tau_of(name), []).append(r)
  order = sorted(groups, key=lambda t: -1.0 if t == "dense" else float(t))
  pub = {r["tau"]: r for r in U.published("dlrt_mlp_mnist.csv")}
  acc = {t: np.array([r["summary"]["test/accuracy"] for r in groups[t]]) * 100
         for t in order}
  dense_acc = float(acc["dense"].mean()) if "dense" in acc else np.nan
  rows, curves = [], []
  for tau in order:
    runs = groups[tau]
    ss = [r["summary"] for r in runs]
    p = pub.get(tau if tau == "dense" else f"{float(tau):.2f}", {})
    row = {"tau": tau, "seeds": len(ss),
           "test_acc_mean": float(acc[tau].mean()), "test_acc_std": float(acc[tau].std()),
           "gap_to_dense": float(acc[tau].mean()) - dense_acc,
           "eval_cr_mean": 100 * float(np.mean([s["params/compression"] for s in ss])),
           "wall_s_mean": float(np.mean([s["time/wall_s"] for s in ss])),
           "paper_test_acc": p.get("test_acc"), "paper_eval_cr": p.get("eval_cr")}
    for i, l in enumerate(LAYERS):
      ranks = [s["ranks"][f"rank/{l}"] for s in ss if f"rank/{l}" in s["ranks"]]
      row[f"rank_{l}_mean"] = float(np.mean(ranks)) if ranks else ""
      row[f"rank_{l}_min"] = min(ranks) if ranks else ""
      row[f"rank_{l}_max"] = max(ranks) if ranks else ""
      row[f"paper_rank{i + 1}"] = p.get(f"rank{i + 1}", "")
      for r in runs:
        steps, vals = U.series(r["metrics"], f"rank/{l}")
        curves += [{"tau": tau, "seed": int(r["config"].get("seed", 0)), "layer": l,
                    "step": int(a), "rank": int(b)} for a, b in zip(steps, vals)]
    if p and "dense" in pub:
      row["paper_gap_to_dense"] = float(p["test_acc"]) - float(pub["dense"]["test_acc"])
    rows.append(row)
  U.write_csv(os.path.join(out, "accuracy_compression.csv"), rows,
              ["tau", "seeds", "test_acc_mean", "test_acc_std", "gap_to_dense",
               "eval_cr_mean", *[f"rank_{l}_{k}" for l in LAYERS
                                 for k in ("mean", "min", "max")],
               "wall_s_mean", "paper_test_acc", "paper_gap_to_dense", "paper_eval_cr",
               *[f"paper_rank{i + 1}" for i in range(4)]])
  U.write_csv(os.path.join(out, "rank_curves.csv"), curves,
              ["tau", "seed", "layer", "step", "rank"])
  _plot(groups, order, rows, pub, out)
  return rows


def _plot(groups, order, rows, pub, out):
  taus = [t for t in order if t != "dense"]
  fig, ax = U.figure(1, len(LAYERS), size=(3.6, 3.4))
  for j, l in enumerate(LAYERS):
    a = ax[0][j]
    for i, t in enumerate(taus):
      for k, r in enumerate(groups[t]):
        st, v = U.series(r["metrics"], f"rank/{l}")
        a.plot(st, v, color=f"C{i}", lw=1, alpha=0.7,
               label=f"tau={t}" if k == 0 else None)
      p = pub.get(f"{float(t):.2f}")
      if p and p.get(f"rank{j + 1}"):
        a.axhline(float(p[f"rank{j + 1}"]), color=f"C{i}", ls=":", lw=1)
    a.set_title(f"{l}: every seed (dotted: paper's final rank)", fontsize=8)
    a.set_xlabel("step"); a.set_ylabel("rank"); a.set_yscale("log"); a.grid(alpha=.3)
  ax[0][0].legend(fontsize=7)
  U.save(fig, os.path.join(out, "rank_vs_step.png"))
  fig, ax = U.figure(1, 1)
  a = ax[0][0]
  lr = [r for r in rows if r["tau"] != "dense"]
  a.errorbar([r["eval_cr_mean"] for r in lr], [r["gap_to_dense"] for r in lr],
             yerr=[r["test_acc_std"] for r in lr], fmt="o-",
             label="ours (Fashion-MNIST, mean +- std over seeds)")
  for r in lr:
    a.annotate(r["tau"], (r["eval_cr_mean"], r["gap_to_dense"]), fontsize=7)
  pl = [p for k, p in pub.items() if k != "dense"]
  a.plot([float(p["eval_cr"]) for p in pl],
         [float(p["test_acc"]) - float(pub["dense"]["test_acc"]) for p in pl],
         "s--", label="paper (MNIST)")
  a.set_xlabel("eval compression %"); a.set_ylabel("test acc - dense (points)")
  a.legend(fontsize=7); a.grid(alpha=.3)
  U.save(fig, os.path.join(out, "accuracy_vs_compression.png"))


main = U.cli("dlrt_mlp_rank_dynamics", summarize, doc=__doc__)


if __name__ == "__main__":
  main()
