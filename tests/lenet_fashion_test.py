"""LeNet5 on Fashion-MNIST (reduced for CI): DLRT against dense and against
vanilla factor SGD, the headline comparison of the DLRT paper.

References:
  Schotthoefer et al., "Low-rank lottery tickets", NeurIPS 2022 (LeNet5 table).
"""

import os

import pytest

from lrtrain import config_utils, sweep, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 300


def run(tmp_path, name, **overrides):
  c = sweep.load_config_module(os.path.join(ROOT, "configs/dlrt_lenet5.py")).get_config()
  point = {"data.max_train": 6000, "data.validation_size": 500,
           "train.num_steps": STEPS, "train.batch_size": 64,
           "train.eval_every": 0, "train.checkpoint_every": 0,
           "diagnostics.enabled": False, "logging.progress": False,
           "optimizer.schedule": "constant", "optimizer.learning_rate": 0.02,
           **overrides}
  c = config_utils.apply_overrides(c, point)
  return train.train_and_evaluate(c, str(tmp_path / name))


# Measured here (300 steps, momentum SGD lr 0.02, 6,000 examples): dense
# 0.838, DLRT tau 0.1 0.786 (36k vs 431k eval params), fixed-rank KLS 0.768,
# vanilla factor SGD diverges. DLRT trails dense early in training: in the
# authors' own logs (third_party/published/dlrt_lenet5_mnist_epochs.csv) the
# gap after one epoch (391 steps) is 10.3 points on MNIST and stays above 2
# points through epoch 9; experiments/dlrt_gap_vs_steps measures how it
# closes here. The bound below (8 points) is a regression check on that
# early gap, not the 2 points dense and DLRT reach late in training.
EARLY_GAP = 0.08


@pytest.mark.tier2
@pytest.mark.fashion_mnist
def test_dlrt_near_dense_smaller_and_beats_vanilla(tmp_path):
  dense = run(tmp_path, "dense", **{"integrator.name": "dense",
                                    "model.factor.kind": "dense",
                                    "model.factor.conv_kind": "dense"})
  dlrt = run(tmp_path, "dlrt", **{"integrator.tau": 0.1})
  kls20 = run(tmp_path, "kls20", **{"integrator.adaptive": False,
                                    "model.factor.rank": 20})
  try:
    van20 = run(tmp_path, "van20", **{"integrator.name": "factors",
                                      "integrator.adaptive": False,
                                      "model.factor.rank": 20})
    van_acc = van20["test/accuracy"]
  except train.DivergedError:
    van_acc = 0.1      # plain SGD on U, S, V blew up: chance level
  print({k: (s["test/accuracy"], s["params/eval"]) for k, s in
         [("dense", dense), ("dlrt", dlrt), ("kls20", kls20)]}, "vanilla", van_acc)
  assert dlrt["test/accuracy"] >= dense["test/accuracy"] - EARLY_GAP
  assert dlrt["params/eval"] < 0.2 * dense["params/eval"]
  assert kls20["test/accuracy"] > van_acc + 0.03
