"""End-to-end runlocal variant of the LM pretraining study
(experiments/lm_pretraining): every method trains on the tiny LLaMA, and
the report's tables hold what its README promises."""

import csv
import os

import pytest

from experiments.lm_pretraining import config as study_config
from experiments.lm_pretraining import run as lm_run


def _rows(path):
  with open(path) as fh:
    return list(csv.DictReader(fh))


@pytest.mark.tier2
def test_lm_pretraining_runlocal(tmp_path):
  out = lm_run.main(["--runlocal", "--workdir", str(tmp_path / "w"),
                     "--results", str(tmp_path / "r")])
  for p in out.values():
    assert os.path.getsize(p) > 0, p
  comp = _rows(out["comparison"])
  assert [r["method"] for r in comp] == list(study_config.METHODS)
  by = {r["method"]: r for r in comp}
  for r in comp:
    assert 1.0 < float(r["val_perplexity_mean"]) < 257.0 * 4   # bytes
    assert float(r["param_state_mib"]) > 0
    assert float(r["stable_rank_q_mean"]) >= 1.0
  # Memory: the factorized methods train fewer parameters than dense, and
  # GaLore keeps dense parameters with a smaller optimizer state.
  dense = by["dense"]
  for m in ("factors", "sltrain", "relora", "kls", "geolora"):
    assert int(by[m]["trainable_params"]) < int(dense["trainable_params"]), m
  assert int(by["galore"]["trainable_params"]) == int(dense["trainable_params"])
  assert float(by["galore"]["param_state_mib"]) < float(dense["param_state_mib"])
  assert {r["model"] for r in _rows(out["published"])} == {"60M", "130M"}
