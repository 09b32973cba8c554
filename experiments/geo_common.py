"""Helpers of the geolora_rank_convergence, condlr_robustness,
intruder_dimensions and tdlrt_tucker studies.

Each study is `python -m experiments.<study>.run [--runlocal] [--workdir W]`:
it runs its config's sweep through lrtrain's runner (finished runs are
skipped, interrupted ones resume from their last checkpoint), then its
report step reads the run directories (metrics.jsonl, summary.json, final
checkpoints) and writes results/*.csv and results/*.png beside the study.

Two studies need a run whose initial parameters or data differ from what
the config alone builds (CondLR's per-layer ranks, fine-tuning from a
pre-trained checkpoint on a chosen class subset); `train_with` runs the
unchanged `lrtrain.train.train_and_evaluate` with those substituted.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lrtrain import checkpoint as ckpt_lib
from lrtrain import sweep as sweep_lib
from lrtrain import train as train_lib
from lrtrain.diagnostics import plots as plots_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# Command line of a study.
# --------------------------------------------------------------------------


def parse_args(study: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
  """--runlocal, --workdir (default runs/<study>[_local]), --results
  (default experiments/<study>/results, or <workdir>/results for runlocal)."""
  p = argparse.ArgumentParser(prog=f"python -m experiments.{study}.run")
  p.add_argument("--runlocal", action="store_true",
                 help="seconds-long smoke variant (CI)")
  p.add_argument("--workdir", default=None, help="run directories")
  p.add_argument("--results", default=None, help="CSV / PNG output folder")
  p.add_argument("--report_only", action="store_true",
                 help="only rebuild results/ from existing runs")
  a = p.parse_args(argv)
  if a.workdir is None:
    a.workdir = os.path.join("runs", study + ("_local" if a.runlocal else ""))
  if a.results is None:
    a.results = (os.path.join(a.workdir, "results") if a.runlocal else
                 os.path.join(ROOT, "experiments", study, "results"))
  os.makedirs(a.results, exist_ok=True)
  return a


def config_spec(study: str, runlocal: bool, extra: str = "") -> str:
  """'experiments/<study>/config.py[:runlocal,...]' as an absolute path."""
  path = os.path.join(ROOT, "experiments", study, "config.py")
  args = ",".join(x for x in ("runlocal" if runlocal else "", extra) if x)
  return f"{path}:{args}" if args else path


def run_sweep(spec: str, workdir: str) -> tuple[list[str], float]:
  """Run every unfinished point of a config's sweep.

  Returns:
    (run directories, wall seconds of this call).
  """
  t = time.time()
  dirs = sweep_lib.run_all(spec, workdir)
  return dirs, time.time() - t


# --------------------------------------------------------------------------
# Runs with substituted initial params / data.
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _substituted_build(init_fn, dataset):
  """Temporarily wrap lrtrain.train.build_run (restored on exit)."""
  orig = train_lib.build_run

  def build_run(config):
    run = orig(config)
    if dataset is not None:
      run["ds"] = dataset
    if init_fn is not None:
      run["init_params"] = init_fn(run)
    return run
  train_lib.build_run = build_run
  try:
    yield
  finally:
    train_lib.build_run = orig


def train_with(config: ml_collections.ConfigDict, workdir: str, *,
               init_fn: Callable[[dict], Any] | None = None,
               dataset=None) -> dict:
  """`train_and_evaluate` with other initial params and/or another dataset.

  The runner's checkpointing, resume, metrics and diagnostics are kept;
  the diagnostics reference (intruders) is the substituted initial params.

  Args:
    config: resolved config (its model must accept the substituted params
      and the dataset's input shape and class count).
    workdir: run directory (resumes when it holds a partial run).
    init_fn: run dict (lrtrain.train.build_run) -> initial params.
    dataset: an lrtrain.data.Dataset replacing the config's.

  Returns:
    The summary dict (summary.json), or the existing one if finished.
  """
  if sweep_lib.is_finished(workdir, config):
    return read_json(os.path.join(workdir, "summary.json"))
  with _substituted_build(init_fn, dataset):
    return train_lib.train_and_evaluate(config, workdir)


def restore_params(run_dir: str, like_params) -> Any:
  """Final params of a run from its latest checkpoint.

  Args:
    run_dir: a run directory with checkpoints/.
    like_params: a params tree of the same model (shapes may differ).

  Raises:
    CheckpointError: none or unreadable.
  """
  ck = ckpt_lib.Checkpoints(os.path.join(run_dir, "checkpoints"))
  step = ck.latest_step()
  if step is None:
    raise ckpt_lib.CheckpointError(f"no checkpoint in {run_dir}")
  meta, leaves = ck.restore_leaves(step)
  ck.close()
  p = ckpt_lib.rebuild(like_params, leaves["params"],
                       meta["groups"]["params"]["paths"], "params")
  return jax.tree.map(jnp.asarray, p)


def load_config(run_dir: str) -> ml_collections.ConfigDict:
  """config.json of a run as a ConfigDict."""
  return ml_collections.ConfigDict(read_json(os.path.join(run_dir, "config.json")))


# --------------------------------------------------------------------------
# Reading and writing results.
# --------------------------------------------------------------------------


def read_json(path: str) -> dict:
  with open(path) as fh:
    return json.load(fh)


def finished_runs(workdir: str) -> list[str]:
  """Sorted run directories under workdir with a summary.json."""
  if not os.path.isdir(workdir):
    return []
  return sorted(os.path.join(workdir, d) for d in os.listdir(workdir)
                if os.path.exists(os.path.join(workdir, d, "summary.json")))


def metrics(run_dir: str) -> list[dict]:
  """Rows of a run's metrics.jsonl."""
  return plots_lib.read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def series(rows: Iterable[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the rows holding `key` (vectors stacked)."""
  steps, vals = [], []
  for r in rows:
    if key in r and r[key] is not None:
      steps.append(r["step"])
      vals.append(r[key])
  return np.asarray(steps), np.asarray(vals, dtype=float)


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
  """rows -> CSV (columns default to the union of keys, in first-seen order)."""
  if columns is None:
    columns = []
    for r in rows:
      columns += [k for k in r if k not in columns]
  with open(path, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: _fmt(r.get(k)) for k in columns})
  return path


def _fmt(v):
  if isinstance(v, (float, np.floating)):
    return f"{float(v):.6g}"
  if isinstance(v, (list, tuple)):
    return " ".join(str(_fmt(x)) for x in v)
  return v


def figure(nrows: int = 1, ncols: int = 1, size=(6.0, 4.0)):
  """(fig, axes) on the Agg backend (no display needed); axes is 2-D."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
  FigureCanvasAgg(fig)
  axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
  return fig, axes


def save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def write_wall_time(results: str, seconds: float, note: str = "") -> None:
  """results/wall_time.json: seconds of the last full command (appended
  per call so a resumed run keeps the earlier parts)."""
  path = os.path.join(results, "wall_time.json")
  old = read_json(path) if os.path.exists(path) else {"calls": []}
  old["calls"].append({"seconds": round(seconds, 1), "note": note,
                       "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")})
  old["total_seconds"] = round(sum(c["seconds"] for c in old["calls"]), 1)
  with open(path, "w") as fh:
    json.dump(old, fh, indent=2)
