"""Sweeps: expand a config file's `get_sweep` into named runs, run them, and
aggregate their summaries.

  python -m lrtrain.sweep --config configs/digits.py --workdir runs/x --list
  python -m lrtrain.sweep --config configs/digits.py --workdir runs/x --index 3
  python -m lrtrain.sweep --config configs/digits.py --workdir runs/x --all
  python -m lrtrain.sweep --config configs/digits.py --workdir runs/x --all \\
      --vmap_seeds
  python -m lrtrain.sweep summarize --workdir runs/x

Each sweep point runs in `<workdir>/<name>`, the name made of the swept
values ('tau=0.1,seed=0'). `--index` runs one point (job arrays, one index
per task); `--all` runs every point in sequence, skipping finished runs and
resuming partial ones. With `--vmap_seeds`, points of a fixed-shape method
that differ only in their seed train together in one compiled program
(`train.train_seeds_vmapped`); each seed still writes its own run directory.
`summarize` writes summary.csv and summary.png (test accuracy against
compression) from the runs' summary.json files.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging

from lrtrain import config_utils

_CONFIG = flags.DEFINE_string("config", None, "Config file (configs/x.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory.")
_LIST = flags.DEFINE_bool("list", False, "List the sweep points.")
_INDEX = flags.DEFINE_integer("index", None, "Run one sweep point.")
_ALL = flags.DEFINE_bool("all", False, "Run every sweep point in sequence.")
_KEEP_GOING = flags.DEFINE_bool(
    "keep_going", False, "With --all: a run that diverges is recorded "
    "(<run>/failed.json) and the sweep goes on; exit status 1 at the end.")
_VMAP = flags.DEFINE_bool("vmap_seeds", False,
                          "Train the seeds of one configuration together.")
_DEBUG = flags.DEFINE_bool(
    "debug", False, "Show the full traceback of user errors (config file, "
    "workdir, checkpoint) instead of one error line.")


def _debug() -> bool:
  """--debug given (False when the flags are not parsed: a library call)."""
  return flags.FLAGS.is_parsed() and _DEBUG.value


def load_config_module(path: str):
  """Import a config file as a module.

  Raises:
    ConfigError: missing file, or no get_config / get_sweep.
  """
  if not os.path.exists(path):
    raise config_utils.ConfigError(f"config file {path} does not exist")
  name = "lrtrain_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
  except Exception as e:  # pylint: disable=broad-except
    if _debug():
      raise
    raise config_utils.ConfigError(config_utils.load_failure(path, e)) from e
  for fn in ("get_config", "get_sweep"):
    if not hasattr(mod, fn):
      raise config_utils.ConfigError(f"config file {path} has no {fn}()")
  return mod


def expand(config_spec: str) -> list[tuple[str, Any, dict]]:
  """[(run name, locked config, overrides)] of every sweep point.

  Args:
    config_spec: 'configs/x.py' or 'configs/x.py:arg'.

  Raises:
    ConfigError: a swept key the config lacks, a wrong type, or two
      points with the same name.
  """
  path, _, arg = config_spec.partition(":")
  mod = load_config_module(path)
  try:
    base = mod.get_config(arg or None)
    points = mod.get_sweep(arg or None)
  except config_utils.ConfigError as e:
    raise config_utils.ConfigError(f"{config_spec}: {e}") from e
  except Exception as e:  # pylint: disable=broad-except
    if _debug():
      raise
    raise config_utils.ConfigError(config_utils.load_failure(path, e)) from e
  out, seen = [], set()
  for point in points:
    name = config_utils.run_name(point)
    if name in seen:
      raise config_utils.ConfigError(f"sweep of {path}: duplicate point {name}")
    seen.add(name)
    out.append((name, config_utils.apply_overrides(base, point), dict(point)))
  return out


def is_finished(workdir: str, config) -> bool:
  """A run whose summary.json reports the config's full step count."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return False
  with open(path) as fh:
    s = json.load(fh)
  want = config.train.num_steps
  return want <= 0 or s.get("steps", -1) >= want


