"""Figures from a run's metrics.jsonl (matplotlib, Agg canvas, no pyplot).

Each figure is drawn only from the keys that exist, so a run that logged a
subset of the diagnostics (or none) still gets the figures it can have.
When the run's config.json lies beside the metrics.jsonl, every figure is
subtitled with the method (integrator.name) and, for a rank-adaptive method,
its truncation tolerance tau, which the singular-value figures also mark.
Figures (file names in out_dir):

  loss.png, accuracy.png   train / validation / test loss and accuracy vs step
  rank.png                 rank/<layer> vs step, as steps (a Tucker layer: its
                           c_out and c_in ranks), integer ticks
  spectral_ranks.png       stable and effective rank per layer vs step
  condition.png            log10 condition number per layer vs step
  sv_<layer>.png           heat map of the layer's active singular values vs
                           step (all of them when diagnostics.full_spectrum
                           logged sv_full, else the top-k, said in the title),
                           and the spectra of the first and last logged step;
                           for a truncated layer the level tau ||s||_2
  intruders_vs_eps.png     model intruder count vs eps, recomputed from the
                           logged maxsim vectors (first/middle/last)
  intruders.png            intruder count per layer and in total vs step
  alpha.png                heavytail/<layer>/alpha vs step
  grad_stable_rank.png     stable rank of each layer's full-weight gradient
  update_overlap.png       overlap of consecutive update subspaces per layer

Intruder counts compare against the reference the diagnostics were built
with: in a run, the weights it started from (step 0).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lrtrain.diagnostics.intruders import count_from_maxsim

REFERENCE = "reference: the run's weights at step 0"


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What the figures say about the run (from its config.json)."""
  method: str | None = None
  tau: float | None = None          # truncation tolerance, rank-adaptive only
  eps: float | None = None          # intruder threshold of the diagnostics

  @property
  def subtitle(self) -> str:
    if self.method is None:
      return ""
    tau = "" if self.tau is None else f", tau = {self.tau:g}"
    return f"method {self.method}{tau}"


def run_info(config_path: str) -> RunInfo:
  """The method, tau (when the method truncates by it: it takes a `tau`
  option and integrator.adaptive is set) and intruder eps of a config.json;
  an empty RunInfo when the file is missing or unreadable."""
  try:
    with open(config_path) as fh:
      c = json.load(fh)
    integ = c["integrator"]
    method = str(integ["name"])
  except (OSError, ValueError, KeyError, TypeError):
    return RunInfo()
  from lrtrain import integrators  # pylint: disable=g-import-not-at-top
  try:
    truncates = "tau" in integrators.options(method) and integ.get("adaptive")
  except (KeyError, ValueError):
    truncates = False
  tau = integ.get("tau") if truncates else None
  eps = c.get("diagnostics", {}).get("eps")
  return RunInfo(method=method,
                 tau=float(tau) if isinstance(tau, (int, float)) else None,
                 eps=float(eps) if isinstance(eps, (int, float)) else None)


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


def _figure(run: RunInfo, ncols: int = 1) -> Figure:
  fig = Figure(figsize=(6.4 if ncols == 1 else 5.6 * ncols, 4.4))
  if run.subtitle:
    fig.suptitle(run.subtitle, fontsize="small", color="0.3")
  return fig


def _integer_ticks(ax) -> None:
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _lines(rows, keys_labels, title, ylabel, run, *, logy=False, steps=False,
           integer=False, note=""):
  """One axes with a line per key (None if no key has data); `steps`
  draws each value as held until the next logged step."""
  drawn = [(label, *_series(rows, key)) for key, label in keys_labels]
  drawn = [d for d in drawn if d[1]]
  if not drawn:
    return None
  fig = _figure(run)
  ax = fig.add_subplot()
  for label, x, y in drawn:
    marker = "o" if len(x) == 1 else ("." if len(x) <= 60 else None)
    ax.plot(x, y, label=label, marker=marker,
            drawstyle="steps-post" if steps else "default")
  ax.set(title=title, xlabel="step", ylabel=ylabel)
  if logy and all(v > 0 for _, _, y in drawn for v in y):
    ax.set_yscale("log")
  if integer:
    _integer_ticks(ax)
  if note:
    ax.text(0.99, 0.01, note, transform=ax.transAxes, ha="right", va="bottom",
            fontsize="small", color="0.3")
  if len(drawn) <= 12:
    ax.legend(fontsize="small")
  fig.tight_layout()
  return fig


def _curves(rows, keys, what, run):
  """Loss or accuracy of every split (train, validation, test)."""
  names = {"train": "train", "eval": "validation", "test": "test"}
  order = lambda k: (list(names).index(k) if k in names else len(names), k)
  splits = sorted((k.split("/")[0] for k in keys
                   if k.endswith(f"/{what}") and k.count("/") == 1), key=order)
  sel = [(f"{split}/{what}", names.get(split, split)) for split in splits]
  return _lines(rows, sel, what.capitalize(), what, run, logy=what == "loss")


