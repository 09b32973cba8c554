"""Metric writers: metrics.jsonl always, TensorBoard optionally, and a
progress display on stderr (a bar with a windowed steps/s, ETA and the
latest validation accuracy on a terminal, compact periodic lines otherwise).

Values may be Python scalars, numpy / jax arrays (0-d become numbers,
vectors become lists) - whatever `Diagnostics` and the train step produce.

Only process 0 writes a run's files (`is_writer`): `open_run` gives every
other process of a multi-host run a `NullRunWriter`, so the runner calls
the same methods on every process and the workdir gets one copy of each
file. Checkpoints are not written here: every process calls orbax, which
coordinates the processes itself.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np


def is_writer() -> bool:
  """Whether this process writes the run's files: process 0 of a
  multi-host run (the only process of a single-host one)."""
  return jax.process_index() == 0


def to_json_value(v: Any) -> Any:
  """A metric value as JSON: numbers, nested lists, None for NaN/Inf."""
  if isinstance(v, str):
    return v
  a = np.asarray(v)
  if a.ndim == 0:
    x = a.item()
    if isinstance(x, float) and not math.isfinite(x):
      return None
    return x
  return [to_json_value(x) for x in a]


def to_json_value_tree(d: Any) -> Any:
  """`to_json_value` through nested dicts."""
  if isinstance(d, dict):
    return {k: to_json_value_tree(v) for k, v in d.items()}
  if d is None:
    return None
  return to_json_value(d)


class JsonlWriter:
  """Appends one JSON object per call to `path` (the metrics.jsonl)."""

  def __init__(self, path: str):
    self.path = path
    self._fh = open(path, "a")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    row = {"step": int(step)}
    row.update({k: to_json_value(v) for k, v in metrics.items()})
    self._fh.write(json.dumps(row) + "\n")
    self._fh.flush()

  def close(self) -> None:
    self._fh.close()


def truncate_jsonl(path: str, max_step: int) -> set[str]:
  """Drop rows with step > max_step (a resumed run rewrites them; -1 drops
  every row); returns the keys logged at max_step."""
  if not os.path.exists(path):
    return set()
  keep, at_max = [], set()
  with open(path) as fh:
    for line in fh:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and row.get("step", 0) <= max_step:
        keep.append(line if line.endswith("\n") else line + "\n")
        if row.get("step", 0) == max_step:
          at_max.update(k for k in row if k != "step")
  with open(path, "w") as fh:
    fh.writelines(keep)
  return at_max


def scalars(key: str, value: Any) -> list[tuple[str, float]]:
  """A metric as TensorBoard scalars: a number is `key`; a vector is one
  scalar per entry, `key/<i>` with i its 0-based index in metrics.jsonl
  (histograms would lose which singular value is which); non-numeric and
  NaN/Inf entries are skipped."""
  a = np.asarray(value)
  if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or a.ndim > 1:
    return []
  if a.ndim == 0:
    pairs = [(key, a.item())]
  else:
    pairs = [(f"{key}/{i}", x.item()) for i, x in enumerate(a)]
  return [(t, float(x)) for t, x in pairs if math.isfinite(x)]


class TensorBoardWriter:
  """Scalars (vectors as indexed scalars, `scalars`) and the config as
  hparams, in TensorBoard event files.

  Args:
    logdir: the run's tensorboard/ folder.
    purge_step: first step this writer writes; TensorBoard discards the
      events of earlier files at this step and after (the steps a resumed
      run replays), so no curve has a duplicated segment.
  """

  def __init__(self, logdir: str, purge_step: int | None = None):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._w = SummaryWriter(logdir, purge_step=purge_step)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    for k, v in metrics.items():
      for tag, x in scalars(k, v):
        self._w.add_scalar(tag, x, int(step))
    self._w.flush()

  def write_hparams(self, fields: Mapping[str, Any],
                    metric_tags: Sequence[str]) -> None:
    """`fields` (name -> bool, int, float or str) as the hparams plugin's
    experiment and session records in this run (not in a sub-run, as
    SummaryWriter.add_hparams does), so its metrics are the scalars already
    written under `metric_tags` (the values passed here are not used)."""
    from tensorboardX.summary import hparams as hp_summary  # pylint: disable=g-import-not-at-top
    for record in hp_summary(dict(fields), dict.fromkeys(metric_tags, 0.0)):
      self._w.file_writer.add_summary(record)
    self._w.flush()

  def close(self) -> None:
    self._w.close()


class StepRate:
  """Steps per second over a recent window of step timestamps, and an ETA.

  The first `mark` only opens the window, so the first step (compilation)
  never counts; `restart()` makes the next mark open a new window, so a
  host pause (an evaluation, a checkpoint, a recompile after a capacity
  change) does not count either. Marks older than `window_s` seconds drop
  out (the newest two always stay), so the rate follows the current speed
  instead of the average since the start. After a restart the last value
  is kept until the new window holds two marks.

  The pauses are not lost: `eta` adds their share per step to the windowed
  step time (pauses so far per step, each counted at the lower median of
  the last few, and only from the second pause on: a hook's first call
  compiles, and that one-time cost should not stand for every later call),
  so evaluations and checkpoints still to come are in the estimate.
  """

  def __init__(self, window_s: float = 5.0):
    self.window_s = float(window_s)
    self._marks: collections.deque = collections.deque()
    self._value: float | None = None
    self._first: int | None = None      # step of the first mark
    self._prev: tuple[int, float] | None = None
    self._pauses: list[float] = []      # host pauses since the first mark

  def mark(self, step: int, now: float | None = None) -> None:
    """Record that `step` finished at `now` (default: time.time())."""
    step, now = int(step), time.time() if now is None else float(now)
    if self._first is None:
      self._first = step
    elif not self._marks and self._prev is not None:
      # The first mark after a restart: what the steps since the previous
      # mark took beyond their usual time was a pause.
      s, t = self._prev
      if self._value:
        self._pauses.append(max(now - t - (step - s) / self._value, 0.0))
      elif step > s and now > t:
        # No window has held two marks yet (a restart after every step):
        # the interval itself, pause included, is the best estimate.
        self._value = (step - s) / (now - t)
    self._prev = (step, now)
    m = self._marks
    m.append((step, now))
    while len(m) > 2 and now - m[1][1] >= self.window_s:
      m.popleft()
    (s0, t0), (s1, t1) = m[0], m[-1]
    if s1 > s0 and t1 > t0:
      self._value = (s1 - s0) / (t1 - t0)

  def restart(self) -> None:
    """The time until the next mark is not a step: open a new window there."""
    self._marks.clear()

  @property
  def value(self) -> float | None:
    """Steps per second, None before the window held two marks."""
    return self._value

  def eta(self, step: int, total: int) -> float:
    """Seconds until `total`: the windowed step time plus the pauses' share
    per step (see the class docstring); NaN before there is a rate."""
    if not self._value:
      return float("nan")
    done, n = step - self._first, len(self._pauses)
    recent = sorted(self._pauses[-5:])
    pause = (recent[(len(recent) - 1) // 2] * n / done if n > 1 and done > 0
             else 0.0)
    return max(total - step, 0) * (1.0 / self._value + pause)


class Progress:
  """Training progress on stderr: a bar redrawn in place on a terminal, a
  compact line about every tenth of the run otherwise (CI logs, pipes).

  Both show the step, the windowed rate (`StepRate`, compilation and host
  pauses excluded), the ETA from it, the training loss and the latest
  validation metrics passed to `observe`.
  """

  def __init__(self, total: int, start: int = 0, *, enabled: bool = True,
               meter: StepRate | None = None, every: int | None = None,
               stream=None):
    """meter: the rate shown (marked by the caller); every: steps between
    plain lines (default a tenth of the run)."""
    self.total, self.start = int(total), int(start)
    self.meter = meter or StepRate()
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self.interactive = enabled and self.stream.isatty()
    self.every = max(int(every or -(-(self.total - self.start) // 10)), 1)
    self._last = 0.0
    self._eval: dict[str, float] = {}
    if enabled and self.start > 0:
      self.stream.write(f"resumed at step {self.start}/{self.total}\n")
      self.stream.flush()

  def observe(self, metrics: Mapping[str, Any]) -> None:
    """Keep the validation metrics (eval/accuracy, eval/loss) for display."""
    for k in ("eval/accuracy", "eval/loss"):
      if k in metrics:
        self._eval[k] = float(np.mean(metrics[k]))

  def line(self, step: int, loss: float | None = None) -> str:
    """'step 120/600  147.2 steps/s  ETA 0:00:03  loss 0.2153  val acc 0.950'."""
    rate, eta = self.meter.value, self.meter.eta(step, self.total)
    parts = [f"step {step}/{self.total}",
             f"{rate:.1f} steps/s" if rate else "- steps/s",
             f"ETA {_fmt_time(eta)}"]
    if loss is not None:
      parts.append(f"loss {loss:.4f}")
    if "eval/accuracy" in self._eval:
      parts.append(f"val acc {self._eval['eval/accuracy']:.3f}")
    elif "eval/loss" in self._eval:
      parts.append(f"val loss {self._eval['eval/loss']:.4f}")
    return "  ".join(parts)

  def update(self, step: int, loss: float | None = None) -> None:
    """Show `step` (marked in the meter by the caller)."""
    if not self.enabled:
      return
    if self.interactive:
      now = time.time()
      if now - self._last < 0.1 and step < self.total:
        return
      self._last = now
      frac = step / max(self.total, 1)
      bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
      self.stream.write(f"\r[{bar}] {self.line(step, loss)}\033[K")
      self.stream.flush()
    elif (step - self.start) % self.every == 0 or step == self.total:
      self.stream.write(self.line(step, loss) + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self.interactive:
      self.stream.write("\n")
      self.stream.flush()


def _fmt_time(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(round(s))
  return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """The config's fields of scalar type (bool, int, float, str), flattened
  to dotted names ("integrator.tau"); tuples and lists are left out."""
  out = {}
  for k, v in config.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(hparams(v, name + "."))
    elif isinstance(v, (bool, int, float, str)):
      out[name] = v
  return out


class RunWriter:
  """The files of one run's workdir that process 0 writes: metrics.jsonl,
  TensorBoard events (optional), config.json, summary.json and plots/.

  Args:
    workdir: the run's workdir (exists).
    tensorboard: also write TensorBoard events under tensorboard/.
    resume_step: the checkpoint step the run resumes from, or None for a
      fresh start; metrics.jsonl keeps only the rows up to it (none on a
      fresh start) and TensorBoard purges the later steps.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = False,
               resume_step: int | None = None):
    self.workdir = workdir
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    last = -1 if resume_step is None else int(resume_step)
    # Keys the run logged at the resumed step (e.g. test/* of a finished
    # run that is run again) are not written a second time.
    self._last, self._logged = last, truncate_jsonl(self.metrics_path, last)
    self.writers: list[Any] = [JsonlWriter(self.metrics_path)]
    self.tb = None
    if tensorboard:
      self.tb = TensorBoardWriter(os.path.join(workdir, "tensorboard"),
                                  purge_step=last + 1)
      self.writers.append(self.tb)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if step == self._last:
      metrics = {k: v for k, v in metrics.items() if k not in self._logged}
    if not metrics:
      return
    for w in self.writers:
      w.write(step, metrics)

  def write_file(self, name: str, text: str) -> None:
    """workdir/<name> (config.json, summary.json) with `text`."""
    with open(os.path.join(self.workdir, name), "w") as fh:
      fh.write(text)

  def write_hparams(self, config: Mapping[str, Any],
                    metric_tags: Sequence[str]) -> None:
    """The config (`hparams`) and its result metrics (tags written before
    with `write`) for TensorBoard's hparams view; nothing without it."""
    if self.tb is not None:
      self.tb.write_hparams(hparams(config), metric_tags)

  def render_plots(self) -> list[str]:
    """plots/*.png from metrics.jsonl (lrtrain.diagnostics.plots)."""
    from lrtrain.diagnostics import plots  # pylint: disable=g-import-not-at-top
    return plots.render(self.metrics_path, os.path.join(self.workdir, "plots"))

  def close(self) -> None:
    for w in self.writers:
      w.close()
    self.writers = []


class NullRunWriter:
  """`RunWriter`'s methods, writing nothing (processes other than 0)."""

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    del step, metrics

  def write_file(self, name: str, text: str) -> None:
    del name, text

  def write_hparams(self, config, metric_tags) -> None:
    del config, metric_tags

  def render_plots(self) -> list[str]:
    return []

  def close(self) -> None:
    pass


def open_run(workdir: str, *, tensorboard: bool = False,
             resume_step: int | None = None) -> RunWriter | NullRunWriter:
  """The run's writer on process 0 (`is_writer`), a `NullRunWriter` on the
  others."""
  if not is_writer():
    return NullRunWriter()
  return RunWriter(workdir, tensorboard=tensorboard, resume_step=resume_step)
