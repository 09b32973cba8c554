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
