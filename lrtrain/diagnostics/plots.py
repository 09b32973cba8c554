"""Figures from a run's metrics.jsonl (matplotlib, Agg canvas, no pyplot).

Each figure is drawn only from the keys that exist, so a run that logged a
subset of the diagnostics (or none) still gets the figures it can have.
Figures (file names in out_dir):

  loss.png, accuracy.png         '<split>/loss', '<split>/accuracy' vs step
  rank.png                       rank/<layer> vs step (a Tucker layer: its c_out and c_in ranks)
  spectral_ranks.png             stable and effective rank per layer vs step
  condition.png                  spectral/<layer>/kappa_log10 vs step
  sv_<layer>.png                 heat map of the logged top-k singular values
  intruders_vs_eps.png           model intruder count vs eps, recomputed from
                                 the logged maxsim vectors (first/middle/last)
  intruders.png                  intruders/total vs step
  alpha.png                      heavytail/<layer>/alpha vs step
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lrtrain.diagnostics.intruders import count_from_maxsim


def read_metrics(path: str) -> list[dict]:
  """Rows of a metrics.jsonl with a 'step'; unreadable lines are skipped."""
  rows = []
  with open(path) as fh:
    for line in fh:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and "step" in row:
        rows.append(row)
  return sorted(rows, key=lambda r: r["step"])


def _scalar(v):
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return None
  return float(v) if math.isfinite(v) else None


def _series(rows, key):
  """(steps, values) of a key; key (name, i) reads entry i of vector values."""
  key, i = key if isinstance(key, tuple) else (key, None)
  pick = lambda v: (v[i] if isinstance(v, list) and len(v) > i else None
                    ) if i is not None else v
  pts = [(r["step"], _scalar(pick(r.get(key)))) for r in rows if key in r]
  pts = [(s, v) for s, v in pts if v is not None]
  return [p[0] for p in pts], [p[1] for p in pts]


def _layers(rows, pattern):
  """Sorted group(1) of every key matching `pattern` in any row."""
  rx = re.compile(pattern)
  found = set()
  for r in rows:
    for key in r:
      mt = rx.fullmatch(key)
      if mt:
        found.add(mt.group(1))
  return sorted(found)


def _vector(v):
  if not isinstance(v, (list, tuple)):
    return None
  return np.array([np.nan if x is None else x for x in v], np.float64)


def _save(fig, out_dir, name, paths):
  path = os.path.join(out_dir, name)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=100)
  paths.append(path)


def _lines(rows, keys_labels, title, ylabel, out_dir, name, paths, logy=False):
  """One axes with a line per key; nothing is written if no key has data."""
  drawn = [(label, *_series(rows, key)) for key, label in keys_labels]
  drawn = [d for d in drawn if d[1]]
  if not drawn:
    return
  fig = Figure(figsize=(6.4, 4.2))
  ax = fig.add_subplot()
  for label, x, y in drawn:
    ax.plot(x, y, label=label, marker="." if len(x) < 30 else None)
  ax.set(title=title, xlabel="step", ylabel=ylabel)
  if logy and all(v > 0 for _, _, y in drawn for v in y):
    ax.set_yscale("log")
  if len(drawn) <= 12:
    ax.legend(fontsize="small")
  fig.tight_layout()
  _save(fig, out_dir, name, paths)


def _heatmap(rows, layer, out_dir, paths):
  key = f"spectral/{layer}/sv"
  steps, vecs = [], []
  for r in rows:
    v = _vector(r.get(key))
    if v is not None:
      steps.append(r["step"])
      vecs.append(v)
  if not vecs:
    return
  k = max(len(v) for v in vecs)
  M = np.full((k, len(vecs)), np.nan)
  for j, v in enumerate(vecs):
    M[:len(v), j] = v
  with np.errstate(divide="ignore", invalid="ignore"):
    L = np.where(M > 0, np.log10(M), np.nan)
  fig = Figure(figsize=(6.4, 4.2))
  ax = fig.add_subplot()
  x_edges = np.array(steps, np.float64)
  if len(x_edges) > 1:
    mid = (x_edges[1:] + x_edges[:-1]) / 2
    x_edges = np.r_[2 * x_edges[0] - mid[0], mid, 2 * x_edges[-1] - mid[-1]]
  else:
    x_edges = np.array([x_edges[0] - 0.5, x_edges[0] + 0.5])
  mesh = ax.pcolormesh(x_edges, np.arange(k + 1) + 0.5, np.ma.masked_invalid(L),
                       shading="flat", cmap="viridis")
  ax.invert_yaxis()
  fig.colorbar(mesh, ax=ax, label="log10 singular value")
  ax.set(title=f"{layer}: top-{k} singular values", xlabel="step",
         ylabel="index i (s_i)")
  fig.tight_layout()
  _save(fig, out_dir, f"sv_{layer.replace('/', '_')}.png", paths)


def _intruders_vs_eps(rows, out_dir, paths):
  rx = re.compile(r"intruders/(.+)/maxsim")
  logged = [r for r in rows if any(rx.fullmatch(k) for k in r)]
  if not logged:
    return
  picks = sorted({0, len(logged) // 2, len(logged) - 1})
  eps = np.linspace(0.0, 1.0, 101)
  fig = Figure(figsize=(6.4, 4.2))
  ax = fig.add_subplot()
  for i in picks:
    r = logged[i]
    vecs = [v for k, v in ((k, _vector(v)) for k, v in r.items() if rx.fullmatch(k))
            if v is not None]
    ax.plot(eps, count_from_maxsim(vecs, eps), label=f"step {r['step']}")
  ax.set(title="intruder dimensions (whole model)", xlabel="eps",
         ylabel="count of top-k vectors with max |cos| < eps")
  ax.legend(fontsize="small")
  fig.tight_layout()
  _save(fig, out_dir, "intruders_vs_eps.png", paths)


def render(metrics_jsonl_path: str, out_dir: str) -> list[str]:
  """Turn a metrics.jsonl into PNG figures (module docstring lists them).

  Args:
    metrics_jsonl_path: one JSON object per line with "step" and any subset
      of the diagnostics keys, train/loss, eval/accuracy, ...
    out_dir: created if missing.

  Returns:
    Paths of the PNG files written (empty when nothing could be drawn).
  """
  rows = read_metrics(metrics_jsonl_path)
  os.makedirs(out_dir, exist_ok=True)
  paths: list[str] = []
  if not rows:
    return paths
  keys = sorted({k for r in rows for k in r})
  for what, logy in (("loss", True), ("accuracy", False)):
    sel = [(k, k) for k in keys if k.endswith(f"/{what}")]
    _lines(rows, sel, what, what, out_dir, f"{what}.png", paths, logy=logy)
  rank_lines = []
  for l in _layers(rows, r"rank/(.+)"):
    k = f"rank/{l}"
    if any(isinstance(r.get(k), list) for r in rows):   # Tucker: mode ranks
      rank_lines += [((k, 0), f"{l} c_out"), ((k, 1), f"{l} c_in")]
    else:
      rank_lines.append((k, l))
  _lines(rows, rank_lines, "rank per layer", "rank", out_dir, "rank.png", paths)
  _spectral_ranks(rows, out_dir, paths)
  kap = _layers(rows, r"spectral/(.+)/kappa_log10")
  _lines(rows, [(f"spectral/{l}/kappa_log10", l) for l in kap],
         "condition number", "log10 kappa", out_dir, "condition.png", paths)
  for layer in _layers(rows, r"spectral/(.+)/sv"):
    _heatmap(rows, layer, out_dir, paths)
  _intruders_vs_eps(rows, out_dir, paths)
  _lines(rows, [("intruders/total", "total")], "intruder dimensions",
         "count", out_dir, "intruders.png", paths)
  alp = _layers(rows, r"heavytail/(.+)/alpha")
  _lines(rows, [(f"heavytail/{l}/alpha", l) for l in alp], "power-law alpha",
         "alpha", out_dir, "alpha.png", paths)
  return paths


def _spectral_ranks(rows, out_dir, paths):
  panels = []
  for metric in ("stable_rank", "effective_rank"):
    layers = _layers(rows, rf"spectral/(.+)/{metric}")
    drawn = [(l, *_series(rows, f"spectral/{l}/{metric}")) for l in layers]
    drawn = [d for d in drawn if d[1]]
    if drawn:
      panels.append((metric.replace("_", " "), drawn))
  if not panels:
    return
  fig = Figure(figsize=(6.0 * len(panels), 4.2))
  for i, (title, drawn) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    for label, x, y in drawn:
      ax.plot(x, y, label=label)
    ax.set(title=title, xlabel="step", ylabel=title)
    if len(drawn) <= 12:
      ax.legend(fontsize="small")
  fig.tight_layout()
  _save(fig, out_dir, "spectral_ranks.png", paths)
