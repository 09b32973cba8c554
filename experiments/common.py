"""Helpers shared by the studies under experiments/.

Each study is `python -m experiments.<study>.run [--runlocal] [--workdir W]
[--results R]`: it runs its config's sweep through lrtrain's runner
(finished runs are skipped, interrupted ones resume from their last
checkpoint), then its report step reads the run directories (metrics.jsonl,
summary.json, final checkpoints) and writes results/*.csv and
results/*.png beside the study (under the workdir for --runlocal).

Studies whose runs differ from what the config alone builds (CondLR's
per-layer ranks, fine-tuning from a pre-trained checkpoint on a class
subset, a switch of factorization mid-training, a study-local integrator)
replace those parts of the built `lrtrain.train.Run` through `train_with`,
which calls lrtrain's one training loop.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from typing import Any, Callable, Iterable, Sequence

import ml_collections
import numpy as np

from lrtrain import sweep as sweep_lib
from lrtrain import train as train_lib
from lrtrain.diagnostics import plots as plots_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = os.path.join(ROOT, "third_party", "published")


# --------------------------------------------------------------------------
# Command line of a study.
# --------------------------------------------------------------------------


def parser(study: str, doc: str | None = None) -> argparse.ArgumentParser:
  """--runlocal, --dataset, --workdir, --results (alias --out), --report_only;
  a study adds its own flags and calls `parse_args`."""
  p = argparse.ArgumentParser(prog=f"python -m experiments.{study}.run",
                              description=(doc or "").strip().split("\n")[0])
  p.add_argument("--runlocal", action="store_true",
                 help="seconds-long smoke variant (CI)")
  p.add_argument("--dataset", default="fashion_mnist",
                 help="fashion_mnist|mnist (studies on Fashion-MNIST)")
  p.add_argument("--workdir", default=None,
                 help="run directories (default runs/<study>[_local])")
  p.add_argument("--results", "--out", dest="results", default=None,
                 help="CSV / PNG output folder (default experiments/<study>/"
                 "results, <workdir>/results for --runlocal)")
  p.add_argument("--report_only", action="store_true",
                 help="only rebuild results/ from existing runs")
  return p


def parse_args(study: str, argv: Sequence[str] | None = None, *,
               doc: str | None = None,
               p: argparse.ArgumentParser | None = None) -> argparse.Namespace:
  """The parsed command line with defaults filled in; `a.extra` is the
  config argument for --dataset ('' for Fashion-MNIST)."""
  a = (p or parser(study, doc)).parse_args(argv)
  if a.workdir is None:
    a.workdir = os.path.join("runs", study + ("_local" if a.runlocal else ""))
  if a.results is None:
    a.results = (os.path.join(a.workdir, "results") if a.runlocal else
                 os.path.join(ROOT, "experiments", study, "results"))
  os.makedirs(a.results, exist_ok=True)
  a.extra = "" if a.dataset == "fashion_mnist" else f"dataset={a.dataset}"
  return a


def config_spec(study: str, runlocal: bool, extra: str = "") -> str:
  """'experiments/<study>/config.py[:runlocal,...]' as an absolute path."""
  path = os.path.join(ROOT, "experiments", study, "config.py")
  args = ",".join(x for x in ("runlocal" if runlocal else "", extra) if x)
  return f"{path}:{args}" if args else path


def with_args(spec: str, args: str) -> str:
  """A config spec with more config arguments: 'path[:a]' + 'b=1' ->
  'path:a,b=1'."""
  sep = "," if ":" in os.path.basename(spec) else ":"
  return spec + sep + args


def study_main(study: str, argv: Sequence[str] | None,
               report: Callable[[str, str], Any], *, doc: str | None = None,
               train: Callable[[str, str], Any] | None = None,
               note: str = "sweep") -> Any:
  """A study's main: the command line (`parse_args`); unless --report_only,
  `train(config spec, workdir)` (default: the config's sweep) timed into
  results/wall_time.json; then `report(workdir, results)`, returned."""
  a = parse_args(study, argv, doc=doc)
  if not a.report_only:
    t = time.time()
    (train or sweep_lib.run_all)(config_spec(study, a.runlocal, a.extra), a.workdir)
    write_wall_time(a.results, time.time() - t, note)
  return report(a.workdir, a.results)


def show(result: Any) -> None:
  """Print a study's report: a dict as `key: value` lines, a list one item
  a line, anything else as it is."""
  if isinstance(result, dict):
    for k, v in result.items():
      print(f"{k}: {v}")
  elif isinstance(result, (list, tuple)):
    for row in result:
      print(row)
  else:
    print(result)


def cli(study: str, report: Callable[[str, str], Any], *,
        doc: str | None = None,
        train: Callable[[str, str], Any] | None = None,
        note: str = "sweep") -> Callable[..., Any]:
  """`main(argv=None)` of a study trained by its config's sweep (or by
  `train(config spec, workdir)`): `study_main`, then the report printed
  (`show`) and returned."""
  def main(argv: Sequence[str] | None = None) -> Any:
    out = study_main(study, argv, report, doc=doc, train=train, note=note)
    show(out)
    return out
  return main


# --------------------------------------------------------------------------
# Runs with substituted parts.
# --------------------------------------------------------------------------


def train_with(config: ml_collections.ConfigDict, workdir: str, *,
               init_fn: Callable[[train_lib.Run], Any] | None = None,
               dataset=None, integrator=None, start_step: int = 0) -> dict:
  """lrtrain's training loop on the config's run with parts replaced.

  The runner's checkpointing, resume, metrics and diagnostics are kept;
  the diagnostics reference (intruders) is the substituted initial params.

  Args:
    config: resolved config (its model must accept the substituted params
      and the dataset's input shape and class count).
    workdir: run directory (resumes when it holds a partial run).
    init_fn: the built `train.Run` (dataset already replaced) -> initial params.
    dataset: an lrtrain.data.Dataset replacing the config's.
    integrator: an `Integrator` replacing the one the config names.
    start_step: data-stream position of step 0 (a run continuing another
      sees the batches that run would have seen next).

  Returns:
    The summary dict (summary.json), or the existing one if finished.
  """
  if sweep_lib.is_finished(workdir, config):
    return read_json(os.path.join(workdir, "summary.json"))
  run = train_lib.build_run(config).replace(start_step=start_step)
  if dataset is not None:
    run = run.replace(ds=dataset)
  if integrator is not None:
    run = run.replace(integrator=integrator)
  if init_fn is not None:
    run = run.replace(init_params=init_fn(run))
  return train_lib.train(run, workdir)


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
  """Rows of a run's metrics.jsonl ([] when it has none)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  return plots_lib.read_metrics(path) if os.path.exists(path) else []


def read_runs(workdir: str) -> dict[str, dict]:
  """{run name: {'summary', 'metrics', 'config'}} of the finished runs."""
  out = {}
  for d in finished_runs(workdir):
    cfg = os.path.join(d, "config.json")
    out[os.path.basename(d)] = {
        "summary": read_json(os.path.join(d, "summary.json")),
        "config": read_json(cfg) if os.path.exists(cfg) else {},
        "metrics": metrics(d)}
  return out


def series(rows: Iterable[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the rows holding `key` (vectors stacked)."""
  steps, vals = [], []
  for r in rows:
    if key in r and r[key] is not None:
      steps.append(r["step"])
      vals.append(r[key])
  return np.asarray(steps), np.asarray(vals, dtype=float)


def published(name: str) -> list[dict]:
  """Rows of third_party/published/<name> as dicts of strings."""
  with open(os.path.join(PUBLISHED, name)) as fh:
    return list(csv.DictReader(fh))


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
  """rows -> CSV (columns default to the union of keys, in first-seen order;
  floats to 6 significant digits, non-finite and None as empty cells)."""
  if columns is None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: _fmt(r.get(k)) for k in columns})
  return path


def _fmt(v):
  if v is None:
    return ""
  if isinstance(v, (float, np.floating)):
    return f"{float(v):.6g}" if np.isfinite(v) else ""
  if isinstance(v, (list, tuple)):
    return " ".join(str(_fmt(x)) for x in v)
  return v


def figure(nrows: int = 1, ncols: int = 1, size=(6.0, 4.0)):
  """(fig, axes) on the Agg backend (no display needed); axes is 2-D and
  each panel is `size` inches."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
  FigureCanvasAgg(fig)
  axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
  return fig, axes


def save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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
