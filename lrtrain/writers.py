"""Metric writers: metrics.jsonl always, TensorBoard optionally, and a
progress display (a bar with steps/s and ETA on a terminal, plain periodic
log lines otherwise).

Values may be Python scalars, numpy / jax arrays (0-d become numbers,
vectors become lists) - whatever `Diagnostics` and the train step produce.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np
from absl import logging


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


def truncate_jsonl(path: str, max_step: int) -> None:
  """Drop rows with step > max_step (a resumed run rewrites them)."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as fh:
    for line in fh:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and row.get("step", 0) <= max_step:
        keep.append(line if line.endswith("\n") else line + "\n")
  with open(path, "w") as fh:
    fh.writelines(keep)


class TensorBoardWriter:
  """Scalars (and histograms of small vectors) as TensorBoard events."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._w = SummaryWriter(logdir)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    for k, v in metrics.items():
      a = np.asarray(v)
      if a.ndim == 0 and np.issubdtype(a.dtype, np.number):
        self._w.add_scalar(k, float(a), int(step))
      elif a.ndim == 1 and a.size and np.issubdtype(a.dtype, np.number):
        self._w.add_histogram(k, a.astype(np.float64), int(step))
    self._w.flush()

  def close(self) -> None:
    self._w.close()


class Progress:
  """A progress bar on a terminal, plain log lines every `every` steps
  otherwise (CI logs stay readable)."""

  def __init__(self, total: int, start: int = 0, *, enabled: bool = True,
               every: int = 50, stream=None):
    self.total, self.start = int(total), int(start)
    self.stream = stream or sys.stderr
    self.interactive = enabled and self.stream.isatty()
    self.every = max(int(every), 1)
    self.t0 = time.time()
    self._last = 0.0

  def rate(self, step: int) -> float:
    dt = time.time() - self.t0
    return (step - self.start) / dt if dt > 0 else 0.0

  def update(self, step: int, loss: float | None = None) -> None:
    rate = self.rate(step)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    loss_s = "" if loss is None else f" loss {loss:.4f}"
    if self.interactive:
      now = time.time()
      if now - self._last < 0.1 and step < self.total:
        return
      self._last = now
      frac = step / max(self.total, 1)
      bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
      self.stream.write(f"\r[{bar}] {step}/{self.total} {rate:.1f} steps/s "
                        f"ETA {_fmt_time(eta)}{loss_s}   ")
      self.stream.flush()
    elif step % self.every == 0 or step == self.total:
      logging.info("step %d/%d  %.1f steps/s  ETA %s%s", step, self.total,
                   rate, _fmt_time(eta), loss_s)

  def close(self) -> None:
    if self.interactive:
      self.stream.write("\n")
      self.stream.flush()


def _fmt_time(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class MultiWriter:
  """metrics.jsonl + optional TensorBoard behind one `write`."""

  def __init__(self, workdir: str, *, tensorboard: bool = False):
    self.writers: list[Any] = [JsonlWriter(os.path.join(workdir, "metrics.jsonl"))]
    if tensorboard:
      self.writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write(step, metrics)

  def close(self) -> None:
    for w in self.writers:
      w.close()
