"""Cuttlefish: stable rank during full-rank training, then switch to low rank.

Full-rank (dense) training of LeNet5 or the 5-layer 784-wide MLP with the
spectral diagnostics every `interval` steps (spectral/<layer>/stable_rank);
run.py picks the switch step and trains the low-rank continuations.

  python -m experiments.cuttlefish_stable_rank.run
  python -m experiments.cuttlefish_stable_rank.run --dataset=mnist

Scale here: Fashion-MNIST, 10k training examples, 300 steps of batch 128
per model (3.8 epochs; Cuttlefish: CIFAR / ImageNet, full schedules). About
12 min for both models on a shared 2-core CPU.

References:
  Wang et al., "Cuttlefish: Low-rank model training without all the
  tuning", MLSys 2023.
"""

from lrtrain import config_utils as cu

MODELS = ("lenet5", "mlp")
_ARGS = dict(runlocal=False, dataset="fashion_mnist", model="lenet5", seed=0,
             steps=300, max_train=10000, interval=25)


def get_config(arg=None):
  """arg: runlocal, dataset, model (lenet5|mlp), seed, steps, max_train,
  interval (steps between stable-rank measurements)."""
  a = cu.parse_arg(arg, **_ARGS)
  c = cu.base_config()
  c.seed = a.seed
  # --- Data ---
  c.data.name = a.dataset
  c.data.max_train = a.max_train    # examples (0 = all)
  c.data.validation_size = 1000     # examples
  # --- Model: full rank (the low-rank phase is built by run.py) ---
  c.model.name = a.model
  c.model.widths = (784,) * 4       # MLP hidden units
  c.model.factor.kind = "dense"
  c.model.factor.conv_kind = "dense"
  c.integrator.name = "dense"
  # --- Optimizer: each model's DLRT-study optimizer ---
  if a.model == "mlp":
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
  else:
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
  c.optimizer.schedule = "constant"
  # --- Loop ---
  c.train.batch_size = 128          # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = 100          # steps
  c.train.log_every = 25            # steps
  c.train.checkpoint_every = a.interval  # steps: every candidate switch point
  c.train.max_to_keep = 1000        # keep them all
  c.train.eval_batch_size = 1000    # examples
  c.diagnostics.enabled = True
  c.diagnostics.every = a.interval  # steps between stable-rank measurements
  c.diagnostics.heavy_tail = False
  c.logging.progress = False
  if a.runlocal:
    cu.shrink_for_local(c)
    c.train.num_steps = 6
    c.train.checkpoint_every = 2
    c.train.max_to_keep = 1000
    c.diagnostics.every = 2
    c.data.validation_size = 64
    c.model.widths = (64,) * 4
  return c


def get_sweep(arg=None):
  """The full-rank phase of both models."""
  del arg
  return cu.sweep("model.name", list(MODELS))
