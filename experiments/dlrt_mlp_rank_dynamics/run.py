"""DLRT on the 784-wide MLP: rank vs step per layer and accuracy vs compression.

  python -m experiments.dlrt_mlp_rank_dynamics.run [--runlocal] [--dataset=mnist]
      [--workdir runs/dlrt_mlp_rank_dynamics] [--out .../results]

Writes results/accuracy_compression.csv (per tau: final ranks of fc1..fc4,
test accuracy, eval compression; the paper's row beside), results/
rank_curves.csv (step, tau, layer, rank), results/rank_vs_step.png and
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
  return "dense" if name.startswith("name=dense") else name.split("=")[1]


def summarize(workdir: str, out: str) -> list[dict]:
  """Tables and figures from the finished runs."""
  runs = {_tau_of(k): v for k, v in U.read_runs(workdir).items()}
  order = sorted(runs, key=lambda t: -1.0 if t == "dense" else float(t))
  pub = {r["tau"]: r for r in U.published("dlrt_mlp_mnist.csv")}
  dense_acc = runs["dense"]["summary"]["test/accuracy"] * 100 if "dense" in runs else np.nan
  rows, curves = [], []
  for tau in order:
    s, m = runs[tau]["summary"], runs[tau]["metrics"]
    p = pub.get(tau if tau == "dense" else f"{float(tau):.2f}", {})
    row = {"tau": tau, "test_acc": s["test/accuracy"] * 100,
           "gap_to_dense": s["test/accuracy"] * 100 - dense_acc,
           "eval_cr": 100 * s["params/compression"],
           "params_eval": s["params/eval"], "wall_s": s["time/wall_s"],
           "paper_test_acc": p.get("test_acc"), "paper_eval_cr": p.get("eval_cr")}
    for i, l in enumerate(LAYERS):
      row[f"rank_{l}"] = s["ranks"].get(f"rank/{l}", "")
      row[f"paper_rank{i + 1}"] = p.get(f"rank{i + 1}", "")
      steps, vals = U.series(m, f"rank/{l}")
      curves += [{"tau": tau, "layer": l, "step": int(a), "rank": int(b)}
                 for a, b in zip(steps, vals)]
    if p and "dense" in pub:
      row["paper_gap_to_dense"] = float(p["test_acc"]) - float(pub["dense"]["test_acc"])
    rows.append(row)
  U.write_csv(os.path.join(out, "accuracy_compression.csv"), rows,
              ["tau", "test_acc", "gap_to_dense", "eval_cr",
               *[f"rank_{l}" for l in LAYERS], "params_eval", "wall_s",
               "paper_test_acc", "paper_gap_to_dense", "paper_eval_cr",
               *[f"paper_rank{i + 1}" for i in range(4)]])
  U.write_csv(os.path.join(out, "rank_curves.csv"), curves,
              ["tau", "layer", "step", "rank"])
  _plot(runs, order, rows, pub, out)
  return rows


def _plot(runs, order, rows, pub, out):
  taus = [t for t in order if t != "dense"]
  fig, ax = U.figure(1, len(LAYERS), size=(3.6, 3.4))
  for j, l in enumerate(LAYERS):
    a = ax[0][j]
    for i, t in enumerate(taus):
      st, v = U.series(runs[t]["metrics"], f"rank/{l}")
      a.plot(st, v, color=f"C{i}", label=f"tau={t}")
      p = pub.get(f"{float(t):.2f}")
      if p and p.get(f"rank{j + 1}"):
        a.axhline(float(p[f"rank{j + 1}"]), color=f"C{i}", ls=":", lw=1)
    a.set_title(f"{l} (dotted: paper's final rank)", fontsize=8)
    a.set_xlabel("step"); a.set_ylabel("rank"); a.set_yscale("log"); a.grid(alpha=.3)
  ax[0][0].legend(fontsize=7)
  U.save(fig, os.path.join(out, "rank_vs_step.png"))
  fig, ax = U.figure(1, 1)
  a = ax[0][0]
  lr = [r for r in rows if r["tau"] != "dense"]
  a.plot([r["eval_cr"] for r in lr], [r["gap_to_dense"] for r in lr], "o-",
         label="ours (Fashion-MNIST)")
  for r in lr:
    a.annotate(r["tau"], (r["eval_cr"], r["gap_to_dense"]), fontsize=7)
  pl = [p for k, p in pub.items() if k != "dense"]
  a.plot([float(p["eval_cr"]) for p in pl],
         [float(p["test_acc"]) - float(pub["dense"]["test_acc"]) for p in pl],
         "s--", label="paper (MNIST)")
  a.set_xlabel("eval compression %"); a.set_ylabel("test acc - dense (points)")
  a.legend(); a.grid(alpha=.3)
  U.save(fig, os.path.join(out, "accuracy_vs_compression.png"))


main = U.cli("dlrt_mlp_rank_dynamics", summarize, doc=__doc__)


if __name__ == "__main__":
  main()
