"""plots.render on synthetic metrics.jsonl files."""

import json
import os

import jax
import numpy as np

from lrtrain import factorizations as fz
from lrtrain.diagnostics import Diagnostics
from lrtrain.diagnostics.plots import read_metrics, render
from lrtrain.integrators import base as ibase


def _write(path, rows):
  with open(path, "w") as fh:
    for r in rows:
      fh.write(json.dumps(r) + "\n")


def _png(path):
  with open(path, "rb") as fh:
    return fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_render_all_figures_from_real_diagnostics(tmp_path):
  key = jax.random.PRNGKey(0)
  params = {"fc1": {"kernel": fz.lowrank.init(key, 20, 16, 3, capacity=6)},
            "block0/attn": {"kernel": jax.random.normal(key, (16, 12))}}
  diag = Diagnostics(params, top_k=5)
  rows = []
  for step in range(0, 50, 10):
    scaled = jax.tree.map(lambda x: x * (1 + step / 50) if x.dtype.kind == "f"
                          else x, params)
    m = diag(scaled)
    row = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in m.items()}
    # rank/<layer> comes from the step's aux, as in a run's rows.
    row.update({k: np.asarray(v).tolist()
                for k, v in ibase.rank_aux(scaled).items()})
    row.update({"step": step, "train/loss": 2.0 / (1 + step),
                "eval/accuracy": step / 50})
    rows.append(row)
  path = tmp_path / "metrics.jsonl"
  _write(path, rows)
  out = render(str(path), str(tmp_path / "plots"))
  names = sorted(os.path.basename(p) for p in out)
  assert names == sorted([
      "loss.png", "accuracy.png", "rank.png", "spectral_ranks.png",
      "condition.png", "sv_fc1.png", "sv_block0_attn.png",
      "intruders_vs_eps.png", "intruders.png"])
  assert all(_png(p) and os.path.getsize(p) > 1000 for p in out)


def test_render_tolerates_missing_and_bad_values(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": 0, "train/loss": 1.0},
          {"step": 1, "train/loss": float("nan"), "rank/fc": None},
          {"step": 2, "train/loss": 0.5, "spectral/fc/sv": [1.0, None, 0.0]},
          {"step": 3, "intruders/fc/maxsim": [0.2, float("nan"), 0.9]}]
  _write(path, rows)
  with open(path, "a") as fh:
    fh.write("not json\n\n")
  assert len(read_metrics(str(path))) == 4
  names = sorted(os.path.basename(p) for p in render(str(path), str(tmp_path / "p")))
  assert names == ["intruders_vs_eps.png", "loss.png", "sv_fc.png"]


