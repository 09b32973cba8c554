"""DLRT tau sweep on LeNet5: run (or resume) the sweep, then tables + figures.

  python -m experiments.dlrt_lenet5_tau.run [--runlocal] [--dataset=mnist]
      [--workdir runs/dlrt_lenet5_tau] [--out experiments/dlrt_lenet5_tau/results]

Writes results/tau_sweep.csv (mean and std over seeds per tau: test
accuracy, final ranks of conv1 / conv2 / fc1, eval and train compression),
results/paper_vs_ours.csv, results/paper_accounting.csv and
results/tau_sweep.png.

Compression accounting. Ours: a LowRank layer costs r (n + m) + r^2 at
evaluation (U, S, V; biases and the dense head counted in full); during
training the rank-adaptive step also holds the augmented basis of 2r
columns, 2r (n + m) + (2r)^2 per layer ("train"). The paper's eval column
is reproduced by a least-squares fit  1 - (sum_l r_l (n_l + m_l) + r_l^2
+ H) / D  over its 8 rows (`paper_accounting`), which shows which
reference size D its numbers imply.

References:
  Schotthoefer et al., "Low-rank lottery tickets", NeurIPS 2022, Table 2.
"""

from __future__ import annotations

import os

import numpy as np

from experiments import common as U

LAYERS = ("conv1", "conv2", "fc1")
# (n, m) = (out, in) of the factorized matrices of LeNet5 on 28x28 inputs.
SHAPES = {"conv1": (20, 25), "conv2": (50, 500), "fc1": (500, 800)}


def lowrank_cost(r: float, n: int, m: int) -> float:
  """Parameters of U S V^T at rank r."""
  return r * (n + m) + r * r


def paper_accounting(rows=None) -> dict:
  """Fit the paper's eval c.r. as 1 - (sum lowrank_cost + H) / D.

  Returns:
    {'D', 'H', 'max_abs_err_pct'} of the least-squares fit over the
    published rows with ranks.
  """
  rows = rows or U.published("dlrt_lenet5_mnist.csv")
  rows = [r for r in rows if r["rank_conv1"]]
  E = np.array([sum(lowrank_cost(float(r[f"rank_{l}"]), *SHAPES[l])
                    for l in LAYERS) for r in rows])
  keep = 1.0 - np.array([float(r["eval_cr"]) for r in rows]) / 100.0
  A = np.stack([keep, -np.ones_like(keep)], 1)
  (D, H), *_ = np.linalg.lstsq(A, E, rcond=None)
  pred = 100.0 * (1.0 - (E + H) / D)
  err = np.abs(pred - np.array([float(r["eval_cr"]) for r in rows]))
  return {"D": float(D), "H": float(H), "max_abs_err_pct": float(err.max())}


def _tau_of(name: str) -> str:
  return "dense" if name.startswith("name=dense") else name.split(",")[0].split("=")[1]