def _rank(rows, run):
  lines = []
  for l in _layers(rows, r"rank/(.+)"):
    k = f"rank/{l}"
    if any(isinstance(r.get(k), list) for r in rows):   # Tucker: mode ranks
      lines += [((k, 0), f"{l} c_out"), ((k, 1), f"{l} c_in")]
    else:
      lines.append((k, l))
  return _lines(rows, lines, "Rank per layer (step 0: initial)", "rank", run,
                steps=True, integer=True)


def _sv_figure(rows, layer, run):
  """Heat map of a layer's active singular values over the logged steps
  and the spectra of the first and last logged step, with tau ||s||_2."""
  key = f"spectral/{layer}/sv_full"
  if not any(key in r for r in rows):
    key = f"spectral/{layer}/sv"
  steps, vecs, norms = [], [], []
  for r in rows:
    v = _vector(r.get(key))
    if v is not None:
      steps.append(r["step"])
      vecs.append(v)
      norms.append(_scalar(r.get(f"spectral/{layer}/norm_frobenius")))
  if not vecs:
    return None
  k = max(len(v) for v in vecs)
  M = np.full((k, len(vecs)), np.nan)
  for j, v in enumerate(vecs):
    M[:len(v), j] = v
  with np.errstate(invalid="ignore"):
    active = M > 0                    # inactive ranks are logged as 0
  shown = max(int(active.any(axis=1).nonzero()[0].max()) + 1
              if active.any() else 1, 1)
  M = M[:shown]
  with np.errstate(divide="ignore", invalid="ignore"):
    L = np.where(M > 0, np.log10(M), np.nan)
  # How many values the layer has (its rank, or the numerical rank of a
  # dense layer), to say when only the top-k were logged.
  total = [v for key_ in (f"rank/{layer}", f"spectral/{layer}/numerical_rank")
           for v in _series(rows, key_)[1]]
  n_values = int(max(total)) if total else None
  partial = key.endswith("/sv") and n_values is not None and n_values > k
  tau = run.tau if f"rank/{layer}" in {k_ for r in rows for k_ in r} else None

  fig = _figure(run, ncols=2)
  ax = fig.add_subplot(1, 2, 1)
  x = np.array(steps, np.float64)
  if len(x) > 1:
    mid = (x[1:] + x[:-1]) / 2
    edges = np.r_[2 * x[0] - mid[0], mid, 2 * x[-1] - mid[-1]]
  else:
    edges = np.array([x[0] - 0.5, x[0] + 0.5])
  mesh = ax.pcolormesh(edges, np.arange(shown + 1) + 0.5,
                       np.ma.masked_invalid(L), shading="flat", cmap="viridis")
  ax.invert_yaxis()
  _integer_ticks(ax)
  fig.colorbar(mesh, ax=ax, label="log10 s_i")
  what = (f"Top {k} of up to {n_values} singular values" if partial
          else "Singular values")
  ax.set(title=f"{what} of {layer}", xlabel="step",
         ylabel="index i (s_1 largest)")
  if partial:
    ax.text(0.5, -0.2, "diagnostics.full_spectrum=True logs all of them",
            transform=ax.transAxes, ha="center", va="top", fontsize="small",
            color="0.3")
  if tau is not None and all(n is not None for n in norms):
    # Values above tau ||s||_2 are never truncated (the tail norm would
    # exceed the tolerance); the line sits below the last of them.
    above = [int(np.sum(np.nan_to_num(v) > tau * n)) for v, n in
             zip(vecs, norms)]
    ax.step(edges, np.r_[above, above[-1]] + 0.5, where="post", color="r",
            ls="--", lw=1.2, label="above: s_i > tau ||s||_2")
    ax.legend(fontsize="x-small", loc="lower right")

  ax2 = fig.add_subplot(1, 2, 2)
  picks = sorted({0, len(vecs) - 1})
  for j, color in zip(picks, ("C0", "C1")):
    v = vecs[j][:shown]
    ok = np.isfinite(v) & (v > 0)
    idx = np.arange(1, len(v) + 1)
    ax2.plot(idx[ok], v[ok], marker=".", color=color,
             label=f"step {steps[j]} ({int(ok.sum())} values)")
    if tau is not None and norms[j] is not None:
      ax2.axhline(tau * norms[j], color=color, ls="--", lw=1,
                  label=f"tau ||s||_2 at step {steps[j]}")
  ax2.set_yscale("log")
  ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax2.set(title=f"Spectrum of {layer}, first and last logged step",
          xlabel="index i", ylabel="s_i")
  ax2.legend(fontsize="x-small")
  fig.tight_layout()
  return fig


