"""Optimizer-state transport across basis changes, decided by evidence.

Rank-adaptive DLRT (KLS, augment to 2r and truncate by tau) with Adam,
five seeds per variant:
  off             moments left where they are (no transport)
  squares         first moments mapped like S; second moments with the
                  entrywise-squared maps, new directions keep the old value
                  at their index (lrtrain's default so far)
  squares_fresh   as squares, new directions start at 0 (a fresh optimizer)
  squares_mean    as squares, new directions start at the mean second
                  moment of the mapped coordinates

Tasks: `task=digits` (MLP 64-128-128-10 on scikit-learn's digits, the
demo's setting: rank 32, tau 0.1, Adam 3e-3 cosine, 600 steps) and
`task=lenet5` (LeNet5 on Fashion-MNIST, every conv and hidden dense layer
U S V^T from rank 20, tau 0.1, Adam 1e-3 cosine, batch 128, 400 steps).

  python -m experiments.transport_rules.run
"""

from lrtrain import config_utils as cu

VARIANTS = ("off", "squares", "squares_fresh", "squares_mean")
SEEDS = (0, 1, 2, 3, 4)


def get_config(arg=None):
  """arg: runlocal, task (digits|lenet5), seed, steps (0: the task's)."""
  a = cu.parse_arg(arg, runlocal=False, task="digits", seed=0, steps=0,
                   dataset="fashion_mnist")
  c = cu.base_config()
  c.seed = a.seed
  c.model.factor.kind = "lowrank"
  c.integrator.name = "kls"
  c.integrator.adaptive = True
  c.integrator.tau = 0.1              # relative truncation tolerance
  c.optimizer.name = "adam"
  c.optimizer.schedule = "cosine"
  c.diagnostics.enabled = False
  c.logging.progress = False
  if a.task == "digits":
    c.data.name = "digits"
    c.data.validation_size = 200      # examples
    c.model.name = "mlp"
    c.model.widths = (128, 128)       # hidden units
    c.model.factor.rank = 32          # initial rank
    c.optimizer.learning_rate = 3e-3  # peak
    c.train.batch_size = 64           # examples
    c.train.num_steps = a.steps or 600
  else:
    c.data.name = a.dataset
    c.data.validation_size = 5000     # examples
    c.model.name = "lenet5"
    c.model.factor.conv_kind = "lowrank"
    c.model.factor.rank = 20          # initial rank
    c.optimizer.learning_rate = 1e-3  # peak
    c.train.batch_size = 128          # examples
    c.train.num_steps = a.steps or 400
  c.train.eval_every = c.train.num_steps // 4
  c.train.log_every = 20              # steps
  c.train.checkpoint_every = c.train.num_steps // 2
  if a.runlocal:
    cu.shrink_for_local(c)
    c.data.name = "digits"
    c.model.name = "mlp"
    c.model.widths = (32,)
    c.model.factor.rank = 4
  return c


def get_sweep(arg=None):
  """Every variant x every seed."""
  runlocal = "runlocal" in (arg or "")
  variants = [{"integrator.transport": False}] + [
      {"integrator.transport": True, "integrator.transport_rule": r}
      for r in VARIANTS[1:]]
  return cu.product(variants, cu.sweep("seed", SEEDS[:2] if runlocal else SEEDS))
