"""Run the CondLR robustness study and write its results.

  python -m experiments.condlr_robustness.run [--runlocal]

Every sweep point of config.py trains through lrtrain's runner with its
LowRank layers re-initialised at rank ceil((1 - cr) min(n, m))
(`condlr.condlr_rank`); finished runs are skipped and partial ones resume
from their checkpoints. The report attacks each final checkpoint with FGSM
in [0, 1] pixel space (the data are standardised, so the model is wrapped
as x01 -> model((x01 - mean) / std)).

Outputs (results/): fgsm.csv (accuracy per method, cr, eps), fgsm.png,
kappa.csv (final log10 kappa per layer and run), kappa.png (log10 kappa of
each factorized layer over training), summary.csv.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

from experiments import common as gc
from lrtrain import attacks
from lrtrain import data as data_lib
from lrtrain import factorizations as fz
from lrtrain import layers
from lrtrain import pretrained
from lrtrain import sweep as sweep_lib
from lrtrain import train as train_lib
from lrtrain.factorizations import lowrank
from lrtrain.integrators import condlr

STUDY = "condlr_robustness"
LAYERS = ("conv1", "conv2", "fc1")


def per_layer_ranks(params, cr: float) -> dict[str, int]:
  """{layer: ceil((1 - cr) min(n, m))} of every LowRank node."""
  out = {}
  for path, x in fz.factor_paths(params):
    if isinstance(x, lowrank.LowRank):
      n, m = x.U.shape[0], x.V.shape[0]
      out[path.rsplit("/kernel", 1)[0]] = condlr.condlr_rank(n, m, cr)
  return out


def with_ranks(params, cr: float, seed: int):
  """params with each LowRank node re-drawn at its cr rank (same init law
  as lrtrain.layers: E||W||_F^2 of the dense lecun-normal draw)."""
  ranks = per_layer_ranks(params, cr)
  key = jax.random.key(seed + 1000)

  def fn(path, x):
    if not isinstance(x, lowrank.LowRank):
      return x
    name = fz.path_str(path).rsplit("/kernel", 1)[0]
    n, m = x.U.shape[0], x.V.shape[0]
    k = jax.random.fold_in(key, hash(name) % (2 ** 31))
    spec = layers.FactorSpec(kind="lowrank", rank=ranks[name])
    return layers.matrix_node(k, spec, n, m, name=name, fan_in=m)
  return jax.tree_util.tree_map_with_path(fn, params, is_leaf=fz.is_factor)


def train_all(spec: str, workdir: str) -> list[str]:
  """Train every sweep point (per-layer ranks from its study.cr)."""
  dirs = []
  for name, config, _ in sweep_lib.expand(spec):
    d = os.path.join(workdir, name)
    cr, seed = float(config.study.cr), int(config.seed)
    init = None
    if config.model.factor.kind == "lowrank":
      init = lambda run, cr=cr, seed=seed: with_ranks(run.init_params, cr, seed)
    try:
      gc.train_with(config, d, init_fn=init)
    except train_lib.DivergedError as e:
      # Reported, not hidden: the run has no summary.json and is left out.
      print(f"diverged: {name}: {e}", file=sys.stderr)
      continue
    dirs.append(d)
  return dirs


def label(cfg) -> str:
  n = cfg.integrator.name
  if n == "condlr":
    v = cfg.integrator.variant
    return "condlr mean" if v == "mean" else f"condlr approx tau={cfg.integrator.kappa_tau:g}"
  return {"kls": "KLS (DLRT)", "factors": "plain factors", "dense": "dense"}.get(n, n)


def fgsm_accuracy(run_dir: str, cache: dict) -> tuple[dict[float, float], object]:
  """{eps: accuracy} of a run's final checkpoint under FGSM."""
  cfg = gc.load_config(run_dir)
  built = train_lib.build_run(cfg)
  params = pretrained.restore_params(run_dir, built.init_params)
  key = (cfg.data.name, cfg.data.max_train, cfg.data.validation_size)
  if key not in cache:
    cache[key] = data_lib.load(cfg.data)
  ds = cache[key]
  mean = np.asarray(ds.meta["mean"], np.float32)
  std = np.asarray(ds.meta["std"], np.float32)
  # The loaders standardise raw pixels (0..255 for the IDX / CIFAR files,
  # 0..16 for sklearn's digits); eps is in units of the full pixel range.
  span = pixel_range(ds.name)
  model = built.model

  def logits01(x01):
    return model.apply({"params": params}, (x01 * span - mean) / std, train=False)

  n_att = int(cfg.study.attack_examples)
  def batches():
    seen = 0
    for b in ds.batches("test", 250, seed=0, shuffle=False):
      if seen >= n_att:
        return
      take = min(len(b["y"]), n_att - seen)
      x01 = np.clip((b["x"][:take] * std + mean) / span, 0.0, 1.0)
      seen += take
      yield {"x": x01.astype(np.float32), "y": b["y"][:take]}
  acc = attacks.robust_accuracy(logits01, batches(), list(cfg.study.eps), "fgsm",
                                clip_min=0.0, clip_max=1.0)
  # Clean accuracy of the same examples through the standardised inputs:
  # must equal acc[0] (checks the pixel-space wrapping).
  hit = n = 0
  for b in ds.batches("test", 250, seed=0, shuffle=False):
    take = min(len(b["y"]), n_att - n)
    if take <= 0:
      break
    out = model.apply({"params": params}, b["x"][:take], train=False)
    hit += int(np.sum(np.argmax(np.asarray(out), -1) == b["y"][:take]))
    n += take
  acc["clean_standardised"] = hit / max(n, 1)
  return acc, cfg


