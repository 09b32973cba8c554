"""Helpers shared by the DLRT / Cuttlefish studies under experiments/.

  run_sweep(config_file, workdir, runlocal)    lrtrain.sweep over get_sweep
  read_runs(workdir)                           summary.json + metrics.jsonl per run
  custom_run(config, workdir, params=..., integrator=...)
                                               a short training loop for runs
                                               the runner cannot express (a
                                               given initial params tree, a
                                               study-local integrator)
  write_csv / published / savefig              small I/O helpers

Every study keeps its raw runs under runs/<study>/ (not in git) and writes
its tables and figures to experiments/<study>/results/.
"""

from __future__ import annotations

import csv
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = os.path.join(REPO, "third_party", "published")


def config_spec(config_file: str, runlocal: bool, extra: str = "") -> str:
  """'path/config.py[:runlocal,extra]' for lrtrain.sweep."""
  args = [a for a in ("runlocal" if runlocal else "", extra) if a]
  return config_file + (":" + ",".join(args) if args else "")


def run_sweep(config_file: str, workdir: str, *, runlocal: bool = False,
              extra: str = "") -> list[str]:
  """Run (or resume) every sweep point of a study config; run directories."""
  from lrtrain import sweep  # pylint: disable=g-import-not-at-top
  return sweep.run_all(config_spec(config_file, runlocal, extra), workdir)


def study_args(argv, doc: str, study: str, here: str):
  """The common command line of a study's run.py: --runlocal, --dataset,
  --workdir (runs/<study>), --out (<study>/results); also the sweep's
  extra config argument for --dataset."""
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--runlocal", action="store_true", help="CI smoke variant")
  p.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist|mnist")
  p.add_argument("--workdir", default=os.path.join("runs", study))
  p.add_argument("--out", default=os.path.join(here, "results"))
  a = p.parse_args(argv)
  a.extra = "" if a.dataset == "fashion_mnist" else f"dataset={a.dataset}"
  return a


def read_jsonl(path: str) -> list[dict]:
  """Rows of a metrics.jsonl file ([] when missing)."""
  if not os.path.exists(path):
    return []
  with open(path) as fh:
    return [json.loads(line) for line in fh if line.strip()]


def read_runs(workdir: str) -> dict[str, dict]:
  """{run name: {'summary', 'metrics', 'config'}} of finished runs."""
  out = {}
  for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
    d = os.path.join(workdir, name)
    s = os.path.join(d, "summary.json")
    if not os.path.exists(s):
      continue
    with open(s) as fh:
      summary = json.load(fh)
    cfg = {}
    if os.path.exists(os.path.join(d, "config.json")):
      with open(os.path.join(d, "config.json")) as fh:
        cfg = json.load(fh)
    out[name] = {"summary": summary, "config": cfg,
                 "metrics": read_jsonl(os.path.join(d, "metrics.jsonl"))}
  return out


