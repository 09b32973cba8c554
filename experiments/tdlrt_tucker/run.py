"""Run the TDLRT Tucker-vs-matrix study and write its results.

  python -m experiments.tdlrt_tucker.run [--runlocal]

Outputs (results/): summary.csv (one row per run: family, tau, final ranks
of conv2..conv5, parameters of the factorized convolutions, their
compression, test accuracy, wall time), tucker_ranks_vs_tau.png (per-layer
Tucker channel ranks r_out / r_in vs tau, matrix ranks beside them),
accuracy_vs_compression.png (test accuracy against compression of the
factorized convolutions; dense at 0).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from experiments import common as gc
from lrtrain import factorizations as fz
from lrtrain import pretrained
from lrtrain import train as train_lib

STUDY = "tdlrt_tucker"
CONVS = ("conv2", "conv3", "conv4", "conv5")


def family(cfg) -> str:
  return {"tucker": "tucker (TDLRT)", "lowrank": "matrix (DLRT)"}.get(
      cfg.model.factor.conv_kind, "dense")


def conv_counts(params) -> dict[str, tuple[int, int]]:
  """{conv: (deployed params, dense params)} of the factorized convolutions."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=fz.is_factor)[0]:
    name = fz.path_str(path).rsplit("/kernel", 1)[0]
    if name not in CONVS or not fz.path_str(path).endswith("kernel"):
      continue
    if fz.is_factor(x):
      out[name] = (int(fz.num_params(x, False)), int(fz.dense_num_params(x)))
    else:
      out[name] = (int(np.prod(x.shape)),) * 2
  return out


def report(workdir: str, results: str) -> dict[str, str]:
  rows = []
  for d in gc.finished_runs(workdir):
    cfg, s = gc.load_config(d), gc.read_json(os.path.join(d, "summary.json"))
    params = pretrained.restore_params(d, train_lib.build_run(cfg).init_params)
    counts = conv_counts(params)
    dep = sum(c[0] for c in counts.values())
    den = sum(c[1] for c in counts.values())
    row = {"family": family(cfg),
           "tau": float(cfg.integrator.tau) if family(cfg) != "dense" else None,
           "test_accuracy": s["test/accuracy"], "conv_params": dep,
           "conv_params_dense": den, "conv_compression": 1.0 - dep / max(den, 1),
           "model_compression": s["params/compression"],
           "wall_s": s["time/wall_s"], "steps_per_sec": s["time/steps_per_sec"]}
    for c in CONVS:
      r = s["ranks"].get(f"rank/{c}")
      row[f"{c}_rank"] = (" ".join(str(v) for v in r[:2]) if isinstance(r, list)
                          else r)
    rows.append(row)
  rows.sort(key=lambda r: (r["family"], r["tau"] if r["tau"] is not None else -1))
  out = {"summary": gc.write_csv(os.path.join(results, "summary.csv"), rows)}

  # Per-layer ranks vs tau.
  fig, ax = gc.figure(1, len(CONVS), (3.6, 3.4))
  for j, c in enumerate(CONVS):
    a = ax[0, j]
    tk = [r for r in rows if r["family"].startswith("tucker") and r[f"{c}_rank"]]
    mx = [r for r in rows if r["family"].startswith("matrix") and r[f"{c}_rank"] is not None]
    if tk:
      taus = [r["tau"] for r in tk]
      ro = [int(str(r[f"{c}_rank"]).split()[0]) for r in tk]
      ri = [int(str(r[f"{c}_rank"]).split()[-1]) for r in tk]
      a.plot(taus, ro, "o-", label="Tucker r_out")
      a.plot(taus, ri, "s-", label="Tucker r_in")
    if mx:
      a.plot([r["tau"] for r in mx], [int(r[f"{c}_rank"]) for r in mx], "^--",
             label="matrix rank")
    a.set_title(c)
    a.set_xlabel("tau")
    a.set_ylabel("rank")
    a.legend(fontsize=7)
  out["ranks_png"] = gc.save(fig, os.path.join(results, "tucker_ranks_vs_tau.png"))

  fig, ax = gc.figure(1, 1, (6, 4.2))
  for fam, mk in (("tucker (TDLRT)", "o-"), ("matrix (DLRT)", "^--"), ("dense", "k*")):
    pts = sorted((r["conv_compression"], r["test_accuracy"], r["tau"])
                 for r in rows if r["family"] == fam)
    if not pts:
      continue
    ax[0, 0].plot([p[0] for p in pts], [p[1] for p in pts], mk, label=fam, ms=7)
    for x, y, t in pts:
      if t is not None:
        ax[0, 0].annotate(f"{t:g}", (x, y), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")
  ax[0, 0].set_xlabel("compression of conv2..conv5 (1 - params / dense)")
  ax[0, 0].set_ylabel("test accuracy")
  ax[0, 0].set_title("small VGG: Tucker vs matrix factorized convolutions (labels: tau)")
  ax[0, 0].grid(alpha=0.3)
  ax[0, 0].legend()
  out["acc_png"] = gc.save(fig, os.path.join(results, "accuracy_vs_compression.png"))
  return out


main = gc.cli(STUDY, report, doc=__doc__)


if __name__ == "__main__":
  main()