def pixel_range(name: str) -> float:
  """Raw pixel maximum of a dataset (what eps = 1 means)."""
  return 16.0 if name == "digits" else 255.0


COLORS = {"dense": "k", "KLS (DLRT)": "tab:purple", "plain factors": "tab:red",
          "condlr mean": "tab:green", "condlr approx tau=0.1": "tab:blue",
          "condlr approx tau=0.5": "tab:orange"}


def report(workdir: str, results: str) -> dict[str, str]:
  """results/*.csv and *.png from the finished runs under workdir."""
  cache, fg_rows, kap_rows, sum_rows, curves = {}, [], [], [], []
  for d in gc.finished_runs(workdir):
    acc, cfg = fgsm_accuracy(d, cache)
    s, m = gc.read_json(os.path.join(d, "summary.json")), gc.metrics(d)
    lab, cr = label(cfg), (0.0 if cfg.integrator.name == "dense" else float(cfg.study.cr))
    clean = acc.pop("clean_standardised")
    for e, a in acc.items():
      fg_rows.append({"method": lab, "cr": cr, "eps": e, "accuracy": a,
                      "clean_standardised": clean})
    krow = {"method": lab, "cr": cr}
    for layer in LAYERS:
      st, v = gc.series(m, f"spectral/{layer}/kappa_log10")
      krow[f"{layer}_kappa_log10_final"] = v[-1] if len(v) else None
      krow[f"{layer}_kappa_log10_max"] = np.nanmax(v) if len(v) else None
      curves.append((lab, cr, layer, st, v))
    kap_rows.append(krow)
    sum_rows.append({"method": lab, "cr": cr, "run": os.path.basename(d),
                     "test_accuracy": s["test/accuracy"],
                     "params_eval": s["params/eval"],
                     "compression": s["params/compression"],
                     "ranks": " ".join(f"{k[5:]}:{v}" for k, v in s["ranks"].items()),
                     "wall_s": s["time/wall_s"]})
  out = {"fgsm_csv": gc.write_csv(os.path.join(results, "fgsm.csv"), fg_rows),
         "kappa_csv": gc.write_csv(os.path.join(results, "kappa.csv"), kap_rows),
         "summary_csv": gc.write_csv(os.path.join(results, "summary.csv"), sum_rows)}

  crs = sorted({r["cr"] for r in fg_rows if r["cr"] > 0})
  fig, ax = gc.figure(1, max(len(crs), 1), (5.5, 4.2))
  dense = [r for r in fg_rows if r["cr"] == 0]
  for j, cr in enumerate(crs):
    a = ax[0, j]
    groups = {}
    for r in [r for r in fg_rows if r["cr"] == cr] + dense:
      groups.setdefault(r["method"], []).append((r["eps"], r["accuracy"]))
    for lab, pts in sorted(groups.items()):
      pts.sort()
      a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
             ls="--" if lab == "dense" else "-", label=lab, color=COLORS.get(lab))
    a.set_title(f"FGSM, LeNet5, compression {cr:.0%}")
    a.set_xlabel("eps (L_inf, [0, 1] pixels)")
    a.set_ylabel("test accuracy")
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
  out["fgsm_png"] = gc.save(fig, os.path.join(results, "fgsm.png"))

  fig, ax = gc.figure(max(len(crs), 1), len(LAYERS), (4.5, 3.5))
  for i, cr in enumerate(crs):
    for j, layer in enumerate(LAYERS):
      a = ax[i, j]
      for lab, c, l, st, v in curves:
        if c in (cr, 0.0) and l == layer and len(v):
          a.plot(st, v, ls="--" if lab == "dense" else "-", label=lab,
                 color=COLORS.get(lab))
      a.set_title(f"{layer}, cr {cr:.0%}")
      a.set_xlabel("step")
      a.set_ylabel("log10 kappa (active rank)")
      a.set_yscale("symlog", linthresh=0.1)
      a.legend(fontsize=6)
  out["kappa_png"] = gc.save(fig, os.path.join(results, "kappa.png"))
  return out


def main(argv=None) -> dict[str, str]:
  a = gc.parse_args(STUDY, argv)
  if not a.report_only:
    t = time.time()
    train_all(gc.config_spec(STUDY, a.runlocal), a.workdir)
    gc.write_wall_time(a.results, time.time() - t, "training")
  t = time.time()
  out = report(a.workdir, a.results)
  if not a.report_only:
    gc.write_wall_time(a.results, time.time() - t, "fgsm report")
  return out


if __name__ == "__main__":
  for k, v in main(sys.argv[1:]).items():
    print(f"{k}: {v}")
