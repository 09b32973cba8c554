"""TDLRT: a small VGG on CIFAR-10 with rank-adaptive Tucker convolutions.

  python -m lrtrain.main --config configs/tdlrt_vgg.py --workdir runs/vgg

CIFAR-10 is read from data.dir or downloaded with data.download=True. The
runlocal variant trains on the bundled digits instead (no files needed).
Expected: about 1 h on 2 CPU cores (use a GPU); test accuracy around 0.80
at tau 0.1 with Tucker channel ranks well below the full ones.

References:
  Zangrando, Schotthoefer, Ceruti, Kusch, Tudisco, "Geometry-aware training
  of factorized layers in tensor Tucker format", NeurIPS 2024.
"""

from lrtrain import config_utils as cu


def get_config(arg=None):
  """arg: runlocal, tau, seed, steps."""
  a = cu.parse_arg(arg, runlocal=False, tau=0.1, seed=0, steps=10000)
  c = cu.base_config()
  c.seed = a.seed
  c.data.name = "cifar10"
  c.data.validation_size = 5000     # examples

  c.model.name = "vgg"
  c.model.factor.kind = "lowrank"   # hidden dense layers
  c.model.factor.conv_kind = "tucker"
  c.model.factor.rank = 32          # dense layers' initial rank
  c.model.factor.tucker_ranks = (16, 16)  # (r_out, r_in) initial channel ranks
  c.model.dense_layers = ("head", "conv1")  # RGB input conv stays dense

  c.integrator.name = "tdlrt"
  c.integrator.tau = a.tau
  c.integrator.adaptive = True

  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 0.05  # peak
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 500    # steps
  c.optimizer.weight_decay = 5e-4   # L2 on cores and non-factor params

  c.train.batch_size = 128          # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = c.train.get_ref("num_steps") // 20
  c.train.log_every = 100           # steps
  c.train.checkpoint_every = c.train.get_ref("num_steps") // 10
  c.diagnostics.every = c.train.get_ref("num_steps") // 20

  if a.runlocal:
    cu.shrink_for_local(c)
    c.data.name = "digits"
    c.model.factor.rank = 4
    c.model.factor.tucker_ranks = (4, 4)
    c.optimizer.warmup_steps = 1
  return c


def get_sweep(arg=None):
  """tau x seeds."""
  del arg
  return cu.product(cu.sweep("integrator.tau", [0.05, 0.1, 0.2]),
                    cu.sweep("seed", [0, 1]))
