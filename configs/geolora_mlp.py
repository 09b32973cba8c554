"""GeoLoRA / parallel BUG on an MLP: one backward pass per step.

  python -m lrtrain.main --config configs/geolora_mlp.py --workdir runs/geolora

Expected: about 2 min on 2 CPU cores; Fashion-MNIST test accuracy around
0.87 at tau 0.1 with ranks adapting inside [r_min, r_max].

References:
  Schotthoefer, Zangrando, Ceruti, Tudisco, Kusch, "GeoLoRA: geometric
  integration for parameter efficient fine-tuning", 2024.
"""

from lrtrain import config_utils as cu


def get_config(arg=None):
  """arg: runlocal, tau, rank, seed, steps."""
  a = cu.parse_arg(arg, runlocal=False, tau=0.1, rank=32, seed=0, steps=2000)
  c = cu.base_config()
  c.seed = a.seed
  c.data.name = "fashion_mnist"
  c.data.validation_size = 5000     # examples

  c.model.name = "mlp"
  c.model.widths = (256, 256)       # hidden units
  c.model.factor.kind = "lowrank"
  c.model.factor.rank = a.rank      # initial rank

  c.integrator.name = "geolora"
  c.integrator.tau = a.tau
  c.integrator.adaptive = True
  c.integrator.r_max = 128          # largest rank per layer

  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3  # peak
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = c.train.get_ref("num_steps") // 20

  c.train.batch_size = 128          # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = c.train.get_ref("num_steps") // 10
  c.train.log_every = 50            # steps
  c.train.checkpoint_every = c.train.get_ref("num_steps") // 4
  c.diagnostics.every = c.train.get_ref("num_steps") // 10

  if a.runlocal:
    cu.shrink_for_local(c)
    c.model.widths = (32,)
    c.model.factor.rank = 8
  return c


def get_sweep(arg=None):
  """tau and learning rate zipped (larger tolerance, larger step), x seeds."""
  del arg
  return cu.product(
      cu.zip_(cu.sweep("integrator.tau", [0.05, 0.1, 0.2]),
              cu.sweep("optimizer.learning_rate", [5e-4, 1e-3, 2e-3])),
      cu.sweep("seed", [0, 1]))