def summarize(workdir: str, out: str) -> list[dict]:
  """Aggregate the runs over seeds; write the CSVs and the figure."""
  runs = U.read_runs(workdir)
  groups: dict[str, list[dict]] = {}
  first: dict[str, list[dict]] = {}
  for name, r in runs.items():
    groups.setdefault(_tau_of(name), []).append(r["summary"])
    # Ranks after the first step (step 0 logs the initial ranks): how much
    # of the final rank was set by the first truncation of the initial
    # spectrum.
    row0 = next((m for m in r["metrics"] if "rank/fc1" in m and m["step"] > 0),
                {})
    first.setdefault(_tau_of(name), []).append(row0)
  dense_total = None
  rows = []
  fit = paper_accounting()
  for tau in sorted(groups, key=lambda t: -1.0 if t == "dense" else float(t)):
    ss = groups[tau]
    acc = np.array([s["test/accuracy"] for s in ss]) * 100
    row = {"tau": tau, "seeds": len(ss), "test_acc_mean": float(acc.mean()),
           "test_acc_std": float(acc.std()),
           "eval_cr_mean": 100 * float(np.mean([s["params/compression"] for s in ss]))}
    dense = ss[0]["params/dense"]
    dense_total = dense
    fixed = dense - sum(n * m for n, m in SHAPES.values())   # head + biases
    if tau == "dense":
      row.update(train_cr_mean=0.0, paper_acct_cr_mean=0.0)
    else:
      ranks = {l: np.array([s["ranks"][f"rank/{l}"] for s in ss], float)
               for l in LAYERS}
      for l in LAYERS:
        row[f"rank_{l}_mean"] = float(ranks[l].mean())
        row[f"rank_{l}_min"] = int(ranks[l].min())
        row[f"rank_{l}_max"] = int(ranks[l].max())
        row[f"rank_{l}_first_log"] = float(np.mean(
            [m.get(f"rank/{l}", np.nan) for m in first[tau]]))
      # Training holds the augmented basis: 2r columns, capped at min(n, m).
      train = sum(lowrank_cost(np.minimum(2 * ranks[l], min(SHAPES[l])), *SHAPES[l])
                  for l in LAYERS) + fixed
      row["train_cr_mean"] = 100 * float(np.mean(1 - train / dense))
      E = sum(lowrank_cost(ranks[l], *SHAPES[l]) for l in LAYERS)
      row["paper_acct_cr_mean"] = 100 * float(np.mean(1 - (E + fit["H"]) / fit["D"]))
    row["wall_s_mean"] = float(np.mean([s["time/wall_s"] for s in ss]))
    rows.append(row)
  cols = ["tau", "seeds", "test_acc_mean", "test_acc_std",
          *[f"rank_{l}_{k}" for l in LAYERS
            for k in ("mean", "min", "max", "first_log")],
          "eval_cr_mean", "train_cr_mean", "paper_acct_cr_mean", "wall_s_mean"]
  U.write_csv(os.path.join(out, "tau_sweep.csv"), rows, cols)
  U.write_csv(os.path.join(out, "paper_accounting.csv"), [{
      **fit, "ours_dense_params": dense_total,
      "formula": "cr = 1 - (sum_l r_l(n_l+m_l) + r_l^2 + H) / D"}])
  # Paper beside ours, one row per tau.
  pub = {("dense" if r["tau"] == "full" else f"{float(r['tau']):g}"): r
         for r in U.published("dlrt_lenet5_mnist.csv")}
  dense_acc = next((r["test_acc_mean"] for r in rows if r["tau"] == "dense"), np.nan)
  both = []
  for r in rows:
    key = r["tau"] if r["tau"] == "dense" else f"{float(r['tau']):g}"
    p = pub.get(key, {})
    p_dense = float(pub["dense"]["test_acc"])
    both.append({
        "tau": r["tau"],
        "paper_acc": p.get("test_acc"), "ours_acc": r["test_acc_mean"],
        "paper_gap_to_dense": (float(p["test_acc"]) - p_dense) if p else None,
        "ours_gap_to_dense": r["test_acc_mean"] - dense_acc,
        "paper_ranks": "/".join(p.get(f"rank_{l}", "") for l in LAYERS) if p else "",
        "ours_ranks": "/".join(f"{r.get(f'rank_{l}_mean', float('nan')):.1f}"
                               for l in LAYERS) if r["tau"] != "dense" else "",
        "paper_eval_cr": p.get("eval_cr"), "ours_eval_cr": r["eval_cr_mean"],
        "ours_eval_cr_paper_acct": r["paper_acct_cr_mean"],
        "paper_train_cr": p.get("train_cr"), "ours_train_cr": r["train_cr_mean"]})
  U.write_csv(os.path.join(out, "paper_vs_ours.csv"), both)
  _plot(rows, pub, os.path.join(out, "tau_sweep.png"))
  return rows


def _plot(rows, pub, path):
  fig, ax = U.figure(1, 3, size=(4.6, 3.8))
  ax = ax[0]
  lr = [r for r in rows if r["tau"] != "dense"]
  taus = [float(r["tau"]) for r in lr]
  dense = next((r for r in rows if r["tau"] == "dense"), None)
  p_lr = [p for k, p in pub.items() if k != "dense"]
  p_taus = [float(p["tau"]) for p in p_lr]
  a = ax[0]
  a.errorbar(taus, [r["test_acc_mean"] - (dense["test_acc_mean"] if dense else 0)
                    for r in lr], yerr=[r["test_acc_std"] for r in lr],
             marker="o", label="ours (Fashion-MNIST)")
  a.plot(p_taus, [float(p["test_acc"]) - float(pub["dense"]["test_acc"]) for p in p_lr],
         "s--", label="paper (MNIST)")
  a.set_xlabel("tau"); a.set_ylabel("test acc - dense (points)")
  a.legend(fontsize=8); a.grid(alpha=.3)
  b = ax[1]
  for i, l in enumerate(LAYERS):
    b.plot(taus, [r[f"rank_{l}_mean"] for r in lr], "o-", color=f"C{i}", label=f"ours {l}")
    b.plot(p_taus, [float(p[f"rank_{l}"]) for p in p_lr], "s--", color=f"C{i}",
           alpha=.6, label=f"paper {l}")
  b.set_yscale("log"); b.set_xlabel("tau"); b.set_ylabel("final rank")
  b.legend(fontsize=7, ncol=2); b.grid(alpha=.3)
  c = ax[2]
  c.plot([r["eval_cr_mean"] for r in lr], [r["test_acc_mean"] for r in lr], "o-",
         label="ours, eval c.r.")
  c.plot([r["paper_acct_cr_mean"] for r in lr], [r["test_acc_mean"] for r in lr],
         "^:", label="ours, paper's accounting")
  c.set_xlabel("compression %"); c.set_ylabel("test accuracy % (ours)")
  c.legend(fontsize=8); c.grid(alpha=.3)
  U.save(fig, path)


main = U.cli("dlrt_lenet5_tau", summarize, doc=__doc__)


if __name__ == "__main__":
  main()
