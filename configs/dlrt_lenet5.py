"""DLRT on LeNet5 / Fashion-MNIST (Schotthoefer et al., NeurIPS 2022).

Every conv and hidden dense layer is U S V^T (convs as (c_out, kh kw c_in)
matrices), the head dense; rank-adaptive KLS / BUG with tolerance tau.

  python -m lrtrain.main --config configs/dlrt_lenet5.py:tau=0.1 --workdir runs/lenet
  python -m lrtrain.sweep --config configs/dlrt_lenet5.py --workdir runs/lenet --all

Expected: about 10 min on 2 CPU cores; test accuracy around 0.89 at tau 0.1
with a large fraction of the parameters removed. Fashion-MNIST comes from
the dataset-fashion-mnist Debian package (or data.dir / data.download).

References:
  Schotthoefer, Zangrando, Kusch, Ceruti, Tudisco, "Low-rank lottery
  tickets", NeurIPS 2022.
"""

from lrtrain import config_utils as cu


def get_config(arg=None):
  """arg: runlocal, tau, rank, seed, adaptive, method, steps."""
  a = cu.parse_arg(arg, runlocal=False, tau=0.1, rank=20, seed=0, adaptive=True,
                   method="kls", steps=3000)
  c = cu.base_config()
  c.seed = a.seed
  c.data.name = "fashion_mnist"
  c.data.validation_size = 5000     # examples

  c.model.name = "lenet5"
  c.model.factor.kind = "lowrank"
  c.model.factor.conv_kind = "lowrank"
  c.model.factor.rank = a.rank      # initial rank (adaptive: clamped to r_max by the first truncation)

  c.integrator.name = a.method
  c.integrator.tau = a.tau
  c.integrator.adaptive = a.adaptive

  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 0.05  # peak
  c.optimizer.momentum = 0.9
  c.optimizer.schedule = "cosine"

  c.train.batch_size = 128          # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = c.train.get_ref("num_steps") // 10
  c.train.log_every = 50            # steps
  c.train.checkpoint_every = c.train.get_ref("num_steps") // 4
  c.diagnostics.every = c.train.get_ref("num_steps") // 10

  if a.runlocal:
    cu.shrink_for_local(c)
    c.model.factor.rank = min(a.rank, 4)
  return c


def get_sweep(arg=None):
  """Adaptive tau x seeds, then fixed-rank KLS and vanilla factor SGD."""
  del arg
  seeds = cu.sweep("seed", [0, 1, 2])
  adaptive = cu.product(cu.sweep("integrator.tau", [0.05, 0.1, 0.2, 0.3]), seeds)
  fixed = cu.product(
      cu.sweep("integrator.adaptive", [False]),
      cu.sweep("integrator.name", ["kls", "factors"]),
      cu.sweep("model.factor.rank", [10, 20]), seeds)
  return cu.chain(adaptive, fixed)