def seed_groups(points) -> list[list[int]]:
  """Indices of points grouped by everything but their 'seed' override."""
  groups: dict[str, list[int]] = {}
  for i, (_, _, ov) in enumerate(points):
    key = json.dumps({k: v for k, v in ov.items() if k != "seed"},
                     sort_keys=True, default=str)
    groups.setdefault(key, []).append(i)
  return list(groups.values())


FAILED = "failed.json"


def run_all(config_spec: str, workdir: str, *, vmap_seeds: bool = False,
            keep_going: bool = False) -> list[str]:
  """Run every point not yet finished; returns the run directories.

  keep_going: a run that diverges (train.DivergedError) leaves
  <run>/failed.json with the error and the sweep goes on (it is retried on
  the next call); without it the error propagates.
  """
  from lrtrain import train, writers  # pylint: disable=g-import-not-at-top
  points = expand(config_spec)
  dirs = [os.path.join(workdir, name) for name, _, _ in points]
  groups = seed_groups(points) if vmap_seeds else [[i] for i in range(len(points))]
  for g in groups:
    todo = [i for i in g if not is_finished(dirs[i], points[i][1])]
    if not todo:
      logging.info("finished already: %s", ", ".join(points[i][0] for i in g))
      continue
    if len(todo) > 1 and train.fixed_shape(points[todo[0]][1]):
      logging.info("vmapped seeds: %s", ", ".join(points[i][0] for i in todo))
      train.train_seeds_vmapped([points[i][1] for i in todo],
                                [dirs[i] for i in todo])
      continue
    for i in todo:
      logging.info("run %s", points[i][0])
      failed = os.path.join(dirs[i], FAILED)
      if os.path.exists(failed) and writers.is_writer():
        os.remove(failed)
      try:
        train.train_and_evaluate(points[i][1], dirs[i])
      except train.DivergedError as e:
        if not keep_going:
          raise
        logging.warning("run %s diverged: %s", points[i][0], e)
        if writers.is_writer():       # a run's files: process 0 alone
          with open(failed, "w") as fh:
            json.dump({"error": str(e)}, fh)
  return dirs


def failed_runs(dirs) -> list[str]:
  """The run directories that hold a failed.json and no summary.json."""
  return [d for d in dirs if os.path.exists(os.path.join(d, FAILED))
          and not os.path.exists(os.path.join(d, "summary.json"))]


# --------------------------------------------------------------------------
# Aggregation.
# --------------------------------------------------------------------------

COLUMNS = ("run", "status", "test/accuracy", "test/loss", "params/train", "params/eval",
           "params/compression", "steps", "time/wall_s", "time/steps_per_sec",
           "time/steady_steps_per_sec", "time/vs_dense", "step_compilations",
           "ranks")


