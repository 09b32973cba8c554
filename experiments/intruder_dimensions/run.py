"""Run the intruder-dimensions study and write its results.

  python -m experiments.intruder_dimensions.run [--runlocal]

Steps: pre-train a dense MLP on task A (classes 0-4); fine-tune every sweep
point of config.py on task B (classes 5-9) from that checkpoint (LoRA: the
pre-trained kernels become the frozen W0, B = 0; full: the pre-trained
params themselves); the runner's diagnostics log intruders/<layer>/maxsim
against the pre-trained weights. Finished runs are skipped, partial ones
resume from their checkpoints.

Matched target accuracy: each method is read at the first evaluation step
where its task-B validation accuracy reaches study.target_accuracy (eval
and diagnostics share a cadence); a run that never reaches it is read at
its last step and flagged (reached = False).

Outputs (results/): methods.csv, count_vs_eps.png, count_vs_k.png,
intruder_position.csv / .png, forgetting.csv / .png (with Spearman rho).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common as gc
from lrtrain import data as data_lib
from lrtrain import models
from lrtrain import pretrained
from lrtrain import sweep as sweep_lib

STUDY = "intruder_dimensions"
EPS_GRID = np.round(np.arange(0.05, 1.0001, 0.05), 2)


# --------------------------------------------------------------------------
# Tasks and initialisation.
# --------------------------------------------------------------------------


def task_dataset(full: data_lib.Dataset, classes) -> data_lib.Dataset:
  """The examples of `classes` in every split, labels unchanged (10-way)."""
  keep = np.asarray(classes)
  splits = {k: (x[np.isin(y, keep)], y[np.isin(y, keep)])
            for k, (x, y) in full.splits.items()}
  return data_lib.Dataset(full.name, full.task, full.num_classes,
                          full.input_shape, splits, meta=dict(full.meta))


def task_accuracy(model, params, ds: data_lib.Dataset, classes, split="test") -> float:
  """Accuracy on `classes` with the argmax over those classes' logits."""
  cls = jnp.asarray(classes)
  f = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)[:, cls])
  hit = n = 0
  for b in ds.batches(split, 500, seed=0, shuffle=False):
    pred = np.asarray(cls)[np.asarray(jnp.argmax(f(params, b["x"]), -1))]
    hit += int(np.sum(pred == b["y"]))
    n += len(b["y"])
  return hit / max(n, 1)


def _model(cfg, ds):
  m = models.build(cfg.model, num_classes=ds.num_classes, input_shape=ds.input_shape)
  like = models.init_params(m, jax.random.key(0), ds.input_shape)
  return m, like


# --------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------


def train_all(runlocal: bool, workdir: str, train: bool = True):
  """Pre-train, then fine-tune every sweep point (train=False: only load
  the data and the pre-trained params). Returns (datasets, pre)."""
  pre_spec = gc.config_spec(STUDY, runlocal, "stage=pretrain")
  pre_cfg = sweep_lib.expand(pre_spec)[0][1]
  full = data_lib.load(pre_cfg.data)
  ds_a, ds_b = task_dataset(full, pre_cfg.study.task_a), task_dataset(full, pre_cfg.study.task_b)
  pre_dir = os.path.join(workdir, "pretrain")
  if train:
    gc.train_with(pre_cfg, pre_dir, dataset=ds_a)
  model, like = _model(pre_cfg, full)
  pre = pretrained.restore_params(pre_dir, like)
  for name, cfg, _ in sweep_lib.expand(gc.config_spec(STUDY, runlocal)):
    if not train:
      break
    gc.train_with(cfg, os.path.join(workdir, "finetune", name), dataset=ds_b,
                  init_fn=lambda run: pretrained.adapt(run.init_params, pre))
  return (full, ds_a, ds_b), (model, pre, pre_cfg)


# --------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------


def maxsim_at(rows, layers, step) -> np.ndarray:
  """(layers, top_k) maxsim vectors logged at `step`."""
  out = []
  for layer in layers:
    st, v = gc.series(rows, f"intruders/{layer}/maxsim")
    out.append(v[list(st).index(step)])
  return np.stack(out)


def count(ms: np.ndarray, eps: float, k: int) -> int:
  """Intruders among the top k of every matrix (NaN padding never counts)."""
  top = ms[:, :k]
  return int(np.sum(np.nan_to_num(top, nan=1.0) < eps))


def matched_step(rows, target: float) -> tuple[int, bool]:
  """First step with eval/accuracy >= target that also has diagnostics."""
  st_e, acc = gc.series(rows, "eval/accuracy")
  st_d, _ = gc.series(rows, "params/train")
  have = set(st_d.tolist())
  for s, a in zip(st_e, acc):
    if a >= target and int(s) in have:
      return int(s), True
  return int(st_d[-1]), False