def test_render_empty_file(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("")
  assert render(str(path), str(tmp_path / "p")) == []


def test_rank_figure_draws_tucker_channel_ranks(tmp_path):
  """rank/<layer> of a Tucker layer is its (4,) mode ranks (the step's aux):
  the rank figure draws its c_out and c_in ranks beside scalar layers."""
  from lrtrain.diagnostics import plots  # pylint: disable=g-import-not-at-top
  rows = [{"step": s, "rank/conv": [8 - s, 6 - s, 3, 3], "rank/fc": 5 - s}
          for s in range(1, 4)]
  assert plots._series(rows, ("rank/conv", 1)) == ([1, 2, 3], [5.0, 4.0, 3.0])  # pylint: disable=protected-access
  assert plots._series(rows, "rank/conv") == ([], [])  # pylint: disable=protected-access
  path = tmp_path / "metrics.jsonl"
  _write(path, rows)
  out = render(str(path), str(tmp_path / "plots"))
  assert [os.path.basename(p) for p in out] == ["rank.png"]


def _run_rows(rank_steps, full=True):
  """Rows of a truncated layer fc1 (rank/<layer>, norm) and a dense head."""
  rows = []
  for step, r in rank_steps:
    s = [2.0 ** -i for i in range(r)]
    sv = s + [0.0] * (16 - r)
    rows.append({"step": step, "rank/fc1": r,
                 "spectral/fc1/sv": sv[:4],
                 "spectral/fc1/norm_frobenius": float(np.linalg.norm(s)),
                 "spectral/fc1/numerical_rank": r,
                 "spectral/head/sv": [3.0, 2.0],
                 "intruders/total": step // 10, "intruders/fc1/count": step // 10,
                 "intruders/fc1/maxsim": [0.9, 0.4, 0.2, float("nan")]})
    if full:
      rows[-1]["spectral/fc1/sv_full"] = sv
  return rows


def _config(path, name="kls", adaptive=True):
  path.write_text(json.dumps({"integrator": {"name": name, "tau": 0.1,
                                             "adaptive": adaptive},
                              "diagnostics": {"eps": 0.5}}))


def test_rank_and_intruder_axes_show_whole_counts(tmp_path):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from lrtrain.diagnostics import plots  # pylint: disable=g-import-not-at-top
  figs = plots.figures(_run_rows([(0, 7), (10, 6), (20, 6), (30, 6)]))
  for name in ("rank.png", "intruders.png", "intruders_vs_eps.png"):
    ax = figs[name].axes[0]
    FigureCanvasAgg(figs[name]).draw()
    ticks = ax.get_yticks()
    assert len(ticks) > 2 and np.all(ticks == np.round(ticks)), (name, ticks)
  line = figs["rank.png"].axes[0].get_lines()[0]
  assert line.get_drawstyle() == "steps-post"
  assert list(line.get_xdata()) == [0, 10, 20, 30]
  assert "reference" in figs["intruders.png"].axes[0].get_title()


def test_sv_figure_shows_active_values_and_tau(tmp_path):
  from lrtrain.diagnostics import plots  # pylint: disable=g-import-not-at-top
  rows = _run_rows([(0, 12), (10, 7)])
  _config(tmp_path / "config.json")
  run = plots.run_info(str(tmp_path / "config.json"))
  assert (run.method, run.tau, run.eps) == ("kls", 0.1, 0.5)
  fig = plots.figures(rows, run)["sv_fc1.png"]
  assert "method kls, tau = 0.1" in fig.get_suptitle()
  heat = fig.axes[0]
  # All 12 active values of the 16 logged (zeros past the rank are cut).
  assert heat.collections[0].get_array().shape == (12, 2)
  labels = [l.get_label() for ax in fig.axes for l in ax.get_lines()]
  assert sum("tau ||s||_2" in l for l in labels) == 3   # heat map + 2 spectra
  # Tau is marked on truncated layers only, and only for a method with tau.
  head = plots.figures(rows, run)["sv_head.png"]
  assert not any("tau" in l.get_label() for ax in head.axes
                 for l in ax.get_lines())
  _config(tmp_path / "config.json", name="dense")
  dense = plots.run_info(str(tmp_path / "config.json"))
  assert dense.tau is None and dense.subtitle == "method dense"
  fig = plots.figures(rows, dense)["sv_fc1.png"]
  assert not any("tau" in l.get_label() for ax in fig.axes
                 for l in ax.get_lines())
  _config(tmp_path / "config.json", adaptive=False)
  assert plots.run_info(str(tmp_path / "config.json")).tau is None


def test_sv_figure_says_when_only_top_k_were_logged():
  from lrtrain.diagnostics import plots  # pylint: disable=g-import-not-at-top
  fig = plots.figures(_run_rows([(0, 12), (10, 7)], full=False))["sv_fc1.png"]
  assert fig.axes[0].get_title() == "Top 4 of up to 12 singular values of fc1"
  texts = [t.get_text() for t in fig.axes[0].texts]
  assert any("full_spectrum" in t for t in texts)


def test_render_names_method_from_config_json(tmp_path):
  path = tmp_path / "metrics.jsonl"
  _write(path, _run_rows([(0, 12), (10, 7)]))
  _config(tmp_path / "config.json")
  out = render(str(path), str(tmp_path / "plots"))
  assert sorted(os.path.basename(p) for p in out) == [
      "intruders.png", "intruders_vs_eps.png", "rank.png", "sv_fc1.png",
      "sv_head.png"]
  assert all(_png(p) for p in out)