def summarize(workdir: str) -> tuple[str, str, list[dict]]:
  """Collect <workdir>/*/summary.json into summary.csv and summary.png.

  A run that diverged under --keep_going gets a row with its error.

  Returns:
    (csv path, png path, rows).

  Raises:
    FileNotFoundError: no finished runs under workdir.
  """
  rows, keys = [], []
  for name in sorted(os.listdir(workdir) if os.path.isdir(workdir) else []):
    path = os.path.join(workdir, name, "summary.json")
    if not os.path.exists(path):
      fail = os.path.join(workdir, name, FAILED)
      if os.path.exists(fail):
        with open(fail) as fh:
          rows.append({"run": name, "status": "diverged: " + json.load(fh)["error"]})
        keys.append((None, None))
      continue
    with open(path) as fh:
      s = json.load(fh)
    row = {"run": name, "status": "ok"}
    for col in COLUMNS[2:]:
      v = s.get(col)
      if col == "ranks" and isinstance(v, dict):
        v = " ".join(f"{k.split('/', 1)[-1]}:{x}" for k, x in v.items())
      row[col] = v
    rows.append(row)
    keys.append((s.get("integrator"), _model_name(os.path.join(workdir, name))))
  if not rows:
    raise FileNotFoundError(f"no summary.json under {workdir}/*/")
  _relative_speed(rows, keys)
  csv_path = os.path.join(workdir, "summary.csv")
  with open(csv_path, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
  png_path = os.path.join(workdir, "summary.png")
  _plot(rows, png_path)
  return csv_path, png_path, rows


def _model_name(run_dir: str) -> str | None:
  try:
    with open(os.path.join(run_dir, "config.json")) as fh:
      return json.load(fh).get("model", {}).get("name")
  except (OSError, ValueError):
    return None


def _relative_speed(rows, keys) -> None:
  """time/vs_dense: steady steps/s over that of the sweep's first dense run
  on the same model (None when the sweep has no such run)."""
  from lrtrain import integrators  # pylint: disable=g-import-not-at-top
  dense = {}
  for row, (integ, model) in zip(rows, keys):
    if integ == integrators.REFERENCE and row.get("time/steady_steps_per_sec"):
      dense.setdefault(model, row["time/steady_steps_per_sec"])
  for row, (_, model) in zip(rows, keys):
    rate, ref = row.get("time/steady_steps_per_sec"), dense.get(model)
    row["time/vs_dense"] = rate / ref if rate and ref else None


def _plot(rows, path):
  """Test accuracy against compression, one labelled point per run."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  pts = [(r["params/compression"], r["test/accuracy"], r["run"]) for r in rows
         if r.get("params/compression") is not None
         and r.get("test/accuracy") is not None]
  ax.scatter([p[0] for p in pts], [p[1] for p in pts])
  for x, y, name in pts:
    ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set_xlabel("compression (1 - eval params / dense params)")
  ax.set_ylabel("test accuracy")
  ax.set_title(os.path.basename(os.path.dirname(path)) or "sweep")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def format_table(rows) -> str:
  """The rows as an aligned text table."""
  cols = [c for c in COLUMNS if c not in ("time/steps_per_sec", "status")]
  cols.append("status")

  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return "" if v is None else str(v)
  cells = [[fmt(r.get(c)) for c in cols] for r in rows]
  widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
  lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in cells]
  return "\n".join(lines)


def main(argv):
  from lrtrain import checkpoint, train  # pylint: disable=g-import-not-at-top
  try:
    if not _WORKDIR.value:
      raise app.UsageError("--workdir is required")
    if argv[1:] == ["summarize"]:
      csv_path, png_path, rows = summarize(_WORKDIR.value)
      print(format_table(rows))
      print(f"wrote {csv_path} and {png_path}")
      return 0
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _CONFIG.value:
      raise app.UsageError("--config is required")
    points = expand(_CONFIG.value)
    if _LIST.value:
      for i, (name, _, _) in enumerate(points):
        print(f"{i}\t{os.path.join(_WORKDIR.value, name)}")
    elif _INDEX.value is not None:
      if not 0 <= _INDEX.value < len(points):
        raise config_utils.ConfigError(
            f"--index {_INDEX.value} outside the sweep's {len(points)} points")
      name, config, _ = points[_INDEX.value]
      train.train_and_evaluate(config, os.path.join(_WORKDIR.value, name))
    elif _ALL.value:
      dirs = run_all(_CONFIG.value, _WORKDIR.value, vmap_seeds=_VMAP.value,
                     keep_going=_KEEP_GOING.value)
      bad = failed_runs(dirs)
      if bad:
        print("error: diverged (see failed.json): " + ", ".join(bad),
              file=sys.stderr)
        return 1
    else:
      raise app.UsageError("one of --list, --index, --all or summarize")
  except app.UsageError as e:
    print(f"error: {e} (--help lists the flags)", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:     # train.Interrupted names the step
    if _debug():
      raise
    print(e if isinstance(e, train.Interrupted) else "interrupted",
          file=sys.stderr)
    return 130
  except (config_utils.ConfigError, train.WorkdirError, train.DivergedError,
          checkpoint.CheckpointError, ValueError, FileNotFoundError) as e:
    if _debug():
      raise
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