def method_label(cfg) -> str:
  if cfg.integrator.name == "dense":
    return "full FT"
  rs = "rsLoRA" if cfg.model.factor.rank_stabilised else "LoRA"
  return f"{rs} r={cfg.model.factor.rank}"


def spearman(x, y) -> float:
  """Spearman rank correlation (scipy when present, else ranks + Pearson)."""
  try:
    from scipy import stats  # pylint: disable=g-import-not-at-top
    return float(stats.spearmanr(x, y).statistic)
  except ImportError:
    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


def report(workdir: str, results: str, datasets, pre_info) -> dict[str, str]:
  full, ds_a, ds_b = datasets
  model_pre, pre, pre_cfg = pre_info
  study = pre_cfg.study
  layers, k, eps = tuple(study.layers), int(study.k), float(study.eps)
  acc_a_pre = task_accuracy(model_pre, pre, ds_a, study.task_a)
  ft_dir = os.path.join(workdir, "finetune")
  runs = []
  for d in gc.finished_runs(ft_dir):
    cfg, rows = gc.load_config(d), gc.metrics(d)
    step, reached = matched_step(rows, float(study.target_accuracy))
    ms = maxsim_at(rows, layers, step)
    last = int(gc.series(rows, "params/train")[0][-1])
    ms_last = maxsim_at(rows, layers, last)
    model, like = _model(cfg, full)
    params = pretrained.restore_params(d, like)
    runs.append(dict(dir=d, cfg=cfg, rows=rows, label=method_label(cfg), step=step,
                     reached=reached, ms=ms, ms_last=ms_last,
                     acc_b=task_accuracy(model, params, ds_b, study.task_b),
                     acc_a=task_accuracy(model, params, ds_a, study.task_a),
                     lr=float(cfg.optimizer.learning_rate)))
  base = [r for r in runs if r["cfg"].integrator.name == "dense"
          or abs(r["lr"] - 1e-3) < 1e-12]
  table = []
  for r in runs:
    table.append({"method": r["label"], "lr": r["lr"], "matched_step": r["step"],
                  "reached_target": r["reached"],
                  f"intruders_eps{eps:g}_k{k}_matched": count(r["ms"], eps, k),
                  f"intruders_eps{eps:g}_k{k}_final": count(r["ms_last"], eps, k),
                  "taskB_test_acc_final": r["acc_b"], "taskA_test_acc_final": r["acc_a"],
                  "forgetting_taskA": acc_a_pre - r["acc_a"]})
  out = {"methods": gc.write_csv(os.path.join(results, "methods.csv"), table)}

  def order(r):
    c = r["cfg"]
    return (c.integrator.name == "dense", c.model.factor.rank_stabilised,
            c.model.factor.rank)
  base.sort(key=order)

  # Count vs eps (k fixed), one line per method, at the matched step.
  fig, ax = gc.figure(1, 2, (5.5, 4.2))
  for j, rs in enumerate((False, True)):
    a = ax[0, j]
    for r in base:
      if r["cfg"].integrator.name == "lora" and bool(r["cfg"].model.factor.rank_stabilised) != rs:
        continue
      a.plot(EPS_GRID, [count(r["ms"], e, k) for e in EPS_GRID],
             ls="--" if r["label"] == "full FT" else "-", marker=".", label=r["label"])
    a.set_title(f"{'rank-stabilised' if rs else 'standard'} scaling, k = {k}")
    a.set_xlabel("eps (max |cos| threshold)")
    a.set_ylabel(f"intruders in {'+'.join(layers)}")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
  out["count_vs_eps"] = gc.save(fig, os.path.join(results, "count_vs_eps.png"))
  eps_rows = [{"method": r["label"], "eps": e, "k": k, "count": count(r["ms"], e, k)}
              for r in base for e in EPS_GRID]
  out["count_vs_eps_csv"] = gc.write_csv(os.path.join(results, "count_vs_eps.csv"), eps_rows)

  # Count vs k (fraction of all singular vectors), eps fixed.
  p = min(int(pre_cfg.model.widths[0]), int(pre_cfg.model.widths[-1]))
  fig, ax = gc.figure(1, 1, (6.5, 4.2))
  kmax = base[0]["ms"].shape[1] if base else 1
  ks = np.arange(1, kmax + 1)
  for r in base:
    ax[0, 0].plot(ks / p, [count(r["ms"], eps, kk) for kk in ks],
                  ls="--" if r["label"] == "full FT" else "-", label=r["label"])
  ax[0, 0].set_xlabel(f"k / {p} (fraction of singular vectors examined)")
  ax[0, 0].set_ylabel(f"intruders (eps = {eps})")
  ax[0, 0].legend(fontsize=6, ncol=2)
  out["count_vs_k"] = gc.save(fig, os.path.join(results, "count_vs_k.png"))

  # Top intruder's rank position (and sigma) in fc1 over training.
  pos_rows = []
  fig, ax = gc.figure(1, 2, (5.5, 4.0))
  for r in base:
    if r["cfg"].model.factor.rank_stabilised or r["cfg"].integrator.name != "lora":
      if r["label"] != "full FT":
        continue
    st, ms = gc.series(r["rows"], f"intruders/{layers[0]}/maxsim")
    _, sv = gc.series(r["rows"], f"intruders/{layers[0]}/sv")
    pos, sig = [], []
    for t, v, s in zip(st, ms, sv):
      idx = np.flatnonzero(np.nan_to_num(v[:k], nan=1.0) < eps)
      pos.append(idx[0] + 1 if len(idx) else np.nan)
      sig.append(s[idx[0]] if len(idx) else np.nan)
      pos_rows.append({"method": r["label"], "step": int(t),
                       "position": pos[-1], "sigma": sig[-1]})
    ax[0, 0].plot(st, pos, marker="o", ms=3, label=r["label"])
    ax[0, 1].plot(st, sig, marker="o", ms=3, label=r["label"])
  ax[0, 0].set_ylabel(f"rank position of top intruder in {layers[0]} (1 = top)")
  ax[0, 0].invert_yaxis()
  ax[0, 1].set_ylabel("its singular value")
  for a in ax[0]:
    a.set_xlabel("fine-tuning step")
    a.legend(fontsize=6)
  out["position"] = gc.save(fig, os.path.join(results, "intruder_position.png"))
  out["position_csv"] = gc.write_csv(os.path.join(results, "intruder_position.csv"), pos_rows)

  # Forgetting vs intruders over the learning-rate sweep at the sweep rank.
  r_sw = sorted({r["cfg"].model.factor.rank for r in runs
                 if r["cfg"].integrator.name == "lora" and abs(r["lr"] - 1e-3) > 1e-12})
  sw = [r for r in runs if r["cfg"].integrator.name == "lora" and r_sw
        and r["cfg"].model.factor.rank == r_sw[0]
        and not r["cfg"].model.factor.rank_stabilised]
  sw.sort(key=lambda r: r["lr"])
  x = np.array([count(r["ms_last"], eps, k) for r in sw], float)
  y = np.array([acc_a_pre - r["acc_a"] for r in sw], float)
  rho = spearman(x, y) if len(sw) > 2 else float("nan")
  fr = [{"lr": r["lr"], "rank": r["cfg"].model.factor.rank, "intruders_final": int(c),
         "forgetting_taskA": f, "taskA_acc": r["acc_a"], "taskB_acc": r["acc_b"]}
        for r, c, f in zip(sw, x, y)]
  fr.append({"lr": "spearman_rho", "rank": "", "intruders_final": "",
             "forgetting_taskA": rho, "taskA_acc": acc_a_pre, "taskB_acc": ""})
  out["forgetting_csv"] = gc.write_csv(os.path.join(results, "forgetting.csv"), fr)
  fig, ax = gc.figure(1, 1, (5.5, 4.2))
  ax[0, 0].scatter(x, y)
  for r, xi, yi in zip(sw, x, y):
    ax[0, 0].annotate(f"lr={r['lr']:g}", (xi, yi), fontsize=7, xytext=(3, 3),
                      textcoords="offset points")
  ax[0, 0].set_xlabel(f"intruders (eps {eps}, k {k}, final)")
  ax[0, 0].set_ylabel("forgetting: task-A accuracy drop")
  ax[0, 0].set_title(f"LoRA r={r_sw[0] if r_sw else '?'} lr sweep, Spearman rho = {rho:.3f}")
  out["forgetting_png"] = gc.save(fig, os.path.join(results, "forgetting.png"))
  return out


def main(argv=None) -> dict[str, str]:
  a = gc.parse_args(STUDY, argv)
  t = time.time()
  datasets, pre_info = train_all(a.runlocal, a.workdir, train=not a.report_only)
  if not a.report_only:
    gc.write_wall_time(a.results, time.time() - t, "pre-training + fine-tuning")
  return report(a.workdir, a.results, datasets, pre_info)


if __name__ == "__main__":
  for k, v in main(sys.argv[1:]).items():
    print(f"{k}: {v}")
