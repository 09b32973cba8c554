"""The targets against PyTorch: each side at its fastest alternated round,
and the reach beside an unmet target from the same rounds."""

import pytest

from benchmarks import report, run


def _round(i, dlrt, geolora, one_cpu, dense, dense_one_cpu):
  at_dense = one_cpu / (dense_one_cpu / dense)
  return dict(round=i, torch_dense=25.0, torch_dlrt_adaptive=dlrt,
              dense=dense, kls_adaptive=60.0, geolora=geolora,
              lower_bound_geolora=one_cpu / 2,
              at_dense_speedup_geolora=at_dense)


def _geolora_target(rounds):
  res = {"lenet_paired": rounds}
  [t] = [t for t in run.targets(res) if t["target"].startswith("GeoLoRA")]
  return t


def test_each_side_at_its_fastest_round():
  # PyTorch slow in the first round, lrtrain slow in the second: the
  # per-round ratios are 3.2 and 1.875, the fastest rounds give 2.4.
  rounds = [_round(0, 160.0, 50.0, 80.0, 22.0, 40.0),
            _round(1, 120.0, 64.0, 84.0, 21.0, 38.0)]
  t = _geolora_target(rounds)
  assert t["value"] == pytest.approx(120.0 / 50.0)
  assert not t["met"]
  assert t["reach"] == pytest.approx(120.0 / 40.0)
  # At the dense step's speedup: one-CPU time over (dense one-CPU / dense).
  best = min(80.0 / (40.0 / 22.0), 84.0 / (38.0 / 21.0))
  assert t["at_dense"] == pytest.approx(120.0 / best)
  header, rule, row = report.tables_targets([t])
  assert header == "| target | measured | met |" and rule == "|---|---|---|"
  assert "bound: at most 3.00x" in row
  assert f"{120.0 / best:.2f}x at the dense step's speedup" in row


def test_rounds_without_the_one_cpu_timings_have_no_reach():
  rounds = [dict(_round(0, 130.0, 50.0, 80.0, 22.0, 40.0))]
  for key in ("lower_bound_geolora", "at_dense_speedup_geolora"):
    del rounds[0][key]
  t = _geolora_target(rounds)
  assert t["reach"] is None and t["at_dense"] is None
  assert t["value"] == pytest.approx(2.6)
