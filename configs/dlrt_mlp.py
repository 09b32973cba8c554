"""DLRT on a 5-layer MLP (784-500-500-500-500-10), Fashion-MNIST by default.

  python -m lrtrain.main --config configs/dlrt_mlp.py --workdir runs/mlp
  python -m lrtrain.main --config configs/dlrt_mlp.py:dataset=mnist --workdir runs/mnist

Expected: about 5 min on 2 CPU cores; test accuracy around 0.88 on
Fashion-MNIST at tau 0.1, hidden ranks settling far below 250.

References:
  Schotthoefer et al., "Low-rank lottery tickets", NeurIPS 2022 (Table 1).
"""

from lrtrain import config_utils as cu


def get_config(arg=None):
  """arg: runlocal, tau, rank, seed, dataset, steps, lr."""
  a = cu.parse_arg(arg, runlocal=False, tau=0.1, rank=100, seed=0,
                   dataset="fashion_mnist", steps=2000, lr=0.05)
  c = cu.base_config()
  c.seed = a.seed
  c.data.name = a.dataset
  c.data.validation_size = 5000     # examples

  c.model.name = "mlp"
  c.model.widths = (500, 500, 500, 500)  # hidden units
  c.model.factor.kind = "lowrank"
  c.model.factor.rank = a.rank      # initial rank

  c.integrator.name = "kls"
  c.integrator.tau = a.tau
  c.integrator.adaptive = True

  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = a.lr  # peak
  c.optimizer.schedule = "constant"

  c.train.batch_size = 256          # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = c.train.get_ref("num_steps") // 10
  c.train.log_every = 50            # steps
  c.train.checkpoint_every = c.train.get_ref("num_steps") // 4
  c.diagnostics.every = c.train.get_ref("num_steps") // 10

  if a.runlocal:
    cu.shrink_for_local(c)
    c.model.widths = (32, 32)
    c.model.factor.rank = 8
  return c


def get_sweep(arg=None):
  """tau x learning rate x seeds."""
  del arg
  return cu.product(cu.sweep("integrator.tau", [0.05, 0.1, 0.15]),
                    cu.sweep("optimizer.learning_rate", [0.02, 0.05]),
                    cu.sweep("seed", [0, 1]))