def series(metrics: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one metric key over a run's metrics rows."""
  pts = [(r["step"], r[key]) for r in metrics if key in r]
  if not pts:
    return np.zeros(0), np.zeros(0)
  s, v = zip(*pts)
  return np.asarray(s), np.asarray(v, dtype=float)


def published(name: str) -> list[dict]:
  """Rows of third_party/published/<name> as dicts of strings."""
  with open(os.path.join(PUBLISHED, name)) as fh:
    return list(csv.DictReader(fh))


def write_csv(path: str, rows: list[dict], columns: list[str] | None = None) -> str:
  """Write rows (dicts) to a CSV; floats with 4 significant decimals."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  columns = columns or list(dict.fromkeys(k for r in rows for k in r))

  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4f}" if np.isfinite(v) else ""
    return "" if v is None else v
  with open(path, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=columns)
    w.writeheader()
    for r in rows:
      w.writerow({c: fmt(r.get(c)) for c in columns})
  return path


def new_figure(ncols: int = 1, nrows: int = 1, size=(6.0, 4.2)):
  """A matplotlib Figure with an Agg canvas and its axes (no pyplot state)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


def savefig(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def custom_run(config, workdir: str, *, params: Any = None,
               integrator: Any = None, num_steps: int | None = None,
               eval_every: int | None = None,
               prepare: Callable[[Any], Any] | None = None,
               start_step: int = 0) -> dict:
  """Train from a given params tree with a given integrator; write a workdir.

  The runner (`lrtrain.train.train_and_evaluate`) always starts from the
  model's own init and builds its integrator by name; studies that switch
  factorizations mid-training or use a study-local integrator use this
  loop instead. It writes metrics.jsonl (train loss, validation accuracy,
  ranks) and summary.json with the runner's keys. A finished workdir
  (summary.json present) is read back instead of retrained, so an
  interrupted study resumes run by run.

  Args:
    config: a resolved config (data, model, optimizer, train fields used).
    workdir: run directory.
    params: initial params (default: the model's init for config.seed).
    integrator: an `Integrator` (default: built from config.integrator).
    num_steps: steps (default: the config's).
    eval_every: steps between validation passes (default config.train's).
    prepare: optional map applied to the initial params (e.g. a change of
      factorization) before the optimizer state is built.
    start_step: position in the training data stream (a run continuing
      another one sees the batches that run would have seen next).

  Returns:
    The summary dict.
  """
  from lrtrain import train  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):
    with open(path) as fh:
      return json.load(fh)
  os.makedirs(workdir, exist_ok=True)
  run = train.build_run(config)
  ds, loss_fn = run["ds"], run["loss_fn"]
  integ = integrator if integrator is not None else run["integrator"]
  params = run["init_params"] if params is None else params
  if prepare is not None:
    params = prepare(params)
  total = int(num_steps if num_steps is not None else run["total"])
  every = int(eval_every or config.train.eval_every or total)
  sharder = train.Sharder()
  eval_fn = train.make_eval_fn(run["model"], ds.task)
  state = integ.init(params)
  params, state, _ = integ.resize(params, state)
  step_fn = jax.jit(lambda p, s, b: integ.step(loss_fn, p, s, b))
  batches = ds.batches("train", config.train.batch_size, seed=config.seed,
                       start_step=start_step)
  rows, t_loop, t_first = [], 0.0, 0.0
  for step in range(1, total + 1):
    batch = sharder.batch(next(batches))
    t0 = time.time()
    params, state, aux = step_fn(params, state, batch)
    params, state, _ = integ.resize(params, state)
    jax.block_until_ready(params)
    if step == 1:
      t_first = time.time() - t0   # compilation + first step
    else:
      t_loop += time.time() - t0
    if step % max(config.train.log_every, 1) == 0 or step == total:
      aux = jax.device_get(aux)
      row = {"step": step, "train/loss": float(aux["loss"])}
      row.update({k: np.asarray(v).tolist() for k, v in aux.items()
                  if k.startswith("rank/")})
      rows.append(row)
    if step % every == 0 or step == total:
      ev = train.evaluate(eval_fn, params, ds, "validation",
                          config.train.eval_batch_size, sharder)
      rows.append({"step": step, **{f"eval/{k}": float(v) for k, v in ev.items()}})
  test = train.evaluate(eval_fn, params, ds, "test",
                        config.train.eval_batch_size, sharder)
  counts = train.param_counts(params)
  summary = {
      "steps": total, "test/accuracy": test.get("accuracy"),
      "test/loss": test.get("loss"), "params/train": counts["train"],
      "params/eval": counts["eval"], "params/dense": counts["dense"],
      "params/compression": counts["compression"],
      "ranks": train.host_ranks(params), "time/first_step_s": t_first,
      "time/train_loop_s": t_loop,
      "time/steps_per_sec": (total - 1) / max(t_loop, 1e-9),
  }
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as fh:
    for r in rows:
      fh.write(json.dumps(r) + "\n")
  with open(path, "w") as fh:
    json.dump(summary, fh, indent=2, default=float)
  return summary
