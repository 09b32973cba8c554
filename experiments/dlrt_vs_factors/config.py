"""LeNet5 at fixed rank 20: DLRT (fixed-rank KLS) vs plain SGD on factors.

Three ways to train the same rank-20 LeNet5 (every conv and hidden dense
layer factorized, head dense) with plain SGD, lr 0.05, batch 128 (the
paper's optimizer):
  kls       fixed-rank KLS integrator (DLRT)
  factors   optax SGD directly on U, S, V (lrtrain's 'factors' baseline)
  uv        optax SGD on a two-factor U V^T: a LowRank whose core is frozen
            to the identity (experiments/dlrt_vs_factors/run.py)

  python -m experiments.dlrt_vs_factors.run
  python -m experiments.dlrt_vs_factors.run --dataset=mnist

Scale here: Fashion-MNIST, 10k training examples, 200 steps (2.6 epochs;
the paper: MNIST, 10 epochs). About 6 min on a shared 2-core CPU.

References:
  Schotthoefer et al., "Low-rank lottery tickets", NeurIPS 2022.
"""

from lrtrain import config_utils as cu

METHODS = ("kls", "factors", "uv", "factors_lr_div10")
_ARGS = dict(runlocal=False, dataset="fashion_mnist", seed=0, steps=200,
             max_train=10000, rank=20, lr=0.05)


def get_config(arg=None):
  """arg: runlocal, dataset, seed, steps, max_train, rank, lr."""
  a = cu.parse_arg(arg, **_ARGS)
  c = cu.base_config()
  c.seed = a.seed
  # --- Data ---
  c.data.name = a.dataset
  c.data.max_train = a.max_train    # examples (0 = all)
  c.data.validation_size = 1000     # examples
  # --- Model: fixed rank 20 everywhere but the head ---
  c.model.name = "lenet5"
  c.model.factor.kind = "lowrank"
  c.model.factor.conv_kind = "lowrank"
  c.model.factor.rank = a.rank      # conv1 is 20 x 25, so 20 is its full rank
  # --- Integrator: fixed-rank KLS ('factors' / 'uv' set by the sweep) ---
  c.integrator.name = "kls"
  c.integrator.adaptive = False
  # --- Optimizer: the paper's plain SGD ---
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = a.lr
  c.optimizer.schedule = "constant"
  # --- Loop ---
  c.train.batch_size = 128          # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = 20           # steps (accuracy curve)
  c.train.log_every = 10            # steps
  c.train.eval_batch_size = 1000    # examples
  c.diagnostics.enabled = False
  c.logging.progress = False
  if a.runlocal:
    cu.shrink_for_local(c)
    c.data.validation_size = 64
    c.model.factor.rank = 4
  return c


def get_sweep(arg=None):
  """The runner-expressible methods; run.py adds the two-factor 'uv'."""
  del arg
  return cu.sweep("integrator.name", ["kls", "factors"])
