"""Embedded-default demo: rank-adaptive DLRT on scikit-learn's digits.

A factorized MLP (64 -> 128 -> 128 -> 10, hidden layers U S V^T starting at
rank 32, head dense) trained with the rank-adaptive KLS / BUG integrator
(tau = 0.1) and Adam; spectral diagnostics are logged while it trains.

  python -m lrtrain.main --config configs/digits.py --workdir runs/digits
  python -m lrtrain.main --config configs/digits.py:tau=0.2,runlocal --workdir /tmp/d
  python -m lrtrain.sweep --config configs/digits.py --workdir runs/digits_tau --all

Expected: about 20-40 s on 2 CPU cores; test accuracy around 0.95 with
ranks shrinking well below 32 and most dense parameters saved.
"""

from lrtrain import config_utils as cu


def get_config(arg=None):
  """Config of the digits demo; arg: runlocal, tau, rank, seed, method, steps."""
  a = cu.parse_arg(arg, runlocal=False, tau=0.1, rank=32, seed=0, method="kls",
                   steps=600)
  c = cu.base_config()
  c.seed = a.seed

  # --- Data: 1797 8x8 images, 10 classes (bundled with scikit-learn) ---
  c.data.name = "digits"
  c.data.validation_size = 200      # examples

  # --- Model ---
  c.model.name = "mlp"
  c.model.widths = (128, 128)       # hidden units
  c.model.factor.kind = "lowrank"
  c.model.factor.rank = a.rank      # initial rank of the hidden layers

  # --- Integrator: rank-adaptive DLRT ---
  c.integrator.name = a.method
  c.integrator.tau = a.tau          # relative truncation tolerance
  c.integrator.adaptive = True

  # --- Optimizer ---
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3  # peak
  c.optimizer.schedule = "cosine"

  # --- Loop (cadences follow num_steps) ---
  c.train.batch_size = 64           # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = c.train.get_ref("num_steps") // 6
  c.train.log_every = 20            # steps
  c.train.checkpoint_every = c.train.get_ref("num_steps") // 2
  c.diagnostics.every = c.train.get_ref("num_steps") // 12
  c.diagnostics.heavy_tail = False  # layers too small for power-law fits
  c.diagnostics.full_spectrum = True  # every singular value (128 per layer)

  if a.runlocal:
    cu.shrink_for_local(c)
  return c


def get_sweep(arg=None):
  """Truncation tolerance sweep (6 points)."""
  del arg
  return cu.product(
      cu.sweep("integrator.tau", [0.02, 0.05, 0.1, 0.15, 0.2, 0.3]),
      cu.sweep("seed", [0]))
