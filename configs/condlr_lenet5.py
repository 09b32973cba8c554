"""CondLR: LeNet5 with orthonormally constrained factors (well-conditioned
low-rank layers) on Fashion-MNIST, fixed rank.

  python -m lrtrain.main --config configs/condlr_lenet5.py --workdir runs/condlr

Expected: about 10 min on 2 CPU cores; test accuracy around 0.88 at rank
20 with log10 condition numbers of the cores kept small.

References:
  Savostianova, Zangrando, Ceruti, Tudisco, "Robust low-rank training via
  approximate orthonormal constraints", NeurIPS 2023.
"""

from lrtrain import config_utils as cu


def get_config(arg=None):
  """arg: runlocal, rank, seed, variant, steps."""
  a = cu.parse_arg(arg, runlocal=False, rank=20, seed=0, variant="mean",
                   steps=3000)
  c = cu.base_config()
  c.seed = a.seed
  c.data.name = "fashion_mnist"
  c.data.validation_size = 5000     # examples

  c.model.name = "lenet5"
  c.model.factor.kind = "lowrank"
  c.model.factor.conv_kind = "lowrank"
  c.model.factor.rank = a.rank      # fixed rank

  c.integrator.name = "condlr"
  c.integrator.adaptive = False
  c.integrator.variant = a.variant  # mean|approx_orth
  c.integrator.kappa_tau = 0.1      # core conditioning tolerance

  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 0.05  # peak
  c.optimizer.schedule = "cosine"

  c.train.batch_size = 128          # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = c.train.get_ref("num_steps") // 10
  c.train.log_every = 50            # steps
  c.train.checkpoint_every = c.train.get_ref("num_steps") // 4
  c.diagnostics.every = c.train.get_ref("num_steps") // 10

  if a.runlocal:
    cu.shrink_for_local(c)
    c.model.factor.rank = 4
  return c


def get_sweep(arg=None):
  """Variant x rank x seeds."""
  del arg
  return cu.product(cu.sweep("integrator.variant", ["mean", "approx_orth"]),
                    cu.sweep("model.factor.rank", [10, 20]),
                    cu.sweep("seed", [0, 1]))