def _intruders_vs_eps(rows, run):
  rx = re.compile(r"intruders/(.+)/maxsim")
  logged = [r for r in rows if any(rx.fullmatch(k) for k in r)]
  if not logged:
    return None
  picks = sorted({0, len(logged) // 2, len(logged) - 1})
  eps = np.linspace(0.0, 0.99, 100)    # max |cos| rounds to 1 for kept vectors
  fig = _figure(run)
  ax = fig.add_subplot()
  for i in picks:
    r = logged[i]
    vecs = [v for k, v in ((k, _vector(v)) for k, v in r.items() if rx.fullmatch(k))
            if v is not None]
    ax.plot(eps, count_from_maxsim(vecs, eps), label=f"step {r['step']}")
  if run.eps is not None:
    ax.axvline(run.eps, color="0.5", ls=":", lw=1,
               label=f"eps = {run.eps:g} (logged counts)")
  _integer_ticks(ax)
  ax.set(title=f"Intruder dimensions vs eps, whole model\n({REFERENCE})",
         xlabel="eps (threshold on max |cos| with the reference's vectors)",
         ylabel="top-k vectors per layer with max |cos| < eps")
  ax.legend(fontsize="small")
  fig.tight_layout()
  return fig


def _intruders(rows, run):
  layers = _layers(rows, r"intruders/(.+)/count")
  lines = [("intruders/total", "total")] + [
      (f"intruders/{l}/count", l) for l in layers]
  eps = "" if run.eps is None else f" < {run.eps:g}"
  return _lines(rows, lines, f"Intruder dimensions\n({REFERENCE})",
                f"count (max |cos|{eps})", run, steps=True, integer=True)


def figures(rows: list[dict], run: RunInfo = RunInfo()) -> dict[str, Figure]:
  """{file name: Figure} of the metrics rows (module docstring)."""
  out = {}

  def add(name, fig):
    if fig is not None:
      out[name] = fig

  keys = sorted({k for r in rows for k in r})
  for what in ("loss", "accuracy"):
    add(f"{what}.png", _curves(rows, keys, what, run))
  add("rank.png", _rank(rows, run))
  add("spectral_ranks.png", _spectral_ranks(rows, run))
  kap = _layers(rows, r"spectral/(.+)/kappa_log10")
  add("condition.png", _lines(
      rows, [(f"spectral/{l}/kappa_log10", l) for l in kap],
      "Condition number s_1 / s_r of the active spectrum",
      "log10 condition number", run))
  for layer in _layers(rows, r"spectral/(.+)/sv(?:_full)?"):
    add(f"sv_{layer.replace('/', '_')}.png", _sv_figure(rows, layer, run))
  add("intruders_vs_eps.png", _intruders_vs_eps(rows, run))
  add("intruders.png", _intruders(rows, run))
  alp = _layers(rows, r"heavytail/(.+)/alpha")
  add("alpha.png", _lines(rows, [(f"heavytail/{l}/alpha", l) for l in alp],
                          "Power-law exponent alpha of eig(W^T W)", "alpha",
                          run))
  grad = _layers(rows, r"grad/(.+)/stable_rank")
  add("grad_stable_rank.png", _lines(
      rows, [(f"grad/{l}/stable_rank", l) for l in grad],
      "Stable rank of the gradient dL/dW, ||G||_F^2 / ||G||_2^2",
      "stable rank", run))
  upd = _layers(rows, r"update/(.+)/overlap")
  add("update_overlap.png", _lines(
      rows, [(f"update/{l}/overlap", l) for l in upd],
      "Overlap of the top-k left singular subspaces of consecutive\n"
      "weight updates (1: same directions, 0: orthogonal)", "overlap", run))
  return out


def render(metrics_jsonl_path: str, out_dir: str) -> list[str]:
  """Turn a metrics.jsonl into PNG figures (module docstring lists them).

  Args:
    metrics_jsonl_path: one JSON object per line with "step" and any subset
      of the diagnostics keys, train/loss, eval/accuracy, ...; a config.json
      beside it names the method and tau in the figures.
    out_dir: created if missing.

  Returns:
    Paths of the PNG files written (empty when nothing could be drawn).
  """
  rows = read_metrics(metrics_jsonl_path)
  os.makedirs(out_dir, exist_ok=True)
  run = run_info(os.path.join(os.path.dirname(metrics_jsonl_path),
                              "config.json"))
  paths = []
  for name, fig in figures(rows, run).items():
    path = os.path.join(out_dir, name)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    paths.append(path)
  return paths


def _spectral_ranks(rows, run):
  panels = []
  for metric, title in (("stable_rank", "Stable rank sum s_i^2 / s_1^2"),
                        ("effective_rank", "Effective rank (entropy)")):
    layers = _layers(rows, rf"spectral/(.+)/{metric}")
    drawn = [(l, *_series(rows, f"spectral/{l}/{metric}")) for l in layers]
    drawn = [d for d in drawn if d[1]]
    if drawn:
      panels.append((title, metric.replace("_", " "), drawn))
  if not panels:
    return None
  fig = _figure(run, ncols=len(panels))
  for i, (title, ylabel, drawn) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    for label, x, y in drawn:
      ax.plot(x, y, label=label)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if len(drawn) <= 12:
      ax.legend(fontsize="small")
  fig.tight_layout()
  return fig
