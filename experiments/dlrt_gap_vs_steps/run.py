"""Dense vs DLRT on LeNet5: run both, then the gap as training runs.

  python -m experiments.dlrt_gap_vs_steps.run [--runlocal] [--dataset=mnist]
      [--workdir runs/dlrt_gap_vs_steps] [--out experiments/dlrt_gap_vs_steps/results]

Writes results/curves.csv (step, validation accuracy of each, gap, DLRT
ranks), results/paper_gap.csv (the authors' per-epoch test accuracies of
one dense and one tau = 0.11 run on MNIST, as steps of batch 128),
results/final.csv (test accuracy, parameters, final ranks) and
results/gap_vs_steps.png.

References:
  Schotthoefer et al., "Low-rank lottery tickets", NeurIPS 2022; their
  result files (third_party/published/dlrt_lenet5_mnist_epochs.csv).
"""

from __future__ import annotations

import os


from experiments import common as U

PAPER_STEPS_PER_EPOCH = 391      # ceil(50,000 / 128): the authors' loader
LAYERS = ("conv1", "conv2", "fc1")


def paper_gap() -> list[dict]:
  """The authors' per-epoch accuracies, at the step each epoch ends."""
  out = []
  for r in U.published("dlrt_lenet5_mnist_epochs.csv"):
    e = int(r["epoch"])
    d, l = float(r["dense_test_acc"]), float(r["dlrt_tau0.11_test_acc"])
    out.append({"epoch": e, "step": (e + 1) * PAPER_STEPS_PER_EPOCH,
                "dense_acc": d, "dlrt_acc": l, "gap": d - l,
                "dlrt_ranks": r["dlrt_tau0.11_ranks"]})
  return out


def _run(runs: dict, integ: str) -> dict:
  for r in runs.values():
    if r["summary"].get("integrator") == integ:
      return r
  raise FileNotFoundError(f"no finished {integ!r} run")


def summarize(workdir: str, out: str) -> dict:
  """curves.csv, paper_gap.csv, final.csv and the figure; the final row."""
  runs = U.read_runs(workdir)
  dense, dlrt = _run(runs, "dense"), _run(runs, "kls")
  sd, ad = U.series(dense["metrics"], "eval/accuracy")
  sl, al = U.series(dlrt["metrics"], "eval/accuracy")
  common = sorted(set(sd.tolist()) & set(sl.tolist()))
  dmap, lmap = dict(zip(sd.tolist(), ad)), dict(zip(sl.tolist(), al))
  rank_rows = {int(m["step"]): m for m in dlrt["metrics"] if "rank/fc1" in m}
  curves = []
  for s in common:
    rr = rank_rows.get(int(s), {})
    curves.append({"step": int(s), "dense_val_acc": 100 * dmap[s],
                   "dlrt_val_acc": 100 * lmap[s],
                   "gap": 100 * (dmap[s] - lmap[s]),
                   **{f"rank_{l}": rr.get(f"rank/{l}", "") for l in LAYERS}})
  pg = paper_gap()
  U.write_csv(os.path.join(out, "curves.csv"), curves)
  U.write_csv(os.path.join(out, "paper_gap.csv"), pg)
  ds, ls = dense["summary"], dlrt["summary"]
  final = {"steps": ls["steps"], "dense_test_acc": 100 * ds["test/accuracy"],
           "dlrt_test_acc": 100 * ls["test/accuracy"],
           "gap": 100 * (ds["test/accuracy"] - ls["test/accuracy"]),
           "dense_params": ds["params/eval"], "dlrt_eval_params": ls["params/eval"],
           "dlrt_eval_cr": 100 * ls["params/compression"],
           **{f"rank_{l}": ls["ranks"].get(f"rank/{l}") for l in LAYERS},
           "first_step_within_2": next((c["step"] for c in curves
                                        if c["gap"] <= 2.0), "")}
  U.write_csv(os.path.join(out, "final.csv"), [final])

  fig, ax = U.figure(1, 2, size=(5.5, 4.2))
  a, b = ax[0]
  a.plot(sd, 100 * ad, "-", color="C0", label="dense (ours)")
  a.plot(sl, 100 * al, "-", color="C1", label="DLRT tau 0.11 (ours)")
  a.set_xlabel("step"); a.set_ylabel("validation accuracy %")
  a.set_title("Fashion-MNIST, SGD lr 0.05, batch 128"); a.legend(); a.grid(alpha=.3)
  b.plot([c["step"] for c in curves], [c["gap"] for c in curves], "o-", ms=3,
         color="C2", label="ours (Fashion-MNIST, validation)")
  b.plot([p["step"] for p in pg], [p["gap"] for p in pg], "s--", ms=4,
         color="gray", label="paper's logs (MNIST, test, one run each)")
  b.axhline(2.0, color="k", lw=0.8, ls=":")
  b.set_xlabel("step"); b.set_ylabel("dense - DLRT accuracy (points)")
  b.set_title("gap as training runs"); b.legend(); b.grid(alpha=.3)
  U.save(fig, os.path.join(out, "gap_vs_steps.png"))
  return final


main = U.cli("dlrt_gap_vs_steps", summarize, doc=__doc__)


if __name__ == "__main__":
  main()
